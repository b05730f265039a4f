"""Rate-limit-aware freshness: tag rules, the negative cache, stale-while-revalidate and the
upstream's rate limit, counted in requests that reach the fake upstream.

Time is moved, never slept: a tag's stored check time is set back in the metadata file, and
the Upstream's clock (the rate-limit window and the negative cache) is replaced.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from regproxy.api.keys import CONFIG
from regproxy.config import ConfigError
from regproxy.proxy.freshness import NegativeCache, RateLimit, parse_quota, parse_retry_after
from regproxy.proxy.pullthrough import PULL_THROUGH
from regproxy.proxy.upstream import Upstream
from tests.helpers import Client, app_of, assert_error, make_config
from tests.proxy.conftest import MakeProxy
from tests.proxy.fakeupstream import FakeImage, FakeUpstream

REPO = "lib/app"
ACCEPT = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
HUB_LIMIT = {"ratelimit-limit": "100;w=21600", "ratelimit-remaining": "0;w=21600"}


class Clock:
    """A wall clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def upstream_of(client: Client, name: str = "fake") -> Upstream:
    return app_of(client)[PULL_THROUGH].upstreams[name]


def with_clock(client: Client) -> Clock:
    clock = Clock()
    upstream_of(client).clock = clock
    return clock


async def age_tag(client: Client, repo: str, tag: str, seconds: float) -> None:
    """Move the tag's last check ``seconds`` into the past, as if that much time had gone by."""
    path = app_of(client)[CONFIG].data_path / "metadata.sqlite"

    def update() -> None:
        with sqlite3.connect(path) as db:
            cursor = db.execute(
                "UPDATE tags SET updated = updated - ? WHERE repo = ? AND tag = ?",
                (seconds, repo, tag),
            )
            assert cursor.rowcount == 1

    await asyncio.to_thread(update)


async def pull_manifest(client: Client, reference: str, repo: str = f"fake/{REPO}") -> str:
    resp = await client.get(f"/v2/{repo}/manifests/{reference}", headers=ACCEPT)
    assert resp.status == 200, await resp.text()
    await resp.read()
    return resp.headers["Docker-Content-Digest"]


def heads(upstream: FakeUpstream, tag: str) -> int:
    return upstream.count("HEAD", f"/v2/{REPO}/manifests/{tag}")


def gets(upstream: FakeUpstream, tag: str) -> int:
    return upstream.count("GET", f"/v2/{REPO}/manifests/{tag}")


# -- tag rules ---------------------------------------------------------------------------------

RULES = [{"match": "v*.*.*", "ttl": "forever"}, {"match": "latest", "ttl": 60}]


