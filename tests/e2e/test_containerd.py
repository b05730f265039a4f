"""containerd's ``ctr`` against ``regproxy serve``: a ``hosts.toml`` mirror and a push.

``ctr images pull --hosts-dir DIR <upstream-host>/<repo>:<tag>`` reads
``DIR/<upstream-host>/hosts.toml``; a ``[host."http://regproxy"]`` entry there with
``capabilities = ["pull", "resolve"]`` makes it ask regproxy first, with
``?ns=<upstream-host>`` on every request. regproxy must serve that from the upstream whose
host matches, cache it, and serve it again when the upstream is gone.

The daemon is a private containerd (see :func:`tests.e2e.procs.containerd`): native
snapshotter, content isolated per namespace, every file under the test's directories.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from tests.e2e.images import (
    LayerSpec,
    OciImage,
    build_tar,
    layout_ref_digest,
    make_docker_archive,
    make_oci_layout,
    read_layout_blobs,
)
from tests.e2e.procs import (
    CONTAINERD_BIN,
    CTR_BIN,
    SKOPEO_BIN,
    ContainerdDaemon,
    RegistryProcess,
    RegproxyProcess,
    containerd,
    docker_registry,
    raw_http,
    regproxy,
    skopeo,
    write_htpasswd,
)

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio]

MiB = 1 << 20
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
PLATFORM = "linux/amd64"  # what images.py builds; pinned so an arm64 host pulls it too
# distribution's access log (combined format): "GET /v2/... HTTP/1.1" 200 size "referer" "UA"
ACCESS_RE = re.compile(r'"(GET|HEAD) (/v2/\S+) HTTP/[\d.]+" (\d{3}) \S+ "[^"]*" "([^"]*)"')


@pytest.fixture(autouse=True)
def _require_tools() -> None:
    for tool in (CONTAINERD_BIN, CTR_BIN, SKOPEO_BIN):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} missing: apt-get install -y containerd skopeo")


def build_image(path: Path, seed: str) -> OciImage:
    return make_oci_layout(
        path, [LayerSpec(2 * MiB), LayerSpec(200_000), LayerSpec(1_000)], tag="v1", seed=seed
    )


async def skopeo_ok(*args: str) -> str:
    rc, out, err = await skopeo(*args)
    assert rc == 0, f"skopeo {' '.join(args)} exited {rc}:\n{err}"
    return out


def write_hosts_toml(
    hosts_dir: Path, registry_host: str, server: str, *mirrors: str, override_path: bool = False
) -> None:
    """``hosts_dir/<registry_host>/hosts.toml``: ``server`` plus plain-http pull mirrors
    (``override_path``: a mirror URL's path replaces ``/v2``)."""
    lines = [f'server = "{server}"']
    for mirror in mirrors:
        lines += [f'[host."{mirror}"]', '  capabilities = ["pull", "resolve"]']
        if override_path:
            lines.append("  override_path = true")
    (hosts_dir / registry_host).mkdir(parents=True, exist_ok=True)
    (hosts_dir / registry_host / "hosts.toml").write_text("\n".join(lines) + "\n")


async def image_digest(daemon: ContainerdDaemon, ref: str, namespace: str | None = None) -> str:
    """The target digest of image ``ref`` in containerd's image store."""
    out = await daemon.ctr_check("images", "ls", f"name=={ref}", namespace=namespace)
    rows = [line.split() for line in out.splitlines()[1:] if line.strip()]
    assert len(rows) == 1 and rows[0][0] == ref, out
    return rows[0][2]


async def assert_content_is(
    daemon: ContainerdDaemon, image: OciImage, namespace: str | None = None
) -> None:
    """Namespace ``namespace`` of containerd's content store holds every blob of ``image``
    (manifest, config, layers), byte for byte."""
    listed = await daemon.ctr_check("content", "ls", "--quiet", namespace=namespace)
    assert set(image.all_blobs) <= set(listed.split()), listed
    blobs = daemon.root / "io.containerd.content.v1.content" / "blobs" / "sha256"
    for digest in image.all_blobs:
        assert (blobs / digest[7:]).read_bytes() == image.read_blob(digest), digest


async def assert_unpacked(daemon: ContainerdDaemon, ref: str, namespace: str | None) -> None:
    """``ctr images check`` says the pulled image is complete and unpacked."""
    out = await daemon.ctr_check("images", "check", f"name=={ref}", namespace=namespace)
    rows = [line for line in out.splitlines()[1:] if line.startswith(ref)]
    assert len(rows) == 1 and "complete" in rows[0] and "true" in rows[0].split()[-1], out


def proxy_requests(proxy: RegproxyProcess) -> list[tuple[str, str, int]]:
    """(method, path, status) of every request in regproxy's access log."""
    found = []
    for line in proxy.log_path.read_text(errors="replace").splitlines():
        record = json.loads(line)  # the e2e servers log JSON lines
        if record["logger"] == "regproxy.access":
            found.append((record["method"], record["path"], record["status"]))
    return found


def upstream_requests(upstream: RegistryProcess) -> list[tuple[str, str, int, str]]:
    """(method, path, status, user agent) of every /v2/ request the upstream logged."""
    text = upstream.log_path.read_text(errors="replace")
    return [(m[1], m[2], int(m[3]), m[4]) for m in ACCESS_RE.finditer(text)]


async def test_ctr_pull_through_hosts_toml_mirror(tmp_path: Path) -> None:
    image = build_image(tmp_path / "src", "ctr-mirror")
    async with docker_registry(tmp_path / "upstream") as upstream:
        await skopeo_ok(
            "copy", "--dest-tls-verify=false", image.ref(), f"docker://{upstream.host}/e2e/ctr:v1"
        )
        head = await raw_http(
            upstream.port,
            "HEAD",
            "/v2/e2e/ctr/manifests/v1",
            headers={"Accept": image.media_type},
        )
        assert head.headers["docker-content-digest"] == image.digest
        pushed = len(upstream_requests(upstream))
        config = f'[upstreams."up"]\nurl = "{upstream.url}"\n'
        async with (
            regproxy(tmp_path / "proxy", config=config) as proxy,
            containerd(tmp_path / "containerd") as daemon,
        ):
            hosts = tmp_path / "hosts"
            # The server is the real upstream: containerd would fall back to it if the mirror
            # failed, so the upstream's log (user agents) shows who fetched what.
            write_hosts_toml(hosts, upstream.host, upstream.url, proxy.url)
            ref = f"{upstream.host}/e2e/ctr:v1"
            pull = ("images", "pull", "--hosts-dir", str(hosts), "--platform", PLATFORM, ref)
            await daemon.ctr_check(*pull)
            assert await image_digest(daemon, ref) == image.digest
            await assert_content_is(daemon, image)
            await assert_unpacked(daemon, ref, None)

            sent = upstream_requests(upstream)[pushed:]
            assert sent, "the upstream saw no request"
            assert all("containerd" not in agent for *_, agent in sent), sent
            fetched = sorted(path for method, path, status, _ in sent if method == "GET")
            blob_paths = [f"/v2/e2e/ctr/blobs/{blob.digest}" for blob in image.blobs]
            assert sorted(p for p in fetched if "/blobs/" in p) == sorted(blob_paths), sent
            # containerd asked regproxy (its access log has no query strings)...
            served = proxy_requests(proxy)
            for blob in image.blobs:
                assert ("GET", f"/v2/e2e/ctr/blobs/{blob.digest}", 200) in served, served
            # ...for a name that only ?ns= maps to the upstream's cache: alone it is unknown
            manifest_path = f"/v2/e2e/ctr/manifests/{image.digest}"
            assert (await raw_http(proxy.port, "GET", manifest_path)).status == 404
            ns = await raw_http(proxy.port, "GET", f"{manifest_path}?ns={upstream.host}")
            assert ns.status == 200 and ns.body == image.read_blob(image.digest)
            cached = await raw_http(proxy.port, "GET", f"/v2/up/e2e/ctr/manifests/{image.digest}")
            assert cached.status == 200 and cached.body == ns.body

            # With the upstream gone, a namespace with its own (isolated) content store pulls
            # the same image from regproxy's cache, still as the upstream's name.
            await upstream.process.stop()
            await daemon.ctr_check(*pull, namespace="second")
            assert await image_digest(daemon, ref, "second") == image.digest
            await assert_content_is(daemon, image, "second")
            await assert_unpacked(daemon, ref, "second")


async def test_ctr_mirror_with_override_path(tmp_path: Path) -> None:
    """``[host."http://regproxy/v2/up"]`` with ``override_path = true`` (how Harbor's proxy
    projects are configured): the path already names the upstream's cache, and ``?ns=``,
    which containerd still sends, must not prefix it again."""
    image = build_image(tmp_path / "src", "ctr-override")
    async with docker_registry(tmp_path / "upstream") as upstream:
        await skopeo_ok(
            "copy", "--dest-tls-verify=false", image.ref(), f"docker://{upstream.host}/e2e/ctr:v1"
        )
        pushed = len(upstream_requests(upstream))
        config = f'[upstreams."up"]\nurl = "{upstream.url}"\n'
        async with (
            regproxy(tmp_path / "proxy", config=config) as proxy,
            containerd(tmp_path / "containerd") as daemon,
        ):
            hosts = tmp_path / "hosts"
            mirror = f"{proxy.url}/v2/up"
            write_hosts_toml(hosts, upstream.host, upstream.url, mirror, override_path=True)
            ref = f"{upstream.host}/e2e/ctr:v1"
            await daemon.ctr_check(
                "images", "pull", "--hosts-dir", str(hosts), "--platform", PLATFORM, ref
            )
            assert await image_digest(daemon, ref) == image.digest
            await assert_content_is(daemon, image)
            sent = upstream_requests(upstream)[pushed:]
            assert sent and all("containerd" not in agent for *_, agent in sent), sent
            served = proxy_requests(proxy)
            for blob in image.blobs:
                assert ("GET", f"/v2/up/e2e/ctr/blobs/{blob.digest}", 200) in served, served


async def test_ctr_pulls_an_index_and_a_docker_manifest_through_the_mirror(
    tmp_path: Path,
) -> None:
    """A multi-platform index (one platform, then all of it by digest) and a Docker v2
    schema 2 image, each negotiated through ``Accept`` on ``?ns=`` requests."""
    multi = make_oci_layout(
        tmp_path / "multi",
        [MiB, 20_000],
        platforms=[("linux", "amd64"), ("linux", "arm64")],
        tag="v2",
        seed="ctr-multi",
    )
    archive = make_docker_archive(tmp_path / "docker.tar", [300_000], "e2e/d:v1", seed="ctr-d")
    async with docker_registry(tmp_path / "upstream") as upstream:
        await skopeo_ok(
            "copy",
            "--all",
            "--dest-tls-verify=false",
            multi.ref(),
            f"docker://{upstream.host}/e2e/multi:v2",
        )
        await skopeo_ok(
            "copy",
            "--dest-tls-verify=false",
            "--format=v2s2",
            f"docker-archive:{archive.path}",
            f"docker://{upstream.host}/e2e/docker:v1",
        )
        head = await raw_http(
            upstream.port,
            "HEAD",
            "/v2/e2e/docker/manifests/v1",
            headers={"Accept": DOCKER_MANIFEST},
        )
        docker_digest = head.headers["docker-content-digest"]
        pushed = len(upstream_requests(upstream))
        config = f'[upstreams."up"]\nurl = "{upstream.url}"\n'
        async with (
            regproxy(tmp_path / "proxy", config=config) as proxy,
            containerd(tmp_path / "containerd") as daemon,
        ):
            hosts = tmp_path / "hosts"
            write_hosts_toml(hosts, upstream.host, upstream.url, proxy.url)
            pull = ("images", "pull", "--hosts-dir", str(hosts))

            ref = f"{upstream.host}/e2e/multi:v2"
            await daemon.ctr_check(*pull, "--platform", "linux/arm64", ref)
            assert await image_digest(daemon, ref) == multi.digest
            arm = multi.platform("linux", "arm64")
            listed = set((await daemon.ctr_check("content", "ls", "--quiet")).split())
            wanted = {multi.digest, arm.digest, arm.config.digest, *(b.digest for b in arm.layers)}
            assert wanted <= listed, listed
            amd = multi.platform("linux", "amd64")
            assert not {b.digest for b in amd.layers} & listed  # only the platform asked for

            by_digest = f"{upstream.host}/e2e/multi@{multi.digest}"
            await daemon.ctr_check(*pull, "--all-platforms", by_digest, namespace="second")
            await assert_content_is(daemon, multi, "second")

            ref = f"{upstream.host}/e2e/docker:v1"
            await daemon.ctr_check(*pull, "--platform", PLATFORM, ref)
            assert await image_digest(daemon, ref) == docker_digest
            rows = (await daemon.ctr_check("images", "ls", f"name=={ref}")).splitlines()
            assert DOCKER_MANIFEST in rows[1], rows
            blobs = daemon.root / "io.containerd.content.v1.content" / "blobs" / "sha256"
            assert (blobs / archive.image_id[7:]).read_bytes() == archive.config

            sent = upstream_requests(upstream)[pushed:]
            assert sent and all("containerd" not in agent for *_, agent in sent), sent


def oci_archive(image: OciImage, path: Path) -> Path:
    """A tar of ``image``'s OCI layout (what ``ctr images import`` reads)."""
    members = [
        (str(file.relative_to(image.path)), file.read_bytes())
        for file in sorted(image.path.rglob("*"))
        if file.is_file()
    ]
    path.write_bytes(build_tar(members))
    return path


async def test_ctr_push_to_hosted_repository(tmp_path: Path) -> None:
    image = build_image(tmp_path / "src", "ctr-push")
    archive = oci_archive(image, tmp_path / "image.tar")
    async with (
        regproxy(tmp_path / "proxy") as proxy,
        containerd(tmp_path / "containerd") as daemon,
    ):
        await daemon.ctr_check(
            "images", "import", "--platform", PLATFORM, "--base-name", "local/ctr", str(archive)
        )
        assert await image_digest(daemon, "local/ctr:v1") == image.digest
        ref = f"{proxy.host}/hosted/ctr:v1"
        await daemon.ctr_check("images", "tag", "local/ctr:v1", ref)
        await daemon.ctr_check("images", "push", "--plain-http", "--platform", PLATFORM, ref)

        # skopeo reads back exactly what was imported
        raw = await skopeo_ok("inspect", "--raw", "--tls-verify=false", f"docker://{ref}")
        assert raw.encode() == image.read_blob(image.digest)
        copy = tmp_path / "copy"
        await skopeo_ok("copy", "--src-tls-verify=false", f"docker://{ref}", f"oci:{copy}:v1")
        assert read_layout_blobs(copy) == image.all_blobs
        assert layout_ref_digest(copy, "v1") == image.digest
        for digest in image.all_blobs:
            assert (copy / "blobs" / "sha256" / digest[7:]).read_bytes() == image.read_blob(digest)

        # ...and so does containerd, through a hosts.toml naming regproxy as the server
        hosts = tmp_path / "hosts"
        write_hosts_toml(hosts, proxy.host, proxy.url)
        pull = ("images", "pull", "--hosts-dir", str(hosts), "--platform", PLATFORM, ref)
        await daemon.ctr_check(*pull, namespace="second")
        assert await image_digest(daemon, ref, "second") == image.digest
        await assert_content_is(daemon, image, "second")


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
BOB = "bob:bob-Secret-2"


async def test_ctr_mirror_and_push_with_token_auth(tmp_path: Path) -> None:
    """With auth on, ctr follows regproxy's Bearer challenges: the scope of a ``?ns=``
    request names the upstream's cache (``up/...``), which ctr could not guess itself."""
    image = build_image(tmp_path / "src", "ctr-auth")
    htpasswd = write_htpasswd(tmp_path / "htpasswd", {"bob": BOB.split(":", 1)[1]})
    async with docker_registry(tmp_path / "upstream") as upstream:
        await skopeo_ok(
            "copy", "--dest-tls-verify=false", image.ref(), f"docker://{upstream.host}/e2e/ctr:v1"
        )
        pushed = len(upstream_requests(upstream))
        config = AUTH_CONFIG.format(upstream=upstream.url, htpasswd=htpasswd)
        async with (
            regproxy(tmp_path / "proxy", config=config) as proxy,
            containerd(tmp_path / "containerd") as daemon,
        ):
            hosts = tmp_path / "hosts"
            write_hosts_toml(hosts, upstream.host, upstream.url, proxy.url)
            ref = f"{upstream.host}/e2e/ctr:v1"
            pull = ("images", "pull", "--hosts-dir", str(hosts), "--platform", PLATFORM)
            await daemon.ctr_check(*pull, "--user", BOB, ref)
            assert await image_digest(daemon, ref) == image.digest
            await assert_content_is(daemon, image)
            sent = upstream_requests(upstream)[pushed:]
            assert sent and all("containerd" not in agent for *_, agent in sent), sent

            target = f"{proxy.host}/team/ctr:v1"
            await daemon.ctr_check("images", "tag", ref, target)
            push = ("images", "push", "--plain-http", "--platform", PLATFORM)
            rc, _, err = await daemon.ctr(*push, target)
            assert rc != 0 and "insufficient_scope" in err, err  # anonymous
            rc, _, err = await daemon.ctr(*push, "--user", "bob:wrong", target)
            assert rc != 0 and "401" in err, err
            # the layers came from the upstream, so ctr first tries ?mount=&from=e2e/ctr: a
            # source bob may not pull, which must start a plain upload, not fail the push
            await daemon.ctr_check(*push, "--user", BOB, target)
            raw = await skopeo_ok(
                "inspect", "--raw", "--tls-verify=false", f"--creds={BOB}", f"docker://{target}"
            )
            assert raw.encode() == image.read_blob(image.digest)
        log = proxy.log_path.read_text(errors="replace")
        assert '"path":"/token","status":200' in log
        assert BOB.split(":", 1)[1] not in log
