"""Access control on the registry API: challenges, tokens, Basic credentials, rules."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import Any

import jwt
import pytest

from regproxy.api.routes import ROUTE_ACCESS
from regproxy.app import create_app
from regproxy.auth.service import AUTH
from regproxy.auth.tokens import generate_key, load_key
from regproxy.config import Config
from tests.auth.conftest import AsUser, StartClient, auth_config, basic
from tests.helpers import Client, assert_error, make_config, push_blob, push_image

CHALLENGE_RE = re.compile(r"^Bearer ((?:\w+=\"[^\"]*\",?)+)$")


def challenge(resp: Any) -> dict[str, str]:
    header = resp.headers["WWW-Authenticate"]
    match = CHALLENGE_RE.match(header)
    assert match, header
    return dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))


async def token_for(client: Client, user: str | None, *scopes: str) -> str:
    headers = {"Authorization": basic(user)} if user else {}
    params = [("service", "regproxy"), *(("scope", s) for s in scopes)]
    resp = await client.get("/token", params=params, headers=headers)
    assert resp.status == 200, await resp.text()
    token: str = (await resp.json())["token"]
    return token


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def claims_of(token: str) -> dict[str, Any]:
    decoded: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return decoded


# -- challenges ----------------------------------------------------------------------------


async def test_base_answers_401_with_a_bearer_challenge(anon: Client) -> None:
    for path in ("/v2/", "/v2"):
        resp = await anon.get(path)
        await assert_error(resp, 401, "UNAUTHORIZED")
        params = challenge(resp)
        assert params == {"realm": f"http://{anon.host}:{anon.port}/token", "service": "regproxy"}


async def test_protected_endpoints_challenge_with_their_scope(anon: Client) -> None:
    cases = [
        ("GET", "/v2/team/app/manifests/v1", "repository:team/app:pull"),
        ("HEAD", "/v2/team/app/manifests/v1", "repository:team/app:pull"),
        ("PUT", "/v2/team/app/manifests/v1", "repository:team/app:push"),
        ("DELETE", "/v2/team/app/manifests/v1", "repository:team/app:delete"),
        ("POST", "/v2/team/app/blobs/uploads/", "repository:team/app:push"),
        ("GET", "/v2/team/app/tags/list", "repository:team/app:pull"),
        ("GET", f"/v2/team/app/blobs/sha256:{'0' * 64}", "repository:team/app:pull"),
        ("PUT", "/v2/public/app/manifests/v1", "repository:public/app:push"),
        (
            "POST",
            f"/v2/team/app/blobs/uploads/?mount=sha256:{'0' * 64}&from=team/other",
            "repository:team/app:push repository:team/other:pull",
        ),
    ]
    for method, path, scope in cases:
        resp = await anon.request(method, path)
        await assert_error(resp, 401, "UNAUTHORIZED")
        assert challenge(resp)["scope"] == scope, (method, path)
    resp = await anon.get("/v2/_catalog")
    await assert_error(resp, 401, "UNAUTHORIZED")
    assert challenge(resp)["scope"] == "registry:catalog:*"


async def test_realm_follows_the_host_or_the_config(
    start: StartClient, anon: Client, tmp_path: Path
) -> None:
    resp = await anon.get("/v2/", headers={"Host": "registry.example:8443"})
    assert challenge(resp)["realm"] == "http://registry.example:8443/token"
    resp = await anon.get("/v2/", headers={"Host": 'evil"host'})
    assert challenge(resp)["realm"] == "http://localhost/token"

    config = auth_config(
        tmp_path / "proxied", auth__realm="https://reg.example/auth/token", auth__service="reg"
    )
    client = await start(config)
    resp = await client.get("/v2/team/app/tags/list")
    assert challenge(resp) == {
        "realm": "https://reg.example/auth/token",
        "service": "reg",
        "scope": "repository:team/app:pull",
    }


async def test_healthz_and_token_need_nothing(anon: Client) -> None:
    assert (await anon.get("/healthz")).status == 200
    assert (await anon.get("/token")).status == 200


def test_every_route_has_an_access_entry(app_routes: list[tuple[str, str]]) -> None:
    for method, path in app_routes:
        key = (method, path)
        assert key in ROUTE_ACCESS or ("GET", path) in ROUTE_ACCESS, key
    assert set(ROUTE_ACCESS) <= set(app_routes)


@pytest.fixture
def app_routes(tmp_path: Path) -> list[tuple[str, str]]:
    # With cluster.secret: the peers' fill endpoint exists (and is in ROUTE_ACCESS) too.
    app = create_app(auth_config(tmp_path, cluster__secret="s" * 32))
    return [(r.method, r.resource.canonical) for r in app.router.routes() if r.resource]


# -- anonymous access by the rules ---------------------------------------------------------


async def test_anonymous_pull_allowed_and_denied_by_rules(anon: Client, admin: Client) -> None:
    public = await push_image(admin, "public/app", "v1", seed="pub")
    private = await push_image(admin, "team/app", "v1", seed="priv")

    resp = await anon.get("/v2/public/app/manifests/v1", headers={"Accept": public.media_type})
    assert resp.status == 200
    assert await resp.read() == public.manifest
    for digest, data in public.blobs.items():
        resp = await anon.get(f"/v2/public/app/blobs/{digest}")
        assert resp.status == 200 and await resp.read() == data

    resp = await anon.get("/v2/team/app/manifests/v1")
    await assert_error(resp, 401, "UNAUTHORIZED")
    digest = next(iter(private.blobs))
    await assert_error(await anon.get(f"/v2/team/app/blobs/{digest}"), 401, "UNAUTHORIZED")
    # the same blob, asked for through a repository anonymous clients may read: not linked
    await assert_error(await anon.get(f"/v2/public/app/blobs/{digest}"), 404, "BLOB_UNKNOWN")


async def test_anonymous_push_and_delete_are_refused(anon: Client, admin: Client) -> None:
    image = await push_image(admin, "public/app", "v1")
    resp = await anon.post("/v2/public/app/blobs/uploads/", params={"digest": image.digest})
    await assert_error(resp, 401, "UNAUTHORIZED")
    resp = await anon.delete(f"/v2/public/app/manifests/{image.digest}")
    await assert_error(resp, 401, "UNAUTHORIZED")
    resp = await admin.get(f"/v2/public/app/manifests/{image.digest}")
    assert resp.status == 200


async def test_anonymous_token_flow(anon: Client, admin: Client) -> None:
    image = await push_image(admin, "public/app", "v1")
    token = await token_for(anon, None, "repository:public/app:pull,push", "repository:team/x:pull")
    claims = claims_of(token)
    assert claims["sub"] == ""
    assert claims["access"] == [{"type": "repository", "name": "public/app", "actions": ["pull"]}]
    assert (await anon.get("/v2/", headers=bearer(token))).status == 200
    resp = await anon.get("/v2/public/app/manifests/v1", headers=bearer(token))
    assert resp.status == 200 and await resp.read() == image.manifest
    resp = await anon.post("/v2/public/app/blobs/uploads/", headers=bearer(token))
    await assert_error(resp, 401, "UNAUTHORIZED")
    assert challenge(resp)["error"] == "insufficient_scope"


# -- users and rules -------------------------------------------------------------------------


async def test_push_denied_to_users_without_the_right(
    anon: Client, admin: Client, as_user: AsUser
) -> None:
    bob = await as_user(anon, "bob")
    carol = await as_user(anon, "carol")
    await push_image(bob, "team/app", "v1", seed="bob")  # devs may push to team/**
    for client, repo in ((carol, "team/app"), (bob, "other/app"), (carol, "shared/app")):
        resp = await client.post(f"/v2/{repo}/blobs/uploads/")
        error = await assert_error(resp, 403, "DENIED")
        assert error["detail"] == [{"Type": "repository", "Name": repo, "Action": "push"}]
    # delete is alice's alone
    resp = await bob.delete("/v2/team/app/manifests/v1")
    await assert_error(resp, 403, "DENIED")
    assert (await admin.delete("/v2/team/app/manifests/v1")).status == 202


async def test_group_and_signed_in_rules(anon: Client, admin: Client, as_user: AsUser) -> None:
    shared = await push_image(admin, "shared/tools", "v1")
    await push_image(admin, "shared/deep/tools", "v1")
    bob = await as_user(anon, "bob")
    carol = await as_user(anon, "carol")
    for client in (bob, carol):
        resp = await client.get("/v2/shared/tools/manifests/v1")
        assert resp.status == 200 and await resp.read() == shared.manifest
        # "*" stays within one path component
        await assert_error(await client.get("/v2/shared/deep/tools/tags/list"), 403, "DENIED")
    await assert_error(await anon.get("/v2/shared/tools/tags/list"), 401, "UNAUTHORIZED")


async def test_wrong_basic_credentials_get_401(anon: Client) -> None:
    for header in (
        basic("bob", "wrong"),
        basic("nobody", "x"),
        "Basic not-base64!",
        "Basic " + "Ym9i",  # "bob" without a colon
        "Digest username=bob",
    ):
        resp = await anon.get("/v2/team/app/tags/list", headers={"Authorization": header})
        await assert_error(resp, 401, "UNAUTHORIZED")
        assert challenge(resp)["scope"] == "repository:team/app:pull"


async def test_basic_credentials_on_v2_requests(anon: Client, as_user: AsUser) -> None:
    bob = await as_user(anon, "bob")
    assert (await bob.get("/v2/")).status == 200
    digest = await push_blob(bob, "team/app", b"layer bytes")
    resp = await bob.get(f"/v2/team/app/blobs/{digest}")
    assert resp.status == 200 and await resp.read() == b"layer bytes"


async def test_catalog_lists_only_pullable_repositories(
    anon: Client, admin: Client, as_user: AsUser
) -> None:
    for repo in ("public/a", "public/b/c", "shared/x", "team/app", "zeta/secret"):
        await push_image(admin, repo, "v1")
    bob = await as_user(anon, "bob")
    carol = await as_user(anon, "carol")
    expected = {
        admin: ["public/a", "public/b/c", "shared/x", "team/app", "zeta/secret"],
        bob: ["public/a", "public/b/c", "shared/x", "team/app"],
        carol: ["public/a", "public/b/c", "shared/x"],
    }
    for client, repos in expected.items():
        resp = await client.get("/v2/_catalog")
        assert resp.status == 200
        assert (await resp.json())["repositories"] == repos
    # pagination counts visible names only
    resp = await carol.get("/v2/_catalog", params={"n": "2"})
    assert (await resp.json())["repositories"] == ["public/a", "public/b/c"]
    assert resp.headers["Link"] == '</v2/_catalog?n=2&last=public%2Fb%2Fc>; rel="next"'
    resp = await carol.get("/v2/_catalog", params={"n": "2", "last": "public/b/c"})
    assert (await resp.json())["repositories"] == ["shared/x"]
    assert "Link" not in resp.headers
    token = await token_for(anon, None, "registry:catalog:*")
    resp = await anon.get("/v2/_catalog", headers=bearer(token))
    assert (await resp.json())["repositories"] == ["public/a", "public/b/c"]


async def test_mount_needs_pull_on_the_source(anon: Client, admin: Client, as_user: AsUser) -> None:
    digest = await push_blob(admin, "zeta/secret", b"secret layer")
    bob = await as_user(anon, "bob")
    params = {"mount": digest, "from": "zeta/secret"}
    # bob may not pull the source: no mount, an upload starts (202), as for a missing blob,
    # so the answer says nothing about zeta/secret (a 403 would also fail containerd's push)
    resp = await bob.post("/v2/team/app/blobs/uploads/", params=params)
    assert resp.status == 202, await resp.text()
    assert resp.headers["Location"].startswith("/v2/team/app/blobs/uploads/")
    await assert_error(await bob.get(f"/v2/team/app/blobs/{digest}"), 404, "BLOB_UNKNOWN")
    # without from, a mount would link the blob from anywhere: it starts an upload instead
    resp = await bob.post("/v2/team/app/blobs/uploads/", params={"mount": digest})
    assert resp.status == 202
    await assert_error(await bob.get(f"/v2/team/app/blobs/{digest}"), 404, "BLOB_UNKNOWN")
    # from a source bob may pull, the mount works
    await push_blob(admin, "public/base", b"base layer")
    params = {"mount": await push_blob(admin, "public/base", b"base layer"), "from": "public/base"}
    resp = await bob.post("/v2/team/app/blobs/uploads/", params=params)
    assert resp.status == 201
    resp = await bob.get(f"/v2/team/app/blobs/{params['mount']}")
    assert await resp.read() == b"base layer"


async def test_mount_with_a_token_as_containerd_pushes(anon: Client, admin: Client) -> None:
    """containerd pushes a pulled layer with ``?mount=&from=<where it came from>``; only a 401
    makes it fall back to a plain upload, any other error fails the push."""
    secret = await push_blob(admin, "zeta/secret", b"secret layer")
    base = await push_blob(admin, "public/base", b"base layer")
    push_only = bearer(await token_for(anon, "bob", "repository:team/app:push,pull"))
    uploads = "/v2/team/app/blobs/uploads/"
    # a source bob may not pull: the mount is ignored and an upload starts
    resp = await anon.post(
        uploads, params={"mount": secret, "from": "zeta/secret"}, headers=push_only
    )
    assert resp.status == 202, await resp.text()
    # a source bob may pull, but this token lacks it: 401 asks for a token that has it...
    resp = await anon.post(
        uploads, params={"mount": base, "from": "public/base"}, headers=push_only
    )
    await assert_error(resp, 401, "UNAUTHORIZED")
    assert challenge(resp)["error"] == "insufficient_scope"
    assert challenge(resp)["scope"] == "repository:team/app:push repository:public/base:pull"
    # ...with which the mount works
    both = bearer(
        await token_for(anon, "bob", "repository:team/app:push,pull", "repository:public/base:pull")
    )
    resp = await anon.post(uploads, params={"mount": base, "from": "public/base"}, headers=both)
    assert resp.status == 201, await resp.text()
    # a push bob may not do stays refused, mount or not
    resp = await anon.post(
        "/v2/zeta/app/blobs/uploads/", params={"mount": base, "from": "public/base"}, headers=both
    )
    error = await assert_error(resp, 403, "DENIED")
    assert error["detail"] == [{"Type": "repository", "Name": "zeta/app", "Action": "push"}]


# -- tokens on requests --------------------------------------------------------------------


async def test_token_grants_exactly_its_scope(anon: Client, admin: Client) -> None:
    await push_image(admin, "team/a", "v1", seed="a")
    image_b = await push_image(admin, "team/b", "v1", seed="b")
    token = await token_for(anon, "bob", "repository:team/a:pull")
    assert (await anon.get("/v2/team/a/tags/list", headers=bearer(token))).status == 200
    # bob may pull team/b, but this token is for team/a: fetch another one
    resp = await anon.get("/v2/team/b/tags/list", headers=bearer(token))
    await assert_error(resp, 401, "UNAUTHORIZED")
    assert challenge(resp)["error"] == "insufficient_scope"
    assert challenge(resp)["scope"] == "repository:team/b:pull"
    # bob may never pull zeta/secret: denied outright
    await push_blob(admin, "zeta/secret", b"s")
    resp = await anon.get("/v2/zeta/secret/tags/list", headers=bearer(token))
    await assert_error(resp, 403, "DENIED")
    # a token for pull does not push
    resp = await anon.post("/v2/team/a/blobs/uploads/", headers=bearer(token))
    await assert_error(resp, 401, "UNAUTHORIZED")
    token_b = await token_for(anon, "bob", "repository:team/b:pull")
    resp = await anon.get("/v2/team/b/manifests/v1", headers=bearer(token_b))
    assert await resp.read() == image_b.manifest


async def test_tampered_and_foreign_tokens_are_refused(
    anon: Client, admin: Client, secured: Config, tmp_path: Path
) -> None:
    await push_image(admin, "team/a", "v1")
    token = await token_for(anon, "bob", "repository:team/a:pull")
    header, payload, signature = token.split(".")
    claims = claims_of(token)
    key = await asyncio.to_thread(load_key, secured.data_path / "auth" / "token-key.pem")
    service = anon.server.app[AUTH].tokens

    def signed(**changes: Any) -> str:
        return jwt.encode({**claims, **changes}, key, "ES256")

    other_key = generate_key()
    forged_payload = jwt.encode(
        {**claims, "access": [{"type": "repository", "name": "zeta/x", "actions": ["pull"]}]},
        key,
        "ES256",
    ).split(".")[1]
    now = int(time.time())
    bad = {
        "tampered payload": f"{header}.{forged_payload}.{signature}",
        "tampered signature": f"{header}.{payload}.{signature[:-4]}AAAA",
        "other key": jwt.encode(claims, other_key, "ES256"),
        "expired": signed(exp=now - 60, iat=now - 400, nbf=now - 400),
        "not yet valid": signed(nbf=now + 600),
        "other service": signed(aud="another-registry"),
        "other issuer": signed(iss="someone-else"),
        "no expiry": jwt.encode({k: v for k, v in claims.items() if k != "exp"}, key, "ES256"),
        "refresh token": service.issue_refresh("bob", "x").token,
        "alg none": jwt.encode(claims, None, "none"),
        "garbage": "not.a.token",
    }
    for name, value in bad.items():
        resp = await anon.get("/v2/team/a/tags/list", headers=bearer(value))
        await assert_error(resp, 401, "UNAUTHORIZED")
        assert challenge(resp)["error"] == "invalid_token", name
    # the real one still works
    assert (await anon.get("/v2/team/a/tags/list", headers=bearer(token))).status == 200


async def test_hmac_token_signed_with_the_public_key_is_refused(
    anon: Client, secured: Config
) -> None:
    """The classic algorithm confusion: HS256 keyed with the (public) verification key."""
    import base64
    import hashlib
    import hmac
    import json

    from cryptography.hazmat.primitives import serialization

    key = await asyncio.to_thread(load_key, secured.data_path / "auth" / "token-key.pem")
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    token = await token_for(anon, "bob", "repository:team/a:pull")
    claims = claims_of(token)

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(claims).encode())
    sig = b64(hmac.new(public_pem, f"{head}.{body}".encode(), hashlib.sha256).digest())
    resp = await anon.get("/v2/team/a/tags/list", headers=bearer(f"{head}.{body}.{sig}"))
    await assert_error(resp, 401, "UNAUTHORIZED")


async def test_token_expires_after_its_ttl(start: StartClient, tmp_path: Path) -> None:
    client = await start(auth_config(tmp_path, auth__token_ttl=1.0))
    token = await token_for(client, "bob", "repository:team/a:pull")
    claims = claims_of(token)
    assert claims["exp"] - claims["iat"] == 1
    assert (await client.get("/v2/", headers=bearer(token))).status == 200
    # LEEWAY (5 s) of clock skew is tolerated; move past it
    service = client.server.app[AUTH].tokens
    old = service.issue_access("bob", [], now=time.time() - 10)
    await assert_error(await client.get("/v2/", headers=bearer(old.token)), 401, "UNAUTHORIZED")


# -- pull-through prefixes -----------------------------------------------------------------


async def test_upstream_prefixes_are_pull_only_for_everyone(
    start: StartClient, tmp_path: Path, anon: Client
) -> None:
    upstreams = {"docker.io": {"url": "http://127.0.0.1:9"}}
    secured = await start(auth_config(tmp_path / "s", upstreams=upstreams))
    resp = await secured.post(
        "/v2/docker.io/library/alpine/blobs/uploads/", headers={"Authorization": basic("alice")}
    )
    await assert_error(resp, 403, "DENIED")
    token = await token_for(secured, "alice", "repository:docker.io/library/alpine:*")
    assert claims_of(token)["access"] == [
        {"type": "repository", "name": "docker.io/library/alpine", "actions": ["pull"]}
    ]
    # also in open mode (no users, no rules), where everything else is allowed
    open_client = await start(make_config(tmp_path / "o", upstreams=upstreams))
    for method in ("PUT", "DELETE"):
        resp = await open_client.request(method, "/v2/docker.io/library/alpine/manifests/3")
        await assert_error(resp, 403, "DENIED")
    resp = await open_client.post("/v2/dockerio/library/alpine/blobs/uploads/")
    assert resp.status == 202


async def test_open_mode_on_loopback_allows_anonymous_everything(client: Client) -> None:
    assert (await client.get("/v2/")).status == 200
    image = await push_image(client, "any/repo", "v1")
    assert (await client.delete(f"/v2/any/repo/manifests/{image.digest}")).status == 202
    resp = await client.get("/token", params={"scope": "repository:any/repo:*"})
    assert claims_of((await resp.json())["token"])["access"][0]["actions"] == [
        "delete",
        "pull",
        "push",
    ]
