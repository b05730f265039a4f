"""Hostile names, digests, tags and upload ids sent raw to ``regproxy serve``.

Requests go out byte for byte as written here (no client-side normalisation or escaping).
Each is refused with the expected error, and afterwards nothing exists outside the data
directory and nothing unexpected inside it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import pytest

from tests.e2e.procs import RegproxyProcess, raw_http, regproxy

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio]

ZERO_DIGEST = "sha256:" + "0" * 64
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
# Everything the data directory may hold after these requests (paths relative to it).
EXPECTED_DATA_ENTRIES = [
    r"metadata\.sqlite(-wal|-shm|-journal)?",
    r"blobs",
    r"blobs/uploads",
    rf"blobs/uploads/{UUID}",
    r"blobs/blobs",
    r"blobs/blobs/sha256",
    r"blobs/blobs/sha256/[0-9a-f]{2}",
    rf"blobs/blobs/sha256/[0-9a-f]{{2}}/[0-9a-f]{{64}}\.{UUID}",
    r"spool",
]


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def hostile_requests(sentinel: Path) -> list[tuple[str, str, int, str]]:
    """(method, target, status, error code) for each hostile request."""
    up = "../" * (len(sentinel.parts) + 4)  # from any file under the data dir up to /
    to_sentinel = f"{up}{sentinel.relative_to('/')}"
    long_name = "a" * 10_000
    many_parts = "/".join(["ab"] * 3_000)
    return [
        # names: dot segments, escapes, absolute paths, over-long
        ("POST", "/v2/../../etc/blobs/uploads/", 400, "NAME_INVALID"),
        ("POST", f"/v2/{to_sentinel}/blobs/uploads/", 400, "NAME_INVALID"),
        ("POST", f"/v2/e2e/{to_sentinel}/blobs/uploads/", 400, "NAME_INVALID"),
        ("POST", "/v2/%2e%2e/blobs/uploads/", 400, "NAME_INVALID"),
        ("POST", "/v2/%2E%2E/%2e%2e/blobs/uploads/", 400, "NAME_INVALID"),
        ("POST", "/v2/e2e%2f..%2f..%2fescape/blobs/uploads/", 400, "NAME_INVALID"),
        ("POST", "/v2/e2e%2Fsub/blobs/uploads/", 400, "NAME_INVALID"),
        ("POST", f"/v2/{sentinel}/blobs/uploads/", 400, "NAME_INVALID"),
        ("POST", f"/v2/{sentinel}/x/blobs/uploads/?digest={ZERO_DIGEST}", 400, "NAME_INVALID"),
        ("POST", "/v2//etc/passwd/blobs/uploads/", 400, "NAME_INVALID"),
        ("POST", "//etc/passwd/blobs/uploads/", 404, "NOT_FOUND"),
        ("POST", "/v2/./e2e/blobs/uploads/", 400, "NAME_INVALID"),
        ("POST", "/v2/e2e/./x/blobs/uploads/", 400, "NAME_INVALID"),
        ("POST", "/v2/.hidden/blobs/uploads/", 400, "NAME_INVALID"),
        ("POST", "/v2/e2e\\..\\..\\x/blobs/uploads/", 400, "NAME_INVALID"),
        ("POST", f"/v2/{long_name}/blobs/uploads/", 400, "NAME_INVALID"),
        ("GET", f"/v2/{long_name}/tags/list", 400, "NAME_INVALID"),
        ("PUT", f"/v2/{long_name}/manifests/v1", 400, "NAME_INVALID"),
        ("POST", f"/v2/{many_parts}/blobs/uploads/", 400, "NAME_INVALID"),
        ("GET", f"/v2/{to_sentinel}/tags/list", 400, "NAME_INVALID"),
        ("GET", f"/v2/{to_sentinel}/manifests/latest", 400, "NAME_INVALID"),
        ("PUT", f"/v2/{to_sentinel}/manifests/latest", 400, "NAME_INVALID"),
        ("GET", f"/v2/{to_sentinel}/blobs/{ZERO_DIGEST}", 400, "NAME_INVALID"),
        ("DELETE", f"/v2/{to_sentinel}/blobs/{ZERO_DIGEST}", 400, "NAME_INVALID"),
        # a hostile mount source
        (
            "POST",
            f"/v2/e2e/ok/blobs/uploads/?mount={ZERO_DIGEST}&from={to_sentinel}",
            400,
            "NAME_INVALID",
        ),
        # digests (an escape is refused with the code of the component holding it)
        ("GET", "/v2/e2e/ok/blobs/sha256:..", 400, "DIGEST_INVALID"),
        ("GET", "/v2/e2e/ok/blobs/sha256:../../../etc/passwd", 404, "NOT_FOUND"),
        ("GET", "/v2/e2e/ok/blobs/sha256:..%2f..%2fetc", 400, "DIGEST_INVALID"),
        ("POST", f"/v2/e2e/ok/blobs/uploads/?digest=sha256:{to_sentinel}", 400, "DIGEST_INVALID"),
        (
            "POST",
            "/v2/e2e/ok/blobs/uploads/?digest=sha256:" + "0" * 64 + "/../x",
            400,
            "DIGEST_INVALID",
        ),
        ("POST", "/v2/e2e/ok/blobs/uploads/?digest=../" + "0" * 64, 400, "DIGEST_INVALID"),
        # upload ids
        ("GET", "/v2/e2e/ok/blobs/uploads/..", 404, "BLOB_UPLOAD_UNKNOWN"),
        ("PATCH", "/v2/e2e/ok/blobs/uploads/....", 404, "BLOB_UPLOAD_UNKNOWN"),
        ("PATCH", f"/v2/e2e/ok/blobs/uploads/{to_sentinel}", 404, "NOT_FOUND"),
        (
            "PUT",
            f"/v2/e2e/ok/blobs/uploads/..%2f..%2fx?digest={ZERO_DIGEST}",
            404,
            "BLOB_UPLOAD_UNKNOWN",
        ),
        ("DELETE", "/v2/e2e/ok/blobs/uploads/%2e%2e", 404, "BLOB_UPLOAD_UNKNOWN"),
        # tags
        ("PUT", "/v2/e2e/ok/manifests/..", 400, "TAG_INVALID"),
        ("PUT", "/v2/e2e/ok/manifests/..%2f..%2fx", 400, "TAG_INVALID"),
        ("GET", "/v2/e2e/ok/manifests/..%2f..%2fx", 404, "MANIFEST_UNKNOWN"),
        ("PUT", "/v2/e2e/ok/manifests/.hidden", 400, "TAG_INVALID"),
    ]


async def test_hostile_names_stay_inside_data_dir(tmp_path: Path) -> None:
    sentinel = tmp_path / "sentinel"
    (sentinel / "blobs" / "uploads").mkdir(parents=True)
    base = tmp_path / "regproxy"
    async with regproxy(base) as server:
        assert server.data_dir.parent == sentinel.parent / "regproxy"
        results = []
        for method, target, status, code in hostile_requests(sentinel):
            body = b"{}" if method == "PUT" and "/manifests/" in target else b""
            resp = await raw_http(server.port, method, target, body=body)
            try:
                got_code = json.loads(resp.body)["errors"][0]["code"]
            except (ValueError, KeyError, IndexError, TypeError):
                got_code = f"not an error body: {resp.body[:60]!r}"
            results.append((method, target[:90], resp.status, got_code, status, code))
        wrong = [r for r in results if r[2:4] != r[4:6]]
        assert not wrong, "\n".join(
            f"{r[0]} {r[1]} -> {r[2]} {r[3]}, want {r[4]} {r[5]}" for r in wrong
        )

        upload_ids = await legitimate_requests(server)
        assert await healthy(server)

    check_nothing_escaped(tmp_path, sentinel, base, server.data_dir, upload_ids)


def check_nothing_escaped(
    tmp_path: Path, sentinel: Path, base: Path, data_dir: Path, upload_ids: set[str]
) -> None:
    assert tree(sentinel) == {"blobs", "blobs/uploads"}, "something was written next to data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["regproxy", "sentinel"]
    assert sorted(p.name for p in base.iterdir()) == ["data", "regproxy-0.log"]
    entries = tree(data_dir)
    unexpected = [e for e in entries if not any(re.fullmatch(p, e) for p in EXPECTED_DATA_ENTRIES)]
    assert not unexpected, unexpected
    assert {e.rsplit("/", 1)[1] for e in entries if e.startswith("blobs/uploads/")} == upload_ids
    assert len([e for e in entries if e.count("/") == 4]) == 1, "one blob file: the one pushed"


async def legitimate_requests(server: RegproxyProcess) -> set[str]:
    """A blob pushed, an upload started through an absolute-form request line; only these
    may leave files. Returns the ids of the uploads left open."""
    data = os.urandom(1000)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    pushed = await raw_http(
        server.port, "POST", f"/v2/e2e/ok/blobs/uploads/?digest={digest}", body=data
    )
    assert pushed.status == 201, pushed.body
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": digest,
                "size": len(data),
            },
            "layers": [],
        }
    ).encode()
    tagged = await raw_http(
        server.port,
        "PUT",
        "/v2/e2e/ok/manifests/v1",
        headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"},
        body=manifest,
    )
    assert tagged.status == 201, tagged.body
    started = await raw_http(
        server.port, "POST", f"http://evil.example/v2/e2e/ok/blobs/uploads/?x=/../../{digest}"
    )
    assert started.status == 202, started.body
    assert started.headers["location"].startswith("/v2/e2e/ok/blobs/uploads/")
    catalog = await raw_http(server.port, "GET", "/v2/_catalog")
    assert json.loads(catalog.body) == {"repositories": ["e2e/ok"]}
    return {started.headers["docker-upload-uuid"]}


async def healthy(server: RegproxyProcess) -> bool:
    return (await raw_http(server.port, "GET", "/healthz")).status == 200 and server.alive()
