"""The repository catalog, paginated with ``n`` and ``last``: only what the caller may pull."""

from __future__ import annotations

from aiohttp import web

from regproxy.api.request import page, registry
from regproxy.api.tags import next_link
from regproxy.auth.rules import PULL
from regproxy.auth.service import CALLER, Caller
from regproxy.registry.base import Registry

# Repositories read per query while looking for ones the caller may see.
_BATCH = 500


async def _visible(reg: Registry, caller: Caller, last: str, limit: int) -> list[str]:
    """Up to ``limit`` names after ``last`` that ``caller`` may pull."""
    found: list[str] = []
    batch = max(limit, _BATCH)
    while len(found) < limit:
        names = await reg.list_repositories(last, batch)
        found += [name for name in names if caller.may(name, PULL)]
        if len(names) < batch:
            break
        last = names[-1]
    return found[:limit]


async def list_catalog(request: web.Request) -> web.Response:
    last, n = page(request)
    repos = await _visible(registry(request), request[CALLER], last, n + 1) if n else []
    headers = {}
    if len(repos) > n:
        repos = repos[:n]
        headers["Link"] = next_link(request.path, n, repos[-1])
    return web.json_response({"repositories": repos}, headers=headers)
