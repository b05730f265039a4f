"""docker (a test-owned dockerd) against a running ``regproxy serve``: load, push, pull."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import aiohttp
import pytest

from tests.e2e.images import make_docker_archive
from tests.e2e.procs import DOCKERD_BIN, RegproxyProcess, dockerd

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio]

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
PUSH_DIGEST_RE = re.compile(r"digest: (sha256:[0-9a-f]{64}) size: (\d+)")


def push_digest(output: str) -> tuple[str, int]:
    match = PUSH_DIGEST_RE.search(output)
    assert match, f"no digest in docker push output:\n{output}"
    return match.group(1), int(match.group(2))


async def fetch_manifest(server: RegproxyProcess, name: str, reference: str) -> tuple[str, bytes]:
    url = f"{server.url}/v2/{name}/manifests/{reference}"
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, headers={"Accept": DOCKER_MANIFEST}) as resp,
    ):
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"] == DOCKER_MANIFEST
        return resp.headers["Docker-Content-Digest"], await resp.read()


async def test_docker_load_push_pull(regproxy_server: RegproxyProcess, tmp_path: Path) -> None:
    if shutil.which(DOCKERD_BIN) is None:
        pytest.fail("dockerd missing: apt-get install -y docker.io")
    server = regproxy_server
    archive = make_docker_archive(
        tmp_path / "image.tar", [3 << 20, 200_000, 1_000], "e2e/app:v1", seed="docker"
    )
    async with dockerd(tmp_path / "dockerd", insecure_registries=[server.host]) as docker:
        assert archive.repo_tag in await docker.check("load", "-i", str(archive.path))
        image_id = await docker.check("image", "inspect", "-f", "{{.Id}}", archive.repo_tag)
        assert image_id.strip() == archive.image_id

        target = f"{server.host}/e2e/app:v1"
        await docker.check("tag", archive.repo_tag, target)
        digest, size = push_digest(await docker.check("push", target))

        # regproxy stores exactly the manifest docker pushed
        header_digest, body = await fetch_manifest(server, "e2e/app", "v1")
        assert header_digest == digest == "sha256:" + hashlib.sha256(body).hexdigest()
        assert len(body) == size
        manifest = json.loads(body)
        assert manifest["mediaType"] == DOCKER_MANIFEST
        assert manifest["config"]["digest"] == archive.image_id
        assert len(manifest["layers"]) == len(archive.diff_ids)
        assert (await fetch_manifest(server, "e2e/app", digest)) == (digest, body)

        await docker.check("rmi", target, archive.repo_tag)
        rc, _, _ = await docker.run("image", "inspect", archive.image_id)
        assert rc != 0, "the image should be gone after rmi"

        await docker.check("pull", target)
        inspected = json.loads(await docker.check("image", "inspect", target))[0]
        assert inspected["Id"] == archive.image_id
        assert inspected["RepoDigests"] == [f"{server.host}/e2e/app@{digest}"]
        assert inspected["RootFS"]["Layers"] == list(archive.diff_ids)

        # a push to a second repository mounts the layers from the first one
        second = f"{server.host}/e2e/copy:v1"
        await docker.check("tag", target, second)
        out = await docker.check("push", second)
        assert out.count("Mounted from e2e/app") == len(archive.diff_ids), out
        assert push_digest(out)[0] == digest
        assert (await fetch_manifest(server, "e2e/copy", "v1")) == (digest, body)
