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
from regproxy.api.keys import BODY_SENT
from regproxy.api.request import OCI_NAMESPACE
from regproxy.api.routes import HANDLER_NAMES
from regproxy.auth.service import CALLER
from regproxy.errors import (
    BlobUploadInvalid,
    BlobUploadUnknown,
    DigestInvalid,
    ManifestUnknown,
    NameInvalid,
    NotFound,
    RegistryError,
    SizeInvalid,
    StorageFull,
    TagInvalid,
    Unsupported,
)
from regproxy.logs import ACCESS_FIELDS
from regproxy.metrics import METRICS, Metrics, OutcomeScope, PullOutcome

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
    """The first middleware: counts the requests whose handlers are running, so a shutdown can
    wait for them (and the in-flight gauge, per route), and gives each request the record the
    pull-through cache fills in for its access line."""

    def __init__(self, metrics: Metrics) -> None:
        self.count = 0
        self._metrics = metrics
        self._idle = asyncio.Event()
        self._idle.set()

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        gauge = self._metrics.in_flight(handler_name(request))
        self.count += 1
        self._idle.clear()
        gauge.inc()
        try:
            with OutcomeScope() as record:
                request[PULL_OUTCOME] = record
                return await handler(request)
        finally:
            gauge.dec()
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


# Request key: what the pull-through cache did for this request (filled in by the cache).
PULL_OUTCOME = web.RequestKey("pull_outcome", PullOutcome)
# The request line aiohttp could not parse at all gets this placeholder method.
_UNPARSED = "UNKNOWN"
_NO_BODY_STATUSES = frozenset({204, 304})


def handler_name(request: web.BaseRequest) -> str:
    """The route's name (bounded: never the raw path); "unmatched" for 404s and the like."""
    if not isinstance(request, web.Request):
        return "unmatched"
    route = request.match_info.route
    resource = route.resource
    if resource is None:
        return "unmatched"
    return HANDLER_NAMES.get(resource.canonical) or route.name or resource.canonical


def _header_bytes(request: web.BaseRequest, response: web.StreamResponse) -> int:
    """The size of the status line and headers as aiohttp serialises them."""
    version = request.version
    status_line = f"HTTP/{version.major}.{version.minor} {response.status} {response.reason}\r\n"
    fields = "".join(f"{name}: {value}\r\n" for name, value in response.headers.items())
    return len((status_line + fields).encode("utf-8")) + 2


def body_bytes_sent(request: web.BaseRequest, response: web.StreamResponse) -> tuple[int, bool]:
    """(body bytes sent, whether the whole body went out).

    aiohttp's ``body_length`` counts the headers too, is only set once the response ended,
    and misses what sendfile sent (FileResponse). So: a handler that streams its body itself
    records what it wrote (``BODY_SENT``); otherwise a completed response with a
    Content-Length sent exactly that many body bytes (sendfile included), and a completed
    chunked one its output minus the headers.
    """
    streamed = request.get(BODY_SENT)
    if streamed is not None:
        expected = response.content_length
        return streamed, expected is None or streamed == expected
    completed = response.prepared and response.body_length > 0
    if not completed:
        return 0, False
    if request.method == "HEAD" or response.status in _NO_BODY_STATUSES:
        return 0, True
    length = response.content_length
    if length is not None:
        return length, True
    return max(0, response.body_length - _header_bytes(request, response)), True


class AccessLogger(AbstractAccessLogger):
    """One line per request, logged after its last byte: method, path, status, body bytes
    sent, duration, client, user, route and the pull-through outcome. It also records the
    HTTP metrics (which need the bytes sendfile sent, known only here)."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        if request.method == _UNPARSED:
            return  # not a request at all (e.g. a TLS probe): aiohttp.server logs it
        sent, completed = body_bytes_sent(request, response)
        name = handler_name(request)
        outcome = request.get(PULL_OUTCOME) if isinstance(request, web.Request) else None
        metrics = request.app.get(METRICS) if isinstance(request, web.Request) else None
        if metrics is not None:
            received = request.content.total_bytes
            metrics.answered(request.method, name, str(response.status), time, sent, received)
            if outcome is not None and response.status < 400:  # error bodies are not pulls
                metrics.pushed(outcome, sent)
        if not self.logger.isEnabledFor(logging.INFO):
            return
        caller = request.get(CALLER) if isinstance(request, web.Request) else None
        fields = {
            "method": request.method,
            "path": request.path,
            "status": response.status,
            "bytes": sent,
            "duration_ms": round(time * 1000, 3),
            "remote": request.remote,
            "user": getattr(caller, "user", None),
            "handler": name,
            "upstream": (outcome.upstream or None) if outcome is not None else None,
            "outcome": (outcome.outcome or None) if outcome is not None else None,
        }
        if not completed:
            fields["complete"] = False
        message = f"{request.method} {request.path} {response.status}"
        self.logger.info(message, extra={ACCESS_FIELDS: fields})

    @property
    def enabled(self) -> bool:
        return True  # the HTTP metrics are recorded here even when access lines are off
