"""S3 for tests: a moto server over real HTTP on 127.0.0.1, and a relay in front of it that
can take S3 away, slow it down or make it answer 503 SlowDown.

``ThreadedMotoServer`` runs in this process; moto keeps its buckets in process memory, so a
server stopped and started again on the same port still holds them (as a real S3 outage would).
Every fixture stops what it started. Pytest plugins: ``pytest_plugins = ["tests.s3fixtures"]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiobotocore.session import AioSession
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
from moto.server import ThreadedMotoServer
from werkzeug.serving import make_server

from regproxy.config import Config, S3Config
from regproxy.storage.s3 import S3BlobStore
from tests.e2e.procs import free_port
from tests.helpers import make_config

ACCESS_KEY = "regproxy-test"
SECRET_KEY = "regproxy-test-secret"
REGION = "us-east-1"
MIN_PART = 5 << 20


class _MotoServer(ThreadedMotoServer):
    """moto's threaded server, polling for shutdown every 50 ms rather than every 500 ms."""

    def _server_entry(self) -> None:
        app = DomainDispatcherApplication(create_backend_app)
        self._server = make_server(self._ip_address, self._port, app, True)
        self._server_ready_event.set()
        self._server.serve_forever(poll_interval=0.05)


class MotoServer:
    """A moto S3 server on ``127.0.0.1:port`` that a test can stop and start again."""

    def __init__(self) -> None:
        self.port = free_port()
        self._server: _MotoServer | None = None
        # One botocore session for every client: loading AWS's models takes ~0.2 s a session.
        self.session = AioSession()

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> None:
        assert self._server is None
        self._server = _MotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.stop()

    async def request(self, method: str, path: str) -> int:
        async with (
            aiohttp.ClientSession() as session,
            session.request(method, f"{self.endpoint_url}{path}") as resp,
        ):
            await resp.read()
            return resp.status


