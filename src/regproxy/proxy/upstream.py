"""A client for one upstream registry: manifests, blobs, tags and referrers, read-only.

Only the configured URL is contacted (plus whatever its blob redirects point at, which
aiohttp follows without our Authorization header when the host changes). Nothing from the
client's request, credentials least of all, is ever forwarded.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import yarl

from regproxy import oci
from regproxy.config import UpstreamConfig
from regproxy.metrics import Metrics
from regproxy.oci import Digest
from regproxy.proxy.auth import UpstreamAuth
from regproxy.proxy.freshness import NegativeCache, RateLimit

log = logging.getLogger(__name__)

MANIFEST_ACCEPT = ", ".join(
    (oci.OCI_INDEX, oci.OCI_MANIFEST, oci.DOCKER_MANIFEST_LIST, oci.DOCKER_MANIFEST)
)


class UpstreamStatus(Exception):
    """The upstream answered with a status we cannot use."""

    def __init__(self, status: int, retry_after: str | None = None) -> None:
        super().__init__(f"upstream answered {status}")
        self.status = status
        self.retry_after = retry_after


class UpstreamRateLimited(UpstreamStatus):
    """Not sent: the upstream said its rate limit is used up until ``retry_after`` seconds."""

    def __init__(self, retry_after: str) -> None:
        super().__init__(429, retry_after)


@dataclass(frozen=True, slots=True)
class UpstreamManifest:
    media_type: str
    content: bytes
    digest: Digest | None  # what the upstream says in Docker-Content-Digest


def _is_docker_hub(name: str, url: yarl.URL) -> bool:
    return name == "docker.io" or (url.host or "").endswith("docker.io")


class Upstream:
    def __init__(
        self,
        name: str,
        config: UpstreamConfig,
        session: aiohttp.ClientSession,
        *,
        metrics: Metrics | None = None,
    ) -> None:
        self.name = name
        self.metrics = metrics if metrics is not None else Metrics()
        self.config = config
        self.base = yarl.URL(config.url.rstrip("/"))
        self._session = session
        self.auth = UpstreamAuth(session, config.username, config.password)
        official = config.official_library
        self._official = _is_docker_hub(name, self.base) if official is None else official
        # Wall-clock time for the rate-limit window and the negative cache (tests move it).
        self.clock: Callable[[], float] = time.time
        self.rate_limit = RateLimit()
        self.negative = NegativeCache(config.negative_ttl)

    @property
    def host(self) -> str:
        """The registry host as image references (and containerd's ``?ns=``) name it:
        ``host``, or ``host:port`` when the URL has a non-default port."""
        return self.base.host_port_subcomponent or ""

    def remote_name(self, path: str) -> str:
        """The upstream's repository name for ``path``, the part after our prefix."""
        if self._official and "/" not in path:
            return f"library/{path}"
        return path

    @asynccontextmanager
    async def request(
        self,
        method: str,
        path: str,
        repo: str,
        *,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """Send one request, answering an auth challenge once; yields the response."""
        url = self.base.with_path(self.base.path.rstrip("/") + path, encoded=False)
        scope = f"repository:{repo}:pull"
        blob = "/blobs/" in path
        for attempt in (1, 2):
            self._check_rate_limit(blob)
            sent = dict(headers or {})
            authorization = self.auth.header(scope)
            if authorization:
                sent["Authorization"] = authorization
            try:
                response = await self._session.request(method, url, params=params, headers=sent)
            except (aiohttp.ClientError, OSError, TimeoutError):
                self.metrics.upstream_request(self.name, method, "error")
                raise
            self.metrics.upstream_request(self.name, method, response.status)
            self._observe(response)
            if response.status == 401 and attempt == 1:
                challenge = response.headers.get("WWW-Authenticate", "")
                response.release()
                if await self.auth.answer(challenge, scope, authorization) is not None:
                    continue
                raise UpstreamStatus(401)
            try:
                yield response
            finally:
                response.release()
            return

    def _check_rate_limit(self, blob: bool) -> None:
        """Refuse to send while the upstream's rate limit is used up (no request is made)."""
        now = self.clock()
        if self.rate_limit.blocked_for(now, blob=blob) > 0:
            self.metrics.ratelimited_locally(self.name)
            raise UpstreamRateLimited(self.rate_limit.retry_after(now, blob=blob))

    def _observe(self, response: aiohttp.ClientResponse) -> None:
        """Take in the upstream's rate-limit headers (and 429s) from every answer."""
        now = self.clock()
        was_blocked = self.rate_limit.blocked_for(now) > 0
        if self.rate_limit.observe(response.status, response.headers, now):
            self.metrics.set_rate_limit(self.name, self.rate_limit.remaining, self.rate_limit.limit)
        if not was_blocked and self.rate_limit.blocked_for(now) > 0:
            log.warning(
                "upstream %s: rate limit reached, no requests to it for %ss",
                self.name,
                self.rate_limit.retry_after(now),
            )

    def rate_limited(self) -> bool:
        """Whether requests to this upstream are on hold now."""
        return self.rate_limit.blocked_for(self.clock()) > 0

    async def get_manifest(self, repo: str, reference: str, limit: int) -> UpstreamManifest | None:
        path = f"/v2/{repo}/manifests/{reference}"
        async with self.request("GET", path, repo, headers={"Accept": MANIFEST_ACCEPT}) as r:
            _check(r)
            if r.status == 404:
                return None
            if r.content_length is not None and r.content_length > limit:
                raise UpstreamStatus(413)
            content = await r.content.read(limit + 1)
            if len(content) > limit:
                raise UpstreamStatus(413)
            return UpstreamManifest(r.content_type, content, _digest_header(r))

    async def head_manifest(self, repo: str, reference: str) -> Digest | None:
        """The digest the upstream has for ``reference`` (None if it does not say or know)."""
        path = f"/v2/{repo}/manifests/{reference}"
        async with self.request("HEAD", path, repo, headers={"Accept": MANIFEST_ACCEPT}) as r:
            _check(r)
            return _digest_header(r) if r.status == 200 else None

    async def head_blob(self, repo: str, digest: Digest) -> int | None:
        async with self.request("HEAD", f"/v2/{repo}/blobs/{digest}", repo) as r:
            _check(r)
            return r.content_length if r.status == 200 else None

    @asynccontextmanager
    async def get_blob(self, repo: str, digest: Digest) -> AsyncIterator[aiohttp.ClientResponse]:
        async with self.request("GET", f"/v2/{repo}/blobs/{digest}", repo) as r:
            _check(r)
            if r.status != 200:
                raise UpstreamStatus(r.status, r.headers.get("Retry-After"))
            yield r

    async def list_tags(self, repo: str, last: str, limit: int) -> list[str] | None:
        params = {"n": str(limit)}
        if last:
            params["last"] = last
        async with self.request("GET", f"/v2/{repo}/tags/list", repo, params=params) as r:
            _check(r)
            if r.status == 404:
                return None
            body = await r.json(content_type=None)
        tags = body.get("tags") if isinstance(body, dict) else None
        return [t for t in tags or [] if isinstance(t, str)]

    async def referrers(
        self, repo: str, subject: Digest, artifact_type: str | None
    ) -> list[dict[str, Any]] | None:
        params = {"artifactType": artifact_type} if artifact_type else None
        path = f"/v2/{repo}/referrers/{subject}"
        async with self.request("GET", path, repo, params=params) as r:
            _check(r)
            if r.status != 200:
                return None
            body = await r.json(content_type=None)
        manifests = body.get("manifests") if isinstance(body, dict) else None
        found = [m for m in manifests or [] if isinstance(m, dict)]
        if artifact_type:  # the upstream may not filter; we always do
            found = [m for m in found if m.get("artifactType") == artifact_type]
        return found


def _check(response: aiohttp.ClientResponse) -> None:
    """Raise for answers that are neither success nor a plain 'not found'."""
    if response.status in (200, 404):
        return
    raise UpstreamStatus(response.status, response.headers.get("Retry-After"))


def _digest_header(response: aiohttp.ClientResponse) -> Digest | None:
    raw = response.headers.get(oci.CONTENT_DIGEST)
    if not raw:
        return None
    try:
        return Digest.parse(raw)
    except Exception:
        return None
