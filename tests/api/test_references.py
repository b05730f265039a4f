"""Path components that cannot be valid: each refused with its own component's error code.

A manifest GET or HEAD of a reference that is neither a tag nor a digest names no manifest
that could exist: 404 MANIFEST_UNKNOWN, as distribution answers (a PUT stays TAG_INVALID).
Percent-escapes are refused in every component, with the code of the component that holds
them; only an escape in the repository name is NAME_INVALID.
"""

from __future__ import annotations

import pytest
from yarl import URL

from tests.helpers import (
    OCI_MANIFEST,
    Client,
    assert_error,
    canonical,
    digest_of,
    image_manifest,
    push_image,
)

INVALID_REFERENCES = [
    ".INVALID_MANIFEST_NAME",
    "-leading-dash",
    "a" * 129,
    "a+b",
    "sha256:abc",
    "md5:" + "0" * 32,
    "sha256:" + "Z" * 64,
]
UPLOAD_ID = "00000000-0000-4000-8000-000000000000"


async def _raw(client: Client, method: str, path: str, data: bytes = b"") -> tuple[int, str]:
    """Send ``path`` exactly as written (the test client would re-encode escapes)."""
    root = client.make_url("/")
    url = URL(f"{root.scheme}://{root.host}:{root.port}{path}", encoded=True)
    async with client.session.request(method, url, data=data) as resp:
        assert resp.url.raw_path == path.split("?")[0]
        if method == "HEAD":
            return resp.status, ""
        body = await resp.json()
        return resp.status, body["errors"][0]["code"]


@pytest.mark.parametrize("reference", INVALID_REFERENCES)
async def test_get_and_head_of_an_invalid_reference_are_unknown(
    client: Client, reference: str
) -> None:
    await push_image(client, "app", "v1")
    resp = await client.get(f"/v2/app/manifests/{reference}")
    error = await assert_error(resp, 404, "MANIFEST_UNKNOWN")
    assert error["detail"] == {"reference": reference}
    await assert_error(await client.head(f"/v2/app/manifests/{reference}"), 404, "")


async def test_put_of_an_invalid_tag_stays_tag_invalid(client: Client) -> None:
    content = canonical(image_manifest(b"c", []))
    headers = {"Content-Type": OCI_MANIFEST}
    resp = await client.put("/v2/app/manifests/.INVALID", data=content, headers=headers)
    await assert_error(resp, 400, "TAG_INVALID")


DIGEST = digest_of(b"blob bytes")


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", f"/v2/app/blobs/{DIGEST}%0a", 400, "DIGEST_INVALID"),
        ("HEAD", f"/v2/app/blobs/{DIGEST}%0a", 400, ""),
        ("DELETE", f"/v2/app/blobs/{DIGEST}%0a", 400, "DIGEST_INVALID"),
        ("GET", f"/v2/app/blobs/sha256%3a{DIGEST[7:]}", 400, "DIGEST_INVALID"),
        ("GET", f"/v2/app/blobs/{DIGEST[:-1]}%61", 400, "DIGEST_INVALID"),
        ("GET", f"/v2/app/referrers/{DIGEST}%0a", 400, "DIGEST_INVALID"),
        ("GET", "/v2/app/manifests/latest%0a", 404, "MANIFEST_UNKNOWN"),
        ("HEAD", "/v2/app/manifests/latest%0a", 404, ""),
        ("GET", "/v2/app/manifests/%6catest", 404, "MANIFEST_UNKNOWN"),
        ("GET", f"/v2/app/manifests/{DIGEST}%0a", 404, "MANIFEST_UNKNOWN"),
        ("PUT", "/v2/app/manifests/latest%0a", 400, "TAG_INVALID"),
        ("PUT", "/v2/app/manifests/%6catest", 400, "TAG_INVALID"),
        ("PUT", f"/v2/app/manifests/{DIGEST}%0a", 400, "DIGEST_INVALID"),
        ("DELETE", "/v2/app/manifests/latest%0a", 400, "TAG_INVALID"),
        ("GET", f"/v2/app/blobs/uploads/{UPLOAD_ID}%0a", 404, "BLOB_UPLOAD_UNKNOWN"),
        ("PATCH", f"/v2/app/blobs/uploads/{UPLOAD_ID[:-1]}%30", 404, "BLOB_UPLOAD_UNKNOWN"),
        (
            "PUT",
            f"/v2/app/blobs/uploads/{UPLOAD_ID}%0a?digest={DIGEST}",
            404,
            "BLOB_UPLOAD_UNKNOWN",
        ),
        ("DELETE", f"/v2/app/blobs/uploads/{UPLOAD_ID}%0a", 404, "BLOB_UPLOAD_UNKNOWN"),
        # The name holds the escape: NAME_INVALID, whatever follows.
        ("GET", f"/v2/%61pp/blobs/{DIGEST}", 400, "NAME_INVALID"),
        ("GET", f"/v2/a%2fb/blobs/{DIGEST}%0a", 400, "NAME_INVALID"),
        ("GET", "/v2/a%2Fb/manifests/latest", 400, "NAME_INVALID"),
        ("GET", "/v2/%2e%2e/tags/list", 400, "NAME_INVALID"),
        ("POST", "/v2/a%2e/blobs/uploads/", 400, "NAME_INVALID"),
    ],
)
async def test_percent_escapes_get_the_code_of_their_component(
    client: Client, method: str, path: str, status: int, code: str
) -> None:
    image = await push_image(client, "app", "latest")
    data = image.manifest if method == "PUT" and "/manifests/" in path else b""
    assert await _raw(client, method, path, data) == (status, code)
    # Nothing was changed by any of them.
    resp = await client.get("/v2/app/manifests/latest")
    assert await resp.read() == image.manifest
    assert (await (await client.get("/v2/app/tags/list")).json())["tags"] == ["latest"]
