"""Hostile JSON from an upstream: deeply nested or malformed manifests, tag lists, referrers
and token answers are refused with a clear error (or the cache's copy), never a 500, and a
refused manifest is never cached."""

from __future__ import annotations

import pytest

from tests.helpers import Client, assert_error
from tests.proxy.conftest import MakeProxy, meta_of
from tests.proxy.fakeupstream import OCI_MANIFEST, FakeUpstream

REPO = "lib/app"
DEEP_ARRAYS = b"[" * 100_000 + b"]" * 100_000
DEEP_OBJECTS = b'{"a":' * 1000 + b"1" + b"}" * 1000
DEEP_ANNOTATIONS = (
    b'{"schemaVersion":2,"mediaType":"' + OCI_MANIFEST.encode() + b'","config":{},"layers":[],'
    b'"annotations":{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}}"
)
HOSTILE = [DEEP_ARRAYS, DEEP_OBJECTS, DEEP_ANNOTATIONS]
IDS = ["arrays", "objects", "annotations"]


@pytest.mark.parametrize("content", HOSTILE, ids=IDS)
async def test_deep_upstream_manifest_is_refused_and_not_cached(
    proxy: Client, upstream: FakeUpstream, content: bytes
) -> None:
    digest = upstream.add_manifest(REPO, content, OCI_MANIFEST, "deep")
    for reference in ("deep", digest):
        resp = await proxy.get(f"/v2/fake/{REPO}/manifests/{reference}")
        error = await assert_error(resp, 503, "UNAVAILABLE")
        assert "unusable manifest" in error["message"] and "nested" in error["message"]
    assert await meta_of(proxy).get_tagged_manifest(f"fake/{REPO}", "deep") is None


@pytest.mark.parametrize("body", [*HOSTILE, b"not json", b"[1, 2]"], ids=[*IDS, "text", "list"])
async def test_hostile_tag_list_falls_back_to_the_cache(
    proxy: Client, upstream: FakeUpstream, body: bytes
) -> None:
    image = upstream.add_image(REPO, "v1")
    resp = await proxy.get(f"/v2/fake/{REPO}/manifests/v1")
    assert await resp.read() == image.manifest
    upstream.raw_bodies[f"/v2/{REPO}/tags/list"] = body
    resp = await proxy.get(f"/v2/fake/{REPO}/tags/list")
    assert resp.status == 200, await resp.text()
    assert await resp.json() == {"name": f"fake/{REPO}", "tags": ["v1"]}


@pytest.mark.parametrize("body", [*HOSTILE, b"not json"], ids=[*IDS, "text"])
async def test_hostile_referrers_fall_back_to_the_cache(
    proxy: Client, upstream: FakeUpstream, body: bytes
) -> None:
    image = upstream.add_image(REPO, "v1")
    upstream.raw_bodies[f"/v2/{REPO}/referrers/{image.digest}"] = body
    resp = await proxy.get(f"/v2/fake/{REPO}/referrers/{image.digest}")
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["manifests"] == []


@pytest.mark.parametrize("body", [*HOSTILE, b"not json", b'["token"]'], ids=[*IDS, "text", "list"])
async def test_hostile_token_answer_is_unavailable(
    make_proxy: MakeProxy, upstream: FakeUpstream, body: bytes
) -> None:
    upstream.auth = "bearer"
    upstream.add_image(REPO, "v1")
    upstream.raw_bodies["/token"] = body
    proxy = await make_proxy()
    resp = await proxy.get(f"/v2/fake/{REPO}/manifests/v1")
    error = await assert_error(resp, 503, "UNAVAILABLE")
    assert "authenticate" in error["message"]


async def test_large_upstream_manifest_is_read_whole(proxy: Client, upstream: FakeUpstream) -> None:
    """A manifest bigger than one read of the socket (here 1 MB of annotations) comes back
    whole, byte for byte: neither truncated nor mistaken for a digest mismatch."""
    notes = {f"org.example.note.{i}": "x" * 1000 for i in range(1000)}
    image = upstream.add_image(REPO, "big", annotations=notes)
    assert len(image.manifest) > 1_000_000
    resp = await proxy.get(f"/v2/fake/{REPO}/manifests/big")
    assert resp.status == 200, await resp.text()
    assert await resp.read() == image.manifest
    assert resp.headers["Docker-Content-Digest"] == image.digest
