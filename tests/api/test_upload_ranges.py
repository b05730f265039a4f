"""The final ``PUT ?digest=`` of an upload may carry the last chunk with a ``Content-Range``:
it must start at the upload's offset, exactly as for a PATCH, or the request gets 416 with
the current ``Range`` and the upload stays as it was."""

from __future__ import annotations

import pytest

from tests.helpers import Client, assert_error, digest_of, start_upload

DATA = b"0123456789abcdefghijklmnopqrstuvwxyz" * 100


async def _patch(client: Client, location: str, chunk: bytes, start: int) -> None:
    headers = {"Content-Range": f"{start}-{start + len(chunk) - 1}"}
    resp = await client.patch(location, data=chunk, headers=headers)
    assert resp.status == 202, await resp.text()


async def _range(client: Client, location: str) -> str:
    resp = await client.get(location)
    assert resp.status == 204, await resp.text()
    return resp.headers["Range"]


@pytest.mark.parametrize("start", [0, 50, 99, 101, 200])
async def test_final_chunk_out_of_order(client: Client, start: int) -> None:
    location = await start_upload(client, "app")
    await _patch(client, location, DATA[:100], 0)
    digest = digest_of(DATA)
    chunk = DATA[start:]
    headers = {"Content-Range": f"{start}-{start + len(chunk) - 1}"}
    resp = await client.put(location, params={"digest": digest}, data=chunk, headers=headers)
    await assert_error(resp, 416, "RANGE_INVALID")
    assert resp.headers["Range"] == "0-99"
    assert resp.headers["Docker-Upload-UUID"] == location.rsplit("/", 1)[1]
    # Untouched: same offset, and it finishes with the right chunk.
    assert await _range(client, location) == "0-99"
    await assert_error(await client.get(f"/v2/app/blobs/{digest}"), 404, "BLOB_UNKNOWN")
    headers = {"Content-Range": f"100-{len(DATA) - 1}"}
    resp = await client.put(location, params={"digest": digest}, data=DATA[100:], headers=headers)
    assert resp.status == 201, await resp.text()
    resp = await client.get(f"/v2/app/blobs/{digest}")
    assert await resp.read() == DATA


@pytest.mark.parametrize("value", ["abc", "9-3", "bytes 0-9/10"])
async def test_final_chunk_with_malformed_content_range(client: Client, value: str) -> None:
    location = await start_upload(client, "app")
    await _patch(client, location, DATA[:100], 0)
    resp = await client.put(
        location,
        params={"digest": digest_of(DATA)},
        data=DATA[100:],
        headers={"Content-Range": value},
    )
    await assert_error(resp, 416, "RANGE_INVALID")
    assert await _range(client, location) == "0-99"


async def test_final_chunk_shorter_than_its_content_range(client: Client) -> None:
    location = await start_upload(client, "app")
    await _patch(client, location, DATA[:100], 0)
    digest = digest_of(DATA)
    headers = {"Content-Range": f"100-{len(DATA)}"}  # one byte more than sent
    resp = await client.put(location, params={"digest": digest}, data=DATA[100:], headers=headers)
    await assert_error(resp, 400, "SIZE_INVALID")
    assert await _range(client, location) == "0-99"
    resp = await client.put(location, params={"digest": digest}, data=DATA[100:])
    assert resp.status == 201, await resp.text()
