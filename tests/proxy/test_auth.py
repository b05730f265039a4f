"""Authenticating to the upstream: the token flow (anonymous and with credentials), token
caching, Basic auth, and never passing on the client's own credentials."""

from __future__ import annotations

import asyncio
import base64

import pytest

from tests.helpers import Client, assert_error
from tests.proxy.conftest import MakeProxy
from tests.proxy.fakeupstream import FakeImage, FakeUpstream

REPO = "lib/app"
CLIENT_SECRET = "Basic " + base64.b64encode(b"client:client-secret").decode()


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


async def pull(client: Client, image: FakeImage, reference: str = "v1", **headers: str) -> None:
    """Manifest by tag, then every blob: bytes and digests as the upstream has them."""
    resp = await client.get(f"/v2/fake/{image.repo}/manifests/{reference}", headers=headers)
    assert resp.status == 200, await resp.text()
    assert await resp.read() == image.manifest
    assert resp.headers["Docker-Content-Digest"] == image.digest
    for digest, data in image.blobs.items():
        resp = await client.get(f"/v2/fake/{image.repo}/blobs/{digest}", headers=headers)
        assert resp.status == 200, await resp.text()
        assert await resp.read() == data


def upstream_requests(upstream: FakeUpstream) -> list[str]:
    return [s.path for s in upstream.seen if s.path.startswith("/v2/")]


async def test_bearer_anonymous(make_proxy: MakeProxy, upstream: FakeUpstream) -> None:
    upstream.auth = "bearer"
    image = upstream.add_image(REPO, "v1", [b"a" * 1000, b"b" * 2000])
    proxy = await make_proxy()
    await pull(proxy, image)
    assert upstream.token_requests() == 1
    assert upstream.token_scopes == [f"repository:{REPO}:pull"]
    token_request = next(s for s in upstream.seen if s.path == "/token")
    assert token_request.query["service"] == "fake-registry"
    assert "Authorization" not in token_request.headers  # anonymous
    # one 401 to learn the realm, then every request carries the token
    assert sum(upstream.count("GET", p, 401) for p in set(upstream_requests(upstream))) == 1
    assert all(a.startswith("Bearer ") for a in upstream.authorizations())


async def test_token_per_repository(make_proxy: MakeProxy, upstream: FakeUpstream) -> None:
    upstream.auth = "bearer"
    first = upstream.add_image(REPO, "v1", seed="1")
    second = upstream.add_image("lib/other", "v1", seed="2")
    proxy = await make_proxy()
    await pull(proxy, first)
    await pull(proxy, second)
    await pull(proxy, first, "v1")
    assert sorted(upstream.token_scopes) == [
        f"repository:{REPO}:pull",
        "repository:lib/other:pull",
    ]


