"""Replicas behind a load balancer: three ``regproxy serve`` processes sharing PostgreSQL and
one S3 (moto) bucket, with a counting upstream (the scripted fake, served from this test on
127.0.0.1), and ``--workers 2`` on one machine.

- concurrent cold pulls spread over the replicas: the upstream serves each blob once, every
  client gets exact bytes (followers on other replicas stream from the owner's endpoint);
- the owner SIGKILLed in the middle of a fill: each client gets the right bytes or a cut
  connection, never a clean short body, and a retry succeeds;
- a token issued by one replica is accepted by another (one key file); a chunked upload
  moves across three replicas;
- the same single-flight across two workers (same machine: the owner's spool file).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import aiosqlite
import asyncpg
import pytest
import yarl
from aiohttp import web

from regproxy.auth.tokens import load_or_create_key
from regproxy.cluster.peer import signed_headers
from tests.e2e.images import make_oci_layout
from tests.e2e.procs import (
    SKOPEO_BIN,
    ManagedProcess,
    ProcessError,
    bcrypt_hash,
    free_port,
    regproxy,
    regproxy_argv,
    regproxy_env,
    start_process,
    wait_http,
)
from tests.e2e.test_postgres_e2e import postgres_toml
from tests.e2e.test_proxy_skopeo import pull as skopeo_pull
from tests.e2e.test_proxy_skopeo import push as skopeo_push
from tests.e2e.test_workers import wait_workers
from tests.pgfixtures import (  # noqa: F401
    PostgresServer,
    own_postgres,
    postgres_dsn,
    postgres_server,
)
from tests.proxy.fakeupstream import FakeImage, FakeUpstream
from tests.s3fixtures import S3, s3, shared_moto  # noqa: F401

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio]

KiB = 1 << 10
MiB = 1 << 20
SECRET = "c1u5ter-secret-" + "0f" * 16
CLIENTS = 24
# The fake sends this much of each slowed blob, then waits for ``release``.
HOLD_AT = 256 * KiB


@dataclass
class Replica:
    name: str
    port: int
    process: ManagedProcess

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.process.log_path.read_text(errors="replace")


@contextlib.asynccontextmanager
async def served(fake: FakeUpstream) -> AsyncIterator[str]:
    runner = web.AppRunner(fake.app())
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        fake.release.set()
        await runner.cleanup()


def replica_toml(upstream: str, *, lease_ttl: float = 60.0, extra: str = "") -> str:
    return (
        f'[upstreams.up]\nurl = "{upstream}"\ntimeout = 30\n\n'
        f'[cluster]\nsecret = "{SECRET}"\nlease_ttl = {lease_ttl}\n' + extra
    )


@contextlib.asynccontextmanager
async def replicas(
    tmp_path: Path, count: int, config: str, *, env: dict[str, str] | None = None
) -> AsyncIterator[list[Replica]]:
    """``count`` replicas, each with its own data directory, port, ``cluster.node`` and
    ``cluster.advertise_url``, sharing everything in ``config``; started side by side."""
    started: list[Replica] = []
    try:
        names = "abcdefgh"[:count]
        results = await asyncio.gather(
            *(_start_replica(tmp_path, name, config, env, started) for name in names),
            return_exceptions=True,  # the others are stopped too, once they have started
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        yield sorted(started, key=lambda replica: replica.name)
    finally:
        for replica in started:
            await replica.process.stop(15)


async def _start_replica(
    tmp_path: Path,
    name: str,
    config: str,
    env: dict[str, str] | None,
    started: list[Replica],
) -> None:
    """Start replica ``name`` and add it to ``started`` once ``/healthz`` answers 200.

    The port is free when chosen but may be taken before the replica binds it (another test's
    server binding port 0 meanwhile): then another server answers, or the replica cannot
    listen, and it starts again on another port."""
    base = tmp_path / f"replica-{name}"
    base.mkdir(parents=True)
    (base / "config.toml").write_text(config)
    for attempt in range(3):
        port = free_port()
        settings = {
            "REGPROXY_CLUSTER_NODE": f"node-{name}",
            "REGPROXY_CLUSTER_ADVERTISE_URL": f"http://127.0.0.1:{port}",
            **(env or {}),
        }
        process = await start_process(
            regproxy_argv(port, base / "data", base / "config.toml"),
            base / f"regproxy-{attempt}.log" if attempt else base / "regproxy.log",
            env=regproxy_env(settings),
            cwd=base,
        )
        replica = Replica(name, port, process)
        status: int | None = None
        try:
            status = await wait_http(f"{replica.url}/healthz", 60, alive=process.alive)
        except ProcessError:
            pass
        if status == 200:
            started.append(replica)
            return
        await process.stop(15)
        taken = status is not None or "address already in use" in process.log_tail().lower()
        if attempt == 2 or not taken:
            raise ProcessError(f"replica {name}: /healthz {status}\n{process.log_tail()}")


def three_layer_image(fake: FakeUpstream, seed: str, tag: str = "v1") -> FakeImage:
    layers = [
        os.urandom(3 * MiB + 17),
        os.urandom(1 * MiB + 5),
        os.urandom(700 * KiB + 3),
    ]
    return fake.add_image("team/app", tag, layers, seed=seed)


def blob_gets(fake: FakeUpstream, digest: str) -> int:
    """Blob GETs the fake received, answered in full or not (a killed fill's included)."""
    path = f"/v2/team/app/blobs/{digest}"
    return sum(1 for seen in fake.seen if seen.method == "GET" and seen.path == path)


def layers_of(image: FakeImage) -> list[str]:
    return [d for d, data in image.blobs.items() if len(data) > 100 * KiB]


@dataclass
class Outcome:
    complete: dict[str, bytes]  # digest -> bytes read to the end of a clean response
    cut: set[str]  # digests whose transfer broke off


async def pull(
    session: aiohttp.ClientSession,
    base: str,
    image: FakeImage,
    headers_seen: Callable[[], None] | None = None,
) -> Outcome:
    """One client's pull: the manifest by tag, then every blob, concurrently."""
    outcome = Outcome({}, set())
    accept = {"Accept": image.media_type}
    manifest = f"{base}/v2/up/{image.repo}/manifests/{image.tag}"
    async with session.get(manifest, headers=accept) as resp:
        assert resp.status == 200, await resp.text()
        assert await resp.read() == image.manifest

    async def blob(digest: str) -> None:
        try:
            async with session.get(f"{base}/v2/up/{image.repo}/blobs/{digest}") as resp:
                assert resp.status == 200, await resp.text()
                if headers_seen is not None:
                    headers_seen()
                outcome.complete[digest] = await resp.read()
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError):
            outcome.cut.add(digest)

    await asyncio.gather(*(blob(d) for d in image.blobs))
    return outcome


