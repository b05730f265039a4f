"""Two ``regproxy serve`` processes sharing one SQLite file and one S3 bucket (a moto
server): a chunked upload moves between them, survives one of them being killed, and the
blob it makes is served by both."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import aiohttp
import pytest

from tests.e2e.procs import RegproxyProcess, regproxy
from tests.s3fixtures import S3, s3, shared_moto  # noqa: F401

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio]

MiB = 1 << 20
REPO = "e2e/shared"


async def patch(
    session: aiohttp.ClientSession, server: RegproxyProcess, location: str, data: bytes, at: int
) -> str:
    headers = {"Content-Range": f"{at}-{at + len(data) - 1}"}
    async with session.patch(f"{server.url}{location}", data=data, headers=headers) as resp:
        assert resp.status == 202, await resp.text()
        assert resp.headers["Range"] == f"0-{at + len(data) - 1}"
        return resp.headers["Location"]


async def test_upload_moves_between_processes(tmp_path: Path, s3: S3) -> None:  # noqa: F811
    data_dir = tmp_path / "data"
    chunks = [os.urandom(size) for size in (7 * MiB, 2 * MiB, 4 * MiB, 3)]
    data = b"".join(chunks)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    async with (
        regproxy(tmp_path / "a", data_dir=data_dir, config=s3.toml()) as first,
        regproxy(tmp_path / "b", data_dir=data_dir, config=s3.toml()) as second,
        aiohttp.ClientSession() as session,
    ):
        async with session.post(f"{first.url}/v2/{REPO}/blobs/uploads/") as resp:
            assert resp.status == 202
            location = resp.headers["Location"]
        location = await patch(session, first, location, chunks[0], 0)
        location = await patch(session, second, location, chunks[1], 7 * MiB)
        assert await first.kill() != 0  # a crash: the upload lives on in SQLite and S3

        async with regproxy(tmp_path / "c", data_dir=data_dir, config=s3.toml()) as third:
            location = await patch(session, third, location, chunks[2], 9 * MiB)
            params = {"digest": digest}
            async with session.put(
                f"{second.url}{location}", params=params, data=chunks[3]
            ) as resp:
                assert resp.status == 201, await resp.text()
            for server in (second, third):
                async with session.get(f"{server.url}/v2/{REPO}/blobs/{digest}") as resp:
                    assert resp.status == 200
                    assert await resp.read() == data
    keys = await s3.keys()
    assert len(keys) == 1 and keys[0].startswith("blobs/"), keys
    assert await s3.multipart_uploads() == []
