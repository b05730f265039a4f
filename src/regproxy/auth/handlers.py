"""The token endpoint of the registry token flow, ``/token``.

- ``GET /token?service=&scope=...`` anonymously or with Basic credentials; with
  ``offline_token=true`` and credentials the answer also holds a refresh token.
- ``POST /token`` with the OAuth2 forms docker and containerd send: ``grant_type=password``
  (``username``, ``password``) or ``grant_type=refresh_token`` (``refresh_token``), plus
  ``service``, ``scope`` (space-separated), ``client_id`` and ``access_type=offline``.

Tokens carry only the actions the rules grant; asking for more is not an error, it just
yields less. Answers are never cached. Refresh tokens travel in POST bodies, and the access
log records paths without query strings, so neither ends up in a log line.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from regproxy.auth.service import AUTH, Authenticator
from regproxy.errors import Denied, Unauthorized, Unsupported


class TokenRequestInvalid(Unsupported):
    status = 400
    default_message = "unsupported token request"


def _check_service(auth: Authenticator, service: str | None) -> None:
    if service and service != auth.tokens.service:
        raise Denied(f"this token service is {auth.tokens.service!r}, not {service[:100]!r}")


async def _respond(
    auth: Authenticator, user: str | None, scopes: list[str], offline: bool
) -> web.Response:
    issued = auth.issue(user, scopes)
    body: dict[str, Any] = {
        "token": issued.token,
        "access_token": issued.token,
        "expires_in": issued.expires_in,
        "issued_at": issued.issued_at,
    }
    if offline and user is not None:
        refresh = await auth.issue_refresh(user)
        if refresh is not None:
            body["refresh_token"] = refresh.token
    return web.json_response(body, headers={"Cache-Control": "no-store", "Pragma": "no-cache"})


async def get_token(request: web.Request) -> web.Response:
    auth = request.app[AUTH]
    _check_service(auth, request.query.get("service"))
    scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
    user: str | None = None
    if scheme.lower() == "basic":
        user = await auth.basic(request, credentials)
    elif scheme:
        raise Unauthorized("the token endpoint takes Basic credentials or none")
    offline = request.query.get("offline_token", "").lower() == "true"
    return await _respond(auth, user, request.query.getall("scope", []), offline)


async def post_token(request: web.Request) -> web.Response:
    auth = request.app[AUTH]
    form = await request.post()

    def field(name: str) -> str:
        value = form.get(name, "")
        return value if isinstance(value, str) else ""

    _check_service(auth, field("service"))
    grant_type = field("grant_type")
    if grant_type == "password":
        user = await auth.login(request, field("username"), field("password"))
    elif grant_type == "refresh_token":
        user = await auth.refresh(request, field("refresh_token"))
    else:
        raise TokenRequestInvalid(
            "grant_type must be password or refresh_token", detail={"grant_type": grant_type[:50]}
        )
    offline = field("access_type") == "offline"
    return await _respond(auth, user, [field("scope")], offline)
