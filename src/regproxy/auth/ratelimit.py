"""Failed logins, limited per client address and user, in bounded memory.

After ``max_failures`` failed logins for one (address, user) within ``window`` seconds, that
pair is locked out until the window ends, right password or not; one address gets
``address_factor`` times as many failures across all users before it is locked out as a whole.
The tables keep the most recently active ``max_entries`` keys; older ones are forgotten.
``SharedLoginLimiter`` counts the same in the metadata store, for every replica.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass
class _Window:
    started: float
    failures: int


class LoginLimiter:
    def __init__(
        self,
        max_failures: int = 5,
        window: float = 60.0,
        *,
        address_factor: int = 4,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_failures = max_failures
        self.window = window
        self.address_limit = max_failures * address_factor
        self.max_entries = max_entries
        self._clock = clock
        self._windows: OrderedDict[tuple[str, str | None], _Window] = OrderedDict()

    def __len__(self) -> int:
        return len(self._windows)

    def _current(self, key: tuple[str, str | None], now: float) -> _Window | None:
        entry = self._windows.get(key)
        if entry is not None and now - entry.started >= self.window:
            del self._windows[key]
            return None
        return entry

    def retry_after(self, address: str, user: str) -> float:
        """Seconds until ``user`` may try again from ``address``; 0 if it may now."""
        now = self._clock()
        wait = 0.0
        for key, limit in (
            ((address, user), self.max_failures),
            ((address, None), self.address_limit),
        ):
            entry = self._current(key, now)
            if entry is not None and entry.failures >= limit:
                wait = max(wait, entry.started + self.window - now)
        return wait

    def failed(self, address: str, user: str) -> None:
        now = self._clock()
        for key in ((address, user), (address, None)):
            entry = self._current(key, now)
            if entry is None:
                entry = self._windows[key] = _Window(now, 0)
            entry.failures += 1
            self._windows.move_to_end(key)
        while len(self._windows) > self.max_entries:
            self._windows.popitem(last=False)

    def succeeded(self, address: str, user: str) -> None:
        self._windows.pop((address, user), None)


class SharedLoginLimiter:
    """The same limits, counted in the metadata store, so a failure on one replica (or
    worker) counts on all. A login costs one read; only failures write (two upserts, which
    also prune the windows that ended), and a success after failures one delete. Windows
    run on the wall clock, which the replicas share."""

    def __init__(
        self,
        meta: LoginFailureStore,
        max_failures: int = 5,
        window: float = 60.0,
        *,
        address_factor: int = 4,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.meta = meta
        self.max_failures = max_failures
        self.window = window
        self.address_limit = max_failures * address_factor
        self._clock = clock

    @staticmethod
    def _keys(address: str, user: str) -> tuple[str, str]:
        # The name as typed may be anything (a password in the wrong field): only a digest.
        named = hashlib.sha256(user.encode("utf-8", "replace")).hexdigest()[:32]
        return f"{address}/{named}", address

    async def retry_after(self, address: str, user: str) -> float:
        pair, whole = self._keys(address, user)
        now = self._clock()
        found = await self.meta.login_failures([pair, whole], now, self.window)
        wait = 0.0
        for key, limit in ((pair, self.max_failures), (whole, self.address_limit)):
            if key in found and found[key][1] >= limit:
                wait = max(wait, found[key][0] + self.window - now)
        return wait

    async def failed(self, address: str, user: str) -> None:
        now = self._clock()
        for key in self._keys(address, user):
            await self.meta.add_login_failure(key, now, self.window)

    async def succeeded(self, address: str, user: str) -> None:
        pair, _ = self._keys(address, user)
        if await self.meta.login_failures([pair], self._clock(), self.window):
            await self.meta.clear_login_failures(pair)


class LoginFailureStore(Protocol):
    """The part of the MetadataStore the shared limiter uses."""

    async def add_login_failure(self, key: str, now: float, window: float) -> int: ...

    async def login_failures(
        self, keys: Sequence[str], now: float, window: float
    ) -> dict[str, tuple[float, int]]: ...

    async def clear_login_failures(self, key: str) -> None: ...
