"""Tag lists through the cache of a real docker-registry (distribution 2.8), which ignores
``n`` and ``last`` and sends every tag unsorted: regproxy's pages are still the sorted
slices a client walks to the end by following regproxy's ``Link``."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import aiohttp
import pytest

from tests.e2e.procs import docker_registry, regproxy

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio]

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
TAGS = sorted(f"t{i}" for i in range(11))


async def _push_tags(session: aiohttp.ClientSession, url: str) -> None:
    config = b'{"architecture":"amd64","os":"linux"}'
    digest = "sha256:" + hashlib.sha256(config).hexdigest()
    async with session.post(f"{url}/v2/lib/app/blobs/uploads/") as resp:
        assert resp.status == 202
        location = resp.headers["Location"]
    separator = "&" if "?" in location else "?"
    async with session.put(f"{location}{separator}digest={digest}", data=config) as resp:
        assert resp.status == 201, await resp.text()
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": digest, "size": len(config)},
        "layers": [],
    }  # fmt: skip
    for tag in TAGS:
        headers = {"Content-Type": OCI_MANIFEST}
        async with session.put(
            f"{url}/v2/lib/app/manifests/{tag}", data=json.dumps(doc), headers=headers
        ) as resp:
            assert resp.status == 201, await resp.text()


async def test_tag_pages_through_docker_registry(tmp_path: Path) -> None:
    async with docker_registry(tmp_path / "upstream") as upstream, aiohttp.ClientSession() as s:
        await _push_tags(s, upstream.url)
        async with s.get(f"{upstream.url}/v2/lib/app/tags/list", params={"n": "3"}) as resp:
            assert len((await resp.json())["tags"]) == len(TAGS)  # it ignores n
        config = f'[upstreams.up]\nurl = "{upstream.url}"\n'
        async with regproxy(tmp_path / "proxy", config=config) as proxy:
            seen: list[str] = []
            target = f"{proxy.url}/v2/up/lib/app/tags/list?n=3"
            for _ in range(len(TAGS)):
                async with s.get(target) as resp:
                    assert resp.status == 200, await resp.text()
                    page = (await resp.json())["tags"]
                    link = resp.headers.get("Link")
                assert page == sorted(page) and len(page) <= 3
                seen += page
                if link is None:
                    break
                target = proxy.url + link.split(">", 1)[0].lstrip("<")
            assert seen == TAGS
