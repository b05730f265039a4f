"""The metadata store on SQLite (WAL mode) through aiosqlite.

Two connections: one for reads, which only ever sees committed data, and one for writes,
whose transactions an asyncio lock keeps from interleaving. Several processes may share
the file: ``BEGIN IMMEDIATE`` and a busy timeout serialize their writers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import aiosqlite

from regproxy.meta.base import BlobRow, LeaseRow, ManifestRow, Reference, UploadRow
from regproxy.oci import Digest

_PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    "PRAGMA synchronous=NORMAL",
    "PRAGMA busy_timeout=10000",
    "PRAGMA foreign_keys=ON",
)
# References checked per query (two bound parameters each).
_REFERENCE_BATCH = 500
_MANIFEST_COLUMNS = "m.digest, m.media_type, m.content, m.subject, m.artifact_type"
_LEASE_COLUMNS = "key, owner, host, url, spool, size, started, expires"


def _migrations() -> list[tuple[int, str]]:
    folder = resources.files("regproxy.meta") / "migrations"
    found = []
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            lines = [ln for ln in entry.read_text().splitlines() if not ln.startswith("--")]
            found.append((int(entry.name.split("_", 1)[0]), "\n".join(lines)))
    return sorted(found)


def _manifest(row: Any) -> ManifestRow:
    digest, media_type, content, subject, artifact_type = row
    return ManifestRow(
        digest=Digest.parse(digest),
        media_type=media_type,
        content=bytes(content),
        subject=Digest.parse(subject) if subject else None,
        artifact_type=artifact_type,
    )


def _lease(row: Any) -> LeaseRow:
    key, owner, host, url, spool, size, started, expires = row
    return LeaseRow(key, owner, host, url, spool, size, float(started), float(expires))


def _blob(row: Any) -> BlobRow:
    return BlobRow(Digest.parse(row[0]), row[1], row[2])


class SqliteMetadataStore:
    def __init__(self, reader: aiosqlite.Connection, writer: aiosqlite.Connection) -> None:
        self._reader = reader
        self._writer = writer
        self._write_lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: Path) -> SqliteMetadataStore:
        path.parent.mkdir(parents=True, exist_ok=True)
        writer = await aiosqlite.connect(path, isolation_level=None)
        reader = await aiosqlite.connect(path, isolation_level=None)
        for conn in (writer, reader):
            for pragma in _PRAGMAS:
                await conn.execute(pragma)
        store = cls(reader, writer)
        await store._migrate()
        return store

    async def close(self) -> None:
        await self._reader.close()
        await self._writer.close()

    async def _migrate(self) -> None:
        async with self._transaction() as db:
            rows = await db.execute_fetchall("PRAGMA user_version")
            current = next(iter(rows))[0]
            for version, script in _migrations():
                if version > current:
                    for statement in script.split(";"):
                        if statement.strip():
                            await db.execute(statement)
                    await db.execute(f"PRAGMA user_version={version}")

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        async with self._write_lock:
            await self._writer.execute("BEGIN IMMEDIATE")
            try:
                yield self._writer
            except BaseException:
                await self._writer.execute("ROLLBACK")
                raise
            await self._writer.execute("COMMIT")

    async def _one(self, sql: str, params: Sequence[Any]) -> Any:
        rows = list(await self._reader.execute_fetchall(sql, params))
        return rows[0] if rows else None

    async def _all(self, sql: str, params: Sequence[Any]) -> list[Any]:
        return list(await self._reader.execute_fetchall(sql, params))

    # -- blobs --------------------------------------------------------------------------------

    async def get_blob(self, digest: Digest) -> BlobRow | None:
        row = await self._one(
            "SELECT digest, size, storage_key FROM blobs WHERE digest = ?", (str(digest),)
        )
        return _blob(row) if row else None

    async def get_repo_blob(self, repo: str, digest: Digest) -> BlobRow | None:
        row = await self._one(
            "SELECT b.digest, b.size, b.storage_key FROM repository_blobs r"
            " JOIN blobs b ON b.digest = r.digest WHERE r.repo = ? AND r.digest = ?",
            (repo, str(digest)),
        )
        return _blob(row) if row else None

    async def add_blob(self, repo: str, blob: BlobRow) -> BlobRow:
        async with self._transaction() as db:
            await db.execute(
                "INSERT OR IGNORE INTO blobs (digest, size, storage_key, created)"
                " VALUES (?, ?, ?, ?)",
                (str(blob.digest), blob.size, blob.storage_key, time.time()),
            )
            await db.execute(
                "INSERT OR IGNORE INTO repository_blobs (repo, digest) VALUES (?, ?)",
                (repo, str(blob.digest)),
            )
            rows = list(
                await db.execute_fetchall(
                    "SELECT digest, size, storage_key FROM blobs WHERE digest = ?",
                    (str(blob.digest),),
                )
            )
        return _blob(rows[0])

    async def link_blob(self, repo: str, digest: Digest) -> None:
        async with self._transaction() as db:
            await db.execute(
                "INSERT OR IGNORE INTO repository_blobs (repo, digest)"
                " SELECT ?, digest FROM blobs WHERE digest = ?",
                (repo, str(digest)),
            )

    async def blob_repositories(self, digest: Digest) -> list[str]:
        rows = await self._all(
            "SELECT repo FROM repository_blobs WHERE digest = ? ORDER BY repo", (str(digest),)
        )
        return [row[0] for row in rows]

    async def unlink_blob(self, repo: str, digest: Digest) -> bool:
        async with self._transaction() as db:
            cursor = await db.execute(
                "DELETE FROM repository_blobs WHERE repo = ? AND digest = ?", (repo, str(digest))
            )
            return cursor.rowcount > 0

    async def delete_blob_if_unused(self, digest: Digest) -> BlobRow | None:
        key = str(digest)
        async with self._transaction() as db:
            rows = list(
                await db.execute_fetchall(
                    "SELECT digest, size, storage_key FROM blobs WHERE digest = ?"
                    " AND NOT EXISTS (SELECT 1 FROM repository_blobs WHERE digest = ?)"
                    " AND NOT EXISTS (SELECT 1 FROM manifest_references WHERE child = ?)",
                    (key, key, key),
                )
            )
            if not rows:
                return None
            await db.execute("DELETE FROM blobs WHERE digest = ?", (key,))
        return _blob(rows[0])

    async def missing_references(self, repo: str, refs: Iterable[Reference]) -> list[Reference]:
        refs = list(refs)
        absent: set[tuple[str, bool]] = set()
        # A few queries for all of them: a manifest with 50 layers costs one round trip, not
        # 50; batches keep each query under SQLite's limit on bound parameters.
        for start in range(0, len(refs), _REFERENCE_BATCH):
            batch = refs[start : start + _REFERENCE_BATCH]
            params: list[Any] = []
            for ref in batch:
                params += [str(ref.digest), int(ref.is_manifest)]
            values = ", ".join("(?, ?)" for _ in batch)
            rows = await self._all(
                f"WITH wanted(digest, is_manifest) AS (VALUES {values})"
                " SELECT w.digest, w.is_manifest FROM wanted w WHERE NOT ("
                " (w.is_manifest = 1 AND EXISTS (SELECT 1 FROM manifests m"
                "   WHERE m.repo = ? AND m.digest = w.digest))"
                " OR (w.is_manifest = 0 AND EXISTS (SELECT 1 FROM repository_blobs b"
                "   WHERE b.repo = ? AND b.digest = w.digest)))",
                [*params, repo, repo],
            )
            absent.update((row[0], bool(row[1])) for row in rows)
        return [ref for ref in refs if (str(ref.digest), ref.is_manifest) in absent]

    # -- manifests and tags -------------------------------------------------------------------

    async def get_manifest(self, repo: str, digest: Digest) -> ManifestRow | None:
        row = await self._one(
            f"SELECT {_MANIFEST_COLUMNS} FROM manifests m WHERE m.repo = ? AND m.digest = ?",
            (repo, str(digest)),
        )
        return _manifest(row) if row else None

    async def get_tagged_manifest(self, repo: str, tag: str) -> ManifestRow | None:
        row = await self._one(
            f"SELECT {_MANIFEST_COLUMNS} FROM tags t JOIN manifests m"
            " ON m.repo = t.repo AND m.digest = t.digest WHERE t.repo = ? AND t.tag = ?",
            (repo, tag),
        )
        return _manifest(row) if row else None

    async def put_manifest(
        self, repo: str, manifest: ManifestRow, refs: Sequence[Reference], tags: Sequence[str]
    ) -> None:
        now = time.time()
        digest = str(manifest.digest)
        async with self._transaction() as db:
            await db.execute(
                "INSERT OR IGNORE INTO manifests"
                " (repo, digest, media_type, content, subject, artifact_type, created)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    repo,
                    digest,
                    manifest.media_type,
                    manifest.content,
                    str(manifest.subject) if manifest.subject else None,
                    manifest.artifact_type,
                    now,
                ),
            )
            await db.executemany(
                "INSERT OR IGNORE INTO manifest_references (repo, digest, child, is_manifest)"
                " VALUES (?, ?, ?, ?)",
                [(repo, digest, str(ref.digest), int(ref.is_manifest)) for ref in refs],
            )
            await db.executemany(
                "INSERT INTO tags (repo, tag, digest, updated) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (repo, tag) DO UPDATE SET digest = excluded.digest,"
                " updated = excluded.updated",
                [(repo, tag, digest, now) for tag in tags],
            )

    async def delete_manifest(self, repo: str, digest: Digest) -> bool:
        key = str(digest)
        async with self._transaction() as db:
            cursor = await db.execute(
                "DELETE FROM manifests WHERE repo = ? AND digest = ?", (repo, key)
            )
            if cursor.rowcount == 0:
                return False
            await db.execute(
                "DELETE FROM manifest_references WHERE repo = ? AND digest = ?", (repo, key)
            )
            await db.execute("DELETE FROM tags WHERE repo = ? AND digest = ?", (repo, key))
            return True

    async def delete_tag(self, repo: str, tag: str) -> bool:
        async with self._transaction() as db:
            cursor = await db.execute("DELETE FROM tags WHERE repo = ? AND tag = ?", (repo, tag))
            return cursor.rowcount > 0

    async def tag_checked(self, repo: str, tag: str) -> float | None:
        row = await self._one("SELECT updated FROM tags WHERE repo = ? AND tag = ?", (repo, tag))
        return float(row[0]) if row else None

    async def list_tags(self, repo: str, last: str, limit: int) -> list[str]:
        rows = await self._all(
            "SELECT tag FROM tags WHERE repo = ? AND tag > ? ORDER BY tag LIMIT ?",
            (repo, last, limit),
        )
        return [row[0] for row in rows]

    async def repository_exists(self, repo: str) -> bool:
        row = await self._one(
            "SELECT EXISTS (SELECT 1 FROM manifests WHERE repo = ?)"
            " OR EXISTS (SELECT 1 FROM repository_blobs WHERE repo = ?)",
            (repo, repo),
        )
        return bool(row[0])

    async def list_repositories(self, last: str, limit: int) -> list[str]:
        rows = await self._all(
            "SELECT DISTINCT repo FROM manifests WHERE repo > ? ORDER BY repo LIMIT ?",
            (last, limit),
        )
        return [row[0] for row in rows]

    async def referrers(
        self, repo: str, subject: Digest, artifact_type: str | None
    ) -> list[ManifestRow]:
        sql = f"SELECT {_MANIFEST_COLUMNS} FROM manifests m WHERE m.repo = ? AND m.subject = ?"
        params: list[Any] = [repo, str(subject)]
        if artifact_type is not None:
            sql += " AND m.artifact_type = ?"
            params.append(artifact_type)
        rows = await self._all(sql + " ORDER BY m.digest", params)
        return [_manifest(row) for row in rows]

    # -- uploads ------------------------------------------------------------------------------

    async def create_upload(self, upload: UploadRow) -> None:
        async with self._transaction() as db:
            await db.execute(
                'INSERT INTO uploads (id, repo, algorithm, "offset", state, started, updated)'
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    upload.id,
                    upload.repo,
                    upload.algorithm,
                    upload.offset,
                    upload.state,
                    upload.started,
                    upload.updated,
                ),
            )

    async def get_upload(self, upload_id: str) -> UploadRow | None:
        row = await self._one(
            'SELECT id, repo, algorithm, "offset", state, started, updated FROM uploads'
            " WHERE id = ?",
            (upload_id,),
        )
        return UploadRow(*row) if row else None

    async def update_upload(
        self, upload_id: str, offset: int, state: str, now: float, *, expected: float
    ) -> bool:
        async with self._transaction() as db:
            cursor = await db.execute(
                'UPDATE uploads SET "offset" = ?, state = ?, updated = ?'
                " WHERE id = ? AND updated = ?",
                (offset, state, now, upload_id, expected),
            )
            return cursor.rowcount > 0

    async def delete_upload(self, upload_id: str, *, expected: float | None = None) -> bool:
        sql = "DELETE FROM uploads WHERE id = ?"
        params: list[Any] = [upload_id]
        if expected is not None:
            sql += " AND updated = ?"
            params.append(expected)
        async with self._transaction() as db:
            cursor = await db.execute(sql, params)
            return cursor.rowcount > 0

    async def stale_uploads(self, before: float) -> list[UploadRow]:
        rows = await self._all(
            'SELECT id, repo, algorithm, "offset", state, started, updated FROM uploads'
            " WHERE updated < ?",
            (before,),
        )
        return [UploadRow(*row) for row in rows]

    # -- leases -------------------------------------------------------------------------------

    async def acquire_lease(self, lease: LeaseRow, now: float) -> LeaseRow:
        async with self._transaction() as db:
            rows = list(
                await db.execute_fetchall(
                    f"SELECT {_LEASE_COLUMNS} FROM leases WHERE key = ?", (lease.key,)
                )
            )
            if rows and float(rows[0][7]) >= now:
                return _lease(rows[0])
            await db.execute(
                f"INSERT OR REPLACE INTO leases ({_LEASE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    lease.key,
                    lease.owner,
                    lease.host,
                    lease.url,
                    lease.spool,
                    lease.size,
                    lease.started,
                    lease.expires,
                ),
            )
            return lease

    async def renew_lease(
        self, key: str, owner: str, expires: float, *, spool: str = "", size: int | None = None
    ) -> bool:
        async with self._transaction() as db:
            cursor = await db.execute(
                "UPDATE leases SET expires = ?, spool = CASE WHEN ? = '' THEN spool ELSE ? END,"
                " size = coalesce(?, size) WHERE key = ? AND owner = ?",
                (expires, spool, spool, size, key, owner),
            )
            return cursor.rowcount > 0

    async def get_lease(self, key: str) -> LeaseRow | None:
        row = await self._one(f"SELECT {_LEASE_COLUMNS} FROM leases WHERE key = ?", (key,))
        return _lease(row) if row else None

    async def release_lease(self, key: str, owner: str) -> bool:
        async with self._transaction() as db:
            cursor = await db.execute(
                "DELETE FROM leases WHERE key = ? AND owner = ?", (key, owner)
            )
            return cursor.rowcount > 0

    # -- failed logins ------------------------------------------------------------------------

    async def add_login_failure(self, key: str, now: float, window: float) -> int:
        async with self._transaction() as db:
            await db.execute("DELETE FROM login_failures WHERE started <= ?", (now - window,))
            await db.execute(
                "INSERT INTO login_failures (key, started, failures) VALUES (?, ?, 1)"
                " ON CONFLICT (key) DO UPDATE SET failures = failures + 1",
                (key, now),
            )
            rows = list(
                await db.execute_fetchall(
                    "SELECT failures FROM login_failures WHERE key = ?", (key,)
                )
            )
            return int(rows[0][0])

    async def login_failures(
        self, keys: Sequence[str], now: float, window: float
    ) -> dict[str, tuple[float, int]]:
        if not keys:
            return {}
        marks = ", ".join("?" for _ in keys)
        rows = await self._all(
            f"SELECT key, started, failures FROM login_failures WHERE key IN ({marks})"
            " AND started > ?",
            (*keys, now - window),
        )
        return {row[0]: (float(row[1]), int(row[2])) for row in rows}

    async def clear_login_failures(self, key: str) -> None:
        async with self._transaction() as db:
            await db.execute("DELETE FROM login_failures WHERE key = ?", (key,))
