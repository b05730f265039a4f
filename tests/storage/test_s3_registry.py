"""The registry on S3 storage, through the HTTP API: pushes and pulls, S3 requests per
operation, uploads continued by another app sharing the bucket and the database, redirects,
cancelled and abandoned uploads, and S3 faults (down, throttling, slow)."""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from regproxy.storage.instrumented import InstrumentedBlobStore
from regproxy.storage.s3 import S3BlobStore
from regproxy.tasks import HOSTED
from tests.conftest import MakeClient
from tests.helpers import (
    OCI_MANIFEST,
    Client,
    app_of,
    assert_error,
    canonical,
    digest_of,
    image_manifest,
    push_manifest,
    start_upload,
)
from tests.s3fixtures import S3

MiB = 1 << 20
REPO = "team/app"


def store_of(client: Client) -> S3BlobStore:
    store = app_of(client)[HOSTED].storage
    if isinstance(store, InstrumentedBlobStore):  # the timing wrapper create_app puts around it
        store = store.inner
    assert isinstance(store, S3BlobStore)
    return store


class RequestLog:
    """Counts the HTTP requests an app's S3 client sends, by operation (retries included)."""

    def __init__(self, client: Client) -> None:
        self.store = store_of(client)
        self.counts: Counter[str] = Counter()
        events = self.store._client.meta.events
        events.register("before-send.s3", self._sent)

    def _sent(self, event_name: str, **kwargs: Any) -> None:
        self.counts[event_name.rsplit(".", 1)[-1]] += 1  # before-send.s3.<Operation>

    async def take(self) -> dict[str, int]:
        """The counts since the last take, background clean-ups included."""
        await self.store.wait_cleanups()
        counts, self.counts = dict(self.counts), Counter()
        return counts


async def patch(client: Client, location: str, data: bytes, start: int) -> str:
    headers = {"Content-Range": f"{start}-{start + len(data) - 1}"} if data else {}
    resp = await client.patch(location, data=data, headers=headers)
    assert resp.status == 202, await resp.text()
    assert resp.headers["Range"] == f"0-{start + len(data) - 1}"
    return resp.headers["Location"]


async def finish(client: Client, location: str, digest: str, data: bytes = b"") -> None:
    resp = await client.put(location, params={"digest": digest}, data=data)
    assert resp.status == 201, await resp.text()
    assert resp.headers["Docker-Content-Digest"] == digest


async def pull(client: Client, digest: str, **kwargs: Any) -> bytes:
    resp = await client.get(f"/v2/{REPO}/blobs/{digest}", **kwargs)
    assert resp.status in (200, 206), await resp.text()
    return await resp.read()


@pytest.fixture
async def client(make_client: MakeClient, s3: S3, tmp_path: Path) -> Client:
    return await make_client(s3.app_config(tmp_path))


async def test_push_pull_and_requests_per_operation(client: Client, s3: S3) -> None:
    log = RequestLog(client)
    data = os.urandom(12 * MiB + 5)
    digest = digest_of(data)

    location = await start_upload(client, REPO)
    assert await log.take() == {}
    location = await patch(client, location, data, 0)
    # two 5 MiB parts, and the last 2 MiB kept as a tail object for whoever finishes
    assert await log.take() == {"CreateMultipartUpload": 1, "UploadPart": 2, "PutObject": 1}
    await finish(client, location, digest)
    # the tail becomes the last part inside S3; then the tail object is deleted
    assert await log.take() == {
        "UploadPartCopy": 1,
        "CompleteMultipartUpload": 1,
        "DeleteObject": 1,
    }
    assert [key for key in await s3.keys()] == [f"blobs/{location.rsplit('/', 1)[1]}"]
    assert await s3.multipart_uploads() == []

    resp = await client.head(f"/v2/{REPO}/blobs/{digest}")
    assert resp.status == 200 and resp.headers["Content-Length"] == str(len(data))
    assert await log.take() == {}

    assert await pull(client, digest) == data
    assert (
        await pull(client, digest, headers={"Range": "bytes=5242870-5242889"})
        == (data[5242870:5242890])
    )
    assert await log.take() == {"GetObject": 2}

    config = canonical({"architecture": "amd64", "os": "linux"})
    config_digest = digest_of(config)
    resp = await client.post(
        f"/v2/{REPO}/blobs/uploads/", params={"digest": config_digest}, data=config
    )
    assert resp.status == 201, await resp.text()
    assert await log.take() == {"PutObject": 1}  # a blob smaller than a part, in one request

    big = os.urandom(12 * MiB)
    resp = await client.post(
        f"/v2/{REPO}/blobs/uploads/", params={"digest": digest_of(big)}, data=big
    )
    assert resp.status == 201, await resp.text()
    assert await log.take() == {
        "CreateMultipartUpload": 1,
        "UploadPart": 3,
        "CompleteMultipartUpload": 1,
    }

    manifest = image_manifest(config, [data])
    manifest_digest = await push_manifest(client, REPO, "v1", manifest, OCI_MANIFEST)
    for method in ("GET", "HEAD"):
        resp = await client.request(
            method, f"/v2/{REPO}/manifests/v1", headers={"Accept": OCI_MANIFEST}
        )
        assert resp.status == 200
        assert resp.headers["Docker-Content-Digest"] == manifest_digest
        if method == "GET":
            assert await resp.read() == canonical(manifest)
    assert await log.take() == {}


