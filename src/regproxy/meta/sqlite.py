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

from regproxy import oci
from regproxy.meta.base import (
    BlobRow,
    ImageSummary,
    LeaseRow,
    ManifestRow,
    Reference,
    RepositorySummary,
    TagSummary,
    UploadRow,
)
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

    # -- operations: metrics, readiness, `regproxy cache ls` ----------------------------------

    async def ping(self) -> None:
        await self._one("SELECT 1", ())

    async def cache_usage(self, prefix: str) -> tuple[int, int]:
        low, high = _prefix_range(prefix)
        row = await self._one(
            "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM blobs WHERE digest IN"
            " (SELECT digest FROM repository_blobs WHERE repo >= ? AND repo < ?)",
            (low, high),
        )
        manifests = await self._one(
            "SELECT COALESCE(SUM(length(content)), 0) FROM manifests WHERE repo >= ? AND repo < ?",
            (low, high),
        )
        return int(row[0]), int(row[1]) + int(manifests[0])

    async def count_uploads(self) -> int:
        row = await self._one("SELECT COUNT(*) FROM uploads", ())
        return int(row[0])

    async def cached_images(self, prefix: str) -> list[ImageSummary]:
        low, high = _prefix_range(prefix)
        rows = await self._all(
            "WITH RECURSIVE reach(root_repo, root_tag, repo, digest) AS ("
            "  SELECT repo, tag, repo, digest FROM tags WHERE repo >= ? AND repo < ?"
            "  UNION"
            "  SELECT reach.root_repo, reach.root_tag, r.repo, r.child FROM reach"
            "  JOIN manifest_references r ON r.repo = reach.repo AND r.digest = reach.digest"
            "  AND r.is_manifest = 1"
            ")"
            " SELECT t.repo, t.tag, t.digest, m.media_type, t.updated,"
            "  (SELECT COALESCE(SUM(length(mm.content)), 0) FROM manifests mm"
            "   WHERE EXISTS (SELECT 1 FROM reach x WHERE x.root_repo = t.repo"
            "    AND x.root_tag = t.tag AND x.repo = mm.repo AND x.digest = mm.digest))"
            "  + (SELECT COALESCE(SUM(b.size), 0) FROM blobs b WHERE b.digest IN"
            "   (SELECT r.child FROM reach x JOIN manifest_references r"
            "    ON r.repo = x.repo AND r.digest = x.digest AND r.is_manifest = 0"
            "    WHERE x.root_repo = t.repo AND x.root_tag = t.tag))"
            " FROM tags t JOIN manifests m ON m.repo = t.repo AND m.digest = t.digest"
            " WHERE t.repo >= ? AND t.repo < ? ORDER BY t.repo, t.tag",
            (low, high, low, high),
        )
        return [
            ImageSummary(repo, tag, Digest.parse(digest), media_type, float(updated), int(size))
            for repo, tag, digest, media_type, updated, size in rows
        ]

    # -- the web UI ---------------------------------------------------------------------------

    async def list_repository_summaries(
        self, last: str, limit: int, *, prefixes: Sequence[str], cached: bool
    ) -> list[RepositorySummary]:
        if cached and not prefixes:
            return []
        ranges = [_prefix_range(prefix) for prefix in prefixes]
        under = " OR ".join("(m.repo >= ? AND m.repo < ?)" for _ in ranges) or "0"
        where = f"({under})" if cached else f"NOT ({under})"
        rows = await self._all(
            "SELECT m.repo, (SELECT COUNT(*) FROM tags t WHERE t.repo = m.repo),"
            " COUNT(*), MAX(m.created) FROM manifests m"
            f" WHERE m.repo > ? AND {where} GROUP BY m.repo ORDER BY m.repo LIMIT ?",
            [last, *(bound for pair in ranges for bound in pair), limit],
        )
        return [RepositorySummary(name, tags, n, float(updated)) for name, tags, n, updated in rows]

    async def list_tag_summaries(self, repo: str, last: str, limit: int) -> list[TagSummary]:
        # reach: each tagged manifest and everything under it (an index's manifests, their
        # blobs; an index entry that is a blob, as in BuildKit's cache), each once per tag.
        index_types = ", ".join("?" for _ in oci.INDEX_TYPES)
        rows = await self._all(
            "WITH RECURSIVE page(tag, digest, updated) AS ("
            "  SELECT tag, digest, updated FROM tags WHERE repo = ? AND tag > ?"
            "  ORDER BY tag LIMIT ?"
            "), reach(root, node, is_manifest) AS ("
            "  SELECT DISTINCT digest, digest, 1 FROM page"
            "  UNION"
            "  SELECT reach.root, r.child, r.is_manifest FROM reach JOIN manifest_references r"
            "  ON r.repo = ? AND r.digest = reach.node AND reach.is_manifest = 1"
            "), sizes(root, bytes, missing) AS ("
            "  SELECT x.root, SUM(COALESCE(length(m.content), b.size, 0)),"
            "   SUM(CASE WHEN m.digest IS NULL AND b.digest IS NULL THEN 1 ELSE 0 END)"
            "  FROM reach x LEFT JOIN manifests m ON m.repo = ? AND m.digest = x.node"
            "  LEFT JOIN blobs b ON m.digest IS NULL AND b.digest = x.node GROUP BY x.root"
            ")"
            " SELECT p.tag, p.digest, p.updated, m.media_type, COALESCE(s.bytes, 0),"
            f"  COALESCE(s.missing, 0), CASE WHEN m.media_type IN ({index_types})"
            "  THEN m.content END"
            " FROM page p LEFT JOIN manifests m ON m.repo = ? AND m.digest = p.digest"
            " LEFT JOIN sizes s ON s.root = p.digest ORDER BY p.tag",
            [repo, last, limit, repo, repo, *sorted(oci.INDEX_TYPES), repo],
        )
        return [
            TagSummary(
                tag,
                Digest.parse(digest),
                media_type,
                float(updated),
                int(size),
                int(missing),
                bytes(index) if index is not None else None,
            )
            for tag, digest, updated, media_type, size, missing, index in rows
        ]

    async def count_tags(self, repo: str) -> int:
        row = await self._one("SELECT COUNT(*) FROM tags WHERE repo = ?", (repo,))
        return int(row[0])

    async def tags_of_manifest(self, repo: str, digest: Digest, limit: int) -> list[str]:
        rows = await self._all(
            "SELECT tag FROM tags WHERE repo = ? AND digest = ? ORDER BY tag LIMIT ?",
            (repo, str(digest), limit),
        )
        return [row[0] for row in rows]


def _prefix_range(prefix: str) -> tuple[str, str]:
    """Repository names under ``prefix/`` (all of them for ""), as a key range."""
    if not prefix:
        return "", "\U0010ffff"
    return f"{prefix}/", f"{prefix}0"  # "0" sorts right after "/"
