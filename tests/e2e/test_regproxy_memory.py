"""Memory: a 1 GiB blob goes through ``regproxy serve`` without growing its peak RSS.

The blob is streamed from a generator (never held in memory on either side), pushed twice
(POST + one streamed PATCH + PUT, and a monolithic POST ?digest=) and pulled back once; the
server's peak RSS (VmHWM) after a warm-up must grow by less than 100 MiB through all of it.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator

import aiohttp
import pytest

from tests.e2e.procs import RegproxyProcess, proc_status_kib

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio]

MiB = 1 << 20
BLOB_SIZE = 1 << 30
WARMUP_SIZE = 64 * MiB
MAX_GROWTH_KIB = 100 * 1024


class Content:
    """``count`` MiB: the same random MiB over and over, then a last MiB of its own."""

    def __init__(self, count: int, block: bytes, last: bytes) -> None:
        self.count = count
        self.block = block
        self.last = last
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
            if len(chunk) >= MiB:
                await asyncio.to_thread(hasher.update, chunk)
            else:
                hasher.update(chunk)
    return "sha256:" + hasher.hexdigest(), size


async def test_1gib_blob_keeps_peak_rss_flat(regproxy_server: RegproxyProcess) -> None:
    server = regproxy_server
    block = os.urandom(MiB)
    warmup = Content(WARMUP_SIZE // MiB, block, os.urandom(MiB))
    chunked = Content(BLOB_SIZE // MiB, block, os.urandom(MiB))
    monolithic = Content(BLOB_SIZE // MiB, block, os.urandom(MiB))
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        # Warm up every path (thread pool, buffers, sqlite, sendfile) before the baseline.
        for push in (push_chunked, push_monolithic):
            digest = await push(session, server, "e2e/warmup", warmup)
            assert await pull_digest(session, server, "e2e/warmup", digest) == (
                digest,
                warmup.size,
            )
        baseline = peak_rss_kib(server)

        chunked_digest = await push_chunked(session, server, "e2e/big", chunked)
        after_chunked = peak_rss_kib(server)
        monolithic_digest = await push_monolithic(session, server, "e2e/big", monolithic)
        after_monolithic = peak_rss_kib(server)
        pulled = await pull_digest(session, server, "e2e/big", chunked_digest)
        after_pull = peak_rss_kib(server)
        async with session.head(f"{server.url}/v2/e2e/big/blobs/{monolithic_digest}") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Length"] == str(BLOB_SIZE)

    figures = (
        f"regproxy VmHWM: baseline {baseline} KiB, after 1 GiB chunked push {after_chunked} KiB,"
        f" after 1 GiB monolithic push {after_monolithic} KiB, after 1 GiB pull {after_pull} KiB"
        f" (growth {after_pull - baseline} KiB)"
    )
    print(figures)
    assert pulled == (chunked_digest, BLOB_SIZE)
    assert monolithic_digest != chunked_digest
    assert after_pull - baseline < MAX_GROWTH_KIB, figures
