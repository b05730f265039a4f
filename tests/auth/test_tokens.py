"""Signing keys and JWTs: generation, algorithms, and what verification insists on."""

from __future__ import annotations

import stat
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from regproxy.auth.tokens import (
    InvalidToken,
    SigningKeyError,
    TokenService,
    generate_key,
    load_key,
    load_or_create_key,
)


def service(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | None = None) -> TokenService:
    return TokenService(key or generate_key(), service="reg", ttl=60, refresh_ttl=3600)


def test_key_is_generated_once_and_private(tmp_path: Path) -> None:
    path = tmp_path / "auth" / "key.pem"
    key = load_or_create_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = load_or_create_key(path)
    assert again.private_numbers() == key.private_numbers()
    assert [p.name for p in path.parent.iterdir()] == ["key.pem"]


def write_pem(path: Path, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


def test_rsa_keys_sign_rs256(tmp_path: Path) -> None:
    key = rsa.generate_private_key(65537, 2048)
    tokens = service(load_key(write_pem(tmp_path / "rsa.pem", key)))
    assert tokens.algorithm == "RS256"
    issued = tokens.issue_access("bob", [("repository", "a/b", ["pull"])])
    assert jwt.get_unverified_header(issued.token)["alg"] == "RS256"
    assert tokens.verify_access(issued.token).actions("a/b") == {"pull"}


@pytest.mark.parametrize(
    "key",
    [
        pytest.param(lambda: ec.generate_private_key(ec.SECP384R1()), id="p384"),
        pytest.param(lambda: rsa.generate_private_key(65537, 1024), id="rsa1024"),
    ],
)
def test_unsuitable_keys_are_refused(tmp_path: Path, key: object) -> None:
    with pytest.raises(SigningKeyError):
        load_key(write_pem(tmp_path / "k.pem", key()))  # type: ignore[operator]
    (tmp_path / "junk.pem").write_text("not a key")
    with pytest.raises(SigningKeyError):
        load_key(tmp_path / "junk.pem")


def test_access_claims_round_trip() -> None:
    tokens = service()
    issued = tokens.issue_access(
        None,
        [
            ("repository", "a/b", ["pull", "push"]),
            ("repository", "c", []),
            ("registry", "catalog", ["*"]),
        ],
    )
    claims = tokens.verify_access(issued.token)
    assert claims.subject is None
    assert claims.actions("a/b") == {"pull", "push"}
    assert claims.actions("c") == set()
    assert claims.access["registry:catalog"] == {"*"}
    raw = jwt.decode(issued.token, options={"verify_signature": False})
    assert [e["name"] for e in raw["access"]] == ["a/b", "catalog"]


def test_verification_requirements() -> None:
    tokens = service()
    other = service()
    now = time.time()
    good = tokens.issue_access("bob", [("repository", "a", ["pull"])]).token
    assert tokens.verify_access(good).subject == "bob"
    refused = {
        "other key": other.issue_access("bob", []).token,
        "expired": tokens.issue_access("bob", [], now=now - 120).token,
        "refresh as access": tokens.issue_refresh("bob", "fp").token,
        "other audience": TokenService(tokens._key, service="other", ttl=60, refresh_ttl=60)
        .issue_access("bob", [])
        .token,
        "truncated": good[:-10],
        "empty": "",
    }
    for name, token in refused.items():
        with pytest.raises(InvalidToken):
            tokens.verify_access(token)
            pytest.fail(name)
    with pytest.raises(InvalidToken):
        tokens.verify_refresh(good)
    assert tokens.verify_refresh(tokens.issue_refresh("bob", "fp").token) == ("bob", "fp")


def test_refresh_ttl_and_unique_ids() -> None:
    tokens = service()
    a = jwt.decode(tokens.issue_refresh("bob", "fp").token, options={"verify_signature": False})
    b = jwt.decode(tokens.issue_refresh("bob", "fp").token, options={"verify_signature": False})
    assert a["exp"] - a["iat"] == 3600
    assert a["jti"] != b["jti"]
