"""The metadata store on PostgreSQL through an asyncpg connection pool.

Same tables, rules and guarantees as ``sqlite.py``, method for method. SQLite runs one writer
at a time, so its transactions are serializable; here every write transaction runs at
``SERIALIZABLE`` and is retried when PostgreSQL aborts it for a conflict, so SQL written for
SQLite's semantics (check, then write, in one transaction) keeps them. Reads are single
statements outside a transaction: each sees one committed snapshot.

Several processes and replicas share the database. Migrations (``migrations/postgres/``) are
applied once, under an advisory lock. A database that cannot be reached, or goes away, makes
every call raise ``Unavailable`` (503) within the configured timeouts; the pool reconnects by
itself when it is back.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import random
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Iterable,
    Sequence,
)
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any, TypeVar

import asyncpg

from regproxy import oci
from regproxy.errors import Unavailable
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
from regproxy.oci import Digest

log = logging.getLogger(__name__)

T = TypeVar("T")
# asyncpg ships no type information: a pooled connection.
Connection = Any

# pg_advisory_xact_lock key that serializes migrations ("regproxy" in ASCII).
_MIGRATION_LOCK = 0x72656770726F7879
# A write transaction aborted by a serialization conflict or deadlock is run again, this
# often at most, after a short random pause that doubles each time.
_WRITE_ATTEMPTS = 12
_FIRST_BACKOFF = 0.002
_MANIFEST_COLUMNS = "m.digest, m.media_type, m.content, m.subject, m.artifact_type"
_UPLOAD_COLUMNS = 'id, repo, algorithm, "offset", state, started, updated'
_LEASE_COLUMNS = "key, owner, host, url, spool, size, started, expires"
# What a lost or unreachable database looks like: connection refused or reset, a timeout,
# a server shutting down or starting up, too many connections, a connection asyncpg closed
# or left in a broken state (the server ended the session while it was idle).
_OUTAGE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
)

# -- the garbage rules: sqlite.py's, in PostgreSQL's dialect --------------------------------
# A blob (alias b) is unused when no manifest of any repository references it, no repository
# linked it since $1 (pushed, mounted, or confirmed by a HEAD/GET), and its row is older than
# $1. Every query that uses a rule binds ``before`` as $1.
_BLOB_UNUSED = (
    "NOT EXISTS (SELECT 1 FROM manifest_references r WHERE r.child = b.digest)"
    " AND NOT EXISTS (SELECT 1 FROM repository_blobs l"
    "   WHERE l.digest = b.digest AND l.linked >= $1)"
    " AND b.created < $1"
)
# A manifest (alias m) is garbage, when untagged manifests are collected, if no tag names it,
# no index of its repository lists it, it is not a referrer of a subject manifest that exists
# in its repository, and it is older than $1.
_MANIFEST_UNUSED = (
    "NOT EXISTS (SELECT 1 FROM tags t WHERE t.repo = m.repo AND t.digest = m.digest)"
    " AND NOT EXISTS (SELECT 1 FROM manifest_references r"
    "   WHERE r.child = m.digest AND r.repo = m.repo AND r.is_manifest)"
    " AND (m.subject IS NULL OR NOT EXISTS (SELECT 1 FROM manifests s"
    "   WHERE s.repo = m.repo AND s.digest = m.subject))"
    " AND m.created < $1"
)
# A link (alias l) is stale when no manifest of its repository references the blob and it was
# not refreshed since $1.
_LINK_STALE = (
    "l.linked < $1 AND NOT EXISTS (SELECT 1 FROM manifest_references r"
    "   WHERE r.child = l.digest AND r.repo = l.repo)"
)
# Rounds over the manifests while a round still finds garbage (as in sqlite.py).
_MANIFEST_ROUNDS = 10
# When a cached image (alias m) was last used, and the bytes of the blobs an image (alias c)
# and the manifests it lists reference (as in sqlite.py).
_IMAGE_USED = "coalesce(m.last_pulled, m.created)"
_IMAGE_SIZE = (
    "(SELECT coalesce(sum(b.size), 0) FROM blobs b WHERE b.digest IN ("
    " SELECT r.child FROM manifest_references r"
    " WHERE r.repo = c.repo AND r.digest = c.digest AND NOT r.is_manifest"
    " UNION SELECT r2.child FROM manifest_references r1 CROSS JOIN manifest_references r2"
    " WHERE r1.repo = c.repo AND r1.digest = c.digest AND r1.is_manifest"
    " AND r2.repo = r1.repo AND r2.digest = r1.child AND NOT r2.is_manifest))"
)


async def _keep_session(db: Connection) -> None:
    """Pool reset hook: nothing to undo. regproxy changes no session state (no SET, LISTEN,
    cursor or session-level advisory lock), and asyncpg still rolls back a transaction left
    open, so a released connection skips the default reset query: one round trip less per
    request."""


def _migrations() -> list[tuple[int, str]]:
    folder = resources.files("regproxy.meta") / "migrations" / "postgres"
    found = []
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            found.append((int(entry.name.split("_", 1)[0]), entry.read_text()))
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


def _blob(row: Any) -> BlobRow:
    return BlobRow(Digest.parse(row[0]), row[1], row[2])


def _lease(row: Any) -> LeaseRow:
    key, owner, host, url, spool, size, started, expires = row
    return LeaseRow(key, owner, host, url, spool, size, float(started), float(expires))


def _upload(row: Any) -> UploadRow:
    return UploadRow(*row)


def _count(status: str) -> int:
    """The row count of a command status such as ``DELETE 1`` or ``INSERT 0 3``."""
    return int(status.rsplit(" ", 1)[-1])


def describe_error(exc: BaseException) -> str:
    """One line saying why the database could not be used."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if isinstance(exc, asyncpg.PostgresError) else text


