"""Build caches push and pull as the builders write them, byte for byte.

- kaniko ``--cache-repo``: a GET of ``<repo>/manifests/<64 hex cache key>`` per RUN step; a
  miss is a 404 MANIFEST_UNKNOWN (a 64-hex string is a valid tag), a hit an image.
- BuildKit ``type=registry`` cache, current form (``image-manifest=true``): an OCI image
  manifest whose config is the cache config (``application/vnd.buildkit.cacheconfig.v0``).
- BuildKit's older form (``image-manifest=false``): an OCI image index whose ``manifests``
  are the layer blobs and the cache-config blob, not manifests; with
  ``oci-mediatypes=false`` the same as a Docker manifest list of blobs.
- zstd layers, zero-layer manifests, non-distributable layers with ``urls`` (their blobs
  need not exist) and artifacts with the empty config (the 2-byte ``{}`` blob).

The documents are indented as Go's ``json.MarshalIndent(v, "", "  ")`` writes them (BuildKit's
export), so what comes back must be those bytes, not a re-serialisation.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import pytest

from regproxy.oci import Digest
from regproxy.tasks import HOSTED
from tests.helpers import (
    DOCKER_CONFIG,
    DOCKER_LAYER,
    DOCKER_LIST,
    DOCKER_MANIFEST,
    EMPTY_JSON,
    OCI_EMPTY,
    OCI_INDEX,
    OCI_LAYER,
    OCI_MANIFEST,
    Client,
    app_of,
    assert_error,
    digest_of,
    push_blob,
    push_manifest,
)

CACHE_CONFIG = "application/vnd.buildkit.cacheconfig.v0"
OCI_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_NONDISTRIBUTABLE = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
DOCKER_FOREIGN = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"


def go_json(doc: dict[str, Any]) -> bytes:
    """As Go's json.MarshalIndent(doc, "", "  "): two-space indent, no trailing newline."""
    return json.dumps(doc, indent=2).encode()


def layer_descriptor(media_type: str, data: bytes, created: str) -> dict[str, Any]:
    """A cache layer as BuildKit describes it: uncompressed digest and creation time."""
    return {
        "mediaType": media_type,
        "digest": digest_of(data),
        "size": len(data),
        "annotations": {
            "buildkit/createdat": created,
            "containerd.io/uncompressed": "sha256:" + hashlib.sha256(data[::-1]).hexdigest(),
        },
    }


def cache_config(layers: list[bytes]) -> bytes:
    records = [
        {"digest": "sha256:" + hashlib.sha256(bytes([i])).hexdigest(), "inputs": [[]]}
        for i in range(len(layers))
    ]
    doc = {
        "layers": [{"blob": digest_of(layer), "parent": i - 1} for i, layer in enumerate(layers)],
        "records": records,
    }
    return json.dumps(doc, separators=(",", ":")).encode()


async def _pull(client: Client, repo: str, reference: str, content: bytes, media_type: str) -> None:
    resp = await client.get(f"/v2/{repo}/manifests/{reference}", headers={"Accept": media_type})
    assert resp.status == 200, await resp.text()
    assert resp.headers["Content-Type"] == media_type
    assert resp.headers["Docker-Content-Digest"] == digest_of(content)
    assert await resp.read() == content


async def _pull_blobs(client: Client, repo: str, blobs: dict[str, bytes]) -> None:
    for digest, data in blobs.items():
        resp = await client.get(f"/v2/{repo}/blobs/{digest}")
        assert resp.status == 200, (digest, await resp.text())
        assert await resp.read() == data


async def _references(client: Client, repo: str, manifest: str) -> set[tuple[str, bool]]:
    """What the metadata records the manifest as referencing: (digest, is_manifest)."""
    meta: Any = app_of(client)[HOSTED].meta
    rows = await meta._all(
        "SELECT child, is_manifest FROM manifest_references WHERE repo = ? AND digest = ?",
        (repo, manifest),
    )
    return {(child, bool(is_manifest)) for child, is_manifest in rows}


# -- kaniko ---------------------------------------------------------------------------------


async def test_kaniko_cache_miss_then_hit(client: Client) -> None:
    key = hashlib.sha256(b"RUN apt-get update").hexdigest()
    for method in ("GET", "HEAD"):
        resp = await client.request(method, f"/v2/team/app/cache/manifests/{key}")
        error = await assert_error(resp, 404, "MANIFEST_UNKNOWN")
        assert method == "HEAD" or error["detail"] == {"reference": key}
    # kaniko then pushes the layer as a one-layer Docker image tagged with the key.
    config = b'{"architecture":"amd64","config":{},"os":"linux","rootfs":{"type":"layers"}}'
    layer = os.urandom(3000)
    blobs = {await push_blob(client, "team/app/cache", data): data for data in (config, layer)}
    doc = {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": {"mediaType": DOCKER_CONFIG, "size": len(config), "digest": digest_of(config)},
        "layers": [{"mediaType": DOCKER_LAYER, "size": len(layer), "digest": digest_of(layer)}],
    }
    content = json.dumps(doc, separators=(",", ":")).encode()
    await push_manifest(client, "team/app/cache", key, content, DOCKER_MANIFEST)
    await _pull(client, "team/app/cache", key, content, DOCKER_MANIFEST)
    await _pull_blobs(client, "team/app/cache", blobs)


