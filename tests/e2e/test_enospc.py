"""A full disk on push: ``regproxy serve`` with its data directory on a 4 MiB tmpfs.

A blob bigger than the space fails with a JSON error that names the cause (507, UNAVAILABLE),
keeps nothing partial, and the registry goes on serving: a small image pushes and pulls back
byte for byte afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.e2e.procs import RegproxyProcess, regproxy

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio]

MiB = 1 << 20
MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def sha256_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs (the e2e tests run as root): {done.stderr}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


@pytest.fixture
async def server(tmp_path: Path, small_disk: Path) -> AsyncIterator[RegproxyProcess]:
    async with regproxy(tmp_path / "regproxy", data_dir=small_disk / "data") as running:
        yield running


def leftovers(data_dir: Path) -> list[Path]:
    """Files in uploads/ and blobs/ (the metadata database is not counted)."""
    root = data_dir / "blobs"
    return sorted(p for p in root.rglob("*") if p.is_file())


async def assert_storage_full(resp: aiohttp.ClientResponse) -> None:
    assert resp.status == 507, await resp.text()
    assert resp.content_type == "application/json"
    [error] = (await resp.json())["errors"]
    assert error["code"] == "UNAVAILABLE"
    assert "storage is full" in error["message"] and "No space left" in error["message"]


async def test_a_push_bigger_than_the_disk_fails_cleanly(server: RegproxyProcess) -> None:
    big = os.urandom(8 * MiB)
    base = f"{server.url}/v2/full/app"
    async with aiohttp.ClientSession() as session:
        # Monolithic POST ?digest=
        async with session.post(
            f"{base}/blobs/uploads/", params={"digest": sha256_of(big)}, data=big
        ) as resp:
            await assert_storage_full(resp)
        assert leftovers(server.data_dir) == []

        # Chunked: the PATCH that fills the disk ends the upload.
        async with session.post(f"{base}/blobs/uploads/") as resp:
            assert resp.status == 202
            location = server.url + resp.headers["Location"]
        async with session.patch(
            location, data=big, headers={"Content-Type": "application/octet-stream"}
        ) as resp:
            await assert_storage_full(resp)
        async with session.get(location) as resp:
            assert resp.status == 404
            assert (await resp.json())["errors"][0]["code"] == "BLOB_UPLOAD_UNKNOWN"
        assert leftovers(server.data_dir) == []
        async with session.head(f"{base}/blobs/{sha256_of(big)}") as resp:
            assert resp.status == 404

        # Still serving: a small image goes in and comes back byte for byte.
        config = b'{"architecture":"amd64","os":"linux"}'
        layer = os.urandom(256 << 10)
        for data in (config, layer):
            async with session.post(
                f"{base}/blobs/uploads/", params={"digest": sha256_of(data)}, data=data
            ) as resp:
                assert resp.status == 201, await resp.text()
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": MANIFEST,
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": sha256_of(config),
                    "size": len(config),
                },
                "layers": [
                    {
                        "mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": sha256_of(layer),
                        "size": len(layer),
                    }
                ],
            }
        ).encode()
        async with session.put(
            f"{base}/manifests/v1", data=manifest, headers={"Content-Type": MANIFEST}
        ) as resp:
            assert resp.status == 201, await resp.text()
        async with session.get(f"{base}/manifests/v1", headers={"Accept": MANIFEST}) as resp:
            assert resp.status == 200 and await resp.read() == manifest
        for data in (config, layer):
            async with session.get(f"{base}/blobs/{sha256_of(data)}") as resp:
                assert resp.status == 200 and await resp.read() == data
    stored = {p.name.partition(".")[0] for p in leftovers(server.data_dir)}
    assert stored == {sha256_of(config)[7:], sha256_of(layer)[7:]}
