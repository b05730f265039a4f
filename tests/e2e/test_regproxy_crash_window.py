"""SIGKILL right after an upload's final PUT was sent, again and again.

The kill lands 0 to 10 ms after the last byte of ``PUT …/uploads/<id>?digest=`` left the
client: before the request was read, while its bytes were written, between publishing the
blob's bytes and committing its row, or after. Whatever the moment, after a restart every
request about the upload gets a spec answer: never a 500, never a ``Range`` for bytes that
are not in the upload's file; a retried PUT gives 201 (and the blob is then byte-exact) or
404 BLOB_UPLOAD_UNKNOWN.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import sqlite3
from pathlib import Path

import aiohttp
import pytest

from tests.e2e.procs import RegproxyProcess, regproxy
from tests.s3fixtures import S3, s3, shared_moto  # noqa: F401

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio]

KiB = 1 << 10
TRIES = 40
REPO = "e2e/window"


def sha256_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return -1


async def error_code(resp: aiohttp.ClientResponse) -> str:
    body = await resp.json(content_type=None)
    return str(body["errors"][0]["code"])


def logs_with(base: Path, text: str) -> list[Path]:
    return [log for log in base.glob("run-*/regproxy-*.log") if text in log.read_text()]


def upload_row_exists(data_dir: Path, upload_id: str) -> bool:
    with contextlib.closing(sqlite3.connect(data_dir / "metadata.sqlite")) as db:
        row = db.execute("SELECT 1 FROM uploads WHERE id = ?", (upload_id,)).fetchone()
    return row is not None


async def send_and_kill(server: RegproxyProcess, target: str, body: bytes, delay: float) -> None:
    """Send the whole request, then SIGKILL the server ``delay`` seconds later."""
    _, writer = await asyncio.open_connection("127.0.0.1", server.port)
    head = (
        f"PUT {target} HTTP/1.1\r\nHost: {server.host}\r\n"
        f"Content-Type: application/octet-stream\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    writer.write(head.encode() + body)
    await writer.drain()
    await asyncio.sleep(delay)
    assert await server.kill() == -9
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


def check_claim(resp: aiohttp.ClientResponse, upload_file: Path | None) -> None:
    """A ``Range`` must not claim bytes the upload's file lacks (on S3, the retried PUT
    that must then succeed checks it)."""
    claimed = int(resp.headers["Range"].split("-")[1]) + 1
    if upload_file is not None:
        assert claimed <= file_size(upload_file), "Range claims bytes that are not stored"


async def check_status(
    session: aiohttp.ClientSession, url: str, upload_file: Path | None
) -> tuple[int, str]:
    async with session.get(url) as resp:
        if resp.status == 204:
            check_claim(resp, upload_file)
            return 204, ""
        assert resp.status == 404, await resp.text()
        code = await error_code(resp)
        assert code == "BLOB_UPLOAD_UNKNOWN"
        return 404, code


async def retry_put(session: aiohttp.ClientSession, url: str, digest: str, final: bytes) -> int:
    async with session.put(url, params={"digest": digest}, data=final) as resp:
        assert resp.status in (201, 404), await resp.text()
        if resp.status == 404:
            assert await error_code(resp) == "BLOB_UPLOAD_UNKNOWN"
        else:
            assert resp.headers["Docker-Content-Digest"] == digest
        return resp.status


async def patch_again(session: aiohttp.ClientSession, url: str, upload_file: Path | None) -> str:
    """An empty PATCH (202 and the same Range if the upload is intact), then one at a wrong
    offset (416 with the upload's Range). Neither changes the upload."""
    seen = []
    for headers in ({}, {"Content-Range": "999999999-999999999"}):
        async with session.patch(url, data=b"x" if headers else b"", headers=headers) as resp:
            assert resp.status in (202, 404, 416), await resp.text()
            if resp.status == 404:
                assert await error_code(resp) == "BLOB_UPLOAD_UNKNOWN"
            else:
                check_claim(resp, upload_file)
            seen.append(str(resp.status))
    return "/".join(seen)


@pytest.fixture(params=["filesystem", "s3"])
def backend(request: pytest.FixtureRequest) -> S3 | None:
    return request.getfixturevalue("s3") if request.param == "s3" else None


async def test_sigkill_after_the_final_put(tmp_path: Path, backend: S3 | None) -> None:
    data_dir = tmp_path / "data"
    config = backend.toml() if backend is not None else None
    tries = TRIES if backend is None else TRIES // 2  # S3: slower to start, fewer rounds
    recorded_size = 512 * KiB if backend is None else 6 << 20
    # When the kill comes after the PUT was sent: the finish takes longer on S3 (moto).
    kill_within = 0.010 if backend is None else 0.150
    rng = random.Random(12)
    outcomes: dict[str, int] = {}
    windows = 0
    async with contextlib.AsyncExitStack() as stack:
        session = await stack.enter_async_context(aiohttp.ClientSession())
        server = await stack.enter_async_context(
            regproxy(tmp_path / "run-0", data_dir=data_dir, config=config)
        )
        for attempt in range(tries):
            # On S3, more than a part: the commit is a CompleteMultipartUpload.
            recorded, final = os.urandom(recorded_size), os.urandom(64 * KiB)
            whole = recorded + final
            digest = sha256_of(whole)
            async with session.post(f"{server.url}/v2/{REPO}/blobs/uploads/") as resp:
                assert resp.status == 202
                location = resp.headers["Location"]
                upload_id = resp.headers["Docker-Upload-UUID"]
            headers = {"Content-Range": f"0-{len(recorded) - 1}"}
            async with session.patch(
                f"{server.url}{location}", data=recorded, headers=headers
            ) as resp:
                assert resp.status == 202
                location = resp.headers["Location"]
            target = f"{location}{'&' if '?' in location else '?'}digest={digest}"
            await send_and_kill(server, target, final, rng.uniform(0, kill_within))

            server = await stack.enter_async_context(
                regproxy(tmp_path / f"run-{attempt + 1}", data_dir=data_dir, config=config)
            )
            url = f"{server.url}{location}"
            upload_file = data_dir / "blobs" / "uploads" / upload_id if backend is None else None
            blob_url = f"{server.url}/v2/{REPO}/blobs/{digest}"
            async with session.get(blob_url) as resp:
                committed = resp.status == 200
                if committed:
                    assert await resp.read() == whole
            # The window: the upload's file was moved into blobs/, its row is still there.
            if backend is None:
                assert upload_file is not None
                in_window = not upload_file.exists() and upload_row_exists(data_dir, upload_id)
            else:  # completed in place at blobs/<upload id>, no row for it
                published = f"blobs/{upload_id}" in await backend.keys()
                in_window = published and not committed and upload_row_exists(data_dir, upload_id)
            # Each of the three requests comes first in turn (a retried PUT first at the
            # first kill in the window).
            turn = windows if in_window else attempt
            windows += in_window
            order = ["put", "status", "patch"]
            order = order[turn % 3 :] + order[: turn % 3]
            seen = []
            for what in order:
                if what == "status":
                    seen.append(f"status {(await check_status(session, url, upload_file))[0]}")
                elif what == "put":
                    put = await retry_put(session, url, digest, final)
                    # Claimed intact before: then the bytes are there and the finish works.
                    if any(x in " ".join(seen) for x in ("status 204", "patch 202", "/416")):
                        assert put == 201, seen
                    seen.append(f"put {put}")
                    if put == 201:
                        async with session.get(blob_url) as resp:
                            assert resp.status == 200
                            assert await resp.read() == whole
                else:
                    seen.append(f"patch {await patch_again(session, url, upload_file)}")
            kind = ("window " if in_window else "") + ", ".join(seen)
            outcomes[kind] = outcomes.get(kind, 0) + 1

            # Whatever happened, the same push works now and the blob is exact.
            async with session.post(
                f"{server.url}/v2/{REPO}/blobs/uploads/", params={"digest": digest}, data=whole
            ) as resp:
                assert resp.status == 201, await resp.text()
            async with session.get(blob_url) as resp:
                assert resp.status == 200
                assert await resp.read() == whole
        assert server.alive()
    print("outcomes:", outcomes)
    print(f"{windows} of {tries} kills landed between publishing the bytes and the row")
    assert not logs_with(tmp_path, "unexpected error")
