"""The S3 settings: TOML and environment, validation, and start-up checks of the bucket."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from regproxy.config import ConfigError, load_config
from regproxy.oci import Digest
from regproxy.storage.s3 import S3BlobStore
from tests.e2e.procs import free_port
from tests.s3fixtures import S3

TOML = """
[storage]
backend = "s3"

[storage.s3]
bucket = "registry"
prefix = "regproxy/"
endpoint_url = "http://127.0.0.1:9000"
region = "eu-west-1"
access_key_id = "AKIDEXAMPLE"
secret_access_key = "secret"
addressing_style = "path"
part_size = 8388608
max_concurrency = 4
redirect = true
"""


def test_toml_and_environment(tmp_path: Path) -> None:
    path = tmp_path / "regproxy.toml"
    path.write_text(TOML)
    config = load_config(str(path), env={"REGPROXY_STORAGE_S3_PART_SIZE": str(32 << 20)})
    s3 = config.storage.s3
    assert config.storage.backend == "s3"
    assert (s3.bucket, s3.prefix, s3.endpoint_url, s3.region) == (
        "registry",
        "regproxy/",
        "http://127.0.0.1:9000",
        "eu-west-1",
    )
    assert (s3.access_key_id, s3.secret_access_key, s3.addressing_style) == (
        "AKIDEXAMPLE",
        "secret",
        "path",
    )
    assert (s3.part_size, s3.max_concurrency, s3.redirect) == (32 << 20, 4, True)

    env = {
        "REGPROXY_STORAGE_BACKEND": "s3",
        "REGPROXY_STORAGE_S3_BUCKET": "from-env",
        "REGPROXY_STORAGE_S3_REDIRECT": "yes",
        "REGPROXY_STORAGE_S3_MAX_ATTEMPTS": "7",
    }
    s3 = load_config(None, env=env).storage.s3
    assert (s3.bucket, s3.redirect, s3.max_attempts, s3.part_size) == (
        "from-env",
        True,
        7,
        16 << 20,
    )


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({}, "storage.s3.bucket"),
        ({"part_size": (5 << 20) - 1}, "storage.s3.part_size"),
        ({"part_size": (5 << 30) + 1}, "storage.s3.part_size"),
        ({"addressing_style": "dns"}, "storage.s3.addressing_style"),
        ({"access_key_id": "AKID"}, "storage.s3.secret_access_key"),
        ({"endpoint_url": "127.0.0.1:9000"}, "storage.s3.endpoint_url"),
        ({"max_concurrency": 0}, "storage.s3.max_concurrency"),
        ({"max_attempts": 0}, "storage.s3.max_attempts"),
        ({"read_timeout": 0}, "storage.s3.read_timeout"),
        ({"redirect_expiry": 8 * 24 * 3600}, "storage.s3.redirect_expiry"),
    ],
)
def test_invalid(settings: dict[str, Any], key: str) -> None:
    values: dict[str, Any] = {"storage.backend": "s3"}
    if settings:
        values["storage.s3.bucket"] = "b"
    values.update({f"storage.s3.{name}": value for name, value in settings.items()})
    with pytest.raises(ConfigError, match=f"config key {key}:"):
        load_config(None, env={}, overrides=values)


def test_unknown_key() -> None:
    with pytest.raises(ConfigError, match="REGPROXY_STORAGE_S3_BUKET"):
        load_config(None, env={"REGPROXY_STORAGE_S3_BUKET": "x"})


async def test_missing_bucket_stops_start_up(s3: S3) -> None:
    with pytest.raises(
        ConfigError, match=r"storage\.s3\.bucket: there is no bucket 'nope-"
    ) as info:
        async with S3BlobStore.connect(s3.config(bucket="nope-" + s3.bucket), s3.session):
            pass
    assert s3.endpoint_url in str(info.value)


async def test_wrong_credentials_stop_start_up(s3: S3, aiohttp_server: Any) -> None:
    """An S3 that refuses the credentials (moto accepts any, so a stand-in answers 403)."""

    async def refuse(request: web.Request) -> web.Response:
        body = "<Error><Code>InvalidAccessKeyId</Code><Message>no such key</Message></Error>"
        return web.Response(status=403, text=body, content_type="application/xml")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", refuse)
    server: TestServer = await aiohttp_server(app, host="127.0.0.1")
    config = s3.config(endpoint_url=str(server.make_url("")).rstrip("/"))
    with pytest.raises(ConfigError, match=r"storage\.s3\.access_key_id: .* refused access"):
        async with S3BlobStore.connect(config, s3.session):
            pass


async def test_unreachable_endpoint_stops_start_up(s3: S3) -> None:
    config = s3.config(endpoint_url=f"http://127.0.0.1:{free_port()}", max_attempts=1)
    with pytest.raises(ConfigError, match=r"storage\.s3\.endpoint_url: cannot reach S3"):
        async with S3BlobStore.connect(config, s3.session):
            pass


async def test_prefix(s3: S3) -> None:
    async with s3.store(prefix="/some/where") as store:
        writer = await store.open_writer("00000000-0000-0000-0000-000000000001", None, 0)
        await writer.write(b"data")
        key = await writer.commit(Digest.of(b"data"))
        assert key == "blobs/00000000-0000-0000-0000-000000000001"
        assert await s3.keys() == [f"some/where/{key}"]
        assert await store.exists(key)
