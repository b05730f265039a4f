"""When manifests were last pulled, recorded without a write per request.

Retention keeps tags pulled within a window and cache eviction drops the least recently
pulled images first, so both need pull times; but a registry serves far more manifest HEADs
and GETs than its database should take UPDATEs (Harbor's "touch on every HEAD" overloaded its
database). So pulls are noted in memory, one entry per (repository, manifest), and written in
batches, one transaction each, at most once per manifest per ``interval`` seconds:

- a manifest not written within the last ``interval`` (a cold image, pulled for the first
  time in a while) goes out in the next batch, within about a second, so that another
  process's eviction sees it in use before it chooses it;
- a manifest pulled again and again (a hot tag) is written once per ``interval``.

``flush()`` writes everything noted (GC passes call it first; so does shutdown). A crash loses
at most one interval of pull times, which only makes content look a little older to GC.
"""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import web

from regproxy.meta.base import MetadataStore
from regproxy.oci import Digest

log = logging.getLogger(__name__)

# Seconds between batches (each writes only the manifests due, if any).
TICK = 1.0
# Write at once when this many distinct manifests wait.
MAX_PENDING = 10_000

Key = tuple[str, Digest]


class PullRecorder:
    def __init__(self, meta: MetadataStore, interval: float) -> None:
        self.meta = meta
        self.interval = interval
        self._pending: dict[Key, float] = {}
        # When each manifest was last written (monotonic), for those written within interval.
        self._written: dict[Key, float] = {}
        self._lock = asyncio.Lock()
        self._early: asyncio.Task[None] | None = None

    def record(self, repo: str, digest: Digest, now: float | None = None) -> None:
        """Note a pull (no I/O); the latest time per manifest is written in a later batch."""
        self._pending[(repo, digest)] = time.time() if now is None else now
        if len(self._pending) >= MAX_PENDING and self._early is None:
            self._early = asyncio.get_running_loop().create_task(self._flush_early())

    async def flush(self) -> int:
        """Write every pull noted so far in one transaction; returns how many manifests."""
        return await self._write(everything=True)

    async def _write(self, *, everything: bool) -> int:
        async with self._lock:
            now = time.monotonic()
            self._written = {k: at for k, at in self._written.items() if now - at < self.interval}
            due = {
                key: at
                for key, at in self._pending.items()
                if everything or key not in self._written
            }
            if not due:
                return 0
            for key in due:
                del self._pending[key]
            try:
                await self.meta.record_pulls([(r, d, at) for (r, d), at in due.items()])
            except BaseException:
                # Keep them for the next batch (newer pulls noted meanwhile win).
                for key, at in due.items():
                    self._pending[key] = max(at, self._pending.get(key, at))
                raise
            self._written.update((key, now) for key in due)
            return len(due)

    async def _flush_early(self) -> None:
        try:
            await self.flush()
        except Exception:
            log.exception("writing pull times failed; trying again in the next batch")
        finally:
            self._early = None

    async def run(self) -> None:
        """Write the pulls that are due every ``TICK`` seconds until cancelled."""
        while True:
            await asyncio.sleep(min(TICK, self.interval))
            try:
                await self._write(everything=False)
            except Exception:
                log.exception("writing pull times failed; trying again in the next batch")

    async def close(self) -> None:
        if self._early is not None:
            await asyncio.gather(self._early, return_exceptions=True)
        await self.flush()


PULLS = web.AppKey("pulls", PullRecorder)
