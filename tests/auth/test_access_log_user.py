"""Access lines name the user; /metrics follows the auth rules; failed logins are counted."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from blockbuster import BlockBuster

from regproxy.api.middleware import AccessLogger
from regproxy.app import create_app
from regproxy.logs import ACCESS_FIELDS
from regproxy.metrics import METRICS
from tests.auth.conftest import auth_config, basic
from tests.helpers import Client, app_of


@pytest.fixture
async def server(tmp_path: Path, blockbuster: BlockBuster) -> TestServer:
    blockbuster.deactivate()
    try:
        server = TestServer(create_app(auth_config(tmp_path)))
        await server.start_server(access_log_class=AccessLogger)
    finally:
        blockbuster.activate()
    return server


async def test_user_in_access_line_and_metrics_need_login(
    server: TestServer, aiohttp_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="aiohttp.access")
    anonymous: Client = await aiohttp_client(server)
    alice: Client = await aiohttp_client(server, headers={"Authorization": basic("alice")})
    wrong: Client = await aiohttp_client(server, headers={"Authorization": basic("bob", "no")})

    assert (await anonymous.get("/metrics")).status == 401
    assert (await wrong.get("/metrics")).status == 401
    resp = await alice.get("/metrics")
    assert resp.status == 200
    assert 'registry_auth_login_failures_total{reason="password"} 1.0' in await resp.text()

    lines = [getattr(r, ACCESS_FIELDS) for r in caplog.records if hasattr(r, ACCESS_FIELDS)]
    assert [(a["status"], a["user"]) for a in lines if a["handler"] == "metrics"] == [
        (401, None),
        (401, None),
        (200, "alice"),
    ]
    registry = app_of(alice)[METRICS].registry
    assert (
        registry.get_sample_value("registry_auth_login_failures_total", {"reason": "password"}) == 1
    )
