"""Memory: a 1 GiB blob goes through ``regproxy serve`` without growing its peak RSS.

The blob is streamed from a generator (never held in memory on either side), pushed twice
(POST + one streamed PATCH + PUT, and a monolithic POST ?digest=) and pulled back once; the
server's peak RSS (VmHWM) after a warm-up must grow by less than 100 MiB through all of it.
"""

from __future__ import annotations

import os

import aiohttp
import pytest

from tests.e2e.bigblob import (
    Content,
    MiB,
    peak_rss_kib,
    pull_digest,
    push_chunked,
    push_monolithic,
)
from tests.e2e.procs import RegproxyProcess

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio]

BLOB_SIZE = 1 << 30
WARMUP_SIZE = 64 * MiB
MAX_GROWTH_KIB = 100 * 1024


async def test_1gib_blob_keeps_peak_rss_flat(regproxy_server: RegproxyProcess) -> None:
    server = regproxy_server
    block = os.urandom(MiB)
    warmup = Content(WARMUP_SIZE // MiB, block)
    chunked = Content(BLOB_SIZE // MiB, block)
    monolithic = Content(BLOB_SIZE // MiB, block)
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
