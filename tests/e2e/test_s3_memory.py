"""Memory on S3 storage: 1 GiB through ``regproxy serve`` grows its peak RSS (VmHWM) by less
than three parts plus 64 MiB: an upload holds one part buffering and one in flight.

The blob is generated on the fly (never held whole on either side): one chunked push (POST,
one streamed PATCH, PUT) and one streamed pull, against a moto server on 127.0.0.1.
"""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from regproxy.config import S3Config
from tests.e2e.bigblob import Content, MiB, pull_digest, push_chunked
from tests.e2e.procs import proc_status_kib, regproxy
from tests.s3fixtures import S3, s3, shared_moto  # noqa: F401

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio]

BLOB_SIZE = 1 << 30
WARMUP_SIZE = 48 * MiB
PART_SIZE = S3Config().part_size  # the default
MAX_GROWTH_KIB = (3 * PART_SIZE + 64 * MiB) // 1024


async def test_1gib_through_s3_keeps_peak_rss_flat(tmp_path: Path, s3: S3) -> None:  # noqa: F811
    config = s3.toml(part_size=PART_SIZE, max_attempts=4, read_timeout=60.0)
    timeout = aiohttp.ClientTimeout(total=600)
    async with (
        regproxy(tmp_path / "regproxy", config=config) as server,
        aiohttp.ClientSession(timeout=timeout) as session,
    ):
        started = proc_status_kib(server.pid, "VmHWM")
        warmup = Content(WARMUP_SIZE // MiB)
        digest = await push_chunked(session, server, "e2e/warmup", warmup)
        assert await pull_digest(session, server, "e2e/warmup", digest) == (digest, warmup.size)
        baseline = proc_status_kib(server.pid, "VmHWM")

        big = Content(BLOB_SIZE // MiB)
        digest = await push_chunked(session, server, "e2e/big", big)
        after_push = proc_status_kib(server.pid, "VmHWM")
        assert await pull_digest(session, server, "e2e/big", digest) == (digest, BLOB_SIZE)
        after_pull = proc_status_kib(server.pid, "VmHWM")

    figures = (
        f"regproxy on S3, part size {PART_SIZE // MiB} MiB: VmHWM at start {started} KiB,"
        f" after a {WARMUP_SIZE // MiB} MiB warm-up {baseline} KiB,"
        f" after a 1 GiB push {after_push} KiB, after a 1 GiB pull {after_pull} KiB"
        f" (growth {after_pull - baseline} KiB, limit {MAX_GROWTH_KIB} KiB)"
    )
    print(figures)
    assert after_pull - baseline < MAX_GROWTH_KIB, figures
