"""Uploads across restarts and crashes, and the purge of abandoned uploads."""

from __future__ import annotations

import asyncio
from pathlib import Path

from regproxy.config import Config
from regproxy.metrics import METRICS
from regproxy.registry.hosted import HostedRegistry
from regproxy.tasks import HOSTED
from tests.conftest import MakeClient
from tests.helpers import (
    Client,
    app_of,
    assert_error,
    digest_of,
    files_under,
    make_config,
    start_upload,
)

DATA = bytes(range(256)) * 64


def _append(path: Path, data: bytes) -> None:
    with path.open("ab") as f:
        f.write(data)


async def _patch(client: Client, location: str, chunk: bytes, start: int) -> None:
    headers = {"Content-Range": f"{start}-{start + len(chunk) - 1}"}
    resp = await client.patch(location, data=chunk, headers=headers)
    assert resp.status == 202, await resp.text()
    assert resp.headers["Range"] == f"0-{start + len(chunk) - 1}"


async def _finish_after_restart(make_client: MakeClient, config: Config, garbage: bytes) -> Client:
    client = await make_client(config)
    location = await start_upload(client, "app")
    await _patch(client, location, DATA[:1000], 0)
    await client.close()
    upload_file = config.storage_path / "uploads" / location.rsplit("/", 1)[1]
    if garbage:  # a request that wrote bytes but was killed before recording them
        await asyncio.to_thread(_append, upload_file, garbage)

    client = await make_client(config)
    resp = await client.get(location)
    assert resp.status == 204
    assert resp.headers["Range"] == "0-999"
    await _patch(client, location, DATA[1000:3000], 1000)
    digest = digest_of(DATA)
    resp = await client.put(location, params={"digest": digest}, data=DATA[3000:])
    assert resp.status == 201, await resp.text()
    assert resp.headers["Docker-Content-Digest"] == digest
    resp = await client.get(f"/v2/app/blobs/{digest}")
    assert resp.status == 200
    assert await resp.read() == DATA
    assert not upload_file.exists()
    return client


async def test_upload_resumes_after_restart(make_client: MakeClient, config: Config) -> None:
    await _finish_after_restart(make_client, config, b"")


async def test_upload_resumes_after_crash_leftover(make_client: MakeClient, config: Config) -> None:
    await _finish_after_restart(make_client, config, b"garbage past the offset" * 10)


async def test_leftover_bytes_are_dropped_in_the_same_process(
    client: Client, config: Config
) -> None:
    location = await start_upload(client, "app")
    await _patch(client, location, DATA[:1000], 0)
    upload_file = config.storage_path / "uploads" / location.rsplit("/", 1)[1]
    await asyncio.to_thread(_append, upload_file, b"junk")
    await _patch(client, location, DATA[1000:], 1000)
    digest = digest_of(DATA)
    resp = await client.put(location, params={"digest": digest})
    assert resp.status == 201, await resp.text()
    assert await (await client.get(f"/v2/app/blobs/{digest}")).read() == DATA


async def _send_and_hang_up(
    client: Client, method: str, path: str, declared: int, body: bytes
) -> None:
    """Send a request whose body stops short of its Content-Length, then drop the connection."""
    root = client.make_url("/")
    _, writer = await asyncio.open_connection(root.host, root.port)
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: {root.host}\r\nContent-Length: {declared}\r\n"
        "Content-Type: application/octet-stream\r\n\r\n"
    )
    writer.write(head.encode() + body)
    await writer.drain()
    await asyncio.sleep(0.05)
    writer.close()
    await writer.wait_closed()


async def test_client_gone_mid_patch(client: Client, config: Config) -> None:
    big = bytes(range(256)) * 12 * 1024  # 3 MiB: several 1 MiB pieces reach storage
    location = await start_upload(client, "app")
    await _patch(client, location, big[:10], 0)
    await _send_and_hang_up(client, "PATCH", location, len(big), big[10:-100_000])
    # The next chunk waits for the broken request to be rolled back, then goes on at 10.
    await _patch(client, location, big[10:], 10)
    digest = digest_of(big)
    resp = await client.put(location, params={"digest": digest})
    assert resp.status == 201, await resp.text()
    assert await (await client.get(f"/v2/app/blobs/{digest}")).read() == big


async def test_client_gone_mid_monolithic_post(
    client: Client, config: Config, hosted: HostedRegistry
) -> None:
    data = DATA * 100
    digest = digest_of(data)
    path = f"/v2/app/blobs/uploads/?digest={digest}"
    await _send_and_hang_up(client, "POST", path, len(data), data[: len(data) // 2])
    for _ in range(100):
        if not await asyncio.to_thread(files_under, config.storage_path):
            break
        await asyncio.sleep(0.02)
    assert await asyncio.to_thread(files_under, config.storage_path) == []
    assert await hosted.meta.stale_uploads(float("inf")) == []
    await assert_error(await client.get(f"/v2/app/blobs/{digest}"), 404, "BLOB_UNKNOWN")


async def test_stale_uploads_are_purged(make_client: MakeClient, tmp_path: Path) -> None:
    config = make_config(tmp_path, uploads__max_age=0.2)
    client = await make_client(config)
    stale = await start_upload(client, "app")
    await _patch(client, stale, DATA[:100], 0)
    await asyncio.sleep(0.3)
    fresh = await start_upload(client, "app")

    hosted = app_of(client)[HOSTED]
    assert await hosted.purge_stale_uploads(config.uploads.max_age) == 1
    await assert_error(await client.get(stale), 404, "BLOB_UPLOAD_UNKNOWN")
    resp = await client.patch(stale, data=b"x", headers={"Content-Range": "100-100"})
    await assert_error(resp, 404, "BLOB_UPLOAD_UNKNOWN")
    assert (await client.get(fresh)).status == 204
    uploads = await asyncio.to_thread(files_under, config.storage_path / "uploads")
    assert [path.name for path in uploads] == [fresh.rsplit("/", 1)[1]]


async def test_background_purge(make_client: MakeClient, tmp_path: Path) -> None:
    config = make_config(tmp_path, uploads__max_age=0.05, uploads__purge_interval=0.05)
    client = await make_client(config)
    location = await start_upload(client, "app")
    for _ in range(100):
        await asyncio.sleep(0.05)
        if (await client.get(location)).status == 404:
            break
    await assert_error(await client.get(location), 404, "BLOB_UPLOAD_UNKNOWN")
    assert await asyncio.to_thread(files_under, config.storage_path / "uploads") == []
    registry = app_of(client)[METRICS].registry
    assert registry.get_sample_value("registry_gc_deleted_total", {"kind": "upload"}) == 1
    assert (registry.get_sample_value("registry_upload_purges_total") or 0) >= 1


async def test_active_upload_is_not_purged(make_client: MakeClient, tmp_path: Path) -> None:
    config = make_config(tmp_path, uploads__max_age=0.3)
    client = await make_client(config)
    location = await start_upload(client, "app")
    hosted = app_of(client)[HOSTED]
    for i in range(5):
        await asyncio.sleep(0.1)
        await _patch(client, location, DATA[i * 10 : i * 10 + 10], i * 10)
        assert await hosted.purge_stale_uploads(config.uploads.max_age) == 0
    assert (await client.get(location)).headers["Range"] == "0-49"
