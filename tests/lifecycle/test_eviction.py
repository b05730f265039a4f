"""The pull-through cache's byte budget: least recently pulled images are evicted, through
real HTTP pulls against the scripted upstream, on each metadata backend."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from regproxy.lifecycle.eviction import EVICTOR
from regproxy.oci import Digest
from tests.conftest import MakeClient
from tests.helpers import (
    Client,
    app_of,
    digest_of,
    files_under,
    push_blob,
    push_manifest,
)
from tests.lifecycle.cache import age, pull, settle, stored_bytes
from tests.lifecycle.conftest import LifecycleConfig
from tests.proxy.conftest import meta_of
from tests.proxy.fakeupstream import FakeImage, FakeUpstream, descriptor, pretty

MiB = 1 << 20
pytestmark = pytest.mark.usefixtures("lifecycle_config")  # every test on each backend
OCI_ACCEPT = "application/vnd.oci.image.index.v1+json"
IMAGE = 4 * MiB


def add_images(upstream: FakeUpstream, repo: str, count: int, size: int = IMAGE) -> list[FakeImage]:
    """``count`` images of one distinct layer of ``size`` bytes each (plus a small config)."""
    return [
        upstream.add_image(repo, f"v{i}", [os.urandom(size)], seed=f"{repo}-{i}")
        for i in range(count)
    ]


def blob_gets(upstream: FakeUpstream, image: FakeImage) -> int:
    return sum(upstream.blob_gets(image.repo, digest) for digest in image.blobs)


async def start(
    make_client: MakeClient,
    configs: LifecycleConfig,
    upstream: FakeUpstream,
    tmp_path: Path,
    **settings: Any,
) -> Client:
    upstreams = settings.pop("upstreams", None) or {"fake": {"url": str(upstream.base_url)}}
    config = await configs(tmp_path, upstreams=upstreams, cache__grace=0.0, **settings)
    return await make_client(config)


async def cache_usage(client: Client, *prefixes: str) -> int:
    return (await meta_of(client).cache_usage(list(prefixes) or ["fake"])).total


async def test_budget_keeps_the_cache_within_budget_plus_one_image(
    make_client: MakeClient,
    upstream: FakeUpstream,
    tmp_path: Path,
    lifecycle_config: LifecycleConfig,
) -> None:
    budget = 40 * MiB
    client = await start(make_client, lifecycle_config, upstream, tmp_path, cache__max_bytes=budget)
    images = add_images(upstream, "lib/app", 30)
    hot = images[0]
    hot_manifest, hot_blobs = await pull(client, "fake/lib/app", "v0")
    peak = 0
    for image in images[1:]:
        manifest, blobs = await pull(client, "fake/lib/app", image.tag or "")
        assert manifest == image.manifest and blobs == image.blobs
        # The hot image, pulled again and again in between, is never the least recent.
        assert await pull(client, "fake/lib/app", "v0") == (hot_manifest, hot_blobs)
        await settle(client)
        peak = max(peak, stored_bytes(client))
        assert await cache_usage(client) == stored_bytes(client)
    assert peak <= budget + IMAGE + 64 * 1024, peak
    assert blob_gets(upstream, hot) == len(hot.blobs)  # fetched once: 0 GETs since
    # Evicted images come back from upstream, byte for byte.
    evicted = [image for image in images[1:10] if blob_gets(upstream, image) == len(image.blobs)]
    assert (
        evicted
        and await meta_of(client).get_manifest("fake/lib/app", Digest.parse(evicted[0].digest))
        is None
    )
    for image in evicted[:3]:
        manifest, blobs = await pull(client, "fake/lib/app", image.tag or "")
        assert manifest == image.manifest and blobs == image.blobs
        assert blob_gets(upstream, image) == 2 * len(image.blobs)
        await settle(client)
    assert stored_bytes(client) <= budget + IMAGE + 64 * 1024


async def test_blob_shared_with_a_hosted_repository_survives_eviction(
    make_client: MakeClient,
    upstream: FakeUpstream,
    tmp_path: Path,
    lifecycle_config: LifecycleConfig,
) -> None:
    client = await start(
        make_client, lifecycle_config, upstream, tmp_path, cache__max_bytes=6 * MiB
    )
    shared = os.urandom(IMAGE)
    first = upstream.add_image("lib/app", "shared", [shared], seed="shared")
    others = add_images(upstream, "lib/app", 3)
    assert (await pull(client, "fake/lib/app", "shared"))[1] == first.blobs
    # A hosted image uses the same layer (mounted by digest, as a client would).
    resp = await client.post(
        "/v2/team/app/blobs/uploads/", params={"mount": digest_of(shared), "from": "fake/lib/app"}
    )
    assert resp.status == 201
    config = b'{"architecture":"amd64","os":"linux"}'
    await push_blob(client, "team/app", config)
    doc = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": descriptor("application/vnd.oci.image.config.v1+json", config),
        "layers": [descriptor("application/vnd.oci.image.layer.v1.tar+gzip", shared)],
    }
    await push_manifest(client, "team/app", "1", pretty(doc))
    for image in others:
        await pull(client, "fake/lib/app", image.tag or "")
        await settle(client)
    meta = meta_of(client)
    assert await meta.get_tagged_manifest("fake/lib/app", "shared") is None  # evicted
    assert await meta.get_blob(Digest.parse(digest_of(shared))) is not None
    # Linked from a hosted repository too: not counted as cache bytes.
    assert await cache_usage(client) <= 6 * MiB
    manifest, blobs = await pull(client, "team/app", "1")
    assert manifest == pretty(doc) and blobs[digest_of(shared)] == shared


async def test_max_idle_evicts_images_not_pulled_for_that_long(
    make_client: MakeClient,
    upstream: FakeUpstream,
    tmp_path: Path,
    lifecycle_config: LifecycleConfig,
) -> None:
    client = await start(make_client, lifecycle_config, upstream, tmp_path, cache__max_idle=3600.0)
    old, fresh = add_images(upstream, "lib/app", 2, size=1000)
    await pull(client, "fake/lib/app", "v0")
    await pull(client, "fake/lib/app", "v1")
    await settle(client)
    await age(client, 7200, "fake/lib/app")
    await pull(client, "fake/lib/app", "v1")  # used just now: stays
    report = await app_of(client)[EVICTOR].run()
    assert [str(image.digest) for image in report.images] == [old.digest]
    assert {str(blob.digest) for blob in report.blobs} == set(old.blobs)
    meta = meta_of(client)
    assert await meta.get_tagged_manifest("fake/lib/app", "v0") is None
    assert await meta.get_tagged_manifest("fake/lib/app", "v1") is not None
    for digest in old.blobs:
        assert await meta.get_blob(Digest.parse(digest)) is None
    for digest in fresh.blobs:
        assert await meta.get_blob(Digest.parse(digest)) is not None
    # And it comes back on the next pull.
    assert (await pull(client, "fake/lib/app", "v0"))[1] == old.blobs


async def test_dry_run_lists_without_evicting(
    make_client: MakeClient,
    upstream: FakeUpstream,
    tmp_path: Path,
    lifecycle_config: LifecycleConfig,
) -> None:
    client = await start(make_client, lifecycle_config, upstream, tmp_path, cache__max_idle=60.0)
    add_images(upstream, "lib/app", 2, size=1000)
    await pull(client, "fake/lib/app", "v0")
    await pull(client, "fake/lib/app", "v1")
    await settle(client)
    await age(client, 120)
    before = stored_bytes(client)
    report = await app_of(client)[EVICTOR].run(dry_run=True)
    assert len(report.images) == 2
    assert stored_bytes(client) == before
    assert await meta_of(client).get_tagged_manifest("fake/lib/app", "v0") is not None


async def test_per_upstream_budget_inside_the_global_one(
    make_client: MakeClient,
    upstream: FakeUpstream,
    tmp_path: Path,
    lifecycle_config: LifecycleConfig,
) -> None:
    url = str(upstream.base_url)
    client = await start(
        make_client,
        lifecycle_config,
        upstream,
        tmp_path,
        cache__max_bytes=20 * MiB,
        upstreams={"small": {"url": url, "max_bytes": 10 * MiB}, "big": {"url": url}},
    )
    small = add_images(upstream, "lib/small", 6)
    big = add_images(upstream, "lib/big", 6)
    slack = IMAGE + 64 * 1024
    for mine, theirs in zip(small, big, strict=True):
        assert (await pull(client, "small/lib/small", mine.tag or ""))[1] == mine.blobs
        assert (await pull(client, "big/lib/big", theirs.tag or ""))[1] == theirs.blobs
        await settle(client)
        usage = await meta_of(client).cache_usage(["small", "big"], per_prefix=["small", "big"])
        assert usage.total == stored_bytes(client) <= 20 * MiB + slack
        assert usage.by_prefix.get("small", 0) <= 10 * MiB + slack
    meta = meta_of(client)
    for name, images in (("small/lib/small", small), ("big/lib/big", big)):
        newest = images[-1]
        assert await meta.get_tagged_manifest(name, newest.tag or "") is not None
        assert await meta.get_tagged_manifest(name, images[0].tag or "") is None


async def test_bytes_shared_by_two_upstreams_count_for_the_cache_only(
    make_client: MakeClient,
    upstream: FakeUpstream,
    tmp_path: Path,
    lifecycle_config: LifecycleConfig,
) -> None:
    url = str(upstream.base_url)
    client = await start(
        make_client,
        lifecycle_config,
        upstream,
        tmp_path,
        upstreams={"small": {"url": url, "max_bytes": 1 * MiB}, "big": {"url": url}},
    )
    add_images(upstream, "lib/app", 1)
    await pull(client, "big/lib/app", "v0")
    await pull(client, "small/lib/app", "v0")  # stored already: linked, not fetched
    await settle(client)
    await app_of(client)[EVICTOR].run()
    usage = await meta_of(client).cache_usage(["small", "big"], per_prefix=["small", "big"])
    assert usage.total == stored_bytes(client) >= IMAGE
    assert usage.by_prefix == {"small": 0, "big": 0}
    # small's own bytes are within its budget: its image stays.
    assert await meta_of(client).get_tagged_manifest("small/lib/app", "v0") is not None


async def test_per_upstream_budget_frees_its_own_bytes(
    make_client: MakeClient,
    upstream: FakeUpstream,
    tmp_path: Path,
    lifecycle_config: LifecycleConfig,
) -> None:
    url = str(upstream.base_url)
    client = await start(
        make_client,
        lifecycle_config,
        upstream,
        tmp_path,
        upstreams={"small": {"url": url, "max_bytes": 10 * MiB}, "big": {"url": url}},
    )
    small = add_images(upstream, "lib/small", 6)
    big = add_images(upstream, "lib/big", 3)
    for image in big:
        await pull(client, "big/lib/big", image.tag or "")
    for image in small:
        await pull(client, "small/lib/small", image.tag or "")
        await settle(client)
        usage = await meta_of(client).cache_usage(["small", "big"], per_prefix=["small", "big"])
        assert usage.by_prefix["small"] <= 10 * MiB + IMAGE + 64 * 1024
    usage = await meta_of(client).cache_usage(["small", "big"], per_prefix=["small", "big"])
    assert usage.by_prefix["big"] >= 3 * IMAGE
    assert usage.total == stored_bytes(client)


async def test_index_is_evicted_with_its_children(
    make_client: MakeClient,
    upstream: FakeUpstream,
    tmp_path: Path,
    lifecycle_config: LifecycleConfig,
) -> None:
    client = await start(make_client, lifecycle_config, upstream, tmp_path, cache__max_idle=60.0)
    amd = upstream.add_image("lib/multi", None, [os.urandom(1000)], seed="amd")
    arm = upstream.add_image("lib/multi", None, [os.urandom(1000)], seed="arm")
    index = upstream.add_index("lib/multi", "latest", [amd, arm])
    resp = await client.get("/v2/fake/lib/multi/manifests/latest", headers={"Accept": OCI_ACCEPT})
    assert await resp.read() == index.manifest
    for child in (amd, arm):
        assert (await pull(client, "fake/lib/multi", child.digest))[1] == child.blobs
    await settle(client)
    await age(client, 120)
    report = await app_of(client)[EVICTOR].run()
    assert [str(i.digest) for i in report.images] == [index.digest]
    meta = meta_of(client)
    for digest in (index.digest, amd.digest, arm.digest):
        assert await meta.get_manifest("fake/lib/multi", Digest.parse(digest)) is None
    assert {str(b.digest) for b in report.blobs} == set(amd.blobs) | set(arm.blobs)
    assert stored_bytes(client) == 0


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 6 MiB tmpfs for blob storage (root only), unmounted at teardown."""
    yield from _tmpfs(tmp_path / "small", 6)


