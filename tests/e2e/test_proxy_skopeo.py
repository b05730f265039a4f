"""The pull-through cache between real processes: skopeo pulling through ``regproxy serve``
from Debian's ``docker-registry`` (plain and behind htpasswd) and from a second regproxy.

Every pull is compared byte for byte with the image that was pushed upstream.
"""

from __future__ import annotations

import asyncio
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest

from tests.e2e.images import (
    LayerSpec,
    OciImage,
    layout_ref_digest,
    make_oci_layout,
    read_layout_blobs,
)
from tests.e2e.procs import (
    SKOPEO_BIN,
    RegistryProcess,
    RegproxyProcess,
    docker_registry,
    regproxy,
    skopeo,
)

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio]

MiB = 1 << 20
# distribution's access log (gorilla's combined format): "GET /v2/<name>/blobs/<digest> ..." 200
ACCESS_RE = re.compile(r'"(GET|HEAD) (/v2/\S+) HTTP/[\d.]+" (\d{3}) ')


@pytest.fixture(autouse=True)
def _require_tools() -> None:
    if shutil.which(SKOPEO_BIN) is None:
        pytest.fail("skopeo missing: apt-get install -y skopeo")


def upstream_config(name: str, url: str, **settings: object) -> str:
    """regproxy TOML with one upstream."""
    lines = [f'[upstreams."{name}"]', f'url = "{url}"']
    for key, value in settings.items():
        lines.append(f"{key} = {value!r}" if not isinstance(value, str) else f'{key} = "{value}"')
    return "\n".join(lines) + "\n"


async def skopeo_ok(*args: str) -> str:
    rc, out, err = await skopeo(*args)
    assert rc == 0, f"skopeo {' '.join(args)} exited {rc}:\n{err}"
    return out


async def push(image: OciImage, dest: str, *extra: str) -> None:
    all_flag = ["--all"] if image.is_index else []
    await skopeo_ok("copy", *all_flag, "--dest-tls-verify=false", *extra, image.ref(), dest)


async def pull(source: str, image: OciImage, dest: Path, *extra: str) -> None:
    """skopeo copy ``source`` into an OCI layout at ``dest`` and compare it with ``image``."""
    all_flag = ["--all"] if image.is_index else []
    dest.parent.mkdir(parents=True, exist_ok=True)
    await skopeo_ok(
        "copy", *all_flag, "--src-tls-verify=false", *extra, source, f"oci:{dest}:{image.tag}"
    )
    assert_same_layout(image, dest)


def assert_same_layout(image: OciImage, copy_dir: Path) -> None:
    """The copy holds exactly the pushed blobs (each verified against its digest)."""
    copied = read_layout_blobs(copy_dir)
    assert copied == image.all_blobs
    for digest in copied:
        assert (copy_dir / "blobs" / "sha256" / digest[7:]).read_bytes() == image.read_blob(digest)
    assert layout_ref_digest(copy_dir, image.tag) == image.digest


def registry_requests(registry: RegistryProcess) -> Counter[tuple[str, str, int]]:
    """(method, path, status) -> count, from docker-registry's access log."""
    counts: Counter[tuple[str, str, int]] = Counter()
    for match in ACCESS_RE.finditer(registry.log_path.read_text(errors="replace")):
        counts[(match.group(1), match.group(2), int(match.group(3)))] += 1
    return counts


def images(tmp_path: Path) -> tuple[OciImage, OciImage]:
    single = make_oci_layout(
        tmp_path / "single",
        [LayerSpec(4 * MiB), LayerSpec(300_000), LayerSpec(1_000)],
        tag="v1",
        seed="pt-single",
    )
    multi = make_oci_layout(
        tmp_path / "multi",
        [MiB, 20_000],
        platforms=[("linux", "amd64"), ("linux", "arm64")],
        tag="v2",
        seed="pt-multi",
    )
    assert len(single.manifests[0].layers) == 3 and multi.is_index
    return single, multi


