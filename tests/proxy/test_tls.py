"""An upstream over TLS: verified against the system store by default, or a configured CA."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.conftest import MakeClient
from tests.helpers import assert_error, make_config
from tests.proxy.conftest import ServerFactory
from tests.proxy.fakeupstream import FakeUpstream

REPO = "lib/app"


def _certificate(
    name: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
        builder = builder.add_extension(san, critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture
def pki(tmp_path: Path) -> tuple[Path, ssl.SSLContext]:
    """A private CA (its PEM file) and a server context with a certificate it signed."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "regproxy test CA")])
    ca_cert = _certificate("regproxy test CA", ca_key, ca_name, ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = _certificate("127.0.0.1", server_key, ca_name, ca_key, ca=False)
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    chain = tmp_path / "server.pem"
    chain.write_bytes(
        server_cert.public_bytes(serialization.Encoding.PEM)
        + server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(chain)
    return ca_file, context


async def test_tls_upstream_needs_its_ca(
    aiohttp_server: ServerFactory,
    make_client: MakeClient,
    pki: tuple[Path, ssl.SSLContext],
    tmp_path: Path,
) -> None:
    ca_file, server_context = pki
    fake = FakeUpstream()
    image = fake.add_image(REPO, "v1", seed="tls")
    server = await aiohttp_server(fake.app(), ssl=server_context)
    url = str(server.make_url(""))
    assert url.startswith("https://127.0.0.1:")

    # The system store does not know our CA: the upstream is unusable, nothing is cached.
    config = await asyncio.to_thread(
        make_config, tmp_path / "untrusted", upstreams={"tls": {"url": url}}
    )
    untrusted = await make_client(config)
    response = await untrusted.get(f"/v2/tls/{REPO}/manifests/v1")
    await assert_error(response, 503, "UNAVAILABLE")

    # With the CA configured, the manifest and every blob come through byte for byte.
    config = await asyncio.to_thread(  # the config checks that the CA file exists
        make_config,
        tmp_path / "trusted",
        upstreams={"tls": {"url": url, "ca_bundle": str(ca_file)}},
    )
    trusted = await make_client(config)
    response = await trusted.get(f"/v2/tls/{REPO}/manifests/v1")
    assert response.status == 200
    assert await response.read() == image.manifest
    for digest, data in image.blobs.items():
        response = await trusted.get(f"/v2/tls/{REPO}/blobs/{digest}")
        assert response.status == 200
        assert await response.read() == data
