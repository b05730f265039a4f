"""Fixtures for the web UI tests: the fake upstream of the proxy tests, and UI helpers."""

from __future__ import annotations

import re

from tests.helpers import Client
from tests.proxy.conftest import cdn, make_proxy, proxy, upstream

__all__ = ["cdn", "fetch", "make_proxy", "proxy", "upstream"]


async def fetch(client: Client, path: str, status: int = 200, **kwargs: object) -> str:
    """GET a UI page; assert its status and that it is HTML; return the text."""
    resp = await client.get(path, allow_redirects=False, **kwargs)  # type: ignore[arg-type]
    text = await resp.text()
    assert resp.status == status, (resp.status, text[:2000])
    if status == 200:
        assert resp.content_type == "text/html"
        assert "default-src 'none'" in resp.headers["Content-Security-Policy"]
        assert resp.headers["Cache-Control"] == "no-store"
    return text


def links(html: str) -> list[str]:
    return re.findall(r'href="([^"]+)"', html)
