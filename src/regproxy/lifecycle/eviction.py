"""The byte budget of the pull-through cache: evict least recently pulled images.

Cached content is counted by a query, never a counter that could drift: the bytes of the
blobs that only pull-through repositories link (``cache.max_bytes`` for all of them,
``upstreams.<name>.max_bytes`` for those under ``<name>/``). A pass

1. evicts the images nobody pulled for ``max_idle`` seconds;
2. while a budget is exceeded (or, on the filesystem, free space is below
   ``cache.min_free_bytes``), evicts the least recently pulled images, about as many as the
   excess, frees their blobs right away and takes what they held off the measured size.

Evicting an image deletes its tags, its manifest and the manifests an index lists, in one
transaction that first checks it was not pulled since it was chosen. Its blobs then go by
GC's own rule (no manifest anywhere references them, not linked within the grace) narrowed
to cached content: a blob that a hosted repository links is kept, and so is a blob whose
fill is in flight in this process. Images and blobs used within ``cache.grace`` seconds are
left alone, which covers pulls that another process is serving. Rows go in a committed
transaction first, bytes after.

Eviction runs in every GC pass and, through :class:`CacheEvictor`, after each fill.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import shutil
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field

from aiohttp import web

from regproxy.config import Config
from regproxy.lifecycle.pulls import PullRecorder
from regproxy.meta.base import BlobRow, CachedImage, CacheUsage, MetadataStore
from regproxy.oci import Digest
from regproxy.storage.base import BlobStore

log = logging.getLogger(__name__)

# Bounds of one pass: rounds of "choose, evict, free", and images looked at per round.
MAX_ROUNDS = 100
IMAGES_PER_ROUND = 200
BLOBS_PER_BATCH = 500


@dataclass
class EvictionReport:
    images: list[CachedImage] = field(default_factory=list)
    blobs: list[BlobRow] = field(default_factory=list)
    # The cache's size after the pass: measured, less the blobs freed since.
    usage: CacheUsage | None = None

    @property
    def bytes_freed(self) -> int:
        return sum(blob.size for blob in self.blobs)


def budget_enabled(config: Config) -> bool:
    """Whether any byte budget (or free-space floor) asks for eviction after a fill."""
    cache = config.cache
    return bool(
        cache.max_bytes
        or cache.min_free_bytes
        or any(up.max_bytes for up in config.upstreams.values())
    )


async def evict_cache(
    meta: MetadataStore,
    storage: BlobStore,
    config: Config,
    now: float,
    dry_run: bool,
    in_use: Collection[Digest] = frozenset(),
    *,
    sweep: bool = True,
) -> EvictionReport:
    """One eviction pass (see the module's docstring); a dry run only lists what would go.

    ``sweep``: also free cached blobs that no image references any more (a scan of the
    whole cache: GC passes do it; the passes after fills only free what they evict).
    """
    report = EvictionReport()
    prefixes = list(config.upstreams)
    if not prefixes:
        return report
    pass_ = _Pass(meta, storage, config, now, dry_run, in_use, report)
    await pass_.evict_idle()
    await pass_.free_blobs(sweep=sweep)
    await pass_.measure()
    for _ in range(MAX_ROUNDS):
        chosen = await pass_.over_budget()
        if not chosen:
            break
        for image in chosen:
            await pass_.evict(image)
        if dry_run:
            break  # nothing was freed, so measuring again would choose the same images
        await pass_.free_blobs()
    return report


@dataclass
class _Pass:
    meta: MetadataStore
    storage: BlobStore
    config: Config
    now: float
    dry_run: bool
    in_use: Collection[Digest]
    report: EvictionReport
    # Blobs of the images evicted since the last free_blobs: the ones that may be unused now.
    candidates: set[Digest] = field(default_factory=set)

    @property
    def before(self) -> float:
        """Images and blobs used since then are left alone."""
        return self.now - self.config.cache.grace

    @property
    def budgeted(self) -> list[str]:
        return [name for name, up in self.config.upstreams.items() if up.max_bytes]

    async def evict_idle(self) -> None:
        for prefix, upstream in self.config.upstreams.items():
            idle = [t for t in (self.config.cache.max_idle, upstream.max_idle) if t > 0]
            if not idle:
                continue
            before = min(self.now - min(idle), self.before)
            for _ in range(MAX_ROUNDS):
                images = await self.meta.cached_images(prefix, before, IMAGES_PER_ROUND)
                evicted = [image for image in images if await self.evict(image)]
                if self.dry_run or not evicted:
                    break

    async def evict(self, image: CachedImage) -> bool:
        if not self.dry_run:
            blobs = await self.meta.evict_image(image)
            if blobs is None:
                return False  # pulled (or taken into an index) since it was chosen
            self.candidates.update(blobs)
        self.report.images.append(image)
        log.info("evicted cached image %s@%s (%d bytes)", image.repo, image.digest, image.size)
        return True

    async def free_blobs(self, *, sweep: bool = False) -> None:
        """Free the evicted images' blobs that nothing uses now (``sweep``: any such blob)."""
        prefixes = list(self.config.upstreams)
        candidates, self.candidates = sorted(self.candidates, key=str), set()
        freed = 0
        while sweep or candidates:
            batch = None if sweep else candidates[:BLOBS_PER_BATCH]
            candidates = candidates[BLOBS_PER_BATCH:]
            rows = await self.meta.collect_cached_blobs(
                prefixes,
                self.before,
                self.in_use,
                BLOBS_PER_BATCH,
                dry_run=self.dry_run,
                candidates=batch,
            )
            self.report.blobs += rows
            if self.dry_run:
                return
            for row in rows:  # the rows are gone (committed): now the bytes
                freed += row.size
                try:
                    await self.storage.delete(row.storage_key)
                except Exception:
                    # Orphaned bytes, which GC's orphan sweep removes later.
                    log.exception("deleting the bytes of evicted blob %s failed", row.digest)
            if sweep and len(rows) < BLOBS_PER_BATCH:
                break
        usage = self.report.usage
        if usage is not None and freed:
            if self.budgeted:
                await self.measure()  # which upstream's bytes they were: measure those again
            else:
                # Every freed blob was linked only from the cache: the total drops by as much.
                self.report.usage = CacheUsage(usage.total - freed, usage.by_prefix)

    async def measure(self) -> None:
        prefixes = list(self.config.upstreams)
        self.report.usage = await self.meta.cache_usage(prefixes, per_prefix=self.budgeted)

    async def over_budget(self) -> list[CachedImage]:
        """The least recently used images whose bytes come to about the excess, if any."""
        cache = self.config.cache
        usage = self.report.usage
        assert usage is not None  # measured before the first round
        chosen: dict[tuple[str, Digest], CachedImage] = {}
        for prefix, upstream in self.config.upstreams.items():
            excess = usage.by_prefix.get(prefix, 0) - upstream.max_bytes
            if upstream.max_bytes and excess > 0:
                images = await self.meta.cached_images(prefix, self.before, IMAGES_PER_ROUND)
                _take(chosen, images, excess)
        excess = usage.total - cache.max_bytes if cache.max_bytes else 0
        free = await self._free_space()
        if free is not None:
            excess = max(excess, cache.min_free_bytes - free)
        # Whatever the per-upstream rounds chose counts towards the global excess.
        excess -= sum(image.size for image in chosen.values())
        if excess > 0:
            lists = [
                await self.meta.cached_images(prefix, self.before, IMAGES_PER_ROUND)
                for prefix in self.config.upstreams
            ]
            merged = heapq.merge(*lists, key=lambda image: (image.last_used, image.repo))
            _take(chosen, (i for i in merged if (i.repo, i.digest) not in chosen), excess)
        if chosen:
            log.info(
                "the cache holds %d bytes (budget %d): evicting %d image(s)",
                usage.total,
                cache.max_bytes,
                len(chosen),
            )
        return list(chosen.values())

    async def _free_space(self) -> int | None:
        cache = self.config.cache
        if not cache.min_free_bytes or self.config.storage.backend != "filesystem":
            return None
        path = self.config.storage_path
        return (await asyncio.to_thread(shutil.disk_usage, path)).free


def _take(
    chosen: dict[tuple[str, Digest], CachedImage], images: Iterable[CachedImage], excess: int
) -> None:
    """Add images, in order, until their sizes cover ``excess`` (at least one)."""
    covered = 0
    for image in images:
        if covered >= excess:
            return
        chosen[(image.repo, image.digest)] = image
        covered += max(image.size, 1)


class CacheEvictor:
    """Eviction in a serving process: after fills, and for the GC pass.

    It writes this process's pending pull times first, so the least recently pulled images
    are chosen by up-to-date times, and it spares the blobs whose fills are in flight.

    Measuring the cache is a query over every cached blob, too costly for every fill; so after
    each measurement the bytes this process's fills add are summed in memory, and a pass runs
    as soon as that sum takes a budget over, storage was full, free space is low, or the last
    measurement is ``REMEASURE`` seconds old (fills of other processes count from then on).
    """

    REMEASURE = 60.0

    def __init__(
        self,
        meta: MetadataStore,
        storage: BlobStore,
        config: Config,
        *,
        pulls: PullRecorder | None = None,
        in_use: Callable[[], Collection[Digest]] | None = None,
    ) -> None:
        self.meta = meta
        self.storage = storage
        self.config = config
        self.pulls = pulls
        self.in_use = in_use
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._again = False
        # The last measurement, when it was taken, and what fills added since.
        self._usage: CacheUsage | None = None
        self._measured = 0.0
        self._added: dict[str, int] = {}
        self._full = False

    async def run(
        self, now: float | None = None, dry_run: bool = False, *, sweep: bool = True
    ) -> EvictionReport:
        async with self._lock:
            if self.pulls is not None and not dry_run:
                await self.pulls.flush()
            report = await evict_cache(
                self.meta,
                self.storage,
                self.config,
                time.time() if now is None else now,
                dry_run,
                frozenset(self.in_use()) if self.in_use is not None else frozenset(),
                sweep=sweep,
            )
            if report.usage is not None and not dry_run:
                # Measured after the pass's last evictions: fills count from here on.
                self._usage = report.usage
                self._measured = time.monotonic()
                self._added = {}
                self._full = False
            return report

    def fill_done(self, repo: str, stored: int, storage_full: bool = False) -> None:
        """A fill ended, having stored ``stored`` bytes under ``repo`` (0: not cached).

        Starts a pass if that may take the cache over a budget; one pass at a time, and fills
        that finish during a pass ask for one more.
        """
        if not budget_enabled(self.config):
            return
        prefix = repo.partition("/")[0]
        self._added[prefix] = self._added.get(prefix, 0) + stored
        self._full = self._full or storage_full
        if not self._due() and not self.config.cache.min_free_bytes:
            return
        if self._task is not None and not self._task.done():
            self._again = True
            return
        self._task = asyncio.get_running_loop().create_task(self._after_fills())

    def _due(self) -> bool:
        """Whether the fills since the last measurement may have taken a budget over."""
        cache = self.config.cache
        if self._usage is None or self._full:
            return True
        if time.monotonic() - self._measured >= self.REMEASURE:
            return True
        added = sum(self._added.values())
        if cache.max_bytes and self._usage.total + added > cache.max_bytes:
            return True
        for name, upstream in self.config.upstreams.items():
            own = self._usage.by_prefix.get(name, 0) + self._added.get(name, 0)
            if upstream.max_bytes and own > upstream.max_bytes:
                return True
        return False

    async def _after_fills(self) -> None:
        while True:
            self._again = False
            try:
                if await self._needed():
                    report = await self.run(sweep=False)
                    if report.images or report.blobs:
                        log.info(
                            "cache eviction: %d image(s), %d blob(s), %d bytes freed",
                            len(report.images),
                            len(report.blobs),
                            report.bytes_freed,
                        )
            except Exception:
                log.exception("cache eviction failed; the next fill or GC pass tries again")
            if not self._again:
                return

    async def _needed(self) -> bool:
        """Whether a pass is worth its queries (free space is cheap to look at first)."""
        if self._due():
            return True
        floor = self.config.cache.min_free_bytes
        if not floor or self.config.storage.backend != "filesystem":
            return False
        usage = await asyncio.to_thread(shutil.disk_usage, self.config.storage_path)
        return usage.free < floor

    async def settled(self) -> None:
        """Return once no eviction asked for by a fill is running."""
        while self._task is not None and not self._task.done():
            await asyncio.wait([self._task])

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


EVICTOR = web.AppKey("evictor", CacheEvictor)
