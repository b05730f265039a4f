"""``regproxy serve`` with its metadata in PostgreSQL and its blobs in S3 (moto): skopeo push
and pull, the pull-through cache in front of docker-registry, a database outage while pulls
run, and a database that cannot be reached at start-up."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from tests.e2e.images import make_oci_layout
from tests.e2e.procs import (
    SKOPEO_BIN,
    docker_registry,
    free_port,
    regproxy,
    regproxy_argv,
    regproxy_env,
    run,
)
from tests.e2e.test_proxy_skopeo import (
    assert_served_from_cache,
    images,
    pull,
    push,
    registry_requests,
    upstream_config,
)
from tests.pgfixtures import PostgresServer, own_postgres, postgres_dsn, postgres_server  # noqa: F401
from tests.s3fixtures import S3, s3, shared_moto  # noqa: F401

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio]

MiB = 1 << 20


@pytest.fixture(autouse=True)
def _require_tools() -> None:
    if shutil.which(SKOPEO_BIN) is None:
        pytest.fail("skopeo missing: apt-get install -y skopeo")


def postgres_toml(dsn: str, **settings: object) -> str:
    lines = ["[metadata]", 'backend = "postgres"', f'dsn = "{dsn}"']
    lines += [f"{key} = {json.dumps(value)}" for key, value in settings.items()]
    return "\n".join(lines) + "\n"


async def rows(dsn: str, sql: str) -> list[tuple[object, ...]]:
    conn = await asyncpg.connect(dsn)
    try:
        return [tuple(row) for row in await conn.fetch(sql)]
    finally:
        await conn.close()


async def test_skopeo_push_and_pull(tmp_path: Path, s3: S3, postgres_dsn: str) -> None:  # noqa: F811
    image = make_oci_layout(
        tmp_path / "src",
        [6 * MiB + 3, 300_000, 0],
        platforms=[("linux", "amd64"), ("linux", "arm64")],
        tag="v1",
        seed="pg-hosted",
    )
    config = postgres_toml(postgres_dsn) + s3.toml()
    async with regproxy(tmp_path / "one", config=config) as server:
        dest = f"docker://{server.host}/pg/app:v1"
        await push(image, dest)
        await pull(dest, image, tmp_path / "back")
    # Everything is in PostgreSQL and S3, nothing in the data directory: a second process
    # with another data directory serves the same image.
    assert not (server.data_dir / "metadata.sqlite").exists()
    tagged = await rows(postgres_dsn, "SELECT repo, tag, digest FROM tags")
    assert tagged == [("pg/app", "v1", image.digest)]
    stored = await rows(postgres_dsn, "SELECT digest FROM manifests ORDER BY digest")
    assert sorted(d for (d,) in stored) == sorted([image.digest, *image.manifest_digests])
    async with regproxy(tmp_path / "two", config=config) as other:
        await pull(f"docker://{other.host}/pg/app:v1", image, tmp_path / "again")
        await pull(f"docker://{other.host}/pg/app@{image.digest}", image, tmp_path / "digest")


async def test_pull_through(tmp_path: Path, s3: S3, postgres_dsn: str) -> None:  # noqa: F811
    """Concurrent cold pulls fetch every blob from the upstream once; cached content still
    pulls after the upstream is gone."""
    single, multi = images(tmp_path / "src")
    async with docker_registry(tmp_path / "upstream") as upstream:
        await push(single, f"docker://{upstream.host}/e2e/single:v1")
        await push(multi, f"docker://{upstream.host}/e2e/multi:v2")
        before = registry_requests(upstream)
        config = (
            upstream_config("up", upstream.url, tag_ttl=0) + postgres_toml(postgres_dsn) + s3.toml()
        )
        async with regproxy(tmp_path / "proxy", config=config) as proxy:
            source = f"docker://{proxy.host}/up/e2e/single:v1"
            await asyncio.gather(*(pull(source, single, tmp_path / f"cold-{n}") for n in range(6)))
            sent = registry_requests(upstream) - before
            for blob in single.blobs:
                assert sent[("GET", f"/v2/e2e/single/blobs/{blob.digest}", 200)] == 1, sent
            await pull(f"docker://{proxy.host}/up/e2e/multi:v2", multi, tmp_path / "multi")

            await upstream.process.stop()
            await assert_served_from_cache(proxy, single, multi, tmp_path / "offline")
    cached = await rows(postgres_dsn, "SELECT repo, tag FROM tags ORDER BY repo")
    assert cached == [("up/e2e/multi", "v2"), ("up/e2e/single", "v1")]


async def _get(session: aiohttp.ClientSession, url: str) -> tuple[int, bytes, str]:
    headers = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
    async with session.get(url, headers=headers) as resp:
        return resp.status, await resp.read(), resp.content_type


async def test_database_outage_while_pulling(
    tmp_path: Path,
    s3: S3,  # noqa: F811
    own_postgres: PostgresServer,  # noqa: F811
) -> None:
    """PostgreSQL stops while clients pull: they get 503 UNAVAILABLE with the JSON error body
    (no hang); once it runs again on the same directory and port, pulls succeed, and
    regproxy was never restarted."""
    image = make_oci_layout(tmp_path / "src", [2 * MiB, 1000], tag="v1", seed="pg-outage")
    layer = image.manifests[0].layers[0]
    dsn = await own_postgres.create_database()
    config = postgres_toml(dsn, connect_timeout=2, command_timeout=3) + s3.toml()
    async with regproxy(tmp_path / "proxy", config=config) as server:
        await push(image, f"docker://{server.host}/pg/app:v1")
        manifest_url = f"{server.url}/v2/pg/app/manifests/v1"
        blob_url = f"{server.url}/v2/pg/app/blobs/{layer.digest}"
        statuses: list[int] = []
        stop = asyncio.Event()

        async def puller(session: aiohttp.ClientSession) -> None:
            while not stop.is_set():
                for url in (manifest_url, blob_url):
                    status, body, content_type = await _get(session, url)
                    statuses.append(status)
                    if status == 200:
                        assert body == image.read_blob(
                            image.manifests[0].digest if url == manifest_url else layer.digest
                        )
                    else:
                        assert status == 503, (status, body)
                        assert content_type == "application/json"
                        assert json.loads(body)["errors"][0]["code"] == "UNAVAILABLE"
                await asyncio.sleep(0.02)

        timeout = aiohttp.ClientTimeout(total=20)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            pullers = [asyncio.create_task(puller(session)) for _ in range(4)]
            try:
                await _until(lambda: statuses.count(200) >= 8, pullers)
                await asyncio.to_thread(own_postgres.stop)
                served_before_outage = len(statuses)
                await _until(lambda: statuses[served_before_outage:].count(503) >= 8, pullers)
                await asyncio.to_thread(own_postgres.start)
                back = len(statuses)
                await _until(lambda: statuses[back:].count(200) >= 8, pullers)
            finally:
                stop.set()
                results = await asyncio.gather(*pullers, return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException):
                    raise result
        assert 503 in statuses
        await pull(f"docker://{server.host}/pg/app:v1", image, tmp_path / "after")
        assert server.alive()
        assert "metadata store unavailable" in server.log_path.read_text()


async def _until(condition: Callable[[], bool], tasks: list[asyncio.Task[None]]) -> None:
    """Wait (up to a minute) for ``condition()``, failing early if a puller failed."""
    async with asyncio.timeout(60):
        while not condition():
            for task in tasks:
                if task.done():
                    task.result()
                    raise AssertionError("a puller stopped early")
            await asyncio.sleep(0.05)


@pytest.mark.parametrize("problem", ["refused", "database"])
async def test_unreachable_database_stops_start_up(
    tmp_path: Path,
    problem: str,
    postgres_server: PostgresServer,  # noqa: F811
) -> None:
    if problem == "refused":
        dsn = f"postgresql://regproxy:s3cret@127.0.0.1:{free_port()}/regproxy"
    else:
        dsn = postgres_server.dsn("no_such_database")
    config_path = tmp_path / "config.toml"
    config_path.write_text(postgres_toml(dsn, connect_timeout=3))
    argv = regproxy_argv(free_port(), tmp_path / "data", config_path)
    rc, out, err = await run(argv, env=regproxy_env(), timeout=60)
    assert rc == 2, (rc, out, err)
    lines = [line for line in err.splitlines() if "configuration error" in line]
    assert len(lines) == 1, err
    assert lines[0].startswith("regproxy: configuration error: config key metadata.dsn: "), err
    assert "Traceback" not in err
    assert "s3cret" not in err  # the password is not printed
    if problem == "database":
        assert "no_such_database" in lines[0]


async def test_unreachable_database_in_the_environment(tmp_path: Path) -> None:
    env = regproxy_env(
        {
            "REGPROXY_METADATA_BACKEND": "postgres",
            "REGPROXY_METADATA_DSN": f"postgresql://regproxy@127.0.0.1:{free_port()}/x",
        }
    )
    rc, _, err = await run(regproxy_argv(free_port(), tmp_path / "data"), env=env, timeout=60)
    assert rc == 2 and "config key metadata.dsn: cannot use" in err, err
