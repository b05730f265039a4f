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

from regproxy import oci, safejson
from regproxy.config import UpstreamConfig
from regproxy.metrics import Metrics
from regproxy.oci import Digest
from regproxy.proxy.auth import UpstreamAuth
from regproxy.proxy.freshness import NegativeCache, RateLimit

log = logging.getLogger(__name__)

MANIFEST_ACCEPT = ", ".join(
    (oci.OCI_INDEX, oci.OCI_MANIFEST, oci.DOCKER_MANIFEST_LIST, oci.DOCKER_MANIFEST)
)


# Tag lists and referrers indexes larger than this are refused, not read into memory.
DOCUMENT_MAX_BYTES = 16 << 20
# Pages of an upstream's tag list followed for one client page, at most.
TAG_PAGES_MAX = 1000


class UpstreamStatus(Exception):
    """The upstream answered with a status we cannot use."""

    def __init__(self, status: int, retry_after: str | None = None) -> None:
        super().__init__(f"upstream answered {status}")
        self.status = status
        self.retry_after = retry_after


class UpstreamInvalid(UpstreamStatus):
    """The upstream answered 200 with a document we cannot use: malformed JSON, nested too
    deep, too large, or not the object the API promises. Handled like a 502."""

    def __init__(self, message: str) -> None:
        super().__init__(502)
        self.args = (message,)


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
            content = await _read_capped(r, limit)
            if content is None:
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
    async def get_blob(
        self, repo: str, digest: Digest, start: int = 0
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """The blob, or from ``start`` on (``Range: bytes=start-``): the response is a 200
        (the whole blob: the upstream may ignore ``Range``), a 206 (check its
        ``Content-Range``) or, for a ``start`` past the end, a 416."""
        headers = {"Range": f"bytes={start}-"} if start else None
        async with self.request("GET", f"/v2/{repo}/blobs/{digest}", repo, headers=headers) as r:
            if r.status not in (200, 206) and not (start and r.status == 416):
                _check(r)
                raise UpstreamStatus(r.status, r.headers.get("Retry-After"))
            yield r

    async def list_tags(self, repo: str, last: str, limit: int) -> list[str] | None:
        """Up to ``limit`` tags after ``last`` (None: no such repository).

        An upstream may cap ``n`` below ``limit`` (Docker Hub sends at most 100): then its
        ``Link: <...>; rel="next"`` is followed, on the upstream's own origin only, until
        ``limit`` tags are in or it has no more.
        """
        path = f"/v2/{repo}/tags/list"
        params = {"n": str(limit)}
        if last:
            params["last"] = last
        found: dict[str, None] = {}
        for _ in range(TAG_PAGES_MAX):
            async with self.request("GET", path, repo, params=params) as r:
                _check(r)
                if r.status == 404:
                    return list(found) if found else None
                body = await _document(r)
                following = self._next_page(r)
            tags = body.get("tags")
            page = [t for t in tags if isinstance(t, str)] if isinstance(tags, list) else []
            before = len(found)
            found.update(dict.fromkeys(page))
            if len(found) >= limit or following is None or len(found) == before:
                break
            path, params = following
            params["n"] = str(limit - len(found))
        return list(found)

    def _next_page(self, response: aiohttp.ClientResponse) -> tuple[str, dict[str, str]] | None:
        """The path and query of the ``rel="next"`` page, if on this upstream's origin."""
        link = response.links.get("next")
        url = link.get("url") if link is not None else None
        if not isinstance(url, yarl.URL) or url.origin() != self.base.origin():
            return None
        prefix = self.base.path.rstrip("/")
        if not url.path.startswith(prefix + "/v2/"):
            return None
        return url.path[len(prefix) :], dict(url.query)

    async def referrers(
        self, repo: str, subject: Digest, artifact_type: str | None
    ) -> list[dict[str, Any]] | None:
        params = {"artifactType": artifact_type} if artifact_type else None
        path = f"/v2/{repo}/referrers/{subject}"
        async with self.request("GET", path, repo, params=params) as r:
            _check(r)
            if r.status != 200:
                return None
            body = await _document(r)
        manifests = body.get("manifests")
        found = [m for m in manifests if isinstance(m, dict)] if isinstance(manifests, list) else []
        if artifact_type:  # the upstream may not filter; we always do
            found = [m for m in found if m.get("artifactType") == artifact_type]
        return found


async def _read_capped(response: aiohttp.ClientResponse, limit: int) -> bytes | None:
    """The whole body, or None if it is longer than ``limit`` (not read any further)."""
    if response.content_length is not None and response.content_length > limit:
        return None
    body = bytearray()
    async for chunk in response.content.iter_any():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


async def _document(response: aiohttp.ClientResponse) -> dict[str, Any]:
    """The JSON object an API answer holds; UpstreamInvalid if it holds anything else."""
    where = response.url.path
    content = await _read_capped(response, DOCUMENT_MAX_BYTES)
    if content is None:
        raise UpstreamInvalid(f"{where}: the answer is larger than {DOCUMENT_MAX_BYTES} bytes")
    try:
        body = safejson.loads(content)
    except ValueError as exc:  # malformed, undecodable, or nested too deep
        raise UpstreamInvalid(f"{where}: {exc}") from exc
    if not isinstance(body, dict):
        raise UpstreamInvalid(f"{where}: the answer is not a JSON object")
    return body


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
