"""Log formats: one JSON object per line, or readable text; TLS probes condensed."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from regproxy.logs import ACCESS_FIELDS, TlsProbeFilter, configure_logging


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    server = logging.getLogger("aiohttp.server")
    filters = list(server.filters)
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    server.filters[:] = filters


def _emit(log_format: str, level: str = "info") -> list[str]:
    out = io.StringIO()
    configure_logging(level, log_format, out)
    logging.getLogger("regproxy.test").warning("upstream %s: %s", "docker.io", "answered 429")
    fields = {"method": "GET", "path": "/v2/x/blobs/y", "status": 200, "bytes": 42, "user": None}
    logging.getLogger("regproxy.access").info(
        "GET /v2/x/blobs/y 200", extra={ACCESS_FIELDS: fields}
    )
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        logging.getLogger("regproxy.test").exception("it failed")
    return out.getvalue().splitlines()


def test_json_lines_parse(restore_logging: None) -> None:
    lines = _emit("json")
    docs = [json.loads(line) for line in lines]  # every line, tracebacks included, is one object
    assert len(docs) == 3
    assert (
        docs[0]["level"] == "warning" and docs[0]["message"] == "upstream docker.io: answered 429"
    )
    assert docs[1]["logger"] == "regproxy.access" and docs[1]["bytes"] == 42
    assert docs[1]["user"] is None
    assert "ValueError: boom" in docs[2]["exception"]
    assert all(doc["time"].endswith("Z") for doc in docs)


def test_text_is_readable(restore_logging: None) -> None:
    lines = _emit("text")
    assert lines[0].endswith("WARNING regproxy.test upstream docker.io: answered 429")
    assert lines[1].endswith("INFO regproxy.access GET /v2/x/blobs/y 200 bytes=42")
    assert "Traceback (most recent call last):" in lines[3]


def _server_error(exc: Exception) -> logging.LogRecord:
    return logging.LogRecord(
        "aiohttp.server",
        logging.ERROR,
        __file__,
        1,
        "Error handling request from %s",
        ("10.0.0.1",),
        (type(exc), exc, None),
    )


def test_tls_probe_becomes_one_debug_line() -> None:
    from aiohttp.http_exceptions import BadHttpMethod

    logger = logging.getLogger("aiohttp.server")
    old = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        probe = _server_error(BadHttpMethod("\x16\x03\x01\x02\x00"))
        assert TlsProbeFilter().filter(probe)
        garbage = _server_error(BadHttpMethod("GARBAGE"))
        assert TlsProbeFilter().filter(garbage)
    finally:
        logger.setLevel(old)
    assert probe.levelno == logging.DEBUG and probe.exc_info is None
    assert probe.getMessage().startswith("TLS handshake from 10.0.0.1")
    assert garbage.levelno == logging.ERROR and garbage.exc_info is not None  # left alone


class _CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.flushes = 0
        self.flushed = ""

    def flush(self) -> None:
        self.flushes += 1
        self.flushed = self.getvalue()


def test_lines_on_the_loop_are_flushed_once_per_iteration(restore_logging: None) -> None:
    import asyncio

    from regproxy.logs import LoopFlushedHandler

    stream = _CountingStream()
    handler = LoopFlushedHandler(stream)
    log = logging.getLogger("regproxy.test.flush")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("before the loop")
        assert (stream.flushes, stream.flushed) == (1, "before the loop\n")

        async def burst() -> None:
            for n in range(50):
                log.warning("line %d", n)
            assert stream.flushes == 1  # queued, not yet written
            await asyncio.sleep(0)  # the next iteration
            assert stream.flushes == 2 and stream.flushed.endswith("line 49\n")
            log.warning("again")
            await asyncio.sleep(0)
            assert stream.flushes == 3 and stream.flushed.endswith("again\n")

        asyncio.run(burst())
        asyncio.run(_another(log, stream))
    finally:
        log.removeHandler(handler)
        log.propagate = True


async def _another(log: logging.Logger, stream: _CountingStream) -> None:
    """A second event loop in the same process flushes too (the first one's queued flush,
    if it never ran, does not hold it up)."""
    import asyncio

    before = stream.flushes
    log.warning("on a new loop")
    await asyncio.sleep(0)
    assert stream.flushes == before + 1 and stream.flushed.endswith("on a new loop\n")
