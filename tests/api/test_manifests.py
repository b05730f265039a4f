"""Manifests: PUT of every supported type, GET and HEAD of the stored bytes, DELETE, errors."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import MakeClient
from tests.helpers import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    EMPTY_JSON,
    OCI_EMPTY,
    OCI_INDEX,
    OCI_LAYER,
    OCI_MANIFEST,
    Client,
    Image,
    assert_error,
    canonical,
    descriptor,
    digest_of,
    image_manifest,
    make_config,
    push_blob,
    push_image,
    push_manifest,
)

SIGNATURE_TYPE = "application/vnd.example.signature.v1+json"
SBOM_TYPE = "application/vnd.example.sbom.v1+json"


async def _get(client: Client, repo: str, reference: str, content: bytes, media_type: str) -> None:
    """GET and HEAD return the stored bytes unchanged, with their type, length and digest."""
    digest = digest_of(content)
    resp = await client.get(f"/v2/{repo}/manifests/{reference}")
    assert resp.status == 200, await resp.text()
    assert resp.headers["Content-Type"] == media_type
    assert resp.headers["Docker-Content-Digest"] == digest
    assert resp.headers["Content-Length"] == str(len(content))
    assert await resp.read() == content

    resp = await client.head(f"/v2/{repo}/manifests/{reference}")
    assert resp.status == 200
    assert resp.headers["Content-Type"] == media_type
    assert resp.headers["Docker-Content-Digest"] == digest
    assert resp.headers["Content-Length"] == str(len(content))
    assert await resp.read() == b""


async def _put(
    client: Client,
    repo: str,
    reference: str,
    content: bytes,
    media_type: str | None,
    params: Any = None,
) -> Any:
    headers = {"Content-Type": media_type} if media_type else {}
    return await client.put(
        f"/v2/{repo}/manifests/{reference}", data=content, headers=headers, params=params
    )


async def _artifact(client: Client, repo: str, subject: Image | None = None, **extra: Any) -> bytes:
    """An artifact: empty config, one blob layer, ``artifactType`` and maybe a subject."""
    await push_blob(client, repo, EMPTY_JSON)
    payload = b'{"signature": "..."}'
    await push_blob(client, repo, payload)
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": SIGNATURE_TYPE,
        "config": descriptor(OCI_EMPTY, EMPTY_JSON),
        "layers": [descriptor("application/octet-stream", payload)],
        **extra,
    }
    if subject is not None:
        doc["subject"] = subject.descriptor()
    return canonical(doc)


# -- every type, by tag and by digest -----------------------------------------------------


@pytest.mark.parametrize("docker", [False, True], ids=["oci", "docker"])
@pytest.mark.parametrize("by", ["tag", "digest"])
async def test_image_manifest(client: Client, docker: bool, by: str) -> None:
    await push_blob(client, "app", b"config")
    await push_blob(client, "app", b"layer")
    doc = image_manifest(b"config", [b"layer"], docker=docker)
    content = canonical(doc)
    reference = "v1" if by == "tag" else digest_of(content)
    resp = await _put(client, "app", reference, content, doc["mediaType"])
    assert resp.status == 201, await resp.text()
    assert resp.headers["Docker-Content-Digest"] == digest_of(content)
    assert resp.headers["Location"] == f"/v2/app/manifests/{digest_of(content)}"
    assert "OCI-Subject" not in resp.headers
    await _get(client, "app", reference, content, doc["mediaType"])
    await _get(client, "app", digest_of(content), content, doc["mediaType"])


@pytest.mark.parametrize("media_type", [OCI_INDEX, DOCKER_LIST])
@pytest.mark.parametrize("by", ["tag", "digest"])
async def test_index(client: Client, media_type: str, by: str) -> None:
    docker = media_type == DOCKER_LIST
    amd64 = await push_image(client, "app", "amd64", seed="amd64", docker=docker)
    arm64 = await push_image(client, "app", "arm64", seed="arm64", docker=docker)
    doc = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "manifests": [
            amd64.descriptor(platform={"architecture": "amd64", "os": "linux"}),
            arm64.descriptor(platform={"architecture": "arm64", "os": "linux"}),
        ],
    }
    content = canonical(doc)
    reference = "multi" if by == "tag" else digest_of(content)
    assert await push_manifest(client, "app", reference, content, media_type) == digest_of(content)
    await _get(client, "app", reference, content, media_type)
    await _get(client, "app", digest_of(content), content, media_type)


@pytest.mark.parametrize("by", ["tag", "digest"])
async def test_artifact_with_custom_config_type(client: Client, by: str) -> None:
    config = b'{"tool": "example"}'
    await push_blob(client, "app", config)
    await push_blob(client, "app", b"sbom")
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": SBOM_TYPE,
        "config": descriptor("application/vnd.example.config.v1+json", config),
        "layers": [descriptor("application/spdx+json", b"sbom")],
    }
    content = canonical(doc)
    reference = "sbom" if by == "tag" else digest_of(content)
    await push_manifest(client, "app", reference, content, OCI_MANIFEST)
    await _get(client, "app", reference, content, OCI_MANIFEST)


@pytest.mark.parametrize("by", ["tag", "digest"])
async def test_artifact_with_subject(client: Client, by: str) -> None:
    image = await push_image(client, "app", "v1")
    content = await _artifact(client, "app", image)
    reference = "sig" if by == "tag" else digest_of(content)
    resp = await _put(client, "app", reference, content, OCI_MANIFEST)
    assert resp.status == 201, await resp.text()
    assert resp.headers["OCI-Subject"] == image.digest
    assert resp.headers["Docker-Content-Digest"] == digest_of(content)
    await _get(client, "app", reference, content, OCI_MANIFEST)


async def test_subject_may_be_pushed_later(client: Client) -> None:
    missing = Image("app", b'{"not": "pushed"}', OCI_MANIFEST, digest_of(b'{"not": "pushed"}'))
    content = await _artifact(client, "app", missing)
    resp = await _put(client, "app", digest_of(content), content, OCI_MANIFEST)
    assert resp.status == 201, await resp.text()
    assert resp.headers["OCI-Subject"] == missing.digest


async def test_index_with_subject_and_artifact_type(client: Client) -> None:
    image = await push_image(client, "app", "v1")
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "artifactType": SBOM_TYPE,
        "manifests": [image.descriptor()],
        "subject": image.descriptor(),
    }
    content = canonical(doc)
    resp = await _put(client, "app", "idx", content, OCI_INDEX)
    assert resp.status == 201, await resp.text()
    assert resp.headers["OCI-Subject"] == image.digest


async def test_stored_bytes_are_returned_unchanged(client: Client) -> None:
    await push_blob(client, "app", b"config")
    await push_blob(client, "app", b"layer")
    content = (
        b'{\n   "layers" : [ {"size":5, "digest": "%s",\t"mediaType":"%s"} ],\n'
        b'  "schemaVersion":   2,\r\n "config": {"mediaType": "%s", "size": 6,'
        b' "digest": "%s"}, "mediaType": "%s", "annotations": {"z": "1", "a": "\\u00e9"}\n}\n\n'
    ) % (
        digest_of(b"layer").encode(),
        OCI_LAYER.encode(),
        b"application/vnd.oci.image.config.v1+json",
        digest_of(b"config").encode(),
        OCI_MANIFEST.encode(),
    )
    digest = await push_manifest(client, "app", "odd", content, OCI_MANIFEST)
    assert digest == digest_of(content)
    await _get(client, "app", "odd", content, OCI_MANIFEST)
    await _get(client, "app", digest, content, OCI_MANIFEST)


@pytest.mark.parametrize(
    "header",
    [None, "application/json", "application/octet-stream", f"{OCI_MANIFEST}; charset=utf-8"],
)
async def test_media_type_from_the_body(client: Client, header: str | None) -> None:
    await push_blob(client, "app", b"config")
    doc = image_manifest(b"config", [])
    content = canonical(doc)
    resp = await _put(client, "app", "v1", content, header)
    assert resp.status == 201, await resp.text()
    await _get(client, "app", "v1", content, OCI_MANIFEST)


async def test_media_type_guessed_when_absent(client: Client) -> None:
    image = await push_image(client, "app", "v1")
    content = canonical({"schemaVersion": 2, "manifests": [image.descriptor()]})
    assert (await _put(client, "app", "idx", content, None)).status == 201
    await _get(client, "app", "idx", content, OCI_INDEX)


async def test_non_distributable_layers_need_no_blob(client: Client) -> None:
    await push_blob(client, "app", b"config")
    doc = image_manifest(b"config", [])
    doc["layers"] = [descriptor(OCI_LAYER, b"foreign", urls=["https://example.com/layer"])]
    assert (await _put(client, "app", "v1", canonical(doc), OCI_MANIFEST)).status == 201


async def test_sha512_manifest_digest(client: Client) -> None:
    image = await push_image(client, "app", "v1")
    digest = digest_of(image.manifest, "sha512")
    assert await push_manifest(client, "app", digest, image.manifest, OCI_MANIFEST) == digest
    resp = await client.get(f"/v2/app/manifests/{digest}")
    assert resp.status == 200
    assert resp.headers["Docker-Content-Digest"] == digest
    assert await resp.read() == image.manifest


async def test_if_none_match(client: Client) -> None:
    image = await push_image(client, "app", "v1")
    resp = await client.get("/v2/app/manifests/v1", headers={"If-None-Match": f'"{image.digest}"'})
    assert resp.status == 304
    assert resp.headers["Docker-Content-Digest"] == image.digest
    assert await resp.read() == b""
    resp = await client.get("/v2/app/manifests/v1", headers={"If-None-Match": '"other"'})
    assert resp.status == 200
    assert resp.headers["ETag"] == f'"{image.digest}"'


# -- tags ---------------------------------------------------------------------------------


async def test_put_by_digest_with_tags(client: Client) -> None:
    image = await push_image(client, "app", "v1")
    resp = await _put(
        client, "app", image.digest, image.manifest, OCI_MANIFEST, [("tag", "a"), ("tag", "b")]
    )
    assert resp.status == 201, await resp.text()
    assert resp.headers.getall("OCI-Tag") == ["a", "b"]
    assert resp.headers["Docker-Content-Digest"] == image.digest
    for tag in ("a", "b", "v1"):
        await _get(client, "app", tag, image.manifest, OCI_MANIFEST)
    resp = await client.get("/v2/app/tags/list")
    assert await resp.json() == {"name": "app", "tags": ["a", "b", "v1"]}


async def test_retag_moves_the_tag(client: Client) -> None:
    one = await push_image(client, "app", "latest", seed="one")
    two = await push_image(client, "app", "latest", seed="two")
    assert one.digest != two.digest
    await _get(client, "app", "latest", two.manifest, OCI_MANIFEST)
    await _get(client, "app", one.digest, one.manifest, OCI_MANIFEST)


@pytest.mark.parametrize("tag", ["-leading-dash", ".dot", "a" * 129, "a+b", "a!"])
async def test_invalid_tag(client: Client, tag: str) -> None:
    image = await push_image(client, "app", "v1")
    resp = await _put(client, "app", tag, image.manifest, OCI_MANIFEST)
    await assert_error(resp, 400, "TAG_INVALID")
    # No manifest can have such a tag: unknown, not invalid (see test_references.py).
    await assert_error(await client.get(f"/v2/app/manifests/{tag}"), 404, "MANIFEST_UNKNOWN")
    await assert_error(await client.head(f"/v2/app/manifests/{tag}"), 404, "MANIFEST_UNKNOWN")
    await assert_error(await client.delete(f"/v2/app/manifests/{tag}"), 400, "TAG_INVALID")
    resp = await client.get("/v2/app/tags/list")
    assert (await resp.json())["tags"] == ["v1"]


@pytest.mark.parametrize("tag", ["-leading-dash", "a" * 129, "has space", "a/b", "ä", "", "v1\n"])
async def test_invalid_tag_in_query(client: Client, tag: str) -> None:
    image = await push_image(client, "app", "v1")
    params = [("tag", "good"), ("tag", tag)]
    resp = await _put(client, "app", image.digest, image.manifest, OCI_MANIFEST, params)
    await assert_error(resp, 400, "TAG_INVALID")
    resp = await client.get("/v2/app/tags/list")
    assert (await resp.json())["tags"] == ["v1"]


# -- errors -------------------------------------------------------------------------------


async def test_unknown_manifest(client: Client) -> None:
    image = await push_image(client, "app", "v1")
    for repo, reference in [("app", "v2"), ("app", digest_of(b"x")), ("other", image.digest),
                            ("other", "v1")]:  # fmt: skip
        resp = await client.get(f"/v2/{repo}/manifests/{reference}")
        error = await assert_error(resp, 404, "MANIFEST_UNKNOWN")
        assert error["detail"] == {"reference": reference}
        resp = await client.head(f"/v2/{repo}/manifests/{reference}")
        await assert_error(resp, 404, "MANIFEST_UNKNOWN")


@pytest.mark.parametrize("reference", ["sha256:abc", "md5:" + "0" * 32, "sha256:" + "Z" * 64])
async def test_bad_digest_reference(client: Client, reference: str) -> None:
    resp = await client.get(f"/v2/app/manifests/{reference}")
    await assert_error(resp, 404, "MANIFEST_UNKNOWN")
    await assert_error(await client.delete(f"/v2/app/manifests/{reference}"), 400, "DIGEST_INVALID")
    image_doc = image_manifest(b"c", [])
    resp = await _put(client, "app", reference, canonical(image_doc), OCI_MANIFEST)
    await assert_error(resp, 400, "DIGEST_INVALID")


async def test_put_by_digest_that_does_not_match(client: Client) -> None:
    image = await push_image(client, "app", "v1")
    wrong = digest_of(image.manifest + b" ")
    resp = await _put(client, "app", wrong, image.manifest, OCI_MANIFEST)
    error = await assert_error(resp, 400, "DIGEST_INVALID")
    assert error["detail"] == {"digest": wrong}
    await assert_error(await client.get(f"/v2/app/manifests/{wrong}"), 404, "MANIFEST_UNKNOWN")


async def test_missing_blob(client: Client) -> None:
    await push_blob(client, "app", b"config")
    await push_blob(client, "other", b"layer")  # known to the registry, not to the repository
    doc = image_manifest(b"config", [b"layer"])
    resp = await _put(client, "app", "v1", canonical(doc), OCI_MANIFEST)
    error = await assert_error(resp, 400, "MANIFEST_BLOB_UNKNOWN")
    assert error["detail"] == [{"digest": digest_of(b"layer")}]
    await assert_error(await client.get("/v2/app/manifests/v1"), 404, "MANIFEST_UNKNOWN")


async def test_missing_config_blob(client: Client) -> None:
    await push_blob(client, "app", b"layer")
    doc = image_manifest(b"config", [b"layer"])
    resp = await _put(client, "app", "v1", canonical(doc), OCI_MANIFEST)
    error = await assert_error(resp, 400, "MANIFEST_BLOB_UNKNOWN")
    assert error["detail"] == [{"digest": digest_of(b"config")}]


@pytest.mark.parametrize("media_type", [OCI_INDEX, DOCKER_LIST])
async def test_missing_child_manifest(client: Client, media_type: str) -> None:
    image = await push_image(client, "app", "v1")
    other = await push_image(client, "other", "v1", seed="other")
    await push_blob(client, "app", b"a blob, not a manifest")
    doc = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "manifests": [
            image.descriptor(),
            other.descriptor(),
            descriptor(OCI_MANIFEST, b"a blob, not a manifest"),
        ],
    }
    resp = await _put(client, "app", "multi", canonical(doc), media_type)
    error = await assert_error(resp, 400, "MANIFEST_BLOB_UNKNOWN")
    assert error["detail"] == [
        {"digest": other.digest},
        {"digest": digest_of(b"a blob, not a manifest")},
    ]


async def test_manifest_too_large(client: Client) -> None:
    limit = 4 * 1024 * 1024
    await push_blob(client, "app", b"config")
    doc = image_manifest(b"config", [], annotations={"pad": ""})
    padding = limit + 1 - len(canonical(doc))
    doc["annotations"]["pad"] = "x" * padding
    content = canonical(doc)
    assert len(content) == limit + 1
    resp = await _put(client, "app", "big", content, OCI_MANIFEST)
    await assert_error(resp, 413, "SIZE_INVALID")
    await assert_error(await client.get("/v2/app/manifests/big"), 404, "MANIFEST_UNKNOWN")

    # Exactly at the limit is fine.
    doc["annotations"]["pad"] = "x" * (padding - 1)
    content = canonical(doc)
    assert len(content) == limit
    assert await push_manifest(client, "app", "big", content, OCI_MANIFEST) == digest_of(content)


async def test_manifest_limit_is_configurable(make_client: MakeClient, tmp_path: Path) -> None:
    client = await make_client(make_config(tmp_path, limits__manifest_max_bytes=1000))
    await push_blob(client, "app", b"config")
    doc = image_manifest(b"config", [], annotations={"pad": ""})
    doc["annotations"]["pad"] = "x" * (1000 - len(canonical(doc)))
    assert len(canonical(doc)) == 1000
    assert (await _put(client, "app", "v1", canonical(doc), OCI_MANIFEST)).status == 201
    doc["annotations"]["pad"] += "x"
    resp = await _put(client, "app", "v2", canonical(doc), OCI_MANIFEST)
    await assert_error(resp, 413, "SIZE_INVALID")


async def test_manifest_too_large_without_content_length(client: Client) -> None:
    content = b"{" + b" " * (5 * 1024 * 1024) + b"}"

    async def chunks() -> Any:
        for i in range(0, len(content), 65536):
            await asyncio.sleep(0)
            yield content[i : i + 65536]

    resp = await client.put(
        "/v2/app/manifests/big", data=chunks(), headers={"Content-Type": OCI_MANIFEST}
    )
    await assert_error(resp, 413, "SIZE_INVALID")


SCHEMA1 = canonical(
    {
        "schemaVersion": 1,
        "name": "app",
        "tag": "v1",
        "architecture": "amd64",
        "fsLayers": [{"blobSum": digest_of(b"layer")}],
        "history": [{"v1Compatibility": "{}"}],
        "signatures": [],
    }
)


@pytest.mark.parametrize(
    ("content", "media_type"),
    [
        (SCHEMA1, "application/vnd.docker.distribution.manifest.v1+prettyjws"),
        (SCHEMA1, "application/vnd.docker.distribution.manifest.v1+json"),
        (SCHEMA1, None),
        (b"not json", OCI_MANIFEST),
        (b"\xff\xfe{}", OCI_MANIFEST),
        (b"", OCI_MANIFEST),
        (b"[]", OCI_MANIFEST),
        (b'"text"', OCI_MANIFEST),
        (canonical({"schemaVersion": 2, "mediaType": 5}), None),
        (canonical({"mediaType": OCI_MANIFEST}), OCI_MANIFEST),
        (canonical({"schemaVersion": "2", "mediaType": OCI_MANIFEST}), OCI_MANIFEST),
        (canonical({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": []}), OCI_MANIFEST),
        (canonical({"schemaVersion": 2, "config": {}, "layers": []}), OCI_MANIFEST),
        (canonical({"schemaVersion": 2, "manifests": {}}), OCI_INDEX),
        (canonical({"schemaVersion": 2, "manifests": [{"digest": "x"}]}), OCI_INDEX),
    ],
)
async def test_invalid_manifest(client: Client, content: bytes, media_type: str | None) -> None:
    resp = await _put(client, "app", "v1", content, media_type)
    await assert_error(resp, 400, "MANIFEST_INVALID")
    await assert_error(await client.get("/v2/app/manifests/v1"), 404, "MANIFEST_UNKNOWN")


async def test_invalid_descriptors(client: Client) -> None:
    await push_blob(client, "app", b"config")
    good = descriptor(OCI_LAYER, b"config")
    bad_descriptors: list[Any] = [
        "not an object",
        {**good, "mediaType": ""},
        {**good, "digest": 5},
        {**good, "digest": "sha256:short"},
        {**good, "size": -1},
        {**good, "size": "5"},
        {**good, "size": True},
        {**good, "urls": "https://example.com"},
    ]
    for bad in bad_descriptors:
        doc = image_manifest(b"config", [])
        doc["layers"] = [bad]
        resp = await _put(client, "app", "v1", canonical(doc), OCI_MANIFEST)
        await assert_error(resp, 400, "MANIFEST_INVALID")
    doc = image_manifest(b"config", [], annotations={"a": 1})
    await assert_error(
        await _put(client, "app", "v1", canonical(doc), OCI_MANIFEST), 400, "MANIFEST_INVALID"
    )
    doc = image_manifest(b"config", [], artifactType=5)
    await assert_error(
        await _put(client, "app", "v1", canonical(doc), OCI_MANIFEST), 400, "MANIFEST_INVALID"
    )


@pytest.mark.parametrize(
    ("header", "declared"),
    [
        (DOCKER_MANIFEST, OCI_MANIFEST),
        (OCI_MANIFEST, DOCKER_MANIFEST),
        (OCI_INDEX, OCI_MANIFEST),
        (OCI_MANIFEST, OCI_INDEX),
    ],
)
async def test_content_type_does_not_match_media_type(
    client: Client, header: str, declared: str
) -> None:
    await push_blob(client, "app", b"config")
    doc = image_manifest(b"config", [])
    doc["mediaType"] = declared
    resp = await _put(client, "app", "v1", canonical(doc), header)
    await assert_error(resp, 400, "MANIFEST_INVALID")


@pytest.mark.parametrize(
    ("header", "declared"),
    [
        ("application/vnd.example.unknown+json", None),
        ("application/vnd.example.unknown+json", "application/vnd.example.unknown+json"),
        (None, "application/vnd.example.unknown+json"),
        ("application/vnd.oci.image.config.v1+json", None),
    ],
)
async def test_unknown_media_type(client: Client, header: str | None, declared: str | None) -> None:
    await push_blob(client, "app", b"config")
    doc = image_manifest(b"config", [])
    del doc["mediaType"]
    if declared is not None:
        doc["mediaType"] = declared
    resp = await _put(client, "app", "v1", canonical(doc), header)
    await assert_error(resp, 400, "MANIFEST_INVALID")
