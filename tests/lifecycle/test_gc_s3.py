"""GC and the orphan sweep on S3 storage (a moto server): objects no row names, tails of
abandoned uploads and multipart uploads nobody owns go; everything with a row stays."""

from __future__ import annotations

import time
from pathlib import Path

from regproxy.api.keys import CONFIG
from regproxy.lifecycle.gc import run_pass
from regproxy.tasks import HOSTED
from tests.conftest import MakeClient
from tests.helpers import app_of, push_image
from tests.s3fixtures import S3, s3, shared_moto  # noqa: F401

MiB = 1 << 20


async def test_gc_and_the_sweep_on_s3(
    make_client: MakeClient,
    tmp_path: Path,
    s3: S3,  # noqa: F811
) -> None:
    config = s3.app_config(tmp_path, gc__grace=0.0, gc__untagged="delete", uploads__max_age=60.0)
    client = await make_client(config)
    kept = await push_image(client, "app", "v1", seed="kept")
    gone = await push_image(client, "app", "v2", seed="gone")
    await client.delete(f"/v2/app/manifests/{gone.digest}")
    # An upload in progress (a row: stays), and leftovers no row names (a crash's).
    resp = await client.post("/v2/app/blobs/uploads/")
    location = resp.headers["Location"]
    resp = await client.patch(location, data=b"x" * (6 * MiB))  # a part: a multipart upload
    assert resp.status == 202
    async with s3.client() as raw:
        await raw.put_object(Bucket=s3.bucket, Key="blobs/0b5e7e1e-dead", Body=b"orphan")
        await raw.put_object(Bucket=s3.bucket, Key="uploads/0b5e7e1e-dead/tail.1", Body=b"t")
    app = app_of(client)
    meta, storage = app[HOSTED].meta, app[HOSTED].storage

    # Young leftovers stay; what the deleted image alone used goes.
    report = await run_pass(meta, storage, app[CONFIG])
    assert {str(b.digest) for b in report.blobs} == set(gone.blobs)
    assert report.orphans.blobs == [] and report.orphans.uploads == []

    # (moto dates every multipart upload in 2010, so this one is made only now.)
    async with s3.client() as raw:
        await raw.create_multipart_upload(Bucket=s3.bucket, Key="blobs/0b5e7e1e-beef")
    # An hour later they are orphans: swept, and the upload in progress is left alone.
    report = await run_pass(meta, storage, app[CONFIG], now=time.time() + 3600)
    assert [o.key for o in report.orphans.blobs] == ["blobs/0b5e7e1e-dead"]
    uploads = {(o.key, o.multipart is not None) for o in report.orphans.uploads}
    assert uploads == {("uploads/0b5e7e1e-dead/tail.1", False), ("blobs/0b5e7e1e-beef", True)}
    upload_id = location.rsplit("/", 1)[1]
    assert {o.upload_id async for o in storage.list_upload_objects()} == {upload_id}
    keys = await s3.keys()
    assert "blobs/0b5e7e1e-dead" not in keys and "uploads/0b5e7e1e-dead/tail.1" not in keys
    for digest, data in kept.blobs.items():
        resp = await client.get(f"/v2/app/blobs/{digest}")
        assert resp.status == 200 and await resp.read() == data
    resp = await client.get(location)
    assert resp.status == 204
