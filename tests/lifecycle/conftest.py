"""Fixtures of the lifecycle tests: the scripted upstream of the pull-through tests, S3
buckets on moto, and configurations on each metadata backend (``lifecycle_config``)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from regproxy.config import Config
from tests.helpers import make_config
from tests.pgfixtures import PostgresServer, postgres_server
from tests.proxy.conftest import upstream
from tests.s3fixtures import s3, shared_moto

__all__ = ["postgres_server", "s3", "shared_moto", "upstream"]

LifecycleConfig = Callable[..., Awaitable[Config]]


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def lifecycle_config(
    backend: str, request: pytest.FixtureRequest
) -> AsyncIterator[LifecycleConfig]:
    """``await lifecycle_config(tmp_path, **overrides)``: make_config's configuration, on
    SQLite or (a new database each call) PostgreSQL. A module that uses it marks itself
    ``pytest.mark.usefixtures("lifecycle_config")``: set up before the test's apps, its
    databases are dropped after the apps closed."""
    server: PostgresServer | None = None
    if backend == "postgres":
        server = request.getfixturevalue("postgres_server")
    databases: list[str] = []

    async def make(tmp_path: Path, **overrides: Any) -> Config:
        values: dict[str, Any] = {}
        if server is not None:
            databases.append(await server.create_database())
            # A password (the test server trusts any) and no TLS: asyncpg then reads neither
            # ~/.pgpass nor ~/.postgresql/ (blocking file reads on the event loop, which
            # blockbuster fails the test for) whenever the pool opens a connection.
            dsn = databases[-1].replace("postgres@", "postgres:unused@", 1) + "?sslmode=disable"
            values.update(metadata__backend="postgres", metadata__dsn=dsn)
        values.update(overrides)
        return make_config(tmp_path, **values)

    yield make
    for dsn in databases:
        if server is not None and server.running:
            await server.drop_database(dsn)
