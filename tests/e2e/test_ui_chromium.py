"""The web UI in a real headless Chromium (Debian's), driven by Playwright's Python package.

regproxy runs with auth on; skopeo pushes a two-platform index; the browser logs in, opens the
repository, the index tag (its platforms), and one platform's image (its layers). Screenshots
are kept under ``$REGPROXY_TEST_ARTIFACTS`` (default ``tests/artifacts/``, ignored by git).
"""

from __future__ import annotations

import base64
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from tests.e2e.images import make_oci_layout, payload_bytes
from tests.e2e.procs import SKOPEO_BIN, RegproxyProcess, regproxy, skopeo, write_htpasswd
from tests.proxy.fakeupstream import FakeImage, FakeUpstream

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PASSWORDS = {"alice": "alice-Secret-1", "bob": "bob-Secret-2"}
CONFIG = """
[upstreams."fake.io"]
url = "{upstream}"
tag_rules = [{{ match = "v*.*.*", ttl = "forever" }}]

[auth]
users_file = "{htpasswd}"

[[auth.rules]]
who = ["alice"]
repos = ["**"]
actions = ["*"]

[[auth.rules]]
who = ["bob"]
repos = ["team/**", "fake.io/**"]
actions = ["pull"]
"""


def artifacts_dir() -> Path:
    path = Path(
        os.environ.get("REGPROXY_TEST_ARTIFACTS")
        or Path(__file__).resolve().parents[1] / "artifacts"
    )
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
async def fake() -> AsyncIterator[FakeUpstream]:
    """The scripted upstream of the proxy tests, on a loopback port, reporting a rate limit."""
    upstream = FakeUpstream(
        headers={"ratelimit-limit": "100;w=21600", "ratelimit-remaining": "87;w=21600"}
    )
    server = TestServer(upstream.app(), host="127.0.0.1")
    await server.start_server()
    upstream.base_url = server.make_url("")
    try:
        yield upstream
    finally:
        await server.close()


@pytest.fixture
async def server(tmp_path: Path, fake: FakeUpstream) -> AsyncIterator[RegproxyProcess]:
    htpasswd = write_htpasswd(tmp_path / "htpasswd", PASSWORDS)
    config = CONFIG.format(htpasswd=htpasswd, upstream=fake.base_url)
    async with regproxy(tmp_path / "regproxy", config=config) as proc:
        yield proc


async def pull_through(server: RegproxyProcess, image: FakeImage, times: int) -> None:
    basic = base64.b64encode(f"alice:{PASSWORDS['alice']}".encode()).decode()
    async with aiohttp.ClientSession(headers={"Authorization": f"Basic {basic}"}) as http:
        for _ in range(times):
            path = f"{server.url}/v2/fake.io/{image.repo}"
            async with http.get(f"{path}/manifests/{image.tag}") as resp:
                assert resp.status == 200, await resp.text()
            for digest, data in image.blobs.items():
                async with http.get(f"{path}/blobs/{digest}") as resp:
                    assert await resp.read() == data


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    if shutil.which(CHROMIUM) is None:
        pytest.fail(f"{CHROMIUM} missing: apt-get install -y chromium")
    playwright_api = pytest.importorskip("playwright.async_api")
    async with playwright_api.async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            await launched.close()


async def push(server: RegproxyProcess, tmp_path: Path, repo: str, tag: str, **kw: Any) -> Any:
    image = make_oci_layout(tmp_path / f"{repo.replace('/', '-')}-{tag}", tag=tag, **kw)
    rc, _, err = await skopeo(
        "copy",
        "--all",
        "--dest-tls-verify=false",
        f"--dest-creds=alice:{PASSWORDS['alice']}",
        image.ref(),
        f"docker://{server.host}/{repo}:{tag}",
    )
    assert rc == 0, err
    return image


