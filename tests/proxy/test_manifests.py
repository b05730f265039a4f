"""Manifests, tags, referrers and routing through the pull-through cache.

Manifests come back byte for byte as the upstream sent them, under the upstream's digest.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from tests.helpers import Client, assert_error, digest_of, push_image
from tests.proxy.conftest import MakeProxy
from tests.proxy.fakeupstream import (
    OCI_INDEX,
    FakeImage,
    FakeUpstream,
    descriptor,
    pretty,
)

REPO = "lib/app"
ARTIFACT = "application/vnd.example.sbom.v1"
EMPTY = "application/vnd.oci.empty.v1+json"
ALL_TYPES = (
    "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json,"
    " application/vnd.docker.distribution.manifest.list.v2+json,"
    " application/vnd.docker.distribution.manifest.v2+json"
)


def populate(upstream: FakeUpstream) -> dict[str, FakeImage]:
    """One manifest of every kind, tagged with its kind's name."""
    oci = upstream.add_image(REPO, "oci", seed="oci")
    docker = upstream.add_image(REPO, "docker", docker=True, seed="docker")
    arm = upstream.add_image(REPO, None, seed="arm")
    index = upstream.add_index(REPO, "index", [oci, arm])
    d_arm = upstream.add_image(REPO, None, docker=True, seed="d-arm")
    manifest_list = upstream.add_index(REPO, "list", [docker, d_arm], docker=True)
    empty = upstream.add_blob(REPO, b"{}")
    sbom = upstream.add_blob(REPO, b'{"sbom": true}')
    artifact_doc = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": ARTIFACT,
        "config": {"mediaType": EMPTY, "digest": empty, "size": 2},
        "layers": [descriptor("application/json", b'{"sbom": true}')],
        "subject": descriptor(oci.media_type, oci.manifest),
        "annotations": {"org.example.kind": "sbom"},
    }
    content = pretty(artifact_doc)
    artifact_digest = upstream.add_manifest(REPO, content, artifact_doc["mediaType"], "artifact")
    artifact = FakeImage(
        REPO,
        "artifact",
        content,
        artifact_doc["mediaType"],
        artifact_digest,
        {empty: b"{}", sbom: b'{"sbom": true}'},
    )
    return {
        "oci": oci,
        "docker": docker,
        "index": index,
        "list": manifest_list,
        "artifact": artifact,
        "arm": arm,
        "d-arm": d_arm,
    }


async def get_manifest(client: Client, path: str, expected: FakeImage) -> None:
    """GET and HEAD ``path``: exactly the upstream's bytes, type and digest."""
    resp = await client.get(path, headers={"Accept": ALL_TYPES})
    assert resp.status == 200, await resp.text()
    body = await resp.read()
    assert body == expected.manifest
    assert resp.headers["Content-Type"] == expected.media_type
    assert resp.headers["Docker-Content-Digest"] == expected.digest == digest_of(body)
    resp = await client.head(path)
    assert resp.status == 200
    assert resp.headers["Content-Length"] == str(len(expected.manifest))
    assert resp.headers["Docker-Content-Digest"] == expected.digest
    assert await resp.read() == b""


@pytest.mark.parametrize("kind", ["oci", "docker", "index", "list", "artifact"])
async def test_manifest_by_tag_and_digest(proxy: Client, upstream: FakeUpstream, kind: str) -> None:
    images = populate(upstream)
    image = images[kind]
    await get_manifest(proxy, f"/v2/fake/{REPO}/manifests/{kind}", image)
    await get_manifest(proxy, f"/v2/fake/{REPO}/manifests/{image.digest}", image)
    assert upstream.count("GET", f"/v2/{REPO}/manifests/{kind}") == 1
    # by digest: cached by the tag fetch already, immutable, never asked for again
    assert upstream.count("GET", f"/v2/{REPO}/manifests/{image.digest}") == 0

    doc = json.loads(image.manifest)
    for child in doc.get("manifests", []):  # an index's children, by digest, then their blobs
        expected = next(i for i in images.values() if i.digest == child["digest"])
        await get_manifest(proxy, f"/v2/fake/{REPO}/manifests/{child['digest']}", expected)
        assert upstream.count("GET", f"/v2/{REPO}/manifests/{child['digest']}") == 1
    for digest, data in image.blobs.items():
        resp = await proxy.get(f"/v2/fake/{REPO}/blobs/{digest}")
        assert resp.status == 200 and await resp.read() == data


