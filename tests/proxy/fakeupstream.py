"""A scripted fake upstream registry for the pull-through cache tests.

An aiohttp app (start it with pytest-aiohttp's ``aiohttp_server``) serving in-memory
repositories: manifests by tag and digest, blobs, tags/list and referrers. It counts every
request and every blob byte it sends, remembers every header it saw, and has knobs to make
it behave like the upstreams a cache meets in the wild:

- ``auth = "bearer"``: the token flow, with a ``/token`` endpoint issuing scoped tokens that
  expire after ``token_expires_in`` s (optionally requiring Basic credentials there);
  ``auth = "basic"``: plain Basic auth with ``users``.
- ``slow``: blob digests sent in two parts: ``slow_first`` bytes, then a wait on ``release``
  (``first_sent`` is set in between).
- ``fail_after``: digest -> N, close the connection once byte N of that blob is reached
  (every time); ``cut_once``: the same, for the next response only.
- ``ranges``: ``"honour"`` (default) answers ``Range: bytes=N-`` with 206 and the rest,
  ``"ignore"`` sends the whole blob with 200 (as some upstreams do);
  ``wrong_ranges``: digests whose ranged (206) bytes are sent wrong (same length).
  ``bytes_sent`` counts the blob bytes sent, per digest (``blob_bytes()`` sums them).
- ``corrupt``: digests whose bytes are sent wrong (same length); ``no_length``: digests sent
  chunked, without a ``Content-Length``.
- ``status``/``retry_after``: answer every registry request with that status (e.g. 429, 500);
  ``down``: drop every connection without an answer; ``delay``: sleep before answering.
- ``tags_page_max``: cap the ``n`` of tag lists (and the default page) at this many, with
  a ``Link: <...?last=...&n=...>; rel="next"`` while more remain (``link_style`` "absolute"
  for a full URL, "foreign" for one on another host), as Docker Hub and distribution do.
- ``tags_unpaged``: ignore ``n`` and ``last`` and send every tag, unsorted, as
  distribution 2.8 (Debian's docker-registry) does.
- ``raw_bodies``: path -> bytes to answer a GET of that path with (200, JSON), whatever it
  is (a tag list, a token, referrers): hostile or malformed documents.

- ``headers``: extra headers on every registry answer (e.g. Docker Hub's ``ratelimit-*``);
  ``gate``: an event every registry request waits for (after being recorded) before answering.
- ``redirect_to``: answer blob GETs with a 307 to ``<redirect_to>/<digest>``, served by this
  app's own ``/cdn/`` route or by a second server from :func:`cdn_app` (a CDN stand-in).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import yarl
from aiohttp import web

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"

SEND_CHUNK = 64 * 1024
SERVICE = "fake-registry"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def descriptor(media_type: str, data: bytes, **extra: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": digest_of(data), "size": len(data), **extra}


def pretty(doc: Any) -> bytes:
    """Indented JSON with a trailing newline: bytes no re-serialisation would reproduce."""
    return (json.dumps(doc, indent=3) + "\n").encode()


@dataclass(frozen=True)
class Seen:
    """One request as the fake received it."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    server: str  # "registry" or "cdn"


@dataclass
class FakeImage:
    repo: str
    tag: str | None
    manifest: bytes
    media_type: str
    digest: str
    blobs: dict[str, bytes] = field(default_factory=dict)


