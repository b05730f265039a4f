"""/metrics after a scripted workload: exact counter values, parsed with prometheus-client.

The workload: a hosted push and pull, a cold and a warm proxy pull, 8 concurrent cold pulls of
one blob, and a 429 from the fake upstream. The app runs with regproxy's access logger, as
``regproxy serve`` does: it records the HTTP metrics once the last byte (sendfile included)
is sent.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from blockbuster import BlockBuster
from prometheus_client.parser import text_string_to_metric_families

from regproxy.api.middleware import AccessLogger
from regproxy.app import create_app
from regproxy.config import Config
from regproxy.logs import ACCESS_FIELDS
from regproxy.metrics import METRICS
from tests.helpers import Client, app_of, make_config, push_image
from tests.proxy.fakeupstream import FakeUpstream

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
StartApp = Callable[[Config], Awaitable[Client]]


@pytest.fixture
def start_app(aiohttp_client: Any, blockbuster: BlockBuster) -> StartApp:
    async def start(config: Config) -> Client:
        blockbuster.deactivate()
        try:
            server = TestServer(create_app(config))
            await server.start_server(access_log_class=AccessLogger)
            client: Client = await aiohttp_client(server)
        finally:
            blockbuster.activate()
        return client

    return start


async def scrape(client: Client, path: str = "/metrics") -> Samples:
    resp = await client.get(path)
    assert resp.status == 200, await resp.text()
    assert resp.headers["Content-Type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(await resp.text()):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def proxy(samples: Samples, name: str, kind: str, **labels: str) -> float:
    return value(samples, name, upstream="fake", type=kind, **labels)


async def pull(client: Client, repo: str, reference: str, blobs: list[str]) -> int:
    """GET the manifest and every blob; the body bytes received."""
    resp = await client.get(f"/v2/{repo}/manifests/{reference}")
    assert resp.status == 200, await resp.text()
    received = len(await resp.read())
    for digest in blobs:
        blob = await client.get(f"/v2/{repo}/blobs/{digest}")
        assert blob.status == 200
        received += len(await blob.read())
    return received


async def test_metrics_after_a_workload(
    start_app: StartApp, upstream: FakeUpstream, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="aiohttp.access")
    assert upstream.base_url is not None
    config = make_config(tmp_path, upstreams={"fake": {"url": str(upstream.base_url)}})
    client = await start_app(config)
    metrics = app_of(client)[METRICS]

    # A hosted push and pull.
    hosted = await push_image(client, "team/app", "v1")
    hosted_bytes = await pull(client, "team/app", "v1", list(hosted.blobs))

    # A cold, then a warm pull through the cache.
    image = upstream.add_image("lib/app", "v1", [b"first layer" * 1000, b"second" * 3000])
    image_bytes = sum(len(b) for b in image.blobs.values())
    cold = await pull(client, "fake/lib/app", "v1", list(image.blobs))
    warm = await pull(client, "fake/lib/app", "v1", list(image.blobs))
    assert cold == warm == len(image.manifest) + image_bytes

    # 8 concurrent cold pulls of one blob: one fetch, seven joins.
    big = b"0123456789abcdef" * 40_000
    big_digest = upstream.add_blob("lib/big", big)
    upstream.slow.add(big_digest)

    async def get_big() -> bytes:
        resp = await client.get(f"/v2/fake/lib/big/blobs/{big_digest}")
        assert resp.status == 200
        return await resp.read()

    pulls = [asyncio.create_task(get_big()) for _ in range(8)]
    await asyncio.wait_for(upstream.first_sent.wait(), 10)
    joins = {"upstream": "fake", "type": "blob"}
    for _ in range(1000):  # every pull has joined the fill before it may finish
        if metrics.registry.get_sample_value("registry_proxy_singleflight_joins_total", joins) == 7:
            break
        await asyncio.sleep(0.01)
    upstream.release.set()
    assert all(body == big for body in await asyncio.gather(*pulls))

    # A 429 from the upstream for a manifest nothing cached can stand in for.
    upstream.status, upstream.retry_after = 429, "30"
    refused = await client.get("/v2/fake/lib/other/manifests/v1")
    assert refused.status == 429
    assert refused.headers["Retry-After"] == "30"

    m = await scrape(client)

    # The cache: hits, misses and joins by type.
    blobs = len(image.blobs)
    assert proxy(m, "registry_proxy_misses_total", "blob") == blobs + 1
    assert proxy(m, "registry_proxy_singleflight_joins_total", "blob") == 7
    assert proxy(m, "registry_proxy_hits_total", "blob") == blobs
    assert proxy(m, "registry_proxy_requests_total", "blob") == 2 * blobs + 8
    assert proxy(m, "registry_proxy_misses_total", "manifest") == 2  # cold pull, the 429
    assert proxy(m, "registry_proxy_hits_total", "manifest") == 1
    assert proxy(m, "registry_proxy_singleflight_joins_total", "manifest") == 0
    assert proxy(m, "registry_proxy_stale_total", "manifest") == 0
    # Bytes from the upstream: the image and the big blob, each once.
    assert proxy(m, "registry_proxy_pulled_bytes_total", "blob") == image_bytes + len(big)
    assert proxy(m, "registry_proxy_pulled_bytes_total", "manifest") == len(image.manifest)
    assert sum(upstream.bytes_sent.values()) == image_bytes + len(big)
    # Bytes to clients, by outcome: what the cache saved is the hits' share.
    pushed = "registry_proxy_pushed_bytes_total"
    assert proxy(m, pushed, "blob", outcome="miss") == image_bytes + len(big)
    assert proxy(m, pushed, "blob", outcome="joined") == 7 * len(big)
    assert proxy(m, pushed, "blob", outcome="hit") == image_bytes
    assert proxy(m, pushed, "manifest", outcome="miss") == len(image.manifest)
    assert proxy(m, pushed, "manifest", outcome="hit") == len(image.manifest)
    assert value(m, "registry_proxy_fills_in_progress", upstream="fake") == 0
    # Requests to the upstream by method and status.
    requests = "registry_proxy_upstream_requests_total"
    assert value(m, requests, upstream="fake", method="GET", code="200") == 1 + blobs + 1
    assert value(m, requests, upstream="fake", method="GET", code="429") == 1
    assert value(m, requests, upstream="fake", method="HEAD", code="200") == 0
    # What is stored for the upstream: its blobs once each, and its manifest.
    stored = image_bytes + len(big) + len(image.manifest)
    assert value(m, "registry_proxy_cache_bytes", upstream="fake") == stored
    assert value(m, "registry_proxy_cache_blobs", upstream="fake") == blobs + 1
    assert value(m, "registry_uploads_in_progress") == 0

    # HTTP: requests by route and code, body bytes sent (sendfile included) by route.
    http = "registry_http_requests_total"
    assert value(m, http, method="PUT", handler="manifest", code="201") == 1
    assert value(m, http, method="GET", handler="manifest", code="200") == 3
    assert value(m, http, method="GET", handler="manifest", code="429") == 1
    blob_gets = len(hosted.blobs) + 2 * blobs + 8
    assert value(m, http, method="GET", handler="blob", code="200") == blob_gets
    assert hosted_bytes == len(hosted.manifest) + sum(len(b) for b in hosted.blobs.values())
    blob_sent = hosted_bytes - len(hosted.manifest) + 2 * image_bytes + 8 * len(big)
    assert value(m, "registry_http_response_size_bytes_sum", handler="blob") == blob_sent
    assert value(m, "registry_http_response_size_bytes_count", handler="blob") == blob_gets
    duration = "registry_http_request_duration_seconds_count"
    assert value(m, duration, handler="blob", method="GET") == blob_gets
    request_size = value(m, "registry_http_request_size_bytes_sum", handler="blob_upload")
    assert request_size == sum(len(b) for b in hosted.blobs.values())  # monolithic POSTs
    # Only the /metrics request itself is in flight while it is answered.
    assert value(m, "registry_http_in_flight_requests", handler="metrics") == 1
    assert value(m, "registry_http_in_flight_requests", handler="blob") == 0
    # Storage: each blob committed once (hosted 2, the image's, the big one).
    commits = len(hosted.blobs) + blobs + 1
    commit = {"driver": "filesystem", "action": "commit"}
    assert value(m, "registry_storage_action_seconds_count", **commit) == commits

    # The access lines say the same, request by request.
    # (the fake upstream logs to aiohttp.access too, without the fields)
    access = [getattr(r, ACCESS_FIELDS) for r in caplog.records if hasattr(r, ACCESS_FIELDS)]
    big_pulls = [a for a in access if a["path"] == f"/v2/fake/lib/big/blobs/{big_digest}"]
    assert sorted(a["outcome"] for a in big_pulls) == ["joined"] * 7 + ["miss"]
    assert all(a["bytes"] == len(big) and a["upstream"] == "fake" for a in big_pulls)
    image_pulls = [a for a in access if a["path"].startswith("/v2/fake/lib/app/")]
    assert [a["outcome"] for a in image_pulls] == ["miss"] * (1 + blobs) + ["hit"] * (1 + blobs)
    hosted_pulls = [a for a in access if a["path"].startswith("/v2/team/app/")]
    assert {a["outcome"] for a in hosted_pulls} == {None}
    refused_line = next(a for a in access if a["path"] == "/v2/fake/lib/other/manifests/v1")
    assert (refused_line["status"], refused_line["outcome"]) == (429, "miss")


async def test_metrics_on_a_separate_listener(
    start_app: StartApp, tmp_path: Path, aiohttp_client: Any
) -> None:
    """With metrics.listen, the main listener answers 404 and the metrics app serves them."""
    from regproxy.api.ops import metrics_app

    config = make_config(tmp_path, metrics__listen="127.0.0.1:9")
    client = await start_app(config)
    assert (await client.get("/metrics")).status == 404
    side: Client = await aiohttp_client(metrics_app(app_of(client)))
    m = await scrape(side)
    assert value(m, "registry_http_requests_total", method="GET", handler="metrics", code="404")


async def test_metrics_disabled(start_app: StartApp, tmp_path: Path) -> None:
    client = await start_app(make_config(tmp_path, metrics__enabled=False))
    resp = await client.get("/metrics")
    assert resp.status == 404
    assert (await resp.json())["errors"][0]["code"] == "NOT_FOUND"


async def test_access_line_of_a_stream_cut_short(
    start_app: StartApp, upstream: FakeUpstream, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The upstream breaks off mid-blob: the client's connection is cut, and its access line
    says so, with the body bytes written before the cut."""
    caplog.set_level(logging.INFO, logger="aiohttp.access")
    assert upstream.base_url is not None
    config = make_config(tmp_path, upstreams={"fake": {"url": str(upstream.base_url)}})
    client = await start_app(config)
    data = bytes(range(256)) * 16384  # 4 MiB
    digest = upstream.add_blob("lib/app", data)
    upstream.fail_after = {digest: 2 * 1024 * 1024 + 5}
    resp = await client.get(f"/v2/fake/lib/app/blobs/{digest}")
    assert resp.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()
    for _ in range(100):  # the access line is written once the handler is done
        lines = [getattr(r, ACCESS_FIELDS) for r in caplog.records if hasattr(r, ACCESS_FIELDS)]
        if lines:
            break
        await asyncio.sleep(0.02)
    (line,) = lines
    assert line["complete"] is False
    assert 0 < line["bytes"] <= 2 * 1024 * 1024 + 5
    assert line["outcome"] == "miss"
