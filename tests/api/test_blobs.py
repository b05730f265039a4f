"""Blob GET (whole and ranged), HEAD and DELETE."""

from __future__ import annotations

import asyncio

import pytest

from regproxy.config import Config
from tests.helpers import Client, assert_error, digest_of, files_under, push_blob

DATA = b"0123456789"


@pytest.fixture
async def digest(client: Client) -> str:
    return await push_blob(client, "app", DATA)


async def test_get_blob(client: Client, digest: str) -> None:
    resp = await client.get(f"/v2/app/blobs/{digest}")
    assert resp.status == 200
    assert resp.headers["Docker-Content-Digest"] == digest
    assert resp.headers["Content-Type"] == "application/octet-stream"
    assert resp.headers["Content-Length"] == str(len(DATA))
    assert resp.headers["Accept-Ranges"] == "bytes"
    assert resp.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    body = await resp.read()
    assert body == DATA
    assert digest_of(body) == digest


async def test_head_blob(client: Client, digest: str) -> None:
    resp = await client.head(f"/v2/app/blobs/{digest}")
    assert resp.status == 200
    assert resp.headers["Content-Length"] == str(len(DATA))
    assert resp.headers["Docker-Content-Digest"] == digest
    assert resp.headers["Content-Type"] == "application/octet-stream"
    assert await resp.read() == b""


@pytest.mark.parametrize(
    ("value", "start", "end"),
    [
        ("bytes=0-3", 0, 3),
        ("bytes=5-", 5, 9),
        ("bytes=-4", 6, 9),
        ("bytes=9-9", 9, 9),
        ("bytes=3-100", 3, 9),
        ("bytes=-100", 0, 9),
    ],
)
async def test_range(client: Client, digest: str, value: str, start: int, end: int) -> None:
    resp = await client.get(f"/v2/app/blobs/{digest}", headers={"Range": value})
    assert resp.status == 206
    assert resp.headers["Content-Range"] == f"bytes {start}-{end}/{len(DATA)}"
    assert resp.headers["Content-Length"] == str(end - start + 1)
    assert resp.headers["Docker-Content-Digest"] == digest
    assert await resp.read() == DATA[start : end + 1]


@pytest.mark.parametrize(
    "value", ["bytes=10-", "bytes=10-20", "bytes=100-200", "bytes=5-2", "bytes=0-1,4-5",
              "items=0-3", "bytes=a-b", "bytes=", "0-3"],
)  # fmt: skip
async def test_bad_range(client: Client, digest: str, value: str) -> None:
    resp = await client.get(f"/v2/app/blobs/{digest}", headers={"Range": value})
    await assert_error(resp, 416, "RANGE_INVALID")
    assert resp.headers["Content-Range"] == f"bytes */{len(DATA)}"


async def test_blob_in_another_repository(client: Client, digest: str) -> None:
    await assert_error(await client.get(f"/v2/other/blobs/{digest}"), 404, "BLOB_UNKNOWN")
    await assert_error(await client.head(f"/v2/other/blobs/{digest}"), 404, "BLOB_UNKNOWN")
    await assert_error(await client.delete(f"/v2/other/blobs/{digest}"), 404, "BLOB_UNKNOWN")
    assert (await client.get(f"/v2/app/blobs/{digest}")).status == 200


async def test_unknown_blob(client: Client) -> None:
    unknown = digest_of(b"never pushed")
    error = await assert_error(await client.get(f"/v2/app/blobs/{unknown}"), 404, "BLOB_UNKNOWN")
    assert error["detail"] == {"digest": unknown}


@pytest.mark.parametrize("bad", ["sha256:abc", "md5:" + "0" * 32, "latest", "sha256:" + "A" * 64])
async def test_bad_digest(client: Client, bad: str) -> None:
    await assert_error(await client.get(f"/v2/app/blobs/{bad}"), 400, "DIGEST_INVALID")
    await assert_error(await client.head(f"/v2/app/blobs/{bad}"), 400, "DIGEST_INVALID")
    await assert_error(await client.delete(f"/v2/app/blobs/{bad}"), 400, "DIGEST_INVALID")


async def test_delete_blob(client: Client, config: Config, digest: str) -> None:
    resp = await client.delete(f"/v2/app/blobs/{digest}")
    assert resp.status == 202
    assert await resp.read() == b""
    await assert_error(await client.get(f"/v2/app/blobs/{digest}"), 404, "BLOB_UNKNOWN")
    await assert_error(await client.head(f"/v2/app/blobs/{digest}"), 404, "BLOB_UNKNOWN")
    await assert_error(await client.delete(f"/v2/app/blobs/{digest}"), 404, "BLOB_UNKNOWN")
    # No repository links it any more: its bytes are gone too.
    assert await asyncio.to_thread(files_under, config.storage_path) == []


async def test_delete_blob_linked_elsewhere_keeps_its_bytes(
    client: Client, config: Config, digest: str
) -> None:
    await push_blob(client, "other", DATA)
    assert (await client.delete(f"/v2/app/blobs/{digest}")).status == 202
    await assert_error(await client.get(f"/v2/app/blobs/{digest}"), 404, "BLOB_UNKNOWN")
    resp = await client.get(f"/v2/other/blobs/{digest}")
    assert resp.status == 200
    assert await resp.read() == DATA
    assert len(await asyncio.to_thread(files_under, config.storage_path)) == 1


async def test_blob_pushed_again_after_delete(client: Client, digest: str) -> None:
    assert (await client.delete(f"/v2/app/blobs/{digest}")).status == 202
    assert await push_blob(client, "app", DATA) == digest
    resp = await client.get(f"/v2/app/blobs/{digest}")
    assert await resp.read() == DATA
