"""ManifestCache: rows are served again only while the change counter stands still."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from regproxy.meta.base import ManifestRow
from regproxy.meta.cache import ManifestCache
from regproxy.oci import Digest


def row(seed: bytes, size: int = 0) -> ManifestRow:
    content = seed + b"x" * size
    return ManifestRow(Digest.of(content), "application/json", content)


class Database:
    """A change counter and a table of rows, with a count of the reads that reached it."""

    def __init__(self) -> None:
        self.version: int | None = 1
        self.rows: dict[str, ManifestRow | None] = {}
        self.reads = 0
        self.checks = 0

    def changes(self) -> int | None:
        self.checks += 1
        return self.version

    def reader(
        self, key: str, gate: asyncio.Event | None = None
    ) -> Callable[[], Awaitable[ManifestRow | None]]:
        async def read() -> ManifestRow | None:
            self.reads += 1
            found = self.rows.get(key)
            if gate is not None:
                await gate.wait()
            return found

        return read


async def test_rows_and_misses_are_served_until_a_change() -> None:
    db = Database()
    cache = ManifestCache(db.changes)
    db.rows["a"] = a = row(b"a")
    for _ in range(3):
        assert await cache.get("a", db.reader("a")) == a
        assert await cache.get("b", db.reader("b")) is None
    assert db.reads == 2
    db.rows["a"], db.rows["b"] = a2, b = row(b"a2"), row(b"b")
    db.version = 2
    await asyncio.sleep(0)  # a client learns of a change by a later read of its socket
    assert await cache.get("a", db.reader("a")) == a2
    assert await cache.get("b", db.reader("b")) == b
    assert db.reads == 4


async def test_the_counter_is_read_once_per_loop_iteration() -> None:
    """Requests served in one iteration of the event loop share one read of the counter;
    a change is seen from the next iteration on, which any request that can know of the
    change runs in."""
    db = Database()
    cache = ManifestCache(db.changes)
    db.rows["a"] = a = row(b"a")
    for _ in range(5):
        assert await cache.get("a", db.reader("a")) == a
    assert db.checks == 1
    db.rows["a"] = a2 = row(b"a2")
    db.version = 2
    assert await cache.get("a", db.reader("a")) == a  # the same iteration: not yet
    await asyncio.sleep(0)
    assert await cache.get("a", db.reader("a")) == a2
    assert (db.checks, db.reads) == (2, 2)
    await asyncio.sleep(0)
    assert await cache.get("a", db.reader("a")) == a2
    assert (db.checks, db.reads) == (3, 2)


async def test_an_unknown_counter_caches_nothing() -> None:
    db = Database()
    db.version = None
    cache = ManifestCache(db.changes)
    db.rows["a"] = row(b"a")
    for _ in range(3):
        await cache.get("a", db.reader("a"))
    assert db.reads == 3


async def test_a_row_read_before_a_change_is_not_kept() -> None:
    """A read that started before a commit, and ended after another request saw the
    commit, must not be cached as if it were current."""
    db = Database()
    cache = ManifestCache(db.changes)
    db.rows["tag"] = old = row(b"old")
    gate = asyncio.Event()
    slow = asyncio.create_task(cache.get("tag", db.reader("tag", gate)))
    await asyncio.sleep(0)  # it has read the old row and waits
    db.rows["tag"] = new = row(b"new")
    db.version = 2
    await asyncio.sleep(0)
    assert await cache.get("other", db.reader("other")) is None
    gate.set()
    assert await slow == old  # what it read, for the request that asked before the commit
    assert await cache.get("tag", db.reader("tag")) == new


async def test_bounded_by_bytes_and_rows() -> None:
    db = Database()
    cache = ManifestCache(db.changes, max_bytes=2500, max_rows=3)
    for key in "abcd":
        db.rows[key] = row(key.encode(), 1000)
        await cache.get(key, db.reader(key))
    assert db.reads == 4
    await cache.get("d", db.reader("d"))
    await cache.get("c", db.reader("c"))
    assert db.reads == 4  # the two newest stayed
    await cache.get("a", db.reader("a"))
    assert db.reads == 5  # the oldest went
    for key in "wxyz":
        await cache.get(key, db.reader(key))
    reads = db.reads
    await cache.get("z", db.reader("z"))
    await cache.get("w", db.reader("w"))
    assert db.reads == reads + 1  # misses count as rows: at most 3 kept
