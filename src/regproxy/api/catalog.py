"""The repository catalog, paginated with ``n`` and ``last``."""

from __future__ import annotations

from aiohttp import web

from regproxy.api.request import page, registry
from regproxy.api.tags import next_link


async def list_catalog(request: web.Request) -> web.Response:
    last, n = page(request)
    repos = await registry(request).list_repositories(last, n + 1) if n else []
    headers = {}
    if len(repos) > n:
        repos = repos[:n]
        headers["Link"] = next_link(request.path, n, repos[-1])
    return web.json_response({"repositories": repos}, headers=headers)
