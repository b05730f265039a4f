"""Running the app: listen until SIGTERM or SIGINT, then drain and clean up.

aiohttp's own graceful shutdown stops reading from every connection before it waits for the
handlers, so a request whose body is still arriving (a blob upload) could never finish and
would be cut off after ``shutdown_timeout``. Here the listener closes first, the requests in
flight get up to ``shutdown_timeout`` seconds to finish, bodies included, and only then does
aiohttp close the connections (still letting responses being sent finish).

``serve --workers N`` runs N such processes on one port (SO_REUSEPORT), each with its own app,
connections and background tasks, under a supervising parent (:func:`supervise`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import multiprocessing
import os
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client.multiprocess import mark_process_dead

from regproxy import __version__
from regproxy.api.middleware import IN_FLIGHT, AccessLogger
from regproxy.api.ops import READINESS, metrics_app
from regproxy.app import create_app
from regproxy.auth.service import AUTH
from regproxy.config import Config
from regproxy.metrics import MULTIPROC_ENV
from regproxy.preflight import StartupError, check_data_dirs

log = logging.getLogger(__name__)
# aiohttp's connection-level logger: where it reports requests it could not even parse.
SERVER_LOGGER = "aiohttp.server"


class MalformedRequestFilter(logging.Filter):
    """One line at WARNING for a request aiohttp could not parse, instead of an ERROR with
    a traceback of aiohttp's parser (garbage bytes, a bad request line, HTTP version or
    header). There is nothing to debug in regproxy: the client sent something broken and
    got its 400. What aiohttp logs lower (DEBUG: a first "method" that is no HTTP method,
    such as TLS sent to the HTTP port) stays that low."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            remote = record.args[0] if isinstance(record.args, tuple) and record.args else "-"
            record.msg, record.args = "bad request from %s: %s", (remote, _one_line(exc))
            record.exc_info = record.exc_text = None
            if record.levelno > logging.WARNING:
                record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def _one_line(exc: HttpProcessingError) -> str:
    text = " ".join(str(exc.message).split()).rstrip(" ^")  # the caret under the bad byte
    return f"{exc.code} {text[:200]}"


async def start_site(site: web.TCPSite, listen: str) -> None:
    """Bind and listen; a port in use (or not ours to bind) is a one-line StartupError."""
    try:
        await site.start()
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)  # asyncio's text is long
        raise StartupError(f"cannot listen on {listen}: {reason}") from exc


async def start_metrics_listener(
    config: Config, app: web.Application, *, reuse_port: bool = False
) -> web.AppRunner | None:
    """``metrics.listen``: a second site in this process serving only /metrics, no auth
    (with several workers, each binds it with SO_REUSEPORT: any of them answers for all)."""
    if not (config.metrics.enabled and config.metrics.listen):
        return None
    runner = web.AppRunner(metrics_app(app), access_log=None)
    await runner.setup()
    host, _, port = config.metrics.listen.rpartition(":")
    try:
        await start_site(
            web.TCPSite(runner, host.strip("[]"), int(port), reuse_port=reuse_port),
            config.metrics.listen,
        )
    except StartupError:
        await runner.cleanup()
        raise
    return runner


def started_message(config: Config, app: web.Application) -> str:
    """What is running: address, data, storage, upstreams, auth mode, metrics."""
    upstreams = ", ".join(f"{name}={up.url}" for name, up in config.upstreams.items()) or "none"
    mode = "open (no users; loopback only)" if app[AUTH].policy.open_access else "token"
    metrics = "off"
    if config.metrics.enabled:
        metrics = f"http://{config.metrics.listen}/metrics" if config.metrics.listen else "/metrics"
    return (
        f"regproxy {__version__} listening on http://{config.listen}; data in"
        f" {config.data_path.resolve()}; blobs: {config.storage.backend};"
        f" upstreams: {upstreams}; auth: {mode}; metrics: {metrics}"
    )


async def run(
    config: Config,
    *,
    reuse_port: bool = False,
    ready: Callable[[], None] | None = None,
    **handler_options: Any,
) -> None:
    """Serve ``config.listen`` until a signal; ``handler_options`` go to aiohttp's runner.

    ``reuse_port``: bind with SO_REUSEPORT, beside the other workers; ``ready`` is called
    once the port is bound. A port in use or an unusable data directory raises
    ``StartupError`` (one line).
    """
    check_data_dirs(config)
    app = create_app(config)
    handler_options.setdefault("access_log_class", AccessLogger)  # it records HTTP metrics
    runner = web.AppRunner(app, shutdown_timeout=config.shutdown_timeout, **handler_options)
    malformed = MalformedRequestFilter()
    logging.getLogger(SERVER_LOGGER).addFilter(malformed)
    await runner.setup()
    metrics_runner: web.AppRunner | None = None
    try:
        site = web.TCPSite(runner, config.host, config.port, reuse_port=reuse_port)
        await start_site(site, config.listen)
        metrics_runner = await start_metrics_listener(config, app, reuse_port=reuse_port)
        if ready is not None:
            ready()
        log.info("%s", started_message(config, app))  # bound, storage open
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()

        app[READINESS].draining = True  # /readyz answers 503 from here on
        await site.stop()  # no new connections from here on
        in_flight = app[IN_FLIGHT]
        if in_flight.count:
            log.info("stopping: waiting for %d request(s) in flight", in_flight.count)
        try:
            async with asyncio.timeout(config.shutdown_timeout):
                await in_flight.wait_idle()
        except TimeoutError:
            log.warning(
                "stopping: %d request(s) still running after %ss are cut off",
                in_flight.count,
                config.shutdown_timeout,
            )
    finally:
        if metrics_runner is not None:
            await metrics_runner.cleanup()
        await runner.cleanup()
        logging.getLogger(SERVER_LOGGER).removeFilter(malformed)


