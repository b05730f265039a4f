"""Deeply nested JSON in a pushed manifest is MANIFEST_INVALID, never a 500."""

from __future__ import annotations

import json

import pytest

from tests.helpers import (
    OCI_INDEX,
    OCI_MANIFEST,
    Client,
    assert_error,
    canonical,
    image_manifest,
    push_blob,
    push_manifest,
)

CONFIG = b'{"architecture":"amd64","os":"linux"}'


def _with_annotation(value: str) -> bytes:
    """A valid image manifest whose annotations hold ``value`` (raw JSON text)."""
    doc = image_manifest(CONFIG, [])
    text = canonical(doc).decode()
    return (text[:-1] + ',"annotations":{"a":' + value + "}}").encode()


DEEP = [
    b"[" * 100_000 + b"]" * 100_000,
    b"[" * 100_000,
    b'{"a":' * 1000 + b"1" + b"}" * 1000,
    b'{"schemaVersion":2,"mediaType":"' + OCI_INDEX.encode() + b'","manifests":'
    + b"[" * 5000 + b"]" * 5000 + b"}",
    _with_annotation("[" * 100_000 + "]" * 100_000),
    _with_annotation('{"b":' * 1000 + '"c"' + "}" * 1000),
]  # fmt: skip
DEEP_IDS = ["arrays", "unclosed", "objects", "index", "annotation-arrays", "annotation-objects"]


@pytest.mark.parametrize("body", DEEP, ids=DEEP_IDS)
@pytest.mark.parametrize("reference", ["x", "sha256"])
async def test_deep_nesting_is_manifest_invalid(
    client: Client, body: bytes, reference: str
) -> None:
    await push_blob(client, "app", CONFIG)
    if reference == "sha256":
        reference = "sha256:" + __import__("hashlib").sha256(body).hexdigest()
    headers = {"Content-Type": OCI_MANIFEST}
    resp = await client.put(f"/v2/app/manifests/{reference}", data=body, headers=headers)
    error = await assert_error(resp, 400, "MANIFEST_INVALID")
    assert "nested" in error["message"]
    await assert_error(await client.get(f"/v2/app/manifests/{reference}"), 404, "MANIFEST_UNKNOWN")


async def test_brackets_inside_annotation_values_are_fine(client: Client) -> None:
    await push_blob(client, "app", CONFIG)
    content = _with_annotation(json.dumps("[{" * 50_000))
    digest = await push_manifest(client, "app", "v1", content, OCI_MANIFEST)
    resp = await client.get(f"/v2/app/manifests/{digest}")
    assert await resp.read() == content
