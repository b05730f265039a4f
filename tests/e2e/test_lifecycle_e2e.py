"""Retention and the cache budget between real processes: skopeo pushing and pulling through
``regproxy serve``, and ``regproxy gc`` run beside it on the same data directory."""

from __future__ import annotations

import asyncio
import shutil
import sys
from pathlib import Path

import aiohttp
import pytest

from tests.e2e.images import OciImage, make_oci_layout
from tests.e2e.procs import SKOPEO_BIN, RegproxyProcess, regproxy, regproxy_env, run
from tests.e2e.test_proxy_skopeo import pull, push

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio]

KiB = 1 << 10
MiB = 1 << 20


@pytest.fixture(autouse=True)
def _require_tools() -> None:
    if shutil.which(SKOPEO_BIN) is None:
        pytest.fail("skopeo missing: apt-get install -y skopeo")


async def regproxy_gc(server: RegproxyProcess, config: Path, *args: str) -> list[str]:
    rc, out, err = await run(
        [
            sys.executable,
            "-m",
            "regproxy",
            "gc",
            *args,
            "--config",
            str(config),
            "--data-dir",
            str(server.data_dir),
        ],
        env=regproxy_env(),
    )
    assert rc == 0, f"regproxy gc exited {rc}:\n{out}\n{err}"
    return out.splitlines()


async def tags(server: RegproxyProcess, repo: str) -> list[str]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{server.url}/v2/{repo}/tags/list") as resp,
    ):
        assert resp.status == 200
        return sorted((await resp.json())["tags"])


def stored_hexes(server: RegproxyProcess) -> set[str]:
    """The digests (hex) whose bytes are in blob storage."""
    root = server.data_dir / "blobs"
    return {p.name.split(".", 1)[0] for p in root.rglob("*") if p.is_file()}


def stored_bytes(server: RegproxyProcess) -> int:
    root = server.data_dir / "blobs"
    files = [p for p in root.rglob("*") if p.is_file() and "uploads" not in p.parts]
    return sum(p.stat().st_size for p in files)


def layer_hexes(image: OciImage) -> set[str]:
    """The config and layer digests (hex) of a single-platform image: its blobs in storage
    (manifests live in the metadata store)."""
    return {digest.split(":", 1)[1] for digest in image.all_blobs if digest != image.digest}


async def test_gc_applies_retention_rules(tmp_path: Path) -> None:
    config = """
[gc]
interval = 0
grace = 0

[[retention.rules]]
repos = ["ci/**"]
keep_last = 2
keep_tags = ["v*"]
"""
    async with regproxy(tmp_path / "regproxy", config=config) as server:
        images: dict[str, OciImage] = {}
        for name in ("t1", "t2", "v1", "t3", "t4"):
            image = make_oci_layout(tmp_path / "img" / name, [64 * KiB], tag=name, seed=name)
            images[name] = image
            await push(image, f"docker://{server.host}/ci/app:{name}")
        other = make_oci_layout(tmp_path / "img" / "other", [64 * KiB], tag="t1", seed="o")
        await push(other, f"docker://{server.host}/other/app:t1")
        config_path = tmp_path / "regproxy" / "config.toml"

        lines = await regproxy_gc(server, config_path, "--dry-run")
        listed = sorted(line.split()[3] for line in lines if line.endswith("by retention"))
        assert listed == ["ci/app:t1", "ci/app:t2"], lines
        assert await tags(server, "ci/app") == ["t1", "t2", "t3", "t4", "v1"]

        lines = await regproxy_gc(server, config_path)
        deleted = sorted(line.split()[2] for line in lines if line.endswith("by retention"))
        assert deleted == ["ci/app:t1", "ci/app:t2"], lines
        assert await tags(server, "ci/app") == ["t3", "t4", "v1"]
        assert await tags(server, "other/app") == ["t1"]
        # GC freed what only the removed images used; the rest still pulls byte-exact.
        stored = stored_hexes(server)
        for name in ("t1", "t2"):
            assert not layer_hexes(images[name]) & stored
        for name in ("v1", "t3", "t4"):
            assert layer_hexes(images[name]) <= stored
            await pull(
                f"docker://{server.host}/ci/app:{name}", images[name], tmp_path / "out" / name
            )
        await pull(f"docker://{server.host}/other/app:t1", other, tmp_path / "out" / "other")


async def test_cache_budget_through_skopeo(tmp_path: Path) -> None:
    """An upstream regproxy holds 10 images of 1 MiB; the cache may keep 4 MiB."""
    async with regproxy(tmp_path / "upstream") as upstream:
        images = []
        for i in range(10):
            image = make_oci_layout(tmp_path / "img" / str(i), [MiB], tag=f"v{i}", seed=f"s{i}")
            await push(image, f"docker://{upstream.host}/lib/app:v{i}")
            images.append(image)
        config = f"""
[cache]
max_bytes = {4 * MiB}
grace = 0

[upstreams."up"]
url = "{upstream.url}"
"""
        async with regproxy(tmp_path / "cache", config=config) as cache:
            budget = 4 * MiB + MiB + 64 * KiB
            for i, image in enumerate(images):
                source = f"docker://{cache.host}/up/lib/app:v{i}"
                await pull(source, image, tmp_path / "out" / str(i))
                for _ in range(200):  # eviction runs right after the fill, in the background
                    if stored_bytes(cache) <= budget:
                        break
                    await asyncio.sleep(0.05)
                assert stored_bytes(cache) <= budget
            assert not layer_hexes(images[0]) <= stored_hexes(cache)  # evicted
            await pull(f"docker://{cache.host}/up/lib/app:v0", images[0], tmp_path / "again")
            assert layer_hexes(images[0]) <= stored_hexes(cache)  # fetched and cached again
