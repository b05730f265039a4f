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

    cached = await store.cached_images("hub")
    assert [(i.repo, i.tag, i.digest, i.size) for i in cached] == [
        ("hub/library/app", "latest", image.digest, image_size),
        ("hub/library/app", "multi", index.digest, index_size),
        ("hub/library/app", "v1", image.digest, image_size),
    ]
    blobs, stored = await store.cache_usage("hub")
    assert (blobs, stored) == (
        2,
        1010 + len(image.content) + len(child.content) + len(index.content),
    )
    assert await store.cache_usage("nothing") == (0, 0)

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
