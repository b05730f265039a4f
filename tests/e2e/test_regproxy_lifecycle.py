"""Process lifecycle of ``regproxy serve``: SIGTERM drains in-flight requests, abandoned
uploads are purged, and configuration errors stop start-up with a message naming the key."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.e2e.procs import regproxy, regproxy_argv, regproxy_env, run

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio]

KiB = 1 << 10
MiB = 1 << 20
SHUTDOWN_TIMEOUT = 10.0


async def connection_refused(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:  # accepted by the kernel as the listener closed
        return False
    writer.close()
    return False


async def test_sigterm_drains_in_flight_request(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    pieces = [os.urandom(64 * KiB) for _ in range(20)]
    body = b"".join(pieces)
    body_started = asyncio.Event()

    async def slow_body() -> AsyncIterator[bytes]:
        for piece in pieces:  # 20 x 0.1 s: about two seconds
            yield piece
            body_started.set()
            await asyncio.sleep(0.1)

    env = {"REGPROXY_SHUTDOWN_TIMEOUT": str(SHUTDOWN_TIMEOUT)}
    async with aiohttp.ClientSession() as session:
        async with regproxy(tmp_path / "serve", data_dir=data_dir, env=env) as server:
            async with session.post(f"{server.url}/v2/e2e/drain/blobs/uploads/") as resp:
                assert resp.status == 202, await resp.text()
                location = resp.headers["Location"]

            async def patch() -> tuple[int, str]:
                async with session.patch(
                    f"{server.url}{location}",
                    data=slow_body(),
                    headers={"Content-Length": str(len(body))},
                ) as resp:
                    return resp.status, resp.headers.get("Range", "")

            in_flight = asyncio.create_task(patch())
            await asyncio.wait_for(body_started.wait(), 5)
            await asyncio.sleep(0.3)
            os.kill(server.pid, signal.SIGTERM)
            signalled = time.monotonic()

            # The listener goes at once, while the slow request is still being served.
            deadline = signalled + 1.5
            while not await connection_refused(server.port):
                assert time.monotonic() < deadline, "new connections still accepted"
                await asyncio.sleep(0.05)
            assert not in_flight.done(), "the slow request ended before the listener closed"

            assert await asyncio.wait_for(in_flight, SHUTDOWN_TIMEOUT) == (
                202,
                f"0-{len(body) - 1}",
            )
            rc = await asyncio.wait_for(server.process.proc.wait(), SHUTDOWN_TIMEOUT)
            elapsed = time.monotonic() - signalled
            assert rc == 0, server.log_tail()
            assert elapsed < SHUTDOWN_TIMEOUT, f"exit took {elapsed:.1f}s"
            assert await connection_refused(server.port)

        # What the drained request wrote was recorded: the upload goes on after a restart.
        async with regproxy(tmp_path / "again", data_dir=data_dir) as server:
            async with session.get(f"{server.url}{location}") as resp:
                assert resp.status == 204, await resp.text()
                assert resp.headers["Range"] == f"0-{len(body) - 1}"
            digest = "sha256:" + hashlib.sha256(body).hexdigest()
            async with session.put(f"{server.url}{location}", params={"digest": digest}) as resp:
                assert resp.status == 201, await resp.text()


async def test_abandoned_upload_is_purged(tmp_path: Path) -> None:
    env = {"REGPROXY_UPLOADS_MAX_AGE": "1", "REGPROXY_UPLOADS_PURGE_INTERVAL": "0.5"}
    async with (
        regproxy(tmp_path / "serve", env=env) as server,
        aiohttp.ClientSession() as session,
    ):
        uploads = server.data_dir / "blobs" / "uploads"

        async def start(data: bytes) -> tuple[str, Path]:
            async with session.post(f"{server.url}/v2/e2e/purge/blobs/uploads/") as resp:
                assert resp.status == 202, await resp.text()
                location, upload_id = resp.headers["Location"], resp.headers["Docker-Upload-UUID"]
            async with session.patch(f"{server.url}{location}", data=data) as resp:
                assert resp.status == 202, await resp.text()
                return resp.headers["Location"], uploads / upload_id

        async def status(location: str) -> int:
            async with session.get(f"{server.url}{location}") as resp:
                return resp.status

        started = time.monotonic()  # the abandoned upload was last touched after this
        abandoned, abandoned_file = await start(os.urandom(MiB))
        kept_data = bytearray(os.urandom(KiB))
        kept, kept_file = await start(bytes(kept_data))
        assert abandoned_file.stat().st_size == MiB
        while await status(abandoned) != 404:
            assert time.monotonic() - started < 10, "the abandoned upload was not purged"
            # the other upload is in use: a chunk every 0.25 s keeps it well under max_age
            chunk = os.urandom(KiB)
            async with session.patch(f"{server.url}{kept}", data=chunk) as resp:
                assert resp.status == 202, await resp.text()
            kept_data += chunk
            await asyncio.sleep(0.25)
        assert time.monotonic() - started >= 1.0, "purged before it was max_age old"
        async with session.get(f"{server.url}{abandoned}") as resp:
            assert (await resp.json())["errors"][0]["code"] == "BLOB_UPLOAD_UNKNOWN"
        assert not abandoned_file.exists()

        assert await status(kept) == 204
        assert kept_file.stat().st_size == len(kept_data)
        digest = "sha256:" + hashlib.sha256(kept_data).hexdigest()
        async with session.put(f"{server.url}{kept}", params={"digest": digest}) as resp:
            assert resp.status == 201, await resp.text()
        assert list(uploads.iterdir()) == []


async def start_expecting_failure(
    tmp_path: Path, *, env: dict[str, str] | None = None, config: str | None = None
) -> str:
    """Start ``regproxy serve`` with a broken configuration; it must exit non-zero at once
    with one line on stderr, which is returned."""
    config_path = None
    if config is not None:
        config_path = tmp_path / "config.toml"
        config_path.write_text(config)
    argv = regproxy_argv(5000, tmp_path / "data", config_path)
    started = time.monotonic()
    rc, out, err = await run(argv, env=regproxy_env(env), timeout=15)
    elapsed = time.monotonic() - started
    assert rc not in (0, -9), f"exit {rc}\n{err}"
    assert elapsed < 5, f"took {elapsed:.1f}s to fail"
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert not (tmp_path / "data").exists(), "nothing is created before the config is valid"
    return lines[0]


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ("log_level = 'info'\nbogus_key = 1\n", "bogus_key"),
        ("[uploads]\nmax_age = 60\npurge_intervall = 5\n", "uploads.purge_intervall"),
        ("[storage]\nbackend = 'filesystem'\n[storag]\nfsync = false\n", "storag"),
    ],
)
async def test_unknown_key_in_config_file(tmp_path: Path, config: str, key: str) -> None:
    line = await start_expecting_failure(tmp_path, config=config)
    assert key in line


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"REGPROXY_NOT_A_KEY": "1"}, "REGPROXY_NOT_A_KEY"),
        ({"REGPROXY_UPLOADS_MAXAGE": "1"}, "REGPROXY_UPLOADS_MAXAGE"),
        ({"REGPROXY_UPLOADS_MAX_AGE": "soon"}, "REGPROXY_UPLOADS_MAX_AGE"),
    ],
)
async def test_bad_environment_variable(tmp_path: Path, env: dict[str, str], key: str) -> None:
    line = await start_expecting_failure(tmp_path, env=env)
    assert key in line
