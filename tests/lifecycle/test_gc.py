"""Garbage collection of hosted content: the rules (SQL in the metadata store), the pass that
deletes rows then bytes, the orphan sweep, and how pushes, mounts and HEADs keep blobs alive.

Each test drives the registry through HTTP and runs GC passes on the app's own stores; a pass
with ``now`` in the future stands for time passing. Every test runs on SQLite and on
PostgreSQL (``gc_config``).
"""

from __future__ import annotations

import os
import re
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from regproxy.api.keys import CONFIG
from regproxy.config import Config
from regproxy.lifecycle.gc import PassReport, run_pass
from regproxy.oci import Digest
from regproxy.tasks import HOSTED
from tests.conftest import MakeClient
from tests.helpers import (
    OCI_CONFIG,
    OCI_EMPTY,
    OCI_INDEX,
    OCI_LAYER,
    OCI_MANIFEST,
    Client,
    app_of,
    assert_error,
    canonical,
    descriptor,
    digest_of,
    files_under,
    push_blob,
    push_image,
    push_manifest,
)
from tests.lifecycle.conftest import LifecycleConfig

HOUR = 3600.0


async def gc(client: Client, *, later: float = 0.0, dry_run: bool = False) -> PassReport:
    app = app_of(client)
    hosted = app[HOSTED]
    lines: list[str] = []
    report = await run_pass(
        hosted.meta,
        hosted.storage,
        app[CONFIG],
        dry_run=dry_run,
        now=time.time() + later,
        out=lines.append,
    )
    assert len(lines) >= len(report.blobs) + len(report.manifests)
    return report


def blob_files(config: Config) -> set[str]:
    """The digests (hex) whose bytes are stored."""
    return {p.name.partition(".")[0] for p in files_under(config.storage_path / "blobs")}


async def blob_status(client: Client, repo: str, digest: str) -> int:
    resp = await client.head(f"/v2/{repo}/blobs/{digest}")
    return resp.status


async def manifest_status(client: Client, repo: str, reference: str) -> int:
    resp = await client.head(
        f"/v2/{repo}/manifests/{reference}", headers={"Accept": f"{OCI_MANIFEST}, {OCI_INDEX}"}
    )
    return resp.status


async def catalog(client: Client) -> list[str]:
    resp = await client.get("/v2/_catalog")
    assert resp.status == 200
    repos: list[str] = (await resp.json())["repositories"]
    return repos


async def run_sql(config: Config, sql: str, *params: Any) -> None:
    """Change the metadata behind the app's back (``?`` placeholders), on either backend."""
    if config.metadata.backend == "postgres":
        numbered = iter(range(1, len(params) + 1))
        conn = await asyncpg.connect(config.metadata.dsn)
        try:
            await conn.execute(re.sub(r"\?", lambda _: f"${next(numbered)}", sql), *params)
        finally:
            await conn.close()
        return
    with sqlite3.connect(config.data_path / "metadata.sqlite") as db:
        db.execute(sql, params)


async def age_links(config: Config, seconds: float) -> None:
    """Make every link and blob row look ``seconds`` older (the test's clock is real)."""
    await run_sql(config, "UPDATE repository_blobs SET linked = linked - ?", seconds)
    await run_sql(config, "UPDATE blobs SET created = created - ?", seconds)
    await run_sql(config, "UPDATE manifests SET created = created - ?", seconds)


GcConfig = Callable[..., Awaitable[Config]]
pytestmark = pytest.mark.usefixtures("lifecycle_config")  # every test on each backend


@pytest.fixture
def gc_config(lifecycle_config: LifecycleConfig) -> GcConfig:
    """Configurations for GC tests: no background passes, an hour's grace."""

    async def make(tmp_path: Path, **overrides: Any) -> Config:
        values: dict[str, Any] = {"gc__interval": 0.0, "gc__grace": HOUR}
        values.update(overrides)
        return await lifecycle_config(tmp_path, **values)

    return make


