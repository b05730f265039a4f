"""Failed logins, limited per client address and user, in bounded memory.

After ``max_failures`` failed logins for one (address, user) within ``window`` seconds, that
pair is locked out until the window ends, right password or not; one address gets
``address_factor`` times as many failures across all users before it is locked out as a whole.
The tables keep the most recently active ``max_entries`` keys; older ones are forgotten.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


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
