"""The API root, the liveness probe, and errors for unknown routes and methods."""

from __future__ import annotations

import json

import pytest
from aiohttp import web

from regproxy.api.keys import REGISTRY
from tests.helpers import Client, assert_error


async def test_api_root(client: Client) -> None:
    for path in ("/v2/", "/v2"):
        resp = await client.get(path)
        assert resp.status == 200
        assert resp.headers["Docker-Distribution-API-Version"] == "registry/2.0"
        assert await resp.json() == {}


async def test_healthz(client: Client) -> None:
    resp = await client.get("/healthz")
    assert resp.status == 200
    assert await resp.json() == {"status": "ok"}


async def test_unknown_route_is_a_json_error(client: Client) -> None:
    for path in ("/nothing-here", "/v2/repo/nothing-here", "/v2/repo/blobs"):
        resp = await client.get(path)
        await assert_error(resp, 404, "NOT_FOUND")
        assert resp.headers["Docker-Distribution-API-Version"] == "registry/2.0"


async def test_wrong_method_is_a_json_405(client: Client) -> None:
    resp = await client.post("/v2/repo/manifests/latest")
    await assert_error(resp, 405, "UNSUPPORTED")
    assert set(resp.headers["Allow"].split(",")) >= {"GET", "HEAD", "PUT", "DELETE"}

    resp = await client.put("/v2/_catalog")
    await assert_error(resp, 405, "UNSUPPORTED")
    assert "GET" in resp.headers["Allow"]

    resp = await client.patch(f"/v2/repo/blobs/sha256:{'0' * 64}")
    await assert_error(resp, 405, "UNSUPPORTED")


async def test_unexpected_error_is_a_500_without_internals(
    client: Client,
    app: web.Application,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def broken(*args: object) -> list[str]:
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(app[REGISTRY], "list_repositories", broken)
    resp = await client.get("/v2/_catalog")
    assert resp.status == 500
    assert resp.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    body = await resp.text()
    assert "secret" not in body and "RuntimeError" not in body
    assert json.loads(body) == {"errors": [{"code": "UNKNOWN", "message": "internal server error"}]}
    assert "secret internal detail" in caplog.text  # logged for the operator