async def test_a_blob_no_manifest_references_goes_after_the_grace(
    make_client: MakeClient, tmp_path: Path, gc_config: GcConfig
) -> None:
    config = await gc_config(tmp_path)
    client = await make_client(config)
    digest = await push_blob(client, "app", b"only pushed, never referenced")
    report = await gc(client)
    assert report.blobs == [] and blob_files(config) == {digest[7:]}
    assert await blob_status(client, "app", digest) == 200

    report = await gc(client, later=2 * HOUR)
    assert [str(blob.digest) for blob in report.blobs] == [digest]
    assert report.bytes_freed == len(b"only pushed, never referenced")
    assert blob_files(config) == set()
    await assert_error(await client.head(f"/v2/app/blobs/{digest}"), 404, "BLOB_UNKNOWN")
    # Its last link went with it: the repository is gone too.
    await assert_error(await client.get("/v2/app/tags/list"), 404, "NAME_UNKNOWN")


async def test_deleting_an_image_frees_only_what_no_other_image_uses(
    make_client: MakeClient, tmp_path: Path, gc_config: GcConfig
) -> None:
    config = await gc_config(tmp_path, gc__grace=0.0)
    client = await make_client(config)
    shared = b"a base layer shared by both repositories" * 10
    images = {}
    for repo in ("one", "two"):
        config_blob = canonical({"architecture": "amd64", "os": "linux", "repo": repo})
        own = f"the layer of {repo}".encode() * 10
        for data in (config_blob, shared, own):
            await push_blob(client, repo, data)
        doc = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": descriptor(OCI_CONFIG, config_blob),
            "layers": [descriptor(OCI_LAYER, shared), descriptor(OCI_LAYER, own)],
        }
        images[repo] = (await push_manifest(client, repo, "v1", doc), config_blob, own)
    assert (await gc(client)).blobs == []

    digest, config_blob, own = images["one"]
    resp = await client.delete(f"/v2/one/manifests/{digest}")
    assert resp.status == 202
    report = await gc(client)
    assert {str(blob.digest) for blob in report.blobs} == {
        digest_of(config_blob),
        digest_of(own),
    }
    assert blob_files(config) == {
        digest_of(data)[7:] for data in (shared, images["two"][1], images["two"][2])
    }
    assert await catalog(client) == ["two"]
    await assert_error(await client.head(f"/v2/one/blobs/{digest_of(shared)}"), 404, "")
    await assert_error(await client.get("/v2/one/tags/list"), 404, "NAME_UNKNOWN")
    resp = await client.get(f"/v2/two/blobs/{digest_of(shared)}")
    assert resp.status == 200 and await resp.read() == shared


async def test_untagged_manifests_stay_unless_configured(
    make_client: MakeClient, tmp_path: Path, gc_config: GcConfig
) -> None:
    for untagged in ("keep", "delete"):
        config = await gc_config(tmp_path / untagged, gc__grace=0.0, gc__untagged=untagged)
        client = await make_client(config)
        image = await push_image(client, "app", "v1")
        resp = await client.delete("/v2/app/manifests/v1")  # the tag only
        assert resp.status == 202
        report = await gc(client)
        if untagged == "keep":
            assert report.manifests == [] and report.blobs == []
            assert await manifest_status(client, "app", image.digest) == 200
        else:
            assert [(m.repo, str(m.digest)) for m in report.manifests] == [("app", image.digest)]
            assert {str(b.digest) for b in report.blobs} == set(image.blobs)
            assert await manifest_status(client, "app", image.digest) == 404
            assert blob_files(config) == set()


async def test_an_untagged_manifest_waits_for_the_grace(
    make_client: MakeClient, tmp_path: Path, gc_config: GcConfig
) -> None:
    config = await gc_config(tmp_path, gc__untagged="delete")
    client = await make_client(config)
    image = await push_image(client, "app", "v1")
    await client.delete("/v2/app/manifests/v1")
    assert (await gc(client)).manifests == []
    report = await gc(client, later=2 * HOUR)
    assert [str(m.digest) for m in report.manifests] == [image.digest]
    assert {str(b.digest) for b in report.blobs} == set(image.blobs)


async def test_an_index_keeps_its_children_and_frees_them_when_it_goes(
    make_client: MakeClient, tmp_path: Path, gc_config: GcConfig
) -> None:
    config = await gc_config(tmp_path, gc__grace=0.0, gc__untagged="delete")
    client = await make_client(config)
    amd = await push_image(client, "multi", "amd64-tmp", seed="amd64")
    arm = await push_image(client, "multi", "arm64-tmp", seed="arm64")
    for tag in ("amd64-tmp", "arm64-tmp"):
        await client.delete(f"/v2/multi/manifests/{tag}")
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [amd.descriptor(), arm.descriptor()],
    }
    await push_manifest(client, "multi", "latest", index)
    report = await gc(client)
    assert report.manifests == [] and report.blobs == []

    await client.delete("/v2/multi/manifests/latest")
    report = await gc(client)  # one pass: the index, then its children, then their blobs
    assert len(report.manifests) == 3
    assert {str(b.digest) for b in report.blobs} == set(amd.blobs) | set(arm.blobs)
    assert blob_files(config) == set()
    assert await catalog(client) == []


