"""Prometheus metrics: every metric object of the process, in one ``Metrics`` per app.

Names and labels follow distribution's where it has the same measurement
(``registry_http_*``, ``registry_storage_action_seconds``, ``registry_proxy_*`` with its
``type`` label of ``blob`` or ``manifest``), so its dashboards work; regproxy adds an
``upstream`` label to the proxy metrics and a few metrics distribution does not have.

There is no module-level state: ``create_app`` makes a ``Metrics`` over a fresh
``CollectorRegistry`` and passes it to whatever counts (the HTTP middleware and access logger,
the pull-through cache and its upstream clients, storage, auth, and later GC and eviction).

Multiprocess mode (``--workers N``): prometheus-client keeps each process's values in files
under ``PROMETHEUS_MULTIPROC_DIR`` when that variable is set *before prometheus_client is first
imported* (it picks its value class at import time). The parent process sets it to a fresh,
empty directory before it imports ``regproxy.server`` and forks, and calls
``prometheus_client.multiprocess.mark_process_dead(pid)`` for a worker that exits. The metric
objects below are then the same objects, only file-backed; gauges declare how their values of
several processes combine (``multiprocess_mode``), and ``exposition()`` reads every worker's
files through a ``MultiProcessCollector`` instead of the in-process registry. Collectors that
query the metadata store at scrape time (cache size, uploads in progress) see the shared store,
so whichever worker answers the scrape reports the whole picture.
"""

from __future__ import annotations

import contextvars
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Final, TypeVar

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

# What happened to one pull through the cache, for the access log and the hit/miss counters.
HIT: Final = "hit"  # served from the cache
MISS: Final = "miss"  # fetched from upstream by this request
JOINED: Final = "joined"  # joined a fetch another request had started (single-flight)
STALE: Final = "stale"  # served from the cache because the upstream could not confirm it
BYPASS: Final = "bypass"  # passed through without caching (tags/list, referrers)
OUTCOMES: Final = (HIT, MISS, JOINED, STALE, BYPASS)
KINDS: Final = ("blob", "manifest")

# Seconds: HTTP requests and storage actions span sub-millisecond manifest reads to
# multi-minute layer transfers.
_DURATION_BUCKETS = (0.001, 0.005, 0.025, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900)
_SIZE_BUCKETS = tuple(float(4**i) for i in range(4, 17))  # 256 B .. 4 GiB, times 4

T = TypeVar("T")
# An answered request's children: requests counter, duration, response and request sizes.
_AnsweredChildren = tuple[Counter, Histogram, Histogram, Histogram]


@dataclass
class PullOutcome:
    """Set by the pull-through cache for the request being served (see ``note_outcome``)."""

    upstream: str = ""
    kind: str = ""
    outcome: str = ""


# The outcome record of the request this task serves. The HTTP middleware sets a fresh one per
# request; the cache fills it in without knowing about HTTP. Tasks spawned from a request copy
# the context, so only code on the request's own path may call ``note_outcome``.
_CURRENT_OUTCOME: contextvars.ContextVar[PullOutcome | None] = contextvars.ContextVar(
    "regproxy_pull_outcome", default=None
)


class OutcomeScope:
    """``with OutcomeScope() as record``: a fresh outcome record for the code run inside (one
    request). A class rather than a generator: it is entered once per request."""

    __slots__ = ("_token",)

    def __enter__(self) -> PullOutcome:
        record = PullOutcome()
        self._token = _CURRENT_OUTCOME.set(record)
        return record

    def __exit__(self, *exc_info: object) -> None:
        _CURRENT_OUTCOME.reset(self._token)


@dataclass(frozen=True)
class UpstreamStats:
    """One upstream's counters as a scrape would show them (for the web UI)."""

    hits: float = 0.0
    misses: float = 0.0
    joins: float = 0.0
    stale: float = 0.0
    pulled_bytes: float = 0.0  # fetched from the upstream
    served_bytes: float = 0.0  # sent to clients from the cache (what the cache saved)
    fills_in_progress: float = 0.0
    ratelimit_remaining: float | None = None
    ratelimit_limit: float | None = None


ScrapeQuery = Callable[[], Awaitable[Iterable[Metric]]]


