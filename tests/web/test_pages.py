"""The web UI's pages through real HTTP: content, escaping, paging and auth.

Repositories are made by pushing (hosted), by pulling through the fake upstream (cached), or,
where thousands are needed, by writing rows into the metadata store directly.
"""

from __future__ import annotations

import asyncio
import html
import json
import re
from pathlib import Path
from typing import Any

import bcrypt
import pytest

from regproxy.meta.base import ManifestRow, MetadataStore, Reference
from regproxy.oci import Digest
from regproxy.proxy.pullthrough import PULL_THROUGH
from regproxy.tasks import HOSTED
from tests.conftest import MakeClient
from tests.helpers import (
    OCI_INDEX,
    Client,
    app_of,
    canonical,
    descriptor,
    digest_of,
    make_config,
    push_blob,
    push_image,
    push_manifest,
)
from tests.proxy.conftest import MakeProxy
from tests.proxy.fakeupstream import FakeUpstream
from tests.web.conftest import fetch, links

PASSWORDS = {"alice": "alice-pw-1", "bob": "bob-pw-2"}
HASHES = {n: bcrypt.hashpw(p.encode(), bcrypt.gensalt(4)).decode() for n, p in PASSWORDS.items()}
RULES: list[dict[str, Any]] = [
    {"who": ["alice"], "repos": ["**"], "actions": ["*"]},
    {"who": ["bob"], "repos": ["team/**"], "actions": ["pull", "push"]},
]


def meta_of(client: Client) -> MetadataStore:
    return app_of(client)[HOSTED].meta


def section(page: str, title: str) -> str:
    """The part of a page from the <h2> ``title`` to the next <h2>."""
    start = page.index(f"<h2>{title}</h2>")
    end = page.find("<h2>", start + 1)
    return page[start : end if end != -1 else None]


async def push_index(client: Client, repo: str, tag: str) -> tuple[str, list[Any]]:
    """Two images (linux/amd64, linux/arm64) and an index over them, tagged ``tag``."""
    amd = await push_image(client, repo, "amd", seed="amd64")
    arm = await push_image(client, repo, "arm", seed="arm64")
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            amd.descriptor(platform={"os": "linux", "architecture": "amd64"}),
            arm.descriptor(platform={"os": "linux", "architecture": "arm64", "variant": "v8"}),
        ],
    }
    return await push_manifest(client, repo, tag, doc), [amd, arm]


# -- repositories -------------------------------------------------------------------------------


async def test_repositories_hosted_and_cached_apart(proxy: Client, upstream: FakeUpstream) -> None:
    await push_image(proxy, "team/app", "v1")
    upstream.add_image("lib/cached", "v1")
    resp = await proxy.get("/v2/fake/lib/cached/manifests/v1")
    assert resp.status == 200
    page = await fetch(proxy, "/ui/")
    hosted, cached = section(page, "Hosted"), section(page, "Cached from upstreams")
    assert 'href="/ui/repo/team/app"' in hosted and "fake/lib/cached" not in hosted
    assert 'href="/ui/repo/fake/lib/cached"' in cached and "team/app" not in cached
    assert "open access" in page


async def test_repositories_paging_past_a_thousand(client: Client) -> None:
    meta = meta_of(client)
    names = [f"many/r{i:04d}" for i in range(1203)]
    row = ManifestRow(Digest.of(b"{}"), "application/vnd.oci.image.manifest.v1+json", b"{}")
    for name in names:
        await meta.put_manifest(name, row, (), ["latest"])
    seen: list[str] = []
    path, pages = "/ui/?n=500", 0
    while path:
        page = await fetch(client, html.unescape(path))
        pages += 1
        seen += re.findall(r'href="/ui/repo/([^"]+)"', section(page, "Hosted"))
        more = [link for link in links(page) if "Next page" in page and "last=" in link]
        path = more[0] if more else ""
        assert pages < 10
    assert seen == names and pages == 3


