"""Cross-cutting request handling: error bodies, common headers, the access log, and the
count of requests in flight that a shutdown waits for."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from regproxy import oci
from regproxy.api.request import OCI_NAMESPACE
from regproxy.errors import (
    BlobUploadInvalid,
    BlobUploadUnknown,
    DigestInvalid,
    ManifestUnknown,
    NameInvalid,
    NotFound,
    RegistryError,
    SizeInvalid,
    TagInvalid,
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


def _escaped(request: web.Request, raw_path: str) -> RegistryError:
    """The error for a percent-escape in ``raw_path``: that of the component holding it.

    Routing keeps escaped slashes escaped, so the raw path has the segments of the route:
    ``/v2/`` + name + the route's fixed segments and its last parameter.
    """
    resource = request.match_info.route.resource
    head, has_name, tail = (resource.canonical if resource else "").partition("{name}")
    suffix = tail.split("/")[1:]  # e.g. ["blobs", "{digest}"]
    segments = raw_path[len(head) :].split("/")
    if has_name and len(segments) > len(suffix) and "%" not in "/".join(segments[: -len(suffix)]):
        for raw, part in zip(segments[-len(suffix) :], suffix, strict=True):
            if "%" in raw:
                component = _component_error(request, part)
                if component is not None:
                    return component
    return NameInvalid("percent-encoded characters are not allowed in repository names")


def _component_error(request: web.Request, part: str) -> RegistryError | None:
    message = "percent-encoded characters are not allowed in {}"
    if part == "{digest}":
        return DigestInvalid(message.format("digests"))
    if part == "{upload_id}":
        return BlobUploadUnknown(message.format("upload ids"))
    if part == "{reference}":
        if request.method in ("GET", "HEAD"):  # no manifest can have such a reference
            return ManifestUnknown(message.format("manifest references"))
        if oci.is_digest(request.match_info["reference"]):
            return DigestInvalid(message.format("digests"))
        return TagInvalid(message.format("tags"))
    return None


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        raw_path = request.raw_path.split("?", 1)[0]
        if request.path.startswith("/v2/") and "%" in raw_path:
            # Names, digests, tags and upload ids never need escaping; an escaped dot or
            # slash in a path is somebody probing for a way out.
            raise _escaped(request, raw_path)
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
    except Exception:
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
