"""What only the PostgreSQL backend has: migrations under an advisory lock, prepared
statements off (PgBouncer), and a database that is unreachable or goes away and comes back."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest

from regproxy.errors import Unavailable
from regproxy.meta import postgres
from regproxy.meta.base import BlobRow
from regproxy.meta.postgres import PostgresMetadataStore, _migrations
from regproxy.meta.postgres import _migrations as postgres_migrations
from regproxy.oci import Digest
from tests.e2e.procs import free_port
from tests.pgfixtures import PostgresServer

ROW = BlobRow(Digest.of(b"x"), 1, "blobs/x")


async def test_replicas_starting_together_migrate_once(postgres_server: PostgresServer) -> None:
    dsn = await postgres_server.create_database()
    try:
        stores = await asyncio.gather(*(PostgresMetadataStore.open(dsn) for _ in range(6)))
        try:
            await stores[0].add_blob("app", ROW)
            assert await stores[5].get_blob(ROW.digest) == ROW
        finally:
            for store in stores:
                await store.close()
        again = await PostgresMetadataStore.open(dsn)  # nothing left to apply
        await again.close()
        conn = await asyncpg.connect(dsn)
        try:
            versions = await conn.fetch("SELECT version FROM schema_version ORDER BY version")
        finally:
            await conn.close()
        # Each shipped migration once, numbering gaps (0001, 0010) and all.
        shipped = [version for version, _ in postgres_migrations()]
        assert 10 in shipped
        assert [row[0] for row in versions] == shipped
    finally:
        await postgres_server.drop_database(dsn)


async def test_upgrade_from_the_first_schema_keeps_links_for_a_grace(
    postgres_server: PostgresServer,
) -> None:
    """A database of version 1 (before GC): its links get the migration's time, so GC
    gives them one full grace; manifests get no pull time."""
    dsn = await postgres_server.create_database()
    try:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(dict(_migrations())[1])
            await conn.execute(
                "CREATE TABLE schema_version (version INTEGER PRIMARY KEY,"
                " applied DOUBLE PRECISION NOT NULL); INSERT INTO schema_version VALUES (1, 0)"
            )
            await conn.execute(
                "INSERT INTO blobs VALUES ($1, 1, 'blobs/x', 0); INSERT INTO repository_blobs"
                " VALUES ('app', $1)".replace("$1", f"'{ROW.digest}'")
            )
        finally:
            await conn.close()
        started = time.time()
        store = await PostgresMetadataStore.open(dsn)
        try:
            row = await store.get_repo_blob("app", ROW.digest)
            assert row == ROW
            assert row.linked is not None and row.linked >= started - 1
            batches = [b async for b in store.collect_garbage(started - 60, untagged=True)]
            assert batches == []  # linked within the grace
        finally:
            await store.close()
    finally:
        await postgres_server.drop_database(dsn)


async def test_migration_numbers_may_have_gaps(
    postgres_server: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A migration numbered past a gap (999 after the shipped ones) is applied once, last."""
    dsn = await postgres_server.create_database()
    real = _migrations()
    monkeypatch.setattr(
        postgres, "_migrations", lambda: [*real, (999, "CREATE TABLE gap_test (x INTEGER)")]
    )
    try:
        for _ in range(2):
            store = await PostgresMetadataStore.open(dsn)
            await store.close()
        conn = await asyncpg.connect(dsn)
        try:
            versions = await conn.fetch("SELECT version FROM schema_version ORDER BY version")
            assert await conn.fetchval("SELECT count(*) FROM gap_test") == 0
        finally:
            await conn.close()
        assert [row[0] for row in versions] == [*(version for version, _ in real), 999]
    finally:
        await postgres_server.drop_database(dsn)


@pytest.mark.parametrize("prepared", [True, False])
async def test_prepared_statements_setting(postgres_server: PostgresServer, prepared: bool) -> None:
    dsn = await postgres_server.create_database()
    try:
        store = await PostgresMetadataStore.open(dsn, prepared_statements=prepared, pool_size=1)
        try:
            await store.add_blob("app", ROW)
            assert await store.get_repo_blob("app", ROW.digest) == ROW
            async with store._connection() as db:  # the pool's one connection
                named = await db.fetchval("SELECT count(*) FROM pg_prepared_statements")
        finally:
            await store.close()
        # Off: only unnamed statements, nothing a PgBouncer in transaction mode could hand to
        # a client on another server connection.
        assert (named > 0) is prepared
    finally:
        await postgres_server.drop_database(dsn)


async def test_unreachable_database_is_unavailable() -> None:
    dsn = f"postgresql://regproxy@127.0.0.1:{free_port()}/regproxy"
    with pytest.raises(Unavailable) as caught:
        await PostgresMetadataStore.open(dsn, connect_timeout=2)
    assert "\n" not in caught.value.message


async def test_unknown_database_is_unavailable(postgres_server: PostgresServer) -> None:
    with pytest.raises(Unavailable) as caught:
        await PostgresMetadataStore.open(postgres_server.dsn("no_such_database"))
    assert "no_such_database" in caught.value.message


async def test_outage_then_recovery(own_postgres: PostgresServer) -> None:
    """The database stops while the store is open: calls fail fast with Unavailable, and
    work again, on the same store, once it is back."""
    dsn = await own_postgres.create_database()
    store = await PostgresMetadataStore.open(dsn, pool_size=3, connect_timeout=2, command_timeout=2)
    try:
        await store.add_blob("app", ROW)
        own_postgres.stop()
        for _ in range(3):
            started = time.monotonic()
            with pytest.raises(Unavailable):
                await store.get_blob(ROW.digest)
            with pytest.raises(Unavailable):
                await store.add_blob("app", ROW)
            assert time.monotonic() - started < 20  # bounded by the timeouts, no hang
        own_postgres.start()
        assert await store.get_blob(ROW.digest) == ROW
        assert await store.add_blob("other", ROW) == ROW
    finally:
        await store.close()
