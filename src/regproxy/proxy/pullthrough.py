"""The pull-through registry: a read-only Registry over the hosted cache and an upstream.

Repositories are named ``<upstream>/<path>`` here and ``<path>`` upstream. The cache is the
hosted registry itself, so cached blobs and manifests are stored, deduplicated and verified
exactly like pushed ones.

- Blobs: local first. A miss starts one fill per digest (see singleflight.py) that tees the
  upstream body to every waiting client and into storage.
- Manifests by digest: immutable, cached forever. By tag: served from cache for ``tag_ttl``
  seconds, then revalidated with a HEAD (which Docker Hub does not count against its pull
  limit) and fetched again only when the digest moved. When the upstream is down, slow,
  failing or rate-limiting, the cached copy is served and a warning logged.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import aiohttp

from regproxy import oci
from regproxy.errors import (
    BlobUnknown,
    Denied,
    DigestInvalid,
    ManifestInvalid,
    ManifestUnknown,
    NameUnknown,
    RegistryError,
    StorageFull,
    TooManyRequests,
    Unavailable,
)
from regproxy.meta.base import BlobRow, ManifestRow, UploadRow
from regproxy.oci import Digest
from regproxy.proxy.auth import TokenError
from regproxy.proxy.singleflight import Fill, FillFailed, SpoolGone
from regproxy.proxy.upstream import Upstream, UpstreamStatus
from regproxy.registry.base import ContentRange
from regproxy.registry.hosted import HostedRegistry, is_storage_full
from regproxy.registry.manifest import parse_manifest
from regproxy.streams import rechunk

log = logging.getLogger(__name__)

# The storage key of a blob that is still arriving from upstream.
FILLING = ""
_UPSTREAM_ERRORS = (aiohttp.ClientError, TimeoutError, TokenError, UpstreamStatus)
T = TypeVar("T")


def upstream_error(exc: BaseException, what: str) -> RegistryError:
    """The spec's error for an upstream failure when nothing cached can stand in."""
    if isinstance(exc, RegistryError):
        return exc
    if isinstance(exc, UpstreamStatus):
        if exc.status == 404:
            return ManifestUnknown(f"{what} is not known upstream")
        if exc.status == 429:
            headers = {"Retry-After": exc.retry_after} if exc.retry_after else None
            return TooManyRequests(f"the upstream is rate-limiting {what}", headers=headers)
        if exc.status in (401, 403):
            return Denied(f"the upstream refused access to {what}")
        return Unavailable(f"the upstream answered {exc.status} for {what}")
    if isinstance(exc, TokenError):
        if exc.status in (401, 403):  # wrong credentials: as refused as a Basic-auth 401
            return Denied(f"the upstream's token service refused access to {what}")
        return Unavailable(f"could not authenticate upstream for {what}: {exc}")
    return Unavailable(f"the upstream could not be reached for {what}")