async def test_manifest_by_digest_first(proxy: Client, upstream: FakeUpstream) -> None:
    image = populate(upstream)["arm"]
    path = f"/v2/fake/{REPO}/manifests/{image.digest}"
    await get_manifest(proxy, path, image)
    await get_manifest(proxy, path, image)
    assert upstream.count("GET", f"/v2/{REPO}/manifests/{image.digest}") == 1
    assert upstream.total("HEAD") == 0


async def test_concurrent_manifest_gets_fetch_once(proxy: Client, upstream: FakeUpstream) -> None:
    images = populate(upstream)
    upstream.delay = 0.2  # all requests arrive while the first fetch is still out
    paths = [f"/v2/fake/{REPO}/manifests/{ref}" for ref in ("oci", images["arm"].digest)]
    requests = [get_manifest(proxy, paths[0], images["oci"]) for _ in range(8)]
    requests += [get_manifest(proxy, paths[1], images["arm"]) for _ in range(8)]
    await asyncio.gather(*requests)
    assert upstream.count("GET", f"/v2/{REPO}/manifests/oci") == 1
    assert upstream.count("GET", f"/v2/{REPO}/manifests/{images['arm'].digest}") == 1
    assert upstream.total() == 2


async def test_manifest_without_media_type_field(proxy: Client, upstream: FakeUpstream) -> None:
    """OCI lets ``mediaType`` be left out; the upstream's Content-Type says what it is."""
    oci = populate(upstream)["oci"]
    doc = json.loads(oci.manifest)
    del doc["mediaType"]
    content = pretty(doc)
    digest = upstream.add_manifest(REPO, content, oci.media_type, "bare")
    bare = FakeImage(REPO, "bare", content, oci.media_type, digest)
    await get_manifest(proxy, f"/v2/fake/{REPO}/manifests/bare", bare)


async def test_manifest_digest_mismatch_refused(proxy: Client, upstream: FakeUpstream) -> None:
    """An upstream answering a digest with other bytes is not believed, and nothing is cached."""
    image = populate(upstream)["oci"]
    other = populate(upstream)["docker"]
    upstream.manifests[(REPO, image.digest)] = (other.media_type, other.manifest)
    path = f"/v2/fake/{REPO}/manifests/{image.digest}"
    await assert_error(await proxy.get(path), 503, "UNAVAILABLE")
    upstream.manifests[(REPO, image.digest)] = (image.media_type, image.manifest)
    await get_manifest(proxy, path, image)


async def test_unknown_manifest(proxy: Client, upstream: FakeUpstream) -> None:
    populate(upstream)
    await assert_error(await proxy.get(f"/v2/fake/{REPO}/manifests/nope"), 404, "MANIFEST_UNKNOWN")
    await assert_error(
        await proxy.get(f"/v2/fake/{REPO}/manifests/{digest_of(b'x')}"), 404, "MANIFEST_UNKNOWN"
    )
    await assert_error(await proxy.head(f"/v2/fake/{REPO}/manifests/nope"), 404, "")


@pytest.mark.parametrize("path", ["alpine", "library/alpine"])
async def test_docker_hub_official_images(
    make_proxy: MakeProxy, upstream: FakeUpstream, path: str
) -> None:
    image = upstream.add_image("library/alpine", "3", seed="alpine")
    user_image = upstream.add_image("someone/app", "1", seed="someone")
    proxy = await make_proxy(name="docker.io")
    await get_manifest(proxy, f"/v2/docker.io/{path}/manifests/3", image)
    for digest, data in image.blobs.items():
        resp = await proxy.get(f"/v2/docker.io/{path}/blobs/{digest}")
        assert resp.status == 200 and await resp.read() == data
        assert upstream.blob_gets("library/alpine", digest) == 1
    assert upstream.count("GET", "/v2/library/alpine/manifests/3") == 1
    assert not [s for s in upstream.seen if s.path.startswith("/v2/alpine/")]
    await get_manifest(proxy, "/v2/docker.io/someone/app/manifests/1", user_image)


async def test_one_part_names_elsewhere_stay_as_they_are(
    proxy: Client, upstream: FakeUpstream
) -> None:
    image = upstream.add_image("alpine", "3", seed="plain")
    await get_manifest(proxy, "/v2/fake/alpine/manifests/3", image)
    assert upstream.count("GET", "/v2/alpine/manifests/3") == 1


