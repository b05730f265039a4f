"""Pull times are batched: many manifest GETs and HEADs make at most one write per manifest
per flush period."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from blockbuster import BlockBuster

from regproxy.lifecycle import pulls
from regproxy.lifecycle.pulls import PULLS
from regproxy.meta.sqlite import SqliteMetadataStore
from regproxy.oci import Digest
from tests.conftest import MakeClient
from tests.helpers import Client, app_of, make_config, push_image
from tests.lifecycle.cache import pull, sqlite_meta
from tests.proxy.fakeupstream import FakeUpstream


class WriteCounter:
    """Counts the pull-time writes the store is asked for: batches, and rows per manifest."""

    def __init__(self, client: Client) -> None:
        self.batches = 0
        self.rows: Counter[tuple[str, str]] = Counter()
        meta = sqlite_meta(client)
        original = meta.record_pulls

        async def record_pulls(pulls: Sequence[tuple[str, Digest, float]]) -> None:
            self.batches += 1
            self.rows.update((repo, str(digest)) for repo, digest, _ in pulls)
            await original(pulls)

        meta.record_pulls = record_pulls  # type: ignore[method-assign]

    async def wait(self, rows: int) -> None:
        for _ in range(500):
            if sum(self.rows.values()) >= rows:
                return
            await asyncio.sleep(0.01)


async def last_pulled(client: Client, repo: str, digest: str) -> float | None:
    rows = await sqlite_meta(client)._all(
        "SELECT last_pulled FROM manifests WHERE repo = ? AND digest = ?", (repo, digest)
    )
    return rows[0][0] if rows else None


@pytest.fixture(autouse=True)
def fast_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pulls, "TICK", 0.02)


async def test_many_pulls_make_one_write_per_flush_period(
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
    # The first pull of each was written soon (other processes' eviction must see it)...
    await writes.wait(2)
    keys = [("team/app", hosted.digest), ("fake/lib/app", cached.digest)]
    for repo, digest in keys:
        at = await last_pulled(client, repo, digest)
        assert at is not None and started <= at <= time.time()
    # ... and nothing more within the period, however many pulls follow.
    for _ in range(25):
        assert (await client.get("/v2/team/app/manifests/1")).status == 200
        assert (await client.head("/v2/fake/lib/app/manifests/1")).status == 200
        await asyncio.sleep(0.004)  # several batch ticks go by
    assert dict(writes.rows) == {key: 1 for key in keys}
    assert writes.batches <= 2
    # A flush (a GC pass, shutdown) writes what is pending, in one transaction.
    batches = writes.batches
    assert await app_of(client)[PULLS].flush() == 2
    assert writes.batches == batches + 1
    assert dict(writes.rows) == {key: 2 for key in keys}


async def test_a_hot_tag_is_written_once_per_period(
    make_client: MakeClient, tmp_path: Path
) -> None:
    interval = 0.3
    client = await make_client(make_config(tmp_path, cache__pull_flush_interval=interval))
    image = await push_image(client, "team/app", "1")
    writes = WriteCounter(client)
    started = time.monotonic()
    for _ in range(100):
        assert (await client.get("/v2/team/app/manifests/1")).status == 200
        await asyncio.sleep(0.01)
    elapsed = time.monotonic() - started
    await writes.wait(1)
    assert await last_pulled(client, "team/app", image.digest) is not None
    # At most one write per period (the first at once), whatever the number of pulls.
    assert 1 <= writes.rows[("team/app", image.digest)] <= 2 + elapsed / interval


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


async def test_a_write_cancelled_midway_leaves_the_store_usable(
    make_client: MakeClient, tmp_path: Path
) -> None:
    client = await make_client(make_config(tmp_path))
    image = await push_image(client, "team/app", "1")
    meta = sqlite_meta(client)
    pull = [("team/app", Digest.parse(image.digest), time.time())]
    for steps in range(12):  # cancel at every point: before, during and after BEGIN, COMMIT
        task = asyncio.create_task(meta.record_pulls(pull))
        for _ in range(steps):
            await asyncio.sleep(0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await meta.record_pulls(pull)  # not "cannot start a transaction within a transaction"
    assert await last_pulled(client, "team/app", image.digest) == pytest.approx(pull[0][2])
