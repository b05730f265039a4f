"""``regproxy serve --workers N``: N processes on one port under a supervising parent.

Both workers take connections; a push through one and a pull through any work (SQLite and the
filesystem shared on one machine, and PostgreSQL with S3); SIGTERM to the parent drains an
upload in flight and the parent exits 0; a worker that dies is replaced; a worker that cannot
start stops the parent with its exit code."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import signal
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import psutil
import pytest

from tests.e2e.images import make_oci_layout
from tests.e2e.procs import (
    SKOPEO_BIN,
    RegproxyProcess,
    free_port,
    regproxy,
    regproxy_argv,
    regproxy_env,
    run,
    start_process,
    wait_http,
)
from tests.e2e.test_postgres_e2e import postgres_toml
from tests.e2e.test_proxy_skopeo import pull, push
from tests.pgfixtures import PostgresServer, postgres_dsn, postgres_server  # noqa: F401
from tests.s3fixtures import S3, s3, shared_moto  # noqa: F401

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio]

KiB = 1 << 10
MiB = 1 << 20
WORKERS = {"REGPROXY_WORKERS": "2"}
# The pid that each log line of a worker carries: "<time> [<pid>] LEVEL name message" in text,
# a "pid" field in JSON (the e2e servers' default).
ACCESS_PID_RE = re.compile(r"^\S+ \[(\d+)\] INFO regproxy\.access ", re.MULTILINE)


def listening_workers(parent: int, port: int) -> set[int]:
    """The parent's child processes that listen on ``port``."""
    found = set()
    for child in psutil.Process(parent).children():
        try:
            connections = child.net_connections(kind="tcp")
        except psutil.NoSuchProcess:
            continue
        if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in connections):
            found.add(child.pid)
    return found


async def wait_workers(
    parent: int, port: int, alive: Callable[[], bool], old: frozenset[int] = frozenset()
) -> set[int]:
    """Wait until two workers, none of them in ``old``, listen; their pids."""
    async with asyncio.timeout(60):
        while True:
            pids = listening_workers(parent, port)
            if len(pids) == 2 and not pids & old:
                return pids
            assert alive(), "regproxy exited"
            await asyncio.sleep(0.1)


async def fresh_connection_gets(url: str, count: int) -> None:
    """``count`` GETs, each on a new connection (SO_REUSEPORT spreads connections)."""
    for _ in range(count):
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            async with session.get(url) as resp:
                assert resp.status == 200, await resp.text()


def log_messages(server: RegproxyProcess) -> list[str]:
    """The message of each line of the log (JSON lines, or text)."""
    lines = server.log_path.read_text().splitlines()
    return [json.loads(line)["message"] if line.startswith("{") else line for line in lines]


def access_pids(server: RegproxyProcess) -> set[int]:
    text = server.log_path.read_text()
    pids = {int(pid) for pid in ACCESS_PID_RE.findall(text)}
    for line in text.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("logger") == "regproxy.access":
                pids.add(int(record["pid"]))
    return pids


async def test_two_workers_share_the_port(tmp_path: Path) -> None:
    if shutil.which(SKOPEO_BIN) is None:
        pytest.fail("skopeo missing: apt-get install -y skopeo")
    image = make_oci_layout(tmp_path / "src", [3 * MiB, 5000], tag="v1", seed="workers")
    async with regproxy(tmp_path / "serve", env=WORKERS) as server:
        workers = await wait_workers(server.pid, server.port, server.alive)
        assert server.pid not in workers
        await fresh_connection_gets(f"{server.url}/v2/", 100)
        # Every request was answered by one of the two workers, and both took some.
        assert access_pids(server) == workers
        # A push goes through whichever workers get its connections; so does the pull.
        await push(image, f"docker://{server.host}/w/app:v1")
        for n in range(3):
            await pull(f"docker://{server.host}/w/app:v1", image, tmp_path / f"back-{n}")
        log = "\n".join(log_messages(server))
        assert 'share metadata.backend = "sqlite" and storage.backend = "filesystem"' in log
        rc = await server.stop()
        assert rc == 0, server.log_tail()
    assert all(gone(pid) for pid in workers)


async def test_workers_on_postgres_and_s3(
    tmp_path: Path,
    s3: S3,  # noqa: F811
    postgres_dsn: str,  # noqa: F811
) -> None:
    if shutil.which(SKOPEO_BIN) is None:
        pytest.fail("skopeo missing: apt-get install -y skopeo")
    image = make_oci_layout(
        tmp_path / "src", [6 * MiB, 1000], platforms=[("linux", "amd64"), ("linux", "arm64")]
    )
    config = postgres_toml(postgres_dsn) + s3.toml()
    async with regproxy(tmp_path / "serve", env=WORKERS, config=config) as server:
        await wait_workers(server.pid, server.port, server.alive)
        await push(image, f"docker://{server.host}/w/app:latest")
        await pull(f"docker://{server.host}/w/app:latest", image, tmp_path / "back")
        assert "share" not in server.log_path.read_text()  # nothing is local to this machine
        assert await server.stop() == 0, server.log_tail()