async def _missing_references(db: Connection, repo: str, refs: list[Reference]) -> list[Reference]:
    """The references the repository lacks, in one query (also usable inside a transaction)."""
    if not refs:
        return []
    rows = await db.fetch(
        "SELECT w.digest, w.is_manifest"
        " FROM unnest($1::text[], $2::boolean[]) AS w(digest, is_manifest) WHERE NOT ("
        " (w.is_manifest AND EXISTS (SELECT 1 FROM manifests m"
        "   WHERE m.repo = $3 AND m.digest = w.digest))"
        " OR (NOT w.is_manifest AND EXISTS (SELECT 1 FROM repository_blobs b"
        "   WHERE b.repo = $3 AND b.digest = w.digest)))",
        [str(ref.digest) for ref in refs],
        [ref.is_manifest for ref in refs],
        repo,
    )
    absent = {(row[0], row[1]) for row in rows}
    return [ref for ref in refs if (str(ref.digest), ref.is_manifest) in absent]


class PostgresMetadataStore:
    def __init__(self, pool: Any, timeout: float) -> None:
        self._pool = pool
        self._timeout = timeout

    @classmethod
    async def open(
        cls,
        dsn: str,
        *,
        pool_size: int = 10,
        prepared_statements: bool = True,
        connect_timeout: float = 5.0,
        command_timeout: float = 15.0,
    ) -> PostgresMetadataStore:
        """Connect and migrate; ``Unavailable`` (with the reason) if the database cannot be used.

        Without ``prepared_statements`` no statement is kept prepared on a connection, which
        PgBouncer in transaction mode requires (it hands each transaction any server connection).
        """
        try:
            pool = await asyncpg.create_pool(
                dsn,
                min_size=1,
                max_size=pool_size,
                timeout=connect_timeout,
                command_timeout=command_timeout,
                statement_cache_size=100 if prepared_statements else 0,
                reset=_keep_session,
            )
        except (*_OUTAGE, asyncpg.PostgresError, ValueError) as exc:
            raise Unavailable(describe_error(exc)) from exc
        store = cls(pool, connect_timeout + command_timeout)
        try:
            await store._migrate()
        except BaseException:
            await pool.close()
            raise
        return store

    async def close(self) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                await self._pool.close()
        except TimeoutError:  # a connection that does not answer must not hold up shutdown
            self._pool.terminate()

    async def _migrate(self) -> None:
        async with self._connection() as db, db.transaction():
            # Replicas starting together queue here; each applies what is still missing.
            await db.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
            await db.execute(
                "CREATE TABLE IF NOT EXISTS schema_version ("
                " version INTEGER PRIMARY KEY, applied DOUBLE PRECISION NOT NULL)"
            )
            applied = {row[0] for row in await db.fetch("SELECT version FROM schema_version")}
            for version, script in _migrations():
                # Each one not applied yet, also below the highest applied (numbers have gaps
                # that branches fill in independently).
                if version not in applied:
                    await db.execute(script)  # no arguments: several statements at once
                    await db.execute(
                        "INSERT INTO schema_version (version, applied) VALUES ($1, $2)",
                        version,
                        time.time(),
                    )

    # -- connections and transactions ---------------------------------------------------------

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[Connection]:
        """A pooled connection; a database outage becomes ``Unavailable``."""
        try:
            async with self._pool.acquire(timeout=self._timeout) as db:
                try:
                    yield db
                except asyncpg.exceptions.DiskFullError:
                    raise  # the server is fine and so is the connection
                except _OUTAGE:
                    db.terminate()  # never reused: the pool opens a new connection instead
                    raise
        except asyncpg.exceptions.DiskFullError as exc:
            # The same error as a full disk under the blobs (as sqlite.py's SQLITE_FULL):
            # callers handle one kind.
            raise OSError(errno.ENOSPC, "the metadata database's disk is full") from exc
        except _OUTAGE as exc:
            log.warning("metadata store unavailable: %s", describe_error(exc))
            raise Unavailable("the metadata store is unavailable") from exc

    async def _transaction(self, work: Callable[[Connection], Awaitable[T]]) -> T:
        """Run ``work(db)`` in a serializable transaction, again if a conflict aborts it.

        ``work`` may run more than once, so it only talks to the database.
        """
        delay = _FIRST_BACKOFF
        for attempt in range(1, _WRITE_ATTEMPTS + 1):
            try:
                async with self._connection() as db, db.transaction(isolation="serializable"):
                    return await work(db)
            except asyncpg.exceptions.TransactionRollbackError:
                if attempt == _WRITE_ATTEMPTS:
                    log.warning("metadata write conflicted %d times; giving up", attempt)
                    raise Unavailable("the metadata store is busy; try again") from None
                await asyncio.sleep(random.uniform(0, delay))
                delay *= 2
        raise AssertionError("unreachable")

    async def _one(self, sql: str, *params: Any) -> Any:
        async with self._connection() as db:
            return await db.fetchrow(sql, *params)

    async def _all(self, sql: str, *params: Any) -> list[Any]:
        async with self._connection() as db:
            return list(await db.fetch(sql, *params))

    # -- blobs --------------------------------------------------------------------------------

    async def get_blob(self, digest: Digest) -> BlobRow | None:
        row = await self._one(
            "SELECT digest, size, storage_key FROM blobs WHERE digest = $1", str(digest)
        )
        return _blob(row) if row else None

    async def get_repo_blob(self, repo: str, digest: Digest) -> BlobRow | None:
        row = await self._one(
            "SELECT b.digest, b.size, b.storage_key, r.linked FROM repository_blobs r"
            " JOIN blobs b ON b.digest = r.digest WHERE r.repo = $1 AND r.digest = $2",
            repo,
            str(digest),
        )
        return BlobRow(Digest.parse(row[0]), row[1], row[2], row[3]) if row else None

    async def blob_repositories(self, digest: Digest) -> list[str]:
        rows = await self._all(
            "SELECT repo FROM repository_blobs WHERE digest = $1"
            " UNION SELECT repo FROM manifest_references WHERE child = $1 ORDER BY 1",
            str(digest),
        )
        return [row[0] for row in rows]

    async def add_blob(self, repo: str, blob: BlobRow, *, upload_id: str | None = None) -> BlobRow:
        now = time.time()

        async def work(db: Connection) -> Any:
            await db.execute(
                "INSERT INTO blobs (digest, size, storage_key, created)"
                " VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                str(blob.digest),
                blob.size,
                blob.storage_key,
                now,
            )
            await db.execute(
                "INSERT INTO repository_blobs (repo, digest, linked) VALUES ($1, $2, $3)"
                " ON CONFLICT (repo, digest) DO UPDATE SET linked = excluded.linked",
                repo,
                str(blob.digest),
                now,
            )
            if upload_id is not None:
                await db.execute("DELETE FROM uploads WHERE id = $1", upload_id)
            return await db.fetchrow(
                "SELECT digest, size, storage_key FROM blobs WHERE digest = $1", str(blob.digest)
            )

        return _blob(await self._transaction(work))

    async def link_blob(self, repo: str, digest: Digest) -> bool:
        now = time.time()

        # The blob's row is read in the same serializable transaction as the link is written:
        # a GC pass deleting the row at the same time conflicts, and one of the two is retried.
        async def work(db: Connection) -> int:
            return _count(
                await db.execute(
                    "INSERT INTO repository_blobs (repo, digest, linked)"
                    " SELECT $1, digest, $3 FROM blobs WHERE digest = $2"
                    " ON CONFLICT (repo, digest) DO UPDATE SET linked = excluded.linked",
                    repo,
                    str(digest),
                    now,
                )
            )

        return await self._transaction(work) > 0

    async def touch_link(self, repo: str, digest: Digest, now: float) -> bool:
        async def work(db: Connection) -> int:
            return _count(
                await db.execute(
                    "UPDATE repository_blobs SET linked = GREATEST(linked, $1)"
                    " WHERE repo = $2 AND digest = $3",
                    now,
                    repo,
                    str(digest),
                )
            )

        return await self._transaction(work) > 0

    async def unlink_blob(self, repo: str, digest: Digest) -> bool:
        async def work(db: Connection) -> int:
            return _count(
                await db.execute(
                    "DELETE FROM repository_blobs WHERE repo = $1 AND digest = $2",
                    repo,
                    str(digest),
                )
            )

        return await self._transaction(work) > 0

    async def delete_blob_if_unused(self, digest: Digest) -> BlobRow | None:
        async def work(db: Connection) -> Any:
            return await db.fetchrow(
                "DELETE FROM blobs WHERE digest = $1"
                " AND NOT EXISTS (SELECT 1 FROM repository_blobs WHERE digest = $1)"
                " AND NOT EXISTS (SELECT 1 FROM manifest_references WHERE child = $1)"
                " RETURNING digest, size, storage_key",
                str(digest),
            )

        row = await self._transaction(work)
        return _blob(row) if row else None

    async def missing_references(self, repo: str, refs: Iterable[Reference]) -> list[Reference]:
        async with self._connection() as db:
            return await _missing_references(db, repo, list(refs))

    # -- manifests and tags -------------------------------------------------------------------

    async def get_manifest(self, repo: str, digest: Digest) -> ManifestRow | None:
        row = await self._one(
            f"SELECT {_MANIFEST_COLUMNS} FROM manifests m WHERE m.repo = $1 AND m.digest = $2",
            repo,
            str(digest),
        )
        return _manifest(row) if row else None

    async def get_tagged_manifest(self, repo: str, tag: str) -> ManifestRow | None:
        row = await self._one(
            f"SELECT {_MANIFEST_COLUMNS} FROM tags t JOIN manifests m"
            " ON m.repo = t.repo AND m.digest = t.digest WHERE t.repo = $1 AND t.tag = $2",
            repo,
            tag,
        )
        return _manifest(row) if row else None

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
        # One row per tag, in one order for every writer (no deadlock between two pushes).
        tag_list = sorted(set(tags))
        ref_list = list(refs)

        async def work(db: Connection) -> list[Reference]:
            if check_references:
                # In the write transaction: a GC pass that deletes a blob this check found
                # conflicts with the insert of the references that keep it alive.
                missing = await _missing_references(db, repo, ref_list)
                if missing:
                    return missing
            await db.execute(
                "INSERT INTO manifests"
                " (repo, digest, media_type, content, subject, artifact_type, created)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
                repo,
                digest,
                manifest.media_type,
                manifest.content,
                str(manifest.subject) if manifest.subject else None,
                manifest.artifact_type,
                now,
            )
            if refs:
                await db.execute(
                    "INSERT INTO manifest_references (repo, digest, child, is_manifest)"
                    " SELECT $1, $2, r.child, r.is_manifest"
                    " FROM unnest($3::text[], $4::boolean[]) AS r(child, is_manifest)"
                    " ON CONFLICT DO NOTHING",
                    repo,
                    digest,
                    [str(ref.digest) for ref in refs],
                    [ref.is_manifest for ref in refs],
                )
            if tag_list:
                await db.execute(
                    "INSERT INTO tags (repo, tag, digest, updated)"
                    " SELECT $1, t.tag, $2, $3 FROM unnest($4::text[]) AS t(tag)"
                    " ON CONFLICT (repo, tag) DO UPDATE SET digest = excluded.digest,"
                    " updated = excluded.updated",
                    repo,
                    digest,
                    now,
                    tag_list,
                )
            return []

        return await self._transaction(work)

    async def delete_manifest(self, repo: str, digest: Digest) -> bool:
        key = str(digest)

        async def work(db: Connection) -> bool:
            status = await db.execute(
                "DELETE FROM manifests WHERE repo = $1 AND digest = $2", repo, key
            )
            if _count(status) == 0:
                return False
            await db.execute(
                "DELETE FROM manifest_references WHERE repo = $1 AND digest = $2", repo, key
            )
            await db.execute("DELETE FROM tags WHERE repo = $1 AND digest = $2", repo, key)
            return True

        return await self._transaction(work)

    async def delete_tag(self, repo: str, tag: str) -> bool:
        async def work(db: Connection) -> int:
            return _count(
                await db.execute("DELETE FROM tags WHERE repo = $1 AND tag = $2", repo, tag)
            )

        return await self._transaction(work) > 0

    async def tag_checked(self, repo: str, tag: str) -> float | None:
        row = await self._one("SELECT updated FROM tags WHERE repo = $1 AND tag = $2", repo, tag)
        return float(row[0]) if row else None

    async def list_tags(self, repo: str, last: str, limit: int) -> list[str]:
        rows = await self._all(
            "SELECT tag FROM tags WHERE repo = $1 AND tag > $2 ORDER BY tag LIMIT $3",
            repo,
            last,
            limit,
        )
        return [row[0] for row in rows]

    async def repository_exists(self, repo: str) -> bool:
        row = await self._one(
            "SELECT EXISTS (SELECT 1 FROM manifests WHERE repo = $1)"
            " OR EXISTS (SELECT 1 FROM repository_blobs WHERE repo = $1)",
            repo,
        )
        return bool(row[0])

    async def list_repositories(self, last: str, limit: int) -> list[str]:
        rows = await self._all(
            "SELECT DISTINCT repo FROM manifests WHERE repo > $1 ORDER BY repo LIMIT $2",
            last,
            limit,
        )
        return [row[0] for row in rows]

    async def referrers(
        self, repo: str, subject: Digest, artifact_type: str | None
    ) -> list[ManifestRow]:
        sql = f"SELECT {_MANIFEST_COLUMNS} FROM manifests m WHERE m.repo = $1 AND m.subject = $2"
        params: list[Any] = [repo, str(subject)]
        if artifact_type is not None:
            sql += " AND m.artifact_type = $3"
            params.append(artifact_type)
        rows = await self._all(sql + " ORDER BY m.digest", *params)
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
            # earlier ones "deleted" (a deleted manifest frees its blobs). Its row locks keep
            # writers of those rows waiting until the pass ends, as SQLite's write lock does.
            async with self._connection() as db:
                transaction = db.transaction()
                await transaction.start()
                try:
                    async for found in self._collect(db, before, untagged, skip_prefixes, batch):
                        yield found
                finally:
                    await transaction.rollback()
            return
        async for found in self._collect(None, before, untagged, skip_prefixes, batch):
            yield found

    async def _collect(
        self,
        db: Connection | None,
        before: float,
        untagged: bool,
        skip_prefixes: Sequence[str],
        batch: int,
    ) -> AsyncIterator[GarbageBatch]:
        """Each stage pages through candidates, ``batch`` at a time, in key order.

        Outside a dry run, candidates are found by a plain read, then a serializable write
        transaction applies the same rule again to just those rows and deletes what still
        matches: the decision that counts and the deletion are one transaction, which
        conflicts with (and so sees, or is retried after) a concurrent push or mount.
        """
        Run = Callable[[Connection, Any, int, list[Any] | None, bool], Awaitable[list[Any]]]

        async def stage(run: Run) -> AsyncIterator[list[Any]]:
            after: Any = ("", "")
            while True:
                if db is not None:  # dry run: one transaction for the whole pass
                    found = await run(db, after, batch, None, True)
                    if not found:
                        return
                    after = found[-1][0]
                    yield [row[1] for row in found]
                    continue
                async with self._connection() as conn:
                    candidates = await run(conn, after, batch, None, False)
                if not candidates:
                    return
                after = candidates[-1][0]
                keys = [c[0] for c in candidates]

                async def work(conn: Connection, keys: list[Any] = keys) -> list[Any]:
                    return await run(conn, ("", ""), len(keys), keys, True)

                found = await self._transaction(work)
                if found:
                    yield [row[1] for row in found]

        async def manifests(
            conn: Connection, after: Any, limit: int, only: list[Any] | None, delete: bool
        ) -> list[Any]:
            return await _gc_manifests(conn, before, skip_prefixes, after, limit, only, delete)

        async def links(
            conn: Connection, after: Any, limit: int, only: list[Any] | None, delete: bool
        ) -> list[Any]:
            return await _gc_links(conn, before, after, limit, only, delete)

        async def blobs(
            conn: Connection, after: Any, limit: int, only: list[Any] | None, delete: bool
        ) -> list[Any]:
            return await _gc_blobs(conn, before, after[1], limit, only, delete)

        for _ in range(_MANIFEST_ROUNDS if untagged else 0):
            found_any = False
            async for found in stage(manifests):
                found_any = True
                yield GarbageBatch(found, 0, [])
            if not found_any:
                break
        async for found in stage(links):
            yield GarbageBatch([], len(found), [])
        async for found in stage(blobs):
            yield GarbageBatch([], 0, found)

    async def list_blobs(self, after: str, limit: int) -> list[BlobRow]:
        rows = await self._all(
            "SELECT digest, size, storage_key FROM blobs WHERE digest > $1"
            " ORDER BY digest LIMIT $2",
            after,
            limit,
        )
        return [_blob(row) for row in rows]

    async def known_blob_keys(self, keys: Sequence[str]) -> set[str]:
        if not keys:
            return set()
        rows = await self._all(
            "SELECT storage_key FROM blobs WHERE storage_key = ANY($1::text[])", list(keys)
        )
        return {row[0] for row in rows}

    async def known_upload_ids(self, upload_ids: Sequence[str]) -> set[str]:
        if not upload_ids:
            return set()
        rows = await self._all(
            "SELECT id FROM uploads WHERE id = ANY($1::text[])", list(upload_ids)
        )
        return {row[0] for row in rows}

    async def forget_cached_blob(self, digest: Digest, prefixes: Sequence[str]) -> BlobRow | None:
        key = str(digest)
        under = tuple(prefixes)

        async def work(db: Connection) -> Any:
            row = await db.fetchrow(
                "SELECT digest, size, storage_key FROM blobs WHERE digest = $1", key
            )
            users = await db.fetch(
                "SELECT repo FROM repository_blobs WHERE digest = $1"
                " UNION SELECT repo FROM manifest_references WHERE child = $1",
                key,
            )
            if row is None or any(not user[0].startswith(under) for user in users):
                return None
            await db.execute("DELETE FROM repository_blobs WHERE digest = $1", key)
            await db.execute("DELETE FROM blobs WHERE digest = $1", key)
            return row

        row = await self._transaction(work)
        return _blob(row) if row else None

    # -- uploads ------------------------------------------------------------------------------

    async def create_upload(self, upload: UploadRow) -> None:
        async def work(db: Connection) -> None:
            await db.execute(
                f"INSERT INTO uploads ({_UPLOAD_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                upload.id,
                upload.repo,
                upload.algorithm,
                upload.offset,
                upload.state,
                upload.started,
                upload.updated,
            )

        await self._transaction(work)

    async def get_upload(self, upload_id: str) -> UploadRow | None:
        row = await self._one(f"SELECT {_UPLOAD_COLUMNS} FROM uploads WHERE id = $1", upload_id)
        return _upload(row) if row else None

    async def update_upload(
        self, upload_id: str, offset: int, state: str, now: float, *, expected: float
    ) -> bool:
        # float8 parameters travel in binary: ``updated = $5`` compares the exact double.
        async def work(db: Connection) -> int:
            return _count(
                await db.execute(
                    'UPDATE uploads SET "offset" = $1, state = $2, updated = $3'
                    " WHERE id = $4 AND updated = $5",
                    offset,
                    state,
                    now,
                    upload_id,
                    expected,
                )
            )

        return await self._transaction(work) > 0

    async def delete_upload(self, upload_id: str, *, expected: float | None = None) -> bool:
        sql = "DELETE FROM uploads WHERE id = $1"
        params: list[Any] = [upload_id]
        if expected is not None:
            sql += " AND updated = $2"
            params.append(expected)

        async def work(db: Connection) -> int:
            return _count(await db.execute(sql, *params))

        return await self._transaction(work) > 0

    async def stale_uploads(self, before: float) -> list[UploadRow]:
        rows = await self._all(f"SELECT {_UPLOAD_COLUMNS} FROM uploads WHERE updated < $1", before)
        return [_upload(row) for row in rows]

    # -- leases -------------------------------------------------------------------------------

    async def acquire_lease(self, lease: LeaseRow, now: float) -> LeaseRow:
        async def work(db: Connection) -> Any:
            # Inserted, or taken over when expired; else the row in place is returned.
            taken = await db.fetchrow(
                f"INSERT INTO leases ({_LEASE_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
                " ON CONFLICT (key) DO UPDATE SET owner = EXCLUDED.owner, host = EXCLUDED.host,"
                " url = EXCLUDED.url, spool = EXCLUDED.spool, size = EXCLUDED.size,"
                " started = EXCLUDED.started, expires = EXCLUDED.expires"
                f" WHERE leases.expires < $9 RETURNING {_LEASE_COLUMNS}",
                lease.key,
                lease.owner,
                lease.host,
                lease.url,
                lease.spool,
                lease.size,
                lease.started,
                lease.expires,
                now,
            )
            if taken is not None:
                return taken
            return await db.fetchrow(
                f"SELECT {_LEASE_COLUMNS} FROM leases WHERE key = $1", lease.key
            )

        return _lease(await self._transaction(work))

    async def renew_lease(
        self, key: str, owner: str, expires: float, *, spool: str = "", size: int | None = None
    ) -> bool:
        async def work(db: Connection) -> int:
            return _count(
                await db.execute(
                    "UPDATE leases SET expires = $1,"
                    " spool = CASE WHEN $2 = '' THEN spool ELSE $2 END,"
                    " size = coalesce($3, size) WHERE key = $4 AND owner = $5",
                    expires,
                    spool,
                    size,
                    key,
                    owner,
                )
            )

        return await self._transaction(work) > 0

    async def get_lease(self, key: str) -> LeaseRow | None:
        row = await self._one(f"SELECT {_LEASE_COLUMNS} FROM leases WHERE key = $1", key)
        return _lease(row) if row else None

    async def release_lease(self, key: str, owner: str) -> bool:
        async def work(db: Connection) -> int:
            return _count(
                await db.execute("DELETE FROM leases WHERE key = $1 AND owner = $2", key, owner)
            )

        return await self._transaction(work) > 0

    # -- failed logins ------------------------------------------------------------------------

    async def add_login_failure(self, key: str, now: float, window: float) -> int:
        async def work(db: Connection) -> int:
            await db.execute("DELETE FROM login_failures WHERE started <= $1", now - window)
            return int(
                await db.fetchval(
                    "INSERT INTO login_failures (key, started, failures) VALUES ($1, $2, 1)"
                    " ON CONFLICT (key) DO UPDATE SET failures = login_failures.failures + 1"
                    " RETURNING failures",
                    key,
                    now,
                )
            )

        return await self._transaction(work)

    async def login_failures(
        self, keys: Sequence[str], now: float, window: float
    ) -> dict[str, tuple[float, int]]:
        rows = await self._all(
            "SELECT key, started, failures FROM login_failures"
            " WHERE key = ANY($1::text[]) AND started > $2",
            list(keys),
            now - window,
        )
        return {row[0]: (float(row[1]), int(row[2])) for row in rows}

    async def clear_login_failures(self, key: str) -> None:
        async def work(db: Connection) -> None:
            await db.execute("DELETE FROM login_failures WHERE key = $1", key)

        await self._transaction(work)

    # -- operations: metrics, readiness, `regproxy cache ls` ----------------------------------

    async def ping(self) -> None:
        await self._one("SELECT 1")

    async def cache_totals(self, prefix: str) -> tuple[int, int]:
        low, high = _prefix_range(prefix)
        row = await self._one(
            "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM blobs WHERE digest IN"
            " (SELECT digest FROM repository_blobs WHERE repo >= $1 AND repo < $2)",
            low,
            high,
        )
        manifests = await self._one(
            "SELECT COALESCE(SUM(octet_length(content)), 0) FROM manifests"
            " WHERE repo >= $1 AND repo < $2",
            low,
            high,
        )
        return int(row[0]), int(row[1]) + int(manifests[0])

    async def count_uploads(self) -> int:
        row = await self._one("SELECT COUNT(*) FROM uploads")
        return int(row[0])

    async def cached_tags(self, prefix: str) -> list[ImageSummary]:
        low, high = _prefix_range(prefix)
        rows = await self._all(
            "WITH RECURSIVE reach(root_repo, root_tag, repo, digest) AS ("
            "  SELECT repo, tag, repo, digest FROM tags WHERE repo >= $1 AND repo < $2"
            "  UNION"
            "  SELECT reach.root_repo, reach.root_tag, r.repo, r.child FROM reach"
            "  JOIN manifest_references r ON r.repo = reach.repo AND r.digest = reach.digest"
            "  AND r.is_manifest"
            ")"
            " SELECT t.repo, t.tag, t.digest, m.media_type, t.updated,"
            "  (SELECT COALESCE(SUM(octet_length(mm.content)), 0) FROM manifests mm"
            "   WHERE EXISTS (SELECT 1 FROM reach x WHERE x.root_repo = t.repo"
            "    AND x.root_tag = t.tag AND x.repo = mm.repo AND x.digest = mm.digest))"
            "  + (SELECT COALESCE(SUM(b.size), 0) FROM blobs b WHERE b.digest IN"
            "   (SELECT r.child FROM reach x JOIN manifest_references r"
            "    ON r.repo = x.repo AND r.digest = x.digest AND NOT r.is_manifest"
            "    WHERE x.root_repo = t.repo AND x.root_tag = t.tag))"
            " FROM tags t JOIN manifests m ON m.repo = t.repo AND m.digest = t.digest"
            " WHERE t.repo >= $1 AND t.repo < $2 ORDER BY t.repo, t.tag",
            low,
            high,
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
        bounds = [bound for prefix in prefixes for bound in _prefix_range(prefix)]
        under = (
            " OR ".join(
                f"(m.repo >= ${i + 3} AND m.repo < ${i + 4})" for i in range(0, len(bounds), 2)
            )
            or "FALSE"
        )
        where = f"({under})" if cached else f"NOT ({under})"
        rows = await self._all(
            "SELECT m.repo, (SELECT COUNT(*) FROM tags t WHERE t.repo = m.repo),"
            " COUNT(*), MAX(m.created) FROM manifests m"
            f" WHERE m.repo > $1 AND {where} GROUP BY m.repo ORDER BY m.repo LIMIT $2",
            last,
            limit,
            *bounds,
        )
        return [
            RepositorySummary(name, int(tags), int(n), float(updated))
            for name, tags, n, updated in rows
        ]

    async def list_tag_summaries(self, repo: str, last: str, limit: int) -> list[TagSummary]:
        # As in sqlite.py: each tagged manifest of the page and everything under it, once.
        rows = await self._all(
            "WITH RECURSIVE page(tag, digest, updated) AS ("
            "  SELECT tag, digest, updated FROM tags WHERE repo = $1 AND tag > $2"
            "  ORDER BY tag LIMIT $3"
            "), reach(root, node, is_manifest) AS ("
            "  SELECT DISTINCT digest, digest, TRUE FROM page"
            "  UNION"
            "  SELECT reach.root, r.child, r.is_manifest FROM reach JOIN manifest_references r"
            "  ON r.repo = $1 AND r.digest = reach.node AND reach.is_manifest"
            "), sizes(root, bytes, missing) AS ("
            "  SELECT x.root, SUM(COALESCE(octet_length(m.content), b.size, 0)),"
            "   SUM(CASE WHEN m.digest IS NULL AND b.digest IS NULL THEN 1 ELSE 0 END)"
            "  FROM reach x LEFT JOIN manifests m ON m.repo = $1 AND m.digest = x.node"
            "  LEFT JOIN blobs b ON m.digest IS NULL AND b.digest = x.node GROUP BY x.root"
            ")"
            " SELECT p.tag, p.digest, p.updated, m.media_type, COALESCE(s.bytes, 0),"
            "  COALESCE(s.missing, 0), CASE WHEN m.media_type = ANY($4::text[])"
            "  THEN m.content END"
            " FROM page p LEFT JOIN manifests m ON m.repo = $1 AND m.digest = p.digest"
            " LEFT JOIN sizes s ON s.root = p.digest ORDER BY p.tag",
            repo,
            last,
            limit,
            sorted(oci.INDEX_TYPES),
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
        row = await self._one("SELECT COUNT(*) FROM tags WHERE repo = $1", repo)
        return int(row[0])

    async def tags_of_manifest(self, repo: str, digest: Digest, limit: int) -> list[str]:
        rows = await self._all(
            "SELECT tag FROM tags WHERE repo = $1 AND digest = $2 ORDER BY tag LIMIT $3",
            repo,
            str(digest),
            limit,
        )
        return [row[0] for row in rows]

    # -- retention and cache eviction ---------------------------------------------------------

    async def record_pulls(self, pulls: Sequence[tuple[str, Digest, float]]) -> None:
        if not pulls:
            return
        # In one order for every writer: two flushes never wait on each other's rows.
        rows = sorted((repo, str(digest), at) for repo, digest, at in pulls)

        async def work(db: Connection) -> None:
            await db.executemany(
                "UPDATE manifests SET last_pulled = $3 WHERE repo = $1 AND digest = $2"
                " AND (last_pulled IS NULL OR last_pulled < $3)",
                rows,
            )
            # A pull of one platform's manifest is a pull of the indexes that list it.
            await db.executemany(
                "UPDATE manifests SET last_pulled = $3 WHERE repo = $1 AND digest IN"
                " (SELECT r.digest FROM manifest_references r WHERE r.repo = $1"
                "  AND r.child = $2 AND r.is_manifest)"
                " AND (last_pulled IS NULL OR last_pulled < $3)",
                rows,
            )

        await self._transaction(work)

    async def expendable_tags(
        self, repo: str, keep_last: int, pulled_before: float | None
    ) -> list[TagRow]:
        # A tag is used when it was pushed or its manifest pulled (by tag or by digest).
        rows = await self._all(
            "WITH ranked AS (SELECT t.tag, t.digest, t.updated,"
            "   GREATEST(t.updated, coalesce(m.last_pulled, 0)) AS used,"
            "   row_number() OVER (ORDER BY t.updated DESC, t.tag DESC) AS recency"
            "   FROM tags t LEFT JOIN manifests m ON m.repo = t.repo AND m.digest = t.digest"
            "   WHERE t.repo = $1)"
            " SELECT tag, digest, updated FROM ranked WHERE recency > $2"
            " AND ($3::float8 IS NULL OR used < $3::float8) ORDER BY updated, tag",
            repo,
            keep_last,
            pulled_before,
        )
        return [TagRow(repo, row[0], Digest.parse(row[1]), row[2]) for row in rows]

    async def delete_tags(self, repo: str, tags: Sequence[TagRow]) -> list[TagRow]:
        wanted = list(tags)
        if not wanted:
            return []

        async def work(db: Connection) -> set[tuple[str, str]]:
            # Compare-and-set on the push time: a tag pushed again since it was listed stays.
            rows = await db.fetch(
                "DELETE FROM tags t USING unnest($2::text[], $3::text[], $4::float8[])"
                " AS d(tag, digest, pushed) WHERE t.repo = $1 AND t.tag = d.tag"
                " AND t.digest = d.digest AND t.updated = d.pushed RETURNING t.tag, t.digest",
                repo,
                [tag.tag for tag in wanted],
                [str(tag.digest) for tag in wanted],
                [tag.pushed for tag in wanted],
            )
            gone = {(row[0], row[1]) for row in rows}
            await _prune_manifests(db, repo, {digest for _, digest in gone})
            return gone

        gone = await self._transaction(work)
        return [tag for tag in wanted if (tag.tag, str(tag.digest)) in gone]

    async def cache_usage(
        self, prefixes: Sequence[str], *, per_prefix: Sequence[str] = ()
    ) -> CacheUsage:
        if not prefixes:
            return CacheUsage(0, {})
        # Blobs linked from a cache repository and from no other one.
        only_cached = (
            "SELECT coalesce(sum(b.size), 0) FROM blobs b WHERE b.digest IN"
            " (SELECT o.digest FROM repository_blobs o WHERE {inside})"
            " AND NOT EXISTS (SELECT 1 FROM repository_blobs o"
            "   WHERE o.digest = b.digest AND NOT ({inside}))"
        )
        inside, params = _cached_ranges(prefixes, "o", 1)
        total = await self._one(only_cached.format(inside=inside), *params)
        by_prefix = {}
        for prefix in per_prefix:
            inside, params = _cached_ranges([prefix], "o", 1)
            row = await self._one(only_cached.format(inside=inside), *params)
            by_prefix[prefix] = int(row[0])
        return CacheUsage(int(total[0]), by_prefix)

    async def cached_images(self, prefix: str, used_before: float, limit: int) -> list[CachedImage]:
        low, high = _under(prefix)
        rows = await self._all(
            f"WITH roots AS (SELECT m.repo, m.digest, {_IMAGE_USED} AS used FROM manifests m"
            "   WHERE m.repo >= $1 AND m.repo < $2 AND NOT EXISTS (SELECT 1"
            "   FROM manifest_references p"
            "   WHERE p.repo = m.repo AND p.child = m.digest AND p.is_manifest)),"
            " chosen AS (SELECT repo, digest, used FROM roots WHERE used < $3"
            "   ORDER BY used, repo, digest LIMIT $4)"
            f" SELECT c.repo, c.digest, c.used, {_IMAGE_SIZE} FROM chosen c"
            " ORDER BY c.used, c.repo, c.digest",
            low,
            high,
            used_before,
            limit,
        )
        return [CachedImage(row[0], Digest.parse(row[1]), row[2], int(row[3])) for row in rows]

    async def evict_image(self, image: CachedImage) -> list[Digest] | None:
        digest = str(image.digest)

        async def work(db: Connection) -> set[str] | None:
            # Still an image (no index took it in), and not pulled since it was chosen.
            still = await db.fetchval(
                f"SELECT 1 FROM manifests m WHERE m.repo = $1 AND m.digest = $2"
                f" AND {_IMAGE_USED} <= $3 AND NOT EXISTS (SELECT 1"
                " FROM manifest_references p WHERE p.repo = m.repo AND p.child = m.digest"
                " AND p.is_manifest)",
                image.repo,
                digest,
                image.last_used,
            )
            if still is None:
                return None
            await db.execute("DELETE FROM tags WHERE repo = $1 AND digest = $2", image.repo, digest)
            return await _prune_manifests(db, image.repo, {digest})

        blobs = await self._transaction(work)
        return None if blobs is None else [Digest.parse(d) for d in sorted(blobs)]

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
        # $1 before (the rule's), $2 limit, $3 excluded digests, $4 the candidates or the
        # rows found (when given), then the ranges.
        cached, ranges = _cached_ranges(prefixes, "l", 5)
        skip = " AND NOT (b.digest = ANY($3::text[]))"
        sql = (
            "SELECT b.digest, b.size, b.storage_key FROM blobs b"
            f" WHERE b.digest IN (SELECT l.digest FROM repository_blobs l WHERE {cached})"
            f" AND {_BLOB_UNUSED}{skip} AND NOT EXISTS (SELECT 1 FROM repository_blobs l"
            f"   WHERE l.digest = b.digest AND NOT ({cached})){{only}} LIMIT $2"
        )
        only = " AND b.digest = ANY($4::text[])"
        excluded = [str(digest) for digest in exclude]
        if candidates is None:
            found_sql, found_params = sql.format(only=" AND $4::text[] IS NULL"), None
        else:
            found_sql, found_params = sql.format(only=only), [str(d) for d in candidates]
        # Find them with a plain read; then decide again, for those only, inside the
        # transaction that deletes them.
        rows = await self._all(found_sql, before, limit, excluded, found_params, *ranges)
        found = [_blob(row) for row in rows]
        if dry_run or not found:
            return found
        listed = [str(row.digest) for row in found]

        async def work(db: Connection) -> list[Any]:
            rows = await db.fetch(sql.format(only=only), before, limit, excluded, listed, *ranges)
            gone = [row[0] for row in rows]
            await db.execute("DELETE FROM repository_blobs WHERE digest = ANY($1::text[])", gone)
            await db.execute("DELETE FROM blobs WHERE digest = ANY($1::text[])", gone)
            return list(rows)

        return [_blob(row) for row in await self._transaction(work)]


def _prefix_range(prefix: str) -> tuple[str, str]:
    """Repository names under ``prefix/`` (all of them for ""), as a key range (C collation)."""
    if not prefix:
        return "", "\U0010ffff"
    return f"{prefix}/", f"{prefix}0"  # "0" sorts right after "/"


def _under(prefix: str) -> tuple[str, str]:
    """Bounds of the repository names under ``<prefix>/``: ``low <= repo < high``."""
    return prefix + "/", prefix + chr(ord("/") + 1)


def _cached_ranges(prefixes: Sequence[str], alias: str, first: int) -> tuple[str, list[str]]:
    """SQL true when ``<alias>.repo`` is under one of ``<prefix>/``, with its parameters,
    numbered from ``$first``."""
    params: list[str] = []
    ranges = []
    for prefix in prefixes:
        n = first + len(params)
        params += _under(prefix)
        ranges.append(f"({alias}.repo >= ${n} AND {alias}.repo < ${n + 1})")
    return " OR ".join(ranges), params


def _pairs(keys: list[Any] | None) -> tuple[list[str] | None, list[str] | None]:
    """(repo, digest) keys as two arrays (for ``unnest``)."""
    if keys is None:
        return None, None
    return [key[0] for key in keys], [key[1] for key in keys]


async def _gc_manifests(
    db: Connection,
    before: float,
    skip_prefixes: Sequence[str],
    after: tuple[str, str],
    limit: int,
    only: list[Any] | None,
    delete: bool,
) -> list[tuple[tuple[str, str], GarbageManifest]]:
    restrict = ""
    if skip_prefixes:
        restrict += (
            " AND NOT EXISTS (SELECT 1 FROM unnest($5::text[]) AS p(prefix)"
            "   WHERE left(m.repo, length(p.prefix)) = p.prefix)"
        )
    else:
        restrict += " AND $5::text[] IS NULL"
    if only is not None:
        restrict += " AND (m.repo, m.digest) IN (SELECT * FROM unnest($6::text[], $7::text[]))"
    else:
        restrict += " AND $6::text[] IS NULL AND $7::text[] IS NULL"
    repos, digests = _pairs(only)
    rows = await db.fetch(
        "SELECT m.repo, m.digest, octet_length(m.content) FROM manifests m"
        f" WHERE (m.repo, m.digest) > ($2, $3) AND {_MANIFEST_UNUSED}{restrict}"
        " ORDER BY m.repo, m.digest LIMIT $4",
        before,
        after[0],
        after[1],
        limit,
        list(skip_prefixes) or None,
        repos,
        digests,
    )
    found = [
        ((row[0], row[1]), GarbageManifest(row[0], Digest.parse(row[1]), row[2])) for row in rows
    ]
    if delete and found:
        repos, digests = _pairs([key for key, _ in found])
        for table in ("manifest_references", "manifests"):
            await db.execute(
                f"DELETE FROM {table} WHERE (repo, digest) IN"
                " (SELECT * FROM unnest($1::text[], $2::text[]))",
                repos,
                digests,
            )
    return found


async def _gc_links(
    db: Connection,
    before: float,
    after: tuple[str, str],
    limit: int,
    only: list[Any] | None,
    delete: bool,
) -> list[tuple[tuple[str, str], tuple[str, str]]]:
    if only is not None:
        restrict = " AND (l.repo, l.digest) IN (SELECT * FROM unnest($5::text[], $6::text[]))"
    else:
        restrict = " AND $5::text[] IS NULL AND $6::text[] IS NULL"
    repos, digests = _pairs(only)
    rows = await db.fetch(
        "SELECT l.repo, l.digest FROM repository_blobs l"
        f" WHERE (l.repo, l.digest) > ($2, $3) AND {_LINK_STALE}{restrict}"
        " ORDER BY l.repo, l.digest LIMIT $4",
        before,
        after[0],
        after[1],
        limit,
        repos,
        digests,
    )
    found = [((row[0], row[1]), (row[0], row[1])) for row in rows]
    if delete and found:
        repos, digests = _pairs([key for key, _ in found])
        await db.execute(
            "DELETE FROM repository_blobs WHERE (repo, digest) IN"
            " (SELECT * FROM unnest($1::text[], $2::text[]))",
            repos,
            digests,
        )
    return found


async def _gc_blobs(
    db: Connection,
    before: float,
    after: str,
    limit: int,
    only: list[Any] | None,
    delete: bool,
) -> list[tuple[tuple[str, str], BlobRow]]:
    if only is not None:
        restrict = " AND b.digest = ANY($4::text[])"
    else:
        restrict = " AND $4::text[] IS NULL"
    rows = await db.fetch(
        "SELECT b.digest, b.size, b.storage_key FROM blobs b"
        f" WHERE b.digest > $2 AND {_BLOB_UNUSED}{restrict} ORDER BY b.digest LIMIT $3",
        before,
        after,
        limit,
        None if only is None else [key[1] for key in only],
    )
    found = [(("", row[0]), _blob(row)) for row in rows]
    if delete and found:
        digests = [key[1] for key, _ in found]
        # Its remaining links are all stale (the rule says so): it leaves every repository.
        await db.execute("DELETE FROM repository_blobs WHERE digest = ANY($1::text[])", digests)
        await db.execute("DELETE FROM blobs WHERE digest = ANY($1::text[])", digests)
    return found


async def _prune_manifests(db: Connection, repo: str, digests: set[str]) -> set[str]:
    """Delete the manifests of ``digests`` that no tag and no index of repo points at any
    more, then the same for the manifests they listed and their untagged referrers (as in
    sqlite.py). Returns the blobs the deleted manifests referenced (which may now be unused)."""
    pending = sorted(digests)
    blobs: set[str] = set()
    while pending:
        digest = pending.pop()
        unused = await db.fetchval(
            "SELECT 1 FROM manifests m WHERE m.repo = $1 AND m.digest = $2"
            " AND NOT EXISTS (SELECT 1 FROM tags t WHERE t.repo = m.repo"
            "   AND t.digest = m.digest)"
            " AND NOT EXISTS (SELECT 1 FROM manifest_references r WHERE r.repo = m.repo"
            "   AND r.child = m.digest AND r.is_manifest)",
            repo,
            digest,
        )
        if unused is None:
            continue
        pending += [
            row[0]
            for row in await db.fetch(
                "SELECT child FROM manifest_references WHERE repo = $1 AND digest = $2"
                " AND is_manifest UNION SELECT digest FROM manifests"
                " WHERE repo = $1 AND subject = $2",
                repo,
                digest,
            )
        ]
        blobs.update(
            row[0]
            for row in await db.fetch(
                "SELECT child FROM manifest_references WHERE repo = $1 AND digest = $2"
                " AND NOT is_manifest",
                repo,
                digest,
            )
        )
        await db.execute(
            "DELETE FROM manifest_references WHERE repo = $1 AND digest = $2", repo, digest
        )
        await db.execute("DELETE FROM manifests WHERE repo = $1 AND digest = $2", repo, digest)
    return blobs