async def test_a_referrer_lives_as_long_as_its_subject(
    make_client: MakeClient, tmp_path: Path, gc_config: GcConfig
) -> None:
    config = await gc_config(tmp_path, gc__grace=0.0, gc__untagged="delete")
    client = await make_client(config)
    subject = await push_image(client, "app", "v1")
    await push_blob(client, "app", b"{}")
    signature = b"a signature of the image"
    await push_blob(client, "app", signature)
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": "application/vnd.example.signature.v1+json",
        "config": descriptor(OCI_EMPTY, b"{}"),
        "layers": [descriptor("application/octet-stream", signature)],
        "subject": subject.descriptor(),
    }
    referrer = await push_manifest(client, "app", digest_of(canonical(doc)), doc)
    assert (await gc(client)).manifests == []  # untagged, but its subject is there
    assert await manifest_status(client, "app", referrer) == 200

    # A subject is not kept by its referrers: untag it, and both go in one pass.
    await client.delete("/v2/app/manifests/v1")
    report = await gc(client)
    assert {str(m.digest) for m in report.manifests} == {subject.digest, referrer}
    assert blob_files(config) == set()


async def test_a_manifest_put_after_its_blob_was_collected_is_refused_cleanly(
    make_client: MakeClient, tmp_path: Path, gc_config: GcConfig
) -> None:
    config = await gc_config(tmp_path, gc__grace=0.0)
    client = await make_client(config)
    config_blob = canonical({"architecture": "amd64", "os": "linux"})
    layer = b"a layer collected before its manifest came" * 10
    for data in (config_blob, layer):
        await push_blob(client, "app", data)
    await gc(client)
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor(OCI_CONFIG, config_blob),
        "layers": [descriptor(OCI_LAYER, layer)],
    }
    resp = await client.put(
        "/v2/app/manifests/v1", data=canonical(doc), headers={"Content-Type": OCI_MANIFEST}
    )
    error = await assert_error(resp, 400, "MANIFEST_BLOB_UNKNOWN")
    assert {d["digest"] for d in error["detail"]} == {digest_of(config_blob), digest_of(layer)}
    assert await manifest_status(client, "app", "v1") == 404
    # Pushed again, the same blobs are accepted and live.
    for data in (config_blob, layer):
        await push_blob(client, "app", data)
    digest = await push_manifest(client, "app", "v1", doc)
    assert (await gc(client)).blobs == []
    assert await manifest_status(client, "app", digest) == 200


async def test_a_head_that_answers_exists_keeps_the_blob_for_another_grace(
    make_client: MakeClient, tmp_path: Path, gc_config: GcConfig
) -> None:
    config = await gc_config(tmp_path, gc__grace=100.0)
    client = await make_client(config)
    meta = app_of(client)[HOSTED].meta
    digest = await push_blob(client, "app", b"pushed long ago")
    await age_links(config, 80.0)  # older than a quarter of the grace
    before = await meta.get_repo_blob("app", Digest.parse(digest))
    assert before is not None and before.linked is not None

    assert await blob_status(client, "app", digest) == 200
    refreshed = await meta.get_repo_blob("app", Digest.parse(digest))
    assert refreshed is not None and refreshed.linked is not None
    assert refreshed.linked >= time.time() - 5 > before.linked
    # Young again: a second HEAD does not write.
    assert await blob_status(client, "app", digest) == 200
    again = await meta.get_repo_blob("app", Digest.parse(digest))
    assert again is not None and again.linked == refreshed.linked
    # 80 s later the unrefreshed link would have been 160 s old: still kept.
    assert (await gc(client, later=80.0)).blobs == []
    assert len((await gc(client, later=120.0)).blobs) == 1


