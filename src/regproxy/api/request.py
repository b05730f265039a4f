"""Decoding requests: path parameters, query parameters and streamed bodies."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import StreamReader, web

from regproxy import oci
from regproxy.api.keys import CONFIG, REGISTRY
from regproxy.errors import BlobUploadInvalid, NameUnknown, PaginationNumberInvalid
from regproxy.oci import Digest
from regproxy.registry.base import Registry
from regproxy.streams import CHUNK_SIZE, rechunk

# Request key: the registry host a containerd mirror request named with ?ns=.
OCI_NAMESPACE = "regproxy.oci_namespace"


def registry(request: web.Request) -> Registry:
    return request.app[REGISTRY]


def repo_name(request: web.Request) -> str:
    """The repository a request is about; ``?ns=<registry host>`` names an upstream's cache.

    A name already under that upstream's prefix stays as it is: containerd sends ``?ns=``
    also to a mirror configured as ``http://regproxy/v2/<prefix>`` with ``override_path``.
    """
    name = oci.parse_name(request.match_info["name"])
    ns = request.query.get("ns")
    if not ns or ns == request.host:
        return name
    prefix = registry(request).namespace_prefix(ns)
    if prefix is None:
        raise NameUnknown(f"no upstream is configured for registry {ns[:100]!r}")
    request[OCI_NAMESPACE] = ns
    return name if name.startswith(f"{prefix}/") else f"{prefix}/{name}"


def path_digest(request: web.Request, key: str = "digest") -> Digest:
    return Digest.parse(request.match_info[key])


def page(request: web.Request) -> tuple[str, int]:
    """The ``last`` and ``n`` pagination parameters, ``n`` capped by the configured maximum."""
    page_max = request.app[CONFIG].limits.page_max
    raw = request.query.get("n")
    if raw is None or raw == "":
        n = page_max
    else:
        if not (raw.isascii() and raw.isdigit()):  # str.isdigit() also accepts "²"
            raise PaginationNumberInvalid(f"n must be a non-negative integer, got {raw[:50]!r}")
        n = min(int(raw), page_max)
    return request.query.get("last", ""), n


def has_body(request: web.Request) -> bool:
    if request.content_length is not None:
        return request.content_length > 0
    return request.body_exists


async def body_chunks(request: web.Request, size: int = CHUNK_SIZE) -> AsyncIterator[bytes]:
    """The request body in chunks of about ``size`` bytes, never all of it at once.

    A body shorter than its ``Content-Length`` (a client that went away) is an error, so a
    truncated upload is never mistaken for a complete one.
    """
    total = 0
    async for chunk in rechunk(_buffers(request.content), size):
        total += len(chunk)
        yield chunk
    expected = request.content_length
    if expected is not None and total != expected:
        raise BlobUploadInvalid(f"body ended after {total} of {expected} bytes")


async def _buffers(content: StreamReader) -> AsyncIterator[bytes]:
    """A body as the socket delivered it, one buffer at a time.

    ``readany()`` joins every buffer queued meanwhile: reading them one by one saves a copy
    of most of a body (and the page faults of the join's fresh memory). ``readchunk()`` may
    also stop at the end of a chunk of chunked transfer encoding with b"" alone, and an empty
    body's reader keeps answering (b"", True): the end is ``at_eof()``.
    """
    while True:
        data, _ = await content.readchunk()
        if data:
            yield data
        elif content.at_eof():
            return
