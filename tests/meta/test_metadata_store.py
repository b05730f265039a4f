"""The MetadataStore protocol, on every backend (see conftest.py): each method, the uploads'
compare-and-set, atomic tag upserts, and two stores sharing one database."""

from __future__ import annotations

import asyncio
import hashlib
import time

from regproxy.meta.base import BlobRow, ManifestRow, MetadataStore, Reference, UploadRow
from regproxy.oci import Digest
from tests.meta.conftest import OpenStore

INDEX = "application/vnd.oci.image.index.v1+json"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def digest(seed: str) -> Digest:
    return Digest("sha256", hashlib.sha256(seed.encode()).hexdigest())


def blob(seed: str, size: int = 10) -> BlobRow:
    return BlobRow(digest(seed), size, f"blobs/{seed}")


def manifest(seed: str, **extra: object) -> ManifestRow:
    # Bytes that are not UTF-8 and contain NUL: content must round-trip as bytes.
    content = b"\x00\xff" + seed.encode() + bytes(range(256))
    return ManifestRow(Digest.of(content), MANIFEST, content, **extra)  # type: ignore[arg-type]


def upload(upload_id: str, updated: float, repo: str = "app") -> UploadRow:
    return UploadRow(upload_id, repo, "sha256", 0, "{}", updated - 1.0, updated)


# -- blobs ------------------------------------------------------------------------------------


async def test_add_blob_links_and_the_first_row_wins(store: MetadataStore) -> None:
    first = blob("a", size=10)
    assert await store.add_blob("one", first) == first
    # The same digest pushed again elsewhere, under another key: the recorded row is kept.
    second = BlobRow(first.digest, 10, "blobs/other-key")
    assert await store.add_blob("two", second) == first
    assert await store.get_blob(first.digest) == first
    assert await store.get_repo_blob("one", first.digest) == first
    assert await store.get_repo_blob("two", first.digest) == first
    assert await store.get_repo_blob("three", first.digest) is None
    assert await store.get_blob(digest("unknown")) is None


async def test_large_sizes_round_trip(store: MetadataStore) -> None:
    big = blob("big", size=(1 << 40) + 7)
    await store.add_blob("app", big)
    assert await store.get_blob(big.digest) == big


async def test_link_and_unlink(store: MetadataStore) -> None:
    row = blob("a")
    await store.link_blob("app", row.digest)  # unknown digest: nothing to link
    assert await store.get_repo_blob("app", row.digest) is None
    await store.add_blob("one", row)
    await store.link_blob("app", row.digest)
    await store.link_blob("app", row.digest)  # twice is fine
    assert await store.get_repo_blob("app", row.digest) == row
    assert await store.unlink_blob("app", row.digest) is True
    assert await store.unlink_blob("app", row.digest) is False
    assert await store.get_repo_blob("app", row.digest) is None
    assert await store.get_repo_blob("one", row.digest) == row


async def test_blob_repositories(store: MetadataStore) -> None:
    row = blob("shared")
    assert await store.blob_repositories(row.digest) == []
    await store.add_blob("team/b", row)
    await store.add_blob("team/a", row)
    await store.add_blob("other", blob("unrelated"))
    assert await store.blob_repositories(row.digest) == ["team/a", "team/b"]


async def test_delete_blob_if_unused(store: MetadataStore) -> None:
    row = blob("layer")
    await store.add_blob("app", row)
    assert await store.delete_blob_if_unused(row.digest) is None  # linked
    m = manifest("m")
    await store.put_manifest("app", m, [Reference(row.digest, False)], ["v1"])
    assert await store.unlink_blob("app", row.digest)
    assert await store.delete_blob_if_unused(row.digest) is None  # referenced by a manifest
    assert await store.delete_manifest("app", m.digest)
    assert await store.delete_blob_if_unused(row.digest) == row
    assert await store.get_blob(row.digest) is None
    assert await store.delete_blob_if_unused(row.digest) is None


async def test_missing_references(store: MetadataStore) -> None:
    present, absent, other_repo = blob("present"), blob("absent"), blob("other")
    await store.add_blob("app", present)
    await store.add_blob("elsewhere", other_repo)
    child = manifest("child")
    await store.put_manifest("app", child, [], [])
    refs = [
        Reference(present.digest, False),
        Reference(absent.digest, False),
        Reference(other_repo.digest, False),  # known, but not linked to this repository
        Reference(child.digest, True),
        Reference(child.digest, False),  # a manifest is not a blob
        Reference(present.digest, True),  # nor a blob a manifest
        Reference(digest("no manifest"), True),
    ]
    assert await store.missing_references("app", refs) == [
        refs[1],
        refs[2],
        refs[4],
        refs[5],
        refs[6],
    ]
    assert await store.missing_references("app", []) == []


