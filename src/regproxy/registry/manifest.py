"""What a manifest is allowed to be, and what it references: the one place for these rules."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from regproxy import oci, safejson
from regproxy.errors import DigestInvalid, ManifestInvalid, ManifestUnknown, TagInvalid
from regproxy.meta.base import Reference
from regproxy.oci import Digest
from regproxy.safejson import JSONTooDeep


def lookup_reference(reference: str) -> Digest | str:
    """The digest or tag a manifest GET or HEAD names.

    A reference that is neither names no manifest that could exist: it is unknown (404
    MANIFEST_UNKNOWN, as distribution answers), not invalid. Pushes still refuse it as
    TAG_INVALID or DIGEST_INVALID.
    """
    try:
        return Digest.parse(reference) if oci.is_digest(reference) else oci.parse_tag(reference)
    except (DigestInvalid, TagInvalid) as exc:
        raise ManifestUnknown(
            f"no manifest can have the reference {reference[:200]!r}",
            detail={"reference": reference[:200]},
        ) from exc


@dataclass(frozen=True, slots=True)
class ParsedManifest:
    media_type: str
    references: tuple[Reference, ...]
    subject: Digest | None
    artifact_type: str | None
    annotations: dict[str, str] | None


def parse_manifest(content_type: str | None, content: bytes) -> ParsedManifest:
    """Validate a pushed manifest and list what it references.

    The media type comes from the request's Content-Type, or from the body's ``mediaType``
    when the request names none; when both are present they must agree.
    """
    try:
        doc = safejson.loads(content)
    except JSONTooDeep as exc:
        raise ManifestInvalid(f"manifest is {exc}") from exc
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ManifestInvalid(f"manifest is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise ManifestInvalid("manifest must be a JSON object")

    declared = doc.get("mediaType")
    header = (content_type or "").split(";")[0].strip().lower() or None
    if header in oci.DOCKER_SCHEMA1 or declared in oci.DOCKER_SCHEMA1:
        raise ManifestInvalid("Docker schema 1 manifests are not supported; push schema 2 or OCI")
    if doc.get("schemaVersion") != 2:
        raise ManifestInvalid("schemaVersion must be 2 (schema 1 manifests are not supported)")
    if declared is not None and not isinstance(declared, str):
        raise ManifestInvalid("mediaType must be a string")
    if header in (None, "application/json", "application/octet-stream"):
        header = None
    media_type = header or declared or _guess(doc)
    if declared is not None and declared != media_type:
        raise ManifestInvalid(
            f"Content-Type {media_type} does not match the manifest's mediaType {declared}"
        )
    if media_type not in oci.MANIFEST_TYPES:
        raise ManifestInvalid(f"unsupported manifest media type {media_type!r}")

    references: list[Reference] = []
    artifact_type = _optional_str(doc, "artifactType")
    if media_type in oci.IMAGE_MANIFEST_TYPES:
        config = _descriptor(doc.get("config"), "config")
        references.append(Reference(config.digest, is_manifest=False))
        layers = doc.get("layers")
        if not isinstance(layers, list):
            raise ManifestInvalid("layers must be an array")
        for i, raw in enumerate(layers):
            layer = _descriptor(raw, f"layers[{i}]")
            if not layer.urls:  # non-distributable layers live elsewhere
                references.append(Reference(layer.digest, is_manifest=False))
        if artifact_type is None:
            artifact_type = config.media_type
    else:
        children = doc.get("manifests")
        if not isinstance(children, list):
            raise ManifestInvalid("manifests must be an array")
        for i, raw in enumerate(children):
            child = _descriptor(raw, f"manifests[{i}]")
            # Each entry is what its media type says: a child manifest, or a blob.
            is_manifest = child.media_type in oci.KNOWN_MANIFEST_TYPES
            references.append(Reference(child.digest, is_manifest=is_manifest))

    subject = None
    if "subject" in doc:
        subject = _descriptor(doc["subject"], "subject").digest
    annotations = doc.get("annotations")
    if annotations is not None and not (
        isinstance(annotations, dict) and all(isinstance(v, str) for v in annotations.values())
    ):
        raise ManifestInvalid("annotations must map strings to strings")
    return ParsedManifest(
        media_type=media_type,
        references=tuple(dict.fromkeys(references)),
        subject=subject,
        artifact_type=artifact_type,
        annotations=annotations,
    )


def annotations_of(content: bytes) -> dict[str, str] | None:
    doc = safejson.loads(content)
    value = doc.get("annotations") if isinstance(doc, dict) else None
    return value if isinstance(value, dict) else None


@dataclass(frozen=True, slots=True)
class _Descriptor:
    media_type: str
    digest: Digest
    size: int
    urls: list[str]


def _descriptor(raw: Any, where: str) -> _Descriptor:
    if not isinstance(raw, dict):
        raise ManifestInvalid(f"{where} must be a descriptor object")
    media_type = raw.get("mediaType")
    if not isinstance(media_type, str) or not media_type:
        raise ManifestInvalid(f"{where}.mediaType must be a non-empty string")
    digest = raw.get("digest")
    if not isinstance(digest, str):
        raise ManifestInvalid(f"{where}.digest must be a string")
    try:
        parsed = Digest.parse(digest)
    except DigestInvalid as exc:
        raise ManifestInvalid(f"{where}.digest: {exc.message}") from exc
    size = raw.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ManifestInvalid(f"{where}.size must be a non-negative integer")
    urls = raw.get("urls") or []
    if not isinstance(urls, list):
        raise ManifestInvalid(f"{where}.urls must be an array")
    return _Descriptor(media_type, parsed, size, urls)


def _optional_str(doc: dict[str, Any], key: str) -> str | None:
    value = doc.get(key)
    if value is not None and not isinstance(value, str):
        raise ManifestInvalid(f"{key} must be a string")
    return value


def _guess(doc: dict[str, Any]) -> str:
    # OCI allows mediaType to be left out; the shape tells an index from a manifest.
    return oci.OCI_INDEX if "manifests" in doc else oci.OCI_MANIFEST