@pytest.mark.parametrize("sizes", [[1, 1, 1], [3 * MiB, 4 * MiB, 1], [6 * MiB, 5 * MiB + 3]])
async def test_chunked_pushes(client: Client, s3: S3, sizes: list[int]) -> None:
    chunks = [os.urandom(size) for size in sizes]
    data = b"".join(chunks)
    location = await start_upload(client, REPO)
    offset = 0
    for chunk in chunks[:-1]:
        location = await patch(client, location, chunk, offset)
        offset += len(chunk)
    await finish(client, location, digest_of(data), chunks[-1])
    assert await pull(client, digest_of(data)) == data
    await store_of(client).wait_cleanups()
    assert [key.split("/")[0] for key in await s3.keys()] == ["blobs"]
    assert await s3.multipart_uploads() == []


async def test_finish_with_another_algorithm(client: Client) -> None:
    """A sha512 digest for an upload hashed as sha256: the stored bytes are read back."""
    first, last = os.urandom(7 * MiB), os.urandom(MiB)
    location = await start_upload(client, REPO)
    location = await patch(client, location, first, 0)
    digest = digest_of(first + last, "sha512")
    await finish(client, location, digest, last)
    assert await pull(client, digest) == first + last


async def test_wrong_digest_leaves_nothing(client: Client, s3: S3) -> None:
    data = os.urandom(7 * MiB)
    location = await start_upload(client, REPO)
    location = await patch(client, location, data, 0)
    resp = await client.put(location, params={"digest": digest_of(b"other")})
    await assert_error(resp, 400, "DIGEST_INVALID")
    await store_of(client).wait_cleanups()
    assert await s3.keys() == []
    assert await s3.multipart_uploads() == []


async def test_upload_continued_by_another_app(
    make_client: MakeClient, s3: S3, tmp_path: Path
) -> None:
    """Two apps (two processes) share the SQLite file and the bucket: a chunked upload
    moves between them, each taking it over from the other."""
    first = await make_client(s3.app_config(tmp_path))
    second = await make_client(s3.app_config(tmp_path))
    chunks = [os.urandom(size) for size in (6 * MiB, 3 * MiB, MiB + 1, 5 * MiB, 2)]
    data = b"".join(chunks)
    digest = digest_of(data)

    location = await start_upload(first, REPO)
    offset = 0
    for client, chunk in zip([first, second, first, second], chunks[:-1], strict=False):
        status = await client.get(location)
        assert status.status == 204
        assert status.headers["Range"] == f"0-{max(offset - 1, 0)}"
        location = await patch(client, location, chunk, offset)
        offset += len(chunk)
    await finish(first, location, digest, chunks[-1])

    for client in (first, second):
        assert await pull(client, digest) == data
    for client in (first, second):
        await store_of(client).wait_cleanups()
    assert [key.split("/")[0] for key in await s3.keys()] == ["blobs"]
    assert await s3.multipart_uploads() == []


async def test_finish_in_another_app_without_body(
    make_client: MakeClient, s3: S3, tmp_path: Path
) -> None:
    first = await make_client(s3.app_config(tmp_path))
    second = await make_client(s3.app_config(tmp_path))
    data = os.urandom(11 * MiB)
    location = await start_upload(first, REPO)
    location = await patch(first, location, data, 0)
    await finish(second, location, digest_of(data))
    assert await pull(first, digest_of(data)) == data


async def test_redirect(make_client: MakeClient, s3: S3, tmp_path: Path) -> None:
    client = await make_client(s3.app_config(tmp_path, s3_redirect=True))
    data = os.urandom(MiB + 3)
    digest = digest_of(data)
    resp = await client.post(f"/v2/{REPO}/blobs/uploads/", params={"digest": digest}, data=data)
    assert resp.status == 201

    log = RequestLog(client)
    resp = await client.get(f"/v2/{REPO}/blobs/{digest}", allow_redirects=False)
    assert resp.status == 307
    assert resp.headers["Docker-Content-Digest"] == digest
    url = resp.headers["Location"]
    assert url.startswith(s3.endpoint_url) and "X-Amz-Signature=" in url
    resp = await client.head(f"/v2/{REPO}/blobs/{digest}", allow_redirects=False)
    assert resp.status == 200 and "Location" not in resp.headers
    assert await log.take() == {}  # presigning is local

    async with aiohttp.ClientSession() as session:
        async with session.get(url) as got:
            assert got.status == 200 and await got.read() == data
        async with session.get(url, headers={"Range": "bytes=10-19"}) as got:
            assert got.status == 206 and await got.read() == data[10:20]