# -- several worker processes ----------------------------------------------------------------

# A worker that dies is replaced after this many seconds, doubling while replacements keep
# dying within STABLE seconds of their start, up to MAX_RESTART_DELAY.
RESTART_DELAY = 0.5
MAX_RESTART_DELAY = 30.0
STABLE = 10.0
# After SIGTERM, workers get shutdown_timeout plus this long to drain before SIGKILL.
DRAIN_GRACE = 10.0

WorkerTarget = Callable[[Config, int, Connection], None]


def die_with_parent() -> None:
    """In a worker: get SIGTERM when the supervisor dies, however it dies (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:
        raise SystemExit(1)  # it died before the line above


@dataclass
class _Worker:
    slot: int
    process: BaseProcess
    ready: Connection | None
    started: float

    @property
    def pid(self) -> int:
        return self.process.pid or 0


def _describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
    return f"exit code {code}"


class Supervisor:
    """Starts ``config.workers`` workers and keeps them running until SIGTERM or SIGINT.

    Start-up succeeds when every worker has bound the port; if one fails first (a bad
    configuration, storage that cannot be reached), the others are stopped and its exit code
    is returned (2 for a configuration error). Afterwards a worker that dies is logged and
    replaced. SIGTERM or SIGINT is passed on to every worker, which drains as a single
    process does; the supervisor returns 0 once all have exited cleanly.
    """

    def __init__(self, config: Config, target: WorkerTarget) -> None:
        self._config = config
        self._target = target
        # spawn: a fresh interpreter per worker, no event loop or sockets copied by fork.
        self._context = multiprocessing.get_context("spawn")
        self._workers: dict[int, _Worker] = {}
        self._restart_at: dict[int, float] = {}
        self._delay: dict[int, float] = {}
        self._stopping = False

    def run(self) -> int:
        wake_read, wake_write = os.pipe()
        os.set_blocking(wake_write, False)
        previous_fd = signal.set_wakeup_fd(wake_write)
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            for slot in range(self._config.workers):
                self._workers[slot] = self._spawn(slot)
            failed = self._start_up(wake_read)
            if failed is not None:
                self._stop_all()
                return failed
            if not self._stopping:
                pids = ", ".join(str(w.pid) for w in self._workers.values())
                log.info(
                    "%d workers serving %s: pids %s", len(self._workers), self._config.listen, pids
                )
                self._supervise(wake_read)
            return self._stop_all()
        finally:
            signal.set_wakeup_fd(previous_fd)
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            os.close(wake_read)
            os.close(wake_write)

    def _on_signal(self, signum: int, frame: object) -> None:
        self._stopping = True

    def _spawn(self, slot: int) -> _Worker:
        receive, send = self._context.Pipe(duplex=False)
        process = self._context.Process(
            target=self._target, args=(self._config, slot, send), name=f"regproxy-worker-{slot}"
        )
        process.start()
        send.close()  # the worker holds the other end; EOF here means it is gone
        return _Worker(slot, process, receive, time.monotonic())

    def _start_up(self, wake: int) -> int | None:
        """Wait until every worker is ready: None, or the exit code to stop with."""
        while not self._stopping:
            waiting = [w for w in self._workers.values() if w.ready is not None]
            if not waiting:
                return None
            objects: list[Any] = [wake, *(w.ready for w in waiting)]
            objects += [w.process.sentinel for w in waiting]
            found = wait(objects)
            self._drain(wake, found)
            for worker in waiting:
                if worker.ready not in found and worker.process.sentinel not in found:
                    continue
                if self._mark_ready(worker):
                    continue
                worker.process.join()  # it closed its end without a word: it is exiting
                code = worker.process.exitcode
                log.error(
                    "worker %d (pid %d) failed to start: %s",
                    worker.slot,
                    worker.pid,
                    _describe_exit(code),
                )
                return code if code and code > 0 else 1
        return None

    def _mark_ready(self, worker: _Worker) -> bool:
        assert worker.ready is not None
        try:
            worker.ready.recv()
        except (EOFError, OSError):
            return False  # it died before it was ready
        worker.ready.close()
        worker.ready = None
        return True

    def _supervise(self, wake: int) -> None:
        while not self._stopping:
            now = time.monotonic()
            for slot, when in list(self._restart_at.items()):
                if when <= now:
                    del self._restart_at[slot]
                    self._workers[slot] = self._spawn(slot)
                    log.info("worker %d restarted as pid %d", slot, self._workers[slot].pid)
            timeout = min((t - now for t in self._restart_at.values()), default=None)
            objects: list[Any] = [wake, *(w.process.sentinel for w in self._workers.values())]
            objects += [w.ready for w in self._workers.values() if w.ready is not None]
            found = wait(objects, None if timeout is None else max(timeout, 0.0))
            self._drain(wake, found)
            for slot, worker in list(self._workers.items()):
                if worker.ready is not None and worker.ready in found:
                    self._mark_ready(worker)
                if worker.process.sentinel in found and not self._stopping:
                    self._replace(slot, worker)

    def _replace(self, slot: int, worker: _Worker) -> None:
        worker.process.join()
        _metrics_of_dead_worker(worker.pid)
        if worker.ready is not None:
            worker.ready.close()
        del self._workers[slot]
        ran = time.monotonic() - worker.started
        delay = self._delay.get(slot, RESTART_DELAY)
        delay = min(delay * 2, MAX_RESTART_DELAY) if ran < STABLE else RESTART_DELAY
        self._delay[slot] = delay
        self._restart_at[slot] = time.monotonic() + delay
        log.error(
            "worker %d (pid %d) exited unexpectedly (%s); starting a new one in %.1fs",
            slot,
            worker.pid,
            _describe_exit(worker.process.exitcode),
            delay,
        )

    @staticmethod
    def _drain(wake: int, found: list[Any]) -> None:
        if wake in found:
            with contextlib.suppress(BlockingIOError):
                os.read(wake, 512)

    def _stop_all(self) -> int:
        """SIGTERM every worker and wait for them to drain; 0 if all exited cleanly."""
        workers = [w for w in self._workers.values() if w.process.is_alive()]
        if workers:
            log.info("stopping: draining %d worker(s)", len(workers))
        for worker in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGTERM)
        deadline = time.monotonic() + self._config.shutdown_timeout + DRAIN_GRACE
        code = 0
        for worker in workers:
            worker.process.join(max(deadline - time.monotonic(), 0.0))
            if worker.process.is_alive():
                log.error("worker %d (pid %d) did not stop; killing it", worker.slot, worker.pid)
                worker.process.kill()
                worker.process.join()
            # A worker still starting has no handler yet: our SIGTERM ends it, cleanly.
            if worker.process.exitcode not in (0, -signal.SIGTERM):
                log.error(
                    "worker %d (pid %d) stopped with %s",
                    worker.slot,
                    worker.pid,
                    _describe_exit(worker.process.exitcode),
                )
                code = 1
        for worker in self._workers.values():
            worker.process.join()
            _metrics_of_dead_worker(worker.pid)
            if worker.ready is not None:
                worker.ready.close()
        return code


def _metrics_of_dead_worker(pid: int) -> None:
    """Drop the live gauges of a worker that exited (its counters stay in the sum)."""
    if os.environ.get(MULTIPROC_ENV):
        mark_process_dead(pid)  # type: ignore[no-untyped-call]


def supervise(config: Config, target: WorkerTarget) -> int:
    """Run ``config.workers`` processes of ``target(config, slot, ready)``; the exit code."""
    _explain_sharing(config)
    if os.environ.get(MULTIPROC_ENV):  # the operator's own directory
        return Supervisor(config, target).run()
    # Each worker's prometheus-client keeps its values in files there (it reads the variable
    # when the spawned worker imports it), and any worker's /metrics adds them all up.
    with tempfile.TemporaryDirectory(prefix="regproxy-metrics-") as metrics_dir:
        os.environ[MULTIPROC_ENV] = metrics_dir
        try:
            return Supervisor(config, target).run()
        finally:
            del os.environ[MULTIPROC_ENV]


def _explain_sharing(config: Config) -> None:
    local = []
    if config.metadata.backend == "sqlite":
        local.append('metadata.backend = "sqlite"')
    if config.storage.backend == "filesystem":
        local.append('storage.backend = "filesystem"')
    if local:
        log.info(
            "%d workers share %s on this machine; replicas on other machines need"
            ' metadata.backend = "postgres" and storage.backend = "s3"',
            config.workers,
            " and ".join(local),
        )
    if config.upstreams:
        log.info("the workers fetch each cold blob from an upstream once between them")
        if not local and not config.cluster.advertise_url:
            log.info(
                "replicas on other machines follow each other's fills only with"
                " cluster.advertise_url and cluster.secret set (else they wait for the blob"
                " to be stored)"
            )
