"""Following another process's fill: its spool file on this machine, or its replica's
internal endpoint ``GET /_regproxy/cluster/fills/{digest}?offset=N``.

The endpoint exists only when ``cluster.secret`` is set. A request carries a timestamp and
an HMAC-SHA256 of method, path and query and that timestamp under the secret; anything else
(no or a wrong signature, a timestamp more than ``MAX_SKEW`` seconds off) gets a 404, as if
there were no such endpoint. The owner serves its fill like to a client of its own: bytes as
they arrive, the last one only once the digest is verified, a cut connection if it fails.
No client credential is ever sent to a peer.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

import aiohttp
from aiohttp import web

from regproxy import oci
from regproxy.errors import NotFound
from regproxy.oci import Digest

log = logging.getLogger(__name__)

FILLS_PATH = "/_regproxy/cluster/fills/{digest}"
TIME_HEADER = "X-Regproxy-Cluster-Time"
SIGNATURE_HEADER = "X-Regproxy-Cluster-Signature"
SIZE_HEADER = "X-Regproxy-Blob-Size"
# Seconds a signed request stays valid either way (covers clock differences).
MAX_SKEW = 60.0
READ_SIZE = 1 << 20
# Seconds between looks at a spool file that stopped growing; every POLLS_PER_CHECK looks,
# the metadata store is asked whether the fill still runs.
SPOOL_POLL = 0.05
POLLS_PER_CHECK = 5


def signature(secret: str, method: str, path_qs: str, timestamp: str) -> str:
    message = f"{method}\n{path_qs}\n{timestamp}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def signed_headers(secret: str, method: str, path_qs: str) -> dict[str, str]:
    timestamp = f"{time.time():.3f}"
    return {
        TIME_HEADER: timestamp,
        SIGNATURE_HEADER: signature(secret, method, path_qs, timestamp),
    }


def verify(secret: str, request: web.Request) -> bool:
    timestamp = request.headers.get(TIME_HEADER, "")
    given = request.headers.get(SIGNATURE_HEADER, "")
    try:
        sent = float(timestamp)
    except ValueError:
        return False
    if not abs(time.time() - sent) <= MAX_SKEW:
        return False
    wanted = signature(secret, request.method, request.path_qs, timestamp)
    return hmac.compare_digest(wanted.encode(), given.encode())


class FillSource(Protocol):
    async def serve_fill(
        self, digest: Digest, offset: int
    ) -> tuple[int, AsyncIterator[bytes]] | None:
        """The blob's size and its bytes from ``offset``, while filling or once stored;
        None when this process neither fills nor has it."""
        ...


FILL_SOURCE = web.AppKey("cluster_fill_source", FillSource)
SECRET = web.AppKey("cluster_secret", str)


async def get_fill(request: web.Request) -> web.StreamResponse:
    """The internal endpoint (registered only with a secret; ROUTE_ACCESS lets it through
    to this check of its own)."""
    if not verify(request.app[SECRET], request):
        raise NotFound()
    try:
        digest = Digest.parse(request.match_info["digest"])
        offset = int(request.query.get("offset", "0"))
    except ValueError:
        raise NotFound() from None
    found = await request.app[FILL_SOURCE].serve_fill(digest, max(offset, 0))
    if found is None:
        raise NotFound("no fill of this blob here")
    size, chunks = found
    response = web.StreamResponse(
        headers={SIZE_HEADER: str(size), "Content-Type": oci.OCTET_STREAM}
    )
    response.content_length = max(size - offset, 0)
    await response.prepare(request)
    try:
        async for chunk in chunks:
            await response.write(chunk)
    except Exception as exc:
        # The fill failed: the peer sees a cut transfer, never a short body.
        log.info("peer read of %s cut: %r", digest, exc)
        response.force_close()
        if request.transport is not None:
            request.transport.abort()
        return response
    await response.write_eof()
    return response


class PeerClient:
    """Reads another replica's fill through its internal endpoint."""

    def __init__(self, secret: str, timeout: float) -> None:
        self.secret = secret
        self.session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout),
            auto_decompress=False,
            trust_env=False,
            read_bufsize=1 << 20,
        )

    async def close(self) -> None:
        await self.session.close()

    async def read(self, url: str, digest: Digest, start: int, end: int) -> AsyncIterator[bytes]:
        """Bytes ``start .. end`` of the owner's fill; stops early (returns) if the owner has
        no such fill, raises ``aiohttp.ClientError`` if it cuts the transfer."""
        path_qs = f"{FILLS_PATH.format(digest=digest)}?offset={start}"
        headers = signed_headers(self.secret, "GET", path_qs)
        async with self.session.get(url.rstrip("/") + path_qs, headers=headers) as response:
            if response.status != 200:
                log.info("peer %s answered %d for the fill of %s", url, response.status, digest)
                return
            position = start
            async for chunk in response.content.iter_any():
                if position + len(chunk) > end:
                    chunk = chunk[: end - position]
                position += len(chunk)
                if chunk:
                    yield chunk
                if position >= end:
                    return


async def read_spool(
    path: str,
    size: int,
    start: int,
    end: int,
    still_filling: Callable[[], Awaitable[bool]],
) -> AsyncIterator[bytes]:
    """Bytes ``start .. end`` of another process's spool file on this machine, following
    its growth, never its last byte (that comes once the blob is committed, from storage).
    Returns when the file is gone or stops growing and ``still_filling()`` says no more."""
    try:
        fd = await asyncio.to_thread(os.open, path, os.O_RDONLY)
    except OSError:
        return
    try:
        position, idle = start, 0
        while position < end:
            grown = (await asyncio.to_thread(os.fstat, fd)).st_size
            available = min(grown, size - 1, end)
            if position < available:
                chunk = await asyncio.to_thread(
                    os.pread, fd, min(available - position, READ_SIZE), position
                )
                if not chunk:
                    return
                position += len(chunk)
                idle = 0
                yield chunk
                continue
            idle += 1
            if idle % POLLS_PER_CHECK == 0 and not await still_filling():
                return
            await asyncio.sleep(SPOOL_POLL)
    finally:
        await asyncio.to_thread(os.close, fd)
