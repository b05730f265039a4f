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
import errno
import hashlib
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import aiohttp
from aiohttp import web

from regproxy import oci
from regproxy.cluster import Cluster
from regproxy.cluster.leases import blob_key, tag_key
from regproxy.cluster.peer import read_spool
from regproxy.errors import (
    BlobUnknown,
    BlobUploadUnknown,
    Denied,
    DigestInvalid,
    ManifestInvalid,
    ManifestUnknown,
    NameUnknown,
    RegistryError,
    SizeInvalid,
    StorageFull,
    TooManyRequests,
    Unavailable,
)
from regproxy.meta.base import BlobRow, LeaseRow, ManifestRow, UploadRow
from regproxy.metrics import BYPASS, HIT, JOINED, MISS, STALE, Metrics
from regproxy.oci import Digest
from regproxy.proxy.auth import TokenError
from regproxy.proxy.singleflight import Fill, FillFailed, SpoolGone, reconcile_spool
from regproxy.proxy.upstream import Upstream, UpstreamInvalid, UpstreamStatus
from regproxy.registry.base import ContentRange
from regproxy.registry.hosted import HostedRegistry, is_storage_full
from regproxy.registry.manifest import lookup_reference, parse_manifest
from regproxy.streams import rechunk

log = logging.getLogger(__name__)

# The storage key of a blob that is still arriving from upstream.
FILLING = ""
# ... arriving through a fill of another process: this prefix and the repository.
FOLLOWING = "\0following:"
# Times a follower re-decides where to read a fill from (the owner's spool or endpoint,
# storage, a fill of its own) after a source broke off without progress, before it gives up.
FOLLOW_ATTEMPTS = 5
FOLLOW_PAUSE = 0.2
_UPSTREAM_ERRORS = (aiohttp.ClientError, TimeoutError, TokenError, UpstreamStatus)
# A transfer cut mid-body (reset, closed early, stalled): resumed with Range.
_CUT = (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError, ConnectionError)
MAX_RESUMES = 3
_CONTENT_RANGE_RE = re.compile(r"bytes (?:(\d+)-(\d+)|\*)/(\d+)")
T = TypeVar("T")
# The pieces a fill hands storage to hash and write (each in a worker thread). Smaller than
# a pushed body's: the spool beside them takes the upstream's bursts, and every piece in
# flight is memory held while clients read the fill.
STORE_CHUNK = 256 << 10


def describe_error(exc: BaseException) -> str:
    """An upstream failure in a few words: the status, the errno, or the exception's kind."""
    if isinstance(exc, UpstreamStatus):
        retry = f", Retry-After {exc.retry_after}" if exc.retry_after else ""
        return f"answered {exc.status}{retry}"
    if isinstance(exc, TokenError):
        return f"token service: {str(exc)[:160]}"
    if isinstance(exc, RegistryError):
        return f"{exc.code}: {exc.message[:160]}"
    if isinstance(exc, TimeoutError | aiohttp.ServerTimeoutError):
        return "timed out"
    if isinstance(exc, aiohttp.ClientConnectorError):
        cause = exc.os_error
        name = errno.errorcode.get(cause.errno or 0, "") if cause.errno else ""
        reason = cause.strerror or str(cause) or type(cause).__name__
        return f"cannot connect: {name + ' ' if name else ''}{reason}".strip()
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the connection closed before an answer"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "the body broke off mid-transfer"
    if isinstance(exc, OSError) and exc.errno:
        return f"{errno.errorcode.get(exc.errno, exc.errno)} {exc.strerror or ''}".strip()
    text = str(exc).splitlines()[0][:160] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def upstream_error(exc: BaseException, what: str) -> RegistryError:
    """The spec's error for an upstream failure when nothing cached can stand in."""
    if isinstance(exc, RegistryError):
        return exc
    if isinstance(exc, UpstreamInvalid):
        return Unavailable(f"the upstream sent an unusable answer for {what}: {exc}")
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


@dataclass(frozen=True, slots=True)
class FillProgress:
    """One blob fetch from upstream in progress: which repositories wait, how far it got."""

    digest: Digest
    repos: tuple[str, ...]
    written: int
    size: int | None  # None until the upstream said


