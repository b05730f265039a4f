"""``regproxy check``: blob rows whose bytes are missing, of the wrong size, or (``deep``) of
the wrong digest.

``repair`` deletes the row and links of broken cached content (every repository using the
blob is under an upstream's prefix), row first, then the bad bytes: the next pull finds no
row and fills the blob from upstream again, while the cached manifests stay. Broken hosted
content cannot be restored from anywhere; it is listed with the repositories that use it.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

from regproxy.config import Config
from regproxy.lifecycle.gc import cache_prefixes
from regproxy.meta.base import BlobRow, MetadataStore
from regproxy.storage.base import BlobStore

BATCH = 500


@dataclass(frozen=True)
class Broken:
    blob: BlobRow
    problem: str
    repos: list[str]
    cached: bool


@dataclass
class CheckReport:
    checked: int = 0
    broken: list[Broken] = field(default_factory=list)
    repaired: list[Broken] = field(default_factory=list)


async def check_blobs(
    meta: MetadataStore,
    storage: BlobStore,
    config: Config,
    *,
    deep: bool = False,
    repair: bool = False,
    out: Callable[[str], None] | None = None,
) -> CheckReport:
    report = CheckReport()
    prefixes = cache_prefixes(config)
    after = ""
    while rows := await meta.list_blobs(after, BATCH):
        after = str(rows[-1].digest)
        for blob in rows:
            report.checked += 1
            problem = await _problem(storage, blob, deep)
            if problem is None:
                continue
            current = await meta.get_blob(blob.digest)
            if current is None or current.storage_key != blob.storage_key:
                continue  # collected or replaced while we looked: not broken
            repos = await meta.blob_repositories(blob.digest)
            cached = bool(repos) and all(repo.startswith(tuple(prefixes)) for repo in repos)
            broken = Broken(blob, problem, repos, cached)
            report.broken.append(broken)
            kind = "cached" if cached else "hosted"
            where = ", ".join(repos) or "no repository"
            if out is not None:
                out(f"broken {kind} blob {blob.digest} at {blob.storage_key}: {problem} ({where})")
            if repair and cached and await meta.forget_cached_blob(blob.digest, prefixes):
                await storage.delete(blob.storage_key)  # row gone, then the bad bytes
                report.repaired.append(broken)
                if out is not None:
                    out(f"repaired {blob.digest}: forgotten, the next pull fetches it again")
            elif repair and out is not None:
                out(f"cannot repair {blob.digest}: hosted content, push it again ({where})")
    return report


async def _problem(storage: BlobStore, blob: BlobRow, deep: bool) -> str | None:
    size = await storage.stat(blob.storage_key)
    if size is None:
        return "bytes missing"
    if size != blob.size:
        return f"{size} bytes stored, the row says {blob.size}"
    if not deep:
        return None
    hasher = hashlib.new(blob.digest.algorithm)
    async for chunk in storage.read(blob.storage_key, 0, blob.size):
        await asyncio.to_thread(hasher.update, chunk)
    if hasher.hexdigest() != blob.digest.hex:
        return f"content has digest {blob.digest.algorithm}:{hasher.hexdigest()}"
    return None
