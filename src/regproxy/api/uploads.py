"""Blob uploads: start (POST, also monolithic and mount), chunks (PATCH), finish (PUT),
status (GET) and cancel (DELETE)."""

from __future__ import annotations

import re

from aiohttp import web

from regproxy import oci
from regproxy.api.request import body_chunks, has_body, registry, repo_name
from regproxy.auth.service import CALLER, MOUNT_SOURCE_DENIED
from regproxy.errors import BlobUploadUnknown, DigestInvalid, RangeInvalid
from regproxy.meta.base import BlobRow, UploadRow
from regproxy.oci import Digest
from regproxy.registry.base import ContentRange
from regproxy.registry.hosted import range_header

_CONTENT_RANGE_RE = re.compile(r"^(?:bytes[ =])?(\d+)-(\d+)$")
_UPLOAD_ID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def _upload_id(request: web.Request) -> str:
    upload_id = request.match_info["upload_id"]
    if not _UPLOAD_ID_RE.match(upload_id):
        raise BlobUploadUnknown(detail={"upload_id": upload_id[:100]})
    return upload_id


def _upload_response(status: int, repo: str, upload: UploadRow) -> web.Response:
    return web.Response(
        status=status,
        headers={
            "Location": f"/v2/{repo}/blobs/uploads/{upload.id}",
            "Range": range_header(upload.offset),
            oci.UPLOAD_UUID: upload.id,
            "Content-Length": "0",
        },
    )


def _created(repo: str, blob: BlobRow) -> web.Response:
    return web.Response(
        status=201,
        headers={
            "Location": f"/v2/{repo}/blobs/{blob.digest}",
            oci.CONTENT_DIGEST: str(blob.digest),
            "Content-Length": "0",
        },
    )


def _query_digest(request: web.Request) -> Digest:
    raw = request.query.get("digest")
    if not raw:
        raise DigestInvalid("the digest query parameter is required to finish an upload")
    return Digest.parse(raw)


def _content_range(request: web.Request) -> ContentRange | None:
    raw = request.headers.get("Content-Range")
    if raw is None:
        return None
    match = _CONTENT_RANGE_RE.match(raw.strip())
    if match is None or int(match.group(2)) < int(match.group(1)):
        raise RangeInvalid(f"malformed Content-Range {raw[:100]!r}")
    return ContentRange(int(match.group(1)), int(match.group(2)))


async def post_upload(request: web.Request) -> web.Response:
    reg = registry(request)
    repo = repo_name(request)
    query = request.query
    if "mount" in query and not request.get(MOUNT_SOURCE_DENIED, False):
        source = oci.parse_name(query["from"]) if "from" in query else None
        # Without from, the blob may come from any repository the caller may pull.
        caller = request[CALLER]
        may_pull = None if caller.may_pull_everything() else caller.may_pull
        digest = Digest.parse(query["mount"])
        mounted = await reg.mount_blob(repo, digest, source, may_pull=may_pull)
        if mounted is not None:
            return _created(repo, mounted)
    if "digest" in query:
        digest = Digest.parse(query["digest"])
        return _created(repo, await reg.put_blob(repo, digest, body_chunks(request)))
    algorithm = oci.check_algorithm(query.get("digest-algorithm", "sha256"))
    upload = await reg.start_upload(repo, algorithm)
    return _upload_response(202, repo, upload)


async def get_upload(request: web.Request) -> web.Response:
    repo = repo_name(request)
    upload = await registry(request).get_upload(repo, _upload_id(request))
    return _upload_response(204, repo, upload)


async def patch_upload(request: web.Request) -> web.Response:
    repo = repo_name(request)
    content_range = _content_range(request)
    upload = await registry(request).append_upload(
        repo, _upload_id(request), body_chunks(request), content_range
    )
    return _upload_response(202, repo, upload)


async def put_upload(request: web.Request) -> web.Response:
    repo = repo_name(request)
    digest = _query_digest(request)
    content_range = _content_range(request)
    body = body_chunks(request) if has_body(request) else None
    blob = await registry(request).finish_upload(
        repo, _upload_id(request), body, digest, content_range
    )
    return _created(repo, blob)


async def delete_upload(request: web.Request) -> web.Response:
    await registry(request).cancel_upload(repo_name(request), _upload_id(request))
    return web.Response(status=204)