async def test_sigterm_drains_an_upload_in_flight(tmp_path: Path) -> None:
    """SIGTERM to the parent: every worker stops listening and finishes what it serves, an
    upload whose body is still arriving included; then the parent exits 0."""
    pieces = [os.urandom(64 * KiB) for _ in range(20)]
    body = b"".join(pieces)
    body_started = asyncio.Event()

    async def slow_body() -> AsyncIterator[bytes]:
        for piece in pieces:  # about two seconds
            yield piece
            body_started.set()
            await asyncio.sleep(0.1)

    port = free_port()
    argv = [*regproxy_argv(port, tmp_path / "data"), "--workers", "2"]
    env = regproxy_env({"REGPROXY_SHUTDOWN_TIMEOUT": "15"})
    process = await start_process(argv, tmp_path / "serve.log", env=env, cwd=tmp_path)
    try:
        url = f"http://127.0.0.1:{port}"
        assert await wait_http(f"{url}/healthz", 60, alive=process.alive) == 200
        workers = await wait_workers(process.pid, port, process.alive)
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{url}/v2/w/drain/blobs/uploads/") as resp:
                assert resp.status == 202, await resp.text()
                location = resp.headers["Location"]
            digest = "sha256:" + hashlib.sha256(body).hexdigest()

            async def put() -> tuple[int, str]:
                async with session.put(
                    f"{url}{location}",
                    params={"digest": digest},
                    data=slow_body(),
                    headers={"Content-Length": str(len(body))},
                ) as resp:
                    return resp.status, resp.headers.get("Docker-Content-Digest", "")

            in_flight = asyncio.create_task(put())
            await asyncio.wait_for(body_started.wait(), 10)
            await asyncio.sleep(0.3)
            os.kill(process.pid, signal.SIGTERM)
            assert await asyncio.wait_for(in_flight, 30) == (201, digest)
            rc = await asyncio.wait_for(process.proc.wait(), 30)
        assert rc == 0, process.log_tail()
        assert all(gone(pid) for pid in workers)
        assert "stopping: draining 2 worker(s)" in process.log_tail(100)
    finally:
        await process.stop()
    # The drained upload was committed: the blob is there after a restart.
    async with regproxy(tmp_path / "again", data_dir=tmp_path / "data") as server:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{server.url}/v2/w/drain/blobs/{digest}") as resp,
        ):
            assert resp.status == 200
            assert await resp.read() == body


async def test_a_dead_worker_is_replaced(tmp_path: Path) -> None:
    async with regproxy(tmp_path / "serve", env=WORKERS) as server:
        workers = await wait_workers(server.pid, server.port, server.alive)
        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        replaced = await wait_workers(
            server.pid, server.port, server.alive, old=frozenset({victim})
        )
        assert len(replaced & workers) == 1  # the other one kept running
        await fresh_connection_gets(f"{server.url}/v2/", 40)
        log = server.log_path.read_text()
        assert f"(pid {victim}) exited unexpectedly (signal SIGKILL)" in log
        assert await server.stop() == 0, server.log_tail()


async def test_a_worker_that_cannot_start_stops_the_parent(tmp_path: Path) -> None:
    """Another program holds the port (without SO_REUSEPORT): no worker can bind it, the
    parent reports that and exits 2, as a single process would."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        argv = [*regproxy_argv(port, tmp_path / "data"), "--workers", "2"]
        rc, out, err = await run(argv, env=regproxy_env(), timeout=90)
    assert rc == 2, (rc, out, err)
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in err
    assert re.search(r"worker \d \(pid \d+\) failed to start: exit code 2", err), err
    assert "Traceback" not in err


async def test_missing_bucket_stops_the_parent(tmp_path: Path, s3: S3) -> None:  # noqa: F811
    """The parent checks the blob store before it starts any worker: one message, exit 2."""
    config_path = tmp_path / "config.toml"
    config_path.write_text(s3.toml(bucket="no-such-bucket"))
    argv = [*regproxy_argv(free_port(), tmp_path / "data", config_path), "--workers", "2"]
    rc, out, err = await run(argv, env=regproxy_env(), timeout=90)
    assert rc == 2, (rc, out, err)
    lines = [line for line in err.splitlines() if "configuration error" in line]
    assert len(lines) == 1 and "config key storage.s3.bucket" in lines[0], err
    assert "worker" not in err and "Traceback" not in err


async def test_unreachable_database_stops_the_parent(tmp_path: Path) -> None:
    """The parent checks the metadata store before it starts any worker."""
    dsn = f"postgresql://regproxy@127.0.0.1:{free_port()}/regproxy"
    config_path = tmp_path / "config.toml"
    config_path.write_text(postgres_toml(dsn))
    argv = [*regproxy_argv(free_port(), tmp_path / "data", config_path), "--workers", "3"]
    rc, _, err = await run(argv, env=regproxy_env(), timeout=60)
    assert rc == 2, err
    lines = [line for line in err.splitlines() if "configuration error" in line]
    assert len(lines) == 1 and "config key metadata.dsn: cannot use" in lines[0], err
    assert "worker" not in err  # none was started


async def test_bad_workers_value(tmp_path: Path) -> None:
    argv = [*regproxy_argv(free_port(), tmp_path / "data"), "--workers", "0"]
    rc, _, err = await run(argv, env=regproxy_env(), timeout=60)
    assert rc == 2 and "config key workers: 1 to 64, got 0" in err, err


async def test_workers_go_when_the_parent_is_killed(tmp_path: Path) -> None:
    """SIGKILL to the parent leaves no orphans: each worker gets SIGTERM and drains."""
    async with regproxy(tmp_path / "serve", env=WORKERS) as server:
        workers = await wait_workers(server.pid, server.port, server.alive)
        await server.kill()
        async with asyncio.timeout(30):
            while True:
                if all(gone(pid) for pid in workers):
                    break
                await asyncio.sleep(0.1)


def gone(pid: int) -> bool:
    """Exited: no such process, or a zombie nobody reaped yet (orphans go to pid 1)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
