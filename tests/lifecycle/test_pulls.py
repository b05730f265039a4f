"""Pull times are batched: many manifest GETs and HEADs make one write per flush period."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from blockbuster import BlockBuster

from regproxy.meta.sqlite import SqliteMetadataStore
from regproxy.oci import Digest
from tests.conftest import MakeClient
from tests.helpers import Client, make_config, push_image
from tests.lifecycle.cache import flush_pulls, pull, sqlite_meta
from tests.proxy.fakeupstream import FakeUpstream


class WriteCounter:
    """Counts the pull-time writes the store is asked for, and the manifests in each."""

    def __init__(self, client: Client) -> None:
        self.batches: list[int] = []
        meta = sqlite_meta(client)
        original = meta.record_pulls

        async def record_pulls(pulls: Sequence[tuple[str, Digest, float]]) -> None:
            self.batches.append(len(pulls))
            await original(pulls)

        meta.record_pulls = record_pulls  # type: ignore[method-assign]


async def last_pulled(client: Client, repo: str, digest: str) -> float | None:
    rows = await sqlite_meta(client)._all(
        "SELECT last_pulled FROM manifests WHERE repo = ? AND digest = ?", (repo, digest)
    )
    return rows[0][0] if rows else None


async def test_many_pulls_make_one_write_per_flush(
    make_client: MakeClient, tmp_path: Path, upstream: FakeUpstream
) -> None:
    config = make_config(
        tmp_path,
        upstreams={"fake": {"url": str(upstream.base_url)}},
        cache__pull_flush_interval=3600.0,
    )
    client = await make_client(config)
    hosted = await push_image(client, "team/app", "1")
    cached = upstream.add_image("lib/app", "1")
    writes = WriteCounter(client)
    started = time.time()
    for _ in range(25):
        for repo in ("team/app", "fake/lib/app"):
            assert (await client.get(f"/v2/{repo}/manifests/1")).status == 200
            assert (await client.head(f"/v2/{repo}/manifests/1")).status == 200
    await pull(client, "team/app", hosted.digest)
    assert writes.batches == []  # nothing written on the request path
    assert await last_pulled(client, "team/app", hosted.digest) is None
    await flush_pulls(client)
    assert writes.batches == [2]  # one transaction, one row per manifest
    for repo, digest in (("team/app", hosted.digest), ("fake/lib/app", cached.digest)):
        at = await last_pulled(client, repo, digest)
        assert at is not None and started <= at <= time.time()
    await flush_pulls(client)
    assert writes.batches == [2]  # nothing new: no write


async def test_pulls_are_flushed_in_the_background(make_client: MakeClient, tmp_path: Path) -> None:
    client = await make_client(make_config(tmp_path, cache__pull_flush_interval=0.2))
    image = await push_image(client, "team/app", "1")
    writes = WriteCounter(client)
    for _ in range(20):
        assert (await client.get("/v2/team/app/manifests/1")).status == 200
    for _ in range(250):
        if await last_pulled(client, "team/app", image.digest) is not None:
            break
        await asyncio.sleep(0.02)
    assert await last_pulled(client, "team/app", image.digest) is not None
    assert sum(writes.batches) == 1


async def test_pending_pulls_are_written_on_shutdown(
    aiohttp_client: Any, tmp_path: Path, blockbuster: BlockBuster
) -> None:
    from regproxy.app import create_app

    config = make_config(tmp_path, cache__pull_flush_interval=3600.0)
    blockbuster.deactivate()
    client = await aiohttp_client(create_app(config))
    image = await push_image(client, "team/app", "1")
    assert (await client.get("/v2/team/app/manifests/1")).status == 200
    await client.close()
    meta = await SqliteMetadataStore.open(config.data_path / "metadata.sqlite")
    try:
        rows = await meta._all(
            "SELECT last_pulled FROM manifests WHERE digest = ?", (image.digest,)
        )
    finally:
        await meta.close()
    assert rows[0][0] is not None