async def test_pull_through_docker_registry(tmp_path: Path) -> None:
    """Eight concurrent cold pulls make the upstream send every blob once; an index pulls
    with --all; after the upstream is stopped, cached tags and digests still pull."""
    single, multi = images(tmp_path / "src")
    async with docker_registry(tmp_path / "upstream") as upstream:
        await push(single, f"docker://{upstream.host}/e2e/single:v1")
        await push(multi, f"docker://{upstream.host}/e2e/multi:v2")
        before = registry_requests(upstream)
        config = upstream_config("up", upstream.url, tag_ttl=0)
        async with regproxy(tmp_path / "proxy", config=config) as proxy:
            source = f"docker://{proxy.host}/up/e2e/single:v1"
            await asyncio.gather(*(pull(source, single, tmp_path / f"cold-{n}") for n in range(8)))
            sent = registry_requests(upstream) - before
            for blob in single.blobs:
                path = f"/v2/e2e/single/blobs/{blob.digest}"
                assert sent[("GET", path, 200)] == 1, (blob, sent)
            assert sent[("GET", f"/v2/e2e/single/manifests/{single.digest}", 200)] == 0

            await pull(f"docker://{proxy.host}/up/e2e/multi:v2", multi, tmp_path / "multi")
            sent = registry_requests(upstream) - before
            for blob in multi.blobs:
                assert sent[("GET", f"/v2/e2e/multi/blobs/{blob.digest}", 200)] == 1

            await upstream.process.stop()
            assert not upstream.process.alive()
            await assert_served_from_cache(proxy, single, multi, tmp_path / "offline")


async def assert_served_from_cache(
    proxy: RegproxyProcess, single: OciImage, multi: OciImage, tmp: Path
) -> None:
    base = f"docker://{proxy.host}/up/e2e"
    await pull(f"{base}/single:v1", single, tmp / "single-tag")
    await pull(f"{base}/single@{single.digest}", single, tmp / "single-digest")
    await pull(f"{base}/multi:v2", multi, tmp / "multi-tag")
    await pull(f"{base}/multi@{multi.digest}", multi, tmp / "multi-digest")
    assert "serving cached" in proxy.process.log_path.read_text()


async def test_pull_through_htpasswd_registry(tmp_path: Path) -> None:
    single, multi = images(tmp_path / "src")
    users = {"alice": "wonder-land"}
    async with docker_registry(tmp_path / "upstream", htpasswd=users) as upstream:
        creds = "--dest-creds=alice:wonder-land"
        await push(single, f"docker://{upstream.host}/e2e/single:v1", creds)
        await push(multi, f"docker://{upstream.host}/e2e/multi:v2", creds)
        config = upstream_config(
            "up", upstream.url, username="alice", password="wonder-land"
        ) + upstream_config("anon", upstream.url)
        async with regproxy(tmp_path / "proxy", config=config) as proxy:
            # the client needs no credentials: regproxy uses its own
            await pull(f"docker://{proxy.host}/up/e2e/single:v1", single, tmp_path / "single")
            await pull(f"docker://{proxy.host}/up/e2e/multi:v2", multi, tmp_path / "multi")
            # without configured credentials the upstream refuses, and so does regproxy
            rc, _, err = await skopeo(
                "inspect",
                "--raw",
                "--tls-verify=false",
                f"docker://{proxy.host}/anon/e2e/single:v1",
            )
            assert rc != 0 and "denied" in err.lower(), err
            log = upstream.log_path.read_text(errors="replace")
            assert '"GET /v2/e2e/single/manifests/v1 HTTP/1.1" 200' in log


async def test_pull_through_another_regproxy(tmp_path: Path) -> None:
    single, multi = images(tmp_path / "src")
    async with regproxy(tmp_path / "hosted") as hosted:
        await push(single, f"docker://{hosted.host}/e2e/single:v1")
        await push(multi, f"docker://{hosted.host}/e2e/multi:v2")
        config = upstream_config("hosted", hosted.url)
        async with regproxy(tmp_path / "proxy", config=config) as proxy:
            await pull(f"docker://{proxy.host}/hosted/e2e/single:v1", single, tmp_path / "s")
            await pull(f"docker://{proxy.host}/hosted/e2e/multi:v2", multi, tmp_path / "m")
            await pull(
                f"docker://{proxy.host}/hosted/e2e/multi@{multi.digest}", multi, tmp_path / "d"
            )
