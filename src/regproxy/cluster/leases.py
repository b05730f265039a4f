"""Leases: work the whole cluster does once at a time, recorded in the metadata store.

A process acquires the lease of a key (``blob:<digest>`` for a fill, ``tag:<repo>:<tag>``
for a revalidation) by inserting its row, or by taking over a row whose ``expires`` has
passed (compare-and-set in the store). The owner renews it every ``ttl / 3`` while it works
and deletes it when done, after the work's result is committed. An owner that dies stops
renewing; once the lease expires, another process may take the work over.

Expiry is compared with each process's wall clock: replicas' clocks must agree to well
within ``ttl`` (NTP does).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from contextlib import suppress
from pathlib import Path

from regproxy.errors import Unavailable
from regproxy.meta.base import LeaseRow, MetadataStore

log = logging.getLogger(__name__)

# Seconds between attempts to release a lease while the metadata store is unreachable.
RELEASE_RETRY = 1.0
_IDENTITY_FILES = ("/etc/machine-id", "/proc/sys/kernel/random/boot_id")


def host_id(node: str) -> str:
    """This machine, for the leases: ``cluster.node`` if set, else its machine id and boot
    id (a container shares the host's boot id, and has its own machine id or none)."""
    if node:
        return node
    parts = []
    for name in _IDENTITY_FILES:
        with suppress(OSError):
            parts.append(Path(name).read_text().strip())
    return "-".join(filter(None, parts)) or socket.gethostname()


def blob_key(digest: object) -> str:
    return f"blob:{digest}"


def tag_key(repo: str, tag: str) -> str:
    return f"tag:{repo}:{tag}"


class Leases:
    """This process's side of the lease table: one owner id, its host and URL."""

    def __init__(self, meta: MetadataStore, *, host: str, url: str, ttl: float) -> None:
        self.meta = meta
        # The pid first, for people (and tests) looking at the table.
        self.owner = f"{os.getpid()}-{uuid.uuid4().hex[:16]}"
        self.host = host
        self.url = url
        self.ttl = ttl
        self._retries: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        for task in self._retries:
            task.cancel()
        await asyncio.gather(*self._retries, return_exceptions=True)

    def mine(self, row: LeaseRow) -> bool:
        return row.owner == self.owner

    @staticmethod
    def expired(row: LeaseRow) -> bool:
        return row.expires < time.time()

    async def acquire(self, key: str, ttl: float | None = None) -> LeaseRow:
        """The key's lease after trying to take it: ours (``mine``) or its live owner's."""
        now = time.time()
        row = LeaseRow(key, self.owner, self.host, self.url, "", None, now, now + (ttl or self.ttl))
        return await self.meta.acquire_lease(row, now)

    async def get(self, key: str) -> LeaseRow | None:
        return await self.meta.get_lease(key)

    async def release(self, key: str) -> None:
        """Give the lease up. If the store is unreachable, try again in the background
        until the lease would have expired anyway (others wait for it no longer then)."""
        try:
            await self.meta.release_lease(key, self.owner)
        except Unavailable:
            log.warning("could not release the lease %s; trying again", key)
            task = asyncio.create_task(self._release_later(key, time.time() + self.ttl))
            self._retries.add(task)
            task.add_done_callback(self._retries.discard)

    async def _release_later(self, key: str, until: float) -> None:
        while time.time() < until:
            await asyncio.sleep(RELEASE_RETRY)
            with suppress(Unavailable):
                await self.meta.release_lease(key, self.owner)
                return

    def hold(self, key: str) -> Held:
        return Held(self, key)


class Held:
    """A lease this process owns, renewed in the background until ``release``."""

    def __init__(self, leases: Leases, key: str) -> None:
        self.leases = leases
        self.key = key
        self.lost = False
        self._task = asyncio.create_task(self._renew())
        self._notes: set[asyncio.Task[None]] = set()

    async def _renew(self) -> None:
        leases = self.leases
        while True:
            await asyncio.sleep(leases.ttl / 3)
            await self._extend("", None)
            if self.lost:
                return

    async def _extend(self, spool: str, size: int | None) -> None:
        leases = self.leases
        try:
            kept = await leases.meta.renew_lease(
                self.key, leases.owner, time.time() + leases.ttl, spool=spool, size=size
            )
        except Unavailable:
            log.warning("could not renew the lease %s; trying again", self.key)
            return
        if not kept and not self.lost:
            self.lost = True
            log.warning("lost the lease %s to another process (it expired)", self.key)

    def note(self, spool: str, size: int | None) -> None:
        """Record where the work can be followed (the spool) and the blob's size."""
        task = asyncio.create_task(self._extend(spool, size))
        self._notes.add(task)
        task.add_done_callback(self._notes.discard)

    async def release(self) -> None:
        self._task.cancel()
        with suppress(asyncio.CancelledError):
            await self._task
        for task in list(self._notes):
            with suppress(Exception):
                await task
        if not self.lost:
            await self.leases.release(self.key)
