"""``Range: bytes=-0`` through the cache: 416 while the blob is still arriving (served from
the spool) and once it is cached, never the whole body."""

from __future__ import annotations

from tests.helpers import Client, assert_error
from tests.proxy.conftest import cached_blob
from tests.proxy.fakeupstream import FakeUpstream
from tests.proxy.test_blobs import BLOB, REPO, big_blob, eventually

MiB = 1 << 20


async def test_zero_suffix_while_filling_and_cached(proxy: Client, upstream: FakeUpstream) -> None:
    digest, data = big_blob(upstream, 2 * MiB)
    upstream.slow.add(digest)
    first = await proxy.get(f"{BLOB}/{digest}")  # starts the fill, which stops half-way
    assert first.status == 200
    await upstream.first_sent.wait()
    resp = await proxy.get(f"{BLOB}/{digest}", headers={"Range": "bytes=-0"})
    await assert_error(resp, 416, "RANGE_INVALID")
    assert resp.headers["Content-Range"] == f"bytes */{len(data)}"
    upstream.release.set()
    assert await first.read() == data
    await eventually(lambda: cached_blob(proxy, digest))
    resp = await proxy.get(f"{BLOB}/{digest}", headers={"Range": "bytes=-0"})
    await assert_error(resp, 416, "RANGE_INVALID")
    assert resp.headers["Content-Range"] == f"bytes */{len(data)}"
    assert upstream.blob_gets(REPO, digest) == 1
