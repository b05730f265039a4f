"""The UI's pages make a bounded number of SQL queries, however many tags there are.

Every statement either metadata connection runs is counted with sqlite3's trace callback.
"""

from __future__ import annotations

import html
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import bcrypt

from regproxy.meta.base import BlobRow, ManifestRow, Reference
from regproxy.meta.sqlite import SqliteMetadataStore
from regproxy.oci import Digest
from regproxy.tasks import HOSTED
from tests.conftest import MakeClient
from tests.helpers import OCI_INDEX, OCI_MANIFEST, Client, app_of, canonical, make_config
from tests.web.conftest import fetch

TAGS = 5000


@asynccontextmanager
async def counting(client: Client) -> AsyncIterator[list[str]]:
    meta = app_of(client)[HOSTED].meta
    assert isinstance(meta, SqliteMetadataStore)
    statements: list[str] = []
    connections = (meta._reader, meta._writer)
    for conn in connections:
        await conn.set_trace_callback(statements.append)
    try:
        yield statements
    finally:
        for conn in connections:
            await conn.set_trace_callback(None)


async def fill(client: Client, repo: str, tags: int) -> None:
    """``tags`` tags over 50 images and 10 two-platform indexes, with stored blobs."""
    meta = app_of(client)[HOSTED].meta
    images = []
    for i in range(50):
        blob = f"blob {i}".encode()
        digest = Digest.of(blob)
        await meta.add_blob(repo, _blob_row(digest, len(blob)))
        doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "seed": i}
        content = canonical(doc)
        row = ManifestRow(Digest.of(content), OCI_MANIFEST, content)
        await meta.put_manifest(repo, row, [Reference(digest, False)], [])
        images.append((row, content))
    rows = [row for row, _ in images]
    for i in range(10):
        doc = {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {
                    "mediaType": OCI_MANIFEST,
                    "digest": str(r.digest),
                    "size": len(c),
                    "platform": {"os": "linux", "architecture": arch},
                }
                for (r, c), arch in zip(images[2 * i : 2 * i + 2], ("amd64", "arm64"), strict=True)
            ],
        }
        content = canonical(doc)
        row = ManifestRow(Digest.of(content), OCI_INDEX, content)
        await meta.put_manifest(
            repo, row, [Reference(r.digest, True) for r, _ in images[2 * i : 2 * i + 2]], []
        )
        rows.append(row)
    for start in range(0, tags, 500):
        for row_number, row in enumerate(rows):
            names = [
                f"t{n:05d}"
                for n in range(start, min(start + 500, tags))
                if n % len(rows) == row_number
            ]
            await meta.put_manifest(repo, row, [], names)


def _blob_row(digest: Digest, size: int) -> BlobRow:
    return BlobRow(digest, size, f"key/{digest.hex}")


async def test_tags_page_queries_do_not_grow_with_tags(client: Client) -> None:
    await fill(client, "big/app", TAGS)
    await fill(client, "small/app", 10)
    counts, pages = {}, {}
    for repo in ("big/app", "small/app"):
        async with counting(client) as statements:
            pages[repo] = await fetch(client, f"/ui/repo/{repo}")
        counts[repo] = len(statements)
    assert counts["big/app"] == counts["small/app"] <= 4, counts
    assert pages["big/app"].count('href="/ui/manifest/big/app/-/t0') == 100
    assert "linux/arm64" in pages["big/app"] and "<dd>5,000</dd>" in pages["big/app"]
    async with counting(client) as statements:
        page = await fetch(client, "/ui/repo/big/app?last=t04000&n=500")
    assert page.count("/ui/manifest/big/app/-/t0") == 500 and len(statements) <= 4


async def test_other_pages_bounded(client: Client) -> None:
    await fill(client, "big/app", TAGS)
    for path in ("/ui/", "/ui/manifest/big/app/-/t00055", "/ui/upstreams"):
        async with counting(client) as statements:
            await fetch(client, path)
        assert len(statements) <= 6, (path, statements)


async def test_repository_list_bounded_when_little_is_visible(
    make_client: MakeClient, tmp_path: Path
) -> None:
    """Looking for repositories a user may pull among many it may not stops after a few
    queries and offers to go on from where it stopped."""
    users = {"bob": bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode()}
    rules = [{"who": ["bob"], "repos": ["team/**"], "actions": ["pull"]}]
    client = await make_client(make_config(tmp_path, auth__users=users, auth__rules=rules))
    meta = app_of(client)[HOSTED].meta
    row = ManifestRow(Digest.of(b"{}"), OCI_MANIFEST, b"{}")
    for i in range(1200):
        await meta.put_manifest(f"other/r{i:04d}", row, (), ["v1"])
    await meta.put_manifest("team/app", row, (), ["v1"])
    resp = await client.post(
        "/ui/login", data={"username": "bob", "password": "pw"}, allow_redirects=False
    )
    assert resp.status == 303
    async with counting(client) as statements:
        page = await fetch(client, "/ui/?kind=hosted")
    queries = [s for s in statements if "FROM manifests" in s]
    assert len(queries) <= 5, len(queries)
    assert "team/app" not in page and "Next page" in page
    seen, path = [], "/ui/?kind=hosted"
    for _ in range(10):
        page = await fetch(client, path)
        seen += re.findall(r'href="/ui/repo/([^"]+)"', page)
        more = re.findall(r'href="(/ui/\?[^"]*last=[^"]+)"', page)
        if not more:
            break
        path = html.unescape(more[0])
    assert seen == ["team/app"]
