"""``Authenticator``: who is calling, and may they do what the route needs.

A request proves who it is with a bearer token from ``/token`` or with Basic credentials
sent straight to ``/v2/...`` (some CI tools do that unprompted). Without either it is
anonymous, which passes where the rules grant anonymous clients what the route needs, and
gets a 401 with a ``Bearer`` challenge elsewhere; ``/v2/`` itself always wants a token or
credentials when auth is on, because docker decides from its answer whether to log in.

A valid token that lacks an action gets 401 ``insufficient_scope`` when the rules would
grant it (the client should fetch a new token: that is how containerd learns the scope) or
when the caller is anonymous (it may log in), and 403 ``DENIED`` otherwise.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import ipaddress
import logging
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from aiohttp import web

from regproxy import oci
from regproxy.auth.ratelimit import LoginLimiter, SharedLoginLimiter
from regproxy.auth.rules import (
    ALL_ACTIONS,
    DEFAULT_RULES,
    PULL,
    AccessPolicy,
    PullOnly,
    Rule,
    expand_actions,
)
from regproxy.auth.tokens import (
    InvalidToken,
    IssuedToken,
    SigningKeyError,
    TokenService,
    generate_key,
    load_key,
    load_or_create_key,
)
from regproxy.auth.users import HtpasswdError, UserStore, fingerprint
from regproxy.config import Config, ConfigError
from regproxy.errors import Denied, NameInvalid, TooManyRequests, Unauthorized
from regproxy.metrics import Metrics

log = logging.getLogger(__name__)

CATALOG_SCOPE: Final = "registry:catalog:*"
_HOST_RE: Final = re.compile(r"[A-Za-z0-9.:\[\]-]+")
# (repository, action) pairs a request needs.
Needs = Sequence[tuple[str, str]]


def users_path(config: Config) -> Path:
    return Path(config.auth.users_file) if config.auth.users_file else config.data_path / "htpasswd"


def key_path(config: Config) -> Path:
    if config.auth.key_path:
        return Path(config.auth.key_path)
    return config.data_path / "auth" / "token-key.pem"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Caller:
    """Who a request comes from (``user`` None: anonymous), for handlers that filter."""

    user: str | None
    policy: AccessPolicy

    def may(self, repo: str, action: str) -> bool:
        return self.policy.allows(self.user, repo, action)

    def may_pull(self, repo: str) -> bool:
        return self.may(repo, PULL)

    def may_pull_everything(self) -> bool:
        """Open mode: what a mount without ``from`` (a blob from anywhere) needs."""
        return self.policy.open_access


def scope_strings(needs: Needs) -> list[str]:
    by_repo: dict[str, list[str]] = {}
    for repo, action in needs:
        actions = by_repo.setdefault(repo, [])
        if action not in actions:
            actions.append(action)
    return [f"repository:{repo}:{','.join(actions)}" for repo, actions in by_repo.items()]


class Authenticator:
    def __init__(
        self,
        policy: AccessPolicy,
        users: UserStore,
        tokens: TokenService,
        limiter: LoginLimiter,
        *,
        realm: str = "",
    ) -> None:
        self.policy = policy
        self.users = users
        self.tokens = tokens
        self.limiter = limiter
        self.realm = realm
        # Failures counted for all replicas too, once the metadata store is open (app.py).
        self.shared_limiter: SharedLoginLimiter | None = None
        # Counts refused logins (registry_auth_login_failures_total); create_app sets it.
        self.metrics: Metrics | None = None

    # -- challenges ------------------------------------------------------------------------

    def realm_for(self, request: web.BaseRequest) -> str:
        if self.realm:
            return self.realm
        host = request.host if _HOST_RE.fullmatch(request.host) else "localhost"
        return f"{request.scheme}://{host}/token"

    def challenge(
        self, request: web.BaseRequest, scopes: Sequence[str] = (), error: str | None = None
    ) -> dict[str, str]:
        params = [f'realm="{self.realm_for(request)}"', f'service="{self.tokens.service}"']
        if scopes:
            params.append(f'scope="{" ".join(scopes)}"')
        if error:
            params.append(f'error="{error}"')
        return {"WWW-Authenticate": "Bearer " + ",".join(params)}

    # -- passwords -------------------------------------------------------------------------

    async def login(
        self, request: web.BaseRequest, user: str, password: str, scopes: Sequence[str] = ()
    ) -> str:
        """``user`` if ``password`` is right; 401 if not, 429 after too many failures."""
        address = request.remote or "-"
        wait = self.limiter.retry_after(address, user)
        if wait <= 0 and self.shared_limiter is not None:
            wait = await self.shared_limiter.retry_after(address, user)
        if wait > 0:
            log.warning("login refused: too many failures from %s", address)
            if self.metrics is not None:
                self.metrics.login_failed("locked_out")
            raise TooManyRequests(
                "too many failed logins, try again later",
                headers={"Retry-After": str(max(1, math.ceil(wait)))},
            )
        if await asyncio.to_thread(self.users.verify, user, password):
            self.limiter.succeeded(address, user)
            if self.shared_limiter is not None:
                await self.shared_limiter.succeeded(address, user)
            return user
        self.limiter.failed(address, user)
        if self.shared_limiter is not None:
            await self.shared_limiter.failed(address, user)
        if self.metrics is not None:
            self.metrics.login_failed("password")
        # The name may be a password typed into the wrong field: log it only if it is a user.
        known = await asyncio.to_thread(self.users.hash_of, user) is not None
        log.warning(
            "failed login for %s from %s", repr(user) if known else "an unknown user", address
        )
        raise Unauthorized("invalid username or password", headers=self.challenge(request, scopes))

    async def basic(
        self, request: web.BaseRequest, credentials: str, scopes: Sequence[str] = ()
    ) -> str:
        try:
            decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise Unauthorized(
                "malformed Basic credentials", headers=self.challenge(request, scopes)
            ) from None
        user, sep, password = decoded.partition(":")
        if not sep:
            raise Unauthorized(
                "malformed Basic credentials", headers=self.challenge(request, scopes)
            )
        return await self.login(request, user, password, scopes)

    async def refresh(self, request: web.BaseRequest, token: str) -> str:
        """The user of a valid refresh token whose password has not changed since."""
        try:
            user, password_fp = self.tokens.verify_refresh(token)
        except InvalidToken as exc:
            log.info("refresh token refused: %s", exc)
            raise Unauthorized("invalid refresh token", headers=self.challenge(request)) from None
        hashed = await asyncio.to_thread(self.users.hash_of, user)
        if hashed is None or not hmac.compare_digest(fingerprint(hashed), password_fp):
            raise Unauthorized("invalid refresh token", headers=self.challenge(request))
        return user

    # -- tokens ----------------------------------------------------------------------------

    def grant(self, user: str | None, scopes: Iterable[str]) -> list[tuple[str, str, list[str]]]:
        """What a token for ``user`` asking for ``scopes`` carries: only the granted actions."""
        granted: dict[tuple[str, str], set[str]] = {}
        for scope in (s for field in scopes for s in field.split()):
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            if kind == "repository":
                try:
                    repo = oci.parse_name(name)
                except NameInvalid:
                    continue
                allowed = expand_actions(actions.split(",")) & self.policy.granted(user, repo)
                granted.setdefault(("repository", repo), set()).update(allowed)
            elif kind == "registry" and name == "catalog":
                granted[("registry", "catalog")] = {ALL_ACTIONS}
        return [(kind, name, sorted(actions)) for (kind, name), actions in granted.items()]

    def issue(self, user: str | None, scopes: Iterable[str]) -> IssuedToken:
        return self.tokens.issue_access(user, self.grant(user, scopes))

    async def issue_refresh(self, user: str) -> IssuedToken | None:
        hashed = await asyncio.to_thread(self.users.hash_of, user)
        return None if hashed is None else self.tokens.issue_refresh(user, fingerprint(hashed))

    # -- requests --------------------------------------------------------------------------

    async def authorize(self, request: web.Request, needs: Needs) -> Caller:
        """The caller, if it may take every (repository, action) in ``needs``.

        Empty ``needs``: any identity will do (``/v2/``, the catalog).
        """
        policy = self.policy
        for repo, action in needs:
            if action != PULL and policy.pull_only(repo):
                raise Denied(f"{repo} is a pull-through cache: pull only")
        if policy.open_access:
            return Caller(None, policy)
        scopes = scope_strings(needs) if needs else [CATALOG_SCOPE] if _is_catalog(request) else []
        scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
        scheme = scheme.lower()
        if scheme == "bearer":
            try:
                claims = self.tokens.verify_access(credentials.strip())
            except InvalidToken as exc:
                log.info("token refused for %s %s: %s", request.method, request.path, exc)
                raise Unauthorized(
                    "invalid or expired token",
                    headers=self.challenge(request, scopes, "invalid_token"),
                ) from None
            caller = Caller(claims.subject, policy)
            missing = [(r, a) for r, a in needs if a not in claims.actions(r)]
            if missing:
                if caller.user is None or all(caller.may(r, a) for r, a in missing):
                    raise Unauthorized(
                        "the token does not grant this access",
                        headers=self.challenge(request, scopes, "insufficient_scope"),
                    )
                raise Denied(
                    detail=[{"Type": "repository", "Name": r, "Action": a} for r, a in missing]
                )
            return caller
        if scheme == "basic":
            caller = Caller(await self.basic(request, credentials, scopes), policy)
        elif scheme:
            raise Unauthorized(
                "unsupported authorization scheme", headers=self.challenge(request, scopes)
            )
        else:
            caller = Caller(None, policy)
            if not needs or not all(caller.may(r, a) for r, a in needs):
                raise Unauthorized(headers=self.challenge(request, scopes))
        missing = [(r, a) for r, a in needs if not caller.may(r, a)]
        if missing:
            raise Denied(
                detail=[{"Type": "repository", "Name": r, "Action": a} for r, a in missing]
            )
        return caller


def _is_catalog(request: web.Request) -> bool:
    return request.path == "/v2/_catalog"


def build_authenticator(config: Config, pull_only: PullOnly) -> Authenticator:
    """Users, rules, signing key and limits from ``config``; ConfigError if unusable.

    Refuses to go on when listening beyond loopback with nobody to authenticate and no rule
    that lets anonymous clients in on purpose.
    """
    auth = config.auth
    path = users_path(config)
    if auth.users_file and not path.is_file():
        raise ConfigError(f"config key auth.users_file: no such file {path}")
    try:
        users = UserStore(auth.users, path)
        user_count = users.count()
    except (OSError, HtpasswdError) as exc:
        raise ConfigError(f"config key auth.users_file: {exc}") from exc
    rules = tuple(Rule.of(r.who, r.repos, r.actions) for r in auth.rules)
    open_access = not rules and user_count == 0
    policy = AccessPolicy(
        rules or DEFAULT_RULES, auth.groups, open_access=open_access, pull_only=pull_only
    )
    if not is_loopback(config.host) and user_count == 0 and not policy.anonymous_rules:
        raise ConfigError(
            f"config key listen: {config.listen} is not a loopback address, and with no users"
            " and no rule for anonymous clients anyone could push and delete. Add users"
            f" (auth.users, or auth.users_file, default {path}: `regproxy user add NAME`)"
            " or allow anonymous access on purpose with an [[auth.rules]] entry whose"
            ' who includes "anonymous"'
        )
    try:
        keyfile = key_path(config)
        if auth.key_path:
            key = load_key(keyfile)
        elif open_access:  # tokens grant nothing that is not already allowed: keep no key
            key = generate_key()
        else:
            key = load_or_create_key(keyfile)
    except (OSError, SigningKeyError) as exc:
        raise ConfigError(f"config key auth.key_path: {exc}") from exc
    tokens = TokenService(
        key, service=auth.service, ttl=auth.token_ttl, refresh_ttl=auth.refresh_ttl
    )
    limiter = LoginLimiter(auth.max_login_failures, auth.login_lockout)
    return Authenticator(policy, users, tokens, limiter, realm=auth.realm)


AUTH = web.AppKey("auth", Authenticator)
# Set on every request the auth middleware lets through.
CALLER = web.RequestKey("caller", Caller)
# Set when a mount's ?from= is refused: the upload starts without mounting.
MOUNT_SOURCE_DENIED = web.RequestKey("mount_source_denied", bool)
