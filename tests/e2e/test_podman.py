"""podman against ``regproxy serve``: a ``registries.conf`` mirror and a push.

A ``[[registry.mirror]]`` with ``location = "<regproxy>/<upstream name>"`` (regproxy's prefix
form) makes ``podman pull <upstream-host>/<repo>:<tag>`` ask regproxy for
``<upstream name>/<repo>`` first, and the upstream itself only if the mirror fails. podman
runs rootful with private storage and configuration (see :func:`tests.e2e.procs.podman`).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest

from tests.e2e.images import (
    LayerSpec,
    OciImage,
    make_docker_archive,
    make_oci_layout,
)
from tests.e2e.procs import (
    PODMAN_BIN,
    SKOPEO_BIN,
    Podman,
    RegistryProcess,
    docker_registry,
    podman,
    regproxy,
    skopeo,
    write_htpasswd,
)

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio]

MiB = 1 << 20
PLATFORM = "linux/amd64"  # what images.py builds; pinned so an arm64 host pulls it too
# distribution's access log (combined format): "GET /v2/... HTTP/1.1" 200 size "referer" "UA"
ACCESS_RE = re.compile(r'"(GET|HEAD) (/v2/\S+) HTTP/[\d.]+" (\d{3}) \S+ "[^"]*" "([^"]*)"')


@pytest.fixture(autouse=True)
def _require_tools() -> None:
    for tool in (PODMAN_BIN, SKOPEO_BIN):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} missing: apt-get install -y podman skopeo")


def sha256_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def skopeo_ok(*args: str) -> str:
    rc, out, err = await skopeo(*args)
    assert rc == 0, f"skopeo {' '.join(args)} exited {rc}:\n{err}"
    return out


def mirror_conf(registry_host: str, mirror: str) -> str:
    """registries.conf v2: ``registry_host`` (plain http) with one plain-http mirror."""
    return (
        "unqualified-search-registries = []\n"
        "[[registry]]\n"
        f'prefix = "{registry_host}"\n'
        f'location = "{registry_host}"\n'
        "insecure = true\n"
        "[[registry.mirror]]\n"
        f'location = "{mirror}"\n'
        "insecure = true\n"
    )


async def pull(tool: Podman, ref: str, *extra: str) -> None:
    await tool.check("pull", "--signature-policy", str(tool.policy_path), *extra, ref)


async def inspect(tool: Podman, ref: str) -> dict[str, object]:
    found = json.loads(await tool.check("image", "inspect", ref))
    assert len(found) == 1, found
    return dict(found[0])


async def assert_pulled(tool: Podman, ref: str, image: OciImage) -> None:
    """podman stored ``ref`` as ``image``: manifest digest, image ID and layer diff IDs."""
    inspected = await inspect(tool, ref)
    platform = image.manifests[0]
    assert inspected["Digest"] == image.digest
    assert inspected["Id"] == platform.config.digest.removeprefix("sha256:")
    repo = ref.rsplit(":", 1)[0]
    assert f"{repo}@{image.digest}" in list(inspected["RepoDigests"]), inspected  # type: ignore[call-overload]
    assert inspected["RootFS"] == {"Type": "layers", "Layers": list(platform.diff_ids)}


def upstream_requests(upstream: RegistryProcess) -> list[tuple[str, str, int, str]]:
    """(method, path, status, user agent) of every /v2/ request the upstream logged."""
    text = upstream.log_path.read_text(errors="replace")
    return [(m[1], m[2], int(m[3]), m[4]) for m in ACCESS_RE.finditer(text)]


async def test_podman_pull_through_registries_conf_mirror(tmp_path: Path) -> None:
    image = make_oci_layout(
        tmp_path / "src",
        [LayerSpec(2 * MiB), LayerSpec(200_000), LayerSpec(1_000)],
        tag="v1",
        seed="podman-mirror",
    )
    async with docker_registry(tmp_path / "upstream") as upstream:
        await skopeo_ok(
            "copy",
            "--dest-tls-verify=false",
            image.ref(),
            f"docker://{upstream.host}/e2e/podman:v1",
        )
        pushed = len(upstream_requests(upstream))
        config = f'[upstreams."up"]\nurl = "{upstream.url}"\n'
        async with (
            regproxy(tmp_path / "proxy", config=config) as proxy,
            podman(tmp_path / "podman") as tool,
        ):
            # The registry's own location is the real upstream: podman would fall back to it
            # if the mirror failed, so the upstream's log (user agents) shows who fetched what.
            tool.write_registries_conf(mirror_conf(upstream.host, f"{proxy.host}/up"))
            ref = f"{upstream.host}/e2e/podman:v1"
            await pull(tool, ref, "--platform", PLATFORM)
            await assert_pulled(tool, ref, image)

            sent = upstream_requests(upstream)[pushed:]
            assert sent, "the upstream saw no request"
            assert all("containers/" not in agent for *_, agent in sent), sent
            blob_gets = [
                path for method, path, _, _ in sent if method == "GET" and "/blobs/" in path
            ]
            assert sorted(blob_gets) == sorted(
                f"/v2/e2e/podman/blobs/{b.digest}" for b in image.blobs
            )
            log = proxy.log_path.read_text(errors="replace")
            for blob in image.blobs:
                assert f'"path":"/v2/up/e2e/podman/blobs/{blob.digest}","status":200' in log

            # With the upstream gone, fresh storage pulls the same image from regproxy's cache.
            await upstream.process.stop()
            async with podman(tmp_path / "podman-2") as second:
                second.write_registries_conf(mirror_conf(upstream.host, f"{proxy.host}/up"))
                await pull(second, ref, "--platform", PLATFORM)
                await assert_pulled(second, ref, image)


async def test_podman_push_to_hosted_repository(tmp_path: Path) -> None:
    archive = make_docker_archive(
        tmp_path / "image.tar", [2 * MiB, 100_000], "pm-push:v1", seed="podman-push"
    )
    async with regproxy(tmp_path / "proxy") as proxy, podman(tmp_path / "podman") as tool:
        await tool.check("load", "--input", str(archive.path))
        local = "localhost/pm-push:v1"
        assert (await inspect(tool, local))["Id"] == archive.image_id.removeprefix("sha256:")
        ref = f"{proxy.host}/hosted/podman:v1"
        digest_file = tmp_path / "digest"
        await tool.check(
            "push",
            "--signature-policy",
            str(tool.policy_path),
            "--tls-verify=false",
            "--digestfile",
            str(digest_file),
            local,
            f"docker://{ref}",
        )
        digest = digest_file.read_text().strip()

        # skopeo reads back what podman pushed: the manifest it reported, the image's config,
        # and layers that decompress to the image's diff IDs
        raw = await skopeo_ok("inspect", "--raw", "--tls-verify=false", f"docker://{ref}")
        assert sha256_of(raw.encode()) == digest
        manifest = json.loads(raw)
        assert manifest["config"]["digest"] == archive.image_id
        copy = tmp_path / "copy"  # dir: keeps the manifest as it is, and names blobs by hex
        await skopeo_ok("copy", "--src-tls-verify=false", f"docker://{ref}", f"dir:{copy}")
        assert (copy / "manifest.json").read_text() == raw
        assert (copy / archive.image_id[7:]).read_bytes() == archive.config
        layers = [(copy / layer["digest"][7:]).read_bytes() for layer in manifest["layers"]]
        assert [sha256_of(data) for data in layers] == [d["digest"] for d in manifest["layers"]]
        diff_ids = [sha256_of(gzip.decompress(data)) for data in layers]
        assert diff_ids == list(archive.diff_ids)

        # ...and podman pulls it back into fresh storage as the same image
        async with podman(tmp_path / "podman-2") as second:
            await pull(second, ref, "--tls-verify=false")
            inspected = await inspect(second, ref)
            assert inspected["Digest"] == digest
            assert inspected["Id"] == archive.image_id.removeprefix("sha256:")
            assert inspected["RootFS"] == {"Type": "layers", "Layers": list(archive.diff_ids)}


AUTH_CONFIG = """
[upstreams."up"]
url = "{upstream}"

