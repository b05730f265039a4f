"""Operability through real ``regproxy`` processes: start-up errors, the start-up line, JSON
logs with the bytes sendfile sent, TLS probes, /metrics on its own listener, and the CLI's
``user list``, ``cache ls`` and ``cache warm``."""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import ssl
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.procs import free_port, regproxy, regproxy_env, run
from tests.proxy.fakeupstream import FakeUpstream

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio]

ServerFactory = Callable[..., Awaitable[TestServer]]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "regproxy", *args]


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def json_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of a log written with log_format = "json" (each must parse)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def push_blob(session: aiohttp.ClientSession, url: str, repo: str, data: bytes) -> str:
    digest = digest_of(data)
    async with session.post(
        f"{url}/v2/{repo}/blobs/uploads/", params={"digest": digest}, data=data
    ) as resp:
        assert resp.status == 201, await resp.text()
    return digest


# -- start-up errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case", ["port in use", "data is a file", "uncreatable", "unwritable", "port in use, json"]
)
async def test_startup_error_is_one_line_and_exit_2(tmp_path: Path, case: str) -> None:
    data = tmp_path / "data"
    port = free_port()
    holder: socket.socket | None = None
    env = regproxy_env()
    if case.startswith("port in use"):
        holder = socket.socket()
        holder.bind(("127.0.0.1", port))
        holder.listen()
    elif case == "data is a file":
        data.write_text("not a directory")
    elif case == "uncreatable":
        (tmp_path / "file").write_text("")
        data = tmp_path / "file" / "data"
    elif case == "unwritable":
        data = Path("/proc/sys")  # a directory nobody can create files in, root included
    try:
        rc, out, err = await run(
            cli("serve", "--listen", f"127.0.0.1:{port}", "--data-dir", str(data)),
            env={**env, "REGPROXY_LOG_FORMAT": "json" if "json" in case else "text"},
            timeout=60,
        )
    finally:
        if holder is not None:
            holder.close()
    assert rc == 2, (out, err)
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    if "json" in case:
        record = json.loads(lines[0])
        assert record["level"] == "error" and record["logger"] == "regproxy"
        assert record["message"] == f"cannot listen on 127.0.0.1:{port}: Address already in use"
        return
    assert lines[0].startswith("regproxy: ")
    expected = {
        "port in use": f"cannot listen on 127.0.0.1:{port}: Address already in use",
        "data is a file": f"data directory {data} is a file, not a directory",
        "uncreatable": f"cannot create data directory {data}",
        "unwritable": f"cannot write to data directory {data}",
    }[case]
    assert expected in lines[0]


# -- logs ------------------------------------------------------------------------------------


async def test_json_logs_startup_line_and_sendfile_bytes(tmp_path: Path) -> None:
    config = 'log_format = "json"\n[upstreams.fake]\nurl = "http://127.0.0.1:9/"\n'
    async with regproxy(tmp_path, config=config) as server, aiohttp.ClientSession() as session:
        blob = bytes(range(256)) * 4096 + b"tail"  # 1 MiB and a bit: served with sendfile
        digest = await push_blob(session, server.url, "team/app", blob)
        async with session.get(f"{server.url}/v2/team/app/blobs/{digest}") as resp:
            assert resp.status == 200
            assert await resp.read() == blob
        async with session.get(
            f"{server.url}/v2/team/app/blobs/{digest}", headers={"Range": "bytes=10-109"}
        ) as resp:
            assert resp.status == 206
            assert len(await resp.read()) == 100
        # A push under an upstream's prefix is DENIED, whatever the (unreachable) upstream.
        async with session.post(f"{server.url}/v2/fake/lib/app/blobs/uploads/") as resp:
            assert resp.status == 403
            assert (await resp.json())["errors"][0]["code"] == "DENIED"
        await server.stop()

    lines = json_lines(server.log_path)
    started = [line for line in lines if "listening on" in line["message"]]
    assert len(started) == 1
    message = started[0]["message"]
    assert f"listening on http://127.0.0.1:{server.port}" in message
    assert "upstreams: fake=http://127.0.0.1:9/" in message
    assert "auth: open" in message
    assert started[0]["level"] == "info" and started[0]["logger"] == "regproxy.server"
    access = [line for line in lines if line["logger"] == "regproxy.access"]
    gets = [a for a in access if a["method"] == "GET" and a["handler"] == "blob"]
    assert [(a["status"], a["bytes"]) for a in gets] == [(200, len(blob)), (206, 100)]
    push = [a for a in access if a["method"] == "POST" and a["status"] == 201]
    assert push and push[0]["bytes"] == 0 and push[0]["handler"] == "blob_upload"
    assert lines.index(started[0]) < lines.index(access[0])  # nothing served before it


