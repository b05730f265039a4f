"""One upstream fetch per blob, however many clients ask for it at once.

A ``Fill`` fetches a blob from upstream exactly once, in a task of its own, and tees the bytes
into storage (through the hosted registry, which verifies the digest before the blob becomes
visible) and into a local spool file. Every client of that blob, the first one included,
reads the spool from its own offset at its own pace, waiting for bytes still in flight. A
client that goes away does not disturb the fill; a fill that fails cuts every client off.

The last byte is held back until the digest is verified, so a corrupted or truncated fetch
never reaches a client as a complete body.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import suppress
from pathlib import Path
from typing import BinaryIO

from regproxy.oci import Digest

log = logging.getLogger(__name__)

READ_SIZE = 1 << 20

# Given the stream to store, fetch from upstream, store, and return once the blob is committed.
FetchAndStore = Callable[[Callable[[AsyncIterator[bytes]], AsyncIterator[bytes]]], Awaitable[None]]


class FillFailed(Exception):
    """The upstream fetch behind a fill broke; nothing was cached."""


class SpoolGone(Exception):
    """The fill ended before this reader opened its spool; read from storage instead."""


class Fill:
    def __init__(self, digest: Digest, spool_dir: Path) -> None:
        self.digest = digest
        self.spool = spool_dir / f"{uuid.uuid4()}.spool"
        self.size: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.written = 0
        self.repos: set[str] = set()
        self.done = False
        self.error: BaseException | None = None
        self._progress = asyncio.Event()

    def _notify(self) -> None:
        self._progress.set()
        self._progress = asyncio.Event()

    async def _wait(self) -> None:
        await self._progress.wait()

    def readable(self) -> int:
        """How many bytes a client may have: all once verified, else all but the last one."""
        if self.done and self.error is None:
            return self.written
        total = self.size.result() if self.size.done() and not self.size.exception() else None
        if total is not None and self.written >= total:
            return total - 1
        return self.written

    async def run(self, fetch: FetchAndStore) -> None:
        """Drive the fetch; ``fetch`` calls back with the stream to tee (see ``tee``)."""
        spool: BinaryIO | None = None
        try:
            spool = await asyncio.to_thread(open, self.spool, "xb", buffering=0)
            opened = spool

            async def tee(body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
                async for chunk in body:
                    await asyncio.to_thread(opened.write, chunk)
                    self.written += len(chunk)
                    self._notify()
                    yield chunk

            await fetch(tee)
        except BaseException as exc:
            self.error = exc
            if not self.size.done():
                self.size.set_exception(FillFailed(str(exc)))
            if not isinstance(exc, Exception):
                raise
        finally:
            self.done = True
            self._notify()
            if spool is not None:
                await asyncio.to_thread(spool.close)
            # Clients already reading keep their open descriptor; new ones go to storage.
            with suppress(OSError):
                await asyncio.to_thread(os.unlink, self.spool)

    def set_size(self, size: int) -> None:
        if not self.size.done():
            self.size.set_result(size)

    async def read(self, start: int, length: int) -> AsyncIterator[bytes]:
        """Bytes ``start .. start+length`` as the fill brings them in."""
        try:
            fd = await asyncio.to_thread(os.open, self.spool, os.O_RDONLY)
        except FileNotFoundError:
            if self.done and self.error is None:
                raise SpoolGone(str(self.digest)) from None
            raise FillFailed(f"fill of {self.digest} failed before the read began") from None
        try:
            position, end = start, start + length
            while position < end:
                available = min(self.readable(), end)
                if position < available:
                    want = min(available - position, READ_SIZE)
                    chunk = await asyncio.to_thread(os.pread, fd, want, position)
                    if not chunk:
                        raise FillFailed("spool shorter than announced")
                    position += len(chunk)
                    yield chunk
                elif self.error is not None:
                    raise FillFailed(f"upstream fetch of {self.digest} failed") from self.error
                elif self.done:
                    raise FillFailed(f"fill of {self.digest} ended at {self.written} bytes")
                else:
                    await self._wait()
        finally:
            await asyncio.to_thread(os.close, fd)
