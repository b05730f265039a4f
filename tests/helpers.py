"""Helpers shared by the handler tests: configs, digests, manifests, pushes and error bodies."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient, TestServer

from regproxy.config import Config, load_config

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
EMPTY_JSON = b"{}"

Client = TestClient[Any, Any]


def app_of(client: Client) -> web.Application:
    """The application a test client talks to."""
    server = client.server
    assert isinstance(server, TestServer)
    return server.app


def make_config(tmp_path: Path, **overrides: Any) -> Config:
    """A configuration with its data under ``tmp_path/data``.

    Keys are dotted config keys; ``__`` stands for the dot so they can be keyword arguments
    (``uploads__max_age=0.1``).
    """
    values: dict[str, Any] = {"data_dir": str(tmp_path / "data"), "storage.fsync": False}
    values.update({key.replace("__", "."): value for key, value in overrides.items()})
    return load_config(None, env={}, overrides=values)


def digest_of(data: bytes, algorithm: str = "sha256") -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def canonical(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


def descriptor(media_type: str, data: bytes, **extra: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": digest_of(data), "size": len(data), **extra}


async def error_code(resp: ClientResponse, status: int) -> dict[str, Any]:
    """Assert an error response with ``status`` in the spec's JSON shape; return its error.

    A HEAD response has no body: only its status is checked, and that it has no body.
    """
    assert resp.status == status, (resp.status, await resp.text())
    if resp.method == "HEAD":
        assert await resp.read() == b""
        return {}
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert isinstance(body["errors"], list) and len(body["errors"]) == 1
    error: dict[str, Any] = body["errors"][0]
    assert isinstance(error["code"], str) and isinstance(error["message"], str)
    return error


async def assert_error(resp: ClientResponse, status: int, code: str) -> dict[str, Any]:
    error = await error_code(resp, status)
    assert resp.method == "HEAD" or error["code"] == code, error
    return error


async def push_blob(client: Client, repo: str, data: bytes, algorithm: str = "sha256") -> str:
    """Push ``data`` with a single monolithic POST; returns its digest."""
    digest = digest_of(data, algorithm)
    resp = await client.post(f"/v2/{repo}/blobs/uploads/", params={"digest": digest}, data=data)
    assert resp.status == 201, await resp.text()
    assert resp.headers["Docker-Content-Digest"] == digest
    assert resp.headers["Location"] == f"/v2/{repo}/blobs/{digest}"
    return digest


async def start_upload(client: Client, repo: str, **params: str) -> str:
    """Open an upload session; returns its Location path."""
    resp = await client.post(f"/v2/{repo}/blobs/uploads/", params=params)
    assert resp.status == 202, await resp.text()
    location = resp.headers["Location"]
    assert location == f"/v2/{repo}/blobs/uploads/{resp.headers['Docker-Upload-UUID']}"
    assert resp.headers["Range"] == "0-0"
    return location


async def push_manifest(
    client: Client,
    repo: str,
    reference: str,
    content: bytes | dict[str, Any],
    media_type: str | None = None,
    *,
    tags: tuple[str, ...] = (),
) -> str:
    """PUT a manifest; returns the digest the registry reports (checked against the bytes)."""
    if isinstance(content, dict):
        media_type = media_type or content.get("mediaType")
        content = canonical(content)
    headers = {"Content-Type": media_type} if media_type else {}
    params = [("tag", tag) for tag in tags]
    resp = await client.put(
        f"/v2/{repo}/manifests/{reference}", data=content, headers=headers, params=params
    )
    assert resp.status == 201, await resp.text()
    algorithm = reference.split(":", 1)[0] if ":" in reference else "sha256"
    digest = digest_of(content, algorithm)
    assert resp.headers["Docker-Content-Digest"] == digest
    assert resp.headers["Location"] == f"/v2/{repo}/manifests/{digest}"
    return digest


@dataclass
class Image:
    """A pushed single-platform image: its manifest bytes and the blobs it references."""

    repo: str
    manifest: bytes
    media_type: str
    digest: str
    blobs: dict[str, bytes] = field(default_factory=dict)

    def descriptor(self, **extra: Any) -> dict[str, Any]:
        return descriptor(self.media_type, self.manifest, **extra)


def image_manifest(
    config: bytes,
    layers: list[bytes],
    *,
    docker: bool = False,
    **extra: Any,
) -> dict[str, Any]:
    config_type = DOCKER_CONFIG if docker else OCI_CONFIG
    layer_type = DOCKER_LAYER if docker else OCI_LAYER
    return {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST if docker else OCI_MANIFEST,
        "config": descriptor(config_type, config),
        "layers": [descriptor(layer_type, layer) for layer in layers],
        **extra,
    }


async def push_image(
    client: Client,
    repo: str,
    reference: str,
    *,
    seed: str = "a",
    docker: bool = False,
    **extra: Any,
) -> Image:
    """Push a config blob, one layer and an image manifest referencing them."""
    config = canonical({"architecture": "amd64", "os": "linux", "seed": seed})
    layer = f"layer bytes for {seed}".encode() * 10
    blobs = {}
    for data in (config, layer):
        blobs[await push_blob(client, repo, data)] = data
    doc = image_manifest(config, [layer], docker=docker, **extra)
    content = canonical(doc)
    digest = await push_manifest(client, repo, reference, content, doc["mediaType"])
    return Image(repo, content, doc["mediaType"], digest, blobs)


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())