async def test_repository_list_shows_only_pullable(make_client: MakeClient, tmp_path: Path) -> None:
    client = await make_client(make_config(tmp_path, auth__users=HASHES, auth__rules=RULES))
    row = ManifestRow(Digest.of(b"{}"), "application/vnd.oci.image.manifest.v1+json", b"{}")
    for name in ["team/one", "secret/two", "team/three"]:
        await meta_of(client).put_manifest(name, row, (), ["v1"])
    await login(client, "bob")
    page = await fetch(client, "/ui/")
    assert re.findall(r'href="/ui/repo/([^"]+)"', page) == ["team/one", "team/three"]
    await fetch(client, "/ui/repo/secret/two", 404)
    await fetch(client, "/ui/manifest/secret/two/-/v1", 404)
    assert "team/one" in await fetch(client, "/ui/repo/team/one")


# -- one repository ---------------------------------------------------------------------------


async def test_repository_tags_digests_sizes_platforms(client: Client) -> None:
    image = await push_image(client, "team/app", "v1")
    index_digest, children = await push_index(client, "team/app", "multi")
    page = await fetch(client, "/ui/repo/team/app")
    rows = {
        m[0]: m[1]
        for m in re.findall(r"<tr><td><a href=\"[^\"]+\">([^<]+)</a></td>(.*?)</tr>", page)
    }
    assert set(rows) == {"amd", "arm", "multi", "v1"}
    size = len(image.manifest) + sum(len(b) for b in image.blobs.values())
    assert image.digest in rows["v1"] and f'"{size:,} bytes"' in rows["v1"]
    assert index_digest in rows["multi"]
    assert "linux/amd64" in rows["multi"] and "linux/arm64/v8" in rows["multi"]
    resp = await client.get("/v2/team/app/manifests/multi", headers={"Accept": OCI_INDEX})
    index_bytes = len(await resp.read())
    total = index_bytes + sum(
        len(c.manifest) + sum(len(b) for b in c.blobs.values()) for c in children
    )
    assert f'"{total:,} bytes"' in rows["multi"], rows["multi"]
    assert "<dt>Tags</dt><dd>4</dd>" in page


async def test_tags_paging(client: Client) -> None:
    row = ManifestRow(Digest.of(b"{}"), "application/vnd.oci.image.manifest.v1+json", b"{}")
    tags = [f"t{i:03d}" for i in range(250)]
    await meta_of(client).put_manifest("team/app", row, (), tags)
    seen: list[str] = []
    path = "/ui/repo/team/app"
    for _ in range(5):
        page = await fetch(client, html.unescape(path))
        seen += re.findall(r'href="/ui/manifest/team/app/-/(t\d+)"', page)
        more = [link for link in links(page) if "last=" in link]
        if not more:
            break
        path = more[0]
    assert seen == tags


async def test_unknown_repository_and_manifest(client: Client) -> None:
    await fetch(client, "/ui/repo/no/such", 404)
    await push_image(client, "team/app", "v1")
    await fetch(client, "/ui/manifest/team/app/-/nope", 404)
    await fetch(client, "/ui/manifest/team/app/-/sha256:" + "0" * 64, 404)
    await fetch(client, "/ui/repo/Bad..Name", 404)


# -- one manifest -----------------------------------------------------------------------------


async def test_manifest_page_layers_config_annotations(client: Client) -> None:
    image = await push_image(
        client, "team/app", "v1", annotations={"org.opencontainers.image.title": "my app"}
    )
    page = await fetch(client, "/ui/manifest/team/app/-/v1")
    doc = json.loads(image.manifest)
    layers = section(page, "Layers")
    for layer in doc["layers"]:
        assert layer["digest"] in layers and layer["mediaType"] in layers
        assert f'"{layer["size"]:,} bytes"' in layers
    config = section(page, "Config")
    assert doc["config"]["digest"] in config and doc["config"]["mediaType"] in config
    assert "org.opencontainers.image.title" in section(page, "Annotations")
    assert "my app" in page and image.digest in page
    by_digest = await fetch(client, f"/ui/manifest/team/app/-/{image.digest}")
    assert section(by_digest, "Layers") == layers


