"""Running the app: listen until SIGTERM or SIGINT, then drain and clean up.

aiohttp's own graceful shutdown stops reading from every connection before it waits for the
handlers, so a request whose body is still arriving (a blob upload) could never finish and
would be cut off after ``shutdown_timeout``. Here the listener closes first, the requests in
flight get up to ``shutdown_timeout`` seconds to finish, bodies included, and only then does
aiohttp close the connections (still letting responses being sent finish).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from typing import Any

from aiohttp import web

from regproxy import __version__
from regproxy.api.middleware import IN_FLIGHT, AccessLogger
from regproxy.api.ops import READINESS, metrics_app
from regproxy.app import create_app
from regproxy.auth.service import AUTH
from regproxy.config import Config
from regproxy.preflight import StartupError, check_data_dirs

log = logging.getLogger(__name__)


async def start_site(site: web.TCPSite, listen: str) -> None:
    """Bind and listen; a port in use (or not ours to bind) is a one-line StartupError."""
    try:
        await site.start()
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)  # asyncio's text is long
        raise StartupError(f"cannot listen on {listen}: {reason}") from exc


async def start_metrics_listener(config: Config, app: web.Application) -> web.AppRunner | None:
    """``metrics.listen``: a second site in this process serving only /metrics, no auth."""
    if not (config.metrics.enabled and config.metrics.listen):
        return None
    runner = web.AppRunner(metrics_app(app), access_log=None)
    await runner.setup()
    host, _, port = config.metrics.listen.rpartition(":")
    try:
        await start_site(web.TCPSite(runner, host.strip("[]"), int(port)), config.metrics.listen)
    except StartupError:
        await runner.cleanup()
        raise
    return runner


def started_message(config: Config, app: web.Application) -> str:
    """What is running: address, data, storage, upstreams, auth mode, metrics."""
    upstreams = ", ".join(f"{name}={up.url}" for name, up in config.upstreams.items()) or "none"
    mode = "open (no users; loopback only)" if app[AUTH].policy.open_access else "token"
    metrics = "off"
    if config.metrics.enabled:
        metrics = f"http://{config.metrics.listen}/metrics" if config.metrics.listen else "/metrics"
    return (
        f"regproxy {__version__} listening on http://{config.listen}; data in"
        f" {config.data_path.resolve()}; blobs: {config.storage.backend};"
        f" upstreams: {upstreams}; auth: {mode}; metrics: {metrics}"
    )


async def run(config: Config, **handler_options: Any) -> None:
    """Serve ``config.listen`` until a signal; ``handler_options`` go to aiohttp's runner.

    A port in use or an unusable data directory raises ``StartupError`` (one line).
    """
    check_data_dirs(config)
    app = create_app(config)
    handler_options.setdefault("access_log_class", AccessLogger)  # it records HTTP metrics
    runner = web.AppRunner(app, shutdown_timeout=config.shutdown_timeout, **handler_options)
    await runner.setup()
    metrics_runner: web.AppRunner | None = None
    try:
        site = web.TCPSite(runner, config.host, config.port)
        await start_site(site, config.listen)
        metrics_runner = await start_metrics_listener(config, app)
        log.info("%s", started_message(config, app))  # bound, storage open
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()

        app[READINESS].draining = True  # /readyz answers 503 from here on
        await site.stop()  # no new connections from here on
        in_flight = app[IN_FLIGHT]
        if in_flight.count:
            log.info("stopping: waiting for %d request(s) in flight", in_flight.count)
        try:
            async with asyncio.timeout(config.shutdown_timeout):
                await in_flight.wait_idle()
        except TimeoutError:
            log.warning(
                "stopping: %d request(s) still running after %ss are cut off",
                in_flight.count,
                config.shutdown_timeout,
            )
    finally:
        if metrics_runner is not None:
            await metrics_runner.cleanup()
        await runner.cleanup()
