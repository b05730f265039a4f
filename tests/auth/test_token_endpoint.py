"""The /token endpoint: GET with Basic, the OAuth2 POST forms, refresh tokens, rate limits."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from regproxy.api.middleware import AccessLogger
from regproxy.auth import service as auth_service
from regproxy.auth.users import set_user
from regproxy.logs import ACCESS_FIELDS
from tests.auth.conftest import PASSWORDS, StartClient, auth_config, basic
from tests.helpers import Client, assert_error, push_image


def claims_of(token: str) -> dict[str, Any]:
    decoded: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return decoded


async def post_form(client: Client, **form: str) -> Any:
    return await client.post("/token", data=form)


async def test_get_with_basic_grants_only_allowed_actions(anon: Client) -> None:
    resp = await anon.get(
        "/token",
        params=[
            ("service", "regproxy"),
            ("scope", "repository:team/app:pull,push,delete"),
            ("scope", "repository:zeta/x:pull repository:public/y:*"),
            ("scope", "repository:Bad_Name:pull"),
            ("scope", "registry:catalog:*"),
        ],
        headers={"Authorization": basic("bob")},
    )
    assert resp.status == 200
    assert resp.headers["Cache-Control"] == "no-store"
    body = await resp.json()
    assert body["token"] == body["access_token"]
    assert body["expires_in"] == 300
    assert "refresh_token" not in body
    claims = claims_of(body["token"])
    assert claims["sub"] == "bob"
    assert claims["aud"] == "regproxy"
    assert claims["exp"] - claims["iat"] == 300
    assert jwt.get_unverified_header(body["token"])["alg"] == "ES256"
    assert claims["access"] == [
        {"type": "repository", "name": "team/app", "actions": ["pull", "push"]},
        {"type": "repository", "name": "public/y", "actions": ["pull", "push"]},
        {"type": "registry", "name": "catalog", "actions": ["*"]},
    ]


async def test_get_with_wrong_password_or_service(anon: Client) -> None:
    resp = await anon.get("/token", headers={"Authorization": basic("bob", "nope")})
    await assert_error(resp, 401, "UNAUTHORIZED")
    resp = await anon.get("/token", params={"service": "other"})
    await assert_error(resp, 403, "DENIED")
    resp = await anon.get("/token", headers={"Authorization": "Bearer abc"})
    await assert_error(resp, 401, "UNAUTHORIZED")


async def test_offline_token_and_refresh_grant(anon: Client, admin: Client) -> None:
    image = await push_image(admin, "team/app", "v1")
    resp = await anon.get(
        "/token",
        params={"service": "regproxy", "offline_token": "true", "client_id": "docker"},
        headers={"Authorization": basic("bob")},
    )
    body = await resp.json()
    assert claims_of(body["token"])["access"] == []
    refresh = body["refresh_token"]
    assert claims_of(refresh)["sub"] == "bob"

    resp = await post_form(
        anon,
        grant_type="refresh_token",
        refresh_token=refresh,
        service="regproxy",
        scope="repository:team/app:pull,push repository:zeta/x:pull",
        client_id="docker",
    )
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert "refresh_token" not in body
    token = body["access_token"]
    assert claims_of(token)["access"] == [
        {"type": "repository", "name": "team/app", "actions": ["pull", "push"]}
    ]
    resp = await anon.get("/v2/team/app/manifests/v1", headers={"Authorization": f"Bearer {token}"})
    assert await resp.read() == image.manifest

    # an access token is no refresh token, and a forged one is refused
    for bad in (token, refresh[:-4] + "AAAA", "garbage"):
        resp = await post_form(anon, grant_type="refresh_token", refresh_token=bad)
        await assert_error(resp, 401, "UNAUTHORIZED")


async def test_password_grant(anon: Client) -> None:
    resp = await post_form(
        anon,
        grant_type="password",
        username="alice",
        password=PASSWORDS["alice"],
        service="regproxy",
        scope="repository:zeta/x:pull,push,delete",
        access_type="offline",
        client_id="containerd",
    )
    assert resp.status == 200
    body = await resp.json()
    assert claims_of(body["access_token"])["access"][0]["actions"] == ["delete", "pull", "push"]
    assert claims_of(body["refresh_token"])["sub"] == "alice"

    resp = await post_form(anon, grant_type="password", username="alice", password="wrong")
    await assert_error(resp, 401, "UNAUTHORIZED")
    resp = await post_form(anon, grant_type="client_credentials")
    await assert_error(resp, 400, "UNSUPPORTED")


async def test_refresh_tokens_die_with_the_password(start: StartClient, tmp_path: Path) -> None:
    htpasswd = tmp_path / "htpasswd"
    await asyncio.to_thread(set_user, htpasswd, "dave", "first-pw", 4)
    client = await start(auth_config(tmp_path, auth__users_file=str(htpasswd)))
    resp = await client.get(
        "/token",
        params={"offline_token": "true"},
        headers={"Authorization": basic("dave", "first-pw")},
    )
    refresh = (await resp.json())["refresh_token"]
    assert (
        await post_form(client, grant_type="refresh_token", refresh_token=refresh)
    ).status == 200

    await asyncio.to_thread(set_user, htpasswd, "dave", "second-pw", 4)  # picked up live
    resp = await post_form(client, grant_type="refresh_token", refresh_token=refresh)
    await assert_error(resp, 401, "UNAUTHORIZED")
    resp = await client.get("/v2/", headers={"Authorization": basic("dave", "second-pw")})
    assert resp.status == 200


async def test_refresh_fingerprint_is_compared_in_constant_time(
    anon: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[Any, Any]] = []
    compare_digest = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return compare_digest(a, b)

    monkeypatch.setattr(auth_service.hmac, "compare_digest", spy)
    resp = await anon.get(
        "/token", params={"offline_token": "true"}, headers={"Authorization": basic("bob")}
    )
    refresh = (await resp.json())["refresh_token"]
    assert (await post_form(anon, grant_type="refresh_token", refresh_token=refresh)).status == 200
    assert len(calls) == 1


# -- rate limits -----------------------------------------------------------------------------


async def test_failed_logins_are_rate_limited(anon: Client) -> None:
    for _ in range(5):
        resp = await anon.get("/token", headers={"Authorization": basic("bob", "guess")})
        await assert_error(resp, 401, "UNAUTHORIZED")
    # locked out: even the right password is not checked now, on any login path
    resp = await anon.get("/token", headers={"Authorization": basic("bob")})
    await assert_error(resp, 429, "TOOMANYREQUESTS")
    assert 1 <= int(resp.headers["Retry-After"]) <= 60
    resp = await anon.get("/v2/", headers={"Authorization": basic("bob")})
    await assert_error(resp, 429, "TOOMANYREQUESTS")
    resp = await post_form(anon, grant_type="password", username="bob", password=PASSWORDS["bob"])
    await assert_error(resp, 429, "TOOMANYREQUESTS")
    # another user from the same address is not locked out by bob's failures
    resp = await anon.get("/token", headers={"Authorization": basic("carol")})
    assert resp.status == 200


async def test_lockout_ends(start: StartClient, tmp_path: Path) -> None:
    client = await start(auth_config(tmp_path, auth__login_lockout=0.3, auth__max_login_failures=2))
    for _ in range(2):
        await assert_error(
            await client.get("/v2/", headers={"Authorization": basic("bob", "x")}),
            401,
            "UNAUTHORIZED",
        )
    resp = await client.get("/v2/", headers={"Authorization": basic("bob")})
    await assert_error(resp, 429, "TOOMANYREQUESTS")
    await asyncio.sleep(0.35)
    assert (await client.get("/v2/", headers={"Authorization": basic("bob")})).status == 200


# -- nothing secret in logs ------------------------------------------------------------------


async def test_no_password_or_token_in_logs(anon: Client, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    secrets_seen: list[str] = list(PASSWORDS.values())
    resp = await anon.get(
        "/token", params={"offline_token": "true"}, headers={"Authorization": basic("bob")}
    )
    body = await resp.json()
    secrets_seen += [body["token"], body["refresh_token"]]
    await post_form(anon, grant_type="refresh_token", refresh_token=body["refresh_token"])
    await post_form(anon, grant_type="refresh_token", refresh_token=body["token"])  # refused
    await post_form(anon, grant_type="password", username="alice", password=PASSWORDS["alice"])
    # a password typed into the user name field
    await post_form(anon, grant_type="password", username="Hunter2-typo", password="x")
    await anon.get("/v2/", headers={"Authorization": f"Bearer {body['token']}x"})
    await anon.get("/v2/", headers={"Authorization": basic("carol", "wrong-carol")})
    secrets_seen += ["Hunter2-typo", "wrong-carol"]
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "failed login" in text
    for secret in secrets_seen:
        assert secret not in text


def test_access_log_leaves_out_query_strings(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("regproxy.access.test")
    access = AccessLogger(logger, "")
    request = make_mocked_request(
        "GET", "/token?service=regproxy&refresh_token=SECRET-REFRESH&password=SECRET-PW"
    )
    with caplog.at_level(logging.INFO, logger="regproxy.access.test"):
        access.log(request, web.Response(status=200), 0.01)
    record = caplog.records[-1]
    fields = getattr(record, ACCESS_FIELDS)
    assert fields["path"] == "/token"
    assert "SECRET" not in record.getMessage() + json.dumps(fields, default=str)