async def test_missing_references_many(store: MetadataStore) -> None:
    rows = [blob(f"layer-{i}") for i in range(1200)]
    for row in rows[::2]:
        await store.add_blob("app", row)
    refs = [Reference(row.digest, False) for row in rows]
    assert await store.missing_references("app", iter(refs)) == refs[1::2]


# -- manifests and tags -----------------------------------------------------------------------


async def test_put_and_get_manifest(store: MetadataStore) -> None:
    subject = manifest("subject")
    m = manifest("m", subject=subject.digest, artifact_type="application/x-sbom")
    layer = blob("layer")
    await store.add_blob("app", layer)
    await store.put_manifest("app", m, [Reference(layer.digest, False)], ["v1", "latest"])
    assert await store.get_manifest("app", m.digest) == m
    assert await store.get_manifest("other", m.digest) is None
    assert await store.get_tagged_manifest("app", "v1") == m
    assert await store.get_tagged_manifest("app", "latest") == m
    assert await store.get_tagged_manifest("app", "nope") is None
    # Pushed again with other bytes under the same digest is impossible; the same push again
    # is idempotent, and may add tags.
    await store.put_manifest("app", m, [Reference(layer.digest, False)], ["v2"])
    assert await store.list_tags("app", "", 10) == ["latest", "v1", "v2"]


async def test_tags_move_and_tag_checked(store: MetadataStore) -> None:
    a, b = manifest("a"), manifest("b")
    before = time.time()
    await store.put_manifest("app", a, [], ["latest", "latest"])  # a tag given twice
    checked = await store.tag_checked("app", "latest")
    assert checked is not None and checked >= before - 1
    await store.put_manifest("app", b, [], ["latest"])
    assert await store.get_tagged_manifest("app", "latest") == b
    assert await store.get_manifest("app", a.digest) == a  # untagged, still there
    moved = await store.tag_checked("app", "latest")
    assert moved is not None and moved >= checked
    assert await store.tag_checked("app", "other") is None


async def test_delete_manifest_takes_its_tags(store: MetadataStore) -> None:
    a, b = manifest("a"), manifest("b")
    await store.put_manifest("app", a, [], ["a1", "a2"])
    await store.put_manifest("app", b, [], ["b1"])
    await store.put_manifest("other", a, [], ["a1"])
    assert await store.delete_manifest("app", a.digest) is True
    assert await store.delete_manifest("app", a.digest) is False
    assert await store.get_manifest("app", a.digest) is None
    assert await store.list_tags("app", "", 10) == ["b1"]
    assert await store.get_tagged_manifest("other", "a1") == a


async def test_delete_tag(store: MetadataStore) -> None:
    m = manifest("m")
    await store.put_manifest("app", m, [], ["v1", "v2"])
    assert await store.delete_tag("app", "v1") is True
    assert await store.delete_tag("app", "v1") is False
    assert await store.list_tags("app", "", 10) == ["v2"]
    assert await store.get_manifest("app", m.digest) == m


async def test_list_tags_in_byte_order_and_pages(store: MetadataStore) -> None:
    tags = ["v1", "V1", "latest", "Latest", "a-b", "a_b", "a.b", "_x", "9", "z" * 128]
    await store.put_manifest("app", manifest("m"), [], tags)
    ordered = sorted(tags)  # the spec's lexical order: bytewise
    assert await store.list_tags("app", "", 100) == ordered
    assert await store.list_tags("app", "", 3) == ordered[:3]
    assert await store.list_tags("app", ordered[2], 3) == ordered[3:6]
    assert await store.list_tags("app", ordered[-1], 3) == []
    assert await store.list_tags("nothing", "", 3) == []


async def test_repositories(store: MetadataStore) -> None:
    assert await store.repository_exists("app") is False
    await store.add_blob("blobs-only", blob("a"))
    assert await store.repository_exists("blobs-only") is True
    for repo in ["b/two", "a/one", "c", "a/one"]:
        await store.put_manifest(repo, manifest(repo), [], [])
    assert await store.repository_exists("a/one") is True
    assert await store.list_repositories("", 10) == ["a/one", "b/two", "c"]
    assert await store.list_repositories("", 2) == ["a/one", "b/two"]
    assert await store.list_repositories("b/two", 2) == ["c"]


