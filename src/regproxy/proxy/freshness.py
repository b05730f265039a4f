"""What the cache knows about an upstream's answers beyond their bodies: its rate limit, and
what it said was not there.

- ``RateLimit``: the last ``RateLimit-Limit`` / ``RateLimit-Remaining`` an upstream sent
  (Docker Hub: ``ratelimit-limit: 100;w=21600``, ``ratelimit-remaining: 0;w=21600``, on HEAD
  too), and until when no request may be sent to it: the window ``w`` after it reported 0
  remaining, or ``Retry-After`` after a 429.
- ``NegativeCache``: upstream 404s remembered for a few seconds, so a client probing for
  something that is not there (kaniko's cache probes) costs one upstream request, not one each.

Both live in the ``Upstream`` object, one per upstream and process, and take the time as an
argument so tests can move it.
"""

from __future__ import annotations

import email.utils
import math
import re
from collections import OrderedDict
from collections.abc import Hashable, Mapping
from dataclasses import dataclass

# A 429 that says nothing about when to come back: wait this long before asking again.
DEFAULT_BACKOFF = 60.0
# The longest pause a header can impose (Docker Hub's window is 6 hours).
MAX_BACKOFF = 24 * 3600.0
_ITEM_RE = re.compile(r"^\s*(\d+)\s*(?:;(.*))?$")
_WINDOW_RE = re.compile(r"(?:^|;)\s*w\s*=\s*(\d+)\s*(?:;|$)")


@dataclass(frozen=True, slots=True)
class Quota:
    """One ``RateLimit-*`` header value: ``100;w=21600`` -> 100 in a window of 21600 s."""

    value: int
    window: float | None


def parse_quota(raw: str | None) -> Quota | None:
    """The first item of a ``RateLimit-Limit``/``-Remaining`` header; None if unusable."""
    if not raw:
        return None
    match = _ITEM_RE.match(raw.split(",")[0])
    if match is None:
        return None
    window = _WINDOW_RE.search(match.group(2) or "")
    return Quota(int(match.group(1)), float(window.group(1)) if window else None)


def parse_retry_after(raw: str | None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` of seconds or an HTTP date; None if unusable."""
    if not raw:
        return None
    raw = raw.strip()
    if raw.isdigit():
        return float(raw)
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)


class RateLimit:
    """An upstream's rate-limit state: what it last reported, and whether we must hold off.

    ``RateLimit-Remaining: 0`` puts manifest, tag and referrer requests on hold for the
    window; blob downloads go on (Docker Hub counts manifest GETs only, and the pull that used
    the last one still needs its layers). A 429 puts every request on hold for its
    ``Retry-After`` (or the window, or ``DEFAULT_BACKOFF``).
    """

    def __init__(self) -> None:
        self.limit: int | None = None
        self.remaining: int | None = None
        self.window: float | None = None
        # Wall-clock times before which nothing (429) / no manifest request (0 left) is sent.
        self.retry_at = 0.0
        self.exhausted_until = 0.0

    @property
    def reset_at(self) -> float:
        """When requests may go upstream again (wall clock); 0 when never held."""
        return max(self.retry_at, self.exhausted_until)

    def observe(self, status: int, headers: Mapping[str, str], now: float) -> bool:
        """Take in one response's headers; True if they carried rate-limit information."""
        limit = parse_quota(headers.get("RateLimit-Limit"))
        remaining = parse_quota(headers.get("RateLimit-Remaining"))
        if limit is not None:
            self.limit = limit.value
            self.window = limit.window or self.window
        if remaining is not None:
            self.remaining = remaining.value
            self.window = remaining.window or self.window
            if remaining.value <= 0:
                wait = self.window or DEFAULT_BACKOFF
                self.exhausted_until = max(self.exhausted_until, now + min(wait, MAX_BACKOFF))
            else:  # a new window began
                self.exhausted_until = 0.0
        if status == 429:
            told = parse_retry_after(headers.get("Retry-After"), now)
            wait = told if told is not None else self.window or DEFAULT_BACKOFF
            self.retry_at = max(self.retry_at, now + min(wait, MAX_BACKOFF))
        return limit is not None or remaining is not None

    def blocked_for(self, now: float, *, blob: bool = False) -> float:
        """Seconds until such a request may go upstream again; 0 when it may now."""
        until = self.retry_at if blob else self.reset_at
        return max(0.0, until - now)

    def retry_after(self, now: float, *, blob: bool = False) -> str:
        """A ``Retry-After`` value for clients we cannot serve while blocked."""
        return str(max(1, math.ceil(self.blocked_for(now, blob=blob))))


class NegativeCache:
    """Keys the upstream answered 404 for, each remembered ``ttl`` seconds (0: off).

    Bounded: past ``max_entries`` the oldest entries go first.
    """

    def __init__(self, ttl: float, max_entries: int = 10_000) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._until: OrderedDict[Hashable, float] = OrderedDict()

    def add(self, key: Hashable, now: float) -> None:
        if self.ttl <= 0:
            return
        self._until.pop(key, None)
        self._until[key] = now + self.ttl
        while len(self._until) > self.max_entries:
            self._until.popitem(last=False)

    def hit(self, key: Hashable, now: float) -> bool:
        until = self._until.get(key)
        if until is None:
            return False
        if now < until:
            return True
        del self._until[key]
        return False

    def discard(self, key: Hashable) -> None:
        self._until.pop(key, None)

    def __len__(self) -> int:
        return len(self._until)