@dataclass
class FakeUpstream:
    # content
    manifests: dict[tuple[str, str], tuple[str, bytes]] = field(default_factory=dict)
    tags: dict[tuple[str, str], str] = field(default_factory=dict)
    blobs: dict[tuple[str, str], bytes] = field(default_factory=dict)
    # observations
    seen: list[Seen] = field(default_factory=list)
    statuses: Counter[tuple[str, str, int]] = field(default_factory=Counter)
    bytes_sent: Counter[str] = field(default_factory=Counter)
    token_scopes: list[str] = field(default_factory=list)
    # knobs
    auth: str = "none"  # "none", "bearer", "basic"
    users: dict[str, str] = field(default_factory=dict)
    token_requires_creds: bool = False
    token_expires_in: int = 300
    status: int | None = None
    retry_after: str | None = None
    down: bool = False
    delay: float = 0.0
    slow: set[str] = field(default_factory=set)
    slow_first: int = SEND_CHUNK
    fail_after: dict[str, int] = field(default_factory=dict)
    cut_once: dict[str, int] = field(default_factory=dict)
    ranges: str = "honour"  # or "ignore"
    wrong_ranges: set[str] = field(default_factory=set)
    corrupt: set[str] = field(default_factory=set)
    no_length: set[str] = field(default_factory=set)  # sent chunked, without Content-Length
    redirect_to: yarl.URL | None = None
    headers: dict[str, str] = field(default_factory=dict)
    gate: asyncio.Event | None = None
    referrers_api: bool = True
    raw_bodies: dict[str, bytes] = field(default_factory=dict)
    tags_page_max: int | None = None
    link_style: str = "relative"  # "relative", "absolute", "foreign"
    tags_unpaged: bool = False
    # state
    tokens: dict[str, tuple[str, float]] = field(default_factory=dict)
    first_sent: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    base_url: yarl.URL | None = None  # set by the fixture once the server runs
    server: Any = None  # the TestServer, so a test can stop it

    # -- content ----------------------------------------------------------------------------

    def add_blob(self, repo: str, data: bytes) -> str:
        digest = digest_of(data)
        self.blobs[(repo, digest)] = data
        return digest

    def add_manifest(
        self, repo: str, content: bytes, media_type: str, tag: str | None = None
    ) -> str:
        digest = digest_of(content)
        self.manifests[(repo, digest)] = (media_type, content)
        if tag is not None:
            self.tags[(repo, tag)] = digest
        return digest

    def add_image(
        self,
        repo: str,
        tag: str | None,
        layers: list[bytes] | None = None,
        *,
        docker: bool = False,
        seed: str = "x",
        **extra: Any,
    ) -> FakeImage:
        """A config blob, layers and an image manifest (OCI or Docker schema 2)."""
        config = pretty({"architecture": "amd64", "os": "linux", "seed": seed})
        if layers is None:
            layers = [f"layer of {seed}".encode() * 100]
        media_type = DOCKER_MANIFEST if docker else OCI_MANIFEST
        doc = {
            "schemaVersion": 2,
            "mediaType": media_type,
            "config": descriptor(DOCKER_CONFIG if docker else OCI_CONFIG, config),
            "layers": [descriptor(DOCKER_LAYER if docker else OCI_LAYER, x) for x in layers],
            **extra,
        }
        blobs = {self.add_blob(repo, data): data for data in (config, *layers)}
        content = pretty(doc)
        digest = self.add_manifest(repo, content, media_type, tag)
        return FakeImage(repo, tag, content, media_type, digest, blobs)

    def add_index(
        self, repo: str, tag: str | None, children: list[FakeImage], *, docker: bool = False
    ) -> FakeImage:
        media_type = DOCKER_LIST if docker else OCI_INDEX
        archs = ["amd64", "arm64", "riscv64", "s390x"]
        doc = {
            "schemaVersion": 2,
            "mediaType": media_type,
            "manifests": [
                descriptor(
                    child.media_type, child.manifest, platform={"os": "linux", "architecture": a}
                )
                for child, a in zip(children, archs, strict=False)
            ],
        }
        content = pretty(doc)
        digest = self.add_manifest(repo, content, media_type, tag)
        blobs = {d: b for child in children for d, b in child.blobs.items()}
        return FakeImage(repo, tag, content, media_type, digest, blobs)

    # -- observations -----------------------------------------------------------------------

    def count(self, method: str, path: str, status: int | None = None) -> int:
        """Requests for ``path`` (answered with ``status``, if given)."""
        return sum(
            n
            for (m, p, s), n in self.statuses.items()
            if m == method and p == path and (status is None or s == status)
        )

    def blob_gets(self, repo: str, digest: str) -> int:
        """Blob GETs the fake answered with the blob (200), not counting auth challenges."""
        return self.count("GET", f"/v2/{repo}/blobs/{digest}", 200)

    def ranged_gets(self, repo: str, digest: str) -> int:
        """Blob GETs answered with part of the blob (206)."""
        return self.count("GET", f"/v2/{repo}/blobs/{digest}", 206)

    def blob_bytes(self) -> int:
        """Blob bytes sent so far, over every digest and every response."""
        return sum(self.bytes_sent.values())

    def total(self, method: str | None = None) -> int:
        return sum(n for (m, _, _), n in self.statuses.items() if method in (None, m))

    def token_requests(self) -> int:
        return sum(1 for s in self.seen if s.path == "/token")

    def authorizations(self) -> list[str]:
        return [s.headers["Authorization"] for s in self.seen if "Authorization" in s.headers]

    def reset_counters(self) -> None:
        self.seen.clear()
        self.statuses.clear()
        self.bytes_sent.clear()
        self.token_scopes.clear()

    # -- the app ----------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        r = app.router
        r.add_get("/token", self._token)
        r.add_get("/v2/", self._base)
        r.add_get("/v2/{name:.+?}/tags/list", self._tags)
        r.add_get("/v2/{name:.+?}/referrers/{digest}", self._referrers)
        r.add_get("/v2/{name:.+?}/manifests/{reference}", self._manifest, allow_head=False)
        r.add_head("/v2/{name:.+?}/manifests/{reference}", self._manifest)
        r.add_get("/v2/{name:.+?}/blobs/{digest}", self._blob, allow_head=False)
        r.add_head("/v2/{name:.+?}/blobs/{digest}", self._blob)
        r.add_get("/cdn/{name:.+?}/{digest}", self._cdn_blob)
        app.on_shutdown.append(self._unblock)
        return app

    def cdn_app(self) -> web.Application:
        """A second server standing in for a CDN: blobs at ``/cdn/<repo>/<digest>``, no auth."""
        app = web.Application(middlewares=[self._cdn_middleware])
        app.router.add_get("/cdn/{name:.+?}/{digest}", self._cdn_blob)
        app.on_shutdown.append(self._unblock)
        return app

    async def _unblock(self, app: web.Application) -> None:
        self.release.set()

    def _record(self, request: web.Request, server: str) -> None:
        self.seen.append(
            Seen(request.method, request.path, dict(request.query), dict(request.headers), server)
        )

    @web.middleware
    async def _cdn_middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self._record(request, "cdn")
        response = await handler(request)
        self.statuses[(request.method, "cdn:" + request.path, response.status)] += 1
        return response

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self._record(request, "registry")
        if self.down:
            assert request.transport is not None
            request.transport.abort()
            raise ConnectionResetError("the fake upstream is down")
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.gate is not None and request.path != "/token":
            await self.gate.wait()
        response: web.StreamResponse
        if request.path in self.raw_bodies:
            response = web.Response(
                body=self.raw_bodies[request.path], content_type="application/json"
            )
        elif request.path == "/token" or request.path.startswith("/cdn/"):
            response = await handler(request)
        elif self.status is not None:
            headers = {"Retry-After": self.retry_after} if self.retry_after else {}
            code = "TOOMANYREQUESTS" if self.status == 429 else "UNKNOWN"
            response = _error(self.status, code, "scripted failure", headers)
        else:
            response = self._challenge(request) or await handler(request)
        if request.path != "/token" and not request.path.startswith("/cdn/"):
            response.headers.update(self.headers)
        self.statuses[(request.method, request.path, response.status)] += 1
        return response

    # -- auth -------------------------------------------------------------------------------

    def _challenge(self, request: web.Request) -> web.Response | None:
        """A 401 unless the request carries what ``auth`` requires."""
        header = request.headers.get("Authorization", "")
        if self.auth == "basic":
            if self._basic_ok(header):
                return None
            return _error(401, "UNAUTHORIZED", "login", {"WWW-Authenticate": 'Basic realm="fake"'})
        if self.auth != "bearer":
            return None
        scope = _scope_of(request.match_info.get("name"))
        scheme, _, token = header.partition(" ")
        issued = self.tokens.get(token) if scheme == "Bearer" else None
        if issued is not None and issued[1] > time.monotonic():
            if scope is None or issued[0] == scope:
                return None
        assert self.base_url is not None, "set base_url to the fake's URL"
        params = f'realm="{self.base_url / "token"}",service="{SERVICE}"'
        if scope is not None:
            params += f',scope="{scope}"'
        if issued is not None:
            params += ',error="invalid_token"'
        return _error(401, "UNAUTHORIZED", "token", {"WWW-Authenticate": f"Bearer {params}"})

    def _basic_ok(self, header: str) -> bool:
        scheme, _, encoded = header.partition(" ")
        if scheme != "Basic":
            return False
        try:
            user, _, password = base64.b64decode(encoded).decode().partition(":")
        except ValueError:
            return False
        return user in self.users and self.users[user] == password

    async def _token(self, request: web.Request) -> web.Response:
        if request.query.get("service") != SERVICE:
            return _error(400, "UNSUPPORTED", "wrong service")
        scope = request.query.get("scope", "")
        self.token_scopes.append(scope)
        if self.token_requires_creds and not self._basic_ok(
            request.headers.get("Authorization", "")
        ):
            return _error(401, "UNAUTHORIZED", "bad credentials")
        if not scope.startswith("repository:") or not scope.endswith(":pull"):
            return _error(400, "UNSUPPORTED", f"unexpected scope {scope!r}")
        token = secrets.token_hex(8)
        self.tokens[token] = (scope, time.monotonic() + self.token_expires_in)
        return web.json_response({"token": token, "expires_in": self.token_expires_in})

    # -- registry routes --------------------------------------------------------------------

    async def _base(self, request: web.Request) -> web.Response:
        return web.json_response({})

    async def _manifest(self, request: web.Request) -> web.Response:
        repo, reference = request.match_info["name"], request.match_info["reference"]
        digest = reference if ":" in reference else self.tags.get((repo, reference))
        found = self.manifests.get((repo, digest)) if digest else None
        if found is None:
            return _error(404, "MANIFEST_UNKNOWN", f"{repo}:{reference}")
        media_type, content = found
        headers = {"Content-Type": media_type, "Docker-Content-Digest": digest_of(content)}
        if request.method == "HEAD":
            headers["Content-Length"] = str(len(content))
            return web.Response(headers=headers)
        return web.Response(body=content, headers=headers)

    async def _tags(self, request: web.Request) -> web.Response:
        repo = request.match_info["name"]
        names = sorted(tag for (r, tag) in self.tags if r == repo)
        if not names and not any(r == repo for r, _ in self.manifests):
            return _error(404, "NAME_UNKNOWN", repo)
        if self.tags_unpaged:
            return web.json_response({"name": repo, "tags": names[1::2] + names[::2]})
        last = request.query.get("last", "")
        names = [t for t in names if t > last]
        n = int(request.query["n"]) if "n" in request.query else None
        if self.tags_page_max is not None:
            n = self.tags_page_max if n is None else min(n, self.tags_page_max)
        headers = {}
        if n is not None:
            if self.tags_page_max is not None and len(names) > n > 0:
                query = yarl.URL.build(path=request.path, query={"last": names[n - 1], "n": n})
                target = str(query)
                if self.link_style == "absolute":
                    target = str(request.url.with_path(request.path).with_query(query.query))
                elif self.link_style == "foreign":
                    target = "http://elsewhere.invalid" + target
                headers["Link"] = f'<{target}>; rel="next"'
            names = names[:n]
        return web.json_response({"name": repo, "tags": names}, headers=headers)

    async def _referrers(self, request: web.Request) -> web.Response:
        if not self.referrers_api:
            return _error(404, "NOT_FOUND", "no referrers API here")
        repo, subject = request.match_info["name"], request.match_info["digest"]
        found = []
        for (r, digest), (media_type, content) in sorted(self.manifests.items()):
            doc = json.loads(content)
            if r != repo or doc.get("subject", {}).get("digest") != subject:
                continue
            entry = {"mediaType": media_type, "digest": digest, "size": len(content)}
            artifact_type = doc.get("artifactType") or doc.get("config", {}).get("mediaType")
            if artifact_type:
                entry["artifactType"] = artifact_type
            found.append(entry)
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": found}
        return web.Response(body=json.dumps(index).encode(), headers={"Content-Type": OCI_INDEX})

    async def _blob(self, request: web.Request) -> web.StreamResponse:
        repo, digest = request.match_info["name"], request.match_info["digest"]
        data = self.blobs.get((repo, digest))
        if data is None:
            return _error(404, "BLOB_UNKNOWN", digest)
        headers = {"Docker-Content-Digest": digest, "Content-Type": "application/octet-stream"}
        if request.method == "HEAD":
            headers["Content-Length"] = str(len(data))
            return web.Response(headers=headers)
        if self.redirect_to is not None:
            return web.Response(
                status=307, headers={"Location": str(self.redirect_to / repo / digest)}
            )
        return await self._send(request, digest, data)

    async def _cdn_blob(self, request: web.Request) -> web.StreamResponse:
        repo, digest = request.match_info["name"], request.match_info["digest"]
        data = self.blobs.get((repo, digest))
        if data is None:
            return web.Response(status=404)
        return await self._send(request, digest, data)

    async def _send(self, request: web.Request, digest: str, data: bytes) -> web.StreamResponse:
        if digest in self.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        start = _range_start(request.headers.get("Range")) if self.ranges == "honour" else None
        if start is not None and start >= len(data):
            headers = {"Content-Range": f"bytes */{len(data)}"}
            return _error(416, "RANGE_INVALID", "range not satisfiable", headers)
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        position = 0
        if start is not None:
            response.set_status(206)
            response.headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            position = start
            if digest in self.wrong_ranges:
                data = data[:start] + bytes(b ^ 0x55 for b in data[start:])
        if digest in self.no_length:
            response.enable_chunked_encoding()
        else:
            response.content_length = len(data) - position
        await response.prepare(request)
        cut = self.cut_once.pop(digest, None)
        if cut is None:
            cut = self.fail_after.get(digest)
        if cut is not None and position >= cut:
            assert request.transport is not None
            request.transport.close()
            return response
        while position < len(data):
            end = min(position + SEND_CHUNK, len(data))
            if digest in self.slow and position < self.slow_first <= end:
                end = self.slow_first
            if cut is not None and end >= cut:
                end = cut
            await response.write(data[position:end])
            self.bytes_sent[digest] += end - position
            position = end
            if cut is not None and position >= cut:
                # Flush what was written, then hang up: a body shorter than Content-Length.
                assert request.transport is not None
                request.transport.close()
                return response
            if digest in self.slow and position == self.slow_first:
                self.first_sent.set()
                await self.release.wait()
        await response.write_eof()
        return response


def _range_start(header: str | None) -> int | None:
    """N from ``bytes=N-`` (the only form a cache resuming a transfer sends)."""
    if not header or not header.startswith("bytes=") or not header.endswith("-"):
        return None
    value = header[len("bytes=") : -1]
    return int(value) if value.isdigit() else None


def _scope_of(name: str | None) -> str | None:
    return f"repository:{name}:pull" if name else None


def _error(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    body = json.dumps({"errors": [{"code": code, "message": message}]})
    return web.Response(
        status=status, text=body, content_type="application/json", headers=headers or {}
    )