@pytest.fixture
def medium_fs(tmp_path: Path) -> Iterator[Path]:
    yield from _tmpfs(tmp_path / "medium", 16)


def _tmpfs(mount: Path, mib: int) -> Iterator[Path]:
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


async def test_full_storage_still_serves_the_fill_without_caching(
    make_client: MakeClient,
    upstream: FakeUpstream,
    tmp_path: Path,
    lifecycle_config: LifecycleConfig,
    small_fs: Path,
) -> None:
    client = await start(
        make_client, lifecycle_config, upstream, tmp_path, storage__path=str(small_fs)
    )
    fits = upstream.add_image("lib/app", "fits", [os.urandom(2 * MiB)], seed="fits")
    big = upstream.add_image("lib/app", "big", [os.urandom(8 * MiB)], seed="big")
    assert (await pull(client, "fake/lib/app", "fits"))[1] == fits.blobs
    await settle(client)
    for attempt in (1, 2):
        manifest, blobs = await pull(client, "fake/lib/app", "big")  # no error, byte-exact
        assert manifest == big.manifest and blobs == big.blobs
        await settle(client)
        (layer,) = [d for d, data in big.blobs.items() if len(data) == 8 * MiB]
        assert await meta_of(client).get_blob(Digest.parse(layer)) is None  # not cached
        assert upstream.blob_gets("lib/app", layer) == attempt  # so fetched again
    # Nothing partial stays behind (big's small config blob fitted); what fitted is still
    # served from the cache.
    small = [data for data in (*fits.blobs.values(), *big.blobs.values()) if len(data) < 8 * MiB]
    assert stored_bytes(client) == sum(len(data) for data in small)
    assert [p for p in files_under(small_fs) if "uploads" in p.parts] == []
    assert (await pull(client, "fake/lib/app", "fits"))[1] == fits.blobs
    assert blob_gets(upstream, fits) == len(fits.blobs)