async def test_ui_in_chromium(
    server: RegproxyProcess, fake: FakeUpstream, browser: Any, tmp_path: Path
) -> None:
    if shutil.which(SKOPEO_BIN) is None:
        pytest.fail("skopeo missing: apt-get install -y skopeo")
    annotations = {
        "org.opencontainers.image.source": "https://example.com/team/app",
        "org.opencontainers.image.description": "A <b>two-platform</b> test image",
    }
    index = await push(
        server,
        tmp_path,
        "team/app",
        "1.4.2",
        layers=[2_400_000, 310_000, 8_000],
        platforms=[("linux", "amd64"), ("linux", "arm64", "v8")],
        seed="ui",
        annotations=annotations,
    )
    await push(server, tmp_path, "team/app", "latest", layers=[1_200_000, 40_000], seed="one")
    await push(server, tmp_path, "team/tools", "v1", layers=[90_000], seed="tools")
    await push(server, tmp_path, "secret/vault", "v1", layers=[1_000], seed="secret")
    cached = fake.add_image(
        "library/alpine", "v3.20.1", [payload_bytes(900_000, "a"), payload_bytes(4_000, "b")]
    )
    await pull_through(server, cached, times=2)
    shots = artifacts_dir()

    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    page = await context.new_page()
    await page.goto(f"{server.url}/ui/")
    assert "/ui/login" in page.url, "auth is on: the UI asks to log in first"
    await page.fill("input[name=username]", "bob")
    await page.fill("input[name=password]", PASSWORDS["bob"])
    await page.click("button[type=submit]")
    await page.wait_for_url(f"{server.url}/ui/")
    body = await page.inner_text("main")
    assert "team/app" in body and "team/tools" in body
    assert "secret/vault" not in body, "bob may not pull secret/**"
    cookies = await context.cookies()
    (cookie,) = [c for c in cookies if c["name"] == "regproxy_ui"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/ui/"
    await page.screenshot(path=str(shots / "ui-repositories.png"), full_page=True)

    await page.click("a[href='/ui/repo/team/app']")
    await page.wait_for_url("**/ui/repo/team/app")
    row = page.locator("tr", has=page.locator("a", has_text="1.4.2"))
    text = await row.inner_text()
    assert index.digest[:19] in text and "index" in text
    assert "linux/amd64" in text and "linux/arm64/v8" in text
    await page.screenshot(path=str(shots / "ui-repository.png"), full_page=True)

    await page.click("a:text-is('1.4.2')")
    await page.wait_for_url("**/ui/manifest/team/app/-/1.4.2")
    manifests = await page.inner_text("main")
    for child in index.manifests:
        assert child.platform in manifests
    assert "A <b>two-platform</b> test image" in manifests, "annotations shown as text"
    await page.screenshot(path=str(shots / "ui-index.png"), full_page=True)

    arm = index.platform("linux", "arm64")
    await page.click(f"a[href='/ui/manifest/team/app/-/{arm.digest}']")
    await page.wait_for_url(f"**/ui/manifest/team/app/-/{arm.digest}")
    layers = await page.locator("h2:text-is('Layers') + table").inner_text()
    for layer in arm.layers:
        assert layer.digest in layers and layer.media_type in layers
    assert arm.config.digest in await page.inner_text("main")
    await page.screenshot(path=str(shots / "ui-image.png"), full_page=True)

    await page.goto(f"{server.url}/ui/upstreams")
    upstreams = await page.inner_text("main")
    assert "fake.io" in upstreams and "50%" in upstreams, "one cold pull, one warm: 1 of 2 hits"
    assert "87 of 100" in upstreams
    await page.screenshot(path=str(shots / "ui-upstreams.png"), full_page=True)
    await page.click("a[href='/ui/']")
    assert "fake.io/library/alpine" in await page.inner_text("main")

    await page.goto(f"{server.url}/ui/repo/secret/vault")
    assert "Not found" in await page.inner_text("h1")
    await page.click("button:text-is('Log out')")
    await page.wait_for_url("**/ui/login")
    await page.goto(f"{server.url}/ui/repo/team/app")
    assert "/ui/login" in page.url
    await context.close()
