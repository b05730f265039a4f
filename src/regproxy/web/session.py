"""Who is looking at the UI: the same users and rules as the registry.

Signing in posts the login form; the answer sets a cookie holding a refresh token of the
registry's own token service (``auth/tokens.py``): HttpOnly (no script can read it),
SameSite=Strict (no other site's page can send it), Path=/ui/ (the registry API never sees
it), Secure when the request came over HTTPS. Changing the user's password revokes it, and it
expires with ``auth.refresh_ttl``. Failed logins count against the same lockout as ``/token``.

Without a valid cookie the caller is anonymous: in open mode (no users, no rules) that may
see everything, otherwise what the rules grant ``anonymous``.
"""

from __future__ import annotations

from aiohttp import web

from regproxy.auth.service import AUTH, Caller
from regproxy.errors import Unauthorized

COOKIE = "regproxy_ui"
COOKIE_PATH = "/ui/"
LOGIN_PATH = "/ui/login"


async def caller_of(request: web.Request) -> Caller:
    """The signed-in user of the request's cookie, or anonymous."""
    auth = request.app[AUTH]
    token = request.cookies.get(COOKIE)
    if not token or auth.policy.open_access:
        return Caller(None, auth.policy)
    try:
        user = await auth.refresh(request, token)
    except Unauthorized:  # expired, forged, or the password changed since
        return Caller(None, auth.policy)
    return Caller(user, auth.policy)


def auth_enabled(request: web.Request) -> bool:
    return not request.app[AUTH].policy.open_access


def anonymous_sees_nothing(request: web.Request) -> bool:
    """Auth is on and no rule grants anonymous clients anything: send them to log in."""
    policy = request.app[AUTH].policy
    return not policy.open_access and not policy.anonymous_rules


async def sign_in(request: web.Request, user: str, password: str) -> str:
    """The cookie value for ``user``; Unauthorized / TooManyRequests as ``/token`` would."""
    auth = request.app[AUTH]
    user = await auth.login(request, user, password)
    issued = await auth.issue_refresh(user)
    if issued is None:  # the user was removed between the check and now
        raise Unauthorized("invalid username or password")
    return issued.token


def set_cookie(request: web.Request, response: web.StreamResponse, token: str) -> None:
    response.set_cookie(
        COOKIE,
        token,
        path=COOKIE_PATH,
        max_age=int(request.app[AUTH].tokens.refresh_ttl),
        httponly=True,
        samesite="Strict",
        secure=request.secure,
    )


def clear_cookie(response: web.StreamResponse) -> None:
    response.del_cookie(COOKIE, path=COOKIE_PATH)


def same_origin(request: web.Request) -> bool:
    """A form post from our own pages: its Origin (when the browser sends one) is ours."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    return origin == f"{request.scheme}://{request.host}"


def safe_next(target: str | None) -> str:
    """Where to go after signing in: a path of the UI, never another site."""
    if target and target.startswith("/ui/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/ui/"
