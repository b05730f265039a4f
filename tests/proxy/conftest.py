"""Fixtures for the pull-through tests: a fake upstream and regproxy apps pointing at it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

import pytest
import yarl
from aiohttp.test_utils import TestServer

from regproxy.api.keys import CONFIG
from regproxy.meta.base import MetadataStore
from regproxy.oci import Digest
from regproxy.tasks import HOSTED
from tests.conftest import MakeClient
from tests.helpers import Client, app_of, files_under, make_config
from tests.proxy.fakeupstream import FakeUpstream

ServerFactory = Callable[..., Awaitable[TestServer]]


class MakeProxy(Protocol):
    def __call__(
        self, *, name: str = ..., default_upstream: str = ..., **settings: Any
    ) -> Awaitable[Client]: ...


@pytest.fixture
async def upstream(aiohttp_server: ServerFactory) -> FakeUpstream:
    """The fake upstream, running on 127.0.0.1 (``upstream.base_url``)."""
    fake = FakeUpstream()
    server = await aiohttp_server(fake.app())
    fake.base_url = server.make_url("")
    fake.server = server
    return fake


@pytest.fixture
async def cdn(aiohttp_server: ServerFactory, upstream: FakeUpstream) -> yarl.URL:
    """The base URL of a second server (another origin) serving the fake's blobs, like
    Docker Hub's CDN."""
    server = await aiohttp_server(upstream.cdn_app())
    return server.make_url("/cdn")


@pytest.fixture
def make_proxy(make_client: MakeClient, upstream: FakeUpstream, tmp_path: Path) -> MakeProxy:
    """A regproxy app with the fake configured as upstream ``name`` (extra upstream settings
    as keyword arguments, e.g. ``tag_ttl=0``)."""

    async def start(*, name: str = "fake", default_upstream: str = "", **settings: Any) -> Client:
        assert upstream.base_url is not None
        config = make_config(
            tmp_path,
            upstreams={name: {"url": str(upstream.base_url), **settings}},
            default_upstream=default_upstream,
        )
        return await make_client(config)

    return start


@pytest.fixture
async def proxy(make_proxy: MakeProxy) -> Client:
    """regproxy with the fake as upstream ``fake``, default settings."""
    return await make_proxy()


def meta_of(client: Client) -> MetadataStore:
    return app_of(client)[HOSTED].meta


async def cached_blob(client: Client, digest: str) -> bool:
    """Whether the blob has a row and its bytes are in storage."""
    row = await meta_of(client).get_blob(Digest.parse(digest))
    return row is not None and stored_file(client, digest) is not None


def stored_file(client: Client, digest: str) -> Path | None:
    """The file in storage holding ``digest``'s bytes, if any."""
    hex_ = digest.split(":", 1)[1]
    for path in files_under(app_of(client)[CONFIG].data_path):
        if path.name.partition(".")[0] == hex_:  # <hex>.<upload_id>
            return path
    return None


def leftover_files(client: Client) -> list[Path]:
    """Files in upload and spool areas: what an aborted fill must not leave behind."""
    data = app_of(client)[CONFIG].data_path
    return [p for p in files_under(data) if "uploads" in p.parts or "spool" in p.parts]


def partial_fills(client: Client) -> dict[str, int]:
    """What a cut fill left to continue from: spooled bytes by digest. Fails on any other
    leftover (upload files, spools that cannot be resumed)."""
    partials = {}
    for path in leftover_files(client):
        assert "spool" in path.parts and path.name.endswith(".partial"), path
        algorithm, _, hex_ = path.name.removesuffix(".partial").partition("-")
        partials[f"{algorithm}:{hex_}"] = path.stat().st_size
    return partials