async def test_tls_probe_is_one_debug_line(tmp_path: Path) -> None:
    """skopeo and podman try TLS first: no access line, no traceback, one debug line."""
    config = 'log_level = "debug"\nlog_format = "text"\n'
    async with regproxy(tmp_path, config=config) as server:
        _, writer = await asyncio.open_connection("127.0.0.1", server.port)
        context = ssl.create_default_context()
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await writer.start_tls(context, server_hostname="localhost")
        writer.close()
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{server.url}/healthz") as resp:
                assert resp.status == 200
        await server.stop()
    log = server.log_path.read_text()
    probes = [line for line in log.splitlines() if "TLS handshake" in line]
    assert len(probes) == 1, log
    assert " DEBUG " in probes[0] and "plain-HTTP port" in probes[0]
    assert "Traceback" not in log
    assert "BadHttpMethod" not in log and "UNKNOWN" not in log


# -- metrics on a listener of their own ------------------------------------------------------


async def test_metrics_listener(tmp_path: Path) -> None:
    metrics_port = free_port()
    config = f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n'
    async with regproxy(tmp_path, config=config) as server, aiohttp.ClientSession() as session:
        async with session.get(f"{server.url}/metrics") as resp:
            assert resp.status == 404  # not on the public listener
        async with session.get(f"http://127.0.0.1:{metrics_port}/metrics") as resp:
            assert resp.status == 200
            text = await resp.text()
    names = {family.name for family in text_string_to_metric_families(text)}
    assert {"registry_http_requests", "registry_storage_action_seconds"} <= names
    assert f"metrics: http://127.0.0.1:{metrics_port}/metrics" in server.log_path.read_text()


# -- the CLI ---------------------------------------------------------------------------------


