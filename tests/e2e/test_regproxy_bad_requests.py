"""Malformed requests on the wire (garbage bytes, a bad request line, a bad HTTP version, a
broken header) against ``regproxy serve``: each gets its 400 and one WARNING line in the log,
never an ERROR with a traceback."""

from __future__ import annotations

import asyncio
import json
import re

import pytest

from tests.e2e.procs import RegproxyProcess

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio]

# (request bytes, whether aiohttp reports it at WARNING). A first request with a method
# that is no HTTP method (non-HTTP traffic, TLS to the HTTP port) stays at DEBUG, as aiohttp
# logs it: scanners on the internet send that all day.
MALFORMED = [
    (b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\nGARBAGE \x00\x01\x02 NOT HTTP\r\n\r\n", False),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(32)) + b"\r\n\r\n", False),
    (b"G@T / HTTP/1.1\r\nHost: x\r\n\r\n", False),
    (b"GET /v2/ HTTP/9.9\r\nHost: x\r\n\r\n", True),
    (b"GET /v2/ HTTX/1.1\r\nHost: x\r\n\r\n", True),
    (b"GET /v2/\x7f HTTP/1.1\r\nHost: x\r\n\r\n", True),
    (b"GET /v2/ HTTP/1.1\r\nBad Header Name: x\r\n\r\n", True),
    (b"GET /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n", True),
    (b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 70_000 + b"\r\n\r\n", True),
]


async def _send(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(65536), 10)
    finally:
        writer.close()


async def test_malformed_requests_log_one_line_each(regproxy_server: RegproxyProcess) -> None:
    before = regproxy_server.log_path.read_text()
    for data, _ in MALFORMED:
        answer = await _send(regproxy_server.port, data)
        assert re.match(rb"HTTP/1\.[01] 4\d\d ", answer), (data[:50], answer[:200])
    await asyncio.sleep(0.5)  # let the log lines land
    logged = regproxy_server.log_path.read_text()[len(before) :]
    assert "Traceback" not in logged, logged
    records = [json.loads(line) for line in logged.splitlines()]  # e2e servers log JSON
    assert not [r for r in records if r["level"] == "error"], logged
    bad = [r for r in records if r["logger"] == "aiohttp.server"]
    assert len(bad) == sum(warned for _, warned in MALFORMED), logged
    assert all(r["level"] == "warning" for r in bad), logged
    assert all(r["message"].startswith("bad request from 127.0.0.1: ") for r in bad), logged
    assert all("exception" not in r and len(r["message"]) < 400 for r in bad), logged
    # and the server goes on serving
    answer = await _send(regproxy_server.port, b"GET /healthz HTTP/1.0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.0 200 OK")
