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
import signal
from typing import Any

from aiohttp import web

from regproxy.api.middleware import IN_FLIGHT
from regproxy.app import create_app
from regproxy.config import Config

log = logging.getLogger(__name__)


async def run(config: Config, **handler_options: Any) -> None:
    """Serve ``config.listen`` until a signal; ``handler_options`` go to aiohttp's runner."""
    app = create_app(config)
    runner = web.AppRunner(app, shutdown_timeout=config.shutdown_timeout, **handler_options)
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.host, config.port)
        await site.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()

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
        await runner.cleanup()
