"""The API root and the liveness probe."""

from __future__ import annotations

from aiohttp import web


async def get_base(request: web.Request) -> web.Response:
    return web.json_response({})


async def get_health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})