# -- BuildKit -------------------------------------------------------------------------------


async def _push_cache_blobs(client: Client, repo: str, layer_type: str) -> tuple[
    dict[str, bytes], list[dict[str, Any]], dict[str, Any]
]:  # fmt: skip
    layers = [os.urandom(2000 + i) for i in range(3)]
    config = cache_config(layers)
    blobs = {}
    for data in (*layers, config):
        blobs[await push_blob(client, repo, data)] = data
    created = "2025-03-04T05:06:07.123456789Z"
    descriptors = [layer_descriptor(layer_type, data, created) for data in layers]
    config_descriptor = {
        "mediaType": CACHE_CONFIG,
        "digest": digest_of(config),
        "size": len(config),
    }
    return blobs, descriptors, config_descriptor


async def test_buildkit_cache_as_image_manifest(client: Client) -> None:
    repo = "bk/cache"
    blobs, layers, config = await _push_cache_blobs(client, repo, OCI_LAYER)
    doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config, "layers": layers}
    content = go_json(doc)
    digest = await push_manifest(client, repo, "cache", content, OCI_MANIFEST)
    await _pull(client, repo, "cache", content, OCI_MANIFEST)
    await _pull(client, repo, digest, content, OCI_MANIFEST)
    await _pull_blobs(client, repo, blobs)
    assert await _references(client, repo, digest) == {(d, False) for d in blobs}


@pytest.mark.parametrize(
    ("index_type", "layer_type"), [(OCI_INDEX, OCI_LAYER), (DOCKER_LIST, DOCKER_LAYER)]
)
async def test_buildkit_cache_as_index_of_blobs(
    client: Client, index_type: str, layer_type: str
) -> None:
    """image-manifest=false (oci-mediatypes=true: an OCI index; false: a Docker list)."""
    repo = "bk/cache"
    blobs, layers, config = await _push_cache_blobs(client, repo, layer_type)
    doc = {"schemaVersion": 2, "mediaType": index_type, "manifests": [*layers, config]}
    content = go_json(doc)
    digest = await push_manifest(client, repo, "index", content, index_type)
    await _pull(client, repo, "index", content, index_type)
    await _pull_blobs(client, repo, blobs)
    # Recorded as blob references: GC keeps the blobs, nothing is expected as a manifest.
    assert await _references(client, repo, digest) == {(d, False) for d in blobs}
    meta = app_of(client)[HOSTED].meta
    for blob in blobs:  # referenced by the index: not deletable as unused
        assert await meta.delete_blob_if_unused(Digest.parse(blob)) is None


async def test_index_of_blobs_needs_the_blobs(client: Client) -> None:
    repo = "bk/cache"
    _, layers, config = await _push_cache_blobs(client, repo, OCI_LAYER)
    missing = layer_descriptor(OCI_LAYER, b"never pushed", "2025-01-01T00:00:00Z")
    doc = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [*layers, config, missing]}
    resp = await client.put(
        f"/v2/{repo}/manifests/index", data=go_json(doc), headers={"Content-Type": OCI_INDEX}
    )
    error = await assert_error(resp, 400, "MANIFEST_BLOB_UNKNOWN")
    assert error["detail"] == [{"digest": missing["digest"]}]


async def test_mixed_index_checks_each_entry_as_its_media_type(client: Client) -> None:
    """A manifest-typed entry must be a manifest in the repository, a blob-typed one a blob:
    the same digest pushed as the other kind does not count."""
    repo = "bk/mixed"
    config = b"{}"
    await push_blob(client, repo, config)
    image = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_EMPTY, "digest": digest_of(config), "size": 2},
        "layers": [],
    }
    image_bytes = go_json(image)
    image_digest = await push_manifest(client, repo, "img", image_bytes, OCI_MANIFEST)
    blob = os.urandom(100)
    blob_digest = await push_blob(client, repo, blob)
    entries = [
        {"mediaType": OCI_MANIFEST, "digest": image_digest, "size": len(image_bytes)},
        {"mediaType": OCI_LAYER, "digest": blob_digest, "size": len(blob)},
    ]
    doc = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
    content = go_json(doc)
    digest = await push_manifest(client, repo, "mixed", content, OCI_INDEX)
    assert await _references(client, repo, digest) == {(image_digest, True), (blob_digest, False)}
    # Swapped kinds: the manifest is no blob, the blob no manifest.
    entries[0]["mediaType"], entries[1]["mediaType"] = OCI_LAYER, OCI_MANIFEST
    resp = await client.put(
        f"/v2/{repo}/manifests/swapped", data=go_json(doc), headers={"Content-Type": OCI_INDEX}
    )
    error = await assert_error(resp, 400, "MANIFEST_BLOB_UNKNOWN")
    assert sorted(d["digest"] for d in error["detail"]) == sorted([image_digest, blob_digest])


