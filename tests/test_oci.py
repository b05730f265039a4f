"""The spec's vocabulary: digests, repository names and tags."""

from __future__ import annotations

import hashlib

import pytest

from regproxy import oci
from regproxy.errors import DigestInvalid, NameInvalid, TagInvalid
from regproxy.oci import Digest

SHA256_EMPTY = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_digest_parse_and_str() -> None:
    digest = Digest.parse(f"sha256:{SHA256_EMPTY}")
    assert digest == Digest("sha256", SHA256_EMPTY)
    assert str(digest) == f"sha256:{SHA256_EMPTY}"
    sha512 = hashlib.sha512(b"x").hexdigest()
    assert Digest.parse(f"sha512:{sha512}") == Digest("sha512", sha512)


def test_digest_of_and_hasher() -> None:
    assert Digest.of(b"") == Digest("sha256", SHA256_EMPTY)
    assert Digest.of(b"abc", "sha512") == Digest("sha512", hashlib.sha512(b"abc").hexdigest())
    digest = Digest.of(b"abc")
    hasher = digest.hasher()
    hasher.update(b"abc")
    assert hasher.hexdigest() == digest.hex
    assert Digest.of(b"abc", "sha512").hasher().name == "sha512"


def test_digest_is_a_hashable_value() -> None:
    a = Digest.parse(f"sha256:{SHA256_EMPTY}")
    b = Digest.of(b"")
    assert a == b and hash(a) == hash(b)
    assert len({a, b}) == 1
    with pytest.raises(AttributeError):
        a.hex = "0"  # type: ignore[misc]


@pytest.mark.parametrize(
    "value",
    [
        "",
        "sha256",
        "sha256:",
        SHA256_EMPTY,
        f":{SHA256_EMPTY}",
        f"sha256:{SHA256_EMPTY[:-1]}",
        f"sha256:{SHA256_EMPTY}0",
        f"sha256:{SHA256_EMPTY.upper()}",
        f"SHA256:{SHA256_EMPTY}",
        f"sha256:{SHA256_EMPTY[:-1]}g",
        f"sha256:{SHA256_EMPTY[:-1]}=",
        f"sha256 :{SHA256_EMPTY}",
        f"sha256:{SHA256_EMPTY}\n",
        f"sha512:{SHA256_EMPTY}",
        f"md5:{hashlib.md5(b'').hexdigest()}",
        f"sha1:{hashlib.sha1(b'').hexdigest()}",
        f"sha256+b64u:{SHA256_EMPTY}",
        "sha256:" + "0" * 10000,
    ],
)
def test_digest_parse_rejects(value: str) -> None:
    with pytest.raises(DigestInvalid) as info:
        Digest.parse(value)
    assert info.value.status == 400
    assert info.value.code == "DIGEST_INVALID"
    assert len(str(info.value)) < 300  # long input is not echoed whole


def test_check_algorithm() -> None:
    assert oci.ALGORITHMS == ("sha256", "sha512")
    for algorithm in oci.ALGORITHMS:
        assert oci.check_algorithm(algorithm) == algorithm
    for algorithm in ("md5", "SHA256", "", "sha384"):
        with pytest.raises(DigestInvalid):
            oci.check_algorithm(algorithm)


def test_is_digest() -> None:
    assert oci.is_digest(f"sha256:{SHA256_EMPTY}")
    assert oci.is_digest("x:y")
    assert not oci.is_digest("latest")


@pytest.mark.parametrize(
    "name",
    [
        "a",
        "0",
        "library/alpine",
        "a.b",
        "a_b",
        "a__b",
        "a-b",
        "a--b",
        "a-----b",
        "a.b-c_d__e",
        "a/b/c/d/e/f",
        "x" * 255,
    ],
)
def test_valid_names(name: str) -> None:
    assert oci.parse_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "A",
        "aB",
        "a/",
        "/a",
        "a//b",
        "..",
        "a/../b",
        ".a",
        "a.",
        "a..b",
        "a___b",
        "a_-b",
        "-a",
        "a-",
        "a:b",
        "a b",
        "a\n",
        "a\\b",
        "ä",
        "x" * 256,
    ],
)
def test_invalid_names(name: str) -> None:
    with pytest.raises(NameInvalid) as info:
        oci.parse_name(name)
    assert (info.value.code, info.value.status) == ("NAME_INVALID", 400)


@pytest.mark.parametrize("tag", ["a", "A", "0", "_", "latest", "v1.2.3-rc.1_b", "a" * 128])
def test_valid_tags(tag: str) -> None:
    assert oci.parse_tag(tag) == tag


@pytest.mark.parametrize(
    "tag", ["", "-a", ".a", "a" * 129, "a/b", "a:b", "a b", "a+b", "ä", "a\n", "@sha256"]
)
def test_invalid_tags(tag: str) -> None:
    with pytest.raises(TagInvalid) as info:
        oci.parse_tag(tag)
    assert (info.value.code, info.value.status) == ("TAG_INVALID", 400)


def test_media_type_sets() -> None:
    assert oci.MANIFEST_TYPES == {
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    }
    assert not oci.IMAGE_MANIFEST_TYPES & oci.INDEX_TYPES
    assert not set(oci.DOCKER_SCHEMA1) & oci.MANIFEST_TYPES
