"""Tag lists through the cache when the upstream caps ``n`` (Docker Hub pages by 100 at
most): regproxy follows the upstream's ``Link`` until the client's page is full, and its own
``Link`` points at the next page of its own listing."""

from __future__ import annotations

import pytest

from tests.helpers import Client
from tests.proxy.conftest import MakeProxy
from tests.proxy.fakeupstream import FakeUpstream

REPO = "lib/app"
TAGS = sorted(f"v{i:03d}" for i in range(23))
LIST = f"/v2/fake/{REPO}/tags/list"


def _populate(upstream: FakeUpstream) -> None:
    image = upstream.add_image(REPO, TAGS[0])
    for tag in TAGS[1:]:
        upstream.tags[(REPO, tag)] = image.digest


async def _page(proxy: Client, **params: str) -> tuple[list[str], str | None]:
    resp = await proxy.get(LIST, params=params)
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body["name"] == f"fake/{REPO}"
    return body["tags"], resp.headers.get("Link")


@pytest.mark.parametrize("style", ["relative", "absolute"])
async def test_upstream_pages_are_followed_to_fill_the_clients_page(
    proxy: Client, upstream: FakeUpstream, style: str
) -> None:
    _populate(upstream)
    upstream.tags_page_max = 5
    upstream.link_style = style
    tags, link = await _page(proxy, n="12")
    assert tags == TAGS[:12]
    assert link == f'<{LIST}?n=12&last={TAGS[11]}>; rel="next"'
    tags, link = await _page(proxy, n="12", last=TAGS[11])
    assert tags == TAGS[12:]
    assert link is None
    # every upstream request asked for the rest of the page, and the scope stayed the same
    asked = [s for s in upstream.seen if s.path == f"/v2/{REPO}/tags/list"]
    # 5+5+3 of 13 (the client's 12, and one to know whether a next page exists), then 5+5+1
    assert len(asked) == 3 + 3


async def test_exactly_a_full_page_has_no_link(proxy: Client, upstream: FakeUpstream) -> None:
    _populate(upstream)
    upstream.tags_page_max = 4
    tags, link = await _page(proxy, n=str(len(TAGS)))
    assert tags == TAGS and link is None


async def test_whole_list_when_the_client_gives_no_n(proxy: Client, upstream: FakeUpstream) -> None:
    _populate(upstream)
    upstream.tags_page_max = 3
    tags, link = await _page(proxy)
    assert tags == TAGS and link is None


async def test_a_link_to_another_host_is_not_followed(
    proxy: Client, upstream: FakeUpstream
) -> None:
    _populate(upstream)
    upstream.tags_page_max = 5
    upstream.link_style = "foreign"
    tags, link = await _page(proxy, n="12")
    assert tags == TAGS[:5]  # what the configured upstream itself sent, nothing more
    assert link is None
    assert all(s.server == "registry" for s in upstream.seen)


async def test_an_upstream_that_does_not_cap_is_asked_once(
    make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    _populate(upstream)
    proxy = await make_proxy()
    tags, link = await _page(proxy, n="10")
    assert tags == TAGS[:10]
    assert link == f'<{LIST}?n=10&last={TAGS[9]}>; rel="next"'
    assert len([s for s in upstream.seen if s.path.endswith("/tags/list")]) == 1


async def test_an_upstream_that_ignores_n_and_last(proxy: Client, upstream: FakeUpstream) -> None:
    """distribution 2.8 sends every tag, unsorted, whatever n and last say: regproxy's pages
    must still be the sorted slices after ``last``, and its Link must lead to the end."""
    _populate(upstream)
    upstream.tags_unpaged = True
    seen: list[str] = []
    params = {"n": "5"}
    for _ in range(10):
        tags, link = await _page(proxy, **params)
        seen += tags
        if link is None:
            break
        assert link == f'<{LIST}?n=5&last={tags[-1]}>; rel="next"'
        params = {"n": "5", "last": tags[-1]}
    assert seen == TAGS
