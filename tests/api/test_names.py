"""Repository names: the spec's grammar on every route, and no way out of the data dir."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from yarl import URL

from regproxy.config import Config
from tests.helpers import Client, assert_error, canonical, digest_of, image_manifest, push_image

DATA = b"blob bytes"
BAD_NAMES = [
    "App",
    "app/Sub",
    "..",
    "a/..",
    "../a",
    "a/../b",
    "a/./b",
    ".a",
    "a.",
    "a//b",
    "a/",
    "a/b/",
    "-a",
    "a_-b",
    "a___b",
    "a:b",
    "a" * 300,
    "/".join(["abcdefghi"] * 26),  # 259 characters of valid components
]
ENCODED = [
    "%2e%2e",
    "a/%2e%2e/b",
    "%2E%2E/%2E%2E/etc",
    "a%2fb",
    "a%2Fb",
    "%2fetc",
    "a%2e",
    "%61pp",
]


def _paths(name: str) -> list[tuple[str, str]]:
    digest = digest_of(DATA)
    return [
        ("GET", f"/v2/{name}/tags/list"),
        ("GET", f"/v2/{name}/manifests/latest"),
        ("HEAD", f"/v2/{name}/manifests/latest"),
        ("PUT", f"/v2/{name}/manifests/latest"),
        ("DELETE", f"/v2/{name}/manifests/latest"),
        ("GET", f"/v2/{name}/blobs/{digest}"),
        ("HEAD", f"/v2/{name}/blobs/{digest}"),
        ("DELETE", f"/v2/{name}/blobs/{digest}"),
        ("POST", f"/v2/{name}/blobs/uploads/"),
        ("POST", f"/v2/{name}/blobs/uploads/?digest={digest}"),
        ("GET", f"/v2/{name}/blobs/uploads/00000000-0000-4000-8000-000000000000"),
        ("PATCH", f"/v2/{name}/blobs/uploads/00000000-0000-4000-8000-000000000000"),
        ("GET", f"/v2/{name}/referrers/{digest}"),
    ]


async def _assert_nothing_created(config: Config, tmp_path: Path) -> None:
    def listing() -> tuple[list[str], list[str]]:
        outside = sorted(p.name for p in tmp_path.iterdir())
        inside = sorted(
            str(p.relative_to(config.data_path))
            for p in config.data_path.rglob("*")
            if p.is_file() and not p.name.startswith("metadata.sqlite")
        )
        return outside, inside

    assert await asyncio.to_thread(listing) == (["data"], [])


async def _request(client: Client, method: str, path: str) -> None:
    """Send ``path`` byte for byte: the test client would resolve dot segments and re-encode."""
    root = client.make_url("/")
    url = URL(f"{root.scheme}://{root.host}:{root.port}{path}", encoded=True)
    data = canonical(image_manifest(b"config", [])) if method == "PUT" else DATA
    if method in ("GET", "HEAD", "DELETE"):
        data = b""
    async with client.session.request(method, url, data=data) as resp:
        assert resp.url.raw_path == path.split("?")[0]
        await assert_error(resp, 400, "NAME_INVALID")


@pytest.mark.parametrize("name", BAD_NAMES)
async def test_invalid_names(client: Client, config: Config, tmp_path: Path, name: str) -> None:
    for method, path in _paths(name):
        await _request(client, method, path)
    await _assert_nothing_created(config, tmp_path)
    assert await (await client.get("/v2/_catalog")).json() == {"repositories": []}


@pytest.mark.parametrize("name", ENCODED)
async def test_percent_encoded_names(
    client: Client, config: Config, tmp_path: Path, name: str
) -> None:
    for method, path in _paths(name):
        await _request(client, method, path)
    await _assert_nothing_created(config, tmp_path)


async def test_invalid_mount_source(client: Client, config: Config, tmp_path: Path) -> None:
    for source in ("..", "../etc", "a//b", "A"):
        resp = await client.post(
            "/v2/app/blobs/uploads/", params={"mount": digest_of(DATA), "from": source}
        )
        await assert_error(resp, 400, "NAME_INVALID")
    await _assert_nothing_created(config, tmp_path)


@pytest.mark.parametrize(
    "name",
    [
        "a",
        "0",
        "a/b/c/d",
        "a.b",
        "a_b",
        "a__b",
        "a-b",
        "a---b",
        "library/alpine",
        "x" * 255,
        "/".join(["abcdefghi"] * 25) + "/abcde",  # exactly 255
    ],
)
async def test_valid_names(client: Client, name: str) -> None:
    image = await push_image(client, name, "v1")
    resp = await client.get(f"/v2/{name}/manifests/v1")
    assert resp.status == 200, await resp.text()
    assert await resp.read() == image.manifest
    resp = await client.get(f"/v2/{name}/tags/list")
    assert await resp.json() == {"name": name, "tags": ["v1"]}
    assert (await (await client.get("/v2/_catalog")).json())["repositories"] == [name]


async def test_names_with_route_words(client: Client) -> None:
    """Names may contain the words the routes use: ``blobs``, ``manifests``, ``tags``."""
    for name in ("blobs", "manifests/tags", "a/blobs/uploads", "tags/list"):
        image = await push_image(client, name, "v1")
        resp = await client.get(f"/v2/{name}/manifests/{image.digest}")
        assert await resp.read() == image.manifest
        resp = await client.get(f"/v2/{name}/tags/list")
        assert await resp.json() == {"name": name, "tags": ["v1"]}
