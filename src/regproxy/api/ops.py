"""Operations endpoints: readiness (``/readyz``) and Prometheus metrics (``/metrics``)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass

from aiohttp import web

from regproxy.api.keys import CONFIG
from regproxy.metrics import CONTENT_TYPE, METRICS
from regproxy.tasks import HOSTED

# A key no blob has: asking storage whether it exists is a cheap round trip.
_PROBE_KEY = "readyz-probe"


@dataclass
class Readiness:
    """Set by the server: while draining, /readyz says so and load balancers move away."""

    draining: bool = False


READINESS = web.AppKey("readiness", Readiness)


async def _check(what: Awaitable[object], seconds: float) -> str | None:
    """None if ``what`` answered within ``seconds``, else why not (one line)."""
    try:
        async with asyncio.timeout(seconds):
            await what
    except TimeoutError:
        return f"no answer within {seconds:g}s"
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc)[:200]}" if str(exc) else type(exc).__name__
    return None


async def get_ready(request: web.Request) -> web.Response:
    """200 when the metadata store and blob storage both answer in time and the server is not
    draining; else 503 with the reasons."""
    app = request.app
    if app[READINESS].draining:
        return web.json_response({"status": "draining"}, status=503)
    timeout = app[CONFIG].ready_timeout
    hosted = app.get(HOSTED)
    if hosted is None:
        return web.json_response({"status": "starting"}, status=503)
    meta, storage = await asyncio.gather(
        _check(hosted.meta.ping(), timeout), _check(hosted.storage.exists(_PROBE_KEY), timeout)
    )
    failed = {name: why for name, why in (("metadata", meta), ("storage", storage)) if why}
    if failed:
        return web.json_response({"status": "unavailable", "failed": failed}, status=503)
    return web.json_response({"status": "ready"})


def metrics_response(request: web.Request, body: bytes) -> web.Response:
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def get_metrics(request: web.Request) -> web.Response:
    """The Prometheus text format; 404 when metrics are off or on their own listener."""
    config = request.app[CONFIG].metrics
    if not config.enabled or config.listen:
        raise web.HTTPNotFound()
    return metrics_response(request, await request.app[METRICS].exposition())


def metrics_app(main: web.Application) -> web.Application:
    """The app of ``metrics.listen``: only /metrics, no auth (bind it to a private address)."""

    async def handler(request: web.Request) -> web.Response:
        return metrics_response(request, await main[METRICS].exposition())

    app = web.Application()
    app.router.add_get("/metrics", handler)
    return app
