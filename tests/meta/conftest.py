"""The MetadataStore under test, once per backend: every test in tests/meta that takes
``open_store`` (or ``store``) runs on SQLite and on PostgreSQL.

``open_store()`` opens another store on the same database, as a second process or replica
would; all of them are closed (and the PostgreSQL database dropped) after the test.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from regproxy.meta.base import MetadataStore
from regproxy.meta.postgres import PostgresMetadataStore
from regproxy.meta.sqlite import SqliteMetadataStore
from tests.pgfixtures import PostgresServer, own_postgres, postgres_server  # noqa: F401

OpenStore = Callable[[], Awaitable[MetadataStore]]
BACKENDS = ["sqlite", "postgres"]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def open_store(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[OpenStore]:
    opened: list[MetadataStore] = []
    server: PostgresServer | None = None
    dsn = ""
    if backend == "postgres":
        server = request.getfixturevalue("postgres_server")
        dsn = await server.create_database()

    async def open_one() -> MetadataStore:
        store: MetadataStore
        if backend == "postgres":
            store = await PostgresMetadataStore.open(dsn, pool_size=4)
        else:
            store = await SqliteMetadataStore.open(tmp_path / "metadata.sqlite")
        opened.append(store)
        return store

    yield open_one
    for store in opened:
        await store.close()
    if server is not None and server.running:
        await server.drop_database(dsn)


@pytest.fixture
async def store(open_store: OpenStore) -> MetadataStore:
    return await open_store()
