"""A zero-length suffix range (``bytes=-0``) cannot be satisfied: 416 with the blob's size,
on every way a blob is served: sendfile from the filesystem and a stream from S3."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import MakeClient
from tests.helpers import Client, assert_error, make_config, push_blob
from tests.s3fixtures import MotoServer, shared_moto  # noqa: F401
from tests.s3fixtures import _bucket as bucket

DATA = b"0123456789"


@pytest.fixture(params=["filesystem", "s3"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def any_client(
    backend: str,
    make_client: MakeClient,
    shared_moto: MotoServer,  # noqa: F811
    tmp_path: Path,
) -> AsyncIterator[Client]:
    if backend == "filesystem":
        yield await make_client(make_config(tmp_path))
        return
    async with bucket(shared_moto, shared_moto.endpoint_url) as s3:
        yield await make_client(s3.app_config(tmp_path))


@pytest.mark.parametrize("value", ["bytes=-0", "bytes=-00", "bytes=10-", "bytes=0-1,4-5"])
async def test_unsatisfiable_ranges(any_client: Client, value: str) -> None:
    digest = await push_blob(any_client, "app", DATA)
    resp = await any_client.get(f"/v2/app/blobs/{digest}", headers={"Range": value})
    await assert_error(resp, 416, "RANGE_INVALID")
    assert resp.headers["Content-Range"] == f"bytes */{len(DATA)}"
    # A satisfiable suffix still works on the same backend.
    resp = await any_client.get(f"/v2/app/blobs/{digest}", headers={"Range": "bytes=-1"})
    assert resp.status == 206 and await resp.read() == DATA[-1:]
    assert resp.headers["Content-Range"] == f"bytes 9-9/{len(DATA)}"


async def test_zero_suffix_of_an_empty_blob(any_client: Client) -> None:
    digest = await push_blob(any_client, "app", b"")
    resp = await any_client.get(f"/v2/app/blobs/{digest}", headers={"Range": "bytes=-0"})
    await assert_error(resp, 416, "RANGE_INVALID")
    assert resp.headers["Content-Range"] == "bytes */0"
