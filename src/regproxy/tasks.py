"""Background sweeps, started and stopped with the application."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator
from contextlib import suppress

from aiohttp import web

from regproxy.api.keys import CONFIG
from regproxy.config import Config
from regproxy.lifecycle.eviction import EVICTOR, CacheEvictor
from regproxy.lifecycle.gc import run_pass
from regproxy.metrics import METRICS, Metrics
from regproxy.registry.hosted import HostedRegistry

log = logging.getLogger(__name__)

HOSTED = web.AppKey("hosted", HostedRegistry)


async def _purge_uploads(
    hosted: HostedRegistry,
    max_age: float,
    interval: float,
    metrics: Metrics,
    lost_grace: float = 600.0,
) -> None:
    while True:
        try:
            purged = await hosted.purge_stale_uploads(max_age)
            metrics.uploads_purged(purged)
            if purged:
                log.info("purged %d abandoned upload(s)", purged)
            # Also at start-up: rows a crash left behind whose bytes are gone.
            dropped = await hosted.reconcile_uploads(lost_grace)
            if dropped:
                log.info("dropped %d upload(s) whose stored bytes were gone", dropped)
        except Exception:
            log.exception("stale upload purge failed; trying again later")
        await asyncio.sleep(interval)


async def _collect_garbage(
    hosted: HostedRegistry, config: Config, evictor: CacheEvictor | None, metrics: Metrics
) -> None:
    """A GC pass every gc.interval seconds (other processes may run theirs meanwhile).

    The orphan sweep, which lists all of storage, comes along at most once per
    uploads.purge_interval: an orphan waits uploads.max_age anyway.
    """
    last_sweep = -math.inf
    while True:
        await asyncio.sleep(config.gc.interval)
        sweep = time.monotonic() - last_sweep >= config.uploads.purge_interval
        try:
            report = await run_pass(
                hosted.meta, hosted.storage, config, evictor=evictor, sweep=sweep
            )
            if sweep:
                last_sweep = time.monotonic()
            deleted = {
                "tag": len(report.tags),
                "cached_image": len(report.eviction.images),
                "manifest": len(report.manifests),
                "link": report.links,
                "blob": len(report.blobs) + len(report.eviction.blobs),
                "orphan": len(report.orphans.uploads) + len(report.orphans.blobs),
            }
            metrics.gc_finished(deleted, report.bytes_freed)
            if report.bytes_freed or report.manifests or report.tags:
                log.info("%s", report.summary())
        except Exception:
            log.exception("garbage collection failed; trying again later")


async def background_tasks(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    tasks = [
        asyncio.create_task(
            _purge_uploads(
                app[HOSTED],
                config.uploads.max_age,
                config.uploads.purge_interval,
                app[METRICS],
                config.uploads.lost_grace,
            )
        )
    ]
    if config.gc.interval > 0:
        tasks.append(
            asyncio.create_task(
                _collect_garbage(app[HOSTED], config, app.get(EVICTOR), app[METRICS])
            )
        )
    yield
    for task in tasks:
        task.cancel()
    for task in tasks:
        with suppress(asyncio.CancelledError):
            await task
