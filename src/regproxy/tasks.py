"""Background sweeps, started and stopped with the application."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import suppress

from aiohttp import web

from regproxy.api.keys import CONFIG
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


async def background_tasks(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    task = asyncio.create_task(
        _purge_uploads(
            app[HOSTED],
            config.uploads.max_age,
            config.uploads.purge_interval,
            app[METRICS],
            config.uploads.lost_grace,
        )
    )
    yield
    task.cancel()
    with suppress(asyncio.CancelledError):
        await task