# -- other shapes ---------------------------------------------------------------------------


async def test_zstd_layers(client: Client) -> None:
    repo = "shapes/zstd"
    config = b'{"architecture":"arm64","os":"linux"}'
    layers = [os.urandom(500), os.urandom(700)]
    blobs = {await push_blob(client, repo, d): d for d in (config, *layers)}
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": digest_of(config), "size": len(config)},
        "layers": [{"mediaType": OCI_ZSTD, "digest": digest_of(d), "size": len(d)}
                   for d in layers],
    }  # fmt: skip
    content = go_json(doc)
    digest = await push_manifest(client, repo, "zstd", content, OCI_MANIFEST)
    await _pull(client, repo, digest, content, OCI_MANIFEST)
    await _pull_blobs(client, repo, blobs)


@pytest.mark.parametrize("docker", [False, True])
async def test_zero_layer_manifest(client: Client, docker: bool) -> None:
    repo = "shapes/empty"
    config = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'
    await push_blob(client, repo, config)
    media_type = DOCKER_MANIFEST if docker else OCI_MANIFEST
    config_type = DOCKER_CONFIG if docker else "application/vnd.oci.image.config.v1+json"
    doc = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": {"mediaType": config_type, "digest": digest_of(config), "size": len(config)},
        "layers": [],
    }
    content = go_json(doc)
    digest = await push_manifest(client, repo, "scratch", content, media_type)
    await _pull(client, repo, "scratch", content, media_type)
    assert await _references(client, repo, digest) == {(digest_of(config), False)}


@pytest.mark.parametrize(
    ("media_type", "layer_type"),
    [(OCI_MANIFEST, OCI_NONDISTRIBUTABLE), (DOCKER_MANIFEST, DOCKER_FOREIGN)],
)
async def test_non_distributable_layers_need_not_exist(
    client: Client, media_type: str, layer_type: str
) -> None:
    repo = "shapes/windows"
    config = b'{"architecture":"amd64","os":"windows"}'
    layer = os.urandom(400)
    blobs = {await push_blob(client, repo, d): d for d in (config, layer)}
    foreign = {
        "mediaType": layer_type,
        "digest": "sha256:" + "ab" * 32,  # never pushed: it lives at its URL
        "size": 1234567,
        "urls": ["https://mcr.microsoft.com/v2/windows/servercore/blobs/sha256:" + "ab" * 32],
    }
    doc = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": {"mediaType": DOCKER_CONFIG, "digest": digest_of(config), "size": len(config)},
        "layers": [foreign, {"mediaType": OCI_LAYER, "digest": digest_of(layer), "size": 400}],
    }
    content = go_json(doc)
    digest = await push_manifest(client, repo, "ltsc", content, media_type)
    await _pull(client, repo, digest, content, media_type)
    await _pull_blobs(client, repo, blobs)
    assert await _references(client, repo, digest) == {(d, False) for d in blobs}


async def test_artifact_with_the_empty_config(client: Client) -> None:
    repo = "shapes/artifacts"
    assert await push_blob(client, repo, EMPTY_JSON) == (
        "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
    )
    payload = b"helm chart or sbom bytes"
    blobs = {digest_of(EMPTY_JSON): EMPTY_JSON, await push_blob(client, repo, payload): payload}
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": "application/vnd.example.sbom.v1",
        "config": {"mediaType": OCI_EMPTY, "digest": digest_of(EMPTY_JSON), "size": 2,
                   "data": "e30="},
        "layers": [{"mediaType": "application/spdx+json", "digest": digest_of(payload),
                    "size": len(payload),
                    "annotations": {"org.opencontainers.image.title": "sbom.spdx.json"}}],
    }  # fmt: skip
    content = go_json(doc)
    digest = await push_manifest(client, repo, "sbom", content, OCI_MANIFEST)
    await _pull(client, repo, digest, content, OCI_MANIFEST)
    await _pull_blobs(client, repo, blobs)
