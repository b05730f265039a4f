"""What `regproxy cache ls` and the cache-size metric read: cached tags with exact sizes."""

from __future__ import annotations

import pytest

from regproxy.cache_cli import ImageRef, parse_image
from regproxy.config import load_config
from regproxy.errors import NameInvalid
from tests.helpers import Client, push_image
from tests.proxy.conftest import meta_of
from tests.proxy.fakeupstream import FakeUpstream


async def _pull_all(proxy: Client, repo: str, reference: str, accept: str = "") -> None:
    headers = {"Accept": accept} if accept else {}
    resp = await proxy.get(f"/v2/{repo}/manifests/{reference}", headers=headers)
    assert resp.status == 200


async def test_cached_images_and_usage(proxy: Client, upstream: FakeUpstream) -> None:
    shared = b"a layer both images use" * 500
    amd64 = upstream.add_image("lib/app", None, [shared, b"amd64" * 800], seed="amd64")
    arm64 = upstream.add_image("lib/app", None, [shared, b"arm64" * 900], seed="arm64")
    index = upstream.add_index("lib/app", "v1", [amd64, arm64])
    tool = upstream.add_image("lib/tool", "2", [b"tool" * 100], seed="tool")
    await _pull_all(proxy, "fake/lib/app", "v1", index.media_type)
    for image, repo in ((amd64, "fake/lib/app"), (arm64, "fake/lib/app"), (tool, "fake/lib/tool")):
        await _pull_all(proxy, repo, image.digest)
        for digest, content in image.blobs.items():
            resp = await proxy.get(f"/v2/{repo}/blobs/{digest}")
            assert resp.status == 200
            # Read to the end: its last byte comes once the blob is cached, so the listing
            # below never races a fill still running.
            assert await resp.read() == content
    await _pull_all(proxy, "fake/lib/tool", "2")
    await push_image(proxy, "team/hosted", "1")  # hosted: not part of any cache

    rows = await meta_of(proxy).cached_tags("fake")
    app_blobs = {**amd64.blobs, **arm64.blobs}  # the shared layer once
    app_size = (
        len(index.manifest)
        + len(amd64.manifest)
        + len(arm64.manifest)
        + sum(len(b) for b in app_blobs.values())
    )
    tool_size = len(tool.manifest) + sum(len(b) for b in tool.blobs.values())
    assert [(r.repo, r.tag, str(r.digest), r.size) for r in rows] == [
        ("fake/lib/app", "v1", index.digest, app_size),
        ("fake/lib/tool", "2", tool.digest, tool_size),
    ]
    assert await meta_of(proxy).cached_tags("other") == []

    blobs, size = await meta_of(proxy).cache_totals("fake")
    assert blobs == len(app_blobs) + len(tool.blobs)
    assert size == app_size + tool_size


def test_parse_image() -> None:
    config = load_config(
        None,
        env={},
        overrides={
            "upstreams": {
                "docker.io": {"url": "https://registry-1.docker.io"},
                "ghcr": {"url": "https://ghcr.io"},
            },
            "default_upstream": "docker.io",
        },
    )
    assert parse_image("docker.io/library/alpine:3.20", config) == ImageRef(
        "docker.io/library/alpine", "3.20"
    )
    assert parse_image("ghcr.io/org/tool", config) == ImageRef("ghcr/org/tool", "latest")
    digest = "sha256:" + "a" * 64
    assert parse_image(f"ghcr/org/tool@{digest}", config) == ImageRef("ghcr/org/tool", digest)
    assert parse_image("alpine:3", config) == ImageRef("docker.io/alpine", "3")
    with pytest.raises(NameInvalid):  # a registry host that is no upstream's
        parse_image("localhost:5000/x", config)
    no_default = load_config(
        None, env={}, overrides={"upstreams": {"ghcr": {"url": "https://ghcr.io"}}}
    )
    with pytest.raises(ValueError, match="does not name an upstream"):
        parse_image("alpine:3", no_default)
