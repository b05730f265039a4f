"""Tags through the cache: fresh for ``tag_ttl``, then revalidated with a HEAD; served stale
when the upstream fails; the spec's errors when nothing is cached."""

from __future__ import annotations

import asyncio

import pytest

from tests.helpers import Client, assert_error, digest_of
from tests.proxy.conftest import MakeProxy
from tests.proxy.fakeupstream import FakeImage, FakeUpstream

REPO = "lib/app"
TAG_PATH = f"/v2/fake/{REPO}/manifests/v1"
UPSTREAM_TAG = f"/v2/{REPO}/manifests/v1"


async def assert_manifest(client: Client, path: str, image: FakeImage) -> None:
    resp = await client.get(path)
    assert resp.status == 200, await resp.text()
    assert await resp.read() == image.manifest
    assert resp.headers["Docker-Content-Digest"] == image.digest
    assert resp.headers["Content-Type"] == image.media_type


async def test_fresh_tag_served_without_asking_upstream(
    make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    image = upstream.add_image(REPO, "v1")
    proxy = await make_proxy(tag_ttl=3600)
    await assert_manifest(proxy, TAG_PATH, image)
    upstream.reset_counters()
    for _ in range(3):
        await assert_manifest(proxy, TAG_PATH, image)
        resp = await proxy.head(TAG_PATH)
        assert resp.headers["Docker-Content-Digest"] == image.digest
    assert upstream.total() == 0


async def test_tag_revalidated_with_head_after_ttl(
    make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    ttl = 0.3
    old = upstream.add_image(REPO, "v1", seed="old")
    proxy = await make_proxy(tag_ttl=ttl)
    await assert_manifest(proxy, TAG_PATH, old)
    assert upstream.count("GET", UPSTREAM_TAG) == 1

    upstream.reset_counters()
    await assert_manifest(proxy, TAG_PATH, old)  # within the TTL: no upstream request
    assert upstream.total() == 0

    await asyncio.sleep(ttl + 0.05)
    await assert_manifest(proxy, TAG_PATH, old)  # stale: HEAD, digest unchanged, no GET
    assert upstream.count("HEAD", UPSTREAM_TAG) == 1
    assert upstream.total("GET") == 0
    upstream.reset_counters()
    await assert_manifest(proxy, TAG_PATH, old)  # the HEAD made it fresh again
    assert upstream.total() == 0

    new = upstream.add_image(REPO, "v1", seed="new")  # the tag moves upstream
    await asyncio.sleep(ttl + 0.05)
    await assert_manifest(proxy, TAG_PATH, new)
    assert upstream.count("HEAD", UPSTREAM_TAG) == 1
    assert upstream.count("GET", UPSTREAM_TAG) == 1
    # the old manifest stays available by digest, from the cache
    upstream.reset_counters()
    await assert_manifest(proxy, f"/v2/fake/{REPO}/manifests/{old.digest}", old)
    await assert_manifest(proxy, TAG_PATH, new)
    assert upstream.total() == 0


async def test_concurrent_revalidations_share_one_head(
    make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    image = upstream.add_image(REPO, "v1")
    proxy = await make_proxy(tag_ttl=0)
    await assert_manifest(proxy, TAG_PATH, image)
    upstream.reset_counters()
    upstream.delay = 0.2
    await asyncio.gather(*(assert_manifest(proxy, TAG_PATH, image) for _ in range(6)))
    assert upstream.count("HEAD", UPSTREAM_TAG) == 1
    assert upstream.total("GET") == 0


async def test_tag_deleted_upstream(make_proxy: MakeProxy, upstream: FakeUpstream) -> None:
    image = upstream.add_image(REPO, "v1")
    proxy = await make_proxy(tag_ttl=0)
    await assert_manifest(proxy, TAG_PATH, image)
    del upstream.tags[(REPO, "v1")]
    await assert_error(await proxy.get(TAG_PATH), 404, "MANIFEST_UNKNOWN")
    # the manifest itself is immutable content and stays available by digest
    await assert_manifest(proxy, f"/v2/fake/{REPO}/manifests/{image.digest}", image)


FAILURES = ["down", "stopped", "500", "429", "timeout"]


async def break_upstream(upstream: FakeUpstream, how: str) -> None:
    if how == "down":
        upstream.down = True
    elif how == "stopped":
        assert upstream.server is not None
        await upstream.server.close()
    elif how == "timeout":
        upstream.delay = 1.0  # the proxy's upstream timeout is 0.3 s
    else:
        upstream.status = int(how)
        upstream.retry_after = "30" if how == "429" else None


@pytest.mark.parametrize("how", FAILURES)
async def test_cached_tag_served_when_upstream_fails(
    make_proxy: MakeProxy, upstream: FakeUpstream, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    image = upstream.add_image(REPO, "v1")
    proxy = await make_proxy(tag_ttl=0, timeout=0.3)
    await assert_manifest(proxy, TAG_PATH, image)
    for digest in image.blobs:
        assert (await proxy.get(f"/v2/fake/{REPO}/blobs/{digest}")).status == 200
    await break_upstream(upstream, how)

    await assert_manifest(proxy, TAG_PATH, image)
    assert "serving cached" in caplog.text  # a warning says the copy may be stale
    resp = await proxy.head(TAG_PATH)
    assert resp.status == 200 and resp.headers["Docker-Content-Digest"] == image.digest
    await assert_manifest(proxy, f"/v2/fake/{REPO}/manifests/{image.digest}", image)
    for digest, data in image.blobs.items():
        resp = await proxy.get(f"/v2/fake/{REPO}/blobs/{digest}")
        assert resp.status == 200 and await resp.read() == data


@pytest.mark.parametrize(
    ("how", "status", "code"),
    [
        ("missing", 404, "MANIFEST_UNKNOWN"),
        ("429", 429, "TOOMANYREQUESTS"),
        ("500", 503, "UNAVAILABLE"),
        ("down", 503, "UNAVAILABLE"),
        ("stopped", 503, "UNAVAILABLE"),
        ("timeout", 503, "UNAVAILABLE"),
    ],
)
async def test_nothing_cached_errors(
    make_proxy: MakeProxy, upstream: FakeUpstream, how: str, status: int, code: str
) -> None:
    image = upstream.add_image(REPO, "v1")
    proxy = await make_proxy(timeout=0.3)
    if how == "missing":
        references = ["v2", digest_of(b"not a manifest")]
    else:
        await break_upstream(upstream, how)
        references = ["v1", image.digest]
    for reference in references:
        resp = await proxy.get(f"/v2/fake/{REPO}/manifests/{reference}")
        await assert_error(resp, status, code)
        if status == 429:
            assert resp.headers["Retry-After"] == "30"