class Arrivals:
    """Counts the blob responses whose headers arrived; ``reached`` fires at ``target``."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.count = 0
        self.reached = asyncio.Event()

    def __call__(self) -> None:
        self.count += 1
        if self.count >= self.target:
            self.reached.set()

    async def wait(self) -> None:
        async with asyncio.timeout(60):
            await self.reached.wait()


async def fill_owner(dsn: str, digest: str) -> str:
    conn = await asyncpg.connect(dsn)
    try:
        url = await conn.fetchval("SELECT url FROM leases WHERE key = $1", f"blob:{digest}")
    finally:
        await conn.close()
    return str(url)


def new_session() -> aiohttp.ClientSession:
    # A connection per request, as clients behind a load balancer would spread.
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, force_close=True),
        timeout=aiohttp.ClientTimeout(total=120),
    )


async def test_cold_pulls_across_three_replicas_fetch_each_blob_once(
    tmp_path: Path,
    s3: S3,  # noqa: F811
    postgres_dsn: str,  # noqa: F811
) -> None:
    fake = FakeUpstream()
    image = three_layer_image(fake, "cluster-once")
    # Each layer stops after HOLD_AT bytes until every client has its response headers: all
    # of them follow a fill in flight, most from another replica.
    fake.slow = set(layers_of(image))
    fake.slow_first = HOLD_AT
    headers_seen = Arrivals(CLIENTS * len(image.blobs))

    async with served(fake) as upstream:
        config = replica_toml(upstream) + postgres_toml(postgres_dsn) + s3.toml()
        async with replicas(tmp_path, 3, config) as nodes, new_session() as session:
            pulls = [
                asyncio.create_task(pull(session, nodes[n % 3].url, image, headers_seen))
                for n in range(CLIENTS)
            ]
            await headers_seen.wait()
            fake.release.set()
            outcomes = await asyncio.gather(*pulls)
            for outcome in outcomes:
                assert not outcome.cut
                assert outcome.complete == image.blobs  # byte-exact, every blob
            for digest in image.blobs:
                assert blob_gets(fake, digest) == 1, digest
            logs = "".join(node.log() for node in nodes)
            # Followers on other replicas read the owners' fills through their endpoints.
            assert "/_regproxy/cluster/fills/sha256:" in logs
            # Once cached, a pull from any replica comes from storage.
            fake.reset_counters()
            again = await pull(session, nodes[1].url, image)
            assert again.complete == image.blobs
            assert sum(blob_gets(fake, d) for d in image.blobs) == 0


async def test_owner_killed_mid_fill(
    tmp_path: Path,
    s3: S3,  # noqa: F811
    postgres_dsn: str,  # noqa: F811
) -> None:
    fake = FakeUpstream()
    layer = os.urandom(4 * MiB + 11)
    image = fake.add_image("team/app", "v1", [layer], seed="cluster-kill")
    digest = layers_of(image)[0]
    fake.slow = {digest}
    fake.slow_first = HOLD_AT
    headers_seen = Arrivals(9 * len(image.blobs))

    async with served(fake) as upstream:
        config = replica_toml(upstream, lease_ttl=5) + postgres_toml(postgres_dsn) + s3.toml()
        async with replicas(tmp_path, 3, config) as nodes, new_session() as session:
            pulls = [
                asyncio.create_task(pull(session, nodes[n % 3].url, image, headers_seen))
                for n in range(9)
            ]
            await headers_seen.wait()
            owner_url = await fill_owner(postgres_dsn, digest)
            (owner,) = [node for node in nodes if node.url == owner_url]
            owner.process.proc.kill()
            await owner.process.proc.wait()
            fake.release.set()
            outcomes = await asyncio.gather(*pulls)
            survivors = [node for node in nodes if node is not owner]
            for outcome in outcomes:
                for got, data in outcome.complete.items():
                    assert data == image.blobs[got]  # a clean end means every byte
                assert set(outcome.complete) | outcome.cut == set(image.blobs)
            # The clients of the survivors got the blob: one of them took the fill over.
            for n, outcome in enumerate(outcomes):
                if nodes[n % 3] is not owner:
                    assert digest in outcome.complete, (n, outcome.cut)
            for node in survivors:
                retry = await pull(session, node.url, image)
                assert retry.complete == image.blobs and not retry.cut
            fetches = blob_gets(fake, digest)
            assert 1 < fetches <= 3  # the killed fill, then the takeover (at most one each)
            assert "taking over" in "".join(node.log() for node in survivors)


async def test_fill_endpoint_needs_the_secret(
    tmp_path: Path,
    s3: S3,  # noqa: F811
    postgres_dsn: str,  # noqa: F811
) -> None:
    fake = FakeUpstream()
    image = fake.add_image("team/app", "v1", [os.urandom(300 * KiB)], seed="cluster-secret")
    async with served(fake) as upstream:
        config = replica_toml(upstream) + postgres_toml(postgres_dsn) + s3.toml()
        async with replicas(tmp_path, 1, config) as (node,), new_session() as session:
            assert (await pull(session, node.url, image)).complete == image.blobs
            digest = layers_of(image)[0]
            path = f"/_regproxy/cluster/fills/{digest}?offset=0"
            good = signed_headers(SECRET, "GET", path)
            async with session.get(node.url + path, headers=good) as resp:
                assert resp.status == 200
                assert await resp.read() == image.blobs[digest]
            wrong = signed_headers("x" * 40, "GET", path)
            other_path = signed_headers(SECRET, "GET", path.replace("offset=0", "offset=1"))
            stale = {**good, "X-Regproxy-Cluster-Time": "1000.000"}
            for headers in ({}, wrong, other_path, stale):
                async with session.get(node.url + path, headers=headers) as resp:
                    assert resp.status == 404
                    body = await resp.json()
                    assert body["errors"][0]["code"] == "NOT_FOUND"
    # Without a secret, there is no such endpoint at all.
    async with served(fake) as upstream:
        config = f'[upstreams.up]\nurl = "{upstream}"\n'
        async with regproxy(tmp_path / "plain", config=config) as server, new_session() as s:
            async with s.get(server.url + path, headers=good) as resp:
                assert resp.status == 404


async def test_two_workers_fetch_each_blob_once(tmp_path: Path) -> None:
    fake = FakeUpstream()
    image = three_layer_image(fake, "workers-once")
    fake.slow = set(layers_of(image))
    fake.slow_first = HOLD_AT
    headers_seen = Arrivals(CLIENTS * len(image.blobs))

    async with served(fake) as upstream:
        config = f'[upstreams.up]\nurl = "{upstream}"\n'
        env = {"REGPROXY_WORKERS": "2"}
        async with regproxy(tmp_path / "serve", env=env, config=config) as server:
            await wait_workers(server.pid, server.port, server.alive)
            async with new_session() as session:
                pulls = [
                    asyncio.create_task(pull(session, server.url, image, headers_seen))
                    for _ in range(CLIENTS)
                ]
                await headers_seen.wait()
                fake.release.set()
                for outcome in await asyncio.gather(*pulls):
                    assert not outcome.cut
                    assert outcome.complete == image.blobs
            for digest in image.blobs:
                assert blob_gets(fake, digest) == 1, digest
            log = server.log_path.read_text()
            assert "once between them" in log
            # Both workers answered blob requests (connections spread by SO_REUSEPORT).
            pids = {
                record["pid"]
                for record in map(json.loads, log.splitlines())
                if record["logger"] == "regproxy.access" and record["path"].startswith("/v2/")
            }
            assert len(pids) == 2, pids


def auth_toml(tmp_path: Path, password: str) -> str:
    """One user, and one token key file every replica reads (created here, once)."""
    key = tmp_path / "shared" / "token-key.pem"
    load_or_create_key(key)
    return (
        f'[auth]\nkey_path = "{key}"\nmax_login_failures = 3\nlogin_lockout = 600\n'
        f'[auth.users]\nalice = "{bcrypt_hash(password)}"\n'
    )


def basic(password: str) -> dict[str, str]:
    raw = base64.b64encode(f"alice:{password}".encode()).decode()
    return {"Authorization": f"Basic {raw}"}


async def token_from(session: aiohttp.ClientSession, base: str, scope: str) -> str:
    params = {"service": "regproxy", "scope": scope}
    async with session.get(f"{base}/token", params=params, headers=basic("s3cret-pw")) as resp:
        assert resp.status == 200, await resp.text()
        return str((await resp.json())["token"])


async def test_tokens_uploads_pushes_and_login_limits_across_replicas(
    tmp_path: Path,
    s3: S3,  # noqa: F811
    postgres_dsn: str,  # noqa: F811
) -> None:
    if shutil.which(SKOPEO_BIN) is None:
        pytest.fail("skopeo missing: apt-get install -y skopeo")
    config = auth_toml(tmp_path, "s3cret-pw") + postgres_toml(postgres_dsn) + s3.toml()
    config += f'[cluster]\nsecret = "{SECRET}"\n'
    chunks = [os.urandom(700 * KiB + n) for n in range(3)]
    data = b"".join(chunks)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    async with replicas(tmp_path, 3, config) as (a, b, c), new_session() as session:
        # A token that replica A issued is accepted by B and C.
        token = await token_from(session, a.url, "repository:team/chunks:push,pull")
        bearer = {"Authorization": f"Bearer {token}"}
        for node in (b, c):
            async with session.get(f"{node.url}/v2/", headers=bearer) as resp:
                assert resp.status == 200
        # A chunked upload: started on A, a chunk through each of B and C, finished on A.
        async with session.post(f"{a.url}/v2/team/chunks/blobs/uploads/", headers=bearer) as r:
            assert r.status == 202, await r.text()
            location = r.headers["Location"]
        offset = 0
        for node, chunk in zip((b, c, a), chunks, strict=True):
            headers = {
                **bearer,
                "Content-Type": "application/octet-stream",
                "Content-Range": f"{offset}-{offset + len(chunk) - 1}",
            }
            url = yarl.URL(node.url).join(yarl.URL(location))
            async with session.patch(url, data=chunk, headers=headers) as r:
                assert r.status == 202, await r.text()
                location = r.headers["Location"]
                offset += len(chunk)
                assert r.headers["Range"] == f"0-{offset - 1}"
        url = yarl.URL(b.url).join(yarl.URL(location)).update_query(digest=digest)
        async with session.put(url, headers=bearer) as r:
            assert r.status == 201, await r.text()
        async with session.get(f"{c.url}/v2/team/chunks/blobs/{digest}", headers=bearer) as r:
            assert r.status == 200
            assert await r.read() == data
        # skopeo pushes through A and pulls through B, with the user's credentials.
        image = make_oci_layout(tmp_path / "src", [2 * MiB, 4000], tag="v1", seed="replicas")
        creds = "alice:s3cret-pw"
        await skopeo_push(image, f"docker://{a.host}/team/app:v1", f"--dest-creds={creds}")
        await skopeo_pull(
            f"docker://{b.host}/team/app:v1", image, tmp_path / "back", f"--src-creds={creds}"
        )
        # Failed logins count on every replica: three on A and C lock alice out on B too.
        for node in (a, c, a):
            async with session.get(f"{node.url}/token", headers=basic("wrong")) as r:
                assert r.status == 401
        async with session.get(f"{b.url}/token", headers=basic("s3cret-pw")) as r:
            assert r.status == 429, await r.text()
            assert int(r.headers["Retry-After"]) > 0


async def test_postgres_stops_and_starts_while_replicas_pull(
    tmp_path: Path,
    s3: S3,  # noqa: F811
    own_postgres: PostgresServer,  # noqa: F811
) -> None:
    """PostgreSQL stops while clients pull through three replicas: they get 503 UNAVAILABLE
    (JSON) or the right bytes, never a hang; once it is back, every replica serves again, and
    a cold image pulled across them afterwards is still fetched once per blob."""
    fake = FakeUpstream()
    warm = fake.add_image("team/app", "v1", [os.urandom(1 * MiB)], seed="pg-warm")
    dsn = await own_postgres.create_database()
    async with served(fake) as upstream:
        config = (
            replica_toml(upstream, lease_ttl=5)
            + postgres_toml(dsn, connect_timeout=2, command_timeout=3)
            + s3.toml()
        )
        async with replicas(tmp_path, 3, config) as nodes, new_session() as session:
            assert (await pull(session, nodes[0].url, warm)).complete == warm.blobs
            statuses: list[int] = []
            stop = asyncio.Event()

            async def puller(n: int) -> None:
                while not stop.is_set():
                    node = nodes[n % 3]
                    n += 1
                    for digest, data in warm.blobs.items():
                        url = f"{node.url}/v2/up/team/app/blobs/{digest}"
                        async with session.get(url) as resp:
                            body = await resp.read()
                            statuses.append(resp.status)
                            if resp.status == 200:
                                assert body == data
                            else:
                                assert resp.status == 503, (resp.status, body)
                                assert json.loads(body)["errors"][0]["code"] == "UNAVAILABLE"
                    await asyncio.sleep(0.02)

            pullers = [asyncio.create_task(puller(n)) for n in range(3)]
            try:
                await until(lambda: statuses.count(200) >= 12, pullers)
                await asyncio.to_thread(own_postgres.stop)
                down = len(statuses)
                await until(lambda: statuses[down:].count(503) >= 6, pullers)
                await asyncio.to_thread(own_postgres.start)
                back = len(statuses)
                await until(lambda: statuses[back:].count(200) >= 12, pullers)
            finally:
                stop.set()
                results = await asyncio.gather(*pullers, return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException):
                    raise result
            cold = three_layer_image(fake, "pg-cold", tag="v2")
            outcomes = await asyncio.gather(
                *(pull(session, nodes[n % 3].url, cold) for n in range(9))
            )
            for outcome in outcomes:
                assert outcome.complete == cold.blobs and not outcome.cut
            for digest in cold.blobs:
                assert blob_gets(fake, digest) == 1, digest
            assert all(node.process.alive() for node in nodes)


async def until(condition: Callable[[], bool], tasks: list[asyncio.Task[None]]) -> None:
    """Wait (up to a minute) for ``condition()``, failing early if a task failed."""
    async with asyncio.timeout(60):
        while not condition():
            for task in tasks:
                if task.done():
                    task.result()
                    raise AssertionError("a puller stopped early")
            await asyncio.sleep(0.05)


async def test_worker_killed_mid_fill_is_taken_over_from_its_spool(tmp_path: Path) -> None:
    """``--workers 2``: the worker that owns a fill is SIGKILLed; once its lease expires the
    other worker takes the fill over and continues from the dead one's spool file (a Range
    request upstream), its clients get every byte, the dead one's a cut connection."""
    fake = FakeUpstream()
    layer = os.urandom(4 * MiB + 11)
    image = fake.add_image("team/app", "v1", [layer], seed="workers-kill")
    digest = layers_of(image)[0]
    fake.slow = {digest}
    fake.slow_first = 1 * MiB
    headers_seen = Arrivals(8 * len(image.blobs))
    async with served(fake) as upstream:
        config = f'[upstreams.up]\nurl = "{upstream}"\n[cluster]\nlease_ttl = 5\n'
        env = {"REGPROXY_WORKERS": "2"}
        async with regproxy(tmp_path / "serve", env=env, config=config) as server:
            workers = await wait_workers(server.pid, server.port, server.alive)
            async with new_session() as session:
                pulls = [
                    asyncio.create_task(pull(session, server.url, image, headers_seen))
                    for _ in range(8)
                ]
                await headers_seen.wait()
                async with aiosqlite.connect(server.data_dir / "metadata.sqlite") as db:
                    rows = await db.execute_fetchall(
                        "SELECT owner FROM leases WHERE key = ?", (f"blob:{digest}",)
                    )
                owner = int(next(iter(rows))[0].split("-")[0])
                assert owner in workers
                os.kill(owner, signal.SIGKILL)
                fake.release.set()
                outcomes = await asyncio.gather(*pulls)
                for outcome in outcomes:
                    for got, data in outcome.complete.items():
                        assert data == image.blobs[got]
                    assert set(outcome.complete) | outcome.cut == set(image.blobs)
                assert any(digest in outcome.complete for outcome in outcomes)
                retry = await pull(session, server.url, image)
                assert retry.complete == image.blobs
            log = server.log_path.read_text()
            assert "taking over" in log
            resumed = re.search(rf"cached {digest}, \d+ bytes \((\d+) resumed from the spool", log)
            assert resumed is not None and int(resumed.group(1)) > 0, log[-3000:]
            assert fake.bytes_sent[digest] < 2 * len(layer)
            assert blob_gets(fake, digest) == 2
