"""Leases (regproxy.cluster) on every backend: one owner per key, compare-and-set takeover of
an expired lease only, renewals and releases by the owner only, and many stores racing."""

from __future__ import annotations

import asyncio

from regproxy.meta.base import LeaseRow, MetadataStore
from tests.meta.conftest import OpenStore

KEY = "blob:sha256:" + "ab" * 32


def lease(owner: str, now: float, ttl: float = 60.0, key: str = KEY) -> LeaseRow:
    return LeaseRow(key, owner, f"host-{owner}", f"http://{owner}", "", None, now, now + ttl)


async def test_acquire_once_then_the_holder_is_returned(store: MetadataStore) -> None:
    now = 1000.0
    assert await store.acquire_lease(lease("a", now), now) == lease("a", now)
    assert await store.acquire_lease(lease("b", now + 1), now + 1) == lease("a", now)
    assert await store.get_lease(KEY) == lease("a", now)
    assert await store.get_lease("blob:other") is None


async def test_an_expired_lease_is_taken_over_and_the_old_owner_loses_it(
    store: MetadataStore,
) -> None:
    await store.acquire_lease(lease("a", 1000.0, ttl=10), 1000.0)
    assert await store.acquire_lease(lease("b", 1009.0), 1009.0) == lease("a", 1000.0, ttl=10)
    taken = await store.acquire_lease(lease("b", 1011.0), 1011.0)
    assert taken == lease("b", 1011.0)
    # The old owner can neither renew nor release it any more.
    assert not await store.renew_lease(KEY, "a", 2000.0)
    assert not await store.release_lease(KEY, "a")
    assert await store.get_lease(KEY) == taken


async def test_renew_records_spool_and_size(store: MetadataStore) -> None:
    await store.acquire_lease(lease("a", 1000.0), 1000.0)
    assert await store.renew_lease(KEY, "a", 1100.0, spool="/s/x.spool", size=5 << 32)
    got = await store.get_lease(KEY)
    assert got is not None
    assert (got.expires, got.spool, got.size) == (1100.0, "/s/x.spool", 5 << 32)
    # A plain renewal keeps what was recorded.
    assert await store.renew_lease(KEY, "a", 1200.0)
    got = await store.get_lease(KEY)
    assert got is not None
    assert (got.expires, got.spool, got.size) == (1200.0, "/s/x.spool", 5 << 32)
    assert await store.release_lease(KEY, "a")
    assert await store.get_lease(KEY) is None
    assert not await store.renew_lease(KEY, "a", 1300.0)


async def test_racing_stores_give_one_owner(open_store: OpenStore) -> None:
    stores = [await open_store() for _ in range(3)]
    now = 1000.0
    attempts = [stores[n % 3].acquire_lease(lease(f"o{n}", now), now) for n in range(12)]
    results = await asyncio.gather(*attempts)
    owners = {row.owner for row in results}
    assert len(owners) == 1
    winner = owners.pop()
    assert await stores[1].get_lease(KEY) == lease(winner, now)


# -- failed logins (counted across replicas) ---------------------------------------------------


async def test_login_failures_count_in_a_window_across_stores(open_store: OpenStore) -> None:
    one, two = await open_store(), await open_store()
    assert await one.add_login_failure("10.0.0.1/u", 1000.0, 60.0) == 1
    assert await two.add_login_failure("10.0.0.1/u", 1010.0, 60.0) == 2
    assert await one.add_login_failure("10.0.0.1", 1010.0, 60.0) == 1
    got = await two.login_failures(["10.0.0.1/u", "10.0.0.1", "other"], 1020.0, 60.0)
    assert got == {"10.0.0.1/u": (1000.0, 2), "10.0.0.1": (1010.0, 1)}
    # The window of the first key ends at 1060: a failure then starts a new one, and the
    # ended windows are pruned.
    assert await one.login_failures(["10.0.0.1/u"], 1060.0, 60.0) == {}
    assert await two.add_login_failure("10.0.0.1/u", 1061.0, 60.0) == 1
    await one.clear_login_failures("10.0.0.1/u")
    assert await two.login_failures(["10.0.0.1/u", "10.0.0.1"], 1062.0, 60.0) == {
        "10.0.0.1": (1010.0, 1)
    }
    assert await one.login_failures([], 1062.0, 60.0) == {}
