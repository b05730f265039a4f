"""Two apps on one metadata store (as two workers or replicas): a tag revalidation is done
once between them, under the tag's lease, while the other serves its cached copy."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiosqlite

from tests.conftest import MakeClient
from tests.helpers import make_config
from tests.proxy.fakeupstream import FakeUpstream
from tests.proxy.test_tags import REPO, TAG_PATH, UPSTREAM_TAG, assert_manifest


async def test_one_revalidation_per_tag_between_processes(
    make_client: MakeClient, upstream: FakeUpstream, tmp_path: Path
) -> None:
    image = upstream.add_image(REPO, "v1")
    assert upstream.base_url is not None
    config = make_config(
        tmp_path, upstreams={"fake": {"url": str(upstream.base_url), "tag_ttl": 3600}}
    )
    first, second = await make_client(config), await make_client(config)
    await assert_manifest(first, TAG_PATH, image)
    await assert_manifest(second, TAG_PATH, image)
    # Make the cached tag stale for both (as if tag_ttl had passed).
    async with aiosqlite.connect(config.data_path / "metadata.sqlite") as db:
        await db.execute("UPDATE tags SET updated = 0")
        await db.commit()
    upstream.reset_counters()
    upstream.delay = 0.5
    await asyncio.gather(
        *(assert_manifest(client, TAG_PATH, image) for client in [first, second] * 6)
    )
    assert upstream.count("HEAD", UPSTREAM_TAG) == 1
    assert upstream.total() == 1
    # Fresh again for both: no more upstream requests.
    await assert_manifest(second, TAG_PATH, image)
    await assert_manifest(first, TAG_PATH, image)
    assert upstream.total() == 1
