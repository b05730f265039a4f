"""``regproxy cache ls`` and ``regproxy cache warm``: the pull-through cache from the shell.

Both work in-process on the configured data directory and storage, like the server (which may
be running meanwhile: the metadata store and blob storage are safe to share between
processes). ``warm`` runs the very pull-through path a client's pull runs: the manifest, every
child of an index (or only the ``--platform`` ones), and every blob, each fetched through the
single-flight fill, verified and committed before the command moves on.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from typing import TextIO

from aiohttp import web

from regproxy import oci
from regproxy.api.keys import REGISTRY
from regproxy.app import create_app
from regproxy.config import Config
from regproxy.errors import RegistryError
from regproxy.meta.base import ImageSummary
from regproxy.metrics import METRICS
from regproxy.oci import Digest
from regproxy.preflight import StartupError, check_data_dirs
from regproxy.proxy.pullthrough import describe_error
from regproxy.registry.base import Registry
from regproxy.registry.manifest import parse_manifest
from regproxy.tasks import HOSTED


def human(size: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class ImageRef:
    repo: str  # the repository name here: <upstream>/<path>
    reference: str  # a tag or a digest

    def __str__(self) -> str:
        sep = "@" if oci.is_digest(self.reference) else ":"
        return f"{self.repo}{sep}{self.reference}"


def parse_image(text: str, config: Config) -> ImageRef:
    """``<upstream>/<path>[:tag|@digest]``; ``<upstream>`` is an upstream's name or its host.
    A name without one goes to ``default_upstream``. The tag defaults to ``latest``."""
    name, at, digest = text.partition("@")
    reference = digest if at else "latest"
    if not at:
        head, colon, tag = name.rpartition(":")
        if colon and "/" not in tag:
            name, reference = head, tag
    prefix, slash, rest = name.partition("/")
    hosts = {up_name: up_name for up_name in config.upstreams}
    for up_name, upstream in config.upstreams.items():
        host = upstream.url.split("://", 1)[-1].split("/", 1)[0]
        hosts.setdefault(host, up_name)
    if slash and prefix in hosts:
        repo = f"{hosts[prefix]}/{rest}"
    elif config.default_upstream:
        repo = f"{config.default_upstream}/{name}"
    else:
        known = ", ".join(config.upstreams) or "none configured"
        raise ValueError(f"{text!r} does not name an upstream (upstreams: {known})")
    repo = oci.parse_name(repo)
    if at:
        Digest.parse(reference)
    else:
        oci.parse_tag(reference)
    return ImageRef(repo, reference)


@dataclass
class Warmed:
    manifests: int = 0
    blobs: int = 0
    bytes: int = 0
    seen: set[str] = field(default_factory=set)


async def _warm_blob(registry: Registry, repo: str, digest: Digest, done: Warmed) -> None:
    if str(digest) in done.seen:
        return
    done.seen.add(str(digest))
    blob = await registry.get_blob(repo, digest)
    async for _ in registry.read_blob(blob, 0, blob.size):
        pass  # the fill commits the blob before its last byte is released
    done.blobs += 1
    done.bytes += blob.size


def _wanted(child: dict[str, object], platforms: set[str]) -> bool:
    if not platforms:
        return True
    platform = child.get("platform")
    if not isinstance(platform, dict):
        return False
    parts = [str(platform.get("os", "")), str(platform.get("architecture", ""))]
    if platform.get("variant"):
        parts.append(str(platform["variant"]))
    return "/".join(parts) in platforms or "/".join(parts[:2]) in platforms


async def _warm_manifest(
    registry: Registry, repo: str, reference: str, platforms: set[str], done: Warmed
) -> None:
    manifest = await registry.get_manifest(repo, reference)
    if str(manifest.digest) in done.seen:
        return
    done.seen.add(str(manifest.digest))
    done.manifests += 1
    done.bytes += len(manifest.content)
    parsed = parse_manifest(manifest.media_type, manifest.content)
    children: list[dict[str, object]] = []
    if parsed.media_type in (oci.OCI_INDEX, oci.DOCKER_MANIFEST_LIST):
        doc = json.loads(manifest.content)
        children = [m for m in doc.get("manifests", []) if isinstance(m, dict)]
    wanted = {str(c.get("digest")) for c in children if _wanted(c, platforms)}
    for ref in parsed.references:
        if ref.is_manifest:
            if not children or str(ref.digest) in wanted:
                await _warm_manifest(registry, repo, str(ref.digest), platforms, done)
        else:
            await _warm_blob(registry, repo, ref.digest, done)


async def warm(
    config: Config, images: list[str], platforms: set[str], out: TextIO, err: TextIO
) -> int:
    """Pre-fetch ``images`` into the cache; 0 if every one was warmed, else 1."""
    refs: list[ImageRef] = []
    for text in images:
        try:
            refs.append(parse_image(text, config))
        except (ValueError, RegistryError) as exc:
            message = exc.message if isinstance(exc, RegistryError) else str(exc)
            print(f"regproxy: {text}: {message}", file=err)
            return 2
    check_data_dirs(config)
    app = create_app(config)
    runner = web.AppRunner(app)  # opens storage and the upstream clients; listens nowhere
    await runner.setup()
    failed = 0
    try:
        registry = app[REGISTRY]
        for ref in refs:
            started = time.monotonic()
            before = await _pulled(app)
            done = Warmed()
            try:
                await _warm_manifest(registry, ref.repo, ref.reference, platforms, done)
            except RegistryError as exc:
                failed += 1
                print(f"regproxy: cannot warm {ref}: {exc.code}: {exc.message}", file=err)
                continue
            except Exception as exc:
                failed += 1
                print(f"regproxy: cannot warm {ref}: {describe_error(exc)}", file=err)
                continue
            fetched = await _pulled(app) - before
            print(
                f"warmed {ref}: {done.manifests} manifest(s), {done.blobs} blob(s),"
                f" {human(done.bytes)}, {human(fetched)} of it fetched from upstream,"
                f" in {time.monotonic() - started:.1f}s",
                file=out,
            )
    finally:
        await runner.cleanup()
    return 1 if failed else 0


async def list_cached(config: Config, upstream: str | None, out: TextIO) -> int:
    """Print the cached images (of one upstream, or all), with their size."""
    if upstream is not None and upstream not in config.upstreams:
        known = ", ".join(config.upstreams) or "none configured"
        print(f"regproxy: no upstream {upstream!r} (upstreams: {known})", file=sys.stderr)
        return 2
    check_data_dirs(config)
    app = create_app(config)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        meta = app[HOSTED].meta
        rows: list[ImageSummary] = []
        for name in [upstream] if upstream else list(config.upstreams):
            rows.extend(await meta.cached_tags(name))
    finally:
        await runner.cleanup()
    header = ("REPOSITORY", "TAG", "DIGEST", "SIZE", "CHECKED (UTC)")
    table = [
        (
            row.repo,
            row.tag,
            str(row.digest)[:19],
            human(row.size),
            time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(row.checked)),
        )
        for row in rows
    ]
    widths = [max(len(r[i]) for r in [header, *table]) for i in range(len(header))]
    for line in [header, *table]:
        print(
            "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip(),
            file=out,
        )
    total = sum(row.size for row in rows)
    print(
        f"{len(rows)} tag(s); CHECKED is when the tag was last fetched or confirmed upstream;"
        f" sizes count each image's blobs once ({human(total)} summed over tags)",
        file=out,
    )
    return 0


async def _pulled(app: web.Application) -> float:
    """Bytes fetched from every upstream so far (this process)."""
    stats = await app[METRICS].upstream_stats()
    return sum(s.pulled_bytes for s in stats.values())


def run_warm(config: Config, images: list[str], platforms: list[str]) -> int:
    try:
        return asyncio.run(warm(config, images, set(platforms), sys.stdout, sys.stderr))
    except StartupError as exc:
        print(f"regproxy: {exc}", file=sys.stderr)
        return 2


def run_ls(config: Config, upstream: str | None) -> int:
    try:
        return asyncio.run(list_cached(config, upstream, sys.stdout))
    except StartupError as exc:
        print(f"regproxy: {exc}", file=sys.stderr)
        return 2