class PullThroughRegistry:
    def __init__(
        self,
        hosted: HostedRegistry,
        upstreams: dict[str, Upstream],
        spool_dir: Path,
        manifest_max_bytes: int,
    ) -> None:
        self.hosted = hosted
        self.meta = hosted.meta
        self.upstreams = upstreams
        self.spool_dir = spool_dir
        self.manifest_max_bytes = manifest_max_bytes
        self._fills: dict[str, Fill] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._flights: dict[tuple[str, str], asyncio.Future[ManifestRow]] = {}
        # Told of each fill that ended (cache eviction: lifecycle/eviction.py): the repository,
        # the bytes it stored (0: not cached) and whether storage was full.
        self.on_fill_done: Callable[[str, int, bool], None] | None = None
        spool_dir.mkdir(parents=True, exist_ok=True)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def filling(self) -> frozenset[Digest]:
        """Digests whose fills are in flight: cache eviction leaves their blobs alone."""
        return frozenset(fill.digest for fill in self._fills.values())

    def _fill_done(self, repo: str, stored: int, storage_full: bool = False) -> None:
        if self.on_fill_done is not None:
            self.on_fill_done(repo, stored, storage_full)

    def namespace_prefix(self, ns: str) -> str | None:
        for name, upstream in self.upstreams.items():
            if ns in (name, upstream.host):
                return name
        return None

    def split(self, repo: str) -> tuple[Upstream, str]:
        prefix, _, path = repo.partition("/")
        upstream = self.upstreams[prefix]
        return upstream, upstream.remote_name(path)

    def _spawn(self, coro: Awaitable[T]) -> asyncio.Task[T]:
        async def run() -> T:
            return await coro

        task = asyncio.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- blobs ------------------------------------------------------------------------------

    async def stat_blob(self, repo: str, digest: Digest) -> BlobRow:
        blob = await self.meta.get_repo_blob(repo, digest)
        if blob is not None:
            return blob
        fill = self._fills.get(str(digest))
        if fill is not None and fill.size.done() and not fill.size.exception():
            return BlobRow(digest, fill.size.result(), FILLING)
        upstream, remote = self.split(repo)
        try:
            size = await upstream.head_blob(remote, digest)
        except _UPSTREAM_ERRORS as exc:
            raise _blob_error(exc, digest) from exc
        if size is None:
            raise BlobUnknown(detail={"digest": str(digest)})
        return BlobRow(digest, size, FILLING)

    async def get_blob(self, repo: str, digest: Digest) -> BlobRow:
        blob = await self.meta.get_repo_blob(repo, digest)
        if blob is not None:
            return blob
        upstream, remote = self.split(repo)
        fill = self._fills.get(str(digest))
        if fill is None:
            known = await self.meta.get_blob(digest)
            if (
                known is not None
                and await self._upstream_has(upstream, remote, digest)
                and await self.meta.link_blob(repo, digest)  # False: collected meanwhile
            ):
                # Stored already (another repository, or pushed): no need to fetch it again.
                return known
            fill = self._fills.get(str(digest)) or self._start_fill(upstream, remote, repo, digest)
        fill.repos.add(repo)
        try:
            size = await asyncio.shield(fill.size)
        except FillFailed as exc:
            raise _blob_error(fill.error or exc, digest) from exc
        return BlobRow(digest, size, FILLING)

    def blob_path(self, blob: BlobRow) -> Path | None:
        return None if blob.storage_key == FILLING else self.hosted.blob_path(blob)

    async def blob_redirect_url(self, blob: BlobRow) -> str | None:
        if blob.storage_key == FILLING:
            return None
        return await self.hosted.blob_redirect_url(blob)

    async def read_blob(self, blob: BlobRow, start: int, length: int) -> AsyncIterator[bytes]:
        if blob.storage_key != FILLING:
            async for chunk in self.hosted.read_blob(blob, start, length):
                yield chunk
            return
        fill = self._fills.get(str(blob.digest))
        if fill is not None:
            try:
                async for chunk in fill.read(start, length):
                    yield chunk
                return
            except SpoolGone:
                pass  # finished between our lookup and our read: it is in storage now
            except FillFailed as exc:
                # Before the first byte this is still an error response; after, a cut connection.
                raise _blob_error(fill.error or exc, blob.digest) from exc
        stored = await self.meta.get_blob(blob.digest)
        if stored is None:
            raise Unavailable(f"the upstream fetch of {blob.digest} did not complete")
        async for chunk in self.hosted.read_blob(stored, start, length):
            yield chunk

    async def _upstream_has(self, upstream: Upstream, remote: str, digest: Digest) -> bool:
        try:
            return await upstream.head_blob(remote, digest) is not None
        except _UPSTREAM_ERRORS:
            return False

    def _start_fill(self, upstream: Upstream, remote: str, repo: str, digest: Digest) -> Fill:
        fill = Fill(digest, self.spool_dir)
        fill.repos.add(repo)
        self._fills[str(digest)] = fill
        stored = [True]  # cleared when storage was full and the blob was not cached

        async def fetch(tee: Callable[[AsyncIterator[bytes]], AsyncIterator[bytes]]) -> None:
            async with upstream.get_blob(remote, digest) as response:
                if response.content_length is not None:
                    fill.set_size(response.content_length)
                # Clients see each piece as it arrives; storage and hashing get big chunks.
                body = rechunk(tee(response.content.iter_any()))
                try:
                    await self.hosted.put_blob(repo, digest, body)
                except (StorageFull, OSError) as exc:
                    # Cache eviction (lifecycle/eviction.py): storage is full, so this fetch
                    # is served from the spool without being cached; the client never gets an
                    # error because the cache is full. The rest of the body goes to the spool,
                    # whose digest is checked before the last byte is released.
                    if not isinstance(exc, StorageFull) and not is_storage_full(exc):
                        raise
                    async for _ in body:
                        pass
                    await _verify_spool(fill, digest)
                    log.warning("storage full: served %s without caching it", digest)
                    fill.set_size(fill.written)
                    stored.clear()
                    return
            fill.set_size(fill.written)
            for other in fill.repos - {repo}:
                await self.meta.link_blob(other, digest)

        async def run() -> None:
            started = time.monotonic()
            try:
                await fill.run(fetch)
            finally:
                if self._fills.get(str(digest)) is fill:
                    del self._fills[str(digest)]
            if fill.error is not None:
                log.warning("upstream fetch of %s from %s failed: %r", digest, remote, fill.error)
            elif stored:
                elapsed = time.monotonic() - started
                log.info("cached %s, %d bytes, in %.2fs", digest, fill.written, elapsed)
                self._fill_done(repo, fill.written)  # it may take the cache over its budget
            else:
                self._fill_done(repo, 0, storage_full=True)

        self._spawn(run())
        return fill

    # -- manifests --------------------------------------------------------------------------

    async def get_manifest(self, repo: str, reference: str) -> ManifestRow:
        upstream, remote = self.split(repo)
        if oci.is_digest(reference):
            digest = Digest.parse(reference)
            cached = await self.meta.get_manifest(repo, digest)
            if cached is not None:
                return cached
            return await self._flight(
                repo, reference, lambda: self._fetch_manifest(upstream, remote, repo, reference)
            )
        tag = oci.parse_tag(reference)
        cached = await self.meta.get_tagged_manifest(repo, tag)
        if cached is None:
            return await self._flight(
                repo, tag, lambda: self._fetch_manifest(upstream, remote, repo, tag)
            )
        checked = await self.meta.tag_checked(repo, tag)
        if checked is not None and time.time() - checked < upstream.config.tag_ttl:
            return cached
        return await self._flight(
            repo, tag, lambda: self._revalidate(upstream, remote, repo, tag, cached)
        )

    async def _flight(
        self, repo: str, reference: str, fetch: Callable[[], Awaitable[ManifestRow]]
    ) -> ManifestRow:
        """One upstream round trip per (repository, reference) at a time."""
        key = (repo, reference)
        flight = self._flights.get(key)
        if flight is None:
            flight = self._spawn(fetch())
            self._flights[key] = flight
            flight.add_done_callback(lambda _: self._flights.pop(key, None))
        return await asyncio.shield(flight)

    async def _revalidate(
        self, upstream: Upstream, remote: str, repo: str, tag: str, cached: ManifestRow
    ) -> ManifestRow:
        try:
            current = await upstream.head_manifest(remote, tag)
            if current == cached.digest:
                await self.meta.put_manifest(repo, cached, (), [tag])  # confirmed: fresh again
                return cached
            return await self._fetch_manifest(upstream, remote, repo, tag)
        except UpstreamStatus as exc:
            if exc.status == 404:
                await self.meta.delete_tag(repo, tag)
                raise ManifestUnknown(f"{remote}:{tag} no longer exists upstream") from exc
            self._warn_stale(repo, tag, exc)
        except (*_UPSTREAM_ERRORS, Unavailable, TooManyRequests) as exc:
            self._warn_stale(repo, tag, exc)
        return cached

    def _warn_stale(self, repo: str, tag: str, exc: BaseException) -> None:
        log.warning("serving cached %s:%s, the upstream failed to revalidate: %r", repo, tag, exc)

    async def _fetch_manifest(
        self, upstream: Upstream, remote: str, repo: str, reference: str
    ) -> ManifestRow:
        what = f"{remote}:{reference}" if not oci.is_digest(reference) else f"{remote}@{reference}"
        try:
            got = await upstream.get_manifest(remote, reference, self.manifest_max_bytes)
        except UpstreamStatus as exc:
            # A tag we cannot see upstream (404) or may not see (401/403) is unknown here too.
            raise upstream_error(exc, what) from exc
        except _UPSTREAM_ERRORS as exc:
            raise upstream_error(exc, what) from exc
        if got is None:
            raise ManifestUnknown(f"{what} is not known upstream", detail={"reference": reference})
        tags: list[str] = []
        if oci.is_digest(reference):
            wanted = Digest.parse(reference)
            digest = Digest.of(got.content, wanted.algorithm)
            if digest != wanted:
                raise Unavailable(f"the upstream sent a manifest for {what} with digest {digest}")
        else:
            algorithm = got.digest.algorithm if got.digest else "sha256"
            digest = Digest.of(got.content, algorithm)
            if got.digest is not None and got.digest != digest:
                raise Unavailable(f"the upstream's manifest for {what} does not match its digest")
            tags.append(reference)
        try:
            parsed = parse_manifest(got.media_type, got.content)
        except ManifestInvalid as exc:
            raise Unavailable(
                f"the upstream sent an unusable manifest for {what}: {exc.message}"
            ) from exc
        manifest = ManifestRow(
            digest, parsed.media_type, got.content, parsed.subject, parsed.artifact_type
        )
        await self.meta.put_manifest(repo, manifest, parsed.references, tags)
        return manifest

    # -- discovery --------------------------------------------------------------------------

    async def list_tags(self, repo: str, last: str, limit: int) -> list[str]:
        upstream, remote = self.split(repo)
        try:
            tags = await upstream.list_tags(remote, last, limit)
        except _UPSTREAM_ERRORS as exc:
            log.warning("serving cached tags of %s, the upstream failed: %r", repo, exc)
            return await self.hosted.list_tags(repo, last, limit)
        if tags is None:
            raise NameUnknown(detail={"name": repo})
        return sorted(tags)[:limit]

    async def referrers(
        self, repo: str, subject: Digest, artifact_type: str | None
    ) -> list[dict[str, Any]]:
        upstream, remote = self.split(repo)
        try:
            found = await upstream.referrers(remote, subject, artifact_type)
        except _UPSTREAM_ERRORS as exc:
            log.warning("serving cached referrers in %s, the upstream failed: %r", repo, exc)
            found = None
        if found is None:
            return await self.hosted.referrers(repo, subject, artifact_type)
        return found

    # -- writes: refused ----------------------------------------------------------------------

    def _read_only(self, repo: str) -> NoReturn:
        upstream, _ = self.split(repo)
        raise Denied(
            f"{repo} is a read-only cache of {upstream.base}; push to a name outside"
            f" {upstream.name}/ instead",
            detail={"name": repo},
        )

    async def delete_blob(self, repo: str, digest: Digest) -> None:
        self._read_only(repo)

    async def mount_blob(self, repo: str, digest: Digest, source: str | None) -> BlobRow | None:
        self._read_only(repo)

    async def start_upload(self, repo: str, algorithm: str = "sha256") -> UploadRow:
        self._read_only(repo)

    async def get_upload(self, repo: str, upload_id: str) -> UploadRow:
        self._read_only(repo)

    async def append_upload(
        self,
        repo: str,
        upload_id: str,
        body: AsyncIterator[bytes],
        content_range: ContentRange | None,
    ) -> UploadRow:
        self._read_only(repo)

    async def finish_upload(
        self, repo: str, upload_id: str, body: AsyncIterator[bytes] | None, digest: Digest
    ) -> BlobRow:
        self._read_only(repo)

    async def put_blob(self, repo: str, digest: Digest, body: AsyncIterator[bytes]) -> BlobRow:
        self._read_only(repo)

    async def cancel_upload(self, repo: str, upload_id: str) -> None:
        self._read_only(repo)

    async def put_manifest(
        self,
        repo: str,
        reference: str,
        content_type: str | None,
        content: bytes,
        tags: Sequence[str],
    ) -> ManifestRow:
        self._read_only(repo)

    async def delete_manifest(self, repo: str, reference: str) -> None:
        self._read_only(repo)

    async def list_repositories(self, last: str, limit: int) -> list[str]:
        return await self.hosted.list_repositories(last, limit)


async def _verify_spool(fill: Fill, digest: Digest) -> None:
    """Check the digest of a fill's spool (when storage, which checks it otherwise, is full)."""

    def digest_of_spool() -> str:
        hasher = hashlib.new(digest.algorithm)
        with open(fill.spool, "rb") as spool:
            while chunk := spool.read(1 << 20):
                hasher.update(chunk)
        return hasher.hexdigest()

    if await asyncio.to_thread(digest_of_spool) != digest.hex:
        raise DigestInvalid(f"the upstream's bytes for {digest} have another digest")


def _blob_error(exc: BaseException, digest: Digest) -> RegistryError:
    if isinstance(exc, UpstreamStatus) and exc.status == 404:
        return BlobUnknown(detail={"digest": str(digest)})
    if isinstance(exc, RegistryError):
        # Storing the upstream's bytes failed (e.g. DIGEST_INVALID): not the client's fault.
        return Unavailable(f"the upstream's blob {digest} could not be cached: {exc.message}")
    return upstream_error(exc, f"blob {digest}")
