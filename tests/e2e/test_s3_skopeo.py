"""skopeo push and pull through ``regproxy serve`` on S3 storage (a moto server), streamed
and with redirects to presigned URLs, and start-up failures on a bucket that cannot be used."""

from __future__ import annotations

import shutil
from pathlib import Path

import aiohttp
import pytest

from tests.e2e.images import OciImage, layout_ref_digest, make_oci_layout, read_layout_blobs
from tests.e2e.procs import (
    SKOPEO_BIN,
    free_port,
    regproxy,
    regproxy_argv,
    regproxy_env,
    run,
    skopeo,
)
from tests.s3fixtures import S3, s3, shared_moto  # noqa: F401

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio]

MiB = 1 << 20


async def skopeo_ok(*args: str) -> str:
    rc, out, err = await skopeo(*args)
    assert rc == 0, f"skopeo {' '.join(args)} exited {rc}:\n{err}"
    return out


def assert_same_layout(image: OciImage, copy_dir: Path) -> None:
    copied = read_layout_blobs(copy_dir)  # verifies every file against its digest
    assert copied == image.all_blobs
    for digest in copied:
        assert (copy_dir / "blobs" / "sha256" / digest[7:]).read_bytes() == image.read_blob(digest)
    assert layout_ref_digest(copy_dir, image.tag) == image.digest


async def test_skopeo_push_and_pull(tmp_path: Path, s3: S3) -> None:  # noqa: F811
    if shutil.which(SKOPEO_BIN) is None:
        pytest.fail("skopeo missing: apt-get install -y skopeo")
    image = make_oci_layout(
        tmp_path / "src",
        [12 * MiB + 3, 300_000, 0],
        platforms=[("linux", "amd64"), ("linux", "arm64")],
    )
    data_dir = tmp_path / "data"
    async with regproxy(tmp_path / "streamed", data_dir=data_dir, config=s3.toml()) as server:
        dest = f"docker://{server.host}/s3/app:v1"
        await skopeo_ok("copy", "--all", "--dest-tls-verify=false", image.ref(), dest)
        back = tmp_path / "back"
        await skopeo_ok("copy", "--all", "--src-tls-verify=false", dest, f"oci:{back}:latest")
    assert_same_layout(image, back)

    keys = await s3.keys()
    assert keys and all(key.startswith("blobs/") for key in keys), keys  # no upload leftovers
    assert len(keys) == len(image.all_blobs) - 3  # manifests and the index live in SQLite
    assert await s3.multipart_uploads() == []

    # The same data again, now answering blob GETs with redirects to presigned S3 URLs.
    config = s3.toml(redirect=True)
    async with regproxy(tmp_path / "redirected", data_dir=data_dir, config=config) as server:
        digest = image.manifests[0].layers[0].digest
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{server.url}/v2/s3/app/blobs/{digest}", allow_redirects=False) as resp,
        ):
            assert resp.status == 307
            assert resp.headers["Location"].startswith(s3.endpoint_url)
        again = tmp_path / "again"
        source = f"docker://{server.host}/s3/app:v1"
        await skopeo_ok("copy", "--all", "--src-tls-verify=false", source, f"oci:{again}:latest")
    assert_same_layout(image, again)
    redirects = server.log_path.read_text().count('"status":307')
    assert redirects >= len(image.manifests[0].layers)  # skopeo fetched from S3 directly


@pytest.mark.parametrize("problem", ["bucket", "endpoint"])
async def test_start_up_fails_clearly(tmp_path: Path, s3: S3, problem: str) -> None:  # noqa: F811
    if problem == "bucket":
        config, expected = s3.toml(bucket="no-such-bucket"), "there is no bucket 'no-such-bucket'"
    else:
        config = s3.toml(endpoint_url="http://127.0.0.1:9", max_attempts=1)
        expected = "storage.s3.endpoint_url: cannot reach S3 at http://127.0.0.1:9"
    config_path = tmp_path / "config.toml"
    config_path.write_text(config)
    argv = regproxy_argv(free_port(), tmp_path / "data", config_path)
    rc, out, err = await run(argv, env=regproxy_env(), timeout=60)
    assert rc == 2, (rc, out, err)
    assert "regproxy: configuration error: config key storage.s3." in err
    assert expected in err, err
    assert "Traceback" not in err