@dataclass
class Relay:
    """A TCP relay to moto with fault modes: ``"pass"``, ``"down"`` (connections are cut and
    new ones closed at once), ``"slow"`` (nothing is relayed until ``mode`` changes),
    ``"slowdown"`` (each request gets a canned ``503 SlowDown``; with ``slowdowns`` set,
    only that many, then ``"pass"`` again)."""

    target_port: int
    port: int = 0
    mode: str = "pass"
    slowdowns: int | None = None
    answered_503: int = 0
    _server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)
    _flowing: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._flowing.set()
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port or 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        self.cut()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def cut(self) -> None:
        """Abort every relayed connection."""
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    def set_mode(self, mode: str, slowdowns: int | None = None) -> None:
        self.mode, self.slowdowns = mode, slowdowns
        if mode == "slow":
            self._flowing.clear()
        else:
            self._flowing.set()
        if mode != "pass":
            self.cut()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            if self.mode == "down":
                return
            if self.mode == "slowdown":
                await self._slowdown(reader, writer)
                return
            await self._flowing.wait()  # "slow": hold the connection, relay nothing
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
            self._writers.add(up_writer)
            try:
                await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
            finally:
                self._writers.discard(up_writer)
                up_writer.transport.abort()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            writer.transport.abort()

    async def _slowdown(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")  # the request head; the body is never read
        body = (
            b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
            b"<Message>Please reduce your request rate.</Message></Error>"
        )
        writer.write(
            b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
            b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        await writer.drain()
        self.answered_503 += 1
        if self.slowdowns is not None:
            self.slowdowns -= 1
            if self.slowdowns <= 0:
                self.mode, self.slowdowns = "pass", None


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    finally:
        with contextlib.suppress(OSError, RuntimeError):
            writer.write_eof()


@dataclass
class S3:
    """A bucket of its own on a moto server, reached at ``endpoint_url``."""

    moto: MotoServer
    bucket: str
    endpoint_url: str
    relay: Relay | None = None

    @property
    def session(self) -> AioSession:
        return self.moto.session

    def config(self, **overrides: Any) -> S3Config:
        values: dict[str, Any] = {
            "bucket": self.bucket,
            "endpoint_url": self.endpoint_url,
            "region": REGION,
            "access_key_id": ACCESS_KEY,
            "secret_access_key": SECRET_KEY,
            "addressing_style": "path",
            "part_size": MIN_PART,
            "max_attempts": 2,
            "connect_timeout": 2.0,
            "read_timeout": 5.0,
        }
        values.update(overrides)
        return S3Config(**values)

    def app_config(self, tmp_path: Path, **overrides: Any) -> Config:
        """A regproxy configuration on this bucket; ``s3_<key>=`` set ``storage.s3.<key>``."""
        settings = {
            f"storage.s3.{key}": value
            for key, value in dataclasses.asdict(self.config()).items()
            if value != getattr(S3Config(), key)
        }
        for key, value in overrides.items():
            if key.startswith("s3_"):
                settings[f"storage.s3.{key[3:]}"] = value
            else:
                settings[key.replace("__", ".")] = value
        return make_config(tmp_path, storage__backend="s3", **settings)

    def toml(self, **overrides: Any) -> str:
        """``[storage]`` for a ``regproxy serve`` configuration file."""
        lines = ["[storage]", 'backend = "s3"', "", "[storage.s3]"]
        for key, value in {**dataclasses.asdict(self.config()), **overrides}.items():
            if isinstance(value, bool):
                lines.append(f"{key} = {'true' if value else 'false'}")
            elif isinstance(value, str):
                lines.append(f'{key} = "{value}"')
            else:
                lines.append(f"{key} = {value}")
        return "\n".join(lines) + "\n"

    def client(self) -> contextlib.AbstractAsyncContextManager[Any]:
        return self.session.create_client(
            "s3",
            endpoint_url=self.moto.endpoint_url,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
        )

    @contextlib.asynccontextmanager
    async def store(self, **overrides: Any) -> AsyncIterator[S3BlobStore]:
        """An S3BlobStore on this bucket (``overrides``: S3Config fields)."""
        async with S3BlobStore.connect(self.config(**overrides), self.session) as store:
            yield store

    async def keys(self) -> list[str]:
        """Every object key in the bucket."""
        async with self.client() as client:
            found: list[str] = []
            paginator = client.get_paginator("list_objects_v2")
            async for page in paginator.paginate(Bucket=self.bucket):
                found += [item["Key"] for item in page.get("Contents", [])]
            return sorted(found)

    async def multipart_uploads(self) -> list[str]:
        """The keys of every unfinished multipart upload in the bucket."""
        async with self.client() as client:
            response = await client.list_multipart_uploads(Bucket=self.bucket)
            return sorted(item["Key"] for item in response.get("Uploads", []))

    async def empty(self, delete_bucket: bool = False) -> None:
        """Abort every multipart upload and delete every object (and the bucket)."""
        async with self.client() as client:
            uploads = await client.list_multipart_uploads(Bucket=self.bucket)
            for item in uploads.get("Uploads", []):
                await client.abort_multipart_upload(
                    Bucket=self.bucket, Key=item["Key"], UploadId=item["UploadId"]
                )
            for key in await self.keys():
                await client.delete_object(Bucket=self.bucket, Key=key)
            if delete_bucket:
                await client.delete_bucket(Bucket=self.bucket)

    async def get(self, key: str) -> bytes:
        async with self.client() as client:
            response = await client.get_object(Bucket=self.bucket, Key=key)
            async with response["Body"] as body:
                data: bytes = await body.read()
                return data


def _reset(server: MotoServer) -> None:
    """Drop every bucket: moto keeps them in this process's memory."""
    with contextlib.suppress(OSError):
        request = urllib.request.Request(f"{server.endpoint_url}/moto-api/reset", method="POST")
        urllib.request.urlopen(request, timeout=10).close()


@contextlib.contextmanager
def _running_moto() -> Iterator[MotoServer]:
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = MotoServer()
    server.start()
    try:
        yield server
    finally:
        if not server.running:
            server.start()
        _reset(server)
        server.stop()


@pytest.fixture(scope="session")
def shared_moto() -> Iterator[MotoServer]:
    """A moto S3 server on a free 127.0.0.1 port for the whole session; each test gets a
    bucket of its own on it (``s3``). Stopped at the end of the session."""
    with _running_moto() as server:
        yield server


@pytest.fixture
def moto_server() -> Iterator[MotoServer]:
    """A moto S3 server of the test's own, which it may stop and start again."""
    with _running_moto() as server:
        yield server


@contextlib.asynccontextmanager
async def _bucket(
    moto: MotoServer, endpoint_url: str, relay: Relay | None = None
) -> AsyncIterator[S3]:
    s3 = S3(moto, f"regproxy-{uuid.uuid4().hex[:12]}", endpoint_url, relay)
    async with s3.client() as client:
        await client.create_bucket(Bucket=s3.bucket)
    try:
        yield s3
    finally:
        if moto.running:
            await s3.empty(delete_bucket=True)


@pytest.fixture
async def s3(shared_moto: MotoServer) -> AsyncIterator[S3]:
    """A fresh bucket on the shared moto server, reached directly; emptied and deleted after."""
    async with _bucket(shared_moto, shared_moto.endpoint_url) as bucket:
        yield bucket


@pytest.fixture
async def faulty_s3(moto_server: MotoServer) -> AsyncIterator[S3]:
    """A fresh bucket on a moto server of the test's own, reached through a :class:`Relay`
    (``faulty_s3.relay``) that injects faults; ``faulty_s3.moto`` can be stopped and started."""
    relay = Relay(moto_server.port)
    await relay.start()
    try:
        async with _bucket(moto_server, relay.endpoint_url, relay) as bucket:
            yield bucket
    finally:
        await relay.stop()
