"""Re-chunking byte streams into pieces big enough to hash and write efficiently."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import StreamReader

CHUNK_SIZE = 1 << 20


async def rechunk(stream: StreamReader, size: int = CHUNK_SIZE) -> AsyncIterator[bytes]:
    """The stream's bytes in pieces of about ``size`` (the last may be shorter)."""
    buffer = bytearray()
    while True:
        data = await stream.readany()
        if not data:
            break
        if not buffer and len(data) >= size:
            yield data
            continue
        buffer += data
        if len(buffer) >= size:
            yield bytes(buffer)
            buffer.clear()
    if buffer:
        yield bytes(buffer)