class PullThroughRegistry:
    def __init__(
        self,
        hosted: HostedRegistry,
        upstreams: dict[str, Upstream],
        spool_dir: Path,
        manifest_max_bytes: int,
        *,
        metrics: Metrics | None = None,
        cluster: Cluster | None = None,
    ) -> None:
        self.hosted = hosted
        self.metrics = metrics if metrics is not None else Metrics()
        self.cluster = cluster
        self._claims: dict[str, asyncio.Task[Fill | LeaseRow | BlobRow]] = {}
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

    async def reconcile_spool(self, max_age: float) -> None:
        """At start-up: remove the spool files of fills that are gone (a kill), except the
        partials a fill of the same digest may continue from, for ``max_age`` seconds."""
        kept, removed, uploads = await asyncio.to_thread(reconcile_spool, self.spool_dir, max_age)
        for upload_id in uploads:
            await self._cancel_upload(upload_id)
        if kept or removed or uploads:
            log.info(
                "spool: kept %d resumable partial fill(s), removed %d file(s), cancelled %d"
                " upload(s) of killed fills",
                kept,
                removed,
                len(uploads),
            )

    async def _cancel_upload(self, upload_id: str) -> None:
        """Cancel the upload of a fill that was killed (it is in a cached repository)."""
        upload = await self.meta.get_upload(upload_id)
        if upload is not None and upload.repo.partition("/")[0] in self.upstreams:
            with suppress(BlobUploadUnknown):
                await self.hosted.cancel_upload(upload.repo, upload_id)

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
        if (
            fill is not None
            and repo in fill.repos
            and fill.size.done()
            and not fill.size.exception()
        ):
            return BlobRow(digest, fill.size.result(), FILLING)
        upstream, remote = self.split(repo)
        self._check_blob_miss(upstream, repo, digest)
        try:
            size = await upstream.head_blob(remote, digest)
        except _UPSTREAM_ERRORS as exc:
            raise self._remember_blob_miss(
                upstream, repo, digest, _blob_error(exc, digest)
            ) from exc
        if size is None:
            unknown = BlobUnknown(detail={"digest": str(digest)})
            raise self._remember_blob_miss(upstream, repo, digest, unknown)
        return BlobRow(digest, size, FILLING)

    async def get_blob(self, repo: str, digest: Digest) -> BlobRow:
        blob = await self.meta.get_repo_blob(repo, digest)
        if blob is not None:
            self._outcome(repo, "blob", HIT)
            return blob
        upstream, remote = self.split(repo)
        fill = self._fills.get(str(digest))
        if fill is None:
            self._check_blob_miss(upstream, repo, digest)
            known = await self.meta.get_blob(digest)
            if (
                known is not None
                and await self._upstream_has(upstream, remote, digest)
                and await self.meta.link_blob(repo, digest)  # False: collected meanwhile
            ):
                # Stored already (another repository, or pushed): no need to fetch it again.
                self._outcome(repo, "blob", HIT)
                return known
            existing = self._fills.get(str(digest))
            # The one request that starts the claim is the miss; the others joined it.
            first = existing is None and str(digest) not in self._claims
            claimed = await self._fill_or_lease(upstream, remote, repo, digest)
            if isinstance(claimed, LeaseRow):
                # Filled elsewhere, maybe for another repository: only if the upstream has
                # the blob here too.
                if not await self._upstream_has(upstream, remote, digest):
                    raise BlobUnknown(detail={"digest": str(digest)})
                self._outcome(repo, "blob", JOINED)
                return await self._followed(repo, digest, claimed)
            if isinstance(claimed, BlobRow):  # stored: for this repository only if upstream has it
                try:
                    size = await upstream.head_blob(remote, digest)
                except _UPSTREAM_ERRORS as exc:
                    raise _blob_error(exc, digest) from exc
                if size is None:
                    raise BlobUnknown(detail={"digest": str(digest)})
                await self.meta.link_blob(repo, digest)
                self._outcome(repo, "blob", HIT)
                return claimed
            fill = claimed
            self._outcome(repo, "blob", MISS if first and fill is not existing else JOINED)
        elif repo not in fill.repos and not await self._upstream_has(upstream, remote, digest):
            # A fill for another repository: only if the upstream has the blob here too.
            raise BlobUnknown(detail={"digest": str(digest)})
        else:
            self._outcome(repo, "blob", JOINED)
        fill.repos.add(repo)
        try:
            size = await asyncio.shield(fill.size)
        except FillFailed as exc:
            error = _blob_error(fill.error or exc, digest)
            raise self._remember_blob_miss(upstream, repo, digest, error) from exc
        return BlobRow(digest, size, FILLING)

    def _check_blob_miss(self, upstream: Upstream, repo: str, digest: Digest) -> None:
        """BLOB_UNKNOWN without asking the upstream, if it said 404 for it moments ago."""
        if upstream.negative.hit(("blob", repo, str(digest)), upstream.clock()):
            raise BlobUnknown("not found upstream moments ago", detail={"digest": str(digest)})

    def _remember_blob_miss(
        self, upstream: Upstream, repo: str, digest: Digest, error: RegistryError
    ) -> RegistryError:
        """``error``, after noting an upstream 404 (BLOB_UNKNOWN) in the negative cache."""
        if isinstance(error, BlobUnknown):
            upstream.negative.add(("blob", repo, str(digest)), upstream.clock())
        return error

    def fills_in_progress(self) -> list[FillProgress]:
        """The blob fetches from upstream running in this process, for the UI."""
        return [
            FillProgress(
                fill.digest,
                tuple(sorted(fill.repos)),
                fill.written,
                fill.size.result() if fill.size.done() and not fill.size.exception() else None,
            )
            for fill in list(self._fills.values())
            if not fill.done
        ]

    def blob_path(self, blob: BlobRow) -> Path | None:
        return None if in_flight(blob) else self.hosted.blob_path(blob)

    async def blob_redirect_url(self, blob: BlobRow) -> str | None:
        if in_flight(blob):
            return None
        return await self.hosted.blob_redirect_url(blob)

    async def read_blob(self, blob: BlobRow, start: int, length: int) -> AsyncIterator[bytes]:
        if not in_flight(blob):
            async for chunk in self.hosted.read_blob(blob, start, length):
                yield chunk
            return
        if blob.storage_key.startswith(FOLLOWING):
            repo = blob.storage_key.removeprefix(FOLLOWING)
            async for chunk in self._follow(repo, blob, start, start + length):
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

    # -- the cluster: one fill per blob across processes and replicas ---------------------

    async def _fill_or_lease(
        self, upstream: Upstream, remote: str, repo: str, digest: Digest
    ) -> Fill | LeaseRow | BlobRow:
        """This process's fill of the blob, started if the blob's lease could be taken; or
        the lease of the process that fills it; or the blob, if another process stored it
        meanwhile. One attempt at a time per digest here."""
        key = str(digest)
        claim = self._claims.get(key)
        if claim is None:
            claim = self._spawn(self._claim(upstream, remote, repo, digest))
            self._claims[key] = claim
            claim.add_done_callback(lambda _: self._claims.pop(key, None))
        return await asyncio.shield(claim)

    async def _claim(
        self, upstream: Upstream, remote: str, repo: str, digest: Digest
    ) -> Fill | LeaseRow | BlobRow:
        fill = self._fills.get(str(digest))
        if fill is not None:
            return fill
        if self.cluster is None:
            return self._start_fill(upstream, remote, repo, digest)
        leases = self.cluster.leases
        row = await leases.acquire(blob_key(digest))
        if not leases.mine(row):
            return row
        # A fill that committed and released its lease just before we took it.
        stored = await self.meta.get_blob(digest)
        if stored is not None and str(digest) not in self._fills:
            await leases.release(row.key)
            return stored
        return self._fills.get(str(digest)) or self._start_fill(
            upstream, remote, repo, digest, leased=True
        )

    async def _followed(self, repo: str, digest: Digest, row: LeaseRow) -> BlobRow:
        """The blob as another process fills it, once that process knows its size; its
        own fill if the other's lease ends without the blob (failed, or its owner died)."""
        assert self.cluster is not None
        leases = self.cluster.leases
        upstream, remote = self.split(repo)
        for _ in range(FOLLOW_ATTEMPTS):
            while True:
                stored = await self.meta.get_blob(digest)
                if stored is not None:
                    await self.meta.link_blob(repo, digest)
                    return stored
                if row.size is not None:
                    return BlobRow(digest, row.size, FOLLOWING + repo)
                await asyncio.sleep(FOLLOW_PAUSE)
                current = await leases.get(row.key)
                if current is None or current.owner != row.owner or leases.expired(current):
                    break
                row = current
            if await self.meta.get_blob(digest) is not None:
                continue
            claimed = await self._fill_or_lease(upstream, remote, repo, digest)
            if isinstance(claimed, LeaseRow):
                row = claimed
                continue
            return await self.get_blob(repo, digest)
        raise Unavailable(f"the fill of {digest} by another process did not get going")

    async def _follow(
        self, repo: str, blob: BlobRow, position: int, end: int
    ) -> AsyncIterator[bytes]:
        """Bytes ``position .. end`` of a blob another process fills: from its spool file
        (same machine) or its endpoint (another replica), then from storage once committed.
        When its lease ends without the blob, this process takes the fill over; when nothing
        more can be had, the read fails (after the first byte: a cut connection)."""
        assert self.cluster is not None
        leases, peer = self.cluster.leases, self.cluster.peer
        digest, key = blob.digest, blob_key(blob.digest)
        takeovers = stalls = 0
        # Looks in a row that find no new byte at the owner before the read fails (a cut):
        # longer than its lease lives unrenewed, so a dead owner's fill gets taken over.
        max_stalls = 2 * leases.ttl / FOLLOW_PAUSE
        while position < end:
            stored = await self.meta.get_blob(digest)
            if stored is not None:
                async for chunk in self.hosted.read_blob(stored, position, end - position):
                    yield chunk
                return
            fill = self._fills.get(str(digest))
            if fill is not None:  # ours, after a takeover
                try:
                    await asyncio.shield(fill.size)  # its spool is open once the size is known
                    async for chunk in fill.read(position, end - position):
                        position += len(chunk)
                        yield chunk
                    return
                except SpoolGone:
                    continue
            row = await leases.get(key)
            before = position
            if row is None or leases.expired(row) or leases.mine(row):
                if await self.meta.get_blob(digest) is None:
                    if takeovers >= FOLLOW_ATTEMPTS:
                        raise FillFailed(f"the fill of {digest} ended without the blob")
                    upstream, remote = self.split(repo)
                    log.warning(
                        "the fill of %s ended without the blob (lease %s); taking over",
                        digest,
                        "expired" if row is not None else "released",
                    )
                    await self._fill_or_lease(upstream, remote, repo, digest)
                    takeovers += 1
                continue
            if row.size is not None and row.size != blob.size:
                raise FillFailed(f"the fill of {digest} has another size")
            try:
                if row.host == leases.host and row.spool:
                    owner = row.owner

                    async def still_filling(owner: str = owner) -> bool:
                        if await self.meta.get_blob(digest) is not None:
                            return False
                        now = await leases.get(key)
                        return now is not None and now.owner == owner and not leases.expired(now)

                    source = read_spool(row.spool, blob.size, position, end, still_filling)
                elif row.url and peer is not None:
                    source = peer.read(row.url, digest, position, end)
                else:
                    source = _nothing()  # no way to the owner: wait for the blob in storage
                async for chunk in source:
                    position += len(chunk)
                    yield chunk
            except (FillFailed, aiohttp.ClientError, OSError, TimeoutError) as exc:
                log.info("following the fill of %s broke off: %r", digest, exc)
            if position == before:
                # No progress: the owner is unreachable, or its lease is about to expire.
                stalls += 1
                if stalls > max_stalls:
                    raise FillFailed(f"the fill of {digest} by another process is stuck")
                await asyncio.sleep(FOLLOW_PAUSE)
            else:
                stalls = 0

    async def serve_fill(
        self, digest: Digest, offset: int
    ) -> tuple[int, AsyncIterator[bytes]] | None:
        """For a peer's follower (cluster/peer.py): this process's fill of the blob, or the
        blob from storage once it is committed."""
        fill = self._fills.get(str(digest))
        if fill is not None:
            try:
                size = await asyncio.shield(fill.size)
            except FillFailed:
                return None
            return size, self._fill_or_stored(fill, digest, offset, size)
        stored = await self.meta.get_blob(digest)
        if stored is None:
            return None
        return stored.size, self.hosted.read_blob(stored, offset, max(stored.size - offset, 0))

    async def _fill_or_stored(
        self, fill: Fill, digest: Digest, offset: int, size: int
    ) -> AsyncIterator[bytes]:
        try:
            async for chunk in fill.read(offset, size - offset):
                yield chunk
            return
        except SpoolGone:
            pass
        stored = await self.meta.get_blob(digest)
        if stored is None:
            raise FillFailed(f"the fill of {digest} did not complete")
        async for chunk in self.hosted.read_blob(stored, offset, size - offset):
            yield chunk

    def _start_fill(
        self, upstream: Upstream, remote: str, repo: str, digest: Digest, *, leased: bool = False
    ) -> Fill:
        fill = Fill(digest, self.spool_dir)
        fill.repos.add(repo)
        self._fills[str(digest)] = fill
        stored = [True]  # cleared when storage was full and the blob was not cached
        held = None
        if leased and self.cluster is not None:
            held = self.cluster.leases.hold(blob_key(digest))
            lease = held

            def announce(size: asyncio.Future[int]) -> None:
                # Followers elsewhere wait for the size; the spool is open by then.
                if not size.cancelled() and size.exception() is None:
                    lease.note(str(fill.spool), size.result())

            fill.size.add_done_callback(announce)

        async def fetch(fill: Fill) -> None:
            rest = fill.tee(self._upstream_body(upstream, remote, digest, fill))

            async def body() -> AsyncIterator[bytes]:
                # The first answer decides how much of an earlier fill's spool to keep: those
                # bytes are stored (and hashed) first, then the upstream's.
                first = await anext(rest, None)
                async for chunk in fill.kept():
                    yield chunk
                if first is not None:
                    yield first
                    async for chunk in rest:
                        yield chunk

            if fill.stale_upload is not None:  # a fill of this spool was killed
                await self._cancel_upload(fill.stale_upload)
            upload = await self.hosted.start_upload(repo, digest.algorithm)
            try:
                await fill.note_upload(upload.id)
                # Clients see each piece as it arrives; storage and hashing get STORE_CHUNKs.
                chunks = rechunk(body(), STORE_CHUNK)
                try:
                    await self.hosted.finish_upload(repo, upload.id, chunks, digest)
                except (StorageFull, OSError) as exc:
                    # Cache eviction (lifecycle/eviction.py): storage is full, so this fetch
                    # is served from the spool without being cached; the client never gets an
                    # error because the cache is full. The rest of the body goes to the spool,
                    # whose digest is checked before the last byte is released.
                    if not isinstance(exc, StorageFull) and not is_storage_full(exc):
                        raise
                    async for _ in chunks:
                        pass
                    await _verify_spool(fill, digest)
                    log.warning("storage full: served %s without caching it", digest)
                    self.metrics.pulled(upstream.name, "blob", fill.written - fill.resumed)
                    fill.set_size(fill.written)
                    stored.clear()
                    with suppress(BlobUploadUnknown):
                        await self.hosted.cancel_upload(repo, upload.id)
                    return
            except BaseException:
                with suppress(BlobUploadUnknown):  # a digest mismatch already removed it
                    await self.hosted.cancel_upload(repo, upload.id)
                raise
            # Before clients finish; what an earlier fill spooled was counted by that fill.
            self.metrics.pulled(upstream.name, "blob", fill.written - fill.resumed)
            fill.set_size(fill.written)
            for other in fill.repos - {repo}:
                await self.meta.link_blob(other, digest)

        async def run() -> None:
            started = time.monotonic()
            fills = self.metrics.fills.labels(upstream.name)
            fills.inc()
            try:
                await fill.run(fetch, _resumable)
            finally:
                fills.dec()
                if self._fills.get(str(digest)) is fill:
                    del self._fills[str(digest)]
                if held is not None:  # after the blob row is committed
                    await held.release()
            if fill.error is not None:
                self.metrics.pulled(upstream.name, "blob", fill.written - fill.resumed)  # discarded
                log.warning(
                    "upstream %s: fetching blob %s of %s failed: %s",
                    upstream.host,
                    digest,
                    remote,
                    describe_error(fill.error),
                )
            elif stored:
                elapsed = time.monotonic() - started
                log.info(
                    "cached %s, %d bytes (%d resumed from the spool), in %.2fs",
                    digest,
                    fill.written,
                    fill.resumed,
                    elapsed,
                )
                self._fill_done(repo, fill.written)  # it may take the cache over its budget
            else:
                self._fill_done(repo, 0, storage_full=True)

        self._spawn(run())
        return fill

    async def _upstream_body(
        self, upstream: Upstream, remote: str, digest: Digest, fill: Fill
    ) -> AsyncIterator[bytes]:
        """The blob's bytes after those the fill has, from upstream.

        The first request asks for what follows the bytes an earlier fill spooled, and keeps
        them when the upstream answers that range (206); an upstream that ignores ``Range``
        (200) sends the whole blob again and the bytes spooled are skipped. When the
        transfer is cut mid-body, it is resumed the same way, up to ``MAX_RESUMES`` times,
        so the clients reading the fill see no break. The digest is verified in storage.
        """
        resumes = 0
        start = fill.found  # offered to the first request
        first = True
        while True:
            position = start if first else fill.written
            try:
                async with upstream.get_blob(remote, digest, position) as response:
                    skip = await self._take_answer(response, fill, position, first)
                    if skip is None:  # an unusable spool: ask again, from the start
                        start = 0
                        continue
                    first = False
                    if response.status == 416:  # the spool holds all of it
                        return
                    async for chunk in _body(response, skip):
                        yield chunk
                    return
            except _CUT as exc:
                if first or resumes >= MAX_RESUMES:
                    raise
                resumes += 1
                log.warning(
                    "upstream transfer of %s cut after %d bytes (%r); resuming with Range",
                    digest,
                    fill.written,
                    exc,
                )

    @staticmethod
    async def _take_answer(
        response: aiohttp.ClientResponse, fill: Fill, position: int, first: bool
    ) -> int | None:
        """Check an answer to a blob GET from ``position`` (see ``Upstream.get_blob``); set
        the fill's size and, on the first answer, what to keep of its spool. Returns how many
        bytes of the body to skip, or None to ask again without ``Range``."""
        total: int | None
        skip = 0
        if response.status == 206:
            total = _range_total(response.headers.get("Content-Range"), position)
            if total is None:  # not the range asked for: ask for all of it
                if not first:
                    raise _Inconsistent(f"the upstream answered {position}- with another range")
                return None
        elif response.status == 416:
            total = _range_total(response.headers.get("Content-Range"), None)
            if total != position:
                if not first:
                    raise _Inconsistent(f"the upstream refused {position}- of its own blob")
                return None  # the spool holds more than the blob: start over
        else:
            total = response.content_length
            if total is not None and position > total:
                if not first:
                    raise _Inconsistent("the upstream's blob changed size while it was fetched")
                return None
            skip = position  # the upstream ignored Range and sends everything again
        if first:
            await fill.keep(position)
        elif fill.size.done() and total is not None and fill.size.result() != total:
            raise _Inconsistent("the upstream's blob changed size while it was fetched")
        if total is not None:
            fill.set_size(total)
        return skip

    # -- manifests --------------------------------------------------------------------------

    async def get_manifest(self, repo: str, reference: str) -> ManifestRow:
        upstream, remote = self.split(repo)
        wanted = lookup_reference(reference)
        if isinstance(wanted, Digest):
            cached = await self.meta.get_manifest(repo, wanted)
            if cached is not None:
                self._outcome(repo, "manifest", HIT)
                return cached
            return await self._fetch_remembering_misses(
                upstream,
                repo,
                reference,
                lambda: self._fetch_manifest(upstream, remote, repo, reference),
            )
        tag = wanted
        cached = await self.meta.get_tagged_manifest(repo, tag)
        if cached is None:
            return await self._fetch_remembering_misses(
                upstream, repo, tag, lambda: self._fetch_manifest(upstream, remote, repo, tag)
            )
        ttl = upstream.config.ttl_for(tag)
        if ttl is None:  # a tag rule says "forever"
            self._outcome(repo, "manifest", HIT)
            return cached
        checked = await self.meta.tag_checked(repo, tag)
        if checked is not None and time.time() - checked < ttl:
            self._outcome(repo, "manifest", HIT)
            return cached
        if upstream.rate_limited():
            return self._serve_stale(
                upstream, repo, tag, cached, "the upstream's rate limit is used up"
            )
        if self.cluster is None:
            revalidate = lambda: self._revalidate(upstream, remote, repo, tag, cached)  # noqa: E731
        else:  # once for all processes sharing the metadata store
            revalidate = lambda: self._revalidate_once(  # noqa: E731
                upstream, remote, repo, tag, cached, ttl
            )
        if upstream.config.stale_while_revalidate:
            self._start_flight(repo, tag, revalidate)
            return self._serve_stale(upstream, repo, tag, cached, "revalidating in the background")
        joined = (repo, tag) in self._flights
        got = await self._flight(repo, tag, revalidate)
        if joined:
            self._outcome(repo, "manifest", JOINED)
        elif got.digest != cached.digest:
            self._outcome(repo, "manifest", MISS)
        else:  # confirmed upstream (checked again), or served because the upstream failed
            confirmed = await self.meta.tag_checked(repo, tag) != checked
            self._outcome(repo, "manifest", HIT if confirmed else STALE)
        return got

    async def _revalidate_once(
        self, upstream: Upstream, remote: str, repo: str, tag: str, cached: ManifestRow, ttl: float
    ) -> ManifestRow:
        """One revalidation per tag at a time in the whole cluster: while another process
        holds the tag's lease, the cached copy is served."""
        assert self.cluster is not None
        leases = self.cluster.leases
        key = tag_key(repo, tag)
        row = await leases.acquire(key)
        if not leases.mine(row):
            return cached
        try:
            checked = await self.meta.tag_checked(repo, tag)
            if checked is not None and time.time() - checked < ttl:
                fresh = await self.meta.get_tagged_manifest(repo, tag)  # done by another
                return fresh if fresh is not None else cached
            return await self._revalidate(upstream, remote, repo, tag, cached)
        finally:
            await leases.release(key)

    async def _fetch_remembering_misses(
        self,
        upstream: Upstream,
        repo: str,
        reference: str,
        fetch: Callable[[], Awaitable[ManifestRow]],
    ) -> ManifestRow:
        """Fetch an uncached manifest, answering a recent upstream 404 without asking again."""
        key = ("manifest", repo, reference)
        if upstream.negative.hit(key, upstream.clock()):
            raise ManifestUnknown(
                f"{repo}:{reference} was not found upstream moments ago",
                detail={"reference": reference},
            )
        self._outcome(repo, "manifest", JOINED if (repo, reference) in self._flights else MISS)
        try:
            return await self._flight(repo, reference, fetch)
        except ManifestUnknown:
            upstream.negative.add(key, upstream.clock())
            raise

    def _serve_stale(
        self, upstream: Upstream, repo: str, tag: str, cached: ManifestRow, why: str
    ) -> ManifestRow:
        """A tag past its TTL answered from the cache without waiting for the upstream."""
        self._outcome(repo, "manifest", STALE)
        log.debug("serving cached %s:%s past its TTL: %s", repo, tag, why)
        return cached

    def _start_flight(
        self, repo: str, reference: str, fetch: Callable[[], Awaitable[ManifestRow]]
    ) -> asyncio.Future[ManifestRow]:
        """The upstream round trip for (repository, reference): the one in flight, or a new one."""
        key = (repo, reference)
        flight = self._flights.get(key)
        if flight is None:
            flight = self._spawn(fetch())
            self._flights[key] = flight

            def done(finished: asyncio.Future[ManifestRow]) -> None:
                self._flights.pop(key, None)
                if not finished.cancelled():
                    finished.exception()  # retrieved: a background flight may have no waiter

            flight.add_done_callback(done)
        return flight

    async def _flight(
        self, repo: str, reference: str, fetch: Callable[[], Awaitable[ManifestRow]]
    ) -> ManifestRow:
        """One upstream round trip per (repository, reference) at a time."""
        return await asyncio.shield(self._start_flight(repo, reference, fetch))

    async def _revalidate(
        self, upstream: Upstream, remote: str, repo: str, tag: str, cached: ManifestRow
    ) -> ManifestRow:
        try:
            current = await upstream.head_manifest(remote, tag)
            if current == cached.digest:
                await self.meta.put_manifest(repo, cached, (), [tag])  # confirmed: fresh again
                return cached
            return await self._fetch_manifest(upstream, remote, repo, tag)
        except (UpstreamStatus, ManifestUnknown) as exc:
            if isinstance(exc, ManifestUnknown) or exc.status == 404:
                # Gone upstream (the HEAD's 404, or the GET's after a HEAD without a digest).
                await self.meta.delete_tag(repo, tag)
                upstream.negative.add(("manifest", repo, tag), upstream.clock())
                raise ManifestUnknown(f"{remote}:{tag} no longer exists upstream") from exc
            self._warn_stale(repo, tag, exc)
        except (*_UPSTREAM_ERRORS, Unavailable, TooManyRequests) as exc:
            self._warn_stale(repo, tag, exc)
        return cached

    def _warn_stale(self, repo: str, tag: str, exc: BaseException) -> None:
        upstream, _ = self.split(repo)
        log.warning(
            "upstream %s: revalidating %s:%s failed: %s; serving cached copy",
            upstream.host,
            repo,
            tag,
            describe_error(exc),
        )

    def _outcome(self, repo: str, kind: str, outcome: str) -> None:
        """Count a pull of ``repo`` (on the request's own path) and tell its access line."""
        self.metrics.note_outcome(repo.partition("/")[0], kind, outcome)

    async def _fetch_manifest(
        self, upstream: Upstream, remote: str, repo: str, reference: str
    ) -> ManifestRow:
        what = f"{remote}:{reference}" if not oci.is_digest(reference) else f"{remote}@{reference}"
        try:
            got = await upstream.get_manifest(remote, reference, self.manifest_max_bytes)
        except UpstreamStatus as exc:
            # A tag we cannot see upstream (404) or may not see (401/403) is unknown here too.
            if exc.status != 404:
                log.warning(
                    "upstream %s: fetching manifest %s failed: %s",
                    upstream.host,
                    what,
                    describe_error(exc),
                )
            raise upstream_error(exc, what) from exc
        except _UPSTREAM_ERRORS as exc:
            log.warning(
                "upstream %s: fetching manifest %s failed: %s",
                upstream.host,
                what,
                describe_error(exc),
            )
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
        self.metrics.pulled(upstream.name, "manifest", len(got.content))
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
            log.warning(
                "upstream %s: listing the tags of %s failed: %s; serving cached tags",
                upstream.host,
                remote,
                describe_error(exc),
            )
            self._outcome(repo, "tags", STALE)
            return await self.hosted.list_tags(repo, last, limit)
        self._outcome(repo, "tags", BYPASS)
        if tags is None:
            raise NameUnknown(detail={"name": repo})
        # Some upstreams (distribution 2.8) ignore n and last and send every tag unsorted.
        return sorted(tag for tag in tags if tag > last)[:limit]

    async def referrers(
        self, repo: str, subject: Digest, artifact_type: str | None
    ) -> list[dict[str, Any]]:
        upstream, remote = self.split(repo)
        try:
            found = await upstream.referrers(remote, subject, artifact_type)
        except _UPSTREAM_ERRORS as exc:
            log.warning(
                "upstream %s: listing referrers in %s failed: %s; serving cached referrers",
                upstream.host,
                remote,
                describe_error(exc),
            )
            found = None
        self._outcome(repo, "referrers", BYPASS if found is not None else STALE)
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

    async def mount_blob(
        self,
        repo: str,
        digest: Digest,
        source: str | None,
        *,
        may_pull: Callable[[str], bool] | None = None,
    ) -> BlobRow | None:
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
        self,
        repo: str,
        upload_id: str,
        body: AsyncIterator[bytes] | None,
        digest: Digest,
        content_range: ContentRange | None = None,
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


