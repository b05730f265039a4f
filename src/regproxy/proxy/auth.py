"""Authenticating to an upstream: the registry token flow and Basic auth.

An upstream answers 401 with ``WWW-Authenticate: Bearer realm=...,service=...,scope=...``;
we fetch a token from the realm (anonymously or with the configured credentials) and cache
it per scope until it expires. A ``Basic`` challenge gets the configured credentials.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass

import aiohttp

from regproxy import safejson

_PARAM_RE = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')
# Refresh tokens this many seconds before they expire, so none expires in flight.
_EXPIRY_MARGIN = 10.0
_DEFAULT_LIFETIME = 60.0


@dataclass(frozen=True, slots=True)
class Challenge:
    scheme: str
    params: dict[str, str]


def parse_challenge(header: str) -> Challenge | None:
    scheme, _, rest = header.strip().partition(" ")
    if not scheme:
        return None
    params = {m.group(1).lower(): m.group(2) or m.group(3) or "" for m in _PARAM_RE.finditer(rest)}
    return Challenge(scheme.lower(), params)


class TokenError(Exception):
    """The upstream's token service refused us (``status``) or could not be reached."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class UpstreamAuth:
    """Authorization headers for one upstream, with a token cache per scope."""

    def __init__(
        self, session: aiohttp.ClientSession, username: str = "", password: str = ""
    ) -> None:
        self._session = session
        # The Basic Authorization header value for the configured credentials, if any.
        self._basic = aiohttp.encode_basic_auth(username, password) if username else None
        self._tokens: dict[str, tuple[str, float]] = {}
        self._challenge: Challenge | None = None
        self._locks: dict[str, asyncio.Lock] = {}

    def header(self, scope: str) -> str | None:
        """The Authorization header for ``scope`` if we already hold one."""
        challenge = self._challenge
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            return self._basic
        cached = self._tokens.get(scope)
        if cached and cached[1] > time.monotonic():
            return f"Bearer {cached[0]}"
        return None

    async def answer(
        self, www_authenticate: str, scope: str, rejected: str | None = None
    ) -> str | None:
        """Handle a 401's challenge; returns the header to retry with, or None to give up.

        ``rejected`` is the Authorization header the 401 answered: a cached token equal to
        it (expired early, revoked) is replaced, not sent again.
        """
        challenge = parse_challenge(www_authenticate)
        if challenge is None:
            return None
        self._challenge = challenge
        if challenge.scheme == "basic":
            return self._basic
        if challenge.scheme != "bearer" or "realm" not in challenge.params:
            return None
        lock = self._locks.setdefault(scope, asyncio.Lock())
        async with lock:  # one token request per scope, however many callers wait for it
            cached = self.header(scope)
            if cached is not None and cached != rejected:
                return cached
            token, lifetime = await self._fetch_token(challenge, scope)
            self._tokens[scope] = (token, time.monotonic() + lifetime - _EXPIRY_MARGIN)
            return f"Bearer {token}"

    async def _fetch_token(self, challenge: Challenge, scope: str) -> tuple[str, float]:
        params = {"scope": challenge.params.get("scope") or scope}
        if "service" in challenge.params:
            params["service"] = challenge.params["service"]
        headers = {"Authorization": self._basic} if self._basic else None
        try:
            async with self._session.get(
                challenge.params["realm"], params=params, headers=headers
            ) as response:
                if response.status != 200:
                    raise TokenError(f"token service answered {response.status}", response.status)
                body = await response.json(content_type=None, loads=safejson.loads)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise TokenError(f"token service failed: {exc}") from exc
        if not isinstance(body, dict):
            raise TokenError("token service sent no JSON object")
        token = body.get("token") or body.get("access_token")
        if not isinstance(token, str) or not token:
            raise TokenError("token service sent no token")
        lifetime = body.get("expires_in")
        if not isinstance(lifetime, int | float) or lifetime <= 0:
            lifetime = _DEFAULT_LIFETIME
        return token, max(float(lifetime), _EXPIRY_MARGIN + 1)
