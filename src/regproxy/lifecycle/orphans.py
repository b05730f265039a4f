"""The orphan sweep: storage objects that no row names, left by crashes, are removed.

The order of every write makes an orphan harmless until it is swept: bytes are durable before
their row commits, and a row is gone before its bytes are deleted, so a crash in between leaves
bytes without a row, never the other way round. An object is an orphan when

- it is an upload's object (a filesystem upload file, S3 tails and multipart uploads) and no
  upload row has its upload id, or
- it is where committed blobs live, no blob row records its key, and the upload that made it
  (named by its key) has no row either: on S3 an upload streams into its blob key before the
  blob exists, and an upload row is deleted only after the blob row was committed, so looking
  at upload rows first and blob rows second never misses the moment in between;

and it was last written before ``before`` (``uploads.max_age`` ago): a blob whose row is being
committed right now is never that old, since committing refreshes its time.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from regproxy.meta.base import MetadataStore
from regproxy.storage.base import BlobStore, StoredObject

log = logging.getLogger(__name__)

BATCH = 500


@dataclass
class SweepReport:
    uploads: list[StoredObject] = field(default_factory=list)
    blobs: list[StoredObject] = field(default_factory=list)

    @property
    def bytes_freed(self) -> int:
        return sum(obj.size for obj in self.uploads) + sum(obj.size for obj in self.blobs)


async def sweep_orphans(
    meta: MetadataStore,
    storage: BlobStore,
    before: float,
    *,
    dry_run: bool = False,
    out: Callable[[str], None] | None = None,
) -> SweepReport:
    report = SweepReport()
    verb = "would delete" if dry_run else "deleted"
    async for batch in _batches(storage.list_upload_objects(), before):
        known = await meta.known_upload_ids([obj.upload_id for obj in batch if obj.upload_id])
        for obj in batch:
            if obj.upload_id in known:
                continue
            if not dry_run and not await _delete(storage.delete_upload_object(obj), obj):
                continue
            report.uploads.append(obj)
            if out is not None:
                out(f"{verb} orphan upload object {obj.key} ({obj.size} bytes)")
    async for batch in _batches(storage.list_blobs(), before):
        # Upload rows first, blob rows second (see the module's docstring).
        uploads = await meta.known_upload_ids([obj.upload_id for obj in batch if obj.upload_id])
        keys = await meta.known_blob_keys([obj.key for obj in batch])
        for obj in batch:
            if obj.key in keys or obj.upload_id in uploads:
                continue
            if not dry_run and not await _delete(storage.delete(obj.key), obj):
                continue
            report.blobs.append(obj)
            if out is not None:
                out(f"{verb} orphan blob object {obj.key} ({obj.size} bytes)")
    return report


async def _batches(
    objects: AsyncIterator[StoredObject], before: float
) -> AsyncIterator[list[StoredObject]]:
    batch: list[StoredObject] = []
    async for obj in objects:
        if obj.mtime < before:
            batch.append(obj)
        if len(batch) >= BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


async def _delete(deletion: Awaitable[None], obj: StoredObject) -> bool:
    try:
        await deletion
    except Exception as exc:  # storage trouble: the next sweep tries again
        log.warning("could not delete orphan %s: %r", obj.key, exc)
        return False
    return True
