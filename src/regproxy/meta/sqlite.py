"""The metadata store on SQLite (WAL mode) through aiosqlite.

Two connections: one for reads, which only ever sees committed data, and one for writes,
whose transactions an asyncio lock keeps from interleaving. Several processes may share
the file: ``BEGIN IMMEDIATE`` and a busy timeout serialize their writers.

Manifest reads go through a :class:`ManifestCache`, valid while ``PRAGMA data_version`` of a
third connection stays put; that pragma reads the WAL index SQLite keeps in shared memory,
so it runs on the event loop, without the round trip to the aiosqlite thread it saves.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import sqlite3
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any, Final, TypeVar

import aiosqlite

from regproxy import oci
from regproxy.meta.base import (
    BlobRow,
    CachedImage,
    CacheUsage,
    GarbageBatch,
    GarbageManifest,
    ImageSummary,
    LeaseRow,
    ManifestRow,
    Reference,
    RepositorySummary,
    TagRow,
    TagSummary,
    UploadRow,
)
from regproxy.meta.cache import ManifestCache
from regproxy.oci import Digest

_T = TypeVar("_T")

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

# -- the garbage rules (one place; a PostgreSQL backend copies them) ----------------------------
# A blob (alias b) is unused when no manifest of any repository references it, no repository
# linked it since :before (pushed, mounted, or confirmed by a HEAD/GET), and its row is older
# than :before. Named parameter :before only. No upload "produces" a row: an upload has no
# digest until it finishes, and finishing inserts or links the row in one write transaction.
_BLOB_UNUSED = (
    "NOT EXISTS (SELECT 1 FROM manifest_references r WHERE r.child = b.digest)"
    " AND NOT EXISTS (SELECT 1 FROM repository_blobs l"
    "   WHERE l.digest = b.digest AND l.linked >= :before)"
    " AND b.created < :before"
)
# A manifest (alias m) is garbage, when untagged manifests are collected, if no tag names it,
# no index of its repository lists it, it is not a referrer of a subject manifest that exists
# in its repository (a subject is not kept alive by its referrers), and it is older than
# :before.
_MANIFEST_UNUSED = (
    "NOT EXISTS (SELECT 1 FROM tags t WHERE t.repo = m.repo AND t.digest = m.digest)"
    " AND NOT EXISTS (SELECT 1 FROM manifest_references r"
    "   WHERE r.child = m.digest AND r.repo = m.repo AND r.is_manifest = 1)"
    " AND (m.subject IS NULL OR NOT EXISTS (SELECT 1 FROM manifests s"
    "   WHERE s.repo = m.repo AND s.digest = m.subject))"
    " AND m.created < :before"
)
# A link (alias l) is stale when no manifest of its repository references the blob and it was
# not refreshed since :before: the blob leaves that repository (and, with its last link and
# manifest, the repository leaves repository_exists).
_LINK_STALE = (
    "l.linked < :before AND NOT EXISTS (SELECT 1 FROM manifest_references r"
    "   WHERE r.child = l.digest AND r.repo = l.repo)"
)
# Rounds over the manifests while a round still finds garbage (an index or subject deleted in
# one round frees its children or referrers in the next).
_MANIFEST_ROUNDS = 10


@contextlib.contextmanager
def _disk_full_as_oserror() -> Iterator[None]:
    """SQLite's "database or disk is full" as the OSError of a full disk under the blobs:
    callers handle one kind."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        if exc.sqlite_errorcode == sqlite3.SQLITE_FULL:
            raise OSError(errno.ENOSPC, "database or disk is full") from exc
        raise