async def test_concurrent_requests_share_one_token(
    make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    upstream.auth = "bearer"
    layers = [bytes([n]) * 5000 for n in range(8)]
    image = upstream.add_image(REPO, "v1", layers)
    proxy = await make_proxy()

    async def get(digest: str, data: bytes) -> None:
        resp = await proxy.get(f"/v2/fake/{REPO}/blobs/{digest}")
        assert resp.status == 200 and await resp.read() == data

    await asyncio.gather(*(get(d, b) for d, b in image.blobs.items()))
    assert upstream.token_requests() == 1


async def test_bearer_with_credentials(make_proxy: MakeProxy, upstream: FakeUpstream) -> None:
    upstream.auth = "bearer"
    upstream.token_requires_creds = True
    upstream.users = {"alice": "s3cret"}
    image = upstream.add_image(REPO, "v1")
    proxy = await make_proxy(username="alice", password="s3cret")
    await pull(proxy, image)
    token_requests = [s for s in upstream.seen if s.path == "/token"]
    assert len(token_requests) == 1
    assert token_requests[0].headers["Authorization"] == basic("alice", "s3cret")
    # the registry itself only ever sees the token, not the password
    registry_auth = [
        s.headers.get("Authorization", "") for s in upstream.seen if s.path != "/token"
    ]
    assert not [a for a in registry_auth if a.startswith("Basic")]


async def test_bearer_with_wrong_credentials(make_proxy: MakeProxy, upstream: FakeUpstream) -> None:
    """Refused at the token service: DENIED, as for a Basic-auth upstream."""
    upstream.auth = "bearer"
    upstream.token_requires_creds = True
    upstream.users = {"alice": "s3cret"}
    image = upstream.add_image(REPO, "v1")
    proxy = await make_proxy(username="alice", password="wrong")
    await assert_error(await proxy.get(f"/v2/fake/{REPO}/manifests/v1"), 403, "DENIED")
    digest = next(iter(image.blobs))
    await assert_error(await proxy.get(f"/v2/fake/{REPO}/blobs/{digest}"), 403, "DENIED")
    assert upstream.blob_gets(REPO, digest) == 0


async def test_token_service_down(make_proxy: MakeProxy, upstream: FakeUpstream) -> None:
    upstream.auth = "bearer"
    image = upstream.add_image(REPO, "v1")
    proxy = await make_proxy()
    assert upstream.base_url is not None
    upstream.base_url = upstream.base_url.with_port(9)  # the challenge's realm: a closed port
    await assert_error(await proxy.get(f"/v2/fake/{REPO}/manifests/v1"), 503, "UNAVAILABLE")
    digest = next(iter(image.blobs))
    await assert_error(await proxy.get(f"/v2/fake/{REPO}/blobs/{digest}"), 503, "UNAVAILABLE")


async def test_token_cached_until_expiry(make_proxy: MakeProxy, upstream: FakeUpstream) -> None:
    upstream.auth = "bearer"
    # regproxy renews 10 s before expiry, so 11 s means "good for about 1 s" here
    upstream.token_expires_in = 11
    image = upstream.add_image(REPO, "v1")
    proxy = await make_proxy(tag_ttl=0)
    for _ in range(5):
        await pull(proxy, image)
    assert upstream.token_requests() == 1
    await asyncio.sleep(1.1)
    await pull(proxy, image)
    assert upstream.token_requests() == 2


async def test_rejected_token_renewed(make_proxy: MakeProxy, upstream: FakeUpstream) -> None:
    """A token the upstream no longer accepts (expired early, revoked) is replaced at once."""
    upstream.auth = "bearer"
    image = upstream.add_image(REPO, "v1")
    other = upstream.add_image(REPO, "v2", seed="other")
    proxy = await make_proxy(tag_ttl=0)
    await pull(proxy, image)
    upstream.tokens.clear()  # the upstream forgets every token it issued
    await pull(proxy, other, "v2")
    assert upstream.token_requests() == 2


async def test_basic_auth_upstream(make_proxy: MakeProxy, upstream: FakeUpstream) -> None:
    upstream.auth = "basic"
    upstream.users = {"bob": "pa55"}
    image = upstream.add_image(REPO, "v1")
    proxy = await make_proxy(username="bob", password="pa55")
    await pull(proxy, image)
    assert upstream.token_requests() == 0
    assert set(upstream.authorizations()) == {basic("bob", "pa55")}
    assert sum(n for (_, _, s), n in upstream.statuses.items() if s == 401) == 1


async def test_basic_auth_wrong_password(make_proxy: MakeProxy, upstream: FakeUpstream) -> None:
    upstream.auth = "basic"
    upstream.users = {"bob": "pa55"}
    upstream.add_image(REPO, "v1")
    proxy = await make_proxy(username="bob", password="nope")
    await assert_error(await proxy.get(f"/v2/fake/{REPO}/manifests/v1"), 403, "DENIED")


@pytest.mark.parametrize("auth", ["none", "bearer", "basic"])
async def test_client_credentials_never_forwarded(
    make_proxy: MakeProxy, upstream: FakeUpstream, auth: str
) -> None:
    upstream.auth = auth
    upstream.users = {"bob": "pa55"}
    image = upstream.add_image(REPO, "v1")
    proxy = await make_proxy(username="bob", password="pa55", tag_ttl=0)
    for _ in range(2):
        await pull(proxy, image, Authorization=CLIENT_SECRET, Cookie="session=client-cookie")
        resp = await proxy.get(
            f"/v2/fake/{REPO}/tags/list", headers={"Authorization": CLIENT_SECRET}
        )
        assert (await resp.json())["tags"] == ["v1"]
    assert upstream.seen
    for seen in upstream.seen:
        assert "client-secret" not in str(seen.headers)
        assert CLIENT_SECRET not in seen.headers.values()
        assert "Cookie" not in seen.headers
    if auth == "none":
        assert upstream.authorizations() == []
