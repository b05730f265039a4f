"""Re-chunking byte streams into pieces big enough to hash and write efficiently."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator

CHUNK_SIZE = 1 << 20


async def rechunk(iterable: AsyncIterable[bytes], size: int = CHUNK_SIZE) -> AsyncIterator[bytes]:
    """The same bytes in pieces of about ``size`` (the last may be shorter)."""
    pieces: list[bytes] = []
    buffered = 0
    async for data in iterable:
        if not pieces and len(data) >= size:
            yield data
            continue
        pieces.append(data)
        buffered += len(data)
        if buffered >= size:
            yield b"".join(pieces)  # one copy, where bytearray += then bytes() makes two
            pieces.clear()
            buffered = 0
    if pieces:
        yield b"".join(pieces)
