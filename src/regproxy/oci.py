"""The distribution spec's vocabulary: digests, names, tags, media types and header names."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Final

from regproxy.errors import DigestInvalid, NameInvalid, TagInvalid

# -- digests ---------------------------------------------------------------------------------

_HEX_LENGTH: Final = {"sha256": 64, "sha512": 128}
# Matched with fullmatch(): "$" would also accept a trailing newline.
_DIGEST_RE: Final = re.compile(r"([a-z0-9]+(?:[+._-][a-z0-9]+)*):([a-zA-Z0-9=_-]+)")
ALGORITHMS: Final = tuple(_HEX_LENGTH)


def check_algorithm(algorithm: str) -> str:
    if algorithm not in _HEX_LENGTH:
        raise DigestInvalid(f"unsupported digest algorithm {algorithm!r}", detail=algorithm)
    return algorithm


@dataclass(frozen=True, slots=True)
class Digest:
    """A parsed, validated content digest such as ``sha256:<64 hex>``."""

    algorithm: str
    hex: str

    @classmethod
    def parse(cls, value: str) -> Digest:
        match = _DIGEST_RE.fullmatch(value)
        if match is None:
            raise DigestInvalid(f"malformed digest {value[:200]!r}", detail=value[:200])
        algorithm, encoded = match.groups()
        check_algorithm(algorithm)
        if len(encoded) != _HEX_LENGTH[algorithm] or not _is_lower_hex(encoded):
            raise DigestInvalid(f"malformed {algorithm} digest", detail=value[:200])
        return cls(algorithm, encoded)

    @classmethod
    def of(cls, data: bytes, algorithm: str = "sha256") -> Digest:
        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())

    def hasher(self) -> hashlib._Hash:
        return hashlib.new(self.algorithm)

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"


_LOWER_HEX_RE: Final = re.compile(r"[0-9a-f]*")


def _is_lower_hex(text: str) -> bool:
    return _LOWER_HEX_RE.fullmatch(text) is not None


def is_digest(reference: str) -> bool:
    return ":" in reference


# -- names and tags --------------------------------------------------------------------------

NAME_MAX_LENGTH: Final = 255
_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_NAME_RE: Final = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG_RE: Final = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")


def parse_name(name: str) -> str:
    if len(name) > NAME_MAX_LENGTH:
        raise NameInvalid(f"repository name longer than {NAME_MAX_LENGTH} characters")
    if not _NAME_RE.fullmatch(name):
        raise NameInvalid(f"invalid repository name {name[:100]!r}", detail={"name": name[:100]})
    return name


def parse_tag(tag: str) -> str:
    if not _TAG_RE.fullmatch(tag):
        raise TagInvalid(f"invalid tag {tag[:200]!r}", detail={"tag": tag[:200]})
    return tag


# -- media types -----------------------------------------------------------------------------

OCI_MANIFEST: Final = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX: Final = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST: Final = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST: Final = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_SCHEMA1: Final = (
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
)
OCI_ARTIFACT_MANIFEST: Final = "application/vnd.oci.artifact.manifest.v1+json"  # withdrawn
IMAGE_MANIFEST_TYPES: Final = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
INDEX_TYPES: Final = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
# What may be pushed (and pulled) as a manifest here.
MANIFEST_TYPES: Final = IMAGE_MANIFEST_TYPES | INDEX_TYPES
# Every media type that names a manifest, supported or not: an index entry of one of these
# is a child manifest; an entry of any other type is a blob (BuildKit's cache index lists
# its layers and its cache config that way).
KNOWN_MANIFEST_TYPES: Final = MANIFEST_TYPES | frozenset({*DOCKER_SCHEMA1, OCI_ARTIFACT_MANIFEST})
OCTET_STREAM: Final = "application/octet-stream"

# -- header names ----------------------------------------------------------------------------

CONTENT_DIGEST: Final = "Docker-Content-Digest"
UPLOAD_UUID: Final = "Docker-Upload-UUID"
API_VERSION: Final = "Docker-Distribution-API-Version"
API_VERSION_VALUE: Final = "registry/2.0"
OCI_SUBJECT: Final = "OCI-Subject"
OCI_FILTERS_APPLIED: Final = "OCI-Filters-Applied"
OCI_TAG: Final = "OCI-Tag"
OCI_NAMESPACE: Final = "OCI-Namespace"
OCI_CHUNK_MIN_LENGTH: Final = "OCI-Chunk-Min-Length"
