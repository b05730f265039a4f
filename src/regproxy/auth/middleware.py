"""The auth middleware: every request is checked against what its route needs.

What a route needs comes from ``ROUTE_ACCESS`` beside the route table (api/routes.py); a HEAD
route without its own entry needs what its GET needs. A matched route with no entry at all
is refused (fail closed) and logged, so a new route cannot go out unprotected by mistake.
Requests no route matched go on to their 404/405.
"""

from __future__ import annotations

import logging

from aiohttp import web

from regproxy import oci
from regproxy.api.middleware import Handler
from regproxy.api.request import repo_name
from regproxy.api.routes import LOGIN, MOUNT_SOURCE, OPEN, ROUTE_ACCESS
from regproxy.auth.rules import PULL
from regproxy.auth.service import AUTH, CALLER, MOUNT_SOURCE_DENIED, Caller
from regproxy.errors import Denied

log = logging.getLogger(__name__)


def route_needs(request: web.Request) -> tuple[str, ...] | None:
    """The route's entry in ``ROUTE_ACCESS``; None for requests no route matched."""
    resource = request.match_info.route.resource
    if resource is None:
        return None
    method = request.method
    needs = ROUTE_ACCESS.get((method, resource.canonical))
    if needs is None and method == "HEAD":
        needs = ROUTE_ACCESS.get(("GET", resource.canonical))
    if needs is None:
        log.error("no ROUTE_ACCESS entry for %s %s: refused", method, resource.canonical)
        raise Denied("this endpoint has no access rule")
    return needs


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    spec = route_needs(request)
    if spec is None or OPEN in spec:
        return await handler(request)
    needs: list[tuple[str, str]] = []
    mount_source: tuple[str, str] | None = None
    for action in spec:
        if action == LOGIN:
            continue
        if action == MOUNT_SOURCE:
            source = request.query.get("from")
            if "mount" in request.query and source:
                mount_source = (oci.parse_name(source), PULL)
            continue
        needs.append((repo_name(request), action))
    if mount_source is None:
        request[CALLER] = await request.app[AUTH].authorize(request, needs)
    else:
        request[CALLER] = await _authorize_mount(request, needs, mount_source)
    return await handler(request)


async def _authorize_mount(
    request: web.Request, needs: list[tuple[str, str]], source: tuple[str, str]
) -> Caller:
    """A mount also needs pull on its ``from``; a token that lacks it while the rules grant
    it gets a 401 like any other (the client asks for a token that has it). A caller the
    rules refuse the source gets no mount but a plain upload (202): what a missing blob gets,
    so nothing about the source leaks, and containerd, which fails a whole push on any mount
    answer but 401 or 201, pushes on."""
    auth = request.app[AUTH]
    try:
        return await auth.authorize(request, [*needs, source])
    except Denied:
        caller = await auth.authorize(request, needs)
        request[MOUNT_SOURCE_DENIED] = True
        return caller
