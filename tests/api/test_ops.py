"""/readyz: the metadata store and blob storage answer in time, and the server is not draining."""

from __future__ import annotations

from pathlib import Path

from regproxy.api.ops import READINESS
from tests.conftest import MakeClient
from tests.helpers import Client, app_of
from tests.s3fixtures import S3, faulty_s3, moto_server  # noqa: F401


async def test_ready(client: Client) -> None:
    resp = await client.get("/readyz")
    assert resp.status == 200
    assert await resp.json() == {"status": "ready"}


async def test_not_ready_while_draining(client: Client) -> None:
    app_of(client)[READINESS].draining = True  # what server.py sets on SIGTERM
    resp = await client.get("/readyz")
    assert resp.status == 503
    assert await resp.json() == {"status": "draining"}
    assert (await client.get("/healthz")).status == 200  # alive all the same


async def test_not_ready_while_s3_is_down(
    make_client: MakeClient,
    faulty_s3: S3,  # noqa: F811
    tmp_path: Path,
) -> None:
    client = await make_client(faulty_s3.app_config(tmp_path, ready_timeout=1.0))
    assert (await client.get("/readyz")).status == 200

    faulty_s3.moto.stop()
    resp = await client.get("/readyz")
    assert resp.status == 503
    body = await resp.json()
    assert body["status"] == "unavailable"
    assert set(body["failed"]) == {"storage"}  # the metadata store still answers
    assert "\n" not in body["failed"]["storage"]

    faulty_s3.moto.start()
    resp = await client.get("/readyz")
    assert resp.status == 200, await resp.text()
    assert await resp.json() == {"status": "ready"}


async def test_not_ready_while_storage_hangs(
    make_client: MakeClient,
    faulty_s3: S3,  # noqa: F811
    tmp_path: Path,
) -> None:
    """A storage that accepts the connection and never answers: 503 after the timeout."""
    client = await make_client(
        faulty_s3.app_config(tmp_path, ready_timeout=0.5, s3_read_timeout=30.0)
    )
    assert faulty_s3.relay is not None
    faulty_s3.relay.set_mode("slow")
    resp = await client.get("/readyz")
    assert resp.status == 503
    assert (await resp.json())["failed"] == {"storage": "no answer within 0.5s"}
    faulty_s3.relay.set_mode("pass")
    assert (await client.get("/readyz")).status == 200