async def test_tag_list(proxy: Client, upstream: FakeUpstream) -> None:
    populate(upstream)
    resp = await proxy.get(f"/v2/fake/{REPO}/tags/list")
    assert resp.status == 200
    assert await resp.json() == {
        "name": f"fake/{REPO}",
        "tags": ["artifact", "docker", "index", "list", "oci"],
    }
    resp = await proxy.get(f"/v2/fake/{REPO}/tags/list", params={"n": "2", "last": "docker"})
    assert (await resp.json())["tags"] == ["index", "list"]
    assert 'rel="next"' in resp.headers["Link"]
    await assert_error(await proxy.get("/v2/fake/lib/none/tags/list"), 404, "NAME_UNKNOWN")


async def test_tag_list_from_cache_when_upstream_down(
    proxy: Client, upstream: FakeUpstream
) -> None:
    populate(upstream)
    for tag in ("oci", "index"):
        assert (await proxy.get(f"/v2/fake/{REPO}/manifests/{tag}")).status == 200
    upstream.down = True
    resp = await proxy.get(f"/v2/fake/{REPO}/tags/list")
    assert resp.status == 200
    assert await resp.json() == {"name": f"fake/{REPO}", "tags": ["index", "oci"]}


async def referrers(client: Client, subject: str, **params: str) -> list[dict[str, Any]]:
    resp = await client.get(f"/v2/fake/{REPO}/referrers/{subject}", params=params)
    assert resp.status == 200, await resp.text()
    assert resp.headers["Content-Type"] == OCI_INDEX
    index = await resp.json(content_type=None)
    assert index["schemaVersion"] == 2 and index["mediaType"] == OCI_INDEX
    manifests: list[dict[str, Any]] = index["manifests"]
    return manifests


async def test_referrers_from_upstream(proxy: Client, upstream: FakeUpstream) -> None:
    images = populate(upstream)
    subject, artifact = images["oci"], images["artifact"]
    wanted = {"mediaType": artifact.media_type, "digest": artifact.digest}
    found = await referrers(proxy, subject.digest)
    assert [{k: m[k] for k in wanted} for m in found] == [wanted]
    assert found[0]["size"] == len(artifact.manifest)
    assert found[0]["artifactType"] == ARTIFACT
    assert [m["digest"] for m in await referrers(proxy, subject.digest, artifactType=ARTIFACT)] == [
        artifact.digest
    ]
    assert await referrers(proxy, subject.digest, artifactType="application/other") == []
    assert await referrers(proxy, images["docker"].digest) == []


async def test_referrers_from_cache_without_upstream_api(
    proxy: Client, upstream: FakeUpstream
) -> None:
    images = populate(upstream)
    subject, artifact = images["oci"], images["artifact"]
    upstream.referrers_api = False
    assert await referrers(proxy, subject.digest) == []
    await get_manifest(proxy, f"/v2/fake/{REPO}/manifests/{artifact.digest}", artifact)
    found = await referrers(proxy, subject.digest)
    assert [m["digest"] for m in found] == [artifact.digest]
    assert found[0]["artifactType"] == ARTIFACT
    assert found[0]["annotations"] == {"org.example.kind": "sbom"}
    upstream.referrers_api, upstream.down = True, True  # down: the cache answers too
    assert [m["digest"] for m in await referrers(proxy, subject.digest)] == [artifact.digest]


# -- read-only ------------------------------------------------------------------------------


async def test_writes_under_upstream_prefix_denied(proxy: Client, upstream: FakeUpstream) -> None:
    image = populate(upstream)["oci"]
    blob = next(iter(image.blobs))
    base = f"/v2/fake/{REPO}"
    upload_id = "0b8e9e5a-3c2d-4c5e-9f00-0123456789ab"
    attempts = [
        proxy.post(f"{base}/blobs/uploads/"),
        proxy.post(f"{base}/blobs/uploads/", params={"digest": digest_of(b"abc")}, data=b"abc"),
        proxy.post(f"{base}/blobs/uploads/", params={"mount": blob, "from": "fake/lib/other"}),
        proxy.post(f"{base}/blobs/uploads/", params={"mount": blob}),
        proxy.patch(f"{base}/blobs/uploads/{upload_id}", data=b"abc"),
        proxy.put(f"{base}/blobs/uploads/{upload_id}", params={"digest": digest_of(b"")}),
        proxy.delete(f"{base}/blobs/uploads/{upload_id}"),
        proxy.put(
            f"{base}/manifests/oci",
            data=image.manifest,
            headers={"Content-Type": image.media_type},
        ),
        proxy.put(
            f"{base}/manifests/{image.digest}",
            data=image.manifest,
            headers={"Content-Type": image.media_type},
        ),
        proxy.delete(f"{base}/manifests/oci"),
        proxy.delete(f"{base}/manifests/{image.digest}"),
        proxy.delete(f"{base}/blobs/{blob}"),
    ]
    for attempt in attempts:
        resp = await attempt
        await assert_error(resp, 403, "DENIED")
    assert upstream.total() == 0
    # and after the content is cached, still nothing can be changed or removed
    await get_manifest(proxy, f"{base}/manifests/oci", image)
    await assert_error(await proxy.delete(f"{base}/manifests/oci"), 403, "DENIED")
    await get_manifest(proxy, f"{base}/manifests/oci", image)


