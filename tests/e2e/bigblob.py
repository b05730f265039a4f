"""Pushing and pulling big blobs through a running regproxy without holding them in memory.

The memory tests (filesystem and S3) share these: the content is generated on the fly, and
every hash is computed off the event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator

import aiohttp

from tests.e2e.procs import RegproxyProcess, proc_status_kib

MiB = 1 << 20


class Content:
    """``count`` MiB: the same random MiB over and over, then a last MiB of its own."""

    def __init__(self, count: int, block: bytes | None = None) -> None:
        self.count = count
        self.block = block if block is not None else os.urandom(MiB)
        self.last = os.urandom(MiB)
        self.size = count * MiB

    async def chunks(self) -> AsyncIterator[bytes]:
        for _ in range(self.count - 1):
            yield self.block
        yield self.last

    def digest(self) -> str:
        hasher = hashlib.sha256()
        for _ in range(self.count - 1):
            hasher.update(self.block)
        hasher.update(self.last)
        return "sha256:" + hasher.hexdigest()


def peak_rss_kib(server: RegproxyProcess) -> int:
    return proc_status_kib(server.pid, "VmHWM")


async def push_chunked(
    session: aiohttp.ClientSession, server: RegproxyProcess, repo: str, content: Content
) -> str:
    """POST, one streamed PATCH of the whole content, PUT ?digest= without a body."""
    digest = await asyncio.to_thread(content.digest)
    async with session.post(f"{server.url}/v2/{repo}/blobs/uploads/") as resp:
        assert resp.status == 202, await resp.text()
        location = resp.headers["Location"]
    async with session.patch(
        f"{server.url}{location}",
        data=content.chunks(),
        headers={"Content-Type": "application/octet-stream"},
    ) as resp:
        assert resp.status == 202, await resp.text()
        assert resp.headers["Range"] == f"0-{content.size - 1}"
        location = resp.headers["Location"]
    async with session.put(f"{server.url}{location}", params={"digest": digest}) as resp:
        assert resp.status == 201, await resp.text()
        assert resp.headers["Docker-Content-Digest"] == digest
    return digest


async def push_monolithic(
    session: aiohttp.ClientSession, server: RegproxyProcess, repo: str, content: Content
) -> str:
    """POST ?digest= with the whole content streamed as the body (with a Content-Length)."""
    digest = await asyncio.to_thread(content.digest)
    async with session.post(
        f"{server.url}/v2/{repo}/blobs/uploads/",
        params={"digest": digest},
        data=content.chunks(),
        headers={"Content-Type": "application/octet-stream", "Content-Length": str(content.size)},
    ) as resp:
        assert resp.status == 201, await resp.text()
        assert resp.headers["Docker-Content-Digest"] == digest
    return digest


async def pull_digest(
    session: aiohttp.ClientSession, server: RegproxyProcess, repo: str, digest: str
) -> tuple[str, int]:
    """Stream a blob back; (sha256 digest, size) of what came."""
    hasher = hashlib.sha256()
    size = 0
    async with session.get(f"{server.url}/v2/{repo}/blobs/{digest}") as resp:
        assert resp.status == 200, await resp.text()
        async for chunk in resp.content.iter_chunked(4 * MiB):
            size += len(chunk)
            await asyncio.to_thread(hasher.update, chunk)
    return "sha256:" + hasher.hexdigest(), size