async def test_full_storage_still_checks_the_digest(
    make_client: MakeClient,
    upstream: FakeUpstream,
    tmp_path: Path,
    lifecycle_config: LifecycleConfig,
    small_fs: Path,
) -> None:
    client = await start(
        make_client, lifecycle_config, upstream, tmp_path, storage__path=str(small_fs)
    )
    data = os.urandom(8 * MiB)
    digest = upstream.add_blob("lib/app", data)
    upstream.corrupt.add(digest)
    resp = await client.get(f"/v2/fake/lib/app/blobs/{digest}")
    body = b""
    with contextlib.suppress(aiohttp.ClientPayloadError):
        body = await resp.read()
    assert body != data and len(body) < len(data)  # never the whole (wrong) body
    await settle(client)
    assert await meta_of(client).get_blob(Digest.parse(digest)) is None


async def test_min_free_bytes_evicts_before_the_disk_fills(
    make_client: MakeClient,
    upstream: FakeUpstream,
    tmp_path: Path,
    lifecycle_config: LifecycleConfig,
    medium_fs: Path,
) -> None:
    floor = 8 * MiB
    client = await start(
        make_client,
        lifecycle_config,
        upstream,
        tmp_path,
        storage__path=str(medium_fs),
        cache__min_free_bytes=floor,
    )
    images = add_images(upstream, "lib/app", 10, size=MiB)
    for image in images:
        assert (await pull(client, "fake/lib/app", image.tag or ""))[1] == image.blobs
        await settle(client)
        assert shutil.disk_usage(medium_fs).free >= floor - MiB - 64 * 1024
    meta = meta_of(client)
    assert await meta.get_tagged_manifest("fake/lib/app", "v0") is None  # evicted
    assert await meta.get_tagged_manifest("fake/lib/app", "v9") is not None
