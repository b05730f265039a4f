"""Tag lists and the catalog, with ``n`` / ``last`` pagination and the ``Link`` header."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import MakeClient
from tests.helpers import Client, assert_error, make_config, push_image, push_manifest

TAGS = ["latest", "v1.0", "v1.10", "v1.2", "A", "Z", "_x", "1", "b2", "B10", "a-b", "a.b"]
REPOS = ["lib/x", "a", "b", "a/b", "a-b", "z9", "a.b/c_d/e"]
LINK_RE = re.compile(r'^<([^>]+)>; rel="next"$')


async def _walk(client: Client, url: str, key: str) -> tuple[list[str], list[int]]:
    """Follow ``Link`` headers to the end; returns all entries and the size of each page."""
    entries: list[str] = []
    pages: list[int] = []
    next_url: str | None = url
    while next_url is not None:
        resp = await client.get(next_url)
        assert resp.status == 200, await resp.text()
        assert resp.content_type == "application/json"
        page = (await resp.json())[key]
        entries += page
        pages.append(len(page))
        assert len(pages) < 100, "pagination does not end"
        link = resp.headers.get("Link")
        if link is None:
            next_url = None
        else:
            match = LINK_RE.match(link)
            assert match is not None, link
            next_url = match.group(1)
    return entries, pages


@pytest.fixture
async def tagged(client: Client) -> Client:
    image = await push_image(client, "app", "first")
    for tag in TAGS:
        await push_manifest(client, "app", tag, image.manifest, image.media_type)
    return client


async def test_tags_list(tagged: Client) -> None:
    resp = await tagged.get("/v2/app/tags/list")
    assert resp.status == 200
    assert "Link" not in resp.headers
    assert await resp.json() == {"name": "app", "tags": sorted([*TAGS, "first"])}


@pytest.mark.parametrize("n", [1, 2, 3, 5, 12, 13, 14, 1000])
async def test_tags_pagination(tagged: Client, n: int) -> None:
    everything = sorted([*TAGS, "first"])
    tags, pages = await _walk(tagged, f"/v2/app/tags/list?n={n}", "tags")
    assert tags == everything
    full, rest = divmod(len(everything), n)
    assert pages == [n] * full + ([rest] if rest else [])


async def test_tags_link_header(tagged: Client) -> None:
    resp = await tagged.get("/v2/app/tags/list", params={"n": "2", "last": "B10"})
    assert await resp.json() == {"name": "app", "tags": ["Z", "_x"]}
    assert resp.headers["Link"] == '</v2/app/tags/list?n=2&last=_x>; rel="next"'


async def test_tags_last(tagged: Client) -> None:
    resp = await tagged.get("/v2/app/tags/list", params={"last": "v1.0"})
    assert (await resp.json())["tags"] == ["v1.10", "v1.2"]
    resp = await tagged.get("/v2/app/tags/list", params={"last": "v1.1"})  # need not exist
    assert (await resp.json())["tags"] == ["v1.10", "v1.2"]
    resp = await tagged.get("/v2/app/tags/list", params={"last": "zzz"})
    assert resp.status == 200
    assert await resp.json() == {"name": "app", "tags": []}
    assert "Link" not in resp.headers


async def test_tags_n_zero(tagged: Client) -> None:
    resp = await tagged.get("/v2/app/tags/list", params={"n": "0"})
    assert resp.status == 200
    assert await resp.json() == {"name": "app", "tags": []}
    assert "Link" not in resp.headers


@pytest.mark.parametrize("n", ["-1", "abc", "1.5", " 3", "0x10", "²", "1e3"])
async def test_invalid_n(tagged: Client, n: str) -> None:
    resp = await tagged.get("/v2/app/tags/list", params={"n": n})
    await assert_error(resp, 400, "PAGINATION_NUMBER_INVALID")
    resp = await tagged.get("/v2/_catalog", params={"n": n})
    await assert_error(resp, 400, "PAGINATION_NUMBER_INVALID")


@pytest.mark.parametrize("params", [{}, {"n": "0"}, {"n": "5"}, {"last": "a"}])
async def test_tags_of_unknown_repository(client: Client, params: dict[str, str]) -> None:
    await push_image(client, "app", "v1")
    resp = await client.get("/v2/nothing/tags/list", params=params)
    error = await assert_error(resp, 404, "NAME_UNKNOWN")
    assert error["detail"] == {"name": "nothing"}


async def test_tags_of_repository_without_tags(client: Client) -> None:
    image = await push_image(client, "app", "v1")
    assert (await client.delete("/v2/app/manifests/v1")).status == 202
    resp = await client.get("/v2/app/tags/list")
    assert resp.status == 200
    assert await resp.json() == {"name": "app", "tags": []}
    assert (await client.get(f"/v2/app/manifests/{image.digest}")).status == 200


async def test_page_max(make_client: MakeClient, tmp_path: Path) -> None:
    client = await make_client(make_config(tmp_path, limits__page_max=3))
    image = await push_image(client, "app", "first")
    for tag in TAGS:
        await push_manifest(client, "app", tag, image.manifest, image.media_type)
    for url in ("/v2/app/tags/list", "/v2/app/tags/list?n=100"):
        resp = await client.get(url)
        assert (await resp.json())["tags"] == sorted([*TAGS, "first"])[:3]
        assert resp.headers["Link"] == '</v2/app/tags/list?n=3&last=B10>; rel="next"'
    tags, pages = await _walk(client, "/v2/app/tags/list", "tags")
    assert tags == sorted([*TAGS, "first"])
    assert max(pages) == 3


# -- catalog ------------------------------------------------------------------------------


@pytest.fixture
async def repos(client: Client) -> Client:
    for repo in REPOS:
        await push_image(client, repo, "v1")
    return client


async def test_catalog(repos: Client) -> None:
    resp = await repos.get("/v2/_catalog")
    assert resp.status == 200
    assert "Link" not in resp.headers
    body: dict[str, Any] = await resp.json()
    assert body == {"repositories": sorted(REPOS)}


async def test_catalog_empty(client: Client) -> None:
    resp = await client.get("/v2/_catalog")
    assert resp.status == 200
    assert await resp.json() == {"repositories": []}


@pytest.mark.parametrize("n", [1, 2, 3, 7, 8])
async def test_catalog_pagination(repos: Client, n: int) -> None:
    names, pages = await _walk(repos, f"/v2/_catalog?n={n}", "repositories")
    assert names == sorted(REPOS)
    full, rest = divmod(len(REPOS), n)
    assert pages == [n] * full + ([rest] if rest else [])


async def test_catalog_link_header(repos: Client) -> None:
    resp = await repos.get("/v2/_catalog", params={"n": "2", "last": "a-b"})
    assert await resp.json() == {"repositories": ["a.b/c_d/e", "a/b"]}
    assert resp.headers["Link"] == '</v2/_catalog?n=2&last=a%2Fb>; rel="next"'


async def test_catalog_n_zero_and_last(repos: Client) -> None:
    resp = await repos.get("/v2/_catalog", params={"n": "0"})
    assert await resp.json() == {"repositories": []}
    assert "Link" not in resp.headers
    resp = await repos.get("/v2/_catalog", params={"last": "b"})
    assert await resp.json() == {"repositories": ["lib/x", "z9"]}