async def test_user_list(tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = regproxy_env()
    for name in ("bob", "alice"):
        rc, _, err = await run(
            cli("user", "add", name, "--data-dir", str(data), "--rounds", "4"),
            env=env,
            input=b"secret-password\n",
        )
        assert rc == 0, err
    rc, out, err = await run(cli("user", "list", "--data-dir", str(data)), env=env)
    assert rc == 0, err
    assert [line.split("\t")[0] for line in out.splitlines()] == ["alice", "bob"]
    assert str(data / "htpasswd") in out


async def test_help_texts() -> None:
    env = regproxy_env()
    rc, out, _ = await run(cli("--help"), env=env)
    assert rc == 0
    assert "container registry and pull-through cache" in out
    assert "Command line: argument parsing" not in out  # not the module's docstring
    for command in (["serve"], ["user"], ["cache"], ["cache", "ls"], ["cache", "warm"]):
        rc, out, _ = await run(cli(*command, "--help"), env=env)
        assert rc == 0
        assert f"usage: regproxy {' '.join(command)}" in out


async def test_cache_warm_then_pull_with_the_upstream_down(
    tmp_path: Path, aiohttp_server: ServerFactory
) -> None:
    fake = FakeUpstream()
    fake_server = await aiohttp_server(fake.app())
    fake.base_url = fake_server.make_url("")
    amd64 = fake.add_image("lib/app", None, [b"amd64 layer" * 5000], seed="amd64")
    arm64 = fake.add_image("lib/app", None, [b"arm64 layer" * 7000], seed="arm64")
    index = fake.add_index("lib/app", "v1", [amd64, arm64])
    single = fake.add_image("lib/tool", "2.0", [b"tool" * 3000, b"more" * 100], seed="tool")
    config = f'[upstreams.fake]\nurl = "{fake.base_url}"\n'
    (tmp_path / "config.toml").write_text(config)
    data = tmp_path / "data"
    env = regproxy_env()
    common = ["--config", str(tmp_path / "config.toml"), "--data-dir", str(data)]

    rc, out, err = await run(
        cli("cache", "warm", "fake/lib/app:v1", "fake/lib/tool:2.0", *common), env=env
    )
    assert rc == 0, err
    assert "warmed fake/lib/app:v1: 3 manifest(s), 4 blob(s)" in out
    assert "warmed fake/lib/tool:2.0: 1 manifest(s), 3 blob(s)" in out
    fetched = sum(fake.bytes_sent.values())
    expected = sum(len(b) for image in (amd64, arm64, single) for b in image.blobs.values())
    assert fetched == expected

    rc, out, err = await run(cli("cache", "ls", "--upstream", "fake", *common), env=env)
    assert rc == 0, err
    rows = [line.split() for line in out.splitlines()[1:-1]]
    assert [(row[0], row[1]) for row in rows] == [("fake/lib/app", "v1"), ("fake/lib/tool", "2.0")]
    assert out.splitlines()[0].split()[:4] == ["REPOSITORY", "TAG", "DIGEST", "SIZE"]

    # A name that is no upstream's: one line, exit 2.
    rc, _, err = await run(cli("cache", "warm", "nowhere/app:1", *common), env=env)
    assert rc == 2 and len(err.splitlines()) == 1

    fake.down = True  # every upstream request now fails
    fake.reset_counters()
    async with regproxy(tmp_path / "serve", data_dir=data, config=config) as server:
        async with aiohttp.ClientSession() as session:
            accept = {"Accept": index.media_type}
            async with session.get(
                f"{server.url}/v2/fake/lib/app/manifests/v1", headers=accept
            ) as resp:
                assert resp.status == 200, await resp.text()
                assert await resp.read() == index.manifest
            for image in (amd64, arm64, single):
                repo = "fake/lib/tool" if image is single else "fake/lib/app"
                async with session.get(f"{server.url}/v2/{repo}/manifests/{image.digest}") as resp:
                    assert resp.status == 200
                    assert await resp.read() == image.manifest
                for digest, blob in image.blobs.items():
                    async with session.get(f"{server.url}/v2/{repo}/blobs/{digest}") as resp:
                        assert resp.status == 200
                        assert await resp.read() == blob
    assert fake.total() == 0  # tags within their TTL, digests forever: nothing asked upstream


async def test_readyz_during_drain(tmp_path: Path) -> None:
    """From SIGTERM on /readyz answers 503 (on a connection made before), while an upload
    still in flight finishes."""
    async with regproxy(tmp_path, config="shutdown_timeout = 30.0\n") as server:
        release = asyncio.Event()

        async def body() -> Any:
            yield b"first part "
            await release.wait()
            yield b"and the rest"

        async with (
            aiohttp.ClientSession() as uploads,
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as probe,
        ):
            async with uploads.post(f"{server.url}/v2/team/app/blobs/uploads/") as resp:
                assert resp.status == 202
                location = resp.headers["Location"]
            patch = asyncio.create_task(uploads.patch(f"{server.url}{location}", data=body()))
            async with probe.get(f"{server.url}/readyz") as resp:
                assert resp.status == 200
            await asyncio.sleep(0.5)  # the PATCH is in flight
            server.process.proc.terminate()
            draining = None
            for _ in range(100):
                async with probe.get(f"{server.url}/readyz") as resp:
                    if resp.status == 503:
                        draining = await resp.json()
                        break
                await asyncio.sleep(0.05)
            assert draining == {"status": "draining"}
            release.set()
            done = await patch
            assert done.status == 202
            done.release()
        assert await server.process.proc.wait() == 0
