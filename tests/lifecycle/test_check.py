"""``regproxy check``: blob rows with missing, short or corrupt bytes; repair of cached content."""

from __future__ import annotations

from pathlib import Path

from regproxy.api.keys import CONFIG
from regproxy.lifecycle.check import CheckReport, check_blobs
from regproxy.tasks import HOSTED
from tests.conftest import MakeClient
from tests.helpers import OCI_MANIFEST, Client, app_of, files_under, push_image
from tests.lifecycle.conftest import LifecycleConfig
from tests.proxy.conftest import cached_blob, stored_file
from tests.proxy.fakeupstream import FakeUpstream
from tests.proxy.test_blobs import eventually


async def check(client: Client, *, deep: bool = False, repair: bool = False) -> CheckReport:
    app = app_of(client)
    return await check_blobs(
        app[HOSTED].meta, app[HOSTED].storage, app[CONFIG], deep=deep, repair=repair
    )


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


async def test_a_healthy_registry_checks_clean(client: Client) -> None:
    await push_image(client, "app", "v1")
    report = await check(client, deep=True)
    assert report.checked == 2 and report.broken == []


async def test_missing_short_and_corrupt_hosted_blobs(
    lifecycle_config: LifecycleConfig, make_client: MakeClient, tmp_path: Path
) -> None:
    config = await lifecycle_config(tmp_path)
    client = await make_client(config)
    images = [await push_image(client, "app", f"v{i}", seed=f"s{i}") for i in range(3)]
    files = {p.name.partition(".")[0]: p for p in files_under(config.storage_path / "blobs")}
    missing, short, corrupt = (next(iter(image.blobs)) for image in images)
    files[missing[7:]].unlink()
    files[short[7:]].write_bytes(files[short[7:]].read_bytes()[:-1])
    flip_a_byte(files[corrupt[7:]])

    size = len(images[1].blobs[short])
    shallow = await check(client)
    assert {str(b.blob.digest): b.problem for b in shallow.broken} == {
        missing: "bytes missing",
        short: f"{size - 1} bytes stored, the row says {size}",
    }
    deep = await check(client, deep=True, repair=True)
    assert {str(b.blob.digest) for b in deep.broken} == {missing, short, corrupt}
    [flipped] = [b for b in deep.broken if str(b.blob.digest) == corrupt]
    assert flipped.problem.startswith("content has digest sha256:")
    assert all(not b.cached and b.repos == ["app"] for b in deep.broken)
    assert deep.repaired == []  # hosted content cannot be fetched again
    assert files[corrupt[7:]].exists()


async def test_repair_makes_the_next_pull_fetch_a_cached_blob_again(
    lifecycle_config: LifecycleConfig,
    make_client: MakeClient,
    tmp_path: Path,
    upstream: FakeUpstream,
) -> None:
    assert upstream.base_url is not None
    config = await lifecycle_config(tmp_path, upstreams={"fake": {"url": str(upstream.base_url)}})
    client = await make_client(config)
    image = upstream.add_image("lib/app", "v1", [b"layer bytes " * 1000], seed="cached")
    resp = await client.get("/v2/fake/lib/app/manifests/v1", headers={"Accept": OCI_MANIFEST})
    assert resp.status == 200
    for digest, data in image.blobs.items():
        resp = await client.get(f"/v2/fake/lib/app/blobs/{digest}")
        assert await resp.read() == data
        await eventually(lambda d=digest: cached_blob(client, d))  # type: ignore[misc]
    layer = next(d for d, data in image.blobs.items() if data.startswith(b"layer bytes"))
    path = stored_file(client, layer)
    assert path is not None
    flip_a_byte(path)

    report = await check(client, deep=True, repair=True)
    assert [str(b.blob.digest) for b in report.broken] == [layer]
    assert report.broken[0].cached and report.broken[0].repos == ["fake/lib/app"]
    assert [str(b.blob.digest) for b in report.repaired] == [layer]
    assert not path.exists()

    upstream.reset_counters()
    resp = await client.get(f"/v2/fake/lib/app/blobs/{layer}")
    assert resp.status == 200 and await resp.read() == image.blobs[layer]
    assert upstream.blob_gets("lib/app", layer) == 1
    await eventually(lambda: cached_blob(client, layer))
    assert (await check(client, deep=True)).broken == []
