"""The signing key and the JWTs of the registry token flow.

Access tokens are short-lived and carry the granted actions in an ``access`` claim, as the
distribution token spec describes. Refresh tokens (``offline_token`` / ``access_type=offline``;
docker keeps one as its identity token) name a user and a fingerprint of the user's password
hash, so changing the password revokes them. A ``use`` claim keeps one kind from passing for
the other. Verification pins the algorithm to the key's own (no ``none``, no HMAC confusion)
and requires signature, expiry, issuer and audience (the configured service).

The key is an EC P-256 (ES256) or RSA (RS256, 2048 bits or more) private key in PEM. Without a
configured one, an EC key is generated on first start into the data directory.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

ISSUER: Final = "regproxy"
ACCESS_USE: Final = "access"
REFRESH_USE: Final = "refresh"
# Clock skew tolerated between the token's times and ours.
LEEWAY: Final = 5.0

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


class SigningKeyError(ValueError):
    """The signing key cannot be used; the message says why."""


class InvalidToken(Exception):
    """A token that is malformed, forged, expired, for another service or of the wrong kind.

    The message is for the log of the server, never a place for the token itself.
    """


@dataclass(frozen=True)
class AccessClaims:
    subject: str | None  # None: anonymous
    # repository name -> granted actions; ("registry", "catalog") entries under "registry:"
    access: Mapping[str, frozenset[str]] = field(default_factory=dict)
    expires: float = 0.0

    def actions(self, repo: str) -> frozenset[str]:
        return self.access.get(repo, frozenset())


@dataclass(frozen=True)
class IssuedToken:
    token: str
    expires_in: int
    issued_at: str


def _algorithm(key: PrivateKey) -> str:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise SigningKeyError(f"EC keys must be on P-256 (ES256), not {key.curve.name}")
        return "ES256"
    if key.key_size < 2048:
        raise SigningKeyError(f"RSA keys must have at least 2048 bits, not {key.key_size}")
    return "RS256"


def load_key(path: Path) -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise SigningKeyError(f"{path} is not an unencrypted PEM private key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise SigningKeyError(f"{path} holds neither an EC nor an RSA key")
    _algorithm(key)
    return key


def generate_key() -> PrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def load_or_create_key(path: Path) -> PrivateKey:
    """The key at ``path``, generated there first (EC P-256, mode 0600) if missing.

    Two processes starting at once on a shared data directory end up with the same key: the
    file is published with a hard link, which fails if another one got there first.
    """
    if path.exists():
        return load_key(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = generate_key()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return load_key(path)
    finally:
        tmp.unlink(missing_ok=True)
    return key


def key_id(key: PrivateKey) -> str:
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b32encode(hashlib.sha256(der).digest()[:20]).decode().rstrip("=")


def _rfc3339(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


class TokenService:
    def __init__(
        self,
        key: PrivateKey,
        *,
        service: str,
        ttl: float,
        refresh_ttl: float,
    ) -> None:
        self._key = key
        self._public = key.public_key()
        self.algorithm = _algorithm(key)
        self.key_id = key_id(key)
        self.service = service
        self.ttl = ttl
        self.refresh_ttl = refresh_ttl

    def _sign(self, claims: dict[str, Any], ttl: float, now: float | None) -> IssuedToken:
        now = time.time() if now is None else now
        claims.update(
            {
                "iss": ISSUER,
                "aud": self.service,
                "iat": int(now),
                "nbf": int(now),
                "exp": int(now + ttl),
                "jti": secrets.token_urlsafe(16),
            }
        )
        token = jwt.encode(claims, self._key, self.algorithm, headers={"kid": self.key_id})
        return IssuedToken(token, int(ttl), _rfc3339(now))

    def issue_access(
        self,
        subject: str | None,
        access: Iterable[tuple[str, str, Iterable[str]]],
        now: float | None = None,
    ) -> IssuedToken:
        """A token granting ``access``: (type, name, actions) triples, empty ones left out."""
        entries = [
            {"type": kind, "name": name, "actions": sorted(actions)}
            for kind, name, actions in access
            if actions
        ]
        claims = {"sub": subject or "", "use": ACCESS_USE, "access": entries}
        return self._sign(claims, self.ttl, now)

    def issue_refresh(self, subject: str, password_fingerprint: str) -> IssuedToken:
        claims = {"sub": subject, "use": REFRESH_USE, "pwd": password_fingerprint}
        return self._sign(claims, self.refresh_ttl, None)

    def _decode(self, token: str, use: str) -> dict[str, Any]:
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                self._public,
                algorithms=[self.algorithm],
                audience=self.service,
                issuer=ISSUER,
                leeway=LEEWAY,
                options={"require": ["exp", "iat", "nbf", "iss", "aud", "sub"]},
            )
        except jwt.InvalidTokenError as exc:
            raise InvalidToken(f"{type(exc).__name__}: {exc}") from None
        if claims.get("use") != use:
            raise InvalidToken(f"not an {use} token")
        if not isinstance(claims.get("sub"), str):
            raise InvalidToken("no subject")
        return claims

    def verify_access(self, token: str) -> AccessClaims:
        claims = self._decode(token, ACCESS_USE)
        access: dict[str, frozenset[str]] = {}
        entries = claims.get("access", [])
        if not isinstance(entries, list):
            raise InvalidToken("malformed access claim")
        for entry in entries:
            if not isinstance(entry, dict):
                raise InvalidToken("malformed access claim")
            kind, name, actions = entry.get("type"), entry.get("name"), entry.get("actions")
            if not isinstance(name, str) or not isinstance(actions, list):
                raise InvalidToken("malformed access claim")
            key = name if kind == "repository" else f"{kind}:{name}"
            access[key] = access.get(key, frozenset()) | {str(a) for a in actions}
        return AccessClaims(claims["sub"] or None, access, float(claims["exp"]))

    def verify_refresh(self, token: str) -> tuple[str, str]:
        """(user, password fingerprint) of a valid refresh token."""
        claims = self._decode(token, REFRESH_USE)
        subject, fp = claims["sub"], claims.get("pwd")
        if not subject or not isinstance(fp, str):
            raise InvalidToken("refresh token without user")
        return subject, fp
