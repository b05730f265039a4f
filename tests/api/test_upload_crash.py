"""The crash window between publishing an upload's bytes and committing the blob's row.

A kill after the storage commit (``os.replace`` into ``blobs/``, or S3's
CompleteMultipartUpload in place) and before the database commit leaves the upload's row
behind while its bytes moved. These tests make that state exactly, by running the storage
commit of the upload and nothing after it, then "restart" (a new app on the same data), and
check that every request about the upload gets a spec answer: a retried finish 201 when the
published bytes are the blob, otherwise 404 BLOB_UPLOAD_UNKNOWN; never a 500, never a
``Range`` for bytes that are gone.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from regproxy.config import Config
from regproxy.meta.base import BlobRow
from regproxy.oci import Digest
from regproxy.registry.hosted import HostedRegistry
from regproxy.tasks import HOSTED
from tests.conftest import MakeClient
from tests.helpers import Client, app_of, assert_error, digest_of, make_config, start_upload
from tests.s3fixtures import S3, moto_server, s3, shared_moto  # noqa: F401

MiB = 1 << 20
REPO = "crash/app"


@pytest.fixture(params=["filesystem", "s3"])
def backend_config(request: pytest.FixtureRequest, tmp_path: Path) -> Config:
    if request.param == "s3":
        bucket: S3 = request.getfixturevalue("s3")
        return bucket.app_config(tmp_path)
    return make_config(tmp_path)


def hosted_of(client: Client) -> HostedRegistry:
    return app_of(client)[HOSTED]


async def patch(client: Client, location: str, data: bytes, start: int) -> str:
    headers = {"Content-Range": f"{start}-{start + len(data) - 1}"}
    resp = await client.patch(location, data=data, headers=headers)
    assert resp.status == 202, await resp.text()
    return resp.headers["Location"]


async def crash_after_publish(
    make_client: MakeClient, config: Config, recorded: bytes, final: bytes, digest: str
) -> tuple[Client, str]:
    """Upload ``recorded`` in a PATCH, then do what the final PUT does with ``final`` up to
    and including the storage commit, and stop there (the kill). Returns a fresh app on the
    same data and the upload's location."""
    before = await make_client(config)
    location = await start_upload(before, REPO)
    if recorded:
        location = await patch(before, location, recorded, 0)
    hosted = hosted_of(before)
    upload_id = location.rsplit("/", 1)[1].split("?")[0]
    upload = await hosted.meta.get_upload(upload_id)
    assert upload is not None
    writer = await hosted.storage.open_writer(upload.id, upload.state, upload.offset)
    if final:
        await writer.write(final)
    await writer.commit(Digest.parse(digest))
    # killed here: neither the blob row nor the end of the upload was recorded
    await before.close()
    return await make_client(config), location


async def assert_upload_unknown(client: Client, location: str) -> None:
    resp = await client.get(location)
    await assert_error(resp, 404, "BLOB_UPLOAD_UNKNOWN")
    assert "Range" not in resp.headers


@pytest.mark.parametrize("final", [b"", b"the last chunk" * 1000])
async def test_retried_finish_after_publish(
    make_client: MakeClient, backend_config: Config, final: bytes
) -> None:
    recorded = os.urandom(6 * MiB + 7)
    data = recorded + final
    digest = digest_of(data)
    client, location = await crash_after_publish(
        make_client, backend_config, recorded, final, digest
    )
    assert await hosted_of(client).meta.get_blob(Digest.parse(digest)) is None

    resp = await client.put(location, params={"digest": digest}, data=final)
    assert resp.status == 201, await resp.text()
    assert resp.headers["Docker-Content-Digest"] == digest
    resp = await client.get(f"/v2/{REPO}/blobs/{digest}")
    assert resp.status == 200
    assert await resp.read() == data
    # The upload is over: asking about it again is an unknown upload.
    await assert_upload_unknown(client, location)
    resp = await client.put(location, params={"digest": digest}, data=final)
    await assert_error(resp, 404, "BLOB_UPLOAD_UNKNOWN")


async def test_status_of_a_published_upload(
    make_client: MakeClient, backend_config: Config
) -> None:
    recorded = os.urandom(6 * MiB)
    digest = digest_of(recorded)
    client, location = await crash_after_publish(make_client, backend_config, recorded, b"", digest)
    await assert_upload_unknown(client, location)  # never 204 with Range: 0-6291455
    upload_id = location.rsplit("/", 1)[1]
    assert await hosted_of(client).meta.get_upload(upload_id) is None


async def test_patch_of_a_published_upload(make_client: MakeClient, backend_config: Config) -> None:
    recorded = os.urandom(6 * MiB)
    digest = digest_of(recorded)
    client, location = await crash_after_publish(make_client, backend_config, recorded, b"", digest)
    headers = {"Content-Range": f"{len(recorded)}-{len(recorded) + 2}"}
    resp = await client.patch(location, data=b"abc", headers=headers)
    await assert_error(resp, 404, "BLOB_UPLOAD_UNKNOWN")
    await assert_upload_unknown(client, location)
    # a new upload of the same bytes works, and the blob is whole
    location = await start_upload(client, REPO)
    resp = await client.put(location, params={"digest": digest}, data=recorded)
    assert resp.status == 201, await resp.text()
    resp = await client.get(f"/v2/{REPO}/blobs/{digest}")
    assert await resp.read() == recorded


