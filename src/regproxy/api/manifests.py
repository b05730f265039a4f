"""Manifests: GET and HEAD (stored bytes, unchanged), PUT (by tag or digest), DELETE."""

from __future__ import annotations

from aiohttp import web

from regproxy import oci
from regproxy.api.keys import CONFIG
from regproxy.api.request import registry, repo_name
from regproxy.errors import ManifestTooLarge
from regproxy.meta.base import ManifestRow


def _headers(manifest: ManifestRow) -> dict[str, str]:
    return {
        "Content-Type": manifest.media_type,
        oci.CONTENT_DIGEST: str(manifest.digest),
        "ETag": f'"{manifest.digest}"',
    }


async def get_manifest(request: web.Request) -> web.Response:
    reg = registry(request)
    manifest = await reg.get_manifest(repo_name(request), request.match_info["reference"])
    headers = _headers(manifest)
    if request.headers.get("If-None-Match") == headers["ETag"]:
        return web.Response(status=304, headers=headers)
    return web.Response(body=manifest.content, headers=headers)


async def head_manifest(request: web.Request) -> web.Response:
    reg = registry(request)
    manifest = await reg.get_manifest(repo_name(request), request.match_info["reference"])
    headers = _headers(manifest)
    headers["Content-Length"] = str(len(manifest.content))
    return web.Response(headers=headers)


async def _read_limited(request: web.Request, limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise ManifestTooLarge(f"manifest is {request.content_length} bytes, the limit is {limit}")
    body = bytearray()
    while chunk := await request.content.readany():
        body += chunk
        if len(body) > limit:
            raise ManifestTooLarge(f"manifest exceeds the limit of {limit} bytes")
    return bytes(body)


async def put_manifest(request: web.Request) -> web.Response:
    repo = repo_name(request)
    reference = request.match_info["reference"]
    content = await _read_limited(request, request.app[CONFIG].limits.manifest_max_bytes)
    tags = request.query.getall("tag", [])
    manifest = await registry(request).put_manifest(
        repo, reference, request.headers.get("Content-Type"), content, tags
    )
    response = web.Response(
        status=201,
        headers={
            "Location": f"/v2/{repo}/manifests/{manifest.digest}",
            oci.CONTENT_DIGEST: str(manifest.digest),
            "Content-Length": "0",
        },
    )
    if manifest.subject is not None:
        response.headers[oci.OCI_SUBJECT] = str(manifest.subject)
    for tag in tags:
        response.headers.add(oci.OCI_TAG, tag)
    return response


async def delete_manifest(request: web.Request) -> web.Response:
    await registry(request).delete_manifest(repo_name(request), request.match_info["reference"])
    return web.Response(status=202, headers={"Content-Length": "0"})