async def test_manifest_page_index_children_linked(client: Client) -> None:
    _, children = await push_index(client, "team/app", "multi")
    page = await fetch(client, "/ui/manifest/team/app/-/multi")
    table = section(page, "Manifests")
    for child in children:
        assert f'href="/ui/manifest/team/app/-/{child.digest}"' in table
    assert "linux/amd64" in table and "linux/arm64/v8" in table
    child_page = await fetch(client, f"/ui/manifest/team/app/-/{children[0].digest}")
    assert "<h2>Layers</h2>" in child_page


async def test_buildkit_cache_index_does_not_break_pages(client: Client) -> None:
    """BuildKit's cache export: an index whose entries are layer blobs and a cache config."""
    layer = b"cached layer" * 50
    cache_config = b'{"layers": [], "records": []}'
    for data in (layer, cache_config):
        await push_blob(client, "team/cache", data)
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            descriptor(
                "application/vnd.oci.image.layer.v1.tar+gzip",
                layer,
                annotations={"buildkit/createdat": "2024-01-01T00:00:00Z"},
            ),
            descriptor("application/vnd.buildkit.cacheconfig.v0", cache_config),
        ],
    }
    content = canonical(doc)
    digest = Digest.of(content)
    refs = [Reference(Digest.parse(digest_of(d)), True) for d in (layer, cache_config)]
    await meta_of(client).put_manifest(
        "team/cache", ManifestRow(digest, OCI_INDEX, content), refs, ["buildcache"]
    )
    repo_page = await fetch(client, "/ui/repo/team/cache")
    assert str(digest) in repo_page
    size = len(content) + len(layer) + len(cache_config)
    assert f'"{size:,} bytes"' in repo_page and "not cached" not in repo_page
    page = await fetch(client, "/ui/manifest/team/cache/-/buildcache")
    table = section(page, "Manifests")
    assert digest_of(layer) in table and "application/vnd.buildkit.cacheconfig.v0" in table
    assert "/ui/manifest/team/cache/-/sha256" not in table, "blobs are not linked as manifests"


async def test_hostile_content_is_escaped(client: Client) -> None:
    evil = '"><script>alert(1)</script><img src=x onerror=alert(2)>'
    config = b'{"architecture": "amd64", "os": "linux"}'
    layer = b"evil layer"
    for data in (config, layer):
        await push_blob(client, "team/evil", data)
    doc = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": f"application/x-{evil}",
        "config": descriptor("application/vnd.oci.image.config.v1+json", config),
        "layers": [descriptor(f"application/{evil}", layer, annotations={evil: evil})],
        "annotations": {evil: evil, "org.example": "</td></tr></table><h1>x</h1>"},
    }
    await push_manifest(client, "team/evil", "v1", doc)
    for path in ("/ui/", "/ui/repo/team/evil", "/ui/manifest/team/evil/-/v1"):
        page = await fetch(client, path)
        assert "<script>" not in page and "<img" not in page and "<h1>x</h1>" not in page
    page = await fetch(client, "/ui/manifest/team/evil/-/v1")
    assert html.escape(evil) in page
    assert page.count("<table>") == page.count("</table>")


# -- upstreams --------------------------------------------------------------------------------


async def test_upstreams_page(make_proxy: MakeProxy, upstream: FakeUpstream) -> None:
    image = upstream.add_image("lib/app", "v1", [b"a" * 5000, b"b" * 3000])
    upstream.headers = {"ratelimit-limit": "100;w=21600", "ratelimit-remaining": "76;w=21600"}
    proxy = await make_proxy()
    for _ in range(2):  # a cold pull, then a warm one
        resp = await proxy.get("/v2/fake/lib/app/manifests/v1")
        assert resp.status == 200
        for digest, data in image.blobs.items():
            assert await (await proxy.get(f"/v2/fake/lib/app/blobs/{digest}")).read() == data
    page = await fetch(proxy, "/ui/upstreams")
    row = page[page.index("<strong>fake</strong>") :]
    assert str(upstream.base_url) in row
    assert "76 of 100" in row
    assert "50%" in row and "4 hits, 4 misses" in row, "the warm pull hit what the cold one missed"
    stored = sum(len(b) for b in image.blobs.values()) + len(image.manifest)
    assert f"{stored / 1000:.1f} KB in {len(image.blobs)} blobs" in row