async def test_referrers(store: MetadataStore) -> None:
    subject = manifest("subject")
    await store.put_manifest("app", subject, [], ["v1"])
    sboms = [manifest(f"sbom-{i}", subject=subject.digest, artifact_type="x/sbom") for i in "ab"]
    sig = manifest("sig", subject=subject.digest, artifact_type="x/sig")
    for m in [*sboms, sig]:
        await store.put_manifest("app", m, [Reference(subject.digest, True)], [])
    await store.put_manifest("other", manifest("elsewhere", subject=subject.digest), [], [])
    everything = sorted([*sboms, sig], key=lambda m: str(m.digest))
    assert await store.referrers("app", subject.digest, None) == everything
    assert await store.referrers("app", subject.digest, "x/sbom") == sorted(
        sboms, key=lambda m: str(m.digest)
    )
    assert await store.referrers("app", subject.digest, "x/none") == []
    assert await store.referrers("app", sig.digest, None) == []


async def test_concurrent_tag_upserts(open_store: OpenStore) -> None:
    """Pushes racing for the same tags, from two stores on one database: every push succeeds,
    and each tag ends up on one of the pushed manifests."""
    stores = [await open_store(), await open_store()]
    manifests = [manifest(f"m{i}") for i in range(16)]

    async def push(i: int) -> None:
        tags = ["latest", "stable", f"only-{i}"]
        if i % 2:
            tags.reverse()  # the same rows in another order
        await stores[i % 2].put_manifest("app", manifests[i], [], tags)

    await asyncio.gather(*(push(i) for i in range(len(manifests))))
    tags = await stores[0].list_tags("app", "", 100)
    assert tags == sorted(["latest", "stable", *(f"only-{i}" for i in range(16))])
    for tag in ("latest", "stable"):
        assert await stores[1].get_tagged_manifest("app", tag) in manifests
    for i, m in enumerate(manifests):
        assert await stores[1].get_tagged_manifest("app", f"only-{i}") == m


async def test_manifest_reads_see_what_another_store_changed(open_store: OpenStore) -> None:
    """A store that served a manifest by tag and by digest (and cached it, on SQLite) sees
    another process move the tag, delete the tag and the manifest, and push what it had
    found missing, on the next read."""
    here, there = await open_store(), await open_store()
    a, b = manifest("a"), manifest("b")
    await there.put_manifest("app", a, [], ["latest", "v1"])
    for _ in range(2):  # the second read may come from a cache
        assert await here.get_tagged_manifest("app", "latest") == a
        assert await here.get_tagged_manifest("app", "v1") == a
        assert await here.get_manifest("app", a.digest) == a
        assert await here.get_manifest("app", b.digest) is None
        assert await here.get_tagged_manifest("app", "new") is None
    await there.put_manifest("app", b, [], ["latest", "new"])
    assert await here.get_tagged_manifest("app", "latest") == b
    assert await here.get_tagged_manifest("app", "new") == b
    assert await here.get_manifest("app", b.digest) == b
    assert await there.delete_tag("app", "v1") is True
    assert await here.get_tagged_manifest("app", "v1") is None
    assert await here.get_manifest("app", a.digest) == a
    assert await there.delete_manifest("app", a.digest) is True
    assert await here.get_manifest("app", a.digest) is None
    # And its own writes, through its own writer connection.
    await here.put_manifest("app", a, [], ["latest"])
    assert await here.get_tagged_manifest("app", "latest") == a
    assert await there.get_tagged_manifest("app", "latest") == a


# -- uploads ----------------------------------------------------------------------------------


async def test_upload_rows(store: MetadataStore) -> None:
    row = UploadRow("u1", "app", "sha256", 0, '{"parts": []}', 1000.5, 1000.5)
    await store.create_upload(row)
    assert await store.get_upload("u1") == row
    assert await store.get_upload("nope") is None
    assert await store.update_upload("u1", 5 << 30, "{}", 1001.25, expected=1000.5) is True
    assert await store.get_upload("u1") == UploadRow(
        "u1", "app", "sha256", 5 << 30, "{}", 1000.5, 1001.25
    )


async def test_update_upload_compare_and_set(store: MetadataStore) -> None:
    await store.create_upload(upload("u1", 10.0))
    assert await store.update_upload("u1", 1, "s1", 11.0, expected=10.0) is True
    # A writer that last saw 10.0 lost the race: nothing changes.
    assert await store.update_upload("u1", 2, "s2", 12.0, expected=10.0) is False
    row = await store.get_upload("u1")
    assert row is not None and (row.offset, row.state, row.updated) == (1, "s1", 11.0)
    assert await store.update_upload("gone", 1, "s", 1.0, expected=1.0) is False


