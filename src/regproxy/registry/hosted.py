"""The hosted registry: repositories whose content is pushed here.

Metadata says what exists; storage holds bytes by key. A blob becomes visible only after its
bytes were verified against the digest and committed to storage, and then its row was
committed (bytes durable -> row committed). Deleting goes the other way (row gone -> bytes
deleted), so a crash at any point leaves at worst unreferenced bytes, never a row without them.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any

from regproxy import oci
from regproxy.errors import (
    BlobUnknown,
    BlobUploadUnknown,
    DigestInvalid,
    ManifestBlobUnknown,
    ManifestUnknown,
    NameUnknown,
    RangeInvalid,
    SizeInvalid,
    StorageFull,
    Unavailable,
)
from regproxy.meta.base import BlobRow, ManifestRow, MetadataStore, UploadRow
from regproxy.oci import Digest
from regproxy.registry.base import ContentRange
from regproxy.registry.manifest import annotations_of, lookup_reference, parse_manifest
from regproxy.storage.base import BlobStore, BlobWriter, UploadLost

log = logging.getLogger(__name__)

Hasher = Any  # hashlib's hash objects have no public type


def range_header(offset: int) -> str:
    """The ``Range`` header value for an upload holding ``offset`` bytes."""
    return f"0-{max(offset - 1, 0)}"


def is_storage_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


class HostedRegistry:
    def __init__(self, meta: MetadataStore, storage: BlobStore, *, gc_grace: float = 0.0) -> None:
        self.meta = meta
        self.storage = storage
        # A blob linked longer ago than this, and referenced by no manifest, is garbage.
        self.gc_grace = gc_grace
        # The running hash of each upload this process is receiving, valid at an offset.
        # hashlib state cannot be stored; another process re-hashes the stored prefix once.
        self._hashers: dict[str, tuple[int, Hasher]] = {}
        self._upload_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )
        self._digest_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )

    def namespace_prefix(self, ns: str) -> str | None:
        return None

    # -- blobs ------------------------------------------------------------------------------

    async def get_blob(self, repo: str, digest: Digest) -> BlobRow:
        blob = await self.meta.get_repo_blob(repo, digest)
        if blob is None:
            raise BlobUnknown(detail={"digest": str(digest)})
        now = time.time()
        if self.gc_grace > 0 and blob.linked is not None and blob.linked < now - self.gc_grace / 4:
            # "It exists": the client may skip the upload and name the blob in a manifest a
            # while later, so the blob lives at least 3/4 of a grace more. Refreshing at most
            # once per quarter grace per link keeps HEADs and GETs (almost) free of writes.
            if not await self.meta.touch_link(repo, digest, now):
                raise BlobUnknown(detail={"digest": str(digest)})  # collected meanwhile
        return blob

    stat_blob = get_blob

    def blob_path(self, blob: BlobRow) -> Path | None:
        return self.storage.local_path(blob.storage_key)

    async def blob_redirect_url(self, blob: BlobRow) -> str | None:
        return await self.storage.redirect_url(blob.storage_key)

    def read_blob(self, blob: BlobRow, start: int, length: int) -> AsyncIterator[bytes]:
        return self.storage.read(blob.storage_key, start, length)

    async def delete_blob(self, repo: str, digest: Digest) -> None:
        if not await self.meta.unlink_blob(repo, digest):
            raise BlobUnknown(detail={"digest": str(digest)})
        async with self._digest_lock(digest):
            gone = await self.meta.delete_blob_if_unused(digest)
            if gone is not None:
                await self.storage.delete(gone.storage_key)

    async def mount_blob(
        self,
        repo: str,
        digest: Digest,
        source: str | None,
        *,
        may_pull: Callable[[str], bool] | None = None,
    ) -> BlobRow | None:
        """Link an existing blob into ``repo``: from ``source``; without one, from any
        repository ``may_pull`` accepts, or from anywhere it is stored if that is None.

        A blob only in repositories the caller may not pull is as absent as one stored
        nowhere: the same None, so nothing about it leaks.
        """
        if source is not None:
            blob = await self.meta.get_repo_blob(source, digest)
        elif may_pull is not None:
            readable = any(may_pull(name) for name in await self.meta.blob_repositories(digest))
            blob = await self.meta.get_blob(digest) if readable else None
        else:
            blob = await self.meta.get_blob(digest)
        if blob is None or not await self.meta.link_blob(repo, digest):
            return None  # not stored, or collected since we looked: the client uploads it
        return blob

    # -- uploads ----------------------------------------------------------------------------

    async def start_upload(self, repo: str, algorithm: str = "sha256") -> UploadRow:
        oci.check_algorithm(algorithm)
        now = time.time()
        upload_id = str(uuid.uuid4())
        writer = await self.storage.open_writer(upload_id, None, 0)
        state = await writer.suspend()
        upload = UploadRow(upload_id, repo, algorithm, 0, state, now, now)
        await self.meta.create_upload(upload)
        self._hashers[upload_id] = (0, hashlib.new(algorithm))
        return upload

    async def get_upload(self, repo: str, upload_id: str) -> UploadRow:
        """An upload's status: only while its recorded bytes are really stored."""
        upload = await self._upload(repo, upload_id)
        try:
            stored = await self.storage.upload_stored(upload.id, upload.state, upload.offset)
        except Unavailable:
            return upload  # storage cannot say now; the row is the record
        if not stored:
            await self._drop_lost(upload)
            raise UploadLost(upload_id)
        return upload

    async def _upload(self, repo: str, upload_id: str) -> UploadRow:
        upload = await self.meta.get_upload(upload_id)
        if upload is None or upload.repo != repo:
            raise BlobUploadUnknown(detail={"upload_id": upload_id})
        return upload

    async def append_upload(
        self,
        repo: str,
        upload_id: str,
        body: AsyncIterator[bytes],
        content_range: ContentRange | None,
    ) -> UploadRow:
        async with self._upload_lock(upload_id):
            upload = await self._upload(repo, upload_id)
            expected = await self._expected_length(upload, content_range)
            try:
                writer, hasher = await self._resume(upload)
                size, state = await self._receive(upload, writer, hasher, body, expected)
            except UploadLost:
                await self._drop_lost(upload)
                raise
            return await self._record(upload, size, state, hasher)

    async def finish_upload(
        self,
        repo: str,
        upload_id: str,
        body: AsyncIterator[bytes] | None,
        digest: Digest,
        content_range: ContentRange | None = None,
    ) -> BlobRow:
        async with self._upload_lock(upload_id):
            upload = await self._upload(repo, upload_id)
            expected = await self._expected_length(
                upload, content_range if body is not None else None
            )
            try:
                writer, hasher = await self._resume(upload)
            except UploadLost:
                # Killed after the commit published the bytes, before the row was written?
                return await self._finish_published(upload, body, digest)
            size = upload.offset
            if body is not None and digest.algorithm == upload.algorithm:
                # The last bytes go straight into the commit: nothing to record in between.
                size, _ = await self._receive(
                    upload, writer, hasher, body, expected, keep_open=True
                )
            elif body is not None:
                size, state = await self._receive(upload, writer, hasher, body, expected)
                upload = await self._record(upload, size, state, hasher)
                writer, hasher = await self._resume(upload)
            if digest.algorithm != upload.algorithm:
                hasher = await self._hash_stored(upload, digest.algorithm)
            if hasher.hexdigest() != digest.hex:
                await writer.abort()
                await self._forget(upload)
                raise DigestInvalid(
                    f"content has digest {digest.algorithm}:{hasher.hexdigest()}, not {digest}",
                    detail={"digest": str(digest)},
                )
            # Claim the upload before publishing: a purge that got there first wins, and a
            # purge that comes later sees the row changed and leaves it alone.
            claimed = await self.meta.update_upload(
                upload.id, upload.offset, upload.state, time.time(), expected=upload.updated
            )
            if not claimed:
                await writer.release()
                raise BlobUploadUnknown(
                    "the upload expired before it was finished", detail={"upload_id": upload_id}
                )
            async with self._digest_lock(digest):
                key = await writer.commit(digest)
                blob = await self.meta.add_blob(
                    repo, BlobRow(digest, size, key), upload_id=upload_id
                )
            self._hashers.pop(upload_id, None)
            if blob.storage_key != key:  # another upload of the same bytes got there first
                await self.storage.delete(key)
            return blob

    async def put_blob(self, repo: str, digest: Digest, body: AsyncIterator[bytes]) -> BlobRow:
        """A whole blob in one request; nothing of it is kept unless it all arrives intact."""
        upload = await self.start_upload(repo, digest.algorithm)
        try:
            return await self.finish_upload(repo, upload.id, body, digest)
        except BaseException:
            with suppress(BlobUploadUnknown):  # a digest mismatch already removed it
                await self.cancel_upload(repo, upload.id)
            raise

    async def cancel_upload(self, repo: str, upload_id: str) -> None:
        async with self._upload_lock(upload_id):
            upload = await self._upload(repo, upload_id)
            if not await self.storage.upload_stored(upload.id, upload.state, upload.offset):
                # After a crash its bytes may be a blob a row already names: leave them.
                await self._drop_lost(upload)
                return
            await self._forget(upload)

    async def purge_stale_uploads(self, max_age: float) -> int:
        """Delete uploads nobody touched for ``max_age`` seconds; returns how many."""
        purged = 0
        for upload in await self.meta.stale_uploads(time.time() - max_age):
            async with self._upload_lock(upload.id):
                # Only if nobody, in any process, touched it since we looked; and its
                # storage only if it is still the upload's (see cancel_upload).
                if not await self.storage.upload_stored(upload.id, upload.state, upload.offset):
                    purged += await self._drop_lost(upload)
                elif await self._forget(upload, expected=upload.updated):
                    purged += 1
        return purged

    async def reconcile_uploads(self, grace: float) -> int:
        """Drop the rows of uploads idle for ``grace`` seconds whose stored bytes are gone
        (a crash after a commit, before its row; see ``_finish_published``); returns how
        many. Within the grace a retried finish can still complete them."""
        dropped = 0
        for upload in await self.meta.stale_uploads(time.time() - grace):
            async with self._upload_lock(upload.id):
                if await self.storage.upload_stored(upload.id, upload.state, upload.offset):
                    continue
                if await self._drop_lost(upload):
                    dropped += 1
        return dropped

    async def _finish_published(
        self, upload: UploadRow, body: AsyncIterator[bytes] | None, digest: Digest
    ) -> BlobRow:
        """Finish an upload whose bytes a commit already published, when they are the blob.

        The bytes count only if they are where a commit of this upload as ``digest`` put
        them, hold as many bytes as the upload plus this request's body, and hash to the
        digest. Otherwise the upload is gone: its row is dropped, 404 BLOB_UPLOAD_UNKNOWN.
        """
        size = upload.offset
        if body is not None:
            async for chunk in body:  # the final chunk, sent again: already in the blob
                size += len(chunk)
        found = await self.storage.published(upload.id, digest)
        if found is None or found[1] != size or not await self._stored_as(found[0], size, digest):
            await self._drop_lost(upload)
            raise UploadLost(upload.id)
        key = found[0]
        claimed = await self.meta.update_upload(
            upload.id, upload.offset, upload.state, time.time(), expected=upload.updated
        )
        if not claimed:
            raise BlobUploadUnknown(
                "the upload changed or expired during this request",
                detail={"upload_id": upload.id},
            )
        log.info("upload %s: its bytes were published before a crash; finishing it", upload.id)
        async with self._digest_lock(digest):
            blob = await self.meta.add_blob(
                upload.repo, BlobRow(digest, size, key), upload_id=upload.id
            )
        self._hashers.pop(upload.id, None)
        if blob.storage_key != key:  # another upload of the same bytes got there first
            await self.storage.delete(key)
        return blob

    async def _stored_as(self, key: str, size: int, digest: Digest) -> bool:
        """Whether the ``size`` bytes stored at ``key`` hash to ``digest``."""
        hasher = hashlib.new(digest.algorithm)
        try:
            async for chunk in self.storage.read(key, 0, size):
                await asyncio.to_thread(hasher.update, chunk)
        except FileNotFoundError:
            return False
        return bool(hasher.hexdigest() == digest.hex)

    async def _drop_lost(self, upload: UploadRow) -> bool:
        """Delete the row of an upload whose bytes are gone (if nobody changed it since).

        Whatever is left in storage is not deleted here: after a crash it may be a published
        blob that another process is just recording; the orphan sweep removes what no row
        names.
        """
        self._hashers.pop(upload.id, None)
        return await self.meta.delete_upload(upload.id, expected=upload.updated)

    async def _forget(self, upload: UploadRow, *, expected: float | None = None) -> bool:
        # Row first: storage never outlives the row.
        if not await self.meta.delete_upload(upload.id, expected=expected):
            return False
        self._hashers.pop(upload.id, None)
        await self.storage.delete_upload(upload.id, upload.state)
        return True

    async def _resume(self, upload: UploadRow) -> tuple[BlobWriter, Hasher]:
        writer = await self.storage.open_writer(upload.id, upload.state, upload.offset)
        cached = self._hashers.get(upload.id)
        if cached is not None and cached[0] == upload.offset:
            return writer, cached[1]
        try:
            hasher = await self._hash_stored(upload, upload.algorithm)
        except BaseException:
            await writer.release()
            raise
        return writer, hasher

    async def _hash_stored(self, upload: UploadRow, algorithm: str) -> Hasher:
        hasher = hashlib.new(algorithm)
        async for chunk in self.storage.read_upload(upload.id, upload.state, upload.offset):
            await asyncio.to_thread(hasher.update, chunk)
        return hasher

    async def _receive(
        self,
        upload: UploadRow,
        writer: BlobWriter,
        hasher: Hasher,
        body: AsyncIterator[bytes],
        expected: int | None,
        keep_open: bool = False,
    ) -> tuple[int, str]:
        """Stream a request body into the upload; all of it lands, or none of it does.

        Returns the new size and the state to record; with ``keep_open`` the writer is left
        open for a commit instead (and the state is "").
        """
        before = hasher.copy()
        try:
            await _pipe(body, hasher, writer)
            received = writer.size - upload.offset
            if expected is not None and received != expected:
                raise SizeInvalid(
                    f"Content-Range announced {expected} bytes, the body had {received}"
                )
            state = "" if keep_open else await writer.suspend()
        except BaseException as exc:
            # Roll back to the recorded offset: the next writer truncates what came after it.
            self._hashers[upload.id] = (upload.offset, before)
            with suppress(Exception):
                await writer.release()
            if is_storage_full(exc):
                raise await self._storage_full(upload, exc) from exc
            raise
        # Until _record stores the new offset, the hasher matches no recorded offset.
        self._hashers.pop(upload.id, None)
        return writer.size, state

    async def _storage_full(self, upload: UploadRow, exc: BaseException) -> StorageFull:
        """A full disk ends the upload: nothing partial stays behind to keep the disk full."""
        log.warning("storage full, dropping upload %s of %s: %s", upload.id, upload.repo, exc)
        try:
            try:
                await self._forget(upload)
            except OSError as full:
                if not is_storage_full(full):
                    raise
                # Too full even to record the deletion (metadata on the same disk): free the
                # bytes first, then the row. Meanwhile the upload answers "unknown" at worst.
                self._hashers.pop(upload.id, None)
                await self.storage.delete_upload(upload.id, upload.state)
                await self.meta.delete_upload(upload.id)
        except Exception as cleanup:  # the stale-upload purge or the orphan sweep takes it
            log.warning("could not drop upload %s: %r", upload.id, cleanup)
        reason = exc.strerror if isinstance(exc, OSError) else str(exc)
        return StorageFull(
            f"the registry's storage is full ({reason}); nothing of this upload was kept",
            detail={"upload_id": upload.id},
        )

    async def _record(self, upload: UploadRow, size: int, state: str, hasher: Hasher) -> UploadRow:
        now = time.time()
        if not await self.meta.update_upload(upload.id, size, state, now, expected=upload.updated):
            # Purged, or moved on by another process, while this request ran.
            raise BlobUploadUnknown(
                "the upload changed or expired during this request", detail={"upload_id": upload.id}
            )
        self._hashers[upload.id] = (size, hasher)
        return UploadRow(upload.id, upload.repo, upload.algorithm, size, state, upload.started, now)

    async def _expected_length(
        self, upload: UploadRow, content_range: ContentRange | None
    ) -> int | None:
        """The length of a chunk that must start where the upload ends (416 if it does not)."""
        if content_range is None:
            return None
        if content_range.start != upload.offset:
            if not await self.storage.upload_stored(upload.id, upload.state, upload.offset):
                await self._drop_lost(upload)  # its Range would claim bytes that are gone
                raise UploadLost(upload.id)
            raise RangeInvalid(
                f"chunk starts at {content_range.start}, the upload holds {upload.offset} bytes",
                headers={"Range": range_header(upload.offset), oci.UPLOAD_UUID: upload.id},
            )
        return content_range.length

    def _upload_lock(self, upload_id: str) -> asyncio.Lock:
        return _lock_for(self._upload_locks, upload_id)

    def _digest_lock(self, digest: Digest) -> asyncio.Lock:
        return _lock_for(self._digest_locks, str(digest))

    # -- manifests --------------------------------------------------------------------------

    async def get_manifest(self, repo: str, reference: str) -> ManifestRow:
        wanted = lookup_reference(reference)
        if isinstance(wanted, Digest):
            manifest = await self.meta.get_manifest(repo, wanted)
        else:
            manifest = await self.meta.get_tagged_manifest(repo, wanted)
        if manifest is None:
            raise ManifestUnknown(detail={"reference": reference})
        return manifest

    async def put_manifest(
        self,
        repo: str,
        reference: str,
        content_type: str | None,
        content: bytes,
        tags: Sequence[str],
    ) -> ManifestRow:
        tags = [oci.parse_tag(tag) for tag in tags]
        if oci.is_digest(reference):
            wanted = Digest.parse(reference)
            digest = Digest.of(content, wanted.algorithm)
            if digest != wanted:
                raise DigestInvalid(
                    f"manifest has digest {digest}, not {wanted}", detail={"digest": reference}
                )
        else:
            tags.insert(0, oci.parse_tag(reference))
            digest = Digest.of(content)
        parsed = parse_manifest(content_type, content)
        manifest = ManifestRow(
            digest, parsed.media_type, content, parsed.subject, parsed.artifact_type
        )
        # Checked in the write transaction that stores the manifest: GC either collected a
        # blob before (a clean error) or sees the new reference and keeps it.
        missing = await self.meta.put_manifest(
            repo, manifest, parsed.references, tags, check_references=True
        )
        if missing:
            raise ManifestBlobUnknown(
                f"manifest references {len(missing)} unknown blob(s) or manifest(s)",
                detail=[{"digest": str(ref.digest)} for ref in missing],
            )
        return manifest

    async def delete_manifest(self, repo: str, reference: str) -> None:
        if oci.is_digest(reference):
            deleted = await self.meta.delete_manifest(repo, Digest.parse(reference))
        else:
            deleted = await self.meta.delete_tag(repo, oci.parse_tag(reference))
        if not deleted:
            raise ManifestUnknown(detail={"reference": reference})

    # -- discovery --------------------------------------------------------------------------

    async def list_tags(self, repo: str, last: str, limit: int) -> list[str]:
        tags = await self.meta.list_tags(repo, last, limit)
        if not tags and not await self.meta.repository_exists(repo):
            raise NameUnknown(detail={"name": repo})
        return tags

    async def list_repositories(self, last: str, limit: int) -> list[str]:
        return await self.meta.list_repositories(last, limit)

    async def referrers(
        self, repo: str, subject: Digest, artifact_type: str | None
    ) -> list[dict[str, Any]]:
        descriptors = []
        for row in await self.meta.referrers(repo, subject, artifact_type):
            descriptor: dict[str, Any] = {
                "mediaType": row.media_type,
                "digest": str(row.digest),
                "size": len(row.content),
            }
            if row.artifact_type:
                descriptor["artifactType"] = row.artifact_type
            annotations = annotations_of(row.content)
            if annotations:
                descriptor["annotations"] = annotations
            descriptors.append(descriptor)
        return descriptors


def _lock_for(locks: weakref.WeakValueDictionary[str, asyncio.Lock], key: str) -> asyncio.Lock:
    lock = locks.get(key)
    if lock is None:
        lock = locks[key] = asyncio.Lock()
    return lock


async def _pipe(body: AsyncIterator[bytes], hasher: Hasher, writer: BlobWriter) -> None:
    """Hash and write each chunk while the next one is read: three steps, in parallel."""
    pending: asyncio.Future[Any] | None = None
    try:
        async for chunk in body:
            if pending is not None:
                await pending
            pending = asyncio.gather(asyncio.to_thread(hasher.update, chunk), writer.write(chunk))
        if pending is not None:
            await pending
            pending = None
    finally:
        if pending is not None:
            with suppress(BaseException):
                await pending
