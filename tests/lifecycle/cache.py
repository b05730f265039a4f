"""Helpers for the retention and eviction tests: pulls through a real HTTP client, waiting for
eviction to settle, measuring what the cache stores, and ageing rows."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from regproxy.api.keys import CONFIG
from regproxy.lifecycle.eviction import EVICTOR
from regproxy.lifecycle.pulls import PULLS
from regproxy.meta.postgres import PostgresMetadataStore
from regproxy.meta.sqlite import SqliteMetadataStore
from regproxy.proxy.pullthrough import PULL_THROUGH as PROXY
from regproxy.tasks import HOSTED
from tests.helpers import OCI_INDEX, OCI_MANIFEST, Client, app_of, digest_of, files_under

ACCEPT = ", ".join(
    (
        OCI_MANIFEST,
        OCI_INDEX,
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    )
)


async def pull(client: Client, repo: str, reference: str) -> tuple[bytes, dict[str, bytes]]:
    """Pull an image like a client: the manifest, then every blob; returns the bytes.

    Each blob's bytes are checked against its digest.
    """
    resp = await client.get(f"/v2/{repo}/manifests/{reference}", headers={"Accept": ACCEPT})
    assert resp.status == 200, await resp.text()
    manifest = await resp.read()
    doc: dict[str, Any] = json.loads(manifest)
    blobs: dict[str, bytes] = {}
    for desc in [doc["config"], *doc["layers"]]:
        blob = await client.get(f"/v2/{repo}/blobs/{desc['digest']}")
        assert blob.status == 200, await blob.text()
        data = await blob.read()
        assert digest_of(data) == desc["digest"] and len(data) == desc["size"]
        blobs[desc["digest"]] = data
    return manifest, blobs


async def settle(client: Client) -> None:
    """Wait until no fill is in flight and the eviction they triggered has finished.

    A fill leaves ``filling()`` before it has released its lease and asked for an eviction
    (that is the end of its task), so wait for the proxy's tasks too: otherwise, on a loaded
    machine, the eviction may not have started yet when ``settled()`` is asked."""
    proxy = app_of(client)[PROXY]
    for _ in range(1000):
        if not proxy.filling() and all(task.done() for task in proxy._tasks):
            break
        await asyncio.sleep(0.01)
    await app_of(client)[EVICTOR].settled()


def stored_bytes(client: Client) -> int:
    """Bytes of every file in blob storage (the filesystem backend)."""
    root = app_of(client)[CONFIG].storage_path
    return sum(p.stat().st_size for p in files_under(root) if "uploads" not in p.parts)


async def flush_pulls(client: Client) -> None:
    await app_of(client)[PULLS].flush()


def sqlite_meta(client: Client) -> SqliteMetadataStore:
    meta = app_of(client)[HOSTED].meta
    assert isinstance(meta, SqliteMetadataStore)
    return meta


async def age(client: Client, seconds: float, repo: str | None = None) -> None:
    """Move every push, pull and link time (of one repository, or all) ``seconds`` back."""
    await flush_pulls(client)  # pulls noted so far age too
    where = " WHERE repo = ?" if repo else ""
    statements = [
        f"UPDATE tags SET updated = updated - ?{where}",
        f"UPDATE manifests SET created = created - ?{where}",
        f"UPDATE manifests SET last_pulled = last_pulled - ?{where}"
        + (" AND" if repo else " WHERE")
        + " last_pulled IS NOT NULL",
        f"UPDATE repository_blobs SET linked = linked - ?{where}",
    ]
    if repo is None:
        statements.append("UPDATE blobs SET created = created - ?")
    params = (seconds, repo) if repo else (seconds,)
    meta = app_of(client)[HOSTED].meta
    if isinstance(meta, PostgresMetadataStore):

        async def work(db: Any) -> None:
            for sql in statements:
                await db.execute(_numbered(sql), *params)

        await meta._transaction(work)
        return
    async with sqlite_meta(client)._transaction() as db:
        for sql in statements:
            await db.execute(sql, params)


def _numbered(sql: str) -> str:
    """``?`` placeholders as PostgreSQL's ``$1``, ``$2``..."""
    first, *rest = sql.split("?")
    return first + "".join(f"${n}{part}" for n, part in enumerate(rest, 1))