async def test_upload_times_round_trip_exactly(store: MetadataStore) -> None:
    """The compare-and-set compares floats for equality: what is read back must be the
    exact double that was written, for any value."""
    times = [time.time(), 0.1 + 0.2, 1 / 3, 1.7e9 + 0.123456789, 2.0**-1074, 1e300]
    for i, moment in enumerate(times):
        await store.create_upload(upload(f"u{i}", moment))
        row = await store.get_upload(f"u{i}")
        assert row is not None and row.updated == moment and row.started == moment - 1.0
        later = moment + 1e-6 * (i + 1)
        assert await store.update_upload(f"u{i}", 1, "s", later, expected=row.updated)
        again = await store.get_upload(f"u{i}")
        assert again is not None and again.updated == later
        assert await store.delete_upload(f"u{i}", expected=again.updated) is True


async def test_delete_upload(store: MetadataStore) -> None:
    await store.create_upload(upload("u1", 10.0))
    await store.create_upload(upload("u2", 10.0))
    assert await store.delete_upload("u1", expected=9.0) is False
    assert await store.get_upload("u1") is not None
    assert await store.delete_upload("u1", expected=10.0) is True
    assert await store.delete_upload("u1", expected=10.0) is False
    assert await store.delete_upload("u2") is True
    assert await store.delete_upload("u2") is False
    assert await store.get_upload("u2") is None


async def test_stale_uploads(store: MetadataStore) -> None:
    await store.create_upload(upload("old", 100.0))
    await store.create_upload(upload("new", 200.0))
    assert [row.id for row in await store.stale_uploads(150.0)] == ["old"]
    assert await store.stale_uploads(100.0) == []
    assert sorted(row.id for row in await store.stale_uploads(1e12)) == ["new", "old"]


# -- several stores on one database -----------------------------------------------------------


async def test_two_stores_share_one_database(open_store: OpenStore) -> None:
    one, two = await open_store(), await open_store()
    row = blob("shared")
    await one.add_blob("app", row)
    m = manifest("m")
    await one.put_manifest("app", m, [Reference(row.digest, False)], ["v1"])
    assert await two.get_repo_blob("app", row.digest) == row
    assert await two.get_tagged_manifest("app", "v1") == m
    assert await two.missing_references("app", [Reference(row.digest, False)]) == []
    # An upload started through one continues through the other.
    await one.create_upload(upload("u1", 50.0))
    seen = await two.get_upload("u1")
    assert seen is not None
    assert await two.update_upload("u1", 7, "s", 51.0, expected=seen.updated)
    assert await one.update_upload("u1", 8, "t", 52.0, expected=seen.updated) is False
    assert await two.delete_manifest("app", m.digest)
    assert await one.get_tagged_manifest("app", "v1") is None


async def test_racing_claims_have_one_winner(open_store: OpenStore) -> None:
    """A finish and a purge in two processes claim the same upload: exactly one wins."""
    stores = [await open_store(), await open_store()]
    for round_ in range(10):
        upload_id = f"u{round_}"
        await stores[0].create_upload(upload(upload_id, 100.0 + round_))
        claims = [
            stores[i % 2].update_upload(
                upload_id, i, f"claim-{i}", 200.0 + i, expected=100.0 + round_
            )
            for i in range(4)
        ] + [stores[1].delete_upload(upload_id, expected=100.0 + round_)]
        results = await asyncio.gather(*claims)
        assert results.count(True) == 1, results


# -- operations and the web UI: one bounded query each, the same answers on every backend ----


