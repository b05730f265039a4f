#!/usr/bin/env python3
"""Benchmark regproxy against docker-registry (CNCF distribution) side by side.

    python scripts/bench.py [--quick] [--size-mib N] [--runs N] [--no-fsync] [--json]

Starts both servers on free 127.0.0.1 ports, each with its own temporary data directory
(regproxy with its defaults; docker-registry with filesystem storage), runs the same workload
against each, alternating the order run by run, and stops both by PID at the end, also on
Ctrl-C, SIGTERM or an error.

Workload (every blob push is of fresh content, so deduplication never short-circuits):

- blob push, three ways: monolithic (POST, then PUT ?digest= with the whole body), one
  streamed PATCH (chunked transfer encoding, then PUT ?digest=) and chunked (PATCH parts of
  8 MiB with Content-Range, then PUT ?digest=); bodies are sent from memory in 1 MiB pieces;
- blob GET of the big blob, once and with 16 concurrent GETs (aggregate);
- manifest PUT (distinct OCI manifests, by tag), GET and HEAD by tag: ops/s at concurrency 16;
- tag list of a repository with 500 tags: median and p99 latency of sequential requests.

Every row gets a warm-up first. Throughput rows (MiB/s, ops/s) report the best of ``--runs``
timed runs; latency rows report the median and p99 over all requests of one timed series.
``ratio`` is oriented so that > 1.0 means regproxy did better.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import hashlib
import importlib.metadata
import itertools
import json
import math
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urljoin

import aiohttp
from yarl import URL

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tests.e2e.procs import (  # noqa: E402
    DOCKER_REGISTRY_BIN,
    ManagedProcess,
    ProcessError,
    docker_registry,
    free_port,
    start_process,
    tool_env,
    wait_http,
)

MiB = 1 << 20
PIECE = MiB  # request bodies are sent in pieces of this size
PART = 8 * MiB  # chunked push: one PATCH per part
READ_CHUNK = 4 * MiB  # blob GETs are read and discarded in chunks of up to this size
CONCURRENCY = 16
GET_FANOUT = 16
TAGS_IN_REPO = 500

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"

REF = "docker-registry"
RP = "regproxy"


class BenchError(RuntimeError):
    """A server answered something the benchmark did not expect."""


# -- settings and results --------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    size: int  # bytes of each big blob
    runs: int  # timed runs per throughput row
    manifest_ops: int  # requests per manifest row and run
    tag_requests: int  # sequential tag-list requests
    fsync: bool  # regproxy's storage.fsync

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        size_mib = args.size_mib if args.size_mib is not None else (64 if args.quick else 512)
        if size_mib < 1:
            raise SystemExit("--size-mib must be at least 1")
        if args.runs < 1:
            raise SystemExit("--runs must be at least 1")
        return cls(
            size=size_mib * MiB,
            runs=args.runs,
            manifest_ops=500 if args.quick else 2000,
            tag_requests=100 if args.quick else 300,
            fsync=not args.no_fsync,
        )


@dataclass
class Sample:
    """One timed run: the measured value and the CPU seconds each process spent on it."""

    value: float
    server_cpu: float
    client_cpu: float


@dataclass
class Row:
    operation: str
    unit: str
    higher_is_better: bool
    how: str  # "best of N" or "median of N requests" ...
    samples: dict[str, list[Sample]] = field(default_factory=dict)
    summary: dict[str, float] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        ref, rp = self.summary[REF], self.summary[RP]
        if self.higher_is_better:
            return rp / ref if ref else math.inf
        return ref / rp if rp else math.inf

    def summarize_best(self) -> Row:
        pick = max if self.higher_is_better else min
        self.summary = {name: pick(s.value for s in runs) for name, runs in self.samples.items()}
        return self

    def to_json(self) -> dict[str, Any]:
        return {
            "operation": self.operation,
            "unit": self.unit,
            "higher_is_better": self.higher_is_better,
            "how": self.how,
            REF: self.summary[REF],
            RP: self.summary[RP],
            "ratio": self.ratio,
            "runs": {
                name: [
                    {"value": s.value, "server_cpu_s": s.server_cpu, "client_cpu_s": s.client_cpu}
                    for s in runs
                ]
                for name, runs in self.samples.items()
            },
        }


# -- one server under test -------------------------------------------------------------------


@dataclass
class Target:
    name: str
    base: str  # http://127.0.0.1:PORT
    pid: int
    session: aiohttp.ClientSession

    def url(self, location: str) -> URL:
        """A request URL from a path or a ``Location`` header (absolute or relative)."""
        return URL(urljoin(self.base + "/", location), encoded=True)

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process (all its threads) so far."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[11]) + int(fields[12])  # utime, stime
        return ticks / os.sysconf("SC_CLK_TCK")


async def _expect(resp: aiohttp.ClientResponse, *statuses: int) -> None:
    if resp.status not in statuses:
        text = (await resp.text(errors="replace"))[:500]
        raise BenchError(f"{resp.method} {resp.url} -> {resp.status} (wanted {statuses}): {text}")


def _location(resp: aiohttp.ClientResponse) -> str:
    location = resp.headers.get("Location")
    if not location:
        raise BenchError(f"{resp.method} {resp.url} -> {resp.status} without a Location")
    return location


def _with_digest(location: str, digest: str) -> str:
    sep = "&" if "?" in location else "?"
    return f"{location}{sep}digest={quote(digest, safe=':')}"


async def _pieces(data: memoryview, piece: int = PIECE) -> AsyncIterator[memoryview]:
    for offset in range(0, len(data), piece):
        yield data[offset : offset + piece]


async def start_upload(t: Target, repo: str) -> str:
    async with t.session.post(t.url(f"/v2/{repo}/blobs/uploads/")) as resp:
        await _expect(resp, 202)
        return _location(resp)


async def finish_upload(
    t: Target, location: str, digest: str, body: memoryview | None = None
) -> None:
    headers = {"Content-Length": str(len(body) if body is not None else 0)}
    if body is not None:
        headers["Content-Type"] = "application/octet-stream"
    data = _pieces(body) if body is not None else None
    url = t.url(_with_digest(location, digest))
    async with t.session.put(url, data=data, headers=headers) as resp:
        await _expect(resp, 201)
        got = resp.headers.get("Docker-Content-Digest")
        if got is not None and got != digest:
            raise BenchError(f"{t.name}: pushed {digest}, server says {got}")


async def push_monolithic(t: Target, repo: str, data: memoryview, digest: str) -> None:
    """POST, then PUT ?digest= with the whole body (Content-Length)."""
    location = await start_upload(t, repo)
    await finish_upload(t, location, digest, data)


async def push_streamed(t: Target, repo: str, data: memoryview, digest: str) -> None:
    """POST, one PATCH streaming the whole body (chunked transfer encoding), PUT ?digest=."""
    location = await start_upload(t, repo)
    headers = {"Content-Type": "application/octet-stream"}
    async with t.session.patch(t.url(location), data=_pieces(data), headers=headers) as resp:
        await _expect(resp, 202)
        location = _location(resp)
    await finish_upload(t, location, digest)


async def push_chunked(t: Target, repo: str, data: memoryview, digest: str) -> None:
    """POST, PATCH parts of 8 MiB with Content-Range, then PUT ?digest= without a body."""
    location = await start_upload(t, repo)
    for start in range(0, len(data), PART):
        part = data[start : start + PART]
        headers = {
            "Content-Type": "application/octet-stream",
            "Content-Range": f"{start}-{start + len(part) - 1}",
            "Content-Length": str(len(part)),
        }
        async with t.session.patch(t.url(location), data=_pieces(part), headers=headers) as resp:
            await _expect(resp, 202)
            location = _location(resp)
    await finish_upload(t, location, digest)


async def push_small(t: Target, repo: str, content: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(content).hexdigest()
    await push_monolithic(t, repo, memoryview(content), digest)
    return digest


async def get_blob(t: Target, repo: str, digest: str, size: int, *, verify: bool = False) -> None:
    hasher = hashlib.sha256() if verify else None
    received = 0
    async with t.session.get(t.url(f"/v2/{repo}/blobs/{digest}")) as resp:
        await _expect(resp, 200)
        async for chunk in resp.content.iter_chunked(READ_CHUNK):
            received += len(chunk)
            if hasher is not None:
                hasher.update(chunk)
    if received != size:
        raise BenchError(f"{t.name}: GET blob returned {received} of {size} bytes")
    if hasher is not None and "sha256:" + hasher.hexdigest() != digest:
        raise BenchError(f"{t.name}: GET blob returned other bytes than {digest}")


# -- servers ---------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def regproxy_server(
    tmpdir: Path, *, fsync: bool, startup_timeout: float = 30.0
) -> AsyncIterator[tuple[str, ManagedProcess]]:
    """``regproxy serve`` on 127.0.0.1:<free port> with data in ``tmpdir/data``."""
    env = tool_env({"REGPROXY_STORAGE_FSYNC": "true" if fsync else "false"})
    for attempt in range(3):  # another process may take the free port before we bind it
        port = free_port()
        log_path = tmpdir / f"regproxy-{attempt}.log"
        argv = [
            sys.executable, "-m", "regproxy", "serve",
            "--listen", f"127.0.0.1:{port}", "--data-dir", str(tmpdir / "data"),
        ]  # fmt: skip
        process = await start_process(argv, log_path, env=env, cwd=tmpdir)
        url = f"http://127.0.0.1:{port}"
        try:
            await wait_http(f"{url}/v2/", startup_timeout, alive=process.alive)
            break
        except (ProcessError, TimeoutError) as exc:
            await process.stop()
            if attempt == 2 or "address already in use" not in process.log_tail().lower():
                raise ProcessError(f"regproxy failed: {exc}\n{process.log_tail()}") from exc
    try:
        yield url, process
    finally:
        await process.stop()


def _session() -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=64, limit_per_host=64, ttl_dns_cache=None)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=300)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        read_bufsize=READ_CHUNK,
        auto_decompress=False,
        headers={"User-Agent": "regproxy-bench"},
    )


# -- measuring -------------------------------------------------------------------------------


class BlobSource:
    """One big buffer of random bytes; :meth:`fresh` changes a few of them for each push."""

    def __init__(self, size: int) -> None:
        assert size >= 32
        self._buffer = bytearray(os.urandom(size))
        self._counter = itertools.count(1)

    def fresh(self) -> tuple[memoryview, str]:
        stamp = next(self._counter).to_bytes(8, "big") + os.urandom(8)
        self._buffer[:16] = stamp
        self._buffer[-16:] = stamp
        return memoryview(self._buffer), "sha256:" + hashlib.sha256(self._buffer).hexdigest()


async def _timed(t: Target, op: Callable[[], Awaitable[object]]) -> tuple[float, Sample]:
    """Run ``op``: its wall-clock seconds and a Sample (value for the caller to fill in)."""
    server0, client0, start = t.cpu_seconds(), time.process_time(), time.perf_counter()
    await op()
    elapsed = time.perf_counter() - start
    return elapsed, Sample(0.0, t.cpu_seconds() - server0, time.process_time() - client0)


async def _settle() -> None:
    """Flush dirty pages of earlier runs so their writeback does not land in this one."""
    await asyncio.to_thread(os.sync)


async def run_concurrent(n: int, concurrency: int, op: Callable[[int], Awaitable[None]]) -> None:
    counter = itertools.count()

    async def worker() -> None:
        while (i := next(counter)) < n:
            await op(i)

    async with asyncio.TaskGroup() as group:
        for _ in range(concurrency):
            group.create_task(worker())


class Bench:
    def __init__(self, targets: Sequence[Target], settings: Settings, progress: bool) -> None:
        self.targets = list(targets)
        self.s = settings
        self.progress = progress
        self.rows: list[Row] = []
        self.big: dict[str, str] = {}  # target name -> digest of the blob the GET rows read
        self.layer: tuple[str, int] = ("", 0)
        self.config: tuple[str, int] = ("", 0)

    def log(self, message: str) -> None:
        if self.progress:
            print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    def _orders(self) -> list[list[Target]]:
        """Per run, the order in which the targets go: alternating, so neither is always first."""
        return [self.targets if r % 2 == 0 else self.targets[::-1] for r in range(self.s.runs)]

    async def throughput(
        self,
        operation: str,
        unit: str,
        amount: float,
        op: Callable[[Target, int], Awaitable[object]],
        warmup: Callable[[Target], Awaitable[object]],
    ) -> None:
        """Warm up, then time ``op(target, run)`` per run and target; value = amount / seconds."""
        self.log(operation)
        row = Row(operation, unit, True, f"best of {self.s.runs}")
        row.samples = {t.name: [] for t in self.targets}
        for t in self.targets:
            await warmup(t)
        for run, order in enumerate(self._orders()):
            for t in order:
                seconds, sample = await _timed(t, functools.partial(op, t, run))
                sample.value = amount / seconds
                row.samples[t.name].append(sample)
        self.rows.append(row.summarize_best())

    # -- blobs ---------------------------------------------------------------------------------

    async def pushes(self) -> None:
        size, repo = self.s.size, "bench/push"
        source = BlobSource(size)
        warm = BlobSource(min(size, 16 * MiB))
        kinds: list[tuple[str, Callable[[Target, str, memoryview, str], Awaitable[None]]]] = [
            ("monolithic", push_monolithic),
            ("streamed PATCH", push_streamed),
            (f"chunked {PART // MiB} MiB PATCH", push_chunked),
        ]
        for label, push in kinds:
            row = Row(f"push {label} {size // MiB} MiB", "MiB/s", True, f"best of {self.s.runs}")
            self.log(row.operation)
            row.samples = {t.name: [] for t in self.targets}
            for t in self.targets:
                await push(t, repo, *warm.fresh())
            for order in self._orders():
                data, digest = source.fresh()  # new to both targets
                for t in order:
                    await _settle()
                    seconds, sample = await _timed(
                        t, functools.partial(push, t, repo, data, digest)
                    )
                    sample.value = size / MiB / seconds
                    row.samples[t.name].append(sample)
            self.rows.append(row.summarize_best())
        # The blob the GET rows read: pushed to both, then checked once by a full GET.
        data, digest = source.fresh()
        for t in self.targets:
            await push_monolithic(t, "bench/get", data, digest)
            await get_blob(t, "bench/get", digest, size, verify=True)
            self.big[t.name] = digest

    async def gets(self) -> None:
        size = self.s.size

        async def one(t: Target, run: int) -> None:
            await get_blob(t, "bench/get", self.big[t.name], size)

        async def fanout(t: Target, run: int) -> None:
            async with asyncio.TaskGroup() as group:
                for _ in range(GET_FANOUT):
                    group.create_task(get_blob(t, "bench/get", self.big[t.name], size))

        async def warm_one(t: Target) -> None:
            await one(t, -1)

        async def warm_fanout(t: Target) -> None:
            await fanout(t, -1)

        mib = size / MiB
        await self.throughput(f"blob GET {mib:.0f} MiB", "MiB/s", mib, one, warm_one)
        await self.throughput(
            f"blob GET x{GET_FANOUT} concurrent (aggregate)",
            "MiB/s",
            mib * GET_FANOUT,
            fanout,
            warm_fanout,
        )

    # -- manifests -----------------------------------------------------------------------------

    def manifest(self, label: str) -> bytes:
        doc = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": self.config[0], "size": self.config[1]},
            "layers": [{"mediaType": OCI_LAYER, "digest": self.layer[0], "size": self.layer[1]}],
            "annotations": {"org.example.bench": label},
        }
        return json.dumps(doc, separators=(",", ":")).encode()

    async def put_manifest(self, t: Target, repo: str, tag: str, content: bytes) -> None:
        headers = {"Content-Type": OCI_MANIFEST}
        url = t.url(f"/v2/{repo}/manifests/{tag}")
        async with t.session.put(url, data=content, headers=headers) as resp:
            await _expect(resp, 201)

    async def manifests(self) -> None:
        config = json.dumps(
            {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}
        ).encode()
        layer = os.urandom(1024)
        repo, tags_repo = "bench/manifests", "bench/tags"
        for t in self.targets:
            for r in (repo, tags_repo):
                self.config = (await push_small(t, r, config), len(config))
                self.layer = (await push_small(t, r, layer), len(layer))
        n, conc = self.s.manifest_ops, CONCURRENCY

        async def put_series(t: Target, prefix: str, count: int) -> None:
            async def op(i: int) -> None:
                label = f"{prefix}-{i}"
                await self.put_manifest(t, repo, label, self.manifest(label))

            await run_concurrent(count, conc, op)

        async def puts(t: Target, run: int) -> None:
            await put_series(t, f"r{run}", n)

        async def warm_puts(t: Target) -> None:
            await put_series(t, "warm", min(n, 200))

        accept = {"Accept": OCI_MANIFEST}

        async def get_series(t: Target, count: int) -> None:
            async def op(i: int) -> None:
                url = t.url(f"/v2/{repo}/manifests/r0-{i % n}")
                async with t.session.get(url, headers=accept) as resp:
                    await _expect(resp, 200)
                    await resp.read()

            await run_concurrent(count, conc, op)

        async def head_series(t: Target, count: int) -> None:
            async def op(i: int) -> None:
                url = t.url(f"/v2/{repo}/manifests/r0-{i % n}")
                async with t.session.head(url, headers=accept) as resp:
                    await _expect(resp, 200)

            await run_concurrent(count, conc, op)

        async def gets(t: Target, run: int) -> None:
            await get_series(t, n)

        async def heads(t: Target, run: int) -> None:
            await head_series(t, n)

        async def warm_gets(t: Target) -> None:
            await self.check_manifests(t, repo)
            await get_series(t, min(n, 200))

        async def warm_heads(t: Target) -> None:
            await head_series(t, min(n, 200))

        await self.throughput("manifest PUT by tag", "ops/s", n, puts, warm_puts)
        await self.throughput("manifest GET by tag", "ops/s", n, gets, warm_gets)
        await self.throughput("manifest HEAD by tag", "ops/s", n, heads, warm_heads)

    async def check_manifests(self, t: Target, repo: str) -> None:
        """The GET/HEAD rows read what the PUT row wrote: check a few, byte for byte."""
        for i in range(0, self.s.manifest_ops, max(1, self.s.manifest_ops // 20)):
            want = self.manifest(f"r0-{i}")
            url = t.url(f"/v2/{repo}/manifests/r0-{i}")
            async with t.session.get(url, headers={"Accept": OCI_MANIFEST}) as resp:
                await _expect(resp, 200)
                body = await resp.read()
                digest = resp.headers.get("Docker-Content-Digest")
            if body != want or digest != "sha256:" + hashlib.sha256(want).hexdigest():
                raise BenchError(f"{t.name}: manifest r0-{i} came back changed")

    async def tag_list(self) -> None:
        repo = "bench/tags"
        self.log(f"tag list ({TAGS_IN_REPO} tags)")
        for t in self.targets:

            async def op(i: int, t: Target = t) -> None:
                label = f"v{i:04d}"
                await self.put_manifest(t, repo, label, self.manifest(label))

            await run_concurrent(TAGS_IN_REPO, CONCURRENCY, op)

        async def list_once(t: Target) -> float:
            start = time.perf_counter()
            async with t.session.get(t.url(f"/v2/{repo}/tags/list")) as resp:
                await _expect(resp, 200)
                body = await resp.json(content_type=None)
            elapsed = time.perf_counter() - start
            if len(body.get("tags") or []) != TAGS_IN_REPO:
                raise BenchError(f"{t.name}: tag list has {len(body.get('tags') or [])} tags")
            return elapsed

        count = self.s.tag_requests
        latencies: dict[str, list[float]] = {t.name: [] for t in self.targets}
        cpu: dict[str, Sample] = {}
        for t in self.targets:
            for _ in range(20):
                await list_once(t)
        # Interleave the two servers request by request, so drift hits both alike.
        server0 = {t.name: t.cpu_seconds() for t in self.targets}
        for i in range(count):
            for t in self.targets if i % 2 == 0 else self.targets[::-1]:
                latencies[t.name].append(await list_once(t))
        for t in self.targets:
            cpu[t.name] = Sample(0.0, t.cpu_seconds() - server0[t.name], 0.0)
        how = f"of {count} sequential requests"
        for label, pick in (("median", _median), ("p99", _p99)):
            row = Row(f"tag list {TAGS_IN_REPO} tags, {label}", "ms", False, f"{label} {how}")
            row.samples = {
                name: [Sample(pick(values) * 1000, cpu[name].server_cpu, 0.0)]
                for name, values in latencies.items()
            }
            self.rows.append(row.summarize_best())


def _median(values: Sequence[float]) -> float:
    return statistics.median(values)


def _p99(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


# -- context and output ----------------------------------------------------------------------


def _command_output(argv: Sequence[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return (out.stdout or out.stderr).strip()


def _loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def machine_context(settings: Settings, command: str) -> dict[str, Any]:
    cpu_model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    git = ["git", "-C", str(REPO_ROOT)]
    commit = _command_output([*git, "rev-parse", "--short", "HEAD"]) or "?"
    if _command_output([*git, "status", "--porcelain", "src"]):
        commit += ", src/ modified"
    return {
        "command": command,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "cpu": cpu_model,
        "memory_gib": round(mem_gib, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "regproxy": f"{_version('regproxy')} ({commit})",
        "docker_registry": _command_output([DOCKER_REGISTRY_BIN, "--version"]) or "?",
        "blob_mib": settings.size // MiB,
        "runs": settings.runs,
        "manifest_ops": settings.manifest_ops,
        "concurrency": CONCURRENCY,
        "tag_requests": settings.tag_requests,
        "regproxy_fsync": settings.fsync,
        "load_before": _loadavg(),
        "note": "client, regproxy and docker-registry share this machine's cores",
    }


def _fmt(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _spread(samples: Sequence[Sample]) -> str:
    """(max - min) / max of the timed runs, in percent; "-" for a single run."""
    values = [s.value for s in samples]
    if len(values) < 2 or max(values) <= 0:
        return "-"
    return f"{100 * (max(values) - min(values)) / max(values):.0f}%"


def render_table(rows: Sequence[Row], context: dict[str, Any]) -> str:
    lines = [
        f"machine: {context['cores']} cores ({context['usable_cores']} usable), {context['cpu']},"
        f" {context['memory_gib']} GiB RAM, Linux {context['kernel']}",
        f"software: Python {context['python']}, aiohttp {context['aiohttp']},"
        f" regproxy {context['regproxy']}, {context['docker_registry']}",
        f"command: {context['command']}",
        f"settings: blob {context['blob_mib']} MiB, manifest ops {context['manifest_ops']}"
        f" at concurrency {context['concurrency']}, tag list {context['tag_requests']}"
        f" requests, regproxy fsync={'on' if context['regproxy_fsync'] else 'off'}",
        f"load average (1/5/15 min): {context['load_before']} before,"
        f" {context.get('load_after', '?')} after"
        " (other processes on the machine skew the results)",
        "throughput rows: best of the timed runs after a warm-up (run spread = (max-min)/max);"
        " latency rows: median / p99 of one interleaved series",
        "ratio > 1.0 means regproxy is better (throughput rp/ref, latency ref/rp)",
        "",
    ]
    header = (
        "operation", "unit", REF, RP, "ratio",
        "run spread (ref / rp)", "server CPU s/run (ref / rp)",
    )  # fmt: skip
    body = []
    for row in rows:
        spread = " / ".join(_spread(row.samples[name]) for name in (REF, RP))
        cpu = " / ".join(
            f"{statistics.median(s.server_cpu for s in row.samples[name]):.2f}"
            for name in (REF, RP)
        )
        body.append((
            row.operation, row.unit, _fmt(row.summary[REF]), _fmt(row.summary[RP]),
            f"{row.ratio:.2f}", spread, cpu,
        ))  # fmt: skip
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        out = [cells[0].ljust(widths[0]), cells[1].ljust(widths[1])]
        out += [c.rjust(w) for c, w in zip(cells[2:], widths[2:], strict=True)]
        return " | ".join(out)

    lines.append(line(header))
    lines.append("-+-".join("-" * w for w in widths))
    lines += [line(r) for r in body]
    return "\n".join(lines)


# -- main ------------------------------------------------------------------------------------


async def bench(args: argparse.Namespace, command: str) -> tuple[list[Row], dict[str, Any]]:
    settings = Settings.from_args(args)
    context = machine_context(settings, command)
    tmp = Path(tempfile.mkdtemp(prefix="regproxy-bench-"))
    try:
        async with contextlib.AsyncExitStack() as stack:
            ref = await stack.enter_async_context(docker_registry(tmp / "docker-registry"))
            rp_dir = tmp / "regproxy"
            rp_dir.mkdir()
            rp_url, rp_proc = await stack.enter_async_context(
                regproxy_server(rp_dir, fsync=settings.fsync)
            )
            targets = [
                Target(REF, ref.url, ref.pid, await stack.enter_async_context(_session())),
                Target(RP, rp_url, rp_proc.pid, await stack.enter_async_context(_session())),
            ]
            b = Bench(targets, settings, progress=not args.quiet)
            b.log(f"{REF} pid {ref.pid} at {ref.url}; {RP} pid {rp_proc.pid} at {rp_url}")
            try:
                await b.pushes()
                await b.gets()
                await b.manifests()
                await b.tag_list()
            finally:
                if args.keep:
                    b.log(f"logs and data kept in {tmp}")
            context["load_after"] = _loadavg()
            return b.rows, context
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Benchmark regproxy against docker-registry, side by side."
    )
    parser.add_argument("--quick", action="store_true", help="64 MiB blobs, fewer requests")
    parser.add_argument("--size-mib", type=int, help="size of the pushed blobs (default 512)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per row (default 3)")
    parser.add_argument(
        "--no-fsync", action="store_true", help="run regproxy with storage.fsync off"
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the data dirs and logs")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = shlex.join(["python", "scripts/bench.py", *(sys.argv[1:] if argv is None else argv)])

    async def run() -> tuple[list[Row], dict[str, Any]]:
        task = asyncio.current_task()
        assert task is not None
        # SIGTERM unwinds like Ctrl-C: the servers are stopped in the finally blocks.
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await bench(args, command)

    try:
        rows, context = asyncio.run(run())
    except KeyboardInterrupt:
        print("interrupted; both servers were stopped", file=sys.stderr)
        return 130
    except asyncio.CancelledError:
        print("terminated; both servers were stopped", file=sys.stderr)
        return 143
    if args.json:
        result = {"context": context, "rows": [row.to_json() for row in rows]}
        print(json.dumps(result, indent=2))
    else:
        print(render_table(rows, context))
    return 0


if __name__ == "__main__":
    sys.exit(main())
