"""An in-process cache of manifest reads, dropped whenever the database changes.

Every manifest GET and HEAD, of every pull and every cache probe, reads one manifest row by
tag or by digest. Most of that cost is the trip to the database thread, not the query, so a
process keeps the rows it read, and serves them again for as long as the database provably
has not changed since: ``changes()`` is a counter the backend reads without that trip
(SQLite's ``PRAGMA data_version``, which moves on every commit of any other connection, in
this process or another). Any change at all, a tag moved, a manifest deleted, even an upload
recorded, drops the whole cache: coarse, but never stale.

The counter is read at most once per iteration of the event loop: under load one iteration
serves dozens of requests, and each read would cost more than the cache hit it guards. That
is still never stale for a client. Whatever a request can know of a commit (the answer to
its own PUT, or to another client's, sent by this process or another) came over a socket,
so the request was read from its socket after the commit. Reading a socket and running the
handler it wakes are queued callbacks, queued behind the one that ends the current read of
the counter (``_expire``, queued as the counter is read); so that handler reads it anew.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable

from regproxy.meta.base import ManifestRow

Changes = Callable[[], int | None]  # the database's change counter; None: unknown


class ManifestCache:
    def __init__(self, changes: Changes, max_bytes: int = 16 << 20, max_rows: int = 4096) -> None:
        self._changes = changes
        self._max_bytes = max_bytes
        self._max_rows = max_rows
        self._rows: OrderedDict[Hashable, ManifestRow | None] = OrderedDict()
        self._bytes = 0
        self._seen: int | None = None  # the counter the cached rows were read at
        self._fresh = False  # ``_seen`` was read in this iteration of the event loop

    async def get(
        self, key: Hashable, read: Callable[[], Awaitable[ManifestRow | None]]
    ) -> ManifestRow | None:
        """The row ``read()`` returns, from the cache while the database is unchanged."""
        seen = self._current()
        if seen is not None and key in self._rows:
            self._rows.move_to_end(key)
            return self._rows[key]
        row = await read()
        # Keep it only if no change was seen meanwhile: a row read before a commit must
        # not outlive the check that saw the commit. (A row read after one is merely
        # dropped early.)
        if seen is not None and self._seen == seen:
            self._put(key, row)
        return row

    def _current(self) -> int | None:
        if self._fresh:
            return self._seen
        changes = self._changes()
        if changes is not None:
            self._fresh = True
            asyncio.get_running_loop().call_soon(self._expire)
        if changes is None or changes != self._seen:
            self._rows.clear()
            self._bytes = 0
            self._seen = changes
        return changes

    def _expire(self) -> None:
        self._fresh = False

    def _put(self, key: Hashable, row: ManifestRow | None) -> None:
        size = len(row.content) if row is not None else 0
        if size > self._max_bytes:
            return
        self._drop(key)  # two requests may have read it at once
        self._rows[key] = row
        self._bytes += size
        while self._bytes > self._max_bytes or len(self._rows) > self._max_rows:
            self._drop(next(iter(self._rows)))

    def _drop(self, key: Hashable) -> None:
        if key in self._rows:
            row = self._rows.pop(key)
            self._bytes -= len(row.content) if row is not None else 0