async def test_summaries_of_images_tags_and_repositories(store: MetadataStore) -> None:
    await store.ping()
    layer, config = blob("layer", size=1000), blob("config", size=10)
    for repo in ("hub/library/app", "hosted/app"):
        await store.add_blob(repo, layer)
        await store.add_blob(repo, config)
    image = manifest("image")
    refs = [Reference(layer.digest, False), Reference(config.digest, False)]
    unknown = Reference(digest("not pulled"), False)
    child = ManifestRow(Digest.of(b"child"), MANIFEST, b"child")
    index = ManifestRow(Digest.of(b'{"manifests":[]}'), INDEX, b'{"manifests":[]}')
    for repo in ("hub/library/app", "hosted/app"):
        await store.put_manifest(repo, image, refs, ["v1", "latest"])
        await store.put_manifest(repo, child, [unknown], [])
        await store.put_manifest(repo, index, [Reference(child.digest, True)], ["multi"])
    image_size = len(image.content) + 1010
    index_size = len(index.content) + len(child.content)

    cached = await store.cached_tags("hub")
    assert [(i.repo, i.tag, i.digest, i.size) for i in cached] == [
        ("hub/library/app", "latest", image.digest, image_size),
        ("hub/library/app", "multi", index.digest, index_size),
        ("hub/library/app", "v1", image.digest, image_size),
    ]
    blobs, stored = await store.cache_totals("hub")
    assert (blobs, stored) == (
        2,
        1010 + len(image.content) + len(child.content) + len(index.content),
    )
    assert await store.cache_totals("nothing") == (0, 0)

    tags = await store.list_tag_summaries("hosted/app", "", 2)
    assert [(t.tag, t.digest, t.size, t.missing) for t in tags] == [
        ("latest", image.digest, image_size, 0),
        ("multi", index.digest, index_size, 1),
    ]
    assert tags[1].index == index.content and tags[0].index is None
    assert [t.tag for t in await store.list_tag_summaries("hosted/app", "multi", 10)] == ["v1"]
    assert await store.count_tags("hosted/app") == 3
    assert await store.tags_of_manifest("hosted/app", image.digest, 10) == ["latest", "v1"]
    assert await store.tags_of_manifest("hosted/app", image.digest, 1) == ["latest"]

    hosted = await store.list_repository_summaries("", 10, prefixes=["hub"], cached=False)
    assert [(r.name, r.tags, r.manifests) for r in hosted] == [("hosted/app", 3, 3)]
    cache = await store.list_repository_summaries("", 10, prefixes=["hub"], cached=True)
    assert [r.name for r in cache] == ["hub/library/app"]
    assert await store.list_repository_summaries("", 10, prefixes=[], cached=True) == []
    everything = await store.list_repository_summaries("", 10, prefixes=[], cached=False)
    assert [r.name for r in everything] == ["hosted/app", "hub/library/app"]

    assert await store.count_uploads() == 0
    await store.create_upload(upload("u1", time.time()))
    assert await store.count_uploads() == 1


# -- links and reference checks (GC's race rules) ---------------------------------------------


def image(
    seed: str, *blobs: BlobRow, subject: Digest | None = None
) -> tuple[ManifestRow, list[Reference]]:
    return manifest(seed, subject=subject), [Reference(b.digest, False) for b in blobs]


async def test_link_blob_reports_and_refreshes_the_link(store: MetadataStore) -> None:
    row = blob("a")
    assert await store.link_blob("app", row.digest) is False  # not stored: nothing to link
    await store.add_blob("one", row)
    first = await store.get_repo_blob("one", row.digest)
    assert first is not None and first.linked is not None
    await store.add_blob("one", row)  # pushed again: the link's time moves on
    again = await store.get_repo_blob("one", row.digest)
    assert again is not None and again.linked is not None and again.linked >= first.linked
    assert await store.link_blob("app", row.digest) is True
    assert await store.link_blob("app", row.digest) is True  # twice: refreshed
    linked = await store.get_repo_blob("app", row.digest)
    assert linked is not None and linked.linked is not None and linked.linked >= first.linked


async def test_touch_link_only_moves_forward_and_needs_the_link(store: MetadataStore) -> None:
    row = blob("a")
    await store.add_blob("app", row)
    current = await store.get_repo_blob("app", row.digest)
    assert current is not None and current.linked is not None
    later = current.linked + 100.0
    assert await store.touch_link("app", row.digest, later) is True
    touched = await store.get_repo_blob("app", row.digest)
    assert touched is not None and touched.linked == later
    assert await store.touch_link("app", row.digest, later - 50.0) is True  # never backwards
    touched = await store.get_repo_blob("app", row.digest)
    assert touched is not None and touched.linked == later
    assert await store.touch_link("other", row.digest, later) is False
    await store.unlink_blob("app", row.digest)
    assert await store.touch_link("app", row.digest, later) is False


async def test_put_manifest_checks_references_in_its_transaction(store: MetadataStore) -> None:
    present, absent = blob("present"), blob("absent")
    await store.add_blob("app", present)
    await store.add_blob("elsewhere", absent)  # stored, but not in app
    child = manifest("child")
    refs = [
        Reference(present.digest, False),
        Reference(absent.digest, False),
        Reference(child.digest, True),
    ]
    row = manifest("top")
    missing = await store.put_manifest("app", row, refs, ["v1"], check_references=True)
    assert missing == refs[1:]
    assert await store.get_manifest("app", row.digest) is None  # nothing stored
    assert await store.tag_checked("app", "v1") is None
    await store.link_blob("app", absent.digest)
    await store.put_manifest("app", child, [], [])
    assert await store.put_manifest("app", row, refs, ["v1"], check_references=True) == []
    assert await store.get_tagged_manifest("app", "v1") == row
    # Without the check (the pull-through cache stores what upstream sent), nothing is looked up.
    dangling = manifest("dangling")
    assert await store.put_manifest("app", dangling, [Reference(digest("x"), False)], []) == []
    assert await store.get_manifest("app", dangling.digest) == dangling


