"""The referrers API: manifests whose subject is a digest, as an OCI index."""

from __future__ import annotations

from typing import Any

from tests.helpers import (
    EMPTY_JSON,
    OCI_EMPTY,
    OCI_INDEX,
    OCI_MANIFEST,
    Client,
    Image,
    assert_error,
    canonical,
    descriptor,
    digest_of,
    push_blob,
    push_image,
    push_manifest,
)

SIGNATURE = "application/vnd.example.signature.v1+json"
SBOM = "application/vnd.example.sbom.v1+json"


async def _refer(
    client: Client,
    subject: Image,
    payload: bytes,
    *,
    artifact_type: str | None = None,
    config_type: str = OCI_EMPTY,
    annotations: dict[str, str] | None = None,
    repo: str = "app",
) -> tuple[bytes, str]:
    """Push an artifact manifest whose subject is ``subject``; returns (bytes, digest)."""
    config = EMPTY_JSON if config_type == OCI_EMPTY else b'{"config": true}'
    await push_blob(client, repo, config)
    await push_blob(client, repo, payload)
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor(config_type, config),
        "layers": [descriptor("application/octet-stream", payload)],
        "subject": subject.descriptor(),
    }
    if artifact_type is not None:
        doc["artifactType"] = artifact_type
    if annotations is not None:
        doc["annotations"] = annotations
    content = canonical(doc)
    return content, await push_manifest(client, repo, digest_of(content), content)


async def _referrers(client: Client, repo: str, digest: str, **params: str) -> Any:
    resp = await client.get(f"/v2/{repo}/referrers/{digest}", params=params)
    assert resp.status == 200, await resp.text()
    assert resp.headers["Content-Type"] == OCI_INDEX
    if params.get("artifactType"):
        assert resp.headers["OCI-Filters-Applied"] == "artifactType"
    else:
        assert "OCI-Filters-Applied" not in resp.headers
    index = await resp.json()
    assert index["schemaVersion"] == 2
    assert index["mediaType"] == OCI_INDEX
    return index["manifests"]


async def test_referrers(client: Client) -> None:
    image = await push_image(client, "app", "v1")
    sig, sig_digest = await _refer(
        client, image, b"signature", artifact_type=SIGNATURE, annotations={"signed.by": "me"}
    )
    sbom, sbom_digest = await _refer(client, image, b"sbom", config_type=SBOM)
    plain, plain_digest = await _refer(client, image, b"plain")
    # Another image, and a referrer of that one, are not listed.
    other = await push_image(client, "app", "v2", seed="other")
    await _refer(client, other, b"other signature", artifact_type=SIGNATURE)

    expected = {
        sig_digest: {
            "mediaType": OCI_MANIFEST,
            "digest": sig_digest,
            "size": len(sig),
            "artifactType": SIGNATURE,
            "annotations": {"signed.by": "me"},
        },
        sbom_digest: {
            "mediaType": OCI_MANIFEST,
            "digest": sbom_digest,
            "size": len(sbom),
            "artifactType": SBOM,  # no artifactType: the config's media type stands in
        },
        plain_digest: {
            "mediaType": OCI_MANIFEST,
            "digest": plain_digest,
            "size": len(plain),
            "artifactType": OCI_EMPTY,
        },
    }
    manifests = await _referrers(client, "app", image.digest)
    assert sorted(manifests, key=lambda d: d["digest"]) == [
        expected[digest] for digest in sorted(expected)
    ]

    manifests = await _referrers(client, "app", image.digest, artifactType=SIGNATURE)
    assert manifests == [expected[sig_digest]]
    manifests = await _referrers(client, "app", image.digest, artifactType=SBOM)
    assert manifests == [expected[sbom_digest]]
    manifests = await _referrers(client, "app", image.digest, artifactType="application/none")
    assert manifests == []
    # An empty filter is no filter.
    assert len(await _referrers(client, "app", image.digest, artifactType="")) == 3


async def test_index_referrer(client: Client) -> None:
    image = await push_image(client, "app", "v1")
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "artifactType": SBOM,
        "manifests": [image.descriptor()],
        "subject": image.descriptor(),
        "annotations": {"org.opencontainers.image.created": "2024-01-01T00:00:00Z"},
    }
    content = canonical(doc)
    digest = await push_manifest(client, "app", "sboms", content)
    assert await _referrers(client, "app", image.digest) == [
        {
            "mediaType": OCI_INDEX,
            "digest": digest,
            "size": len(content),
            "artifactType": SBOM,
            "annotations": {"org.opencontainers.image.created": "2024-01-01T00:00:00Z"},
        }
    ]


async def test_referrers_are_per_repository(client: Client) -> None:
    image = await push_image(client, "app", "v1")
    await push_image(client, "copy", "v1")  # same bytes, same digest, other repository
    await _refer(client, image, b"signature", artifact_type=SIGNATURE)
    assert len(await _referrers(client, "app", image.digest)) == 1
    assert await _referrers(client, "copy", image.digest) == []


async def test_referrers_of_unknown_subject(client: Client) -> None:
    unknown = digest_of(b"nothing")
    assert await _referrers(client, "app", unknown) == []
    assert await _referrers(client, "app", unknown, artifactType=SIGNATURE) == []


async def test_referrers_bad_digest(client: Client) -> None:
    for bad in ("latest", "sha256:abc", "md5:" + "0" * 32):
        await assert_error(await client.get(f"/v2/app/referrers/{bad}"), 400, "DIGEST_INVALID")


async def test_deleted_referrer_is_not_listed(client: Client) -> None:
    image = await push_image(client, "app", "v1")
    _, sig_digest = await _refer(client, image, b"signature", artifact_type=SIGNATURE)
    _, sbom_digest = await _refer(client, image, b"sbom", artifact_type=SBOM)
    assert (await client.delete(f"/v2/app/manifests/{sig_digest}")).status == 202
    manifests = await _referrers(client, "app", image.digest)
    assert [d["digest"] for d in manifests] == [sbom_digest]
    assert await _referrers(client, "app", image.digest, artifactType=SIGNATURE) == []


async def test_referrers_of_a_subject_never_pushed(client: Client) -> None:
    content = b'{"never": "pushed"}'
    subject = Image("app", content, OCI_MANIFEST, digest_of(content))
    _, digest = await _refer(client, subject, b"early signature", artifact_type=SIGNATURE)
    manifests = await _referrers(client, "app", subject.digest)
    assert [d["digest"] for d in manifests] == [digest]
    await assert_error(
        await client.get(f"/v2/app/manifests/{subject.digest}"), 404, "MANIFEST_UNKNOWN"
    )
