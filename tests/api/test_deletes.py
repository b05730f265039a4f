"""Deleting tags and manifests."""

from __future__ import annotations

from typing import Any

from tests.helpers import (
    EMPTY_JSON,
    OCI_EMPTY,
    OCI_MANIFEST,
    Client,
    assert_error,
    canonical,
    descriptor,
    digest_of,
    push_blob,
    push_image,
    push_manifest,
)


async def _tags(client: Client, repo: str) -> list[str]:
    resp = await client.get(f"/v2/{repo}/tags/list")
    assert resp.status == 200, await resp.text()
    tags: list[str] = (await resp.json())["tags"]
    return tags


async def _referrers(client: Client, repo: str, digest: str) -> list[str]:
    resp = await client.get(f"/v2/{repo}/referrers/{digest}")
    assert resp.status == 200
    return [d["digest"] for d in (await resp.json())["manifests"]]


async def test_delete_tag_keeps_the_manifest(client: Client) -> None:
    image = await push_image(client, "app", "v1")
    await push_manifest(client, "app", "stable", image.manifest, OCI_MANIFEST)
    resp = await client.delete("/v2/app/manifests/v1")
    assert resp.status == 202
    assert await resp.read() == b""

    error = await assert_error(await client.get("/v2/app/manifests/v1"), 404, "MANIFEST_UNKNOWN")
    assert error["detail"] == {"reference": "v1"}
    await assert_error(await client.head("/v2/app/manifests/v1"), 404, "MANIFEST_UNKNOWN")
    for reference in (image.digest, "stable"):
        resp = await client.get(f"/v2/app/manifests/{reference}")
        assert resp.status == 200
        assert resp.headers["Docker-Content-Digest"] == image.digest
        assert await resp.read() == image.manifest
    assert await _tags(client, "app") == ["stable"]

    await assert_error(await client.delete("/v2/app/manifests/v1"), 404, "MANIFEST_UNKNOWN")
    await assert_error(await client.delete("/v2/app/manifests/never"), 404, "MANIFEST_UNKNOWN")


async def test_delete_manifest_by_digest(client: Client) -> None:
    image = await push_image(client, "app", "v1")
    await push_manifest(client, "app", "stable", image.manifest, OCI_MANIFEST)
    other = await push_image(client, "app", "other", seed="other")

    resp = await client.delete(f"/v2/app/manifests/{image.digest}")
    assert resp.status == 202
    for reference in (image.digest, "v1", "stable"):
        resp = await client.get(f"/v2/app/manifests/{reference}")
        await assert_error(resp, 404, "MANIFEST_UNKNOWN")
        resp = await client.head(f"/v2/app/manifests/{reference}")
        await assert_error(resp, 404, "MANIFEST_UNKNOWN")
    assert await _tags(client, "app") == ["other"]
    resp = await client.get("/v2/app/manifests/other")
    assert await resp.read() == other.manifest

    resp = await client.delete(f"/v2/app/manifests/{image.digest}")
    error = await assert_error(resp, 404, "MANIFEST_UNKNOWN")
    assert error["detail"] == {"reference": image.digest}

    # Its blobs stay in the repository, and it can be pushed again.
    for digest, data in image.blobs.items():
        resp = await client.get(f"/v2/app/blobs/{digest}")
        assert await resp.read() == data
    assert await push_manifest(client, "app", "v1", image.manifest, OCI_MANIFEST) == image.digest


async def test_delete_referrer_removes_its_entry(client: Client) -> None:
    image = await push_image(client, "app", "v1")
    await push_blob(client, "app", EMPTY_JSON)
    await push_blob(client, "app", b"sig")
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": "application/vnd.example.sig",
        "config": descriptor(OCI_EMPTY, EMPTY_JSON),
        "layers": [descriptor("application/octet-stream", b"sig")],
        "subject": image.descriptor(),
    }
    content = canonical(doc)
    referrer = await push_manifest(client, "app", "sig", content)
    assert await _referrers(client, "app", image.digest) == [referrer]

    assert (await client.delete(f"/v2/app/manifests/{referrer}")).status == 202
    assert await _referrers(client, "app", image.digest) == []
    assert await _tags(client, "app") == ["v1"]
    await assert_error(await client.get("/v2/app/manifests/sig"), 404, "MANIFEST_UNKNOWN")


async def test_delete_subject_keeps_its_referrers(client: Client) -> None:
    image = await push_image(client, "app", "v1")
    await push_blob(client, "app", EMPTY_JSON)
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor(OCI_EMPTY, EMPTY_JSON),
        "layers": [],
        "subject": image.descriptor(),
    }
    referrer = await push_manifest(client, "app", digest_of(canonical(doc)), doc)
    assert (await client.delete(f"/v2/app/manifests/{image.digest}")).status == 202
    assert await _referrers(client, "app", image.digest) == [referrer]


async def test_delete_is_per_repository(client: Client) -> None:
    image = await push_image(client, "app", "v1")
    await push_image(client, "copy", "v1")
    await assert_error(await client.delete("/v2/nothing/manifests/v1"), 404, "MANIFEST_UNKNOWN")
    resp = await client.delete(f"/v2/nothing/manifests/{image.digest}")
    await assert_error(resp, 404, "MANIFEST_UNKNOWN")
    assert (await client.delete(f"/v2/copy/manifests/{image.digest}")).status == 202
    resp = await client.get("/v2/app/manifests/v1")
    assert resp.status == 200
    assert await resp.read() == image.manifest


async def test_catalog_after_deleting_the_last_manifest(client: Client) -> None:
    image = await push_image(client, "app", "v1")
    await push_image(client, "keep", "v1")
    assert (await client.delete(f"/v2/app/manifests/{image.digest}")).status == 202
    resp = await client.get("/v2/_catalog")
    assert await resp.json() == {"repositories": ["keep"]}