async def test_a_mount_refreshes_the_link_and_a_collected_blob_is_uploaded_instead(
    make_client: MakeClient, tmp_path: Path, gc_config: GcConfig
) -> None:
    config = await gc_config(tmp_path, gc__grace=100.0)
    client = await make_client(config)
    digest = await push_blob(client, "source", b"mounted elsewhere")
    await age_links(config, 150.0)
    resp = await client.post(
        "/v2/target/blobs/uploads/", params={"mount": digest, "from": "source"}
    )
    assert resp.status == 201
    report = await gc(client)  # the old link in source goes; the fresh one keeps the blob
    assert report.links == 1 and report.blobs == []
    assert await blob_status(client, "target", digest) == 200
    assert await blob_status(client, "source", digest) == 404

    report = await gc(client, later=200.0)
    assert len(report.blobs) == 1
    resp = await client.post("/v2/other/blobs/uploads/", params={"mount": digest})
    assert resp.status == 202  # not stored any more: the client uploads it


async def test_a_dry_run_lists_everything_and_deletes_nothing(
    make_client: MakeClient, tmp_path: Path, gc_config: GcConfig
) -> None:
    config = await gc_config(tmp_path, gc__grace=0.0, gc__untagged="delete")
    client = await make_client(config)
    image = await push_image(client, "app", "v1")
    await client.delete("/v2/app/manifests/v1")
    files = blob_files(config)

    report = await gc(client, dry_run=True)
    assert [str(m.digest) for m in report.manifests] == [image.digest]
    # What the manifest's deletion would free shows up too.
    assert {str(b.digest) for b in report.blobs} == set(image.blobs)
    assert blob_files(config) == files
    assert await manifest_status(client, "app", image.digest) == 200

    report = await gc(client)
    assert {str(b.digest) for b in report.blobs} == set(image.blobs)
    assert blob_files(config) == set()


async def test_the_sweep_removes_old_orphans_and_keeps_young_ones(
    make_client: MakeClient, tmp_path: Path, gc_config: GcConfig
) -> None:
    config = await gc_config(tmp_path, uploads__max_age=60.0)
    client = await make_client(config)
    digest = await push_blob(client, "app", b"a blob with a row")
    in_progress = (await client.post("/v2/app/blobs/uploads/")).headers["Docker-Upload-UUID"]
    root = config.storage_path
    hex_ = "ab" * 32
    old_blob = root / "blobs" / "sha256" / "ab" / f"{hex_}.0b5e7e1e-0000-4000-8000-000000000000"
    old_blob.parent.mkdir(parents=True, exist_ok=True)
    old_blob.write_bytes(b"bytes whose row is gone")
    legacy = root / "blobs" / "sha256" / "ab" / hex_  # the key scheme before upload ids
    legacy.write_bytes(b"old-style orphan")
    young = root / "blobs" / "sha256" / "ab" / f"{hex_}.young"
    young.write_bytes(b"maybe being committed right now")
    empty_upload = root / "uploads" / "11111111-2222-4333-8444-555555555555"
    empty_upload.write_bytes(b"")
    # Everything but `young` looks old: uploads and blobs with rows stay however old they are.
    long_ago = time.time() - 3600
    for path in files_under(root):
        if path != young:
            os.utime(path, (long_ago, long_ago))

    report = await gc(client)
    assert {obj.key for obj in report.orphans.blobs} == {
        f"sha256/ab/{old_blob.name}",
        f"sha256/ab/{hex_}",
    }
    assert [obj.key for obj in report.orphans.uploads] == [empty_upload.name]
    assert not old_blob.exists() and not legacy.exists() and not empty_upload.exists()
    assert young.exists()
    assert (root / "uploads" / in_progress).exists()
    resp = await client.get(f"/v2/app/blobs/{digest}")
    assert resp.status == 200 and await resp.read() == b"a blob with a row"


async def test_a_blob_stored_under_the_old_key_is_served_and_collected(
    make_client: MakeClient, tmp_path: Path, gc_config: GcConfig
) -> None:
    config = await gc_config(tmp_path, gc__grace=0.0)
    client = await make_client(config)
    data = b"stored before keys had upload ids"
    digest = await push_blob(client, "app", data)
    [path] = files_under(config.storage_path / "blobs")
    legacy = path.with_name(digest[7:])
    path.rename(legacy)
    await run_sql(config, "UPDATE blobs SET storage_key = ?", f"sha256/{digest[7:9]}/{digest[7:]}")
    resp = await client.get(f"/v2/app/blobs/{digest}")
    assert resp.status == 200 and await resp.read() == data
    report = await gc(client)
    assert [str(b.digest) for b in report.blobs] == [digest]
    assert not legacy.exists()
