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
from aiohttp.http_exceptions import HttpProcessingError

from regproxy.api.middleware import IN_FLIGHT
from regproxy.app import create_app
from regproxy.config import Config

log = logging.getLogger(__name__)
# aiohttp's connection-level logger: where it reports requests it could not even parse.
SERVER_LOGGER = "aiohttp.server"


class MalformedRequestFilter(logging.Filter):
    """One line at WARNING for a request aiohttp could not parse, instead of an ERROR with
    a traceback of aiohttp's parser (garbage bytes, a bad request line, HTTP version or
    header). There is nothing to debug in regproxy: the client sent something broken and
    got its 400. What aiohttp logs lower (DEBUG: a first "method" that is no HTTP method,
    such as TLS sent to the HTTP port) stays that low."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            remote = record.args[0] if isinstance(record.args, tuple) and record.args else "-"
            record.msg, record.args = "bad request from %s: %s", (remote, _one_line(exc))
            record.exc_info = record.exc_text = None
            if record.levelno > logging.WARNING:
                record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def _one_line(exc: HttpProcessingError) -> str:
    text = " ".join(str(exc.message).split()).rstrip(" ^")  # the caret under the bad byte
    return f"{exc.code} {text[:200]}"


async def run(config: Config, **handler_options: Any) -> None:
    """Serve ``config.listen`` until a signal; ``handler_options`` go to aiohttp's runner."""
    app = create_app(config)
    runner = web.AppRunner(app, shutdown_timeout=config.shutdown_timeout, **handler_options)
    malformed = MalformedRequestFilter()
    logging.getLogger(SERVER_LOGGER).addFilter(malformed)
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
        logging.getLogger(SERVER_LOGGER).removeFilter(malformed)
