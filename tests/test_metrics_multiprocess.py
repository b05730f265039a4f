"""The same metric objects in prometheus-client's multiprocess mode (worker processes).

prometheus-client picks file-backed values when PROMETHEUS_MULTIPROC_DIR is set before it is
imported, so this runs in a fresh interpreter: two forked workers count, the parent scrapes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

SCRIPT = textwrap.dedent(
    """
    import asyncio, os, sys, time
    from prometheus_client.multiprocess import mark_process_dead
    from regproxy.metrics import Metrics

    for worker in range(2):
        pid = os.fork()
        if pid == 0:
            metrics = Metrics()
            metrics.note_outcome("docker.io", "blob", "hit")
            metrics.pulled("docker.io", "blob", 1000 * (worker + 1))
            metrics.http_in_flight.labels("blob").inc()
            time.sleep(0.05 * worker)  # the second worker's gauge value is the most recent
            metrics.set_rate_limit("docker.io", 90 - worker, 100)
            os._exit(0)
        os.waitpid(pid, 0)
        mark_process_dead(pid)  # what the parent does for a worker that exits

    scraper = Metrics()
    sys.stdout.write(asyncio.run(scraper.exposition()).decode())
    stats = asyncio.run(scraper.upstream_stats())["docker.io"]
    print("# stats", stats.hits, stats.pulled_bytes, stats.ratelimit_remaining)
    """
)


def test_workers_add_up(tmp_path: Path) -> None:
    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PYTHONPATH": str(src)}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(done.stdout)
        for s in family.samples
    }
    up = (("type", "blob"), ("upstream", "docker.io"))
    assert samples[("registry_proxy_hits_total", up)] == 2
    assert samples[("registry_proxy_pulled_bytes_total", up)] == 3000
    in_flight = ("registry_http_in_flight_requests", (("handler", "blob"),))
    assert samples.get(in_flight, 0) == 0  # both exited: their live gauges are gone
    remaining = ("registry_proxy_upstream_ratelimit_remaining", (("upstream", "docker.io"),))
    assert samples[remaining] == 89
    assert done.stdout.splitlines()[-1] == "# stats 2.0 3000.0 89.0"
