"""Cross-cutting request handling: error bodies, common headers, the access log, and the
count of requests in flight that a shutdown waits for."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from regproxy import oci
from regproxy.api.request import OCI_NAMESPACE
from regproxy.errors import (
    BlobUploadInvalid,
    NameInvalid,
    NotFound,
    RegistryError,
    SizeInvalid,
    StorageFull,
    Unsupported,
)

log = logging.getLogger("regproxy.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(error: RegistryError) -> web.Response:
    body = json.dumps({"errors": [error.to_json()]})
    response = web.Response(
        status=error.status, text=body, content_type="application/json", headers=error.headers
    )
    return response


_HTTP_ERRORS: dict[int, type[RegistryError]] = {
    404: NotFound,
    405: Unsupported,
    413: SizeInvalid,
}


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        if request.path.startswith("/v2/") and "%" in request.raw_path.split("?", 1)[0]:
            # Names, digests, tags and upload ids never need escaping; an escaped dot or
            # slash in a path is somebody probing for a way out.
            raise NameInvalid("percent-encoded characters are not allowed in registry paths")
        return await handler(request)
    except RegistryError as error:
        return error_response(error)
    except web.HTTPException as exc:
        mapped = _HTTP_ERRORS.get(exc.status)
        if mapped is None:
            raise
        response = error_response(mapped(exc.reason))
        response.set_status(exc.status)
        for name in ("Allow",):
            if name in exc.headers:
                response.headers[name] = exc.headers[name]
        return response
    except ConnectionError as exc:
        # The client went away mid-request; whatever it sent was rolled back.
        log.info("client disconnected during %s %s: %s", request.method, request.path, exc)
        return error_response(BlobUploadInvalid("the connection was lost mid-request"))
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            log.warning("storage full during %s %s: %s", request.method, request.path, exc)
            return error_response(StorageFull(f"the registry's storage is full: {exc.strerror}"))
        return _internal_error(request)
    except Exception:
        return _internal_error(request)


def _internal_error(request: web.Request) -> web.Response:
    log.exception("unexpected error in %s %s", request.method, request.path)
    body = {"errors": [{"code": "UNKNOWN", "message": "internal server error"}]}
    return web.json_response(body, status=500)


class InFlight:
    """Counts the requests whose handlers are running, so a shutdown can wait for them."""

    def __init__(self) -> None:
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.count += 1
        self._idle.clear()
        try:
            return await handler(request)
        finally:
            self.count -= 1
            if not self.count:
                self._idle.set()

    async def wait_idle(self) -> None:
        """Return once no handler runs."""
        await self._idle.wait()


IN_FLIGHT = web.AppKey("in_flight", InFlight)


async def add_common_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers[oci.API_VERSION] = oci.API_VERSION_VALUE
    namespace = request.get(OCI_NAMESPACE)
    if namespace:
        response.headers[oci.OCI_NAMESPACE] = namespace


class AccessLogger(AbstractAccessLogger):
    """One JSON line per request: method, path, status, bytes, duration."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info(
            json.dumps(
                {
                    "method": request.method,
                    "path": request.path,
                    "status": response.status,
                    "bytes": response.body_length,
                    "duration_ms": round(time * 1000, 3),
                    "remote": request.remote,
                },
                separators=(",", ":"),
            )
        )

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)
