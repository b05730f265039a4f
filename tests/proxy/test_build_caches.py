"""A BuildKit cache index (entries are blobs, not manifests) through the pull-through cache:
the index and every blob it lists come back byte for byte, the index is cached with blob
references, and the blobs are fetched once."""

from __future__ import annotations

import json
import os

from tests.helpers import Client
from tests.proxy.conftest import meta_of
from tests.proxy.fakeupstream import DOCKER_LAYER, DOCKER_LIST, OCI_INDEX, FakeUpstream, descriptor

CACHE_CONFIG = "application/vnd.buildkit.cacheconfig.v0"
REPO = "bk/cache"


async def test_cache_index_of_blobs_through_the_cache(
    proxy: Client, upstream: FakeUpstream
) -> None:
    blobs: dict[str, bytes] = {}
    entries = []
    for media_type, data in [
        ("application/vnd.oci.image.layer.v1.tar+gzip", os.urandom(3000)),
        (DOCKER_LAYER, os.urandom(2000)),
        (CACHE_CONFIG, b'{"layers":[{"blob":"x","parent":-1}],"records":[]}'),
    ]:
        blobs[upstream.add_blob(REPO, data)] = data
        entries.append(descriptor(media_type, data))
    for index_type, tag in ((OCI_INDEX, "oci"), (DOCKER_LIST, "docker")):
        content = json.dumps(
            {"schemaVersion": 2, "mediaType": index_type, "manifests": entries}, indent=2
        ).encode()
        digest = upstream.add_manifest(REPO, content, index_type, tag)
        resp = await proxy.get(f"/v2/fake/{REPO}/manifests/{tag}")
        assert resp.status == 200, await resp.text()
        assert await resp.read() == content
        assert resp.headers["Docker-Content-Digest"] == digest
        rows = await meta_of(proxy)._all(  # type: ignore[attr-defined]
            "SELECT child, is_manifest FROM manifest_references WHERE repo = ? AND digest = ?",
            (f"fake/{REPO}", digest),
        )
        assert {(child, bool(m)) for child, m in rows} == {(d, False) for d in blobs}
    for blob, data in blobs.items():
        for _ in range(2):
            resp = await proxy.get(f"/v2/fake/{REPO}/blobs/{blob}")
            assert resp.status == 200 and await resp.read() == data
    assert all(upstream.blob_gets(REPO, blob) == 1 for blob in blobs)