@pytest.mark.parametrize("case", ["other digest", "other size", "other bytes"])
async def test_retried_finish_that_does_not_match(
    make_client: MakeClient, backend_config: Config, case: str
) -> None:
    recorded = os.urandom(6 * MiB)
    final = b"tail" * 10
    data = recorded + final
    client, location = await crash_after_publish(
        make_client, backend_config, recorded, final, digest_of(data)
    )
    if case == "other digest":  # what the client asks for is not what was published
        digest, body = digest_of(data + b"!"), final + b"!"
    elif case == "other size":
        digest, body = digest_of(data), final[:-1]
    else:  # same size, different bytes: the published bytes are re-hashed
        digest, body = digest_of(data[:-1] + b"X"), final[:-1] + b"X"
    resp = await client.put(location, params={"digest": digest}, data=body)
    await assert_error(resp, 404, "BLOB_UPLOAD_UNKNOWN")
    assert await hosted_of(client).meta.get_blob(Digest.parse(digest)) is None
    resp = await client.get(f"/v2/{REPO}/blobs/{digest}")
    await assert_error(resp, 404, "BLOB_UNKNOWN")
    await assert_upload_unknown(client, location)


async def test_sweep_drops_rows_whose_bytes_are_gone(
    make_client: MakeClient, backend_config: Config
) -> None:
    recorded = os.urandom(MiB)
    client, lost = await crash_after_publish(
        make_client, backend_config, recorded, b"", digest_of(recorded)
    )
    alive = await start_upload(client, REPO)
    alive = await patch(client, alive, b"still here", 0)
    hosted = hosted_of(client)
    lost_id = lost.rsplit("/", 1)[1]

    # Within the grace a retried finish may still come: the row stays.
    assert await hosted.reconcile_uploads(grace=3600) == 0
    assert await hosted.meta.get_upload(lost_id) is not None
    time.sleep(0.01)  # noqa: ASYNC251 - only to be past "updated" by a clock tick
    assert await hosted.reconcile_uploads(grace=0.001) == 1
    assert await hosted.meta.get_upload(lost_id) is None
    resp = await client.get(alive)
    assert resp.status == 204
    assert resp.headers["Range"] == "0-9"


async def test_lost_upload_rows_are_dropped_by_the_sweep(
    make_client: MakeClient, tmp_path: Path
) -> None:
    """Wired into the app: the sweep (which also runs at start-up) drops the row once it
    has been idle for ``uploads.lost_grace``; uploads whose bytes are stored stay."""
    config = make_config(tmp_path, uploads__lost_grace=0.2, uploads__purge_interval=0.05)
    recorded = os.urandom(MiB)
    client, lost = await crash_after_publish(
        make_client, config, recorded, b"", digest_of(recorded)
    )
    alive = await patch(client, await start_upload(client, REPO), b"kept", 0)
    meta = hosted_of(client).meta
    async with asyncio.timeout(10):
        while await meta.get_upload(lost.rsplit("/", 1)[1]) is not None:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    resp = await client.get(alive)
    assert resp.status == 204
    assert resp.headers["Range"] == "0-3"


@pytest.mark.parametrize("ending", ["cancel", "purge", "status"])
async def test_upload_row_left_after_the_blob_row(
    make_client: MakeClient, backend_config: Config, ending: str
) -> None:
    """Killed after the blob's row, before the upload's row went: whatever ends the upload
    leaves the blob's bytes alone. On S3 the upload was taken over by another process first,
    so its blob key held a partial object once, which cancelling an upload deletes."""
    first = await make_client(backend_config)
    data = os.urandom(12 * MiB)
    digest = digest_of(data)
    location = await start_upload(first, REPO)
    location = await patch(first, location, data[: 6 * MiB], 0)
    second = await make_client(backend_config)  # continues it: a takeover on S3
    location = await patch(second, location, data[6 * MiB :], 6 * MiB)
    hosted = hosted_of(second)
    upload = await hosted.meta.get_upload(location.rsplit("/", 1)[1])
    assert upload is not None
    writer = await hosted.storage.open_writer(upload.id, upload.state, upload.offset)
    key = await writer.commit(Digest.parse(digest))
    await hosted.meta.add_blob(REPO, BlobRow(Digest.parse(digest), len(data), key))
    # killed here: the upload's row is still there
    await first.close()
    await second.close()

    client = await make_client(backend_config)
    if ending == "cancel":
        resp = await client.delete(location)
        assert resp.status in (204, 404)
    elif ending == "purge":
        time.sleep(0.01)  # noqa: ASYNC251 - only to be past "updated" by a clock tick
        assert await hosted_of(client).purge_stale_uploads(0.001) == 1
    else:
        await assert_upload_unknown(client, location)
    assert await hosted_of(client).meta.get_upload(upload.id) is None
    resp = await client.get(f"/v2/{REPO}/blobs/{digest}")
    assert resp.status == 200
    assert await resp.read() == data