# -- garbage collection -----------------------------------------------------------------------


async def collect(store: MetadataStore, before: float, **options: object) -> dict[str, object]:
    manifests, links, blobs = [], 0, []
    async for found in store.collect_garbage(before, **options):  # type: ignore[arg-type]
        manifests += [(m.repo, str(m.digest)) for m in found.manifests]
        links += found.links
        blobs += [str(b.digest) for b in found.blobs]
    return {"manifests": sorted(manifests), "links": links, "blobs": sorted(blobs)}


async def test_collect_garbage_grace_and_shared_blobs(store: MetadataStore) -> None:
    started = time.time()
    layer, config, orphan, shared = blob("layer"), blob("config"), blob("orphan"), blob("shared")
    for row in (layer, config, orphan, shared):
        await store.add_blob("app", row)
    await store.add_blob("other", shared)
    top, refs = image("top", layer, config)
    await store.put_manifest("app", top, refs, ["v1"])
    # "other" references the shared blob; app only links it (a pushed, unused layer).
    user, user_refs = image("user", shared)
    await store.put_manifest("other", user, user_refs, ["latest"])

    nothing = {"manifests": [], "links": 0, "blobs": []}
    assert await collect(store, started - 60, untagged=True) == nothing  # all in the grace
    later = time.time() + 3600
    # A dry run reports what a pass deletes, and deletes nothing.
    expected = {"manifests": [], "links": 2, "blobs": [str(orphan.digest)]}
    assert await collect(store, later, untagged=True, dry_run=True) == expected
    assert await store.get_repo_blob("app", orphan.digest) == orphan
    assert await collect(store, later, untagged=True, batch=1) == expected
    assert await store.get_blob(orphan.digest) is None
    assert await store.get_repo_blob("app", orphan.digest) is None
    assert await store.get_repo_blob("app", shared.digest) is None  # its app link was stale
    assert await store.get_repo_blob("other", shared.digest) == shared
    for row in (layer, config):
        assert await store.get_repo_blob("app", row.digest) == row
    assert await collect(store, later, untagged=True) == nothing


async def test_collect_garbage_untagged_manifests_and_index_children(
    store: MetadataStore,
) -> None:
    layer, kept = blob("layer"), blob("kept")
    await store.add_blob("app", layer)
    await store.add_blob("app", kept)
    one, one_refs = image("one", layer)
    two, _ = image("two")
    await store.put_manifest("app", one, one_refs, [])
    await store.put_manifest("app", two, [], [])
    index = ManifestRow(digest("index"), INDEX, b"{}")
    children = [Reference(one.digest, True), Reference(two.digest, True)]
    await store.put_manifest("app", index, children, [])  # untagged: garbage with its children
    tagged, tagged_refs = image("tagged", kept)
    await store.put_manifest("app", tagged, tagged_refs, ["v1"])
    signature = manifest("signature", subject=tagged.digest)  # its subject exists: kept
    await store.put_manifest("app", signature, [], [])
    orphan_sig = manifest("orphan-signature", subject=index.digest)  # goes with the index
    await store.put_manifest("app", orphan_sig, [], [])
    cached, _ = image("cached")
    await store.put_manifest("cache/lib", cached, [], [])  # skipped prefix

    later = time.time() + 3600
    assert await collect(store, later, untagged=False) == {
        "manifests": [],
        "links": 0,
        "blobs": [],
    }
    gone = sorted(("app", str(m.digest)) for m in (index, one, two, orphan_sig))
    expected = {"manifests": gone, "links": 1, "blobs": [str(layer.digest)]}
    report = await collect(store, later, untagged=True, skip_prefixes=["cache/"], dry_run=True)
    assert report == expected
    assert await store.get_manifest("app", index.digest) == index
    assert await collect(store, later, untagged=True, skip_prefixes=["cache/"]) == expected
    for row in (index, one, two, orphan_sig):
        assert await store.get_manifest("app", row.digest) is None
    assert await store.missing_references("app", children) == children  # references gone too
    for row in (tagged, signature):
        assert await store.get_manifest("app", row.digest) == row
    assert await store.get_manifest("cache/lib", cached.digest) == cached
    assert await store.get_blob(layer.digest) is None
    assert await store.get_repo_blob("app", kept.digest) == kept


# -- retention ---------------------------------------------------------------------------------


