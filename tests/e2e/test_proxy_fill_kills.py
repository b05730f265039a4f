"""The pull-through cache killed mid-fill, three times, then left to finish.

A scripted upstream (tests/proxy/fakeupstream.py, served from this process on a loopback
port) stalls the blob at 25 %, 50 % and 75 %; each time, once the spool holds the bytes
sent, ``regproxy serve`` gets SIGKILL and is started again on the same data directory, and
two clients pull again. Each restart continues from the spool (``Range``), so the upstream
sends the blob's bytes once over all the phases; the spool never holds more than the one
resumable partial, the uploads of killed fills are cancelled, and after the pull that
completes, the spool and the upload area are empty and the blob is byte-exact.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.e2e.procs import free_port, regproxy
from tests.proxy.fakeupstream import SEND_CHUNK, FakeUpstream

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio]

MiB = 1 << 20
SIZE = 24 * MiB
REPO = "lib/big"


def files_in(path: Path) -> dict[str, int]:
    if not path.is_dir():
        return {}
    return {p.name: p.stat().st_size for p in path.iterdir()}


async def wait_for_spool(spool: Path, size: int) -> None:
    async with asyncio.timeout(60):
        while not any(  # noqa: ASYNC110 - files another process writes
            n.endswith(".partial") and s >= size for n, s in files_in(spool).items()
        ):
            await asyncio.sleep(0.02)


async def pull(session: aiohttp.ClientSession, url: str) -> bytes:
    async with session.get(url) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.read()


async def test_fill_killed_three_times_resumes(tmp_path: Path) -> None:
    fake = FakeUpstream()
    data = os.urandom(SIZE)
    digest = fake.add_blob(REPO, data)
    runner = web.AppRunner(fake.app())
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    fake.base_url = None
    # A killed process's fill lease blocks the next one until it expires: the shortest
    # lease allowed (renewed every second) rather than the default minute per phase.
    config = f'[upstreams."fake"]\nurl = "http://127.0.0.1:{port}"\n[cluster]\nlease_ttl = 3\n'
    data_dir = tmp_path / "data"
    spool, uploads = data_dir / "spool", data_dir / "blobs" / "uploads"
    url_path = f"/v2/fake/{REPO}/blobs/{digest}"
    stalls = []
    try:
        async with aiohttp.ClientSession() as session:
            for phase, stop_at in enumerate((SIZE // 4, SIZE // 2, 3 * SIZE // 4)):
                fake.slow, fake.slow_first = {digest}, stop_at
                fake.release = asyncio.Event()  # the stalled answer of each phase waits on its own
                stalls.append(fake.release)
                async with regproxy(
                    tmp_path / f"run-{phase}", data_dir=data_dir, config=config
                ) as server:
                    # Start-up kept the one resumable partial and cancelled the killed fill's
                    # upload: nothing else is left of the earlier phases.
                    partials = [n for n in files_in(spool) if n.endswith(".partial")]
                    assert len(files_in(spool)) == len(partials) <= 1, files_in(spool)
                    assert files_in(uploads) == {}
                    pulls = [
                        asyncio.create_task(pull(session, server.url + url_path)) for _ in range(2)
                    ]
                    await wait_for_spool(spool, stop_at)
                    assert await server.kill() == -9
                    for task in pulls:
                        with contextlib.suppress(aiohttp.ClientError):
                            await task
                print(f"phase {phase}: upstream sent {fake.blob_bytes()} bytes so far")

            fake.slow = set()
            async with regproxy(tmp_path / "run-last", data_dir=data_dir, config=config) as server:
                bodies = await asyncio.gather(
                    *(pull(session, server.url + url_path) for _ in range(2))
                )
                assert bodies == [data, data]
                sent = fake.blob_bytes()
                # (a stalled answer is counted by status only once it ends: look at requests)
                ranged = [s.headers["Range"] for s in fake.seen if "Range" in s.headers]
                # Committed: the next pull comes from storage, and the spool is gone.
                async with asyncio.timeout(30):
                    while files_in(spool) or files_in(uploads):  # noqa: ASYNC110
                        await asyncio.sleep(0.05)
                assert await pull(session, server.url + url_path) == data
        print(f"upstream bytes over the phases: {sent} = {sent / SIZE:.2f} x the blob")
        # every restart continued where the last one stopped
        assert ranged == [f"bytes={n * SIZE // 4}-" for n in (1, 2, 3)]
        assert sent <= SIZE + 3 * SEND_CHUNK
        assert fake.blob_bytes() == sent  # the last pull was served from storage
    finally:
        for stall in stalls:
            stall.set()
        await runner.cleanup()