# The migrations shipped while ``PRAGMA user_version`` alone said what was applied.
_BEFORE_SCHEMA_VERSION: Final = (1, 2, 3, 10)


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
    def __init__(
        self,
        reader: aiosqlite.Connection,
        writer: aiosqlite.Connection,
        watcher: sqlite3.Connection,
        scanner: aiosqlite.Connection | None = None,
    ) -> None:
        self._reader = reader
        self._writer = writer
        # Long lifecycle reads (cache size, eviction candidates) run on a connection (and
        # thread) of their own, so they never queue the request path's reads behind them.
        self._scanner = scanner or reader
        self._write_lock = asyncio.Lock()
        self._watcher = watcher
        self._manifests = ManifestCache(self._data_version)

    @classmethod
    async def open(cls, path: Path) -> SqliteMetadataStore:
        path.parent.mkdir(parents=True, exist_ok=True)
        writer = await aiosqlite.connect(path, isolation_level=None)
        reader = await aiosqlite.connect(path, isolation_level=None)
        scanner = await aiosqlite.connect(path, isolation_level=None)
        for conn in (writer, reader, scanner):
            for pragma in _PRAGMAS:
                await conn.execute(pragma)
        # No busy timeout: a locked database is "changed", never a wait on the event loop.
        watcher = sqlite3.connect(path, isolation_level=None, timeout=0)
        store = cls(reader, writer, watcher, scanner)
        await store._migrate()
        return store

    async def close(self) -> None:
        await self._reader.close()
        await self._writer.close()
        if self._scanner is not self._reader:
            await self._scanner.close()
        self._watcher.close()

    def _data_version(self) -> int | None:
        """Changes whenever any other connection (the writer, another process) commits."""
        try:
            return int(self._watcher.execute("PRAGMA data_version").fetchone()[0])
        except sqlite3.Error:
            return None

    async def _migrate(self) -> None:
        """Apply each migration not applied yet, also one numbered below the highest applied
        (numbers have gaps that branches fill in independently), as on PostgreSQL. Databases
        from before the ``schema_version`` table only kept ``PRAGMA user_version``, the
        highest applied: every migration shipped up to it was applied then."""
        async with self._transaction() as db:
            await db.execute(
                "CREATE TABLE IF NOT EXISTS schema_version ("
                " version INTEGER PRIMARY KEY, applied REAL NOT NULL)"
            )
            applied = {
                row[0] for row in await db.execute_fetchall("SELECT version FROM schema_version")
            }
            if not applied:
                rows = await db.execute_fetchall("PRAGMA user_version")
                before = next(iter(rows))[0]
                applied = {version for version in _BEFORE_SCHEMA_VERSION if version <= before}
                await db.executemany(
                    "INSERT INTO schema_version (version, applied) VALUES (?, ?)",
                    [(version, time.time()) for version in sorted(applied)],
                )
            for version, script in _migrations():
                if version not in applied:
                    for statement in script.split(";"):
                        if statement.strip():
                            await db.execute(statement)
                    await db.execute(
                        "INSERT INTO schema_version (version, applied) VALUES (?, ?)",
                        (version, time.time()),
                    )
                    applied.add(version)
                    # Still the highest applied, for an older regproxy opening this file.
                    await db.execute(f"PRAGMA user_version={max(applied)}")

    @asynccontextmanager
    async def _transaction(self, *, commit: bool = True) -> AsyncIterator[aiosqlite.Connection]:
        async with self._write_lock:
            with _disk_full_as_oserror():
                try:
                    await self._writer.execute("BEGIN IMMEDIATE")
                    yield self._writer
                    await self._writer.execute("COMMIT" if commit else "ROLLBACK")
                except BaseException:
                    # Also when cancelled while BEGIN or COMMIT still runs on the connection's
                    # thread: this ROLLBACK is queued behind it, so no transaction stays open
                    # for the next writer. SQLite may have rolled back already: then it fails.
                    with contextlib.suppress(sqlite3.OperationalError):
                        await self._writer.execute("ROLLBACK")
                    raise

    async def _write(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``fn`` as one write transaction, BEGIN to COMMIT, in a single trip to the
        writer connection's thread.

        The request path's writes are a few statements each: run one await at a time (as
        ``_transaction`` does), each statement is a trip to the thread and back, and the
        write lock is held across every one of those event-loop turns. aiosqlite runs
        queued functions on its thread in order, so a function still running there when
        its caller was cancelled (and the lock released) finishes before the next one
        starts.
        """

        def run(db: sqlite3.Connection) -> _T:
            db.execute("BEGIN IMMEDIATE")
            try:
                result = fn(db)
                db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.OperationalError):  # rolled back already
                    db.execute("ROLLBACK")
                raise
            return result

        async with self._write_lock:
            with _disk_full_as_oserror():
                return await _on_thread(self._writer, run)

    async def _write_rowcount(self, sql: str, params: Sequence[Any]) -> bool:
        """One statement as a write transaction (one trip); whether it changed a row."""
        return await self._write(lambda db: db.execute(sql, params).rowcount > 0)

    async def _one(self, sql: str, params: Sequence[Any]) -> Any:
        rows = list(await self._reader.execute_fetchall(sql, params))
        return rows[0] if rows else None

    async def _all(self, sql: str, params: Sequence[Any] | Mapping[str, Any]) -> list[Any]:
        return list(await self._reader.execute_fetchall(sql, params))

    async def _scan(self, sql: str, params: Mapping[str, Any]) -> list[Any]:
        """A long lifecycle read, on its own connection (see ``__init__``)."""
        return list(await self._scanner.execute_fetchall(sql, params))

    # -- blobs --------------------------------------------------------------------------------

    async def get_blob(self, digest: Digest) -> BlobRow | None:
        row = await self._one(
            "SELECT digest, size, storage_key FROM blobs WHERE digest = ?", (str(digest),)
        )
        return _blob(row) if row else None

    async def get_repo_blob(self, repo: str, digest: Digest) -> BlobRow | None:
        row = await self._one(
            "SELECT b.digest, b.size, b.storage_key, r.linked FROM repository_blobs r"
            " JOIN blobs b ON b.digest = r.digest WHERE r.repo = ? AND r.digest = ?",
            (repo, str(digest)),
        )
        return BlobRow(Digest.parse(row[0]), row[1], row[2], row[3]) if row else None

    async def add_blob(self, repo: str, blob: BlobRow, *, upload_id: str | None = None) -> BlobRow:
        key = str(blob.digest)

        def add(db: sqlite3.Connection) -> BlobRow:
            now = time.time()
            db.execute(
                "INSERT OR IGNORE INTO blobs (digest, size, storage_key, created)"
                " VALUES (?, ?, ?, ?)",
                (key, blob.size, blob.storage_key, now),
            )
            db.execute(
                "INSERT INTO repository_blobs (repo, digest, linked) VALUES (?, ?, ?)"
                " ON CONFLICT (repo, digest) DO UPDATE SET linked = excluded.linked",
                (repo, key, now),
            )
            if upload_id is not None:
                db.execute("DELETE FROM uploads WHERE id = ?", (upload_id,))
            row = db.execute(
                "SELECT digest, size, storage_key FROM blobs WHERE digest = ?", (key,)
            ).fetchone()
            return _blob(row)

        return await self._write(add)

    async def link_blob(self, repo: str, digest: Digest) -> bool:
        def link(db: sqlite3.Connection) -> bool:
            cursor = db.execute(
                "INSERT INTO repository_blobs (repo, digest, linked)"
                " SELECT ?, digest, ? FROM blobs WHERE digest = ?"
                " ON CONFLICT (repo, digest) DO UPDATE SET linked = excluded.linked",
                (repo, time.time(), str(digest)),
            )
            return cursor.rowcount > 0

        return await self._write(link)

    async def touch_link(self, repo: str, digest: Digest, now: float) -> bool:
        return await self._write_rowcount(
            "UPDATE repository_blobs SET linked = max(linked, ?) WHERE repo = ? AND digest = ?",
            (now, repo, str(digest)),
        )

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
        wanted = list(refs)
        return await _on_thread(self._reader, lambda db: _missing(db, repo, wanted))

    # -- manifests and tags -------------------------------------------------------------------

    async def get_manifest(self, repo: str, digest: Digest) -> ManifestRow | None:
        async def read() -> ManifestRow | None:
            row = await self._one(
                f"SELECT {_MANIFEST_COLUMNS} FROM manifests m WHERE m.repo = ? AND m.digest = ?",
                (repo, str(digest)),
            )
            return _manifest(row) if row else None

        return await self._manifests.get((repo, digest), read)

    async def get_tagged_manifest(self, repo: str, tag: str) -> ManifestRow | None:
        async def read() -> ManifestRow | None:
            row = await self._one(
                f"SELECT {_MANIFEST_COLUMNS} FROM tags t JOIN manifests m"
                " ON m.repo = t.repo AND m.digest = t.digest WHERE t.repo = ? AND t.tag = ?",
                (repo, tag),
            )
            return _manifest(row) if row else None

        return await self._manifests.get((repo, "tag", tag), read)

    async def put_manifest(
        self,
        repo: str,
        manifest: ManifestRow,
        refs: Sequence[Reference],
        tags: Sequence[str],
        *,
        check_references: bool = False,
    ) -> list[Reference]:
        now = time.time()
        digest = str(manifest.digest)
        wanted = list(refs)

        def put(db: sqlite3.Connection) -> list[Reference]:
            if check_references:
                # In the write transaction: no GC can delete a blob between this check and
                # the insert of the references that keep it alive.
                missing = _missing(db, repo, wanted)
                if missing:
                    return missing
            db.execute(
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
            db.executemany(
                "INSERT OR IGNORE INTO manifest_references (repo, digest, child, is_manifest)"
                " VALUES (?, ?, ?, ?)",
                [(repo, digest, str(ref.digest), int(ref.is_manifest)) for ref in wanted],
            )
            db.executemany(
                "INSERT INTO tags (repo, tag, digest, updated) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (repo, tag) DO UPDATE SET digest = excluded.digest,"
                " updated = excluded.updated",
                [(repo, tag, digest, now) for tag in tags],
            )
            return []

        return await self._write(put)

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

    # -- garbage collection and checks --------------------------------------------------------

    async def collect_garbage(
        self,
        before: float,
        *,
        untagged: bool,
        skip_prefixes: Sequence[str] = (),
        batch: int = 500,
        dry_run: bool = False,
    ) -> AsyncGenerator[GarbageBatch, None]:
        if dry_run:
            # One transaction, rolled back: what later stages would find includes what the
            # earlier ones "deleted" (a deleted manifest frees its blobs).
            async with self._transaction(commit=False) as db:
                async for found in self._collect(db, before, untagged, skip_prefixes, batch):
                    yield found
            return
        async for found in self._collect(None, before, untagged, skip_prefixes, batch):
            yield found

    async def _collect(
        self,
        db: aiosqlite.Connection | None,
        before: float,
        untagged: bool,
        skip_prefixes: Sequence[str],
        batch: int,
    ) -> AsyncIterator[GarbageBatch]:
        """Each stage pages through candidates, ``batch`` at a time, in key order.

        Outside a dry run, candidates are found on the reader (no lock), then the write
        transaction applies the same rule again to just those rows and deletes what still
        matches: the decision that counts and the deletion are one transaction, and a pass
        that finds nothing never takes the write lock.
        """

        async def stage(
            run: Callable[[aiosqlite.Connection, Any, int, list[Any] | None, bool], Awaitable[Any]],
            after: Any,
        ) -> AsyncIterator[list[Any]]:
            while True:
                if db is not None:  # dry run: one transaction already holds the lock
                    found = await run(db, after, batch, None, True)
                    if not found:
                        return
                    after = found[-1][0]
                    yield [row[1] for row in found]
                    continue
                candidates = await run(self._reader, after, batch, None, False)
                if not candidates:
                    return
                after = candidates[-1][0]
                async with self._transaction() as conn:
                    found = await run(
                        conn, ("", ""), len(candidates), [c[0] for c in candidates], True
                    )
                if found:
                    yield [row[1] for row in found]

        async def manifests(
            conn: aiosqlite.Connection, after: Any, limit: int, only: list[Any] | None, delete: bool
        ) -> list[tuple[Any, GarbageManifest]]:
            return await self._gc_manifests(conn, before, skip_prefixes, after, limit, only, delete)

        async def links(
            conn: aiosqlite.Connection, after: Any, limit: int, only: list[Any] | None, delete: bool
        ) -> list[tuple[Any, tuple[str, str]]]:
            return await self._gc_links(conn, before, after, limit, only, delete)

        async def blobs(
            conn: aiosqlite.Connection, after: Any, limit: int, only: list[Any] | None, delete: bool
        ) -> list[tuple[Any, BlobRow]]:
            return await self._gc_blobs(conn, before, after[1], limit, only, delete)

        for _ in range(_MANIFEST_ROUNDS if untagged else 0):
            found_any = False
            async for found in stage(manifests, ("", "")):
                found_any = True
                yield GarbageBatch(found, 0, [])
            if not found_any:
                break
        async for found in stage(links, ("", "")):
            yield GarbageBatch([], len(found), [])
        async for found in stage(blobs, ("", "")):
            yield GarbageBatch([], 0, found)

    @staticmethod
    async def _gc_manifests(
        db: aiosqlite.Connection,
        before: float,
        skip_prefixes: Sequence[str],
        after: tuple[str, str],
        limit: int,
        only: list[Any] | None,
        delete: bool,
    ) -> list[tuple[tuple[str, str], GarbageManifest]]:
        params: dict[str, Any] = {
            "before": before,
            "repo": after[0],
            "digest": after[1],
            "limit": limit,
            "only": json.dumps(only),
        }
        skip = ""
        for i, prefix in enumerate(skip_prefixes):
            params[f"p{i}"] = prefix
            skip += f" AND substr(m.repo, 1, length(:p{i})) != :p{i}"
        if only is not None:
            skip += (
                " AND (m.repo, m.digest) IN (SELECT value ->> 0, value ->> 1 FROM json_each(:only))"
            )
        rows = await db.execute_fetchall(
            "SELECT m.repo, m.digest, length(m.content) FROM manifests m"
            f" WHERE (m.repo, m.digest) > (:repo, :digest) AND {_MANIFEST_UNUSED}{skip}"
            " ORDER BY m.repo, m.digest LIMIT :limit",
            params,
        )
        found = [
            ((row[0], row[1]), GarbageManifest(row[0], Digest.parse(row[1]), row[2]))
            for row in rows
        ]
        if delete:
            keys = [key for key, _ in found]
            await db.executemany(
                "DELETE FROM manifest_references WHERE repo = ? AND digest = ?", keys
            )
            await db.executemany("DELETE FROM manifests WHERE repo = ? AND digest = ?", keys)
        return found

    @staticmethod
    async def _gc_links(
        db: aiosqlite.Connection,
        before: float,
        after: tuple[str, str],
        limit: int,
        only: list[Any] | None,
        delete: bool,
    ) -> list[tuple[tuple[str, str], tuple[str, str]]]:
        restrict = ""
        if only is not None:
            restrict = (
                " AND (l.repo, l.digest) IN (SELECT value ->> 0, value ->> 1 FROM json_each(:only))"
            )
        rows = await db.execute_fetchall(
            "SELECT l.repo, l.digest FROM repository_blobs l"
            f" WHERE (l.repo, l.digest) > (:repo, :digest) AND {_LINK_STALE}{restrict}"
            " ORDER BY l.repo, l.digest LIMIT :limit",
            {
                "before": before,
                "repo": after[0],
                "digest": after[1],
                "limit": limit,
                "only": json.dumps(only),
            },
        )
        found = [((row[0], row[1]), (row[0], row[1])) for row in rows]
        if delete:
            await db.executemany(
                "DELETE FROM repository_blobs WHERE repo = ? AND digest = ?",
                [key for key, _ in found],
            )
        return found

    @staticmethod
    async def _gc_blobs(
        db: aiosqlite.Connection,
        before: float,
        after: str,
        limit: int,
        only: list[Any] | None,
        delete: bool,
    ) -> list[tuple[tuple[str, str], BlobRow]]:
        restrict = ""
        if only is not None:
            restrict = " AND b.digest IN (SELECT value ->> 1 FROM json_each(:only))"
        rows = await db.execute_fetchall(
            "SELECT b.digest, b.size, b.storage_key FROM blobs b"
            f" WHERE b.digest > :after AND {_BLOB_UNUSED}{restrict} ORDER BY b.digest LIMIT :limit",
            {"before": before, "after": after, "limit": limit, "only": json.dumps(only)},
        )
        found = [(("", row[0]), _blob(row)) for row in rows]
        if delete:
            digests = [(key[1],) for key, _ in found]
            # Its remaining links are all stale (the rule says so): it leaves every repository.
            await db.executemany("DELETE FROM repository_blobs WHERE digest = ?", digests)
            await db.executemany("DELETE FROM blobs WHERE digest = ?", digests)
        return found

    async def list_blobs(self, after: str, limit: int) -> list[BlobRow]:
        rows = await self._all(
            "SELECT digest, size, storage_key FROM blobs WHERE digest > ? ORDER BY digest LIMIT ?",
            (after, limit),
        )
        return [_blob(row) for row in rows]

    async def known_blob_keys(self, keys: Sequence[str]) -> set[str]:
        return await self._known("SELECT storage_key FROM blobs WHERE storage_key IN", keys)

    async def known_upload_ids(self, upload_ids: Sequence[str]) -> set[str]:
        return await self._known("SELECT id FROM uploads WHERE id IN", upload_ids)

    async def _known(self, select: str, values: Sequence[str]) -> set[str]:
        known: set[str] = set()
        for start in range(0, len(values), _REFERENCE_BATCH):
            batch = list(values[start : start + _REFERENCE_BATCH])
            marks = ", ".join("?" for _ in batch)
            known.update(row[0] for row in await self._all(f"{select} ({marks})", batch))
        return known

    async def blob_repositories(self, digest: Digest) -> list[str]:
        rows = await self._all(
            "SELECT repo FROM repository_blobs WHERE digest = ?"
            " UNION SELECT repo FROM manifest_references WHERE child = ? ORDER BY 1",
            (str(digest), str(digest)),
        )
        return [row[0] for row in rows]

    async def forget_cached_blob(self, digest: Digest, prefixes: Sequence[str]) -> BlobRow | None:
        key = str(digest)
        async with self._transaction() as db:
            rows = list(
                await db.execute_fetchall(
                    "SELECT digest, size, storage_key FROM blobs WHERE digest = ?", (key,)
                )
            )
            users = await db.execute_fetchall(
                "SELECT repo FROM repository_blobs WHERE digest = ?"
                " UNION SELECT repo FROM manifest_references WHERE child = ?",
                (key, key),
            )
            if not rows or any(not row[0].startswith(tuple(prefixes)) for row in users):
                return None
            await db.execute("DELETE FROM repository_blobs WHERE digest = ?", (key,))
            await db.execute("DELETE FROM blobs WHERE digest = ?", (key,))
        return _blob(rows[0])

    # -- uploads ------------------------------------------------------------------------------

    async def create_upload(self, upload: UploadRow) -> None:
        await self._write_rowcount(
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
        return await self._write_rowcount(
            'UPDATE uploads SET "offset" = ?, state = ?, updated = ? WHERE id = ? AND updated = ?',
            (offset, state, now, upload_id, expected),
        )

    async def delete_upload(self, upload_id: str, *, expected: float | None = None) -> bool:
        sql = "DELETE FROM uploads WHERE id = ?"
        params: list[Any] = [upload_id]
        if expected is not None:
            sql += " AND updated = ?"
            params.append(expected)
        return await self._write_rowcount(sql, params)

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

    async def cache_totals(self, prefix: str) -> tuple[int, int]:
        low, high = _prefix_bounds(prefix)
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

    async def cached_tags(self, prefix: str) -> list[ImageSummary]:
        low, high = _prefix_bounds(prefix)
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
        ranges = [_prefix_bounds(prefix) for prefix in prefixes]
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

    # -- retention and cache eviction ---------------------------------------------------------

    async def record_pulls(self, pulls: Sequence[tuple[str, Digest, float]]) -> None:
        if not pulls:
            return
        async with self._transaction() as db:
            rows = [{"repo": repo, "digest": str(digest), "at": at} for repo, digest, at in pulls]
            await db.executemany(
                "UPDATE manifests SET last_pulled = :at WHERE repo = :repo AND digest = :digest"
                " AND (last_pulled IS NULL OR last_pulled < :at)",
                rows,
            )
            # A pull of one platform's manifest is a pull of the indexes that list it, so an
            # image's last use is one column (which eviction sorts by).
            await db.executemany(
                "UPDATE manifests SET last_pulled = :at WHERE repo = :repo AND digest IN"
                " (SELECT r.digest FROM manifest_references r WHERE r.repo = :repo"
                "  AND r.child = :digest AND r.is_manifest = 1)"
                " AND (last_pulled IS NULL OR last_pulled < :at)",
                rows,
            )

    async def expendable_tags(
        self, repo: str, keep_last: int, pulled_before: float | None
    ) -> list[TagRow]:
        # A tag is used when it was pushed or its manifest pulled (by tag or by digest).
        rows = await self._all(
            "WITH ranked AS (SELECT t.tag, t.digest, t.updated,"
            "   max(t.updated, coalesce(m.last_pulled, 0)) AS used,"
            "   row_number() OVER (ORDER BY t.updated DESC, t.tag DESC) AS recency"
            "   FROM tags t LEFT JOIN manifests m ON m.repo = t.repo AND m.digest = t.digest"
            "   WHERE t.repo = :repo)"
            " SELECT tag, digest, updated FROM ranked WHERE recency > :keep_last"
            " AND (:pulled_before IS NULL OR used < :pulled_before) ORDER BY updated, tag",
            {"repo": repo, "keep_last": keep_last, "pulled_before": pulled_before},
        )
        return [TagRow(repo, row[0], Digest.parse(row[1]), row[2]) for row in rows]

    async def delete_tags(self, repo: str, tags: Sequence[TagRow]) -> list[TagRow]:
        deleted: list[TagRow] = []
        async with self._transaction() as db:
            for tag in tags:
                cursor = await db.execute(
                    "DELETE FROM tags WHERE repo = ? AND tag = ? AND digest = ? AND updated = ?",
                    (repo, tag.tag, str(tag.digest), tag.pushed),
                )
                if cursor.rowcount > 0:
                    deleted.append(tag)
            await _prune_manifests(db, repo, {str(tag.digest) for tag in deleted})
        return deleted

    async def cache_usage(
        self, prefixes: Sequence[str], *, per_prefix: Sequence[str] = ()
    ) -> CacheUsage:
        if not prefixes:
            return CacheUsage(0, {})
        cached, params = _cached_ranges(prefixes, "o")
        # Blobs linked from a cache repository and from no other one.
        only_cached = (
            "SELECT coalesce(sum(b.size), 0) FROM blobs b WHERE b.digest IN"
            " (SELECT o.digest FROM repository_blobs o WHERE {inside})"
            " AND NOT EXISTS (SELECT 1 FROM repository_blobs o"
            "   WHERE o.digest = b.digest AND NOT ({inside}))"
        )
        rows = await self._scan(only_cached.format(inside=cached), params)
        by_prefix = {}
        for prefix in per_prefix:
            inside, one = _cached_ranges([prefix], "o")
            rows_one = await self._scan(only_cached.format(inside=inside), one)
            by_prefix[prefix] = int(rows_one[0][0])
        return CacheUsage(int(rows[0][0]), by_prefix)

    async def cached_images(self, prefix: str, used_before: float, limit: int) -> list[CachedImage]:
        rows = await self._scan(
            f"WITH roots AS (SELECT m.repo, m.digest, {_IMAGE_USED} AS used FROM manifests m"
            "   WHERE m.repo >= :lo AND m.repo < :hi AND NOT EXISTS (SELECT 1"
            "   FROM manifest_references p"
            "   WHERE p.repo = m.repo AND p.child = m.digest AND p.is_manifest = 1)),"
            " chosen AS (SELECT repo, digest, used FROM roots WHERE used < :before"
            "   ORDER BY used, repo, digest LIMIT :limit)"
            f" SELECT c.repo, c.digest, c.used, {_IMAGE_SIZE} FROM chosen c"
            " ORDER BY c.used, c.repo, c.digest",
            {**_prefix_range(prefix), "before": used_before, "limit": limit},
        )
        return [CachedImage(row[0], Digest.parse(row[1]), row[2], int(row[3])) for row in rows]

    async def evict_image(self, image: CachedImage) -> list[Digest] | None:
        key = {"repo": image.repo, "digest": str(image.digest), "used": image.last_used}
        async with self._transaction() as db:
            # Still an image (no index took it in), and not pulled since it was chosen.
            rows = list(
                await db.execute_fetchall(
                    f"SELECT 1 FROM manifests m WHERE m.repo = :repo AND m.digest = :digest"
                    f" AND {_IMAGE_USED} <= :used AND NOT EXISTS (SELECT 1"
                    " FROM manifest_references p WHERE p.repo = m.repo AND p.child = m.digest"
                    " AND p.is_manifest = 1)",
                    key,
                )
            )
            if not rows:
                return None
            await db.execute("DELETE FROM tags WHERE repo = :repo AND digest = :digest", key)
            blobs = await _prune_manifests(db, image.repo, {str(image.digest)})
        return [Digest.parse(digest) for digest in sorted(blobs)]

    async def collect_cached_blobs(
        self,
        prefixes: Sequence[str],
        before: float,
        exclude: Collection[Digest],
        limit: int,
        *,
        dry_run: bool = False,
        candidates: Collection[Digest] | None = None,
    ) -> list[BlobRow]:
        if not prefixes or (candidates is not None and not candidates):
            return []
        cached, params = _cached_ranges(prefixes, "l")
        params.update(before=before, limit=limit)
        excluded = {f"x{i}": str(digest) for i, digest in enumerate(exclude)}
        params.update(excluded)
        skip = f" AND b.digest NOT IN ({', '.join(':' + n for n in excluded)})" if excluded else ""
        if candidates is not None:
            wanted = {f"w{i}": str(digest) for i, digest in enumerate(candidates)}
            params.update(wanted)
            skip += f" AND b.digest IN ({', '.join(':' + n for n in wanted)})"
        # Linked from a cache repository, unused by GC's own rule, and linked from no other
        # repository (cheapest test first: most cached blobs are still referenced).
        sql = (
            "SELECT b.digest, b.size, b.storage_key FROM blobs b"
            f" WHERE b.digest IN (SELECT l.digest FROM repository_blobs l WHERE {cached})"
            f" AND {_BLOB_UNUSED}{skip} AND NOT EXISTS (SELECT 1 FROM repository_blobs l"
            f"   WHERE l.digest = b.digest AND NOT ({cached})){{only}} LIMIT :limit"
        )
        # Find them without the write lock (a scan over the cache); then decide again, for
        # those only, inside the transaction that deletes them.
        found = [_blob(row) for row in await self._scan(sql.format(only=""), params)]
        if dry_run or not found:
            return found
        listed = {f"c{i}": str(row.digest) for i, row in enumerate(found)}
        only = f" AND b.digest IN ({', '.join(':' + name for name in listed)})"
        async with self._transaction() as db:
            rows = [
                _blob(row)
                for row in await db.execute_fetchall(sql.format(only=only), {**params, **listed})
            ]
            gone = [(str(row.digest),) for row in rows]
            await db.executemany("DELETE FROM repository_blobs WHERE digest = ?", gone)
            await db.executemany("DELETE FROM blobs WHERE digest = ?", gone)
        return rows


# When a cached image (alias m) was last used: pulled (record_pulls also counts a pull of a
# manifest an index lists for the index), or stored if not pulled since.
_IMAGE_USED = "coalesce(m.last_pulled, m.created)"
# The bytes of the blobs an image (alias c) and the manifests it lists reference.
_IMAGE_SIZE = (
    "(SELECT coalesce(sum(b.size), 0) FROM blobs b WHERE b.digest IN ("
    " SELECT r.child FROM manifest_references r"
    " WHERE r.repo = c.repo AND r.digest = c.digest AND r.is_manifest = 0"
    " UNION SELECT r2.child FROM manifest_references r1 CROSS JOIN manifest_references r2"
    " WHERE r1.repo = c.repo AND r1.digest = c.digest AND r1.is_manifest = 1"
    " AND r2.repo = r1.repo AND r2.digest = r1.child AND r2.is_manifest = 0))"
)


def _cached_ranges(prefixes: Sequence[str], alias: str) -> tuple[str, dict[str, Any]]:
    """SQL true when ``<alias>.repo`` is under one of ``<prefix>/``, with its parameters."""
    params: dict[str, Any] = {}
    ranges = []
    for i, prefix in enumerate(prefixes):
        bounds = _prefix_range(prefix)
        params[f"lo{i}"], params[f"hi{i}"] = bounds["lo"], bounds["hi"]
        ranges.append(f"({alias}.repo >= :lo{i} AND {alias}.repo < :hi{i})")
    return " OR ".join(ranges), params


def _prefix_range(prefix: str) -> dict[str, str]:
    """Bounds of the repository names under ``<prefix>/``: ``lo <= repo < hi``."""
    return {"lo": prefix + "/", "hi": prefix + chr(ord("/") + 1)}


def _missing(db: sqlite3.Connection, repo: str, refs: list[Reference]) -> list[Reference]:
    """Which of ``refs`` ``repo`` does not hold (on a connection's own thread)."""
    absent: set[tuple[str, bool]] = set()
    # A few queries for all of them: a manifest with 50 layers costs one query, not 50;
    # batches keep each query under SQLite's limit on bound parameters.
    for start in range(0, len(refs), _REFERENCE_BATCH):
        batch = refs[start : start + _REFERENCE_BATCH]
        params: list[Any] = []
        for ref in batch:
            params += [str(ref.digest), int(ref.is_manifest)]
        values = ", ".join("(?, ?)" for _ in batch)
        rows = db.execute(
            f"WITH wanted(digest, is_manifest) AS (VALUES {values})"
            " SELECT w.digest, w.is_manifest FROM wanted w WHERE NOT ("
            " (w.is_manifest = 1 AND EXISTS (SELECT 1 FROM manifests m"
            "   WHERE m.repo = ? AND m.digest = w.digest))"
            " OR (w.is_manifest = 0 AND EXISTS (SELECT 1 FROM repository_blobs b"
            "   WHERE b.repo = ? AND b.digest = w.digest)))",
            [*params, repo, repo],
        ).fetchall()
        absent.update((row[0], bool(row[1])) for row in rows)
    return [ref for ref in refs if (str(ref.digest), ref.is_manifest) in absent]


async def _on_thread(conn: aiosqlite.Connection, fn: Callable[[sqlite3.Connection], _T]) -> _T:
    """``fn`` with ``conn``'s sqlite3 connection, on ``conn``'s thread: one trip there and back.

    aiosqlite queues such functions with the statements it runs, in order; it has no public
    name for that or for the sqlite3 connection (``_execute`` and ``_conn`` since 0.17).
    """
    result: _T = await conn._execute(lambda: fn(conn._conn))  # type: ignore[no-untyped-call]
    return result


async def _prune_manifests(db: aiosqlite.Connection, repo: str, digests: set[str]) -> set[str]:
    """Delete the manifests of ``digests`` that no tag and no index of repo points at any
    more, then the same for the manifests they listed and their untagged referrers.

    Returns the blobs the deleted manifests referenced (which may now be unused)."""
    pending = list(digests)
    blobs: set[str] = set()
    while pending:
        digest = pending.pop()
        key = {"repo": repo, "digest": digest}
        unused = list(
            await db.execute_fetchall(
                "SELECT 1 FROM manifests m WHERE m.repo = :repo AND m.digest = :digest"
                " AND NOT EXISTS (SELECT 1 FROM tags t WHERE t.repo = m.repo"
                "   AND t.digest = m.digest)"
                " AND NOT EXISTS (SELECT 1 FROM manifest_references r WHERE r.repo = m.repo"
                "   AND r.child = m.digest AND r.is_manifest = 1)",
                key,
            )
        )
        if not unused:
            continue
        pending += [
            row[0]
            for row in await db.execute_fetchall(
                "SELECT child FROM manifest_references WHERE repo = :repo AND digest = :digest"
                " AND is_manifest = 1 UNION SELECT digest FROM manifests"
                " WHERE repo = :repo AND subject = :digest",
                key,
            )
        ]
        blobs.update(
            row[0]
            for row in await db.execute_fetchall(
                "SELECT child FROM manifest_references WHERE repo = :repo AND digest = :digest"
                " AND is_manifest = 0",
                key,
            )
        )
        await db.execute(
            "DELETE FROM manifest_references WHERE repo = :repo AND digest = :digest", key
        )
        await db.execute("DELETE FROM manifests WHERE repo = :repo AND digest = :digest", key)
    return blobs


def _prefix_bounds(prefix: str) -> tuple[str, str]:
    """Repository names under ``prefix/`` (all of them for ""), as a key range."""
    if not prefix:
        return "", "\U0010ffff"
    return f"{prefix}/", f"{prefix}0"  # "0" sorts right after "/"
