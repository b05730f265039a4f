"""skopeo against a running ``regproxy serve``: push, inspect, pull back byte for byte."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import aiohttp
import pytest

from tests.e2e.images import (
    MT_OCI_INDEX,
    MT_OCI_MANIFEST,
    LayerSpec,
    OciImage,
    layout_ref_digest,
    make_oci_layout,
    read_layout_blobs,
)
from tests.e2e.procs import SKOPEO_BIN, RegproxyProcess, skopeo

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio]

MANIFEST_ACCEPT = ", ".join(
    [
        MT_OCI_MANIFEST,
        MT_OCI_INDEX,
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    ]
)
MiB = 1 << 20


def sha256_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture(autouse=True)
def _require_skopeo() -> None:
    if shutil.which(SKOPEO_BIN) is None:
        pytest.fail("skopeo missing: apt-get install -y skopeo")


async def skopeo_ok(*args: str) -> str:
    rc, out, err = await skopeo(*args)
    assert rc == 0, f"skopeo {' '.join(args)} exited {rc}:\n{err}"
    return out


async def fetch_manifest(server: RegproxyProcess, name: str, reference: str) -> tuple[str, bytes]:
    """(Docker-Content-Digest, body) of a manifest as regproxy serves it."""
    url = f"{server.url}/v2/{name}/manifests/{reference}"
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, headers={"Accept": MANIFEST_ACCEPT}) as resp,
    ):
        assert resp.status == 200, await resp.text()
        return resp.headers["Docker-Content-Digest"], await resp.read()


async def fetch_blob(server: RegproxyProcess, name: str, digest: str) -> bytes:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{server.url}/v2/{name}/blobs/{digest}") as resp,
    ):
        assert resp.status == 200, await resp.text()
        assert resp.headers["Docker-Content-Digest"] == digest
        return await resp.read()


def assert_same_layout(image: OciImage, copy_dir: Path) -> None:
    """The copied layout holds exactly the original blobs, byte for byte, under the same tag."""
    copied = read_layout_blobs(copy_dir)  # verifies every file against its digest
    assert copied == image.all_blobs
    for digest in copied:
        assert (copy_dir / "blobs" / "sha256" / digest[7:]).read_bytes() == image.read_blob(digest)
    assert layout_ref_digest(copy_dir, image.tag) == image.digest


def access_log(server: RegproxyProcess) -> list[dict[str, object]]:
    entries = []
    for line in server.log_path.read_text().splitlines():
        record = json.loads(line)  # the e2e servers log JSON lines
        if record["logger"] == "regproxy.access":
            entries.append(record)
    return entries


async def test_push_pull_multilayer_image(regproxy_server: RegproxyProcess, tmp_path: Path) -> None:
    server = regproxy_server
    image = make_oci_layout(
        tmp_path / "src", [LayerSpec(20 * MiB), LayerSpec(300_000), LayerSpec(1_000)], seed="ml"
    )
    assert len(image.manifests[0].layers) == 3
    dest = f"docker://{server.host}/e2e/single:v1"
    await skopeo_ok("copy", "--dest-tls-verify=false", image.ref(), dest)

    # inspect --raw gives the exact bytes that were pushed, and so does a plain GET
    raw = await skopeo_ok("inspect", "--raw", "--tls-verify=false", dest)
    assert raw.encode() == image.read_blob(image.digest)
    header_digest, body = await fetch_manifest(server, "e2e/single", "v1")
    assert header_digest == image.digest == sha256_of(body)
    for blob in image.blobs:
        assert await fetch_blob(server, "e2e/single", blob.digest) == image.read_blob(blob.digest)

    back = tmp_path / "back"
    await skopeo_ok("copy", "--src-tls-verify=false", dest, f"oci:{back}:{image.tag}")
    assert_same_layout(image, back)

    # docker:// -> docker:// inside regproxy: skopeo mounts every layer from e2e/single
    # (POST ?mount=&from= answered 201); it uploads the small config without trying a mount.
    other = f"docker://{server.host}/e2e/other:v2"
    await skopeo_ok("copy", "--src-tls-verify=false", "--dest-tls-verify=false", dest, other)
    header_digest, body = await fetch_manifest(server, "e2e/other", "v2")
    assert header_digest == image.digest and body == image.read_blob(image.digest)
    entries = access_log(server)
    to_other = [e for e in entries if str(e["path"]).startswith("/v2/e2e/other/blobs/uploads")]
    mounted = [e for e in to_other if e["method"] == "POST" and e["status"] == 201]
    layers = image.manifests[0].layers
    assert len(mounted) == len(layers), to_other
    assert len([e for e in to_other if e["method"] == "PUT"]) == 1, to_other
    for blob in image.blobs:
        assert await fetch_blob(server, "e2e/other", blob.digest) == image.read_blob(blob.digest)

    back_other = tmp_path / "back-other"
    await skopeo_ok("copy", "--src-tls-verify=false", other, f"oci:{back_other}:{image.tag}")
    assert_same_layout(image, back_other)


async def test_push_pull_two_platform_index(
    regproxy_server: RegproxyProcess, tmp_path: Path
) -> None:
    server = regproxy_server
    image = make_oci_layout(
        tmp_path / "src",
        [2 * MiB, 50_000],
        platforms=[("linux", "amd64"), ("linux", "arm64")],
        seed="idx",
    )
    assert image.is_index and len(set(image.manifest_digests)) == 2
    dest = f"docker://{server.host}/e2e/multi:v1"
    await skopeo_ok("copy", "--all", "--dest-tls-verify=false", image.ref(), dest)

    raw = await skopeo_ok("inspect", "--raw", "--tls-verify=false", dest)
    assert raw.encode() == image.read_blob(image.digest)
    header_digest, body = await fetch_manifest(server, "e2e/multi", "v1")
    assert header_digest == image.digest == sha256_of(body)
    assert json.loads(body)["mediaType"] == MT_OCI_INDEX
    for digest in image.manifest_digests:
        child_digest, child = await fetch_manifest(server, "e2e/multi", digest)
        assert child_digest == digest and child == image.read_blob(digest)
        raw = await skopeo_ok(
            "inspect", "--raw", "--tls-verify=false", f"docker://{server.host}/e2e/multi@{digest}"
        )
        assert raw.encode() == image.read_blob(digest)

    back = tmp_path / "back"
    await skopeo_ok("copy", "--all", "--src-tls-verify=false", dest, f"oci:{back}:{image.tag}")
    assert_same_layout(image, back)
