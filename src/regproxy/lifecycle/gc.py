"""One garbage-collection pass: retention, cache eviction, garbage rows, their bytes, orphans.

The rules are SQL in the metadata store (``MetadataStore.collect_garbage``); this module only
orders the steps and deletes bytes. Each batch of rows is deleted in one committed write
transaction before any of its bytes go (row gone -> bytes deleted), so a crash between the two
leaves orphan bytes for the sweep and never a row without bytes. A blob's storage key is unique
to the upload that made it, so deleting it cannot destroy the bytes of a new upload of the same
digest. Several processes may run passes at once, and serve meanwhile: every decision is
re-made inside the transaction that deletes, and SQLite's ``BEGIN IMMEDIATE`` serializes them.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from regproxy.config import Config
from regproxy.lifecycle.eviction import CacheEvictor, EvictionReport
from regproxy.lifecycle.orphans import SweepReport, sweep_orphans
from regproxy.lifecycle.retention import RemovedTag, apply_retention
from regproxy.meta.base import BlobRow, GarbageManifest, MetadataStore
from regproxy.storage.base import BlobStore

log = logging.getLogger(__name__)

BATCH = 500


@dataclass
class PassReport:
    dry_run: bool
    tags: list[RemovedTag] = field(default_factory=list)
    eviction: EvictionReport = field(default_factory=EvictionReport)
    manifests: list[GarbageManifest] = field(default_factory=list)
    links: int = 0
    blobs: list[BlobRow] = field(default_factory=list)
    orphans: SweepReport = field(default_factory=SweepReport)

    @property
    def bytes_freed(self) -> int:
        return (
            self.eviction.bytes_freed
            + sum(blob.size for blob in self.blobs)
            + self.orphans.bytes_freed
        )

    def summary(self) -> str:
        verb = "would delete" if self.dry_run else "deleted"
        freed = "would free" if self.dry_run else "freed"
        orphans = len(self.orphans.uploads) + len(self.orphans.blobs)
        return (
            f"gc: {verb} {len(self.tags)} tag(s) by retention,"
            f" {len(self.eviction.images)} cached image(s) and {len(self.eviction.blobs)}"
            f" cached blob(s) by eviction, {len(self.manifests)} untagged manifest(s),"
            f" {self.links} stale link(s), {len(self.blobs)} blob(s), {orphans} orphan"
            f" object(s); {freed} {self.bytes_freed} bytes"
        )


def cache_prefixes(config: Config) -> list[str]:
    """The repository prefixes of the pull-through cache: ``<upstream name>/``."""
    return [f"{name}/" for name in config.upstreams]


async def run_pass(
    meta: MetadataStore,
    storage: BlobStore,
    config: Config,
    *,
    dry_run: bool = False,
    now: float | None = None,
    out: Callable[[str], None] | None = None,
    evictor: CacheEvictor | None = None,
    sweep: bool = True,
) -> PassReport:
    """One pass; ``out`` is told of each thing deleted (or, in a dry run, that would be)."""
    now = time.time() if now is None else now
    report = PassReport(dry_run)
    verb = "would delete" if dry_run else "deleted"

    def say(line: str) -> None:
        if out is not None:
            out(line)

    # Retention and eviction first: what they untag, the rules below collect. They judge by
    # pull times, so this process's pending ones are written first.
    if evictor is not None and evictor.pulls is not None:
        await evictor.pulls.flush()
    report.tags = await apply_retention(meta, config, now, dry_run)
    for tag in report.tags:
        say(f"{verb} tag {tag.repo}:{tag.tag} ({tag.digest}) by retention")
    if evictor is None:
        evictor = CacheEvictor(meta, storage, config)
    report.eviction = await evictor.run(now, dry_run)
    for image in report.eviction.images:
        say(f"{verb} cached image {image.repo}@{image.digest} by eviction")
    for blob in report.eviction.blobs:
        say(f"{verb} cached blob {blob.digest} ({blob.size} bytes) by eviction")

    batches = meta.collect_garbage(
        now - config.gc.grace,
        untagged=config.gc.untagged == "delete",
        skip_prefixes=cache_prefixes(config),
        batch=BATCH,
        dry_run=dry_run,
    )
    async with contextlib.aclosing(batches):
        async for batch in batches:
            # This batch's rows are gone, committed: now its bytes.
            for manifest in batch.manifests:
                say(
                    f"{verb} untagged manifest {manifest.repo}@{manifest.digest}"
                    f" ({manifest.size} bytes)"
                )
            report.manifests += batch.manifests
            report.links += batch.links
            for blob in batch.blobs:
                if not dry_run:
                    await _delete_bytes(storage, blob)
                report.blobs.append(blob)
                say(f"{verb} blob {blob.digest} ({blob.size} bytes)")

    if sweep:  # the orphan sweep lists all of storage: the serving process runs it less often
        report.orphans = await sweep_orphans(
            meta, storage, now - config.uploads.max_age, dry_run=dry_run, out=out
        )
    return report


async def _delete_bytes(storage: BlobStore, blob: BlobRow) -> None:
    try:
        await storage.delete(blob.storage_key)
    except Exception as exc:  # the row is gone: the orphan sweep takes the bytes later
        log.warning(
            "could not delete the bytes of %s at %s: %r", blob.digest, blob.storage_key, exc
        )