class _ScrapeCollector(Collector):
    """Metrics computed at scrape time by async queries (cache size, uploads in progress).

    Prometheus collectors are synchronous, so the /metrics handler refreshes these by awaiting
    ``refresh()`` first; ``collect`` returns what the last refresh found.
    """

    def __init__(self) -> None:
        self.queries: list[ScrapeQuery] = []
        self._last: list[Metric] = []

    async def refresh(self) -> None:
        found: list[Metric] = []
        for query in self.queries:
            found.extend(await query())
        self._last = found

    def collect(self) -> Iterable[Metric]:
        return list(self._last)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.multiprocess = bool(os.environ.get(MULTIPROC_ENV))
        r = self.registry
        # -- HTTP (distribution's names and labels) -------------------------------------------
        self.http_requests = Counter(
            "registry_http_requests",
            "HTTP requests answered, by method, route (handler) and status code.",
            ["method", "handler", "code"],
            registry=r,
        )
        self.http_duration = Histogram(
            "registry_http_request_duration_seconds",
            "Seconds from the request's arrival to the last byte of the response.",
            ["handler", "method"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.http_in_flight = Gauge(
            "registry_http_in_flight_requests",
            "Requests whose handlers are running.",
            ["handler"],
            multiprocess_mode="livesum",
            registry=r,
        )
        self.http_request_size = Histogram(
            "registry_http_request_size_bytes",
            "Request body bytes read, by route.",
            ["handler"],
            buckets=_SIZE_BUCKETS,
            registry=r,
        )
        self.http_response_size = Histogram(
            "registry_http_response_size_bytes",
            "Response body bytes sent (sendfile included), by route.",
            ["handler"],
            buckets=_SIZE_BUCKETS,
            registry=r,
        )
        # -- storage ------------------------------------------------------------------------
        self.storage_action = Histogram(
            "registry_storage_action_seconds",
            "Seconds a blob storage action took, by backend (driver) and action.",
            ["driver", "action"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        # -- pull-through cache ------------------------------------------------------------
        proxy_labels = ["upstream", "type"]
        self.proxy_requests = Counter(
            "registry_proxy_requests",
            "Pulls through the cache (every outcome).",
            proxy_labels,
            registry=r,
        )
        self.proxy_hits = Counter(
            "registry_proxy_hits", "Pulls served from the cache.", proxy_labels, registry=r
        )
        self.proxy_misses = Counter(
            "registry_proxy_misses",
            "Pulls that fetched from the upstream (one per single-flight fill).",
            proxy_labels,
            registry=r,
        )
        self.proxy_joins = Counter(
            "registry_proxy_singleflight_joins",
            "Pulls that joined an upstream fetch already in flight instead of starting one.",
            proxy_labels,
            registry=r,
        )
        self.proxy_stale = Counter(
            "registry_proxy_stale",
            "Cached manifests served because the upstream could not confirm them.",
            proxy_labels,
            registry=r,
        )
        self.proxy_bypass = Counter(
            "registry_proxy_bypass",
            "Requests passed to the upstream without caching (tags/list, referrers).",
            proxy_labels,
            registry=r,
        )
        self.proxy_pulled_bytes = Counter(
            "registry_proxy_pulled_bytes",
            "Bytes fetched from the upstream (blobs and manifests).",
            proxy_labels,
            registry=r,
        )
        self.proxy_pushed_bytes = Counter(
            "registry_proxy_pushed_bytes",
            "Bytes sent to clients for pulls through the cache, by outcome.",
            [*proxy_labels, "outcome"],
            registry=r,
        )
        self.upstream_requests = Counter(
            "registry_proxy_upstream_requests",
            "Requests sent to the upstream, by method and status code ('error': no answer).",
            ["upstream", "method", "code"],
            registry=r,
        )
        self.ratelimit_remaining = Gauge(
            "registry_proxy_upstream_ratelimit_remaining",
            "The last RateLimit-Remaining the upstream sent (Docker Hub: pulls left).",
            ["upstream"],
            multiprocess_mode="mostrecent",
            registry=r,
        )
        self.ratelimit_limit = Gauge(
            "registry_proxy_upstream_ratelimit_limit",
            "The last RateLimit-Limit the upstream sent.",
            ["upstream"],
            multiprocess_mode="mostrecent",
            registry=r,
        )
        self.ratelimited_locally_total = Counter(
            "registry_proxy_ratelimited_locally",
            "Upstream requests not sent because the upstream's rate-limit window was exhausted.",
            ["upstream"],
            registry=r,
        )
        self.fills = Gauge(
            "registry_proxy_fills_in_progress",
            "Blob fetches from the upstream in progress.",
            ["upstream"],
            multiprocess_mode="livesum",
            registry=r,
        )
        # -- auth, lifecycle ----------------------------------------------------------------
        self.login_failures = Counter(
            "registry_auth_login_failures",
            "Logins refused: wrong password or unknown user, or locked out after too many.",
            ["reason"],
            registry=r,
        )
        self.gc_runs = Counter("registry_gc_runs", "Garbage collection runs completed.", registry=r)
        self.gc_deleted = Counter(
            "registry_gc_deleted",
            "Objects garbage collection deleted, by kind (blob, manifest, upload).",
            ["kind"],
            registry=r,
        )
        self.gc_freed_bytes = Counter(
            "registry_gc_freed_bytes", "Blob bytes garbage collection freed.", registry=r
        )
        self.upload_purges = Counter(
            "registry_upload_purges",
            "Sweeps for abandoned uploads (their count is registry_gc_deleted_total{kind=upload}).",
            registry=r,
        )
        self.eviction_runs = Counter(
            "registry_eviction_runs", "Cache eviction runs, by upstream.", ["upstream"], registry=r
        )
        self.eviction_deleted = Counter(
            "registry_eviction_deleted",
            "Objects evicted from an upstream's cache, by kind (blob, manifest).",
            ["upstream", "kind"],
            registry=r,
        )
        self.eviction_freed_bytes = Counter(
            "registry_eviction_freed_bytes",
            "Blob bytes evicted from an upstream's cache.",
            ["upstream"],
            registry=r,
        )
        self._scrape = _ScrapeCollector()
        r.register(self._scrape)
        # The labelled children of the HTTP metrics, per label values: finding a child through
        # ``labels()`` costs more than counting in it, and this happens on every request.
        self._answered: dict[tuple[str, str, str], _AnsweredChildren] = {}
        self._running: dict[str, Gauge] = {}

    # -- HTTP ---------------------------------------------------------------------------------

    def in_flight(self, handler: str) -> Gauge:
        """The in-flight gauge of ``handler``'s requests."""
        gauge = self._running.get(handler)
        if gauge is None:
            gauge = self._running[handler] = self.http_in_flight.labels(handler)
        return gauge

    def answered(
        self, method: str, handler: str, code: str, seconds: float, sent: int, received: int
    ) -> None:
        """One request answered: its count, duration and body sizes."""
        key = (method, handler, code)
        children = self._answered.get(key)
        if children is None:
            children = self._answered[key] = (
                self.http_requests.labels(method, handler, code),
                self.http_duration.labels(handler, method),
                self.http_response_size.labels(handler),
                self.http_request_size.labels(handler),
            )
        requests, duration, response_size, request_size = children
        requests.inc()
        duration.observe(seconds)
        response_size.observe(sent)
        request_size.observe(received)

    # -- the pull-through cache ---------------------------------------------------------------

    def upstream_added(self, upstream: str) -> None:
        """Show an upstream's counters at zero from the start (so rate() has a baseline)."""
        for kind in KINDS:
            for counter in (
                self.proxy_requests,
                self.proxy_hits,
                self.proxy_misses,
                self.proxy_joins,
                self.proxy_stale,
                self.proxy_pulled_bytes,
            ):
                counter.labels(upstream, kind)
        self.fills.labels(upstream)

    def note_outcome(self, upstream: str, kind: str, outcome: str) -> None:
        """Count one pull of ``kind`` through ``upstream``'s cache and tell the request's
        access log line what happened. Call it on the request's own path, once per request."""
        self.proxy_requests.labels(upstream, kind).inc()
        counter = {
            HIT: self.proxy_hits,
            MISS: self.proxy_misses,
            JOINED: self.proxy_joins,
            STALE: self.proxy_stale,
            BYPASS: self.proxy_bypass,
        }[outcome]
        counter.labels(upstream, kind).inc()
        record = _CURRENT_OUTCOME.get()
        if record is not None:
            record.upstream, record.kind, record.outcome = upstream, kind, outcome

    def pulled(self, upstream: str, kind: str, size: int) -> None:
        """Bytes fetched from the upstream."""
        self.proxy_pulled_bytes.labels(upstream, kind).inc(size)

    def pushed(self, outcome: PullOutcome, size: int) -> None:
        """Body bytes sent to a client for a pull through the cache."""
        if outcome.outcome and size:
            self.proxy_pushed_bytes.labels(outcome.upstream, outcome.kind, outcome.outcome).inc(
                size
            )

    def upstream_request(self, upstream: str, method: str, code: int | str) -> None:
        self.upstream_requests.labels(upstream, method, str(code)).inc()

    def set_rate_limit(self, upstream: str, remaining: int | None, limit: int | None) -> None:
        """What the upstream's last RateLimit-Remaining / RateLimit-Limit said."""
        if remaining is not None:
            self.ratelimit_remaining.labels(upstream).set(remaining)
        if limit is not None:
            self.ratelimit_limit.labels(upstream).set(limit)

    def ratelimited_locally(self, upstream: str) -> None:
        self.ratelimited_locally_total.labels(upstream).inc()

    # -- storage, auth, lifecycle -------------------------------------------------------------

    async def timed(self, driver: str, action: str, call: Awaitable[T]) -> T:
        """Await ``call``, observing its duration as ``driver``'s ``action``."""
        started = time.perf_counter()
        try:
            return await call
        finally:
            self.storage_action.labels(driver, action).observe(time.perf_counter() - started)

    def login_failed(self, reason: str) -> None:
        """``reason``: "password" (wrong password or unknown user) or "locked_out"."""
        self.login_failures.labels(reason).inc()

    def uploads_purged(self, count: int) -> None:
        """One sweep of abandoned uploads (tasks.py): counted as garbage of kind "upload"."""
        self.upload_purges.inc()
        self.gc_deleted.labels("upload").inc(count)

    def gc_finished(self, deleted: dict[str, int], freed_bytes: int) -> None:
        """One garbage collection run: objects deleted by kind, blob bytes freed."""
        self.gc_runs.inc()
        for kind, count in deleted.items():
            self.gc_deleted.labels(kind).inc(count)
        self.gc_freed_bytes.inc(freed_bytes)

    def evicted(self, upstream: str, deleted: dict[str, int], freed_bytes: int) -> None:
        """One eviction run over ``upstream``'s cache."""
        self.eviction_runs.labels(upstream).inc()
        for kind, count in deleted.items():
            self.eviction_deleted.labels(upstream, kind).inc(count)
        self.eviction_freed_bytes.labels(upstream).inc(freed_bytes)

    # -- scraping -----------------------------------------------------------------------------

    def add_scrape_query(self, query: ScrapeQuery) -> None:
        """An async query whose metrics each scrape includes (bounded cost: one per scrape)."""
        self._scrape.queries.append(query)

    def _exposition_registry(self) -> CollectorRegistry:
        if not self.multiprocess:
            return self.registry
        merged = CollectorRegistry()
        MultiProcessCollector(merged)  # type: ignore[no-untyped-call]
        merged.register(self._scrape)
        return merged

    async def exposition(self) -> bytes:
        """The text a scrape gets."""
        await self._scrape.refresh()
        return generate_latest(self._exposition_registry())

    async def upstream_stats(self) -> dict[str, UpstreamStats]:
        """Per upstream, the counters the web UI shows (summed over workers if multiprocess)."""
        values: dict[str, dict[str, float]] = {}
        fields = {
            "registry_proxy_hits_total": "hits",
            "registry_proxy_misses_total": "misses",
            "registry_proxy_singleflight_joins_total": "joins",
            "registry_proxy_stale_total": "stale",
            "registry_proxy_pulled_bytes_total": "pulled_bytes",
            "registry_proxy_fills_in_progress": "fills_in_progress",
            "registry_proxy_upstream_ratelimit_remaining": "ratelimit_remaining",
            "registry_proxy_upstream_ratelimit_limit": "ratelimit_limit",
        }
        for family in self._exposition_registry().collect():
            for sample in family.samples:
                upstream = sample.labels.get("upstream")
                if upstream is None:
                    continue
                into = values.setdefault(upstream, {})
                if sample.name in fields:
                    key = fields[sample.name]
                    into[key] = into.get(key, 0.0) + sample.value
                elif sample.name == "registry_proxy_pushed_bytes_total" and sample.labels.get(
                    "outcome"
                ) in (HIT, STALE):
                    into["served_bytes"] = into.get("served_bytes", 0.0) + sample.value
        return {name: UpstreamStats(**found) for name, found in values.items()}


METRICS = web.AppKey("metrics", Metrics)


def gauge(name: str, documentation: str, labels: list[str] | None = None) -> GaugeMetricFamily:
    """A gauge family for a scrape-time query to fill in."""
    return GaugeMetricFamily(name, documentation, labels=labels)


@dataclass
class _Timed:
    metrics: Metrics
    driver: str
    action: str
    started: float = field(default_factory=time.perf_counter)

    def done(self) -> None:
        self.metrics.storage_action.labels(self.driver, self.action).observe(
            time.perf_counter() - self.started
        )


async def timed_stream(
    metrics: Metrics, driver: str, action: str, stream: AsyncIterator[bytes]
) -> AsyncIterator[bytes]:
    """``stream``, observing the time to its first chunk (the storage's latency, not the
    client's reading speed) as ``action``."""
    timer: _Timed | None = _Timed(metrics, driver, action)
    try:
        async for chunk in stream:
            if timer is not None:
                timer.done()
                timer = None
            yield chunk
    finally:
        if timer is not None:
            timer.done()
