"""Blob uploads: monolithic, streamed, chunked, status, cancel, digests and mounts."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator

import pytest

from regproxy.config import Config
from tests.helpers import (
    Client,
    assert_error,
    digest_of,
    files_under,
    push_blob,
    start_upload,
)

DATA = b"0123456789abcdefghijklmnopqrstuvwxyz" * 100
UNKNOWN_UPLOAD = "00000000-0000-4000-8000-000000000000"


async def _get_blob(client: Client, repo: str, digest: str) -> bytes:
    resp = await client.get(f"/v2/{repo}/blobs/{digest}")
    assert resp.status == 200, await resp.text()
    assert resp.headers["Docker-Content-Digest"] == digest
    body = await resp.read()
    assert digest_of(body, digest.split(":")[0]) == digest
    return body


async def _status(client: Client, location: str) -> str:
    resp = await client.get(location)
    assert resp.status == 204, await resp.text()
    assert resp.headers["Location"] == location
    assert resp.headers["Docker-Upload-UUID"] == location.rsplit("/", 1)[1]
    return resp.headers["Range"]


async def _patch(client: Client, location: str, chunk: bytes, start: int | None) -> str:
    headers = {"Content-Type": "application/octet-stream"}
    if start is not None:
        headers["Content-Range"] = f"{start}-{start + len(chunk) - 1}"
    resp = await client.patch(location, data=chunk, headers=headers)
    assert resp.status == 202, await resp.text()
    assert resp.headers["Location"] == location
    assert resp.headers["Docker-Upload-UUID"] == location.rsplit("/", 1)[1]
    return resp.headers["Range"]


async def _stream(data: bytes, size: int = 1000) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        await asyncio.sleep(0)
        yield data[i : i + size]


# -- complete uploads ---------------------------------------------------------------------


async def test_post_then_monolithic_put(client: Client) -> None:
    location = await start_upload(client, "lib/app")
    digest = digest_of(DATA)
    resp = await client.put(location, params={"digest": digest}, data=DATA)
    assert resp.status == 201, await resp.text()
    assert resp.headers["Location"] == f"/v2/lib/app/blobs/{digest}"
    assert resp.headers["Docker-Content-Digest"] == digest
    assert await _get_blob(client, "lib/app", digest) == DATA
    # The session is over.
    await assert_error(await client.get(location), 404, "BLOB_UPLOAD_UNKNOWN")


async def test_single_post_with_digest(client: Client) -> None:
    digest = await push_blob(client, "app", DATA)
    assert await _get_blob(client, "app", digest) == DATA


async def test_single_post_with_wrong_digest(client: Client, config: Config) -> None:
    wrong = digest_of(b"something else")
    resp = await client.post("/v2/app/blobs/uploads/", params={"digest": wrong}, data=DATA)
    await assert_error(resp, 400, "DIGEST_INVALID")
    await assert_error(await client.head(f"/v2/app/blobs/{wrong}"), 404, "BLOB_UNKNOWN")
    await assert_error(await client.get(f"/v2/app/blobs/{digest_of(DATA)}"), 404, "BLOB_UNKNOWN")
    assert await asyncio.to_thread(files_under, config.storage_path) == []


async def test_empty_blob(client: Client) -> None:
    digest = await push_blob(client, "app", b"")
    assert await _get_blob(client, "app", digest) == b""


async def test_one_streamed_patch_then_put(client: Client) -> None:
    location = await start_upload(client, "app")
    resp = await client.patch(location, data=_stream(DATA))  # chunked, no Content-Length
    assert resp.status == 202, await resp.text()
    assert resp.headers["Range"] == f"0-{len(DATA) - 1}"
    assert await _status(client, location) == f"0-{len(DATA) - 1}"
    digest = digest_of(DATA)
    resp = await client.put(location, params={"digest": digest})
    assert resp.status == 201, await resp.text()
    assert await _get_blob(client, "app", digest) == DATA


async def test_chunked_patches_with_content_range(client: Client) -> None:
    location = await start_upload(client, "app")
    chunks = [DATA[:1000], DATA[1000:1001], DATA[1001:2500], DATA[2500:]]
    offset = 0
    for chunk in chunks:
        assert await _patch(client, location, chunk, offset) == f"0-{offset + len(chunk) - 1}"
        offset += len(chunk)
        assert await _status(client, location) == f"0-{offset - 1}"
    digest = digest_of(DATA)
    resp = await client.put(location, params={"digest": digest})
    assert resp.status == 201, await resp.text()
    assert await _get_blob(client, "app", digest) == DATA


async def test_large_blob_in_odd_pieces(client: Client) -> None:
    """Bodies are read and hashed in pieces; sizes across the 1 MiB read size come out whole."""
    big = bytes(range(251)) * (14 * 1024)  # about 3.4 MiB, a prime-sized pattern
    location = await start_upload(client, "app")
    offset = 0
    for size in (1, (1 << 20) - 1, 1 << 20, (1 << 20) + 1):
        await _patch(client, location, big[offset : offset + size], offset)
        offset += size
    resp = await client.patch(location, data=_stream(big[offset:-7], 70_001))
    assert resp.status == 202, await resp.text()
    digest = digest_of(big)
    resp = await client.put(location, params={"digest": digest}, data=big[-7:])
    assert resp.status == 201, await resp.text()
    assert await _get_blob(client, "app", digest) == big
    resp = await client.post(
        "/v2/copy/blobs/uploads/", params={"digest": digest}, data=_stream(big, 333_333)
    )
    assert resp.status == 201, await resp.text()
    assert await _get_blob(client, "copy", digest) == big


async def test_final_put_carries_the_last_chunk(client: Client) -> None:
    location = await start_upload(client, "app")
    await _patch(client, location, DATA[:100], 0)
    digest = digest_of(DATA)
    resp = await client.put(location, params={"digest": digest}, data=DATA[100:])
    assert resp.status == 201, await resp.text()
    assert resp.headers["Docker-Content-Digest"] == digest
    assert await _get_blob(client, "app", digest) == DATA


@pytest.mark.parametrize("start", [0, 50, 101, 200])
async def test_out_of_order_chunk(client: Client, start: int) -> None:
    location = await start_upload(client, "app")
    await _patch(client, location, DATA[:100], 0)
    headers = {"Content-Range": f"{start}-{start + 9}"}
    resp = await client.patch(location, data=DATA[start : start + 10], headers=headers)
    await assert_error(resp, 416, "RANGE_INVALID")
    assert resp.headers["Range"] == "0-99"
    assert resp.headers["Docker-Upload-UUID"] == location.rsplit("/", 1)[1]
    # Nothing of the refused chunk landed; the upload goes on from where it was.
    assert await _status(client, location) == "0-99"
    await _patch(client, location, DATA[100:], 100)
    digest = digest_of(DATA)
    assert (await client.put(location, params={"digest": digest})).status == 201
    assert await _get_blob(client, "app", digest) == DATA


async def test_repeated_chunk(client: Client) -> None:
    location = await start_upload(client, "app")
    await _patch(client, location, DATA[:10], 0)
    resp = await client.patch(location, data=DATA[:10], headers={"Content-Range": "0-9"})
    await assert_error(resp, 416, "RANGE_INVALID")
    assert resp.headers["Range"] == "0-9"


@pytest.mark.parametrize("value", ["abc", "5", "9-3", "-1-4", "0-", "bytes 0-9/10"])
async def test_malformed_content_range(client: Client, value: str) -> None:
    location = await start_upload(client, "app")
    resp = await client.patch(location, data=DATA[:10], headers={"Content-Range": value})
    await assert_error(resp, 416, "RANGE_INVALID")
    assert await _status(client, location) == "0-0"


async def test_patch_body_shorter_than_its_content_range(client: Client) -> None:
    location = await start_upload(client, "app")
    await _patch(client, location, DATA[:10], 0)
    resp = await client.patch(location, data=DATA[10:15], headers={"Content-Range": "10-19"})
    await assert_error(resp, 400, "SIZE_INVALID")
    # The short chunk was rolled back: the upload still holds 10 bytes and goes on.
    assert await _status(client, location) == "0-9"
    await _patch(client, location, DATA[10:], 10)
    digest = digest_of(DATA)
    assert (await client.put(location, params={"digest": digest})).status == 201
    assert await _get_blob(client, "app", digest) == DATA


async def test_patch_body_longer_than_its_content_range(client: Client) -> None:
    location = await start_upload(client, "app")
    resp = await client.patch(location, data=DATA[:20], headers={"Content-Range": "0-9"})
    await assert_error(resp, 400, "SIZE_INVALID")
    assert await _status(client, location) == "0-0"


async def test_upload_status_and_cancel(client: Client, config: Config) -> None:
    location = await start_upload(client, "app")
    upload_id = location.rsplit("/", 1)[1]
    assert await _status(client, location) == "0-0"
    await _patch(client, location, DATA[:42], None)
    assert await _status(client, location) == "0-41"
    upload_file = config.storage_path / "uploads" / upload_id
    assert upload_file.stat().st_size == 42

    resp = await client.delete(location)
    assert resp.status == 204
    await assert_error(await client.get(location), 404, "BLOB_UPLOAD_UNKNOWN")
    await assert_error(await client.delete(location), 404, "BLOB_UPLOAD_UNKNOWN")
    resp = await client.patch(location, data=b"more")
    await assert_error(resp, 404, "BLOB_UPLOAD_UNKNOWN")
    resp = await client.put(location, params={"digest": digest_of(DATA[:42])})
    await assert_error(resp, 404, "BLOB_UPLOAD_UNKNOWN")
    assert not upload_file.exists()


async def test_put_with_wrong_digest(client: Client, config: Config) -> None:
    location = await start_upload(client, "app")
    await _patch(client, location, DATA, None)
    wrong = digest_of(b"not the data")
    resp = await client.put(location, params={"digest": wrong})
    error = await assert_error(resp, 400, "DIGEST_INVALID")
    assert error["detail"] == {"digest": wrong}
    for digest in (wrong, digest_of(DATA)):
        await assert_error(await client.get(f"/v2/app/blobs/{digest}"), 404, "BLOB_UNKNOWN")
        await assert_error(await client.head(f"/v2/app/blobs/{digest}"), 404, "BLOB_UNKNOWN")
    # The failed upload is gone, with its bytes.
    await assert_error(await client.get(location), 404, "BLOB_UPLOAD_UNKNOWN")
    assert await asyncio.to_thread(files_under, config.storage_path) == []


async def test_put_with_body_and_wrong_digest(client: Client) -> None:
    location = await start_upload(client, "app")
    wrong = digest_of(b"not the data")
    resp = await client.put(location, params={"digest": wrong}, data=DATA)
    await assert_error(resp, 400, "DIGEST_INVALID")
    await assert_error(await client.get(f"/v2/app/blobs/{digest_of(DATA)}"), 404, "BLOB_UNKNOWN")


async def test_put_without_digest(client: Client) -> None:
    location = await start_upload(client, "app")
    await _patch(client, location, DATA[:10], 0)
    for params in ({}, {"digest": ""}):
        await assert_error(await client.put(location, params=params), 400, "DIGEST_INVALID")
    # The upload is untouched and can still be finished.
    assert await _status(client, location) == "0-9"
    digest = digest_of(DATA[:10])
    assert (await client.put(location, params={"digest": digest})).status == 201


@pytest.mark.parametrize(
    "digest",
    [
        "md5:" + hashlib.md5(DATA).hexdigest(),
        "sha256:" + "g" * 64,
        "sha256:" + hashlib.sha256(DATA).hexdigest().upper(),
        "sha256:" + hashlib.sha256(DATA).hexdigest()[:-1],
        "sha512:" + hashlib.sha256(DATA).hexdigest(),
        "sha256:" + hashlib.sha256(DATA).hexdigest() + "\n",
        "sha256",
        hashlib.sha256(DATA).hexdigest(),
    ],
)
async def test_invalid_digest(client: Client, digest: str) -> None:
    location = await start_upload(client, "app")
    await _patch(client, location, DATA, None)
    await assert_error(await client.put(location, params={"digest": digest}), 400, "DIGEST_INVALID")
    resp = await client.post("/v2/app/blobs/uploads/", params={"digest": digest}, data=DATA)
    await assert_error(resp, 400, "DIGEST_INVALID")
    resp = await client.post("/v2/app/blobs/uploads/", params={"mount": digest, "from": "x"})
    await assert_error(resp, 400, "DIGEST_INVALID")
    if "\n" not in digest:  # yarl drops a newline from a URL's path
        await assert_error(await client.get(f"/v2/app/blobs/{digest}"), 400, "DIGEST_INVALID")


@pytest.mark.parametrize("algorithm", ["md5", "sha1", "SHA256", ""])
async def test_unknown_digest_algorithm_on_post(client: Client, algorithm: str) -> None:
    resp = await client.post("/v2/app/blobs/uploads/", params={"digest-algorithm": algorithm})
    await assert_error(resp, 400, "DIGEST_INVALID")


@pytest.mark.parametrize(
    "upload_id", [UNKNOWN_UPLOAD, "not-an-id", "a.b", UNKNOWN_UPLOAD.upper(), UNKNOWN_UPLOAD + "0"]
)
async def test_bad_upload_id(client: Client, upload_id: str) -> None:
    location = f"/v2/app/blobs/uploads/{upload_id}"
    await assert_error(await client.get(location), 404, "BLOB_UPLOAD_UNKNOWN")
    await assert_error(await client.patch(location, data=b"x"), 404, "BLOB_UPLOAD_UNKNOWN")
    resp = await client.put(location, params={"digest": digest_of(b"x")}, data=b"x")
    await assert_error(resp, 404, "BLOB_UPLOAD_UNKNOWN")
    await assert_error(await client.delete(location), 404, "BLOB_UPLOAD_UNKNOWN")


async def test_upload_belongs_to_its_repository(client: Client) -> None:
    location = await start_upload(client, "app")
    other = location.replace("/v2/app/", "/v2/other/")
    await assert_error(await client.get(other), 404, "BLOB_UPLOAD_UNKNOWN")
    await assert_error(await client.patch(other, data=b"x"), 404, "BLOB_UPLOAD_UNKNOWN")
    await assert_error(await client.delete(other), 404, "BLOB_UPLOAD_UNKNOWN")
    assert await _status(client, location) == "0-0"


# -- sha512 -------------------------------------------------------------------------------


async def test_sha512_upload_session(client: Client) -> None:
    location = await start_upload(client, "app", **{"digest-algorithm": "sha512"})
    await _patch(client, location, DATA[:500], 0)
    await _patch(client, location, DATA[500:], 500)
    digest = digest_of(DATA, "sha512")
    resp = await client.put(location, params={"digest": digest})
    assert resp.status == 201, await resp.text()
    assert resp.headers["Docker-Content-Digest"] == digest
    assert await _get_blob(client, "app", digest) == DATA
    # Stored under its sha512 digest only.
    await assert_error(await client.get(f"/v2/app/blobs/{digest_of(DATA)}"), 404, "BLOB_UNKNOWN")


async def test_sha512_single_post(client: Client) -> None:
    digest = await push_blob(client, "app", DATA, "sha512")
    assert await _get_blob(client, "app", digest) == DATA


async def test_sha256_session_finished_with_sha512_digest(client: Client) -> None:
    location = await start_upload(client, "app")
    await _patch(client, location, DATA[:700], 0)
    digest = digest_of(DATA, "sha512")
    resp = await client.put(location, params={"digest": digest}, data=DATA[700:])
    assert resp.status == 201, await resp.text()
    assert resp.headers["Docker-Content-Digest"] == digest
    assert await _get_blob(client, "app", digest) == DATA


async def test_sha512_session_finished_with_wrong_sha256_digest(client: Client) -> None:
    location = await start_upload(client, "app", **{"digest-algorithm": "sha512"})
    await _patch(client, location, DATA, 0)
    resp = await client.put(location, params={"digest": digest_of(b"other")})
    await assert_error(resp, 400, "DIGEST_INVALID")
    await assert_error(await client.get(f"/v2/app/blobs/{digest_of(DATA)}"), 404, "BLOB_UNKNOWN")


# -- mounts -------------------------------------------------------------------------------


async def test_mount_from_repository_with_the_blob(client: Client) -> None:
    digest = await push_blob(client, "source", DATA)
    await assert_error(await client.get(f"/v2/target/blobs/{digest}"), 404, "BLOB_UNKNOWN")
    resp = await client.post(
        "/v2/target/blobs/uploads/", params={"mount": digest, "from": "source"}
    )
    assert resp.status == 201, await resp.text()
    assert resp.headers["Location"] == f"/v2/target/blobs/{digest}"
    assert resp.headers["Docker-Content-Digest"] == digest
    assert await _get_blob(client, "target", digest) == DATA


async def test_mount_from_repository_without_the_blob(client: Client) -> None:
    digest = await push_blob(client, "elsewhere", DATA)
    resp = await client.post(
        "/v2/target/blobs/uploads/", params={"mount": digest, "from": "source"}
    )
    assert resp.status == 202, await resp.text()
    location = resp.headers["Location"]
    assert location == f"/v2/target/blobs/uploads/{resp.headers['Docker-Upload-UUID']}"
    assert "Docker-Content-Digest" not in resp.headers
    await assert_error(await client.get(f"/v2/target/blobs/{digest}"), 404, "BLOB_UNKNOWN")
    # The session it opened works like any other.
    resp = await client.put(location, params={"digest": digest}, data=DATA)
    assert resp.status == 201
    assert await _get_blob(client, "target", digest) == DATA


async def test_mount_of_unknown_blob_opens_an_upload(client: Client) -> None:
    digest = digest_of(DATA)
    resp = await client.post("/v2/target/blobs/uploads/", params={"mount": digest})
    assert resp.status == 202, await resp.text()
    assert await _status(client, resp.headers["Location"]) == "0-0"


async def test_mount_without_from(client: Client) -> None:
    digest = await push_blob(client, "source", DATA)
    resp = await client.post("/v2/target/blobs/uploads/", params={"mount": digest})
    assert resp.status == 201, await resp.text()
    assert resp.headers["Docker-Content-Digest"] == digest
    assert await _get_blob(client, "target", digest) == DATA


async def test_mount_from_invalid_name(client: Client) -> None:
    digest = await push_blob(client, "source", DATA)
    for source in ("A", "source\n", "source/"):
        resp = await client.post(
            "/v2/target/blobs/uploads/", params={"mount": digest, "from": source}
        )
        await assert_error(resp, 400, "NAME_INVALID")


# -- concurrency --------------------------------------------------------------------------


async def test_concurrent_uploads_of_the_same_blob(client: Client, config: Config) -> None:
    digest = digest_of(DATA)

    async def monolithic(repo: str) -> None:
        resp = await client.post(
            f"/v2/{repo}/blobs/uploads/", params={"digest": digest}, data=_stream(DATA, 100)
        )
        assert resp.status == 201, await resp.text()
        assert resp.headers["Docker-Content-Digest"] == digest

    async def chunked(repo: str) -> None:
        location = await start_upload(client, repo)
        for i in range(0, len(DATA), 500):
            await _patch(client, location, DATA[i : i + 500], i)
        resp = await client.put(location, params={"digest": digest})
        assert resp.status == 201, await resp.text()

    await asyncio.gather(monolithic("one"), monolithic("two"), chunked("three"), chunked("one"))
    for repo in ("one", "two", "three"):
        assert await _get_blob(client, repo, digest) == DATA
    files = await asyncio.to_thread(files_under, config.storage_path)
    # One file is kept, named after the upload that stored it first.
    assert len(files) == 1
    assert files[0].parent == config.storage_path / "blobs" / "sha256" / digest[7:9]
    assert files[0].name.startswith(digest[7:] + ".")
    assert files[0].read_bytes() == DATA