# -- routing: ?ns= and default_upstream -------------------------------------------------------


@pytest.mark.parametrize("by", ["name", "host"])
async def test_ns_selects_upstream(proxy: Client, upstream: FakeUpstream, by: str) -> None:
    image = populate(upstream)["oci"]
    assert upstream.base_url is not None
    ns = "fake" if by == "name" else f"127.0.0.1:{upstream.base_url.port}"
    resp = await proxy.get(f"/v2/{REPO}/manifests/oci", params={"ns": ns})
    assert resp.status == 200, await resp.text()
    assert await resp.read() == image.manifest
    assert resp.headers["Docker-Content-Digest"] == image.digest
    assert resp.headers["OCI-Namespace"] == ns
    for digest, data in image.blobs.items():
        resp = await proxy.get(f"/v2/{REPO}/blobs/{digest}", params={"ns": ns})
        assert resp.status == 200 and await resp.read() == data
        assert resp.headers["OCI-Namespace"] == ns
    # the same content under the prefixed name: already cached
    await get_manifest(proxy, f"/v2/fake/{REPO}/manifests/oci", image)
    assert upstream.count("GET", f"/v2/{REPO}/manifests/oci") == 1


async def test_ns_with_the_prefix_already_in_the_path(
    proxy: Client, upstream: FakeUpstream
) -> None:
    """containerd's ``override_path = true`` on ``[host."http://regproxy/v2/fake"]`` (the
    form Harbor's proxy projects use) sends ``/v2/fake/<repo>?ns=<upstream>``: the path is
    already under the upstream's prefix, and must not be prefixed again."""
    image = populate(upstream)["oci"]
    assert upstream.base_url is not None
    ns = f"127.0.0.1:{upstream.base_url.port}"
    resp = await proxy.get(f"/v2/fake/{REPO}/manifests/oci", params={"ns": ns})
    assert resp.status == 200, await resp.text()
    assert await resp.read() == image.manifest
    assert resp.headers["OCI-Namespace"] == ns
    for digest, data in image.blobs.items():
        resp = await proxy.get(f"/v2/fake/{REPO}/blobs/{digest}", params={"ns": ns})
        assert resp.status == 200 and await resp.read() == data
    assert upstream.count("GET", f"/v2/{REPO}/manifests/oci") == 1
    assert upstream.count("GET", f"/v2/fake/{REPO}/manifests/oci") == 0


async def test_ns_unknown_registry(proxy: Client, upstream: FakeUpstream) -> None:
    populate(upstream)
    resp = await proxy.get(f"/v2/{REPO}/manifests/oci", params={"ns": "elsewhere.example"})
    await assert_error(resp, 404, "NAME_UNKNOWN")
    assert "OCI-Namespace" not in resp.headers
    assert upstream.total() == 0


async def test_default_upstream_beside_hosted(
    make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    images = populate(upstream)
    proxy = await make_proxy(default_upstream="fake")
    hosted = await push_image(proxy, "mine/app", "v1", seed="hosted")
    upstream.add_image("mine/app", "v1", seed="upstream's own")  # must never be served

    resp = await proxy.get("/v2/mine/app/manifests/v1")
    assert resp.status == 200 and await resp.read() == hosted.manifest
    assert resp.headers["Docker-Content-Digest"] == hosted.digest
    for digest, data in hosted.blobs.items():
        resp = await proxy.get(f"/v2/mine/app/blobs/{digest}")
        assert resp.status == 200 and await resp.read() == data
    assert not [s for s in upstream.seen if "mine/app" in s.path]

    # names not hosted here come from the default upstream
    image = images["oci"]
    await get_manifest(proxy, f"/v2/{REPO}/manifests/oci", image)
    for digest, data in image.blobs.items():
        resp = await proxy.get(f"/v2/{REPO}/blobs/{digest}")
        assert resp.status == 200 and await resp.read() == data
    resp = await proxy.get(f"/v2/{REPO}/tags/list")
    assert (await resp.json())["tags"] == ["artifact", "docker", "index", "list", "oci"]
    await get_manifest(proxy, f"/v2/fake/{REPO}/manifests/index", images["index"])