async def test_upstreams_page_fills_in_progress(
    make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    big = b"z" * (300 * 1024)
    digest = upstream.add_blob("lib/app", big)
    upstream.slow.add(digest)
    proxy = await make_proxy()
    pull = asyncio.create_task(proxy.get(f"/v2/fake/lib/app/blobs/{digest}"))
    await asyncio.wait_for(upstream.first_sent.wait(), 10)
    registry = app_of(proxy)[PULL_THROUGH]
    async with asyncio.timeout(10):  # the size is known once the fill has read the answer
        while not (fills := registry.fills_in_progress()) or fills[0].size is None:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    assert [str(f.digest) for f in fills] == [digest] and fills[0].size == len(big)
    page = await fetch(proxy, "/ui/upstreams")
    assert digest in section(page, "Fills in progress") and "fake/lib/app" in page
    upstream.release.set()
    resp = await pull
    assert await resp.read() == big
    assert "Fills in progress" not in await fetch(proxy, "/ui/upstreams")


async def test_rate_limit_hold_shown(make_proxy: MakeProxy, upstream: FakeUpstream) -> None:
    upstream.add_image("lib/app", "v1")
    upstream.headers = {"ratelimit-limit": "100;w=21600", "ratelimit-remaining": "0;w=21600"}
    proxy = await make_proxy()
    assert (await proxy.get("/v2/fake/lib/app/manifests/v1")).status == 200
    page = await fetch(proxy, "/ui/upstreams")
    assert "0 of 100" in page and "holding requests until" in page


# -- auth -------------------------------------------------------------------------------------


async def login(client: Client, user: str, password: str | None = None, status: int = 303) -> Any:
    resp = await client.post(
        "/ui/login",
        data={"username": user, "password": password or PASSWORDS[user], "next": "/ui/"},
        allow_redirects=False,
    )
    assert resp.status == status, await resp.text()
    return resp


@pytest.fixture
async def secured(make_client: MakeClient, tmp_path: Path) -> Client:
    client = await make_client(make_config(tmp_path, auth__users=HASHES, auth__rules=RULES))
    row = ManifestRow(Digest.of(b"{}"), "application/vnd.oci.image.manifest.v1+json", b"{}")
    await meta_of(client).put_manifest("team/app", row, (), ["v1"])
    return client


async def test_login_required(secured: Client) -> None:
    for path in ("/ui/", "/ui/repo/team/app", "/ui/manifest/team/app/-/v1", "/ui/upstreams"):
        resp = await secured.get(path, allow_redirects=False)
        assert resp.status == 303, path
        assert resp.headers["Location"].startswith("/ui/login?next=")
    page = await fetch(secured, "/ui/login?next=/ui/repo/team/app")
    assert 'name="password"' in page and 'value="/ui/repo/team/app"' in page
    assert "team/app" not in page.replace('value="/ui/repo/team/app"', "")


async def test_login_cookie_and_logout(secured: Client) -> None:
    resp = await login(secured, "alice")
    assert resp.headers["Location"] == "/ui/"
    cookie = resp.headers["Set-Cookie"]
    assert "regproxy_ui=" in cookie and "HttpOnly" in cookie
    assert "SameSite=Strict" in cookie and "Path=/ui/" in cookie
    page = await fetch(secured, "/ui/")
    assert "alice" in page and 'href="/ui/repo/team/app"' in page
    # The cookie is the UI's: the registry API does not take it.
    assert (await secured.get("/v2/team/app/tags/list")).status == 401
    resp = await secured.post("/ui/logout", allow_redirects=False)
    assert resp.status == 303 and "regproxy_ui=" in resp.headers["Set-Cookie"]
    assert (await secured.get("/ui/", allow_redirects=False)).status == 303


async def test_login_wrong_password(secured: Client) -> None:
    resp = await login(secured, "alice", "wrong", status=401)
    assert "Invalid user name or password" in await resp.text()
    assert "Set-Cookie" not in resp.headers
    resp = await login(secured, "nobody", "x", status=401)


async def test_login_lockout(make_client: MakeClient, tmp_path: Path) -> None:
    config = make_config(
        tmp_path, auth__users=HASHES, auth__rules=RULES, auth__max_login_failures=2
    )
    client = await make_client(config)
    for _ in range(2):
        await login(client, "alice", "wrong", status=401)
    resp = await login(client, "alice", status=429)
    assert int(resp.headers["Retry-After"]) > 0


async def test_forged_cookie_is_anonymous(secured: Client) -> None:
    secured.session.cookie_jar.update_cookies({"regproxy_ui": "forged.token.value"})
    resp = await secured.get("/ui/", allow_redirects=False)
    assert resp.status == 303


async def test_login_from_another_site_refused(secured: Client) -> None:
    resp = await secured.post(
        "/ui/login",
        data={"username": "alice", "password": PASSWORDS["alice"]},
        headers={"Origin": "https://evil.example"},
        allow_redirects=False,
    )
    assert resp.status == 403 and "Set-Cookie" not in resp.headers


@pytest.mark.parametrize("target", ["https://evil.example/", "//evil.example/ui/", "/v2/"])
async def test_login_next_stays_in_the_ui(secured: Client, target: str) -> None:
    resp = await secured.post(
        "/ui/login",
        data={"username": "alice", "password": PASSWORDS["alice"], "next": target},
        allow_redirects=False,
    )
    assert resp.status == 303 and resp.headers["Location"] == "/ui/"


async def test_open_mode_has_no_login(client: Client) -> None:
    resp = await client.get("/ui/login", allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"] == "/ui/"
    resp = await client.get("/ui", allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"] == "/ui/"
    resp = await client.get("/ui/style.css")
    assert resp.status == 200 and resp.content_type == "text/css"


async def test_cached_repository_shows_what_was_not_pulled(
    proxy: Client, upstream: FakeUpstream
) -> None:
    amd = upstream.add_image("lib/multi", None, seed="amd")
    arm = upstream.add_image("lib/multi", None, seed="arm")
    upstream.add_index("lib/multi", "v1", [amd, arm])
    assert (await proxy.get("/v2/fake/lib/multi/manifests/v1")).status == 200
    assert (await proxy.get(f"/v2/fake/lib/multi/manifests/{amd.digest}")).status == 200
    page = await fetch(proxy, "/ui/repo/fake/lib/multi")
    assert "Cached from" in page and str(upstream.base_url) in page
    # Never pulled through the cache: arm64's manifest (so its blobs are not even known) and
    # amd64's config and layer.
    assert "+3 not cached" in page, page
    table = section(await fetch(proxy, "/ui/manifest/fake/lib/multi/-/v1"), "Manifests")
    amd_row, arm_row = table.split("<tr>")[2:4]
    assert amd.digest in amd_row and "not stored" not in amd_row
    assert arm.digest in arm_row and "not stored" in arm_row
    await fetch(proxy, f"/ui/manifest/fake/lib/multi/-/{arm.digest}", 404)
    assert upstream.count("GET", f"/v2/lib/multi/manifests/{arm.digest}") == 0, "UI never asks"


async def test_upstreams_page_cache_budget(
    make_proxy: MakeProxy, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a byte budget for the upstream's cache (the lifecycle settings), the page shows
    the size against it."""
    from regproxy.web import pages

    image = upstream.add_image("lib/app", "v1", [b"a" * 200_000])
    proxy = await make_proxy()
    monkeypatch.setattr(pages, "cache_budget", lambda config: 1_000_000)
    assert (await proxy.get("/v2/fake/lib/app/manifests/v1")).status == 200
    for digest, data in image.blobs.items():
        assert await (await proxy.get(f"/v2/fake/lib/app/blobs/{digest}")).read() == data
    page = await fetch(proxy, "/ui/upstreams")
    assert "of 1.0 MB (20%)" in page