async def test_record_pulls_and_expendable_tags(store: MetadataStore) -> None:
    rows = {}
    for tag in ("a", "b", "c"):
        rows[tag] = manifest(tag)
        await store.put_manifest("app", rows[tag], [], [tag])
    names = [t.tag for t in await store.expendable_tags("app", 1, None)]
    assert names == ["a", "b"]  # past the newest one, least recently pushed first
    assert [t.tag for t in await store.expendable_tags("app", 5, None)] == []
    pulled = time.time() + 100
    await store.record_pulls([("app", rows["a"].digest, pulled)])
    await store.record_pulls([("app", rows["a"].digest, pulled - 50)])  # older: ignored
    kept = await store.expendable_tags("app", 1, pulled - 1)
    assert [t.tag for t in kept] == ["b"]  # a was pulled since
    assert [t.tag for t in await store.expendable_tags("app", 1, pulled + 1)] == ["a", "b"]
    assert await store.expendable_tags("other", 0, None) == []


async def test_a_pull_of_a_child_manifest_is_a_pull_of_its_index(store: MetadataStore) -> None:
    child = manifest("child")
    await store.put_manifest("app", child, [], [])
    index = ManifestRow(digest("index"), INDEX, b"{}")
    await store.put_manifest("app", index, [Reference(child.digest, True)], ["multi"])
    await store.put_manifest("app", manifest("newer"), [], ["newer"])
    pulled = time.time() + 100
    await store.record_pulls([("app", child.digest, pulled), ("app", digest("unknown"), pulled)])
    assert await store.expendable_tags("app", 1, pulled - 1) == []  # "multi" was used


async def test_delete_tags_compare_and_set_and_prune(store: MetadataStore) -> None:
    layer = blob("layer")
    await store.add_blob("app", layer)
    child, child_refs = image("child", layer)
    await store.put_manifest("app", child, child_refs, [])
    index = ManifestRow(digest("index"), INDEX, b"{}")
    await store.put_manifest("app", index, [Reference(child.digest, True)], ["old"])
    repushed = manifest("repushed")
    await store.put_manifest("app", repushed, [], ["again"])
    both = manifest("both")
    await store.put_manifest("app", both, [], ["both-1", "both-2"])
    await store.put_manifest("app", manifest("newest"), [], ["newest"])
    listed = await store.expendable_tags("app", 1, None)
    assert [t.tag for t in listed] == ["old", "again", "both-1", "both-2"]
    await store.put_manifest("app", repushed, [], ["again"])  # pushed again since listed
    deleted = await store.delete_tags("app", [t for t in listed if t.tag != "both-2"])
    assert [t.tag for t in deleted] == ["old", "both-1"]
    # The index went with its last tag, and its child with it; the blob is GC's to free.
    assert await store.get_manifest("app", index.digest) is None
    assert await store.get_manifest("app", child.digest) is None
    assert await store.get_repo_blob("app", layer.digest) == layer
    assert await store.get_tagged_manifest("app", "again") == repushed
    assert await store.get_tagged_manifest("app", "both-2") == both  # still tagged: stays
    assert await store.delete_tags("app", []) == []


# -- the pull-through cache's eviction --------------------------------------------------------


async def test_cache_usage_images_and_eviction(store: MetadataStore) -> None:
    repo = "docker.io/library/alpine"
    layer, shared, other = blob("layer", 100), blob("shared", 50), blob("ghcr", 7)
    await store.add_blob(repo, layer)
    await store.add_blob(repo, shared)
    await store.add_blob("app", shared)  # also hosted: not cache bytes
    await store.add_blob("ghcr.io/x/y", other)
    await store.add_blob("docker.iox", blob("lookalike", 1000))  # not under docker.io/
    top, refs = image("top", layer, shared)
    await store.put_manifest(repo, top, refs, ["latest"])

    usage = await store.cache_usage(["docker.io", "ghcr.io"], per_prefix=["docker.io"])
    assert (usage.total, usage.by_prefix) == (107, {"docker.io": 100})
    assert (await store.cache_usage([])).total == 0

    later = time.time() + 3600
    assert await store.cached_images("docker.io", time.time() - 3600, 10) == []
    [found] = await store.cached_images("docker.io", later, 10)
    assert (found.repo, found.digest, found.size) == (repo, top.digest, 150)
    assert await store.cached_images("ghcr.io", later, 10) == []  # no manifest there

    # Pulled after it was listed: not evicted.
    await store.record_pulls([(repo, top.digest, found.last_used + 10)])
    assert await store.evict_image(found) is None
    assert await store.get_tagged_manifest(repo, "latest") == top
    [found] = await store.cached_images("docker.io", later, 10)
    assert found.last_used > 0
    assert await store.evict_image(found) == sorted([layer.digest, shared.digest], key=str)
    assert await store.get_manifest(repo, top.digest) is None
    assert await store.tag_checked(repo, "latest") is None
    assert await store.evict_image(found) is None  # already gone

    # Its blobs: the one linked only from the cache goes; the hosted one stays.
    cache = ["docker.io"]
    assert await store.collect_cached_blobs(cache, later, {layer.digest}, 10) == []
    assert await store.collect_cached_blobs(cache, later, set(), 10, candidates=[]) == []
    assert await store.collect_cached_blobs(cache, time.time() - 3600, set(), 10) == []  # grace
    assert await store.collect_cached_blobs(cache, later, set(), 10, dry_run=True) == [layer]
    assert await store.get_blob(layer.digest) == layer
    chosen = [layer.digest, shared.digest]
    assert await store.collect_cached_blobs(cache, later, set(), 10, candidates=chosen) == [layer]
    assert await store.get_blob(layer.digest) is None
    assert await store.get_repo_blob(repo, layer.digest) is None
    assert await store.get_repo_blob("app", shared.digest) == shared
    assert await store.collect_cached_blobs(cache, later, set(), 10) == []