async def test_tag_rule_forever_never_revalidates(
    make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    image = upstream.add_image(REPO, "v1.2.3")
    proxy = await make_proxy(tag_ttl=0, tag_rules=RULES)
    assert await pull_manifest(proxy, "v1.2.3") == image.digest
    await age_tag(proxy, f"fake/{REPO}", "v1.2.3", 365 * 86400)
    upstream.add_image(REPO, "v1.2.3", seed="moved")  # even if it moved upstream
    for _ in range(3):
        assert await pull_manifest(proxy, "v1.2.3") == image.digest
    assert (gets(upstream, "v1.2.3"), heads(upstream, "v1.2.3")) == (1, 0)


async def test_tag_rule_ttl_revalidates_after_its_ttl(
    make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    image = upstream.add_image(REPO, "latest")
    proxy = await make_proxy(tag_ttl=0, tag_rules=RULES)
    assert await pull_manifest(proxy, "latest") == image.digest
    await age_tag(proxy, f"fake/{REPO}", "latest", 59)
    assert await pull_manifest(proxy, "latest") == image.digest
    assert heads(upstream, "latest") == 0, "still within its 60 s"
    await age_tag(proxy, f"fake/{REPO}", "latest", 2)  # 61 s since the check
    assert await pull_manifest(proxy, "latest") == image.digest
    assert heads(upstream, "latest") == 1
    assert await pull_manifest(proxy, "latest") == image.digest
    assert (gets(upstream, "latest"), heads(upstream, "latest")) == (1, 1), "fresh again"


async def test_tags_no_rule_matches_use_tag_ttl(
    make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    upstream.add_image(REPO, "dev")
    proxy = await make_proxy(tag_ttl=0, tag_rules=RULES)
    for _ in range(3):
        await pull_manifest(proxy, "dev")
    assert (gets(upstream, "dev"), heads(upstream, "dev")) == (1, 2)


def test_tag_rules_first_match_wins(tmp_path: Path) -> None:
    config = make_config(
        tmp_path,
        upstreams={
            "hub": {
                "url": "https://registry-1.docker.io",
                "tag_ttl": 300,
                "tag_rules": [{"match": "latest", "ttl": 5}, {"match": "*", "ttl": "forever"}],
            }
        },
    )
    hub = config.upstreams["hub"]
    assert (hub.ttl_for("latest"), hub.ttl_for("v1"), hub.ttl_for("3.19")) == (5.0, None, None)


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ([{"match": "v*", "ttl": "never"}], "tag_rules[0].ttl"),
        ([{"match": "v*", "ttl": -1}], "tag_rules[0].ttl"),
        ([{"match": "v*", "ttl": True}], "tag_rules[0].ttl"),
        ([{"match": "latest", "ttl": 1}, {"match": "a/b", "ttl": 1}], "tag_rules[1].match"),
        ([{"ttl": 1}], "tag_rules[0].match"),
        ([{"match": "v*", "tll": 1}], "tag_rules[0].tll"),
        ("latest", "tag_rules"),
    ],
)
def test_tag_rules_invalid(tmp_path: Path, rules: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=rf"upstreams\.hub\.{message.replace('[', '.')}"):
        make_config(tmp_path, upstreams={"hub": {"url": "http://x", "tag_rules": rules}})


def test_negative_ttl_invalid(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"upstreams\.hub\.negative_ttl"):
        make_config(tmp_path, upstreams={"hub": {"url": "http://x", "negative_ttl": -1}})


def test_freshness_keys_from_the_environment(tmp_path: Path) -> None:
    from regproxy.config import load_config

    env = {
        "REGPROXY_UPSTREAMS": '{"hub": {"url": "http://x", "stale_while_revalidate": true,'
        ' "negative_ttl": 0, "tag_rules": [{"match": "v*", "ttl": "forever"}]}}'
    }
    hub = load_config(None, env=env).upstreams["hub"]
    assert hub.stale_while_revalidate and hub.negative_ttl == 0 and hub.ttl_for("v2") is None


# -- negative cache ----------------------------------------------------------------------------


async def test_negative_cache_manifest_by_tag(
    make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    proxy = await make_proxy(negative_ttl=30)
    clock = with_clock(proxy)
    path = f"/v2/fake/{REPO}/manifests/cache-probe"
    await assert_error(await proxy.get(path), 404, "MANIFEST_UNKNOWN")
    assert upstream.total() == 1
    await assert_error(await proxy.get(path), 404, "MANIFEST_UNKNOWN")
    await assert_error(await proxy.head(path), 404, "MANIFEST_UNKNOWN")
    assert upstream.total() == 1, "a repeated miss within the TTL asks nobody"
    clock.now += 31
    upstream.add_image(REPO, "cache-probe")
    assert (await proxy.get(path, headers=ACCEPT)).status == 200
    assert upstream.count("GET", f"/v2/{REPO}/manifests/cache-probe") == 2


async def test_negative_cache_manifest_by_digest(
    make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    proxy = await make_proxy()
    clock = with_clock(proxy)
    digest = "sha256:" + "ab" * 32
    path = f"/v2/fake/{REPO}/manifests/{digest}"
    for _ in range(3):
        await assert_error(await proxy.get(path), 404, "MANIFEST_UNKNOWN")
    assert upstream.total() == 1
    clock.now += 31
    await assert_error(await proxy.get(path), 404, "MANIFEST_UNKNOWN")
    assert upstream.total() == 2


async def test_negative_cache_blobs(make_proxy: MakeProxy, upstream: FakeUpstream) -> None:
    proxy = await make_proxy(negative_ttl=30)
    clock = with_clock(proxy)
    digest = "sha256:" + "cd" * 32
    path = f"/v2/fake/{REPO}/blobs/{digest}"
    await assert_error(await proxy.head(path), 404, "BLOB_UNKNOWN")
    assert upstream.total() == 1
    await assert_error(await proxy.get(path), 404, "BLOB_UNKNOWN")
    await assert_error(await proxy.head(path), 404, "BLOB_UNKNOWN")
    assert upstream.total() == 1
    clock.now += 31
    await assert_error(await proxy.get(path), 404, "BLOB_UNKNOWN")
    assert upstream.total() == 2


async def test_negative_cache_is_per_repository(
    make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    image = upstream.add_image("other/app", "v1")
    proxy = await make_proxy()
    await assert_error(await proxy.get(f"/v2/fake/{REPO}/manifests/v1"), 404, "MANIFEST_UNKNOWN")
    assert await pull_manifest(proxy, "v1", repo="fake/other/app") == image.digest


async def test_negative_cache_off(make_proxy: MakeProxy, upstream: FakeUpstream) -> None:
    proxy = await make_proxy(negative_ttl=0)
    for _ in range(3):
        resp = await proxy.get(f"/v2/fake/{REPO}/manifests/nope")
        await assert_error(resp, 404, "MANIFEST_UNKNOWN")
    assert upstream.total() == 3


async def test_negative_cache_remembers_a_tag_gone_upstream(
    make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    upstream.add_image(REPO, "gone")
    proxy = await make_proxy(tag_ttl=0)
    await pull_manifest(proxy, "gone")
    del upstream.tags[(REPO, "gone")]
    upstream.reset_counters()
    path = f"/v2/fake/{REPO}/manifests/gone"
    await assert_error(await proxy.get(path), 404, "MANIFEST_UNKNOWN")
    asked = upstream.total()
    assert asked >= 1
    await assert_error(await proxy.get(path), 404, "MANIFEST_UNKNOWN")
    assert upstream.total() == asked, "the tag is gone from the cache and remembered as missing"


def test_negative_cache_bounded_and_expiring() -> None:
    cache = NegativeCache(ttl=10, max_entries=3)
    for key in "abcd":
        cache.add(key, now=100)
    assert len(cache) == 3 and not cache.hit("a", 100), "the oldest went first"
    assert cache.hit("d", 109.9) and not cache.hit("d", 110)
    assert len(cache) == 2, "an expired entry is dropped when seen"


# -- stale-while-revalidate --------------------------------------------------------------------


async def test_stale_while_revalidate(make_proxy: MakeProxy, upstream: FakeUpstream) -> None:
    old = upstream.add_image(REPO, "latest", seed="old")
    proxy = await make_proxy(tag_ttl=60, stale_while_revalidate=True)
    assert await pull_manifest(proxy, "latest") == old.digest
    new = upstream.add_image(REPO, "latest", seed="new")
    await age_tag(proxy, f"fake/{REPO}", "latest", 61)
    upstream.reset_counters()
    upstream.gate = asyncio.Event()  # the upstream answers nothing until the gate opens
    # Past its TTL: the cached digest at once, twice, while one HEAD waits upstream.
    assert await pull_manifest(proxy, "latest") == old.digest
    assert await pull_manifest(proxy, "latest") == old.digest
    await _until(lambda: len(upstream.seen) == 1)
    assert [(s.method, s.path) for s in upstream.seen] == [("HEAD", f"/v2/{REPO}/manifests/latest")]
    flights = app_of(proxy)[PULL_THROUGH]._flights
    flight = flights[(f"fake/{REPO}", "latest")]
    upstream.gate.set()
    assert str((await flight).digest) == new.digest
    assert heads(upstream, "latest") == 1 and gets(upstream, "latest") == 1
    assert await pull_manifest(proxy, "latest") == new.digest
    assert heads(upstream, "latest") == 1, "fresh after the background revalidation"


async def test_stale_while_revalidate_off_waits(
    make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    upstream.add_image(REPO, "latest", seed="old")
    proxy = await make_proxy(tag_ttl=60)
    await pull_manifest(proxy, "latest")
    new = upstream.add_image(REPO, "latest", seed="new")
    await age_tag(proxy, f"fake/{REPO}", "latest", 61)
    assert await pull_manifest(proxy, "latest") == new.digest


async def test_stale_while_revalidate_upstream_down(
    make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    old = upstream.add_image(REPO, "latest")
    proxy = await make_proxy(tag_ttl=60, stale_while_revalidate=True)
    await pull_manifest(proxy, "latest")
    await age_tag(proxy, f"fake/{REPO}", "latest", 61)
    upstream.down = True
    assert await pull_manifest(proxy, "latest") == old.digest
    flights = app_of(proxy)[PULL_THROUGH]._flights
    for flight in list(flights.values()):
        await asyncio.wait([flight])
    assert await pull_manifest(proxy, "latest") == old.digest


async def _until(condition: Any) -> None:
    async with asyncio.timeout(10):
        while not condition():  # noqa: ASYNC110 (a count in the fake, no event to await)
            await asyncio.sleep(0.01)


# -- the upstream's rate limit -----------------------------------------------------------------


async def pull_image(client: Client, image: FakeImage, reference: str) -> None:
    assert await pull_manifest(client, reference) == image.digest
    for digest, data in image.blobs.items():
        resp = await client.get(f"/v2/fake/{REPO}/blobs/{digest}")
        assert resp.status == 200, await resp.text()
        assert await resp.read() == data


async def test_rate_limit_remaining_zero(make_proxy: MakeProxy, upstream: FakeUpstream) -> None:
    cached = upstream.add_image(REPO, "v1", seed="one")
    upstream.add_image(REPO, "v2", seed="two")
    proxy = await make_proxy(tag_ttl=0)
    clock = with_clock(proxy)
    upstream.headers = dict(HUB_LIMIT)  # the pull of v1 uses up the limit
    await pull_image(proxy, cached, "v1")  # its layers still come: blobs are not counted
    state = upstream_of(proxy).rate_limit
    assert (state.limit, state.remaining, state.window) == (100, 0, 21600.0)
    assert state.reset_at == pytest.approx(clock.now + 21600)
    upstream.reset_counters()

    # Cached: served from the cache although its TTL (0) is over, without asking.
    assert await pull_manifest(proxy, "v1") == cached.digest
    resp = await proxy.head(f"/v2/fake/{REPO}/manifests/v1", headers=ACCEPT)
    assert resp.status == 200 and resp.headers["Docker-Content-Digest"] == cached.digest
    # Not cached: TOOMANYREQUESTS with the seconds left of the window.
    resp = await proxy.get(f"/v2/fake/{REPO}/manifests/v2", headers=ACCEPT)
    await assert_error(resp, 429, "TOOMANYREQUESTS")
    assert resp.headers["Retry-After"] == "21600"
    clock.now += 600
    resp = await proxy.get(f"/v2/fake/{REPO}/manifests/v2", headers=ACCEPT)
    await assert_error(resp, 429, "TOOMANYREQUESTS")
    assert resp.headers["Retry-After"] == "21000"
    assert upstream.total() == 0, "nothing reached the upstream"

    # The window is over: requests go upstream again.
    clock.now += 21000
    upstream.headers = {"ratelimit-limit": "100;w=21600", "ratelimit-remaining": "99;w=21600"}
    assert await pull_manifest(proxy, "v2") != cached.digest
    assert gets(upstream, "v2") == 1
    assert state.remaining == 99 and state.reset_at == 0
    assert await pull_manifest(proxy, "v1") == cached.digest
    assert heads(upstream, "v1") == 1, "revalidating again"


async def test_rate_limit_from_a_head(make_proxy: MakeProxy, upstream: FakeUpstream) -> None:
    image = upstream.add_image(REPO, "v1")
    proxy = await make_proxy(tag_ttl=0)
    with_clock(proxy)
    await pull_manifest(proxy, "v1")
    upstream.headers = dict(HUB_LIMIT)
    await pull_manifest(proxy, "v1")  # the revalidating HEAD reports 0 left
    assert heads(upstream, "v1") == 1
    upstream.reset_counters()
    assert await pull_manifest(proxy, "v1") == image.digest
    assert upstream.total() == 0


async def test_rate_limit_429_retry_after(make_proxy: MakeProxy, upstream: FakeUpstream) -> None:
    image = upstream.add_image(REPO, "v1")
    proxy = await make_proxy(tag_ttl=0)
    clock = with_clock(proxy)
    await pull_image(proxy, image, "v1")
    upstream.status, upstream.retry_after = 429, "120"
    upstream.reset_counters()
    assert await pull_manifest(proxy, "v1") == image.digest  # stale: the HEAD got 429
    assert upstream.total() == 1
    # Held off: cached content is served, uncached answers 429, blobs included.
    assert await pull_manifest(proxy, "v1") == image.digest
    resp = await proxy.get(f"/v2/fake/{REPO}/manifests/v9", headers=ACCEPT)
    await assert_error(resp, 429, "TOOMANYREQUESTS")
    assert resp.headers["Retry-After"] == "120"
    resp = await proxy.get(f"/v2/fake/{REPO}/blobs/sha256:{'ef' * 32}")
    await assert_error(resp, 429, "TOOMANYREQUESTS")
    for digest in image.blobs:  # cached blobs are served
        assert (await proxy.get(f"/v2/fake/{REPO}/blobs/{digest}")).status == 200
    assert upstream.total() == 1
    clock.now += 121
    upstream.status = None
    await pull_manifest(proxy, "v1")
    assert upstream.total() == 2


def test_rate_limit_headers() -> None:
    assert parse_quota("100;w=21600") == parse_quota(" 100 ; w=21600")
    quota = parse_quota("0;w=21600")
    assert quota is not None and (quota.value, quota.window) == (0, 21600.0)
    assert parse_quota("76") is not None and parse_quota("76").window is None  # type: ignore[union-attr]
    assert parse_quota("100, 5000;w=3600") == parse_quota("100")
    for bad in (None, "", "many", "-1;w=5"):
        assert parse_quota(bad) is None
    assert parse_retry_after("30", now=0) == 30
    assert parse_retry_after("Thu, 01 Jan 1970 00:01:40 GMT", now=40) == 60
    assert parse_retry_after("soon", now=0) is None

    state = RateLimit()
    assert not state.observe(200, {}, now=0) and state.blocked_for(0) == 0
    state.observe(429, {}, now=0)  # no Retry-After, no window: a default pause
    assert 0 < state.blocked_for(1, blob=True) < 60
    state = RateLimit()
    state.observe(200, {"RateLimit-Remaining": "0"}, now=0)
    assert state.blocked_for(0) == 60 and state.blocked_for(0, blob=True) == 0
