"""Pure-Python builders of test container images (stdlib only).

Two formats are produced:

* an OCI image layout directory (``oci-layout``, ``index.json``, ``blobs/sha256/...``) that
  ``skopeo copy oci:DIR:TAG ...`` reads, holding either a single-platform image manifest or a
  multi-platform image index;
* a ``docker save``-format tarball that ``docker load -i`` accepts.

Layer payloads are random bytes (``os.urandom``) or, with a seed, bytes from a seeded PRNG, so
layers barely compress and every digest can be compared byte for byte after a round trip.
Tar and gzip headers carry fixed timestamps, so a seeded build is fully reproducible.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

OCI_LAYOUT_VERSION = "1.0.0"
MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MT_OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"

EPOCH = "1970-01-01T00:00:00Z"
DEFAULT_PLATFORM: tuple[str, str] = ("linux", "amd64")
_DEFAULT_ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]

Compression = Literal["gzip", "none"]
# ("linux", "amd64") or ("linux", "arm", "v7")
Platform = tuple[str, str] | tuple[str, str, str]


# -- small helpers ---------------------------------------------------------------------------


def sha256_digest(data: bytes) -> str:
    """``sha256:<hex>`` of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical_json(obj: Any) -> bytes:
    """Compact, key-sorted JSON bytes (what the builders hash and write)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def payload_bytes(size: int, seed: int | str | None) -> bytes:
    """``size`` incompressible bytes: random, or reproducible for a given ``seed``."""
    if seed is None:
        return os.urandom(size)
    return random.Random(seed).randbytes(size)


def build_tar(files: Iterable[tuple[str, bytes]]) -> bytes:
    """An uncompressed, reproducible tar holding ``files`` (path, content) and their parents."""
    buf = io.BytesIO()
    seen_dirs: set[str] = set()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path, content in files:
            path = path.strip("/")
            for parent in _parents(path):
                if parent not in seen_dirs:
                    seen_dirs.add(parent)
                    tar.addfile(_tarinfo(parent, tarfile.DIRTYPE, 0o755))
            info = _tarinfo(path, tarfile.REGTYPE, 0o644)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def _parents(path: str) -> list[str]:
    parts = path.split("/")[:-1]
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


def _tarinfo(name: str, kind: bytes, mode: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def gzip_bytes(data: bytes) -> bytes:
    """Gzip with a zero header mtime, so equal input gives equal output."""
    return gzip.compress(data, compresslevel=1, mtime=0)


# -- result types ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Blob:
    """A content descriptor: what a manifest says about one blob."""

    digest: str
    size: int
    media_type: str

    def descriptor(self, **extra: Any) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size, **extra}


@dataclass(frozen=True)
class LayerSpec:
    """How to build one layer: a tar holding one file of ``size`` payload bytes.

    ``path`` defaults to ``data/layer-<n>.bin``; ``seed`` (int or str) makes the payload
    reproducible, otherwise the image-wide seed (or ``os.urandom``) is used.
    """

    size: int
    path: str | None = None
    seed: int | str | None = None
    compression: Compression = "gzip"


@dataclass(frozen=True)
class PlatformManifest:
    """One image manifest (one platform) with its config and layers."""

    os: str
    architecture: str
    variant: str | None
    manifest: Blob
    config: Blob
    layers: tuple[Blob, ...]
    diff_ids: tuple[str, ...]

    @property
    def digest(self) -> str:
        return self.manifest.digest

    @property
    def platform(self) -> str:
        base = f"{self.os}/{self.architecture}"
        return f"{base}/{self.variant}" if self.variant else base


@dataclass(frozen=True)
class OciImage:
    """What :func:`make_oci_layout` wrote.

    ``digest`` is the top-level digest (the index for a multi-platform image, else the
    manifest). ``blobs`` lists configs and layers; :attr:`all_blobs` adds manifests and index.
    """

    path: Path
    tag: str
    digest: str
    media_type: str
    size: int
    manifests: tuple[PlatformManifest, ...]
    index: Blob | None = None

    @property
    def is_index(self) -> bool:
        return self.index is not None

    @property
    def manifest_digests(self) -> list[str]:
        return [m.digest for m in self.manifests]

    @property
    def blobs(self) -> list[Blob]:
        """Config and layer blobs, in manifest order, without duplicates."""
        found: dict[str, Blob] = {}
        for m in self.manifests:
            for blob in (m.config, *m.layers):
                found.setdefault(blob.digest, blob)
        return list(found.values())

    @property
    def all_blobs(self) -> dict[str, int]:
        """digest -> size of every file in ``blobs/sha256`` (index, manifests, configs, layers)."""
        sizes = {b.digest: b.size for b in self.blobs}
        sizes.update({m.manifest.digest: m.manifest.size for m in self.manifests})
        if self.index is not None:
            sizes[self.index.digest] = self.index.size
        return sizes

    def ref(self, tag: str | None = None) -> str:
        """A skopeo/containers-image reference such as ``oci:/path:latest``."""
        return f"oci:{self.path}:{tag or self.tag}"

    def read_blob(self, digest: str) -> bytes:
        return blob_path(self.path, digest).read_bytes()

    def platform(self, os_name: str, architecture: str) -> PlatformManifest:
        for m in self.manifests:
            if (m.os, m.architecture) == (os_name, architecture):
                return m
        raise KeyError(f"{os_name}/{architecture}")


@dataclass(frozen=True)
class DockerArchive:
    """What :func:`make_docker_archive` wrote; ``image_id`` is what ``docker images`` shows."""

    path: Path
    image_id: str
    repo_tag: str
    diff_ids: tuple[str, ...]
    config: bytes = field(repr=False)

    @property
    def config_digest(self) -> str:
        return self.image_id


# -- OCI image layout ------------------------------------------------------------------------


def blob_path(layout: Path | str, digest: str) -> Path:
    algorithm, hex_ = digest.split(":", 1)
    return Path(layout) / "blobs" / algorithm / hex_


def make_oci_layout(
    dir: Path | str,
    layers: Sequence[int | LayerSpec],
    platforms: Sequence[Platform] | None = None,
    *,
    tag: str = "latest",
    seed: int | str | None = None,
    annotations: dict[str, str] | None = None,
) -> OciImage:
    """Write an OCI image layout at ``dir`` and describe it.

    ``layers`` are payload sizes in bytes or :class:`LayerSpec`. With ``platforms`` (e.g.
    ``[("linux", "amd64"), ("linux", "arm64")]``) an image index is written, each platform
    with its own manifest, config and layers (distinct content); without, one linux/amd64
    image manifest. ``index.json`` names the top-level manifest with ``tag`` as its
    ``org.opencontainers.image.ref.name``. ``annotations`` go on the top-level manifest/index.
    """
    root = Path(dir)
    _init_layout(root)
    specs = [spec if isinstance(spec, LayerSpec) else LayerSpec(spec) for spec in layers]
    wanted = list(platforms) if platforms else [DEFAULT_PLATFORM]
    as_index = platforms is not None
    built = [
        _write_platform_image(
            root,
            specs,
            plat,
            seed=_sub_seed(seed, f"p{n}"),
            annotations=None if as_index else annotations,
        )
        for n, plat in enumerate(wanted)
    ]
    index_blob = _write_image_index(root, built, annotations) if as_index else None
    top = index_blob or built[0].manifest
    _write_index_json(root, top, tag)
    return OciImage(
        path=root,
        tag=tag,
        digest=top.digest,
        media_type=top.media_type,
        size=top.size,
        manifests=tuple(built),
        index=index_blob,
    )


def _init_layout(root: Path) -> None:
    (root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (root / "oci-layout").write_bytes(canonical_json({"imageLayoutVersion": OCI_LAYOUT_VERSION}))


def _sub_seed(seed: int | str | None, suffix: str) -> str | None:
    return None if seed is None else f"{seed}/{suffix}"


def _write_blob(root: Path, data: bytes, media_type: str) -> Blob:
    digest = sha256_digest(data)
    path = blob_path(root, digest)
    if not path.exists():
        path.write_bytes(data)
    return Blob(digest, len(data), media_type)


def _build_layer(spec: LayerSpec, number: int, seed: str | None) -> tuple[bytes, bytes, str]:
    """(blob bytes, uncompressed tar, media type) for one layer."""
    content_seed = spec.seed if spec.seed is not None else _sub_seed(seed, f"l{number}")
    path = spec.path or f"data/layer-{number}.bin"
    tar = build_tar([(path, payload_bytes(spec.size, content_seed))])
    if spec.compression == "gzip":
        return gzip_bytes(tar), tar, MT_OCI_LAYER_GZIP
    return tar, tar, MT_OCI_LAYER_TAR


def image_config(platform: Platform, diff_ids: Sequence[str]) -> dict[str, Any]:
    """A minimal OCI/Docker image config for ``platform`` with the given ``rootfs.diff_ids``."""
    config: dict[str, Any] = {
        "created": EPOCH,
        "architecture": platform[1],
        "os": platform[0],
        "config": {"Env": list(_DEFAULT_ENV), "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
        "history": [
            {"created": EPOCH, "created_by": f"regproxy test layer {n}"}
            for n in range(len(diff_ids))
        ],
    }
    if len(platform) > 2:
        config["variant"] = platform[2]
    return config


def _write_platform_image(
    root: Path,
    specs: Sequence[LayerSpec],
    platform: Platform,
    *,
    seed: str | None,
    annotations: dict[str, str] | None,
) -> PlatformManifest:
    layer_blobs: list[Blob] = []
    diff_ids: list[str] = []
    for number, spec in enumerate(specs):
        blob_bytes, tar, media_type = _build_layer(spec, number, seed)
        layer_blobs.append(_write_blob(root, blob_bytes, media_type))
        diff_ids.append(sha256_digest(tar))
    config = _write_blob(root, canonical_json(image_config(platform, diff_ids)), MT_OCI_CONFIG)
    manifest_obj: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": MT_OCI_MANIFEST,
        "config": config.descriptor(),
        "layers": [blob.descriptor() for blob in layer_blobs],
    }
    if annotations:
        manifest_obj["annotations"] = dict(annotations)
    manifest = _write_blob(root, canonical_json(manifest_obj), MT_OCI_MANIFEST)
    return PlatformManifest(
        os=platform[0],
        architecture=platform[1],
        variant=platform[2] if len(platform) > 2 else None,
        manifest=manifest,
        config=config,
        layers=tuple(layer_blobs),
        diff_ids=tuple(diff_ids),
    )


def _platform_obj(m: PlatformManifest) -> dict[str, str]:
    obj = {"architecture": m.architecture, "os": m.os}
    if m.variant:
        obj["variant"] = m.variant
    return obj


def _write_image_index(
    root: Path, manifests: Sequence[PlatformManifest], annotations: dict[str, str] | None
) -> Blob:
    index_obj: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": MT_OCI_INDEX,
        "manifests": [m.manifest.descriptor(platform=_platform_obj(m)) for m in manifests],
    }
    if annotations:
        index_obj["annotations"] = dict(annotations)
    return _write_blob(root, canonical_json(index_obj), MT_OCI_INDEX)


def _write_index_json(root: Path, top: Blob, tag: str) -> None:
    index_json = {
        "schemaVersion": 2,
        "mediaType": MT_OCI_INDEX,
        "manifests": [top.descriptor(annotations={REF_NAME_ANNOTATION: tag})],
    }
    (root / "index.json").write_bytes(canonical_json(index_json))


# -- reading a layout back (e.g. one that skopeo wrote) --------------------------------------


def read_layout_blobs(dir: Path | str, *, verify: bool = True) -> dict[str, int]:
    """digest -> size of every blob under ``dir/blobs/sha256``; checks each hash if ``verify``."""
    sizes: dict[str, int] = {}
    for path in sorted((Path(dir) / "blobs" / "sha256").iterdir()):
        data = path.read_bytes()
        digest = f"sha256:{path.name}"
        if verify and sha256_digest(data) != digest:
            raise ValueError(f"blob {path} does not match its digest")
        sizes[digest] = len(data)
    return sizes


def layout_ref_digest(dir: Path | str, tag: str | None = None) -> str:
    """Digest that ``index.json`` names for ``tag`` (or its only entry when ``tag`` is None)."""
    entries = json.loads((Path(dir) / "index.json").read_bytes())["manifests"]
    if tag is not None:
        entries = [e for e in entries if e.get("annotations", {}).get(REF_NAME_ANNOTATION) == tag]
    if len(entries) != 1:
        raise LookupError(f"{dir}: expected one index.json entry for {tag!r}, got {len(entries)}")
    return str(entries[0]["digest"])


# -- docker save archive ---------------------------------------------------------------------


def make_docker_archive(
    path: Path | str,
    layer_sizes: Sequence[int],
    repo_tag: str,
    *,
    seed: int | str | None = None,
) -> DockerArchive:
    """Write a ``docker save``-format tarball for linux/amd64 at ``path``.

    The first layer holds a tiny rootfs (``etc/os-release``, ``hello.txt``) besides its
    payload; layer ``n`` holds ``data/layer-<n>.bin`` of ``layer_sizes[n]`` bytes (no sizes:
    one layer with just the rootfs). Layers are stored uncompressed, as ``docker save`` does.
    The image never needs to run. ``image_id`` is ``sha256:`` of the config JSON.
    """
    sizes: list[int | None] = list(layer_sizes) if layer_sizes else [None]
    layer_tars = [
        build_tar(_docker_layer_files(n, size, _sub_seed(seed, f"l{n}")))
        for n, size in enumerate(sizes)
    ]
    diff_ids = [sha256_digest(tar) for tar in layer_tars]
    config = canonical_json(image_config(DEFAULT_PLATFORM, diff_ids))
    image_id = sha256_digest(config)
    layer_names = [f"{d.split(':', 1)[1]}/layer.tar" for d in diff_ids]
    config_name = f"{image_id.split(':', 1)[1]}.json"
    manifest = [
        {
            "Config": config_name,
            "RepoTags": [repo_tag],
            "Layers": layer_names,
        }
    ]
    members: list[tuple[str, bytes]] = [
        ("manifest.json", canonical_json(manifest)),
        (config_name, config),
        *zip(layer_names, layer_tars, strict=True),
    ]
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(build_tar(members))
    return DockerArchive(out, image_id, repo_tag, tuple(diff_ids), config)


def _docker_layer_files(number: int, size: int | None, seed: str | None) -> list[tuple[str, bytes]]:
    files: list[tuple[str, bytes]] = []
    if number == 0:
        files.append(("etc/os-release", b'NAME="regproxy-test"\nID=regproxy-test\n'))
        files.append(("hello.txt", b"hello from a regproxy test image\n"))
    if size is not None:
        files.append((f"data/layer-{number}.bin", payload_bytes(size, seed)))
    return files