def in_flight(blob: BlobRow) -> bool:
    """Whether the row stands for a blob still arriving (read through the pull-through
    registry, not storage)."""
    return blob.storage_key == FILLING or blob.storage_key.startswith(FOLLOWING)


async def _nothing() -> AsyncIterator[bytes]:
    return
    yield b""


async def _body(response: aiohttp.ClientResponse, skip: int) -> AsyncIterator[bytes]:
    """The body of a blob GET past its first ``skip`` bytes. When the connection breaks,
    what had arrived is passed on before the error: aiohttp raises on the next read,
    before handing out what it buffered (up to twice the read buffer)."""

    def skipped(chunk: bytes) -> bytes:
        nonlocal skip
        dropped = min(skip, len(chunk))
        skip -= dropped
        return chunk[dropped:]

    try:
        async for chunk in response.content.iter_any():
            if chunk := skipped(chunk):
                yield chunk
    except _CUT:
        if chunk := skipped(_buffered(response.content)):
            yield chunk
        raise


def _buffered(content: aiohttp.StreamReader) -> bytes:
    read = getattr(content, "_read_nowait", None)  # the buffer, without the error check
    try:
        return bytes(read(-1)) if read is not None else b""
    except Exception:
        return b""


class _Inconsistent(Exception):
    """The upstream's answers to one fill do not fit together."""


def _range_total(content_range: str | None, start: int | None) -> int | None:
    """The size in ``Content-Range: bytes <start>-<size-1>/<size>`` (or ``bytes */<size>``
    when ``start`` is None), if the header says exactly that."""
    match = _CONTENT_RANGE_RE.fullmatch((content_range or "").strip())
    if match is None:
        return None
    first, last, size = match.group(1), match.group(2), int(match.group(3))
    if start is None:
        return size if first is None else None
    if first is None or int(first) != start or int(last) != size - 1:
        return None
    return size


def _resumable(exc: BaseException) -> bool:
    """Whether a fill that failed so leaves a spool worth continuing from: not when the
    upstream's bytes proved wrong or it refuses the blob."""
    if isinstance(exc, (DigestInvalid, SizeInvalid, _Inconsistent)):
        return False
    if isinstance(exc, UpstreamStatus):
        return exc.status == 429 or exc.status >= 500
    return True


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


PULL_THROUGH = web.AppKey("pull_through", PullThroughRegistry)