[auth]
users_file = "{htpasswd}"

[[auth.rules]]
who = ["bob"]
repos = ["up/**", "team/**"]
actions = ["pull", "push"]
"""
BOB_PASSWORD = "bob-Secret-2"


async def test_podman_login_mirror_and_push_with_auth(tmp_path: Path) -> None:
    """``podman login`` to regproxy covers the mirror too (its credentials are looked up by
    the mirror's host), and a push of the pulled image to a hosted repository works."""
    image = make_oci_layout(
        tmp_path / "src", [LayerSpec(MiB), LayerSpec(30_000)], tag="v1", seed="podman-auth"
    )
    htpasswd = write_htpasswd(tmp_path / "htpasswd", {"bob": BOB_PASSWORD})
    async with docker_registry(tmp_path / "upstream") as upstream:
        await skopeo_ok(
            "copy",
            "--dest-tls-verify=false",
            image.ref(),
            f"docker://{upstream.host}/e2e/podman:v1",
        )
        pushed = len(upstream_requests(upstream))
        config = AUTH_CONFIG.format(upstream=upstream.url, htpasswd=htpasswd)
        async with (
            regproxy(tmp_path / "proxy", config=config) as proxy,
            podman(tmp_path / "podman") as tool,
        ):
            tool.write_registries_conf(mirror_conf(upstream.host, f"{proxy.host}/up"))
            ref = f"{upstream.host}/e2e/podman:v1"
            target = f"{proxy.host}/team/podman:v1"
            policy = ("--signature-policy", str(tool.policy_path))
            push = ("push", *policy, "--tls-verify=false", ref, f"docker://{target}")

            rc, _, err = await tool.run(*push)  # nothing pulled yet, and no credentials
            assert rc != 0, err
            rc, out, err = await tool.run(
                "login",
                "--tls-verify=false",
                "-u",
                "bob",
                "--password-stdin",
                proxy.host,
                input=b"wrong",
            )
            assert rc != 0 and "invalid username/password" in err, out + err
            await tool.check(
                "login",
                "--tls-verify=false",
                "-u",
                "bob",
                "--password-stdin",
                proxy.host,
                input=BOB_PASSWORD.encode(),
            )
            await pull(tool, ref, "--platform", PLATFORM)
            await assert_pulled(tool, ref, image)
            sent = upstream_requests(upstream)[pushed:]
            assert sent and all("containers/" not in agent for *_, agent in sent), sent

            await tool.check(*push)
            raw = await skopeo_ok(
                "inspect",
                "--raw",
                "--tls-verify=false",
                f"--creds=bob:{BOB_PASSWORD}",
                f"docker://{target}",
            )
            # podman writes the manifest anew (its own key order), with the same content
            assert json.loads(raw) == json.loads(image.read_blob(image.digest))
            async with podman(tmp_path / "podman-2") as second:
                rc, _, err = await second.run("pull", *policy, "--tls-verify=false", target)
                assert rc != 0 and "unauthorized" in err.lower(), err
        log = proxy.log_path.read_text(errors="replace")
        assert '"path":"/token","status":200' in log
        assert BOB_PASSWORD not in log


@pytest.mark.parametrize(
    ("list_format", "list_type"),
    [
        ("oci", "application/vnd.oci.image.index.v1+json"),
        ("v2s2", "application/vnd.docker.distribution.manifest.list.v2+json"),
    ],
)
async def test_podman_manifest_push_of_a_list(
    tmp_path: Path, list_format: str, list_type: str
) -> None:
    """``podman manifest push --all``: the images of a list, then the list (an OCI index or a
    Docker manifest list) naming manifests pushed moments before, pulled back per platform."""
    multi = make_oci_layout(
        tmp_path / "src",
        [200_000, 3_000],
        platforms=[("linux", "amd64"), ("linux", "arm64")],
        tag="v1",
        seed="podman-list",
    )
    async with regproxy(tmp_path / "proxy") as proxy, podman(tmp_path / "podman") as tool:
        for m in multi.manifests:
            await skopeo_ok(
                "copy",
                "--dest-tls-verify=false",
                f"--override-arch={m.architecture}",
                multi.ref(),
                f"docker://{proxy.host}/hosted/single:{m.architecture}",
            )
        await tool.check("manifest", "create", "localhost/list")
        for m in multi.manifests:
            await tool.check(
                "manifest",
                "add",
                "--tls-verify=false",
                "localhost/list",
                f"docker://{proxy.host}/hosted/single:{m.architecture}",
            )
        target = f"{proxy.host}/hosted/list:v1"
        # (manifest push takes no --signature-policy: the host's policy.json applies)
        await tool.check(
            "manifest",
            "push",
            "--all",
            f"--format={list_format}",
            "--tls-verify=false",
            "localhost/list",
            f"docker://{target}",
        )
        raw = await skopeo_ok("inspect", "--raw", "--tls-verify=false", f"docker://{target}")
        index = json.loads(raw)
        assert index["mediaType"] == list_type
        entries = {e["platform"]["architecture"]: e for e in index["manifests"]}
        assert sorted(entries) == ["amd64", "arm64"]
        for m in multi.manifests:
            entry = entries[m.architecture]
            child = await skopeo_ok(
                "inspect",
                "--raw",
                "--tls-verify=false",
                f"docker://{proxy.host}/hosted/list@{entry['digest']}",
            )
            assert sha256_of(child.encode()) == entry["digest"]
            assert len(child.encode()) == entry["size"]
            assert json.loads(child)["config"]["digest"] == m.config.digest

        async with podman(tmp_path / "podman-2") as second:
            await pull(second, target, "--tls-verify=false", "--platform", "linux/arm64")
            inspected = await inspect(second, target)
            arm = multi.platform("linux", "arm64")
            assert inspected["Id"] == arm.config.digest.removeprefix("sha256:")
            assert inspected["RootFS"] == {"Type": "layers", "Layers": list(arm.diff_ids)}
