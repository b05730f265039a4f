"""``docker pull`` through regproxy as a registry mirror.

dockerd only sends Docker Hub names to its ``registry-mirrors``, so the image is pushed to a
``docker-registry`` as ``library/<name>`` and regproxy, with ``default_upstream`` set to that
registry, serves ``docker pull <name>:<tag>`` from it. All of dockerd's other traffic goes
to a dead proxy, so a pull that succeeds came through regproxy.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import aiohttp
import pytest

from tests.e2e.images import make_docker_archive
from tests.e2e.procs import DOCKERD_BIN, SKOPEO_BIN, docker_registry, dockerd, regproxy, skopeo

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio]

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
ACCESS_RE = re.compile(r'"GET (/v2/library/pt-mirror/blobs/sha256:[0-9a-f]{64}) HTTP/[\d.]+" 200 ')


async def manifest_of(url: str) -> tuple[str, bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, headers={"Accept": DOCKER_MANIFEST}) as resp,
    ):
        assert resp.status == 200, await resp.text()
        return resp.headers["Docker-Content-Digest"], await resp.read()


async def test_docker_pull_through_mirror(tmp_path: Path) -> None:
    if shutil.which(DOCKERD_BIN) is None or shutil.which(SKOPEO_BIN) is None:
        pytest.fail("dockerd or skopeo missing: apt-get install -y docker.io skopeo")
    archive = make_docker_archive(
        tmp_path / "image.tar", [2 << 20, 100_000, 1_000], "pt-mirror:v1", seed="mirror"
    )
    async with docker_registry(tmp_path / "upstream") as upstream:
        rc, _, err = await skopeo(
            "copy",
            "--dest-tls-verify=false",
            "--format=v2s2",
            f"docker-archive:{archive.path}",
            f"docker://{upstream.host}/library/pt-mirror:v1",
        )
        assert rc == 0, err
        digest, manifest = await manifest_of(f"{upstream.url}/v2/library/pt-mirror/manifests/v1")
        doc = json.loads(manifest)
        assert doc["config"]["digest"] == archive.image_id
        blobs = [archive.image_id, *(layer["digest"] for layer in doc["layers"])]

        config = f'default_upstream = "up"\n[upstreams."up"]\nurl = "{upstream.url}"\n'
        async with (
            regproxy(tmp_path / "proxy", config=config) as proxy,
            dockerd(tmp_path / "dockerd", registry_mirrors=[proxy.url]) as docker,
        ):
            out = await docker.check("pull", "pt-mirror:v1")
            assert f"Digest: {digest}" in out, out
            inspected = json.loads(await docker.check("image", "inspect", "pt-mirror:v1"))[0]
            assert inspected["Id"] == archive.image_id
            assert inspected["RepoDigests"] == [f"pt-mirror@{digest}"]
            assert inspected["RootFS"]["Layers"] == list(archive.diff_ids)

            # regproxy cached exactly what the upstream has, under the default upstream's prefix
            cached = await manifest_of(f"{proxy.url}/v2/up/library/pt-mirror/manifests/{digest}")
            assert cached == (digest, manifest)
            # ...and fetched each blob from it exactly once
            fetched = ACCESS_RE.findall(upstream.log_path.read_text(errors="replace"))
            assert sorted(fetched) == sorted(f"/v2/library/pt-mirror/blobs/{d}" for d in blobs)
