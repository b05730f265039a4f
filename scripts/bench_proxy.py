#!/usr/bin/env python3
"""Pull-through benchmark: regproxy against docker-registry's proxy mode, side by side.

Both caches front the same upstream (a docker-registry holding a three-layer image) through a
byte-counting TCP relay, so the table can say how many bytes each cache pulled from upstream
per image served. Scenarios: one cold pull (fresh cache), warm pulls (cache filled), and 8
concurrent cold pulls. A pull is what a client does: GET the manifest by tag, then GET the
config and the layers (3 at a time), verifying every digest.

    python scripts/bench_proxy.py [--quick] [--json]

Everything listens on 127.0.0.1 and every process started here is stopped by its PID.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.e2e.images import OciImage, make_oci_layout  # noqa: E402
from tests.e2e.procs import (  # noqa: E402
    docker_registry,
    free_port,
    skopeo,
    start_process,
    wait_http,
)

ACCEPT = ", ".join(
    (
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    )
)


class Relay:
    """A TCP relay to the upstream that counts the bytes the upstream sends."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.downstream_bytes = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in self._writers:
                writer.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, count: bool) -> None:
            try:
                while data := await src.read(1 << 20):
                    if count:
                        self.downstream_bytes += len(data)
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                with contextlib.suppress(Exception):
                    dst.close()

        await asyncio.gather(pipe(reader, up_writer, False), pipe(up_reader, writer, True))


@dataclass
class Pull:
    seconds: float
    nbytes: int


async def pull(session: aiohttp.ClientSession, base: str, repo: str, tag: str) -> Pull:
    start = time.perf_counter()
    async with session.get(f"{base}/v2/{repo}/manifests/{tag}", headers={"Accept": ACCEPT}) as r:
        r.raise_for_status()
        manifest = json.loads(await r.read())
    descriptors = [manifest["config"], *manifest["layers"]]
    limit = asyncio.Semaphore(3)

    async def fetch(descriptor: dict[str, object]) -> int:
        async with limit, session.get(f"{base}/v2/{repo}/blobs/{descriptor['digest']}") as r:
            r.raise_for_status()
            hasher = hashlib.sha256()
            size = 0
            async for chunk in r.content.iter_chunked(1 << 20):
                await asyncio.to_thread(hasher.update, chunk)  # off the loop, like a client
                size += len(chunk)
        if f"sha256:{hasher.hexdigest()}" != descriptor["digest"]:
            raise RuntimeError(f"digest mismatch for {descriptor['digest']}")
        return size

    sizes = await asyncio.gather(*(fetch(d) for d in descriptors))
    return Pull(time.perf_counter() - start, sum(sizes))


@contextlib.asynccontextmanager
async def regproxy_cache(tmp: Path, upstream_url: str) -> AsyncIterator[tuple[str, str]]:
    port = free_port()
    config = tmp / "regproxy.toml"
    config.write_text(f'[upstreams."up"]\nurl = "{upstream_url}"\n')
    env = dict(os.environ, REGPROXY_LOG_LEVEL="warning")
    process = await start_process(
        [
            sys.executable,
            "-m",
            "regproxy",
            "serve",
            "--config",
            str(config),
            "--listen",
            f"127.0.0.1:{port}",
            "--data-dir",
            str(tmp / "data"),
        ],
        tmp / "regproxy.log",
        env=env,
    )
    try:
        await wait_http(f"http://127.0.0.1:{port}/healthz", alive=process.alive)
        yield f"http://127.0.0.1:{port}", "up/"
    finally:
        await process.stop()


@contextlib.asynccontextmanager
async def distribution_cache(tmp: Path, upstream_url: str) -> AsyncIterator[tuple[str, str]]:
    async with docker_registry(tmp, proxy_remote_url=upstream_url) as registry:
        yield registry.url, ""


Cache = Callable[[Path, str], contextlib.AbstractAsyncContextManager[tuple[str, str]]]