async def test_cancel_aborts_the_multipart_upload(client: Client, s3: S3) -> None:
    location = await start_upload(client, REPO)
    location = await patch(client, location, os.urandom(6 * MiB + 1), 0)
    assert len(await s3.multipart_uploads()) == 1
    resp = await client.delete(location)
    assert resp.status == 204
    await assert_error(await client.get(location), 404, "BLOB_UPLOAD_UNKNOWN")
    assert await s3.multipart_uploads() == []
    assert await s3.keys() == []


async def test_abandoned_upload_is_purged(make_client: MakeClient, s3: S3, tmp_path: Path) -> None:
    client = await make_client(s3.app_config(tmp_path, uploads__max_age=0.2))
    location = await start_upload(client, REPO)
    location = await patch(client, location, os.urandom(6 * MiB + 1), 0)
    await asyncio.sleep(0.3)
    assert await app_of(client)[HOSTED].purge_stale_uploads(0.2) == 1
    await assert_error(await client.get(location), 404, "BLOB_UPLOAD_UNKNOWN")
    assert await s3.multipart_uploads() == []
    assert await s3.keys() == []


async def test_purge_loses_to_a_finish_that_came_first(
    make_client: MakeClient, s3: S3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The purge lists an idle upload; before it deletes it, another process finishes it.

    The finish publishes the blob at the upload's own key, so a purge that deleted the upload's
    storage regardless would delete the blob under its fresh row.
    """
    client = await make_client(s3.app_config(tmp_path, uploads__max_age=0.2))
    hosted = app_of(client)[HOSTED]
    data = os.urandom(6 * MiB + 1)
    location = await start_upload(client, REPO)
    location = await patch(client, location, data, 0)
    await asyncio.sleep(0.3)
    list_stale = hosted.meta.stale_uploads

    async def finished_meanwhile(before: float) -> Any:
        stale = await list_stale(before)
        resp = await client.put(location, params={"digest": digest_of(data)})
        assert resp.status == 201, await resp.text()
        return stale

    monkeypatch.setattr(hosted.meta, "stale_uploads", finished_meanwhile)
    assert await hosted.purge_stale_uploads(0.2) == 0
    resp = await client.get(f"/v2/{REPO}/blobs/{digest_of(data)}")
    assert resp.status == 200
    assert await resp.read() == data


async def test_finish_loses_to_a_purge_that_came_first(
    make_client: MakeClient, s3: S3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A finish whose upload was purged while its last body arrived publishes nothing."""
    config = s3.app_config(tmp_path, uploads__max_age=0.2)
    client = await make_client(config)
    other_process = app_of(await make_client(config))[HOSTED]  # same database and bucket
    data = os.urandom(MiB)
    location = await start_upload(client, REPO)
    await asyncio.sleep(0.3)
    purged = asyncio.Event()
    # The purge must come once the finish has found the upload and reads its body: purging
    # before that is a plain 404 for an unknown upload (a race a fast purge can win).
    serving = app_of(client)[HOSTED]
    receiving = asyncio.Event()
    receive = serving._receive

    async def noted_receive(*args: Any, **kwargs: Any) -> Any:
        receiving.set()
        return await receive(*args, **kwargs)

    monkeypatch.setattr(serving, "_receive", noted_receive)

    async def body() -> Any:
        yield data[:1000]
        await receiving.wait()
        # Another process purges the idle upload while this request is still sending.
        assert await other_process.purge_stale_uploads(0.2) == 1
        purged.set()
        yield data[1000:]

    resp = await client.put(location, params={"digest": digest_of(data)}, data=body())
    assert purged.is_set()
    await assert_error(resp, 404, "BLOB_UPLOAD_UNKNOWN")
    await assert_error(await client.get(f"/v2/{REPO}/blobs/{digest_of(data)}"), 404, "BLOB_UNKNOWN")
    await store_of(client).wait_cleanups()
    assert await s3.multipart_uploads() == []


# -- faults -------------------------------------------------------------------------------------


@pytest.fixture
async def faulty(make_client: MakeClient, faulty_s3: S3, tmp_path: Path) -> Client:
    config = faulty_s3.app_config(tmp_path, s3_read_timeout=1.0, s3_connect_timeout=1.0)
    return await make_client(config)


async def unavailable(resp: aiohttp.ClientResponse) -> None:
    await assert_error(resp, 503, "UNAVAILABLE")


async def test_s3_down_mid_upload(faulty: Client, faulty_s3: S3) -> None:
    moto, relay = faulty_s3.moto, faulty_s3.relay
    assert relay is not None
    stored = os.urandom(3 * MiB)
    stored_digest = digest_of(stored)
    resp = await faulty.post(
        f"/v2/{REPO}/blobs/uploads/", params={"digest": stored_digest}, data=stored
    )
    assert resp.status == 201
    chunks = [os.urandom(size) for size in (6 * MiB, 4 * MiB, 7 * MiB)]
    data = b"".join(chunks)
    digest = digest_of(data)
    location = await start_upload(faulty, REPO)
    location = await patch(faulty, location, chunks[0], 0)

    moto.stop()  # S3 goes away, and with it every open connection
    relay.cut()
    resp = await faulty.patch(
        location, data=chunks[1], headers={"Content-Range": f"{6 * MiB}-{10 * MiB - 1}"}
    )
    await unavailable(resp)
    await unavailable(await faulty.get(f"/v2/{REPO}/blobs/{stored_digest}"))
    resp = await faulty.head(f"/v2/{REPO}/blobs/{stored_digest}")  # metadata only
    assert resp.status == 200
    await unavailable(await faulty.put(location, params={"digest": digest}, data=chunks[1]))
    resp = await faulty.get(location)
    assert resp.status == 204 and resp.headers["Range"] == f"0-{6 * MiB - 1}"
    assert (await faulty.head(f"/v2/{REPO}/blobs/{digest}")).status == 404

    moto.start()  # back on the same port, with its data: no restart of regproxy needed
    location = await patch(faulty, location, chunks[1], 6 * MiB)
    await finish(faulty, location, digest, chunks[2])
    assert await pull(faulty, digest) == data
    assert await pull(faulty, stored_digest) == stored


async def test_s3_down_when_an_upload_finishes(faulty: Client, faulty_s3: S3) -> None:
    moto, relay = faulty_s3.moto, faulty_s3.relay
    assert relay is not None
    data = os.urandom(8 * MiB)
    digest = digest_of(data)
    location = await start_upload(faulty, REPO)
    location = await patch(faulty, location, data, 0)
    moto.stop()
    relay.cut()
    await unavailable(await faulty.put(location, params={"digest": digest}))
    assert (await faulty.head(f"/v2/{REPO}/blobs/{digest}")).status == 404
    moto.start()
    await finish(faulty, location, digest)
    assert await pull(faulty, digest) == data


async def test_s3_throttling(faulty: Client, faulty_s3: S3) -> None:
    relay = faulty_s3.relay
    assert relay is not None
    data = os.urandom(6 * MiB)
    digest = digest_of(data)
    relay.set_mode("slowdown", slowdowns=1)  # one 503 SlowDown: the retry succeeds
    resp = await faulty.post(f"/v2/{REPO}/blobs/uploads/", params={"digest": digest}, data=data)
    assert resp.status == 201, await resp.text()
    assert relay.answered_503 == 1
    await store_of(faulty).wait_cleanups()

    relay.set_mode("slowdown")  # throttling that outlasts the retries
    await unavailable(await faulty.get(f"/v2/{REPO}/blobs/{digest}"))
    assert relay.answered_503 == 3  # max_attempts = 2
    relay.set_mode("pass")
    assert await pull(faulty, digest) == data


async def test_s3_slow(faulty: Client, faulty_s3: S3) -> None:
    relay = faulty_s3.relay
    assert relay is not None
    data = os.urandom(100)
    digest = digest_of(data)
    resp = await faulty.post(f"/v2/{REPO}/blobs/uploads/", params={"digest": digest}, data=data)
    assert resp.status == 201
    relay.set_mode("slow")  # nothing answers: read timeouts
    await unavailable(await faulty.get(f"/v2/{REPO}/blobs/{digest}"))
    relay.set_mode("pass")
    assert await pull(faulty, digest) == data


async def test_s3_fails_mid_download_cuts_the_connection(faulty: Client, faulty_s3: S3) -> None:
    relay = faulty_s3.relay
    assert relay is not None
    data = os.urandom(24 * MiB)
    digest = digest_of(data)
    resp = await faulty.post(f"/v2/{REPO}/blobs/uploads/", params={"digest": digest}, data=data)
    assert resp.status == 201
    resp = await faulty.get(f"/v2/{REPO}/blobs/{digest}")
    assert resp.status == 200
    await resp.content.readexactly(MiB)
    relay.cut()
    with pytest.raises((aiohttp.ClientPayloadError, aiohttp.ClientConnectionError)):
        await resp.read()
    assert await pull(faulty, digest) == data
