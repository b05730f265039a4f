"""When manifests were last pulled, recorded without a write per request.

Retention keeps tags pulled within a window and cache eviction drops the least recently
pulled images first, so both need pull times; but a registry serves far more manifest HEADs
and GETs than its database should take UPDATEs (Harbor's "touch on every HEAD" overloaded its
database). So pulls are noted in memory, one entry per (repository, manifest), and written in
one transaction per ``interval`` seconds, and once more on shutdown. A crash loses at most one
interval of pull times, which only makes content look a little older to GC.
"""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import web

from regproxy.meta.base import MetadataStore
from regproxy.oci import Digest

log = logging.getLogger(__name__)

# Flush early when this many distinct manifests were pulled within one interval.
MAX_PENDING = 10_000


class PullRecorder:
    def __init__(self, meta: MetadataStore, interval: float) -> None:
        self.meta = meta
        self.interval = interval
        self._pending: dict[tuple[str, Digest], float] = {}
        self._lock = asyncio.Lock()
        self._early: asyncio.Task[None] | None = None

    def record(self, repo: str, digest: Digest, now: float | None = None) -> None:
        """Note a pull (no I/O): the latest time per manifest is written at the next flush."""
        self._pending[(repo, digest)] = time.time() if now is None else now
        if len(self._pending) >= MAX_PENDING and self._early is None:
            self._early = asyncio.get_running_loop().create_task(self._flush_early())

    def pending(self, repo: str, digest: Digest) -> float | None:
        return self._pending.get((repo, digest))

    async def flush(self) -> int:
        """Write every pull noted so far in one transaction; returns how many manifests."""
        async with self._lock:
            batch, self._pending = self._pending, {}
            if not batch:
                return 0
            try:
                await self.meta.record_pulls([(r, d, at) for (r, d), at in batch.items()])
            except BaseException:
                # Keep them for the next flush (newer pulls noted meanwhile win).
                for key, at in batch.items():
                    self._pending[key] = max(at, self._pending.get(key, at))
                raise
            return len(batch)

    async def _flush_early(self) -> None:
        try:
            await self.flush()
        except Exception:
            log.exception("writing pull times failed; trying again at the next flush")
        finally:
            self._early = None

    async def run(self) -> None:
        """Flush every ``interval`` seconds until cancelled."""
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.flush()
            except Exception:
                log.exception("writing pull times failed; trying again at the next flush")

    async def close(self) -> None:
        if self._early is not None:
            await asyncio.gather(self._early, return_exceptions=True)
        await self.flush()


PULLS = web.AppKey("pulls", PullRecorder)
