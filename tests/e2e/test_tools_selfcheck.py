"""Self-checks of the e2e infrastructure alone (no regproxy involved).

They prove that the image builders make images real tools accept, and that docker-registry,
dockerd, containerd, podman and skopeo can be started, driven and stopped from tests, all on
127.0.0.1 (or unix sockets in the tests' directories).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import aiohttp
import pytest

from tests.e2e.images import (
    MT_OCI_INDEX,
    MT_OCI_MANIFEST,
    OciImage,
    layout_ref_digest,
    make_docker_archive,
    make_oci_layout,
    read_layout_blobs,
)
from tests.e2e.procs import (
    CONTAINERD_BIN,
    DOCKER_REGISTRY_BIN,
    DOCKERD_BIN,
    PODMAN_BIN,
    SKOPEO_BIN,
    RegistryProcess,
    containerd,
    docker_registry,
    dockerd,
    podman,
    skopeo,
)

pytestmark = pytest.mark.e2e

MANIFEST_ACCEPT = ", ".join(
    [
        MT_OCI_MANIFEST,
        MT_OCI_INDEX,
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    ]
)
PUSH_DIGEST_RE = re.compile(r"digest: (sha256:[0-9a-f]{64}) size: \d+")


def require(binary: str) -> None:
    if shutil.which(binary) is None:
        pytest.fail(f"{binary} missing: apt-get install -y skopeo docker-registry docker.io")


async def skopeo_ok(*args: str) -> str:
    rc, out, err = await skopeo(*args)
    assert rc == 0, f"skopeo {' '.join(args)} exited {rc}:\n{err}"
    return out


def basic_auth(user: str, password: str) -> dict[str, str]:
    return {"Authorization": aiohttp.encode_basic_auth(user, password)}


async def fetch_manifest(
    registry: RegistryProcess, name: str, reference: str, headers: dict[str, str] | None = None
) -> tuple[str, bytes]:
    """(Docker-Content-Digest header, body) of a manifest, straight from the registry."""
    url = f"{registry.url}/v2/{name}/manifests/{reference}"
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, headers={"Accept": MANIFEST_ACCEPT, **(headers or {})}) as resp,
    ):
        assert resp.status == 200, await resp.text()
        return resp.headers["Docker-Content-Digest"], await resp.read()


def assert_same_layout(image: OciImage, copy_dir: Path) -> None:
    """The copied layout has exactly the original blobs, byte for byte, under the same tag."""
    assert read_layout_blobs(copy_dir) == image.all_blobs
    assert layout_ref_digest(copy_dir, image.tag) == image.digest


def sha256_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.mark.asyncio
async def test_skopeo_oci_single_platform_roundtrip(tmp_path: Path) -> None:
    require(SKOPEO_BIN)
    require(DOCKER_REGISTRY_BIN)
    image = make_oci_layout(tmp_path / "src", [300_000, 40_000, 0])
    async with docker_registry(tmp_path / "registry") as registry:
        dest = f"docker://{registry.host}/selfcheck/single:v1"
        await skopeo_ok("copy", "--dest-tls-verify=false", image.ref(), dest)

        raw = await skopeo_ok("inspect", "--raw", "--tls-verify=false", dest)
        assert sha256_of(raw.encode()) == image.digest
        header_digest, body = await fetch_manifest(registry, "selfcheck/single", "v1")
        assert header_digest == image.digest == sha256_of(body)

        await skopeo_ok("copy", "--src-tls-verify=false", dest, f"oci:{tmp_path / 'back'}:latest")
    assert_same_layout(image, tmp_path / "back")


@pytest.mark.asyncio
async def test_skopeo_oci_index_all_roundtrip(tmp_path: Path) -> None:
    require(SKOPEO_BIN)
    require(DOCKER_REGISTRY_BIN)
    image = make_oci_layout(
        tmp_path / "src", [100_000, 20_000], platforms=[("linux", "amd64"), ("linux", "arm64")]
    )
    assert image.is_index and len(set(image.manifest_digests)) == 2
    async with docker_registry(tmp_path / "registry") as registry:
        dest = f"docker://{registry.host}/selfcheck/multi:v1"
        await skopeo_ok("copy", "--all", "--dest-tls-verify=false", image.ref(), dest)

        header_digest, body = await fetch_manifest(registry, "selfcheck/multi", "v1")
        assert header_digest == image.digest == sha256_of(body)
        assert json.loads(body)["mediaType"] == MT_OCI_INDEX
        for digest in image.manifest_digests:
            assert (await fetch_manifest(registry, "selfcheck/multi", digest))[0] == digest

        back = tmp_path / "back"
        await skopeo_ok("copy", "--all", "--src-tls-verify=false", dest, f"oci:{back}:latest")
    assert_same_layout(image, back)


@pytest.mark.asyncio
async def test_registry_htpasswd_auth(tmp_path: Path) -> None:
    require(SKOPEO_BIN)
    require(DOCKER_REGISTRY_BIN)
    image = make_oci_layout(tmp_path / "src", [50_000])
    async with docker_registry(tmp_path / "registry", htpasswd={"alice": "s3cret-pw"}) as registry:
        dest = f"docker://{registry.host}/selfcheck/auth:v1"
        rc, _, _ = await skopeo("copy", "--dest-tls-verify=false", image.ref(), dest)
        assert rc != 0, "push without credentials must be refused"
        await skopeo_ok(
            "copy", "--dest-tls-verify=false", "--dest-creds=alice:s3cret-pw", image.ref(), dest
        )
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{registry.url}/v2/") as resp:
                assert resp.status == 401
            async with session.get(
                f"{registry.url}/v2/", headers=basic_auth("alice", "wrong")
            ) as resp:
                assert resp.status == 401
        auth = basic_auth("alice", "s3cret-pw")
        assert (await fetch_manifest(registry, "selfcheck/auth", "v1", auth))[0] == image.digest


@pytest.mark.asyncio
async def test_registry_pull_through(tmp_path: Path) -> None:
    """A registry in proxy mode serves what its upstream holds, byte for byte."""
    require(SKOPEO_BIN)
    require(DOCKER_REGISTRY_BIN)
    image = make_oci_layout(
        tmp_path / "src", [60_000], platforms=[("linux", "amd64"), ("linux", "arm64")]
    )
    back = tmp_path / "back"
    async with docker_registry(tmp_path / "upstream") as upstream:
        dest = f"docker://{upstream.host}/selfcheck/cached:v1"
        await skopeo_ok("copy", "--all", "--dest-tls-verify=false", image.ref(), dest)
        async with docker_registry(tmp_path / "cache", proxy_remote_url=upstream.url) as cache:
            via_cache = f"docker://{cache.host}/selfcheck/cached:v1"
            await skopeo_ok(
                "copy", "--all", "--src-tls-verify=false", via_cache, f"oci:{back}:latest"
            )
            assert (await fetch_manifest(cache, "selfcheck/cached", "v1"))[0] == image.digest
    assert "Registry configured as a proxy cache" in cache.log_path.read_text()
    assert_same_layout(image, back)


async def push_digest(daemon_out: str) -> str:
    match = PUSH_DIGEST_RE.search(daemon_out)
    assert match, f"no digest in docker push output:\n{daemon_out}"
    return match.group(1)


@pytest.mark.asyncio
async def test_dockerd_load_push_pull_and_mirror(tmp_path: Path) -> None:
    require(DOCKERD_BIN)
    require(DOCKER_REGISTRY_BIN)
    archive = make_docker_archive(tmp_path / "image.tar", [200_000, 30_000], "selfcheck/app:v1")
    async with (
        docker_registry(tmp_path / "registry") as registry,
        dockerd(tmp_path / "dockerd", [registry.host], [registry.url]) as docker,
    ):
        loaded = await docker.check("load", "-i", str(archive.path))
        assert "selfcheck/app:v1" in loaded
        image_id = await docker.check("image", "inspect", "-f", "{{.Id}}", archive.repo_tag)
        assert image_id.strip() == archive.image_id

        target = f"{registry.host}/selfcheck/app:v1"
        await docker.check("tag", archive.repo_tag, target)
        digest = await push_digest(await docker.check("push", target))
        header_digest, body = await fetch_manifest(registry, "selfcheck/app", "v1")
        assert header_digest == digest
        assert json.loads(body)["config"]["digest"] == archive.image_id

        await docker.check("rmi", target, archive.repo_tag)
        rc, _, _ = await docker.run("image", "inspect", archive.image_id)
        assert rc != 0, "image should be gone after rmi"

        await docker.check("pull", target)
        inspected = json.loads(await docker.check("image", "inspect", target))[0]
        assert inspected["Id"] == archive.image_id
        assert inspected["RepoDigests"] == [f"{registry.host}/selfcheck/app@{digest}"]

        # --registry-mirror: a docker.io name is fetched from our registry instead.
        mirrored = f"{registry.host}/library/selfcheck-mirror:v1"
        await docker.check("tag", target, mirrored)
        mirror_digest = await push_digest(await docker.check("push", mirrored))
        await docker.check("rmi", target, mirrored)
        await docker.check("pull", "selfcheck-mirror:v1")
        inspected = json.loads(await docker.check("image", "inspect", "selfcheck-mirror:v1"))[0]
        assert inspected["Id"] == archive.image_id
        assert inspected["RepoDigests"] == [f"selfcheck-mirror@{mirror_digest}"]
    assert "/v2/library/selfcheck-mirror/manifests/v1" in registry.log_path.read_text()


@pytest.mark.asyncio
async def test_containerd_pull_and_clean_stop(tmp_path: Path) -> None:
    require(CONTAINERD_BIN)
    require(DOCKER_REGISTRY_BIN)
    image = make_oci_layout(tmp_path / "src", [100_000, 2_000], tag="v1", seed="selfcheck-ctr")
    async with docker_registry(tmp_path / "registry") as registry:
        ref = f"{registry.host}/selfcheck/ctr:v1"
        await skopeo_ok("copy", "--dest-tls-verify=false", image.ref(), f"docker://{ref}")
        async with containerd(tmp_path / "containerd") as daemon:
            await daemon.ctr_check(
                "images", "pull", "--plain-http", "--platform", "linux/amd64", ref
            )
            listed = await daemon.ctr_check("images", "ls", f"name=={ref}")
            assert image.digest in listed, listed
            # content is isolated per namespace: another one has none of it
            assert (await daemon.ctr_check("content", "ls", "--quiet", namespace="other")) == ""
        assert not daemon.process.alive()  # stopped (and reaped) by its PID
        assert not daemon.socket_path.parent.exists() and not daemon.root.exists()


@pytest.mark.asyncio
async def test_podman_pull_and_clean_stop(tmp_path: Path) -> None:
    require(PODMAN_BIN)
    require(DOCKER_REGISTRY_BIN)
    image = make_oci_layout(tmp_path / "src", [100_000, 2_000], tag="v1", seed="selfcheck-pm")
    async with docker_registry(tmp_path / "registry") as registry:
        ref = f"{registry.host}/selfcheck/podman:v1"
        await skopeo_ok("copy", "--dest-tls-verify=false", image.ref(), f"docker://{ref}")
        async with podman(tmp_path / "podman") as tool:
            policy = str(tool.policy_path)
            await tool.check("pull", "--signature-policy", policy, "--tls-verify=false", ref)
            inspected = json.loads(await tool.check("image", "inspect", ref))[0]
            assert inspected["Digest"] == image.digest
            info = json.loads(await tool.check("info", "--format", "json"))
            assert info["store"]["graphRoot"] == str(tool.root)
            assert info["store"]["graphDriverName"] == "vfs"
            run_dir = tool.runroot.parent
        assert not tool.root.exists() and not run_dir.exists()
