"""Tag listing, paginated with ``n`` and ``last``."""

from __future__ import annotations

from urllib.parse import urlencode

from aiohttp import web

from regproxy.api.request import page, registry, repo_name


def next_link(path: str, n: int, last: str) -> str:
    return f'<{path}?{urlencode({"n": n, "last": last})}>; rel="next"'


async def list_tags(request: web.Request) -> web.Response:
    repo = repo_name(request)
    last, n = page(request)
    # Asked even for n=0: an unknown repository is NAME_UNKNOWN whatever the page size.
    tags = await registry(request).list_tags(repo, last, n + 1)
    headers = {}
    if n and len(tags) > n:
        headers["Link"] = next_link(request.path, n, tags[n - 1])
    return web.json_response({"name": repo, "tags": tags[:n]}, headers=headers)