async def scenario(
    cache: Cache, relay: Relay, image_size: int, clients: int, warm_pulls: int
) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="bench-proxy-") as tmp:
        async with cache(Path(tmp), f"http://127.0.0.1:{relay.port}") as (base, prefix):
            repo = f"{prefix}library/bench"
            connector = aiohttp.TCPConnector(limit=64)
            async with aiohttp.ClientSession(connector=connector) as session:
                relay.downstream_bytes = 0
                started = time.perf_counter()
                pulls = await asyncio.gather(
                    *(pull(session, base, repo, "v1") for _ in range(clients))
                )
                cold = time.perf_counter() - started
                upstream = relay.downstream_bytes
                if any(p.nbytes != image_size for p in pulls):
                    raise RuntimeError("a pull returned the wrong number of bytes")
                warm = []
                for _ in range(warm_pulls):
                    warm.append((await pull(session, base, repo, "v1")).seconds)
    result = {"cold_seconds": cold, "upstream_ratio": upstream / image_size}
    if warm:
        result["warm_mib_s"] = image_size / (1 << 20) / statistics.median(warm)
    return result


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller image, fewer rounds")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    mib = 1 << 20
    layers = [4 * mib, 16 * mib, 32 * mib] if args.quick else [8 * mib, 32 * mib, 96 * mib]
    rounds = 1 if args.quick else 3

    with tempfile.TemporaryDirectory(prefix="bench-upstream-") as tmp:
        image: OciImage = make_oci_layout(Path(tmp) / "layout", layers, seed="bench")
        image_size = sum(blob.size for blob in image.blobs)
        async with docker_registry(Path(tmp) / "upstream") as upstream:
            rc, _, err = await skopeo(
                "copy",
                "--dest-tls-verify=false",
                image.ref(),
                f"docker://{upstream.host}/library/bench:v1",
            )
            if rc != 0:
                raise RuntimeError(f"skopeo push failed: {err}")
            relay = Relay(upstream.port)
            await relay.start()
            try:
                results: dict[str, dict[str, dict[str, float]]] = {}
                caches: dict[str, Cache] = {
                    "docker-registry": distribution_cache,
                    "regproxy": regproxy_cache,
                }
                for name, cache in caches.items():
                    best: dict[str, dict[str, float]] = {}
                    for _ in range(rounds):
                        one = await scenario(cache, relay, image_size, 1, 15)
                        eight = await scenario(cache, relay, image_size, 8, 0)
                        for key, value in (("cold", one), ("cold8", eight)):
                            if key not in best or value["cold_seconds"] < best[key]["cold_seconds"]:
                                best[key] = value
                    results[name] = best
            finally:
                await relay.stop()

    if args.json:
        print(json.dumps({"image_bytes": image_size, "results": results}, indent=2))
        return
    ref, ours = results["docker-registry"], results["regproxy"]
    print(
        f"image: {len(layers)} layers + config, {image_size / mib:.1f} MiB; cold: best of"
        f" {rounds} fresh caches; warm: median of 15 pulls"
    )
    print(f"{'scenario':<34}{'docker-registry':>17}{'regproxy':>12}{'ratio':>8}")
    rows = [
        ("cold pull, s", ref["cold"]["cold_seconds"], ours["cold"]["cold_seconds"], True),
        ("warm pull, MiB/s", ref["cold"]["warm_mib_s"], ours["cold"]["warm_mib_s"], False),
        (
            "8 concurrent cold pulls, s",
            ref["cold8"]["cold_seconds"],
            ours["cold8"]["cold_seconds"],
            True,
        ),
        (
            "upstream bytes / image, 1 cold",
            ref["cold"]["upstream_ratio"],
            ours["cold"]["upstream_ratio"],
            True,
        ),
        (
            "upstream bytes / image, 8 cold",
            ref["cold8"]["upstream_ratio"],
            ours["cold8"]["upstream_ratio"],
            True,
        ),
    ]
    for label, a, b, lower_is_better in rows:
        ratio = a / b if lower_is_better else b / a
        print(f"{label:<34}{a:>17.2f}{b:>12.2f}{ratio:>8.2f}")
    print("ratio > 1.0: regproxy better. Upstream bytes include HTTP headers of the requests.")
    print(
        f"command: python scripts/bench_proxy.py{' --quick' if args.quick else ''}"
        f" (cores: {os.cpu_count()})"
    )


if __name__ == "__main__":
    asyncio.run(main())
