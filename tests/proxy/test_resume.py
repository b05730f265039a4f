"""Cut upstream transfers are resumed, not started over.

A fill whose upstream connection breaks mid-body asks for the rest with ``Range: bytes=N-``
(within the same fill, so its clients see no break), falls back to the whole blob when the
upstream ignores ``Range``, and verifies the digest before anything is cached. A fill that
gives up, or a process that is stopped, leaves its spool for the next fill of the digest.
The fake upstream counts the blob bytes it sends.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import time
from pathlib import Path

import pytest
import yarl

from regproxy.api.keys import CONFIG
from regproxy.tasks import HOSTED
from tests.conftest import MakeClient
from tests.helpers import Client, app_of, make_config
from tests.proxy.conftest import cached_blob, leftover_files, partial_fills, stored_file
from tests.proxy.fakeupstream import FakeUpstream
from tests.proxy.test_blobs import (
    BLOB,
    IN_FLIGHT,
    REPO,
    big_blob,
    eventually,
    get_body,
    no_fill_running,
    read_broken,
)

MiB = 1 << 20


def spool_dir(client: Client) -> Path:
    return app_of(client)[CONFIG].data_path / "spool"


async def assert_cached(client: Client, digest: str, data: bytes) -> None:
    await eventually(lambda: cached_blob(client, digest))
    await eventually(lambda: no_fill_running(client))
    stored = stored_file(client, digest)
    assert stored is not None and stored.read_bytes() == data
    assert leftover_files(client) == []


async def test_cut_transfer_resumes_within_the_fill(proxy: Client, upstream: FakeUpstream) -> None:
    digest, data = big_blob(upstream, 5 * MiB)
    upstream.cut_once = {digest: len(data) * 6 // 10}
    bodies = await asyncio.gather(*(get_body(proxy, f"{BLOB}/{digest}") for _ in range(3)))
    assert bodies == [data] * 3  # no client saw the cut
    assert upstream.blob_gets(REPO, digest) == 1
    assert upstream.ranged_gets(REPO, digest) == 1
    resumed = [s for s in upstream.seen if s.headers.get("Range")]
    assert len(resumed) == 1 and int(resumed[0].headers["Range"][6:-1]) > 0
    assert upstream.bytes_sent[digest] <= len(data) + IN_FLIGHT
    await assert_cached(proxy, digest, data)


async def test_upstream_ignoring_range_is_fetched_again(
    proxy: Client, upstream: FakeUpstream
) -> None:
    digest, data = big_blob(upstream, 5 * MiB)
    upstream.ranges = "ignore"
    upstream.cut_once = {digest: len(data) * 6 // 10}
    assert await get_body(proxy, f"{BLOB}/{digest}") == data
    assert upstream.blob_gets(REPO, digest) == 2  # the whole blob again, its start skipped
    assert upstream.ranged_gets(REPO, digest) == 0
    assert upstream.bytes_sent[digest] == len(data) + len(data) * 6 // 10
    await assert_cached(proxy, digest, data)


async def test_wrong_bytes_in_the_resumed_range(proxy: Client, upstream: FakeUpstream) -> None:
    digest, data = big_blob(upstream, 5 * MiB)
    upstream.wrong_ranges = {digest}
    upstream.cut_once = {digest: len(data) * 6 // 10}
    await read_broken(proxy, f"{BLOB}/{digest}")  # never a complete-looking wrong body
    await eventually(lambda: no_fill_running(proxy))
    assert not await cached_blob(proxy, digest)
    assert stored_file(proxy, digest) is None
    assert leftover_files(proxy) == []  # the spool is not kept: its bytes proved wrong

    upstream.wrong_ranges = set()
    upstream.reset_counters()
    assert await get_body(proxy, f"{BLOB}/{digest}") == data
    assert upstream.blob_gets(REPO, digest) == 1 and upstream.ranged_gets(REPO, digest) == 0
    await assert_cached(proxy, digest, data)


@pytest.mark.parametrize("ranges", ["honour", "ignore"])
async def test_fill_resumes_after_a_restart(
    make_client: MakeClient, upstream: FakeUpstream, tmp_path: Path, ranges: str
) -> None:
    """The first process gives up (the upstream keeps cutting) or is stopped; the next one
    continues from the spool it left."""
    assert upstream.base_url is not None
    config = make_config(tmp_path, upstreams={"fake": {"url": str(upstream.base_url)}})
    digest, data = big_blob(upstream, 6 * MiB)
    upstream.fail_after = {digest: 4 * MiB}
    before = await make_client(config)
    await read_broken(before, f"{BLOB}/{digest}")
    await eventually(lambda: no_fill_running(before))
    await before.close()
    spooled = partial_fills(before)[digest]
    assert 0 < spooled <= 4 * MiB

    upstream.fail_after = {}
    upstream.ranges = ranges
    after = await make_client(config)
    assert partial_fills(after) == {digest: spooled}  # start-up kept it
    sent_before = upstream.bytes_sent[digest]
    assert await get_body(after, f"{BLOB}/{digest}") == data
    if ranges == "honour":
        assert upstream.bytes_sent[digest] - sent_before == len(data) - spooled
        assert upstream.bytes_sent[digest] <= len(data) + IN_FLIGHT
    else:
        assert upstream.bytes_sent[digest] - sent_before == len(data)
    await assert_cached(after, digest, data)


def _touch(path: Path, data: bytes, age: float = 0.0) -> None:
    path.write_bytes(data)
    if age:
        then = time.time() - age
        os.utime(path, (then, then))


async def test_start_up_reconciles_the_spool(
    make_client: MakeClient, upstream: FakeUpstream, tmp_path: Path
) -> None:
    assert upstream.base_url is not None
    config = make_config(
        tmp_path, upstreams={"fake": {"url": str(upstream.base_url)}}, uploads__max_age=3600
    )
    # What a killed fill leaves: its spool, the note of its upload beside it, the upload.
    first = await make_client(config)
    killed = await app_of(first)[HOSTED].start_upload(f"fake/{REPO}")
    await first.close()
    spool = config.data_path / "spool"
    fresh = spool / f"sha256-{'a' * 64}.partial"
    old = spool / f"sha256-{'b' * 64}.partial"
    private = spool / f"sha256-{'c' * 64}.partial.0b3a3f9e-5f7e-4a0e-9d55-1d4f3c1a2b3c.tmp"
    legacy = spool / "5d7c1f2e-9a1b-4c3d-8e7f-0a1b2c3d4e5f.spool"  # an older version's name
    live = spool / f"sha256-{'d' * 64}.partial.11111111-2222-3333-4444-555555555555.tmp"
    _touch(fresh, b"x" * 100)
    _touch(old, b"x" * 100, age=7200)
    _touch(private, b"x" * 100)
    _touch(legacy, b"x" * 100)
    _touch(live, b"x" * 100)
    _touch(spool / (old.name + ".upload"), killed.id.encode())
    with live.open("rb") as held:  # a fill of another process sharing the data directory
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        client = await make_client(config)
    assert sorted(p.name for p in spool_dir(client).iterdir()) == sorted([fresh.name, live.name])
    assert await app_of(client)[HOSTED].meta.get_upload(killed.id) is None
    assert not any((config.storage_path / "uploads").iterdir())


async def test_resume_through_a_cdn_redirect(
    proxy: Client, upstream: FakeUpstream, cdn: yarl.URL
) -> None:
    """Docker Hub sends blobs from a CDN: the resumed request is redirected too, and its
    Range goes along."""
    digest, data = big_blob(upstream, 5 * MiB)
    upstream.redirect_to = cdn
    upstream.cut_once = {digest: len(data) // 2}
    assert await get_body(proxy, f"{BLOB}/{digest}") == data
    at_cdn = [s for s in upstream.seen if s.server == "cdn"]
    assert len(at_cdn) == 2
    assert "Range" not in at_cdn[0].headers and at_cdn[1].headers["Range"].startswith("bytes=")
    assert upstream.count("GET", f"cdn:/cdn/{REPO}/{digest}", 206) == 1
    assert upstream.bytes_sent[digest] <= len(data) + IN_FLIGHT
    await assert_cached(proxy, digest, data)


async def test_two_processes_fill_the_same_blob(
    make_client: MakeClient, upstream: FakeUpstream, tmp_path: Path
) -> None:
    """Two apps on one data directory that both fill (the first one's lease was lost, see
    regproxy.cluster): the second finds the spool locked and fills with a private one, which
    it never leaves behind; both serve the exact bytes."""
    assert upstream.base_url is not None
    config = make_config(tmp_path, upstreams={"fake": {"url": str(upstream.base_url)}})
    first, second = await make_client(config), await make_client(config)
    digest, data = big_blob(upstream, 3 * MiB)
    upstream.slow, upstream.slow_first = {digest}, MiB
    pull_first = asyncio.create_task(get_body(first, f"{BLOB}/{digest}"))
    await asyncio.wait_for(upstream.first_sent.wait(), 10)
    upstream.first_sent.clear()
    meta = app_of(first)[HOSTED].meta
    lease = await meta.get_lease(f"blob:{digest}")
    assert lease is not None
    assert await meta.release_lease(lease.key, lease.owner)  # as if it had expired
    pull_second = asyncio.create_task(get_body(second, f"{BLOB}/{digest}"))
    await asyncio.wait_for(upstream.first_sent.wait(), 10)
    names = sorted(p.name for p in spool_dir(first).iterdir())
    assert names[0] == f"sha256-{digest.split(':')[1]}.partial"
    assert any(name.endswith(".tmp") for name in names)  # the second one's own
    upstream.release.set()
    assert await pull_first == data and await pull_second == data
    # Both fills end before leftovers are looked for: the directory is shared, and the
    # second one may still be removing its private spool when the first one is done.
    await eventually(lambda: no_fill_running(second))
    await assert_cached(first, digest, data)
    assert leftover_files(second) == []


async def test_a_second_process_follows_the_first_ones_fill(
    make_client: MakeClient, upstream: FakeUpstream, tmp_path: Path
) -> None:
    """Two apps on one data directory (two workers): the second follows the first's fill
    through its spool file, the upstream sends the blob once, both serve the exact bytes."""
    assert upstream.base_url is not None
    config = make_config(tmp_path, upstreams={"fake": {"url": str(upstream.base_url)}})
    first, second = await make_client(config), await make_client(config)
    digest, data = big_blob(upstream, 3 * MiB)
    upstream.slow, upstream.slow_first = {digest}, MiB
    pull_first = asyncio.create_task(get_body(first, f"{BLOB}/{digest}"))
    await asyncio.wait_for(upstream.first_sent.wait(), 10)
    resp = await second.get(f"{BLOB}/{digest}")
    assert resp.status == 200
    assert resp.content_length == len(data)
    upstream.release.set()
    assert await resp.read() == data
    assert await pull_first == data
    assert upstream.count("GET", f"/v2/{REPO}/blobs/{digest}") == 1
    await assert_cached(second, digest, data)


@pytest.mark.parametrize("extra", [0, 10])
async def test_spool_holding_all_or_more_than_the_blob(
    make_client: MakeClient, upstream: FakeUpstream, tmp_path: Path, extra: int
) -> None:
    """A kill after the last byte was spooled, before the commit: the upstream answers the
    range past the end with 416 and the spool is used as it is. A spool longer than the
    blob (416 for another size) is dropped and the blob fetched again."""
    assert upstream.base_url is not None
    config = make_config(tmp_path, upstreams={"fake": {"url": str(upstream.base_url)}})
    digest, data = big_blob(upstream, 2 * MiB)
    spool = config.data_path / "spool"
    spool.mkdir(parents=True)
    _touch(spool / f"sha256-{digest.split(':')[1]}.partial", data + os.urandom(extra))
    client = await make_client(config)
    assert await get_body(client, f"{BLOB}/{digest}") == data
    assert upstream.count("GET", f"/v2/{REPO}/blobs/{digest}", 416) == 1
    assert upstream.bytes_sent[digest] == (len(data) if extra else 0)
    await assert_cached(client, digest, data)
