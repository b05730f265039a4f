"""Memory on S3 storage: 1 GiB through ``regproxy serve`` grows its peak RSS (VmHWM) by less
than three parts plus 64 MiB: an upload holds one part buffering and one in flight.

The blob is generated on the fly (never held whole on either side): one chunked push (POST,
one streamed PATCH, PUT) and one streamed pull, against a moto server on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from regproxy.config import S3Config
from tests.e2e.procs import RegproxyProcess, proc_status_kib, regproxy
from tests.s3fixtures import S3, s3, shared_moto  # noqa: F401

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio]

MiB = 1 << 20
BLOB_SIZE = 1 << 30
WARMUP_SIZE = 48 * MiB
PART_SIZE = S3Config().part_size  # the default
MAX_GROWTH_KIB = (3 * PART_SIZE + 64 * MiB) // 1024


class Content:
    """``count`` MiB: one random MiB over and over, then a last MiB of its own."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.block = os.urandom(MiB)
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


async def push(
    session: aiohttp.ClientSession, server: RegproxyProcess, repo: str, content: Content
) -> str:
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
    return digest


async def pull(
    session: aiohttp.ClientSession, server: RegproxyProcess, repo: str, digest: str
) -> tuple[str, int]:
    hasher = hashlib.sha256()
    size = 0
    async with session.get(f"{server.url}/v2/{repo}/blobs/{digest}") as resp:
        assert resp.status == 200, await resp.text()
        async for chunk in resp.content.iter_chunked(4 * MiB):
            size += len(chunk)
            await asyncio.to_thread(hasher.update, chunk)
    return "sha256:" + hasher.hexdigest(), size


async def test_1gib_through_s3_keeps_peak_rss_flat(tmp_path: Path, s3: S3) -> None:  # noqa: F811
    config = s3.toml(part_size=PART_SIZE, max_attempts=4, read_timeout=60.0)
    timeout = aiohttp.ClientTimeout(total=600)
    async with (
        regproxy(tmp_path / "regproxy", config=config) as server,
        aiohttp.ClientSession(timeout=timeout) as session,
    ):
        started = proc_status_kib(server.pid, "VmHWM")
        warmup = Content(WARMUP_SIZE // MiB)
        digest = await push(session, server, "e2e/warmup", warmup)
        assert await pull(session, server, "e2e/warmup", digest) == (digest, warmup.size)
        baseline = proc_status_kib(server.pid, "VmHWM")

        big = Content(BLOB_SIZE // MiB)
        digest = await push(session, server, "e2e/big", big)
        after_push = proc_status_kib(server.pid, "VmHWM")
        assert await pull(session, server, "e2e/big", digest) == (digest, BLOB_SIZE)
        after_pull = proc_status_kib(server.pid, "VmHWM")

    figures = (
        f"regproxy on S3, part size {PART_SIZE // MiB} MiB: VmHWM at start {started} KiB,"
        f" after a {WARMUP_SIZE // MiB} MiB warm-up {baseline} KiB,"
        f" after a 1 GiB push {after_push} KiB, after a 1 GiB pull {after_pull} KiB"
        f" (growth {after_pull - baseline} KiB, limit {MAX_GROWTH_KIB} KiB)"
    )
    print(figures)
    assert after_pull - baseline < MAX_GROWTH_KIB, figures
