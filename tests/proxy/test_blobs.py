"""Blobs through the pull-through cache: one upstream fetch per digest, streamed, verified.

Every test asserts on the bytes a client gets and on what the fake upstream was asked.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
import yarl

from regproxy.api.keys import REGISTRY
from regproxy.oci import Digest
from regproxy.proxy.pullthrough import MAX_RESUMES
from tests.helpers import Client, app_of, assert_error, digest_of
from tests.proxy.conftest import (
    MakeProxy,
    cached_blob,
    leftover_files,
    meta_of,
    partial_fills,
    stored_file,
)
from tests.proxy.fakeupstream import SEND_CHUNK, FakeUpstream

MiB = 1 << 20
REPO = "lib/app"
BLOB = f"/v2/fake/{REPO}/blobs"
# Bytes a cut transfer may lose in flight: one chunk of the fake's (what arrived before the
# cut is used, even what aiohttp had buffered).
IN_FLIGHT = SEND_CHUNK
# A broken transfer shows up as one of these on the client, never as a short "complete" body.
BROKEN = (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError)


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 5.0) -> None:
    """Poll ``check`` (state in the database and on disk: nothing to wait on) until true."""
    async with asyncio.timeout(within):
        while not await check():  # noqa: ASYNC110
            await asyncio.sleep(0.02)


async def no_fill_running(client: Client) -> bool:
    """Whether every fill has ended (its cleanup included)."""
    return not app_of(client)[REGISTRY].proxy._fills  # type: ignore[attr-defined]


def big_blob(upstream: FakeUpstream, size: int = 3 * MiB) -> tuple[str, bytes]:
    data = os.urandom(size)
    return upstream.add_blob(REPO, data), data


async def get_body(client: Client, path: str) -> bytes:
    resp = await client.get(path)
    assert resp.status == 200, await resp.text()
    return await resp.read()


async def test_miss_then_hit(proxy: Client, upstream: FakeUpstream) -> None:
    digest, data = big_blob(upstream)
    resp = await proxy.get(f"{BLOB}/{digest}")
    assert resp.status == 200
    assert resp.headers["Docker-Content-Digest"] == digest
    assert resp.headers["Content-Length"] == str(len(data))
    body = await resp.read()
    assert body == data and digest_of(body) == digest
    assert upstream.blob_gets(REPO, digest) == 1
    await eventually(lambda: cached_blob(proxy, digest))
    assert stored_file(proxy, digest).read_bytes() == data  # type: ignore[union-attr]

    # cached: served from storage, the upstream is not asked again
    upstream.reset_counters()
    assert await get_body(proxy, f"{BLOB}/{digest}") == data
    resp = await proxy.head(f"{BLOB}/{digest}")
    assert resp.status == 200 and resp.headers["Content-Length"] == str(len(data))
    assert upstream.total() == 0


async def test_head_on_miss_asks_upstream_head_only(proxy: Client, upstream: FakeUpstream) -> None:
    digest, _ = big_blob(upstream, 1000)
    resp = await proxy.head(f"{BLOB}/{digest}")
    assert resp.status == 200
    assert resp.headers["Content-Length"] == "1000"
    assert resp.headers["Docker-Content-Digest"] == digest
    assert await resp.read() == b""
    assert upstream.count("HEAD", f"/v2/{REPO}/blobs/{digest}") == 1
    assert upstream.total("GET") == 0
    assert not await cached_blob(proxy, digest)


async def test_unknown_blob(proxy: Client, upstream: FakeUpstream) -> None:
    missing = digest_of(b"nowhere")
    await assert_error(await proxy.get(f"{BLOB}/{missing}"), 404, "BLOB_UNKNOWN")
    await assert_error(await proxy.head(f"{BLOB}/{missing}"), 404, "BLOB_UNKNOWN")


@pytest.mark.parametrize(
    ("status", "retry_after", "expected", "code"),
    [(429, "17", 429, "TOOMANYREQUESTS"), (500, None, 503, "UNAVAILABLE")],
)
async def test_upstream_error_on_miss(
    proxy: Client,
    upstream: FakeUpstream,
    status: int,
    retry_after: str | None,
    expected: int,
    code: str,
) -> None:
    digest, _ = big_blob(upstream, 100)
    upstream.status, upstream.retry_after = status, retry_after
    resp = await proxy.get(f"{BLOB}/{digest}")
    await assert_error(resp, expected, code)
    assert resp.headers.get("Retry-After") == retry_after
    assert not await cached_blob(proxy, digest)


async def test_upstream_down_on_miss(proxy: Client, upstream: FakeUpstream) -> None:
    digest, _ = big_blob(upstream, 100)
    upstream.down = True
    await assert_error(await proxy.get(f"{BLOB}/{digest}"), 503, "UNAVAILABLE")
    await assert_error(await proxy.head(f"{BLOB}/{digest}"), 503, "UNAVAILABLE")


async def test_concurrent_gets_fetch_once(proxy: Client, upstream: FakeUpstream) -> None:
    digest, data = big_blob(upstream)
    bodies = await asyncio.gather(*(get_body(proxy, f"{BLOB}/{digest}") for _ in range(8)))
    assert all(body == data for body in bodies)
    assert upstream.blob_gets(REPO, digest) == 1
    assert upstream.bytes_sent[digest] == len(data)
    await eventually(lambda: cached_blob(proxy, digest))


async def test_first_bytes_before_upstream_finishes_and_late_joiners(
    proxy: Client, upstream: FakeUpstream
) -> None:
    digest, data = big_blob(upstream, 4 * MiB)
    upstream.slow = {digest}
    upstream.slow_first = 2 * MiB

    first = await proxy.get(f"{BLOB}/{digest}")
    assert first.status == 200
    head = await asyncio.wait_for(first.content.readexactly(MiB), 5)
    # the client has bytes while the upstream is still holding back the rest
    assert upstream.first_sent.is_set() and not upstream.release.is_set()
    assert upstream.bytes_sent[digest] == 2 * MiB
    assert head == data[:MiB]

    joined = [asyncio.Event() for _ in range(7)]

    async def late(event: asyncio.Event) -> bytes:
        resp = await proxy.get(f"{BLOB}/{digest}")
        assert resp.status == 200
        assert resp.headers["Content-Length"] == str(len(data))
        start = await resp.content.readexactly(MiB)
        event.set()  # this client got bytes before the upstream finished sending
        return start + await resp.read()

    followers = [asyncio.create_task(late(event)) for event in joined]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in joined)), 5)
    assert upstream.bytes_sent[digest] == 2 * MiB
    upstream.release.set()

    assert head + await first.read() == data
    for body in await asyncio.gather(*followers):
        assert body == data
    assert upstream.blob_gets(REPO, digest) == 1
    await eventually(lambda: cached_blob(proxy, digest))


async def read_broken(client: Client, path: str) -> None:
    """GET ``path`` and check the client cannot take it for a complete blob: either the
    body breaks off (the headers had gone out), or, if the fill failed before the first
    byte was ready, an UNAVAILABLE error response."""
    resp = await client.get(path)
    if resp.status == 200:
        with pytest.raises(BROKEN):
            await resp.read()
    else:
        await assert_error(resp, 503, "UNAVAILABLE")


async def test_upstream_fails_mid_stream(proxy: Client, upstream: FakeUpstream) -> None:
    """The upstream cuts every transfer at 2 MiB: the fill resumes it with Range a bounded
    number of times, then gives up; its spool stays, and the next pull continues from it."""
    digest, data = big_blob(upstream)
    cut = 2 * MiB + 5
    upstream.fail_after = {digest: cut}
    resp = await proxy.get(f"{BLOB}/{digest}")
    assert resp.status == 200  # the size was known, the headers went out
    assert await resp.content.readexactly(MiB) == data[:MiB]
    with pytest.raises(BROKEN):
        await resp.read()
    await eventually(lambda: no_fill_running(proxy))
    assert upstream.ranged_gets(REPO, digest) == MAX_RESUMES  # each cut at once
    assert await meta_of(proxy).get_blob(Digest.parse(digest)) is None
    assert stored_file(proxy, digest) is None
    spooled = partial_fills(proxy)
    assert list(spooled) == [digest] and 0 < spooled[digest] <= cut

    upstream.fail_after = {}
    assert await get_body(proxy, f"{BLOB}/{digest}") == data
    assert upstream.ranged_gets(REPO, digest) == MAX_RESUMES + 1
    assert upstream.bytes_sent[digest] <= len(data) + IN_FLIGHT  # nothing fetched twice
    await eventually(lambda: cached_blob(proxy, digest))
    await eventually(lambda: no_fill_running(proxy))
    assert leftover_files(proxy) == []


@pytest.mark.parametrize("cut", [0, 5, MiB + 5])
async def test_upstream_fails_early(proxy: Client, upstream: FakeUpstream, cut: int) -> None:
    digest, data = big_blob(upstream)
    upstream.fail_after = {digest: cut}
    await read_broken(proxy, f"{BLOB}/{digest}")
    await eventually(lambda: no_fill_running(proxy))
    assert not await cached_blob(proxy, digest)
    assert all(0 < size <= cut for size in partial_fills(proxy).values())
    upstream.fail_after = {}
    assert await get_body(proxy, f"{BLOB}/{digest}") == data
    assert upstream.bytes_sent[digest] <= len(data) + IN_FLIGHT
    await eventually(lambda: cached_blob(proxy, digest))
    await eventually(lambda: no_fill_running(proxy))
    assert leftover_files(proxy) == []


async def test_concurrent_clients_all_fail_mid_stream(
    proxy: Client, upstream: FakeUpstream
) -> None:
    digest, _ = big_blob(upstream)
    upstream.fail_after = {digest: 2 * MiB}
    await asyncio.gather(*(read_broken(proxy, f"{BLOB}/{digest}") for _ in range(4)))
    assert upstream.blob_gets(REPO, digest) == 1
    await eventually(lambda: no_fill_running(proxy))
    assert stored_file(proxy, digest) is None


@pytest.mark.parametrize("size", [10, 3 * MiB])
@pytest.mark.parametrize("chunked", [False, True])
async def test_corrupted_blob_never_cached(
    proxy: Client, upstream: FakeUpstream, size: int, chunked: bool
) -> None:
    digest, data = big_blob(upstream, size)
    upstream.corrupt = {digest}
    upstream.no_length = {digest} if chunked else set()
    for attempt in (1, 2):
        await read_broken(proxy, f"{BLOB}/{digest}")
        await eventually(lambda: no_fill_running(proxy))
        assert not await cached_blob(proxy, digest)
        assert stored_file(proxy, digest) is None
        assert leftover_files(proxy) == []
        assert upstream.blob_gets(REPO, digest) == attempt  # fetched again: nothing was kept

    upstream.corrupt = set()
    assert await get_body(proxy, f"{BLOB}/{digest}") == data
    await eventually(lambda: cached_blob(proxy, digest))


async def test_upstream_without_content_length(proxy: Client, upstream: FakeUpstream) -> None:
    digest, data = big_blob(upstream)
    upstream.no_length = {digest}
    bodies = await asyncio.gather(*(get_body(proxy, f"{BLOB}/{digest}") for _ in range(3)))
    assert bodies == [data] * 3
    assert upstream.blob_gets(REPO, digest) == 1
    await eventually(lambda: cached_blob(proxy, digest))


async def test_client_leaving_early_does_not_stop_the_fill(
    proxy: Client, upstream: FakeUpstream
) -> None:
    digest, data = big_blob(upstream, 4 * MiB)
    upstream.slow = {digest}
    upstream.slow_first = 2 * MiB
    resp = await proxy.get(f"{BLOB}/{digest}")
    assert await asyncio.wait_for(resp.content.readexactly(MiB), 5) == data[:MiB]
    resp.close()  # hang up mid-body
    await asyncio.sleep(0.05)
    upstream.release.set()

    await eventually(lambda: cached_blob(proxy, digest))
    assert stored_file(proxy, digest).read_bytes() == data  # type: ignore[union-attr]
    assert await get_body(proxy, f"{BLOB}/{digest}") == data
    assert upstream.blob_gets(REPO, digest) == 1


@pytest.mark.parametrize(
    ("header", "start", "end"),
    [("bytes=1000-1999", 1000, 1999), ("bytes=-10", 3 * MiB - 10, 3 * MiB - 1)],
)
async def test_range_on_miss(
    proxy: Client, upstream: FakeUpstream, header: str, start: int, end: int
) -> None:
    digest, data = big_blob(upstream)
    resp = await proxy.get(f"{BLOB}/{digest}", headers={"Range": header})
    assert resp.status == 206
    assert resp.headers["Content-Range"] == f"bytes {start}-{end}/{len(data)}"
    assert resp.headers["Content-Length"] == str(end - start + 1)
    assert await resp.read() == data[start : end + 1]
    # the whole blob was fetched once and cached
    await eventually(lambda: cached_blob(proxy, digest))
    assert upstream.blob_gets(REPO, digest) == 1
    resp = await proxy.get(f"{BLOB}/{digest}", headers={"Range": header})
    assert resp.status == 206 and await resp.read() == data[start : end + 1]
    assert upstream.blob_gets(REPO, digest) == 1


async def test_blob_shared_between_repositories(proxy: Client, upstream: FakeUpstream) -> None:
    """A blob cached for one repository is not downloaded again for another."""
    digest, data = big_blob(upstream, 5000)
    upstream.blobs[("lib/other", digest)] = data
    assert await get_body(proxy, f"{BLOB}/{digest}") == data
    await eventually(lambda: cached_blob(proxy, digest))
    assert await get_body(proxy, f"/v2/fake/lib/other/blobs/{digest}") == data
    assert upstream.blob_gets(REPO, digest) == 1
    assert upstream.blob_gets("lib/other", digest) == 0
    # ...but only if the upstream has it in that repository: no leaking across repositories
    await assert_error(await proxy.get(f"/v2/fake/lib/third/blobs/{digest}"), 404, "BLOB_UNKNOWN")


async def test_redirect_to_another_path(proxy: Client, upstream: FakeUpstream) -> None:
    digest, data = big_blob(upstream, MiB + 3)
    assert upstream.base_url is not None
    upstream.redirect_to = upstream.base_url / "cdn"
    assert await get_body(proxy, f"{BLOB}/{digest}") == data
    assert upstream.count("GET", f"/v2/{REPO}/blobs/{digest}", 307) == 1
    assert upstream.count("GET", f"/cdn/{REPO}/{digest}", 200) == 1


async def test_redirect_to_cdn_gets_no_authorization(
    make_proxy: MakeProxy, upstream: FakeUpstream, cdn: yarl.URL
) -> None:
    upstream.auth = "bearer"
    proxy = await make_proxy()
    digest, data = big_blob(upstream, MiB + 3)
    upstream.redirect_to = cdn
    assert await get_body(proxy, f"{BLOB}/{digest}") == data
    redirected = [s for s in upstream.seen if s.path == f"/v2/{REPO}/blobs/{digest}"]
    assert redirected[-1].headers["Authorization"].startswith("Bearer ")
    at_cdn = [s for s in upstream.seen if s.server == "cdn"]
    assert len(at_cdn) == 1 and at_cdn[0].path == f"/cdn/{REPO}/{digest}"
    assert "Authorization" not in at_cdn[0].headers
    await eventually(lambda: cached_blob(proxy, digest))
