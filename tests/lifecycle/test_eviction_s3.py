"""The cache budget with blobs on S3 (moto): evicted blobs leave the bucket right away."""

from __future__ import annotations

import os
from pathlib import Path

from tests.conftest import MakeClient
from tests.lifecycle.cache import pull, settle
from tests.proxy.conftest import meta_of
from tests.proxy.fakeupstream import FakeUpstream
from tests.s3fixtures import S3

MiB = 1 << 20


async def bucket_bytes(s3: S3) -> int:
    async with s3.client() as client:
        total = 0
        paginator = client.get_paginator("list_objects_v2")
        async for page in paginator.paginate(Bucket=s3.bucket):
            total += sum(item["Size"] for item in page.get("Contents", []))
        return total


async def test_budget_on_s3(
    make_client: MakeClient, upstream: FakeUpstream, tmp_path: Path, s3: S3
) -> None:
    budget = 6 * MiB
    config = s3.app_config(
        tmp_path,
        upstreams={"fake": {"url": str(upstream.base_url)}},
        cache__max_bytes=budget,
        cache__grace=0.0,
    )
    client = await make_client(config)
    images = [
        upstream.add_image("lib/app", f"v{i}", [os.urandom(2 * MiB)], seed=str(i)) for i in range(6)
    ]
    for image in images:
        assert (await pull(client, "fake/lib/app", image.tag or ""))[1] == image.blobs
        await settle(client)
        usage = (await meta_of(client).cache_usage(["fake"])).total
        assert usage == await bucket_bytes(s3) <= budget + 2 * MiB + 64 * 1024
    assert await meta_of(client).get_tagged_manifest("fake/lib/app", "v0") is None
    assert (await pull(client, "fake/lib/app", "v0"))[1] == images[0].blobs  # fetched again
    assert sum(upstream.blob_gets("lib/app", d) for d in images[0].blobs) == 2 * len(
        images[0].blobs
    )