async def test_forget_cached_blob(store: MetadataStore) -> None:
    cached, hosted = blob("cached"), blob("hosted")
    await store.add_blob("docker.io/lib/a", cached)
    top, refs = image("top", cached)
    await store.put_manifest("docker.io/lib/b", top, refs, ["latest"])
    await store.add_blob("docker.io/lib/a", hosted)
    await store.add_blob("app", hosted)
    prefixes = ["docker.io/", "ghcr.io/"]
    assert await store.forget_cached_blob(hosted.digest, prefixes) is None  # app uses it
    assert await store.get_repo_blob("app", hosted.digest) == hosted
    assert await store.forget_cached_blob(cached.digest, prefixes) == cached
    assert await store.get_blob(cached.digest) is None
    assert await store.get_repo_blob("docker.io/lib/a", cached.digest) is None
    # The cached manifest stays: the next pull finds no blob row and fetches it again.
    assert await store.get_manifest("docker.io/lib/b", top.digest) == top
    assert await store.forget_cached_blob(cached.digest, prefixes) is None


# -- the consistency check's listings ---------------------------------------------------------


async def test_list_blobs_and_known_keys_and_uploads(store: MetadataStore) -> None:
    rows = sorted((blob(seed) for seed in "abcde"), key=lambda row: str(row.digest))
    for row in rows:
        await store.add_blob("app", row)
    assert await store.list_blobs("", 2) == rows[:2]
    assert await store.list_blobs(str(rows[1].digest), 10) == rows[2:]
    assert await store.list_blobs(str(rows[-1].digest), 10) == []
    keys = [rows[0].storage_key, "blobs/unknown", rows[3].storage_key]
    assert await store.known_blob_keys(keys) == {rows[0].storage_key, rows[3].storage_key}
    assert await store.known_blob_keys([]) == set()
    many = [f"blobs/none-{i}" for i in range(1200)] + [rows[4].storage_key]
    assert await store.known_blob_keys(many) == {rows[4].storage_key}
    await store.create_upload(upload("u1", 10.0))
    await store.create_upload(upload("u2", 10.0))
    assert await store.known_upload_ids(["u1", "nope", "u2"]) == {"u1", "u2"}
    assert await store.known_upload_ids([]) == set()


async def test_gc_racing_manifest_puts_never_leaves_a_dangling_reference(
    open_store: OpenStore,
) -> None:
    """GC passes (everything stale) race pushes that check their references, from two stores
    (two processes or replicas): a manifest is accepted only if its blob survives, else it is
    refused with the blob reported missing; never accepted with its blob collected."""
    pusher, collector = await open_store(), await open_store()
    later = time.time() + 3600
    for i in range(15):
        layer = blob(f"race-{i}")
        await pusher.add_blob("app", layer)
        top, refs = image(f"race-{i}", layer)

        async def gc_pass() -> None:
            async for _ in collector.collect_garbage(later, untagged=False, batch=1):
                pass

        missing, _ = await asyncio.gather(
            pusher.put_manifest("app", top, refs, [f"t{i}"], check_references=True), gc_pass()
        )
        await gc_pass()  # and once more after the push
        stored = await pusher.get_manifest("app", top.digest)
        if missing:
            assert missing == refs and stored is None
            assert await pusher.get_blob(layer.digest) is None
        else:
            assert stored == top
            assert await pusher.get_repo_blob("app", layer.digest) == layer
