"""Blobs: GET (streamed, with Range), HEAD (metadata only), DELETE."""

from __future__ import annotations

import logging
import re

from aiohttp import web

from regproxy import oci
from regproxy.api.keys import BODY_SENT
from regproxy.api.request import path_digest, registry, repo_name
from regproxy.errors import RangeInvalid
from regproxy.meta.base import BlobRow

log = logging.getLogger(__name__)

_ZERO_SUFFIX_RE = re.compile(r"bytes=-0+")


def _headers(blob: BlobRow) -> dict[str, str]:
    return {
        oci.CONTENT_DIGEST: str(blob.digest),
        "Content-Type": oci.OCTET_STREAM,
        "Accept-Ranges": "bytes",
        "Cache-Control": "max-age=31536000, immutable",
    }


def _range(request: web.Request, size: int) -> tuple[int, int] | None:
    """The requested byte range as (start, length), or None for the whole blob."""
    if "Range" not in request.headers:
        return None
    try:
        wanted = request.http_range
    except ValueError as exc:
        raise RangeInvalid(
            f"malformed Range header {request.headers['Range'][:100]!r}",
            headers={"Content-Range": f"bytes */{size}"},
        ) from exc
    start, stop, _ = wanted.indices(size)
    if wanted.start is None and wanted.stop is None:
        return None
    # aiohttp reads a zero-length suffix (bytes=-0) as start -0, that is the whole blob.
    zero_suffix = _ZERO_SUFFIX_RE.fullmatch(request.headers["Range"].strip()) is not None
    if zero_suffix or start >= size or stop <= start:
        raise RangeInvalid(
            f"range not satisfiable for a blob of {size} bytes",
            headers={"Content-Range": f"bytes */{size}"},
        )
    return start, stop - start


async def head_blob(request: web.Request) -> web.Response:
    blob = await registry(request).stat_blob(repo_name(request), path_digest(request))
    headers = _headers(blob)
    headers["Content-Length"] = str(blob.size)
    return web.Response(status=200, headers=headers)


async def get_blob(request: web.Request) -> web.StreamResponse:
    reg = registry(request)
    blob = await reg.get_blob(repo_name(request), path_digest(request))
    wanted = _range(request, blob.size)
    url = await reg.blob_redirect_url(blob)
    if url is not None:
        # The client fetches the bytes from storage itself (its Range goes along).
        headers = {"Location": url, oci.CONTENT_DIGEST: str(blob.digest), "Content-Length": "0"}
        return web.Response(status=307, headers=headers)
    path = reg.blob_path(blob)
    if path is not None:
        # sendfile, with Range and conditional requests handled by aiohttp.
        return web.FileResponse(path, headers=_headers(blob))
    start, length = wanted if wanted is not None else (0, blob.size)
    response = web.StreamResponse(status=206 if wanted else 200, headers=_headers(blob))
    response.content_length = length
    if wanted:
        response.headers["Content-Range"] = f"bytes {start}-{start + length - 1}/{blob.size}"
    chunks = reg.read_blob(blob, start, length)
    # Storage that fails before the first byte (S3 down) still gets an error response.
    first = await anext(chunks, None)
    await response.prepare(request)
    request[BODY_SENT] = 0  # the access log's byte count if the stream breaks off
    try:
        if first is not None:
            await response.write(first)
            request[BODY_SENT] += len(first)
        async for chunk in chunks:
            await response.write(chunk)
            request[BODY_SENT] += len(chunk)
    except Exception:
        # Past prepare() a failure cannot become an error body. Cut the connection so the
        # client sees a broken transfer, never a short body that looks complete.
        log.exception("blob %s: stream failed after the headers were sent", blob.digest)
        response.force_close()
        if request.transport is not None:
            request.transport.abort()
        return response
    await response.write_eof()
    return response


async def delete_blob(request: web.Request) -> web.Response:
    await registry(request).delete_blob(repo_name(request), path_digest(request))
    return web.Response(status=202, headers={"Content-Length": "0"})
