"""Fixtures shared by the handler tests: a configuration, an app and clients against it.

While a test runs, any blocking call that regproxy makes on the event loop fails it
(blockbuster, as in aiohttp's own tests). Start-up is exempt: it runs before any request.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from blockbuster import BlockBuster, blockbuster_ctx

from regproxy.app import create_app
from regproxy.config import Config
from regproxy.registry.hosted import HostedRegistry
from regproxy.tasks import HOSTED
from tests.helpers import Client, app_of, make_config

MakeClient = Callable[[Config], Awaitable[Client]]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """End-to-end tests first (otherwise in collection order): they include every long test,
    so with pytest-xdist (``--dist worksteal``) they start early and the short unit tests
    even out the workers at the end, instead of one long test running alone."""
    items.sort(key=lambda item: item.get_closest_marker("e2e") is None)


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return make_config(tmp_path)


@pytest.fixture
def blockbuster() -> Iterator[BlockBuster]:
    with blockbuster_ctx("regproxy") as bb:
        # The manifest cache's change check reads SQLite's shared-memory WAL index.
        for name, function in bb.functions.items():
            if name.startswith("sqlite3."):
                function.can_block_in("regproxy/meta/sqlite.py", "_data_version")
        yield bb


@pytest.fixture
def make_client(aiohttp_client: Any, blockbuster: BlockBuster) -> MakeClient:
    """Start an app for a configuration and return a test client; closed at teardown."""

    async def start(config: Config) -> Client:
        blockbuster.deactivate()
        try:
            client: Client = await aiohttp_client(create_app(config))
        finally:
            blockbuster.activate()
        return client

    return start


@pytest.fixture
async def client(make_client: MakeClient, config: Config) -> Client:
    return await make_client(config)


@pytest.fixture
def app(client: Client) -> web.Application:
    return app_of(client)


@pytest.fixture
def hosted(app: web.Application) -> HostedRegistry:
    return app[HOSTED]
