"""create_app(config): the one place that names concrete classes and wires them together."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import yarl
from aiohttp import web

from regproxy.api.keys import CONFIG, REGISTRY
from regproxy.api.middleware import (
    IN_FLIGHT,
    InFlight,
    add_common_headers,
    errors_middleware,
)
from regproxy.api.ops import READINESS, Readiness
from regproxy.api.routes import add_routes
from regproxy.auth.middleware import auth_middleware
from regproxy.auth.ratelimit import SharedLoginLimiter
from regproxy.auth.rules import upstream_prefixes
from regproxy.auth.service import AUTH, build_authenticator
from regproxy.cluster import Cluster
from regproxy.cluster.leases import Leases, host_id
from regproxy.cluster.peer import FILL_SOURCE, SECRET, PeerClient
from regproxy.config import Config, ConfigError, UpstreamConfig
from regproxy.errors import Unavailable
from regproxy.lifecycle.eviction import EVICTOR, CacheEvictor
from regproxy.lifecycle.pulls import PULLS, PullRecorder
from regproxy.meta.base import MetadataStore
from regproxy.meta.sqlite import SqliteMetadataStore
from regproxy.metrics import METRICS, Metrics, gauge
from regproxy.proxy.pullthrough import PULL_THROUGH, PullThroughRegistry
from regproxy.proxy.upstream import Upstream
from regproxy.registry.hosted import HostedRegistry
from regproxy.registry.router import RegistryRouter
from regproxy.storage.base import BlobStore
from regproxy.storage.filesystem import FilesystemBlobStore
from regproxy.storage.instrumented import InstrumentedBlobStore
from regproxy.tasks import HOSTED, background_tasks


@contextlib.asynccontextmanager
async def _blob_store(config: Config) -> AsyncIterator[BlobStore]:
    if config.storage.backend == "s3":
        from regproxy.storage.s3 import S3BlobStore  # botocore: ~10 MiB only S3 needs

        async with S3BlobStore.connect(config.storage.s3) as s3:
            yield s3
        return
    storage = FilesystemBlobStore(config.storage_path, fsync=config.storage.fsync)
    try:
        yield storage
    finally:
        await storage.close()


async def _metadata_store(config: Config) -> MetadataStore:
    if config.metadata.backend == "postgres":
        from regproxy.meta.postgres import PostgresMetadataStore  # asyncpg, only then

        settings = config.metadata
        try:
            return await PostgresMetadataStore.open(
                settings.dsn,
                pool_size=settings.pool_size,
                prepared_statements=settings.prepared_statements,
                connect_timeout=settings.connect_timeout,
                command_timeout=settings.command_timeout,
            )
        except Unavailable as exc:
            raise ConfigError(
                f"config key metadata.dsn: cannot use the PostgreSQL database at"
                f" {_without_password(settings.dsn)}: {exc.message}"
            ) from exc
    return await SqliteMetadataStore.open(config.data_path / "metadata.sqlite")


def _without_password(dsn: str) -> str:
    url = yarl.URL(dsn)
    return str(url.with_password(None)) if url.password else dsn


@contextlib.asynccontextmanager
async def open_stores(config: Config) -> AsyncIterator[tuple[MetadataStore, BlobStore]]:
    """The metadata store and the blob store, for serving and for the lifecycle commands."""
    config.data_path.mkdir(parents=True, exist_ok=True)
    meta = await _metadata_store(config)
    try:
        async with _blob_store(config) as storage:
            yield meta, storage
    finally:
        await meta.close()


async def prepare(config: Config) -> None:
    """What the parent of several workers does once before starting them: create the data
    directory, the metadata schema (SQLite's WAL switch and migrations, PostgreSQL's
    migrations) and the token key, so the workers do not race for them, and check the blob
    store; a problem is one ``ConfigError`` here, before any worker runs."""
    config.data_path.mkdir(parents=True, exist_ok=True)
    build_authenticator(config, pull_only=upstream_prefixes(config.upstreams))
    meta = await _metadata_store(config)
    await meta.close()
    async with _blob_store(config):
        pass


async def _stores(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    auth = app[AUTH]
    async with open_stores(config) as (meta, storage):
        # Failed logins count for every replica and worker sharing the metadata store.
        auth.shared_limiter = SharedLoginLimiter(
            meta, config.auth.max_login_failures, config.auth.login_lockout
        )
        timed = InstrumentedBlobStore(storage, app[METRICS], config.storage.backend)
        app[HOSTED] = HostedRegistry(meta, timed, gc_grace=config.gc.grace)
        try:
            yield
        finally:
            auth.shared_limiter = None


def _client_session(upstream: UpstreamConfig) -> aiohttp.ClientSession:
    ssl_context = ssl.create_default_context(cafile=upstream.ca_bundle or None)
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=upstream.max_connections, ssl=ssl_context),
        timeout=aiohttp.ClientTimeout(
            total=None, sock_connect=upstream.timeout, sock_read=upstream.timeout
        ),
        auto_decompress=False,  # blobs are passed on, and hashed, exactly as sent
        trust_env=False,  # only the configured upstream is ever contacted
        # What aiohttp buffers per connection is up to twice this: the fills tee the body to
        # disk as it comes, a bigger buffer only adds to each fill's memory.
        read_bufsize=128 << 10,
    )


async def _registry(app: web.Application) -> AsyncIterator[None]:
    """The router over the hosted registry and one pull-through cache per upstream."""
    config = app[CONFIG]
    sessions = {name: _client_session(up) for name, up in config.upstreams.items()}
    metrics = app[METRICS]
    upstreams = {
        name: Upstream(name, config.upstreams[name], session, metrics=metrics)
        for name, session in sessions.items()
    }
    cluster = _cluster(config, app[HOSTED])
    proxy = PullThroughRegistry(
        app[HOSTED],
        upstreams,
        config.data_path / "spool",
        config.limits.manifest_max_bytes,
        cluster=cluster,
        metrics=metrics,
    )
    await proxy.reconcile_spool(config.uploads.max_age)
    _scrape_queries(metrics, app[HOSTED].meta, list(upstreams))
    app[FILL_SOURCE] = proxy
    app[PULL_THROUGH] = proxy
    app[REGISTRY] = RegistryRouter(
        app[HOSTED], proxy, config.default_upstream, on_pull=app[PULLS].record
    )
    try:
        yield
    finally:
        await proxy.close()
        await cluster.leases.close()
        if cluster.peer is not None:
            await cluster.peer.close()
        for session in sessions.values():
            await session.close()


def _cluster(config: Config, hosted: HostedRegistry) -> Cluster:
    """Leases shared by every process on the metadata store; a client for peers' fill
    endpoints when the replicas share a secret."""
    settings = config.cluster
    leases = Leases(
        hosted.meta,
        host=host_id(settings.node),
        url=settings.advertise_url,
        ttl=settings.lease_ttl,
    )
    timeout = max((up.timeout for up in config.upstreams.values()), default=30.0)
    peer = PeerClient(settings.secret, timeout) if settings.secret else None
    return Cluster(leases, peer)


def _scrape_queries(metrics: Metrics, meta: MetadataStore, upstreams: list[str]) -> None:
    """The metrics each scrape asks the metadata store for: a fixed number of queries."""

    async def cache_size() -> list[Any]:
        size = gauge(
            "registry_proxy_cache_bytes",
            "Bytes stored for an upstream's cache (blobs once each, plus manifests).",
            ["upstream"],
        )
        blobs = gauge("registry_proxy_cache_blobs", "Blobs in an upstream's cache.", ["upstream"])
        for name in upstreams:
            count, total = await meta.cache_totals(name)
            size.add_metric([name], total)
            blobs.add_metric([name], count)
        return [size, blobs]

    async def uploads() -> list[Any]:
        family = gauge("registry_uploads_in_progress", "Blob uploads started and not finished.")
        family.add_metric([], await meta.count_uploads())
        return [family]

    metrics.add_scrape_query(cache_size)
    metrics.add_scrape_query(uploads)
    for name in upstreams:
        metrics.upstream_added(name)


async def _pull_recorder(app: web.Application) -> AsyncIterator[None]:
    """Pull times, batched in memory and written every cache.pull_flush_interval seconds."""
    recorder = PullRecorder(app[HOSTED].meta, app[CONFIG].cache.pull_flush_interval)
    app[PULLS] = recorder
    task = asyncio.create_task(recorder.run())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await recorder.close()  # the pulls since the last flush


async def _cache_evictor(app: web.Application) -> AsyncIterator[None]:
    """Cache eviction after each fill (and for GC passes in this process)."""
    proxy = app[PULL_THROUGH]
    hosted = app[HOSTED]
    evictor = CacheEvictor(
        hosted.meta, hosted.storage, app[CONFIG], pulls=app[PULLS], in_use=proxy.filling
    )
    app[EVICTOR] = evictor
    proxy.on_fill_done = evictor.fill_done
    try:
        yield
    finally:
        proxy.on_fill_done = None
        await evictor.close()


def create_app(config: Config, metrics: Metrics | None = None) -> web.Application:
    """The registry app; ``metrics`` defaults to a fresh ``Metrics`` of its own."""
    # Users, rules and the token key are read now, so a bad one stops start-up (ConfigError);
    # upstream prefixes are pull-only for everyone.
    auth = build_authenticator(config, pull_only=upstream_prefixes(config.upstreams))
    metrics = metrics if metrics is not None else Metrics()
    in_flight = InFlight(metrics)
    app = web.Application(
        middlewares=[
            in_flight.middleware,
            errors_middleware,
            auth_middleware,
        ]
    )
    app[CONFIG] = config
    app[METRICS] = metrics
    auth.metrics = metrics
    app[READINESS] = Readiness()
    app[AUTH] = auth
    app[IN_FLIGHT] = in_flight
    app[SECRET] = config.cluster.secret
    app.cleanup_ctx.append(_stores)
    app.cleanup_ctx.append(_pull_recorder)
    app.cleanup_ctx.append(_registry)
    app.cleanup_ctx.append(_cache_evictor)
    app.cleanup_ctx.append(background_tasks)
    app.on_response_prepare.append(add_common_headers)
    add_routes(app)
    return app
