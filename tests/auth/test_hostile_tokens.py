"""Tokens are client JSON too: a bearer or refresh token whose header nests deeply is an
invalid token (401), never a 500. (PyJWT parses the header before checking the signature.)"""

from __future__ import annotations

import base64

import pytest

from tests.helpers import Client, assert_error


def _token(header: bytes) -> str:
    segment = base64.urlsafe_b64encode(header).decode().rstrip("=")
    return f"{segment}.e30.c2ln"


HEADERS = [b"[" * 2500 + b"]" * 2500, b'{"a":' * 1000 + b"1" + b"}" * 1000, b"[" * 5000]


@pytest.mark.parametrize("header", HEADERS, ids=["arrays", "objects", "unclosed"])
async def test_deep_bearer_token_is_invalid(anon: Client, header: bytes) -> None:
    resp = await anon.get(
        "/v2/team/app/tags/list", headers={"Authorization": f"Bearer {_token(header)}"}
    )
    await assert_error(resp, 401, "UNAUTHORIZED")
    assert 'error="invalid_token"' in resp.headers["WWW-Authenticate"]


@pytest.mark.parametrize("header", HEADERS, ids=["arrays", "objects", "unclosed"])
async def test_deep_refresh_token_is_invalid(anon: Client, header: bytes) -> None:
    form = {"grant_type": "refresh_token", "refresh_token": _token(header), "service": ""}
    await assert_error(await anon.post("/token", data=form), 401, "UNAUTHORIZED")
