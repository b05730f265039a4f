"""Crash safety of uploads: ``kill -9`` mid-PATCH, and a client that goes away mid-POST."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest

from tests.e2e.procs import RegproxyProcess, regproxy

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio]

MiB = 1 << 20


def sha256_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def uploads_dir(data_dir: Path) -> Path:
    return data_dir / "blobs" / "uploads"


async def wait_for(predicate: Callable[[], bool], seconds: float, what: str) -> None:
    """Poll ``predicate`` (a look at files the server writes) until true."""
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} after {seconds}s")
        await asyncio.sleep(0.02)


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return -1


async def error_code(resp: aiohttp.ClientResponse) -> str:
    body = await resp.json(content_type=None)
    return str(body["errors"][0]["code"])


async def test_kill_9_mid_patch_then_resume(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    first = os.urandom(16 * MiB)
    second = os.urandom(48 * MiB)
    whole = first + second
    digest = sha256_of(whole)
    sent_half = len(second) // 2
    release = asyncio.Event()

    async def stalled_body() -> AsyncIterator[bytes]:
        for offset in range(0, sent_half, MiB):
            yield second[offset : offset + MiB]
        await release.wait()  # the rest never comes: the server is killed meanwhile
        yield second[sent_half:]

    async with aiohttp.ClientSession() as session:
        async with regproxy(tmp_path / "before", data_dir=data_dir) as server:
            async with session.post(f"{server.url}/v2/e2e/crash/blobs/uploads/") as resp:
                assert resp.status == 202, await resp.text()
                location = resp.headers["Location"]
                upload_id = resp.headers["Docker-Upload-UUID"]
            upload_file = uploads_dir(data_dir) / upload_id
            async with session.patch(
                f"{server.url}{location}",
                data=first,
                headers={"Content-Range": f"0-{len(first) - 1}"},
            ) as resp:
                assert resp.status == 202, await resp.text()
                assert resp.headers["Range"] == f"0-{len(first) - 1}"

            patch = asyncio.create_task(
                session.patch(
                    f"{server.url}{location}",
                    data=stalled_body(),
                    headers={
                        "Content-Range": f"{len(first)}-{len(whole) - 1}",
                        "Content-Length": str(len(second)),
                    },
                )
            )
            # The server has written a good part of the second chunk, but not recorded it.
            await wait_for(
                lambda: file_size(upload_file) >= len(first) + sent_half // 2,
                20,
                "second chunk in the upload file",
            )
            assert await server.kill() == -9
            release.set()
            with pytest.raises(aiohttp.ClientError):
                (await asyncio.wait_for(patch, 10)).release()
        assert file_size(upload_file) > len(first), "the killed request left no partial bytes"

        async with regproxy(tmp_path / "after", data_dir=data_dir) as server:
            blob_url = f"{server.url}/v2/e2e/crash/blobs/{digest}"
            async with session.get(blob_url) as resp:
                assert resp.status == 404
                assert await error_code(resp) == "BLOB_UNKNOWN"
            async with session.head(blob_url) as resp:
                assert resp.status == 404

            async with session.get(f"{server.url}{location}") as resp:
                assert resp.status == 204, await resp.text()
                assert resp.headers["Range"] == f"0-{len(first) - 1}"
                assert resp.headers["Docker-Upload-UUID"] == upload_id

            # The bytes past the recorded offset do not count: continuing there is refused.
            partial = file_size(upload_file)
            async with session.patch(
                f"{server.url}{location}",
                data=b"x",
                headers={"Content-Range": f"{partial}-{partial}"},
            ) as resp:
                assert resp.status == 416, await resp.text()
                assert resp.headers["Range"] == f"0-{len(first) - 1}"

            async with session.patch(
                f"{server.url}{location}",
                data=second,
                headers={"Content-Range": f"{len(first)}-{len(whole) - 1}"},
            ) as resp:
                assert resp.status == 202, await resp.text()
                assert resp.headers["Range"] == f"0-{len(whole) - 1}"
                location = resp.headers["Location"]
            async with session.put(f"{server.url}{location}", params={"digest": digest}) as resp:
                assert resp.status == 201, await resp.text()
                assert resp.headers["Docker-Content-Digest"] == digest

            async with session.get(blob_url) as resp:
                assert resp.status == 200
                assert sha256_of(await resp.read()) == digest
            assert not upload_file.exists()


async def send_partial_then_drop(
    server: RegproxyProcess, target: str, declared: int, body: bytes, *, reset: bool
) -> None:
    """Send a request announcing ``declared`` body bytes, send ``body``, then go away."""
    _, writer = await asyncio.open_connection("127.0.0.1", server.port)
    head = (
        f"POST {target} HTTP/1.1\r\nHost: {server.host}\r\n"
        f"Content-Type: application/octet-stream\r\nContent-Length: {declared}\r\n\r\n"
    )
    writer.write(head.encode() + body)
    await writer.drain()
    upload_files = uploads_dir(server.data_dir)
    await wait_for(
        lambda: any(p.stat().st_size > 0 for p in upload_files.iterdir()),
        10,
        "first bytes stored",
    )
    if reset:  # RST instead of FIN
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


@pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
async def test_client_disconnect_mid_monolithic_post(
    regproxy_server: RegproxyProcess, reset: bool
) -> None:
    server = regproxy_server
    whole = os.urandom(8 * MiB)
    digest = sha256_of(whole)
    target = f"/v2/e2e/gone/blobs/uploads/?digest={digest}"
    await send_partial_then_drop(server, target, len(whole), whole[: 2 * MiB], reset=reset)

    upload_files = uploads_dir(server.data_dir)
    await wait_for(lambda: not any(upload_files.iterdir()), 10, "removal of the partial upload")
    async with aiohttp.ClientSession() as session:
        blob_url = f"{server.url}/v2/e2e/gone/blobs/{digest}"
        async with session.get(blob_url) as resp:
            assert resp.status == 404
            assert await error_code(resp) == "BLOB_UNKNOWN"
        async with session.get(f"{server.url}/healthz") as resp:
            assert resp.status == 200
        # still serving: the same push, complete this time, works
        async with session.post(
            f"{server.url}/v2/e2e/gone/blobs/uploads/", params={"digest": digest}, data=whole
        ) as resp:
            assert resp.status == 201, await resp.text()
        async with session.get(blob_url) as resp:
            assert resp.status == 200
            assert await resp.read() == whole
    assert not any(upload_files.iterdir())
    assert server.alive()
    assert "Traceback" not in server.log_path.read_text()
