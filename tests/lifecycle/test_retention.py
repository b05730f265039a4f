"""Retention rules for hosted repositories, over real HTTP pushes and pulls, on each metadata
backend."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from regproxy.api.keys import CONFIG
from regproxy.lifecycle.eviction import EVICTOR
from regproxy.lifecycle.gc import run_pass
from regproxy.lifecycle.retention import apply_retention
from regproxy.oci import Digest
from regproxy.tasks import HOSTED
from tests.conftest import MakeClient
from tests.helpers import OCI_INDEX, Client, app_of, push_image, push_manifest
from tests.lifecycle.cache import age, flush_pulls, pull
from tests.lifecycle.conftest import LifecycleConfig
from tests.proxy.conftest import meta_of
from tests.proxy.fakeupstream import FakeUpstream

DAY = 86400.0
pytestmark = pytest.mark.usefixtures("lifecycle_config")  # every test on each backend


def rule(**clauses: Any) -> dict[str, Any]:
    """A ``[[retention.rules]]`` table."""
    return clauses


async def start(
    make_client: MakeClient, configs: LifecycleConfig, tmp_path: Path, *rules: dict[str, Any]
) -> Client:
    config = await configs(tmp_path, retention__rules=list(rules))
    return await make_client(config)


async def retention(client: Client, *, dry_run: bool, now: float | None = None) -> list[str]:
    app = app_of(client)
    await flush_pulls(client)  # as the GC pass of a serving process does first
    removed = await apply_retention(
        meta_of(client), app[CONFIG], time.time() if now is None else now, dry_run
    )
    return sorted(f"{r.repo}:{r.tag}" for r in removed)


async def tags(client: Client, repo: str) -> list[str]:
    resp = await client.get(f"/v2/{repo}/tags/list")
    if resp.status == 404:
        return []
    assert resp.status == 200
    return list((await resp.json())["tags"] or [])


async def push_tags(client: Client, repo: str, names: list[str]) -> dict[str, str]:
    """One image per tag (pushed in this order, so the last is the most recent)."""
    return {
        name: (await push_image(client, repo, name, seed=f"{repo}:{name}")).digest for name in names
    }


async def test_keep_last_and_keep_tags_dry_run_then_real(
    make_client: MakeClient, tmp_path: Path, lifecycle_config: LifecycleConfig
) -> None:
    client = await start(
        make_client,
        lifecycle_config,
        tmp_path,
        rule(repos=["ci/**"], keep_last=2, keep_tags=["latest", "v*"]),
    )
    pushed = await push_tags(client, "ci/app", ["a", "v1", "b", "latest", "c", "d", "e"])
    await push_tags(client, "ci/sub/tool", ["x", "y", "z"])
    await push_tags(client, "other/app", ["a", "b", "c"])  # no rule names it
    expected = ["ci/app:a", "ci/app:b", "ci/app:c", "ci/sub/tool:x"]
    assert await retention(client, dry_run=True) == expected
    assert await tags(client, "ci/app") == ["a", "b", "c", "d", "e", "latest", "v1"]
    assert await retention(client, dry_run=False) == expected
    assert await tags(client, "ci/app") == ["d", "e", "latest", "v1"]
    assert await tags(client, "ci/sub/tool") == ["y", "z"]
    assert await tags(client, "other/app") == ["a", "b", "c"]
    # The untagged manifests went with their tags, so GC can free their blobs.
    meta = meta_of(client)
    assert await meta.get_manifest("ci/app", Digest.parse(pushed["a"])) is None
    assert await meta.get_manifest("ci/app", Digest.parse(pushed["d"])) is not None
    resp = await client.get(f"/v2/ci/app/manifests/{pushed['a']}")
    assert resp.status == 404
    # Nothing more to remove on a second pass.
    assert await retention(client, dry_run=False) == []


async def test_keep_pulled_within_keeps_pulled_tags(
    make_client: MakeClient, tmp_path: Path, lifecycle_config: LifecycleConfig
) -> None:
    client = await start(
        make_client, lifecycle_config, tmp_path, rule(repos=["app"], keep_pulled_within=DAY)
    )
    pushed = await push_tags(client, "app", ["old", "pulled", "by-digest", "head"])
    await age(client, 2 * DAY)
    await pull(client, "app", "pulled")
    await pull(client, "app", pushed["by-digest"])  # by digest counts for its tags too
    resp = await client.head("/v2/app/manifests/head")
    assert resp.status == 200
    await push_tags(client, "app", ["new"])  # pushed within the window: kept
    assert await retention(client, dry_run=True) == ["app:old"]
    assert await retention(client, dry_run=False) == ["app:old"]
    assert await tags(client, "app") == ["by-digest", "head", "new", "pulled"]


async def test_a_tag_survives_if_any_rule_keeps_it(
    make_client: MakeClient, tmp_path: Path, lifecycle_config: LifecycleConfig
) -> None:
    client = await start(
        make_client,
        lifecycle_config,
        tmp_path,
        rule(repos=["team/*"], keep_last=1),
        rule(repos=["team/app"], keep_tags=["release-*"]),
    )
    await push_tags(client, "team/app", ["release-1", "dev-1", "release-2", "dev-2"])
    await push_tags(client, "team/lib", ["1", "2"])
    assert await retention(client, dry_run=False) == ["team/app:dev-1", "team/lib:1"]
    assert await tags(client, "team/app") == ["dev-2", "release-1", "release-2"]


async def test_shared_manifest_stays_while_another_tag_points_at_it(
    make_client: MakeClient, tmp_path: Path, lifecycle_config: LifecycleConfig
) -> None:
    client = await start(
        make_client, lifecycle_config, tmp_path, rule(repos=["app"], keep_tags=["keep"])
    )
    image = await push_image(client, "app", "drop", seed="same")
    await push_image(client, "app", "keep", seed="same")  # same bytes, same digest
    assert await retention(client, dry_run=False) == ["app:drop"]
    manifest, blobs = await pull(client, "app", "keep")
    assert manifest == image.manifest and blobs == image.blobs


async def test_a_tag_pushed_again_meanwhile_stays(
    make_client: MakeClient, tmp_path: Path, lifecycle_config: LifecycleConfig
) -> None:
    client = await start(make_client, lifecycle_config, tmp_path, rule(repos=["app"], keep_last=1))
    await push_tags(client, "app", ["a", "b"])
    meta = meta_of(client)
    (row,) = await meta.expendable_tags("app", 1, None)
    assert row.tag == "a"
    moved = await push_image(client, "app", "a", seed="moved")  # a client re-pushes "a"
    assert await meta.delete_tags("app", [row]) == []
    assert (await pull(client, "app", "a"))[0] == moved.manifest


async def test_pull_through_repositories_are_left_to_eviction(
    make_client: MakeClient,
    tmp_path: Path,
    lifecycle_config: LifecycleConfig,
    upstream: FakeUpstream,
) -> None:
    config = await lifecycle_config(
        tmp_path,
        upstreams={"fake": {"url": str(upstream.base_url)}},
        retention__rules=[{"repos": ["**"], "keep_last": 1}],
    )
    client = await make_client(config)
    upstream.add_image("lib/app", "1", seed="1")
    upstream.add_image("lib/app", "2", seed="2")
    await pull(client, "fake/lib/app", "1")
    await pull(client, "fake/lib/app", "2")
    await push_tags(client, "fake2/app", ["1", "2"])  # hosted, though its name looks alike
    assert await retention(client, dry_run=False) == ["fake2/app:1"]
    assert await meta_of(client).get_tagged_manifest("fake/lib/app", "1") is not None


async def test_gc_pass_of_a_serving_process_sees_its_latest_pulls(
    make_client: MakeClient, tmp_path: Path, lifecycle_config: LifecycleConfig
) -> None:
    config = await lifecycle_config(
        tmp_path,
        retention__rules=[{"repos": ["app"], "keep_pulled_within": DAY}],
        cache__pull_flush_interval=3600.0,
    )
    client = await make_client(config)
    await push_tags(client, "app", ["old", "pulled"])
    await age(client, 2 * DAY)
    await pull(client, "app", "pulled")  # noted in memory only: the flush is an hour away
    app = app_of(client)
    hosted = app[HOSTED]
    report = await run_pass(hosted.meta, hosted.storage, config, evictor=app[EVICTOR])
    assert [f"{t.repo}:{t.tag}" for t in report.tags] == ["app:old"]
    assert await tags(client, "app") == ["pulled"]


async def test_a_removed_index_takes_its_children(
    make_client: MakeClient, tmp_path: Path, lifecycle_config: LifecycleConfig
) -> None:
    client = await start(make_client, lifecycle_config, tmp_path, rule(repos=["app"], keep_last=1))
    children = [await push_image(client, "app", f"child-{arch}", seed=arch) for arch in "ab"]
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [child.descriptor() for child in children],
    }
    index_digest = await push_manifest(client, "app", "multi", index)
    for arch in "ab":  # the children lose their own tags; the index keeps them
        assert (await client.delete(f"/v2/app/manifests/child-{arch}")).status == 202
    await push_tags(client, "app", ["newer"])
    assert await retention(client, dry_run=False) == ["app:multi"]
    meta = meta_of(client)
    for digest in (index_digest, *(child.digest for child in children)):
        assert await meta.get_manifest("app", Digest.parse(digest)) is None
