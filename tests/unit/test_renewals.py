"""The shared schedule of lease renewals: a lease is renewed only while it is still held when
``lock_ttl / 3`` has passed, each lease on its own clock, with no timer of its own."""

from __future__ import annotations

import asyncio
import dataclasses
import time

from idemproxy.observability import Trace
from idemproxy.proxy import _Lease, _Renewals
from tests.unit.test_engine import make_route


class _CountingStore:
    def __init__(self) -> None:
        self.renewed: list[str] = []
        self.one_more = asyncio.Event()

    async def renew(self, key: str, token: str, lock_ttl: float) -> bool:
        self.renewed.append(token)
        self.one_more.set()
        return True


def _lease(token: str, lock_ttl: float) -> _Lease:
    route = dataclasses.replace(make_route(), lock_ttl=lock_ttl)
    trace = Trace("POST", "/orders", time.monotonic())
    return _Lease(route, "k", "fp", token, 60.0, "reject", trace)


def _renewals(store: _CountingStore) -> _Renewals:
    return _Renewals(store)  # type: ignore[arg-type]  # only renew() is called


async def test_a_lease_stopped_before_its_renewal_is_never_renewed() -> None:
    store = _CountingStore()
    renewals = _renewals(store)
    lease = _lease("a", 0.3)
    renewals.start(lease)
    assert renewals.stop(lease) is None
    await asyncio.sleep(0.25)
    assert store.renewed == []


async def _renewed(store: _CountingStore, count: int) -> list[str]:
    """The tokens renewed, once there are ``count`` of them (no timing asserted)."""
    async with asyncio.timeout(10):
        while len(store.renewed) < count:
            store.one_more.clear()
            await store.one_more.wait()
    return store.renewed


async def test_only_the_leases_still_held_are_renewed() -> None:
    store = _CountingStore()
    renewals = _renewals(store)
    short, long_, later = _lease("short", 0.3), _lease("long", 0.3), _lease("later", 0.3)
    renewals.start(short)
    renewals.start(long_)
    await asyncio.sleep(0.02)
    renewals.start(later)  # falls due after the others: the timer is armed again for it
    assert renewals.stop(short) is None
    assert await _renewed(store, 2) == ["long", "later"]
    for lease in (long_, later):
        renewing = renewals.stop(lease)
        assert renewing is not None
        await asyncio.gather(renewing, return_exceptions=True)
        assert renewing.cancelled()
    assert "short" not in store.renewed


async def test_leases_of_different_lock_ttls_keep_their_own_clocks() -> None:
    store = _CountingStore()
    renewals = _renewals(store)
    slow, quick = _lease("slow", 60.0), _lease("quick", 0.15)
    renewals.start(slow)
    renewals.start(quick)
    assert await _renewed(store, 1) == ["quick"]
    renewing = renewals.stop(quick)
    assert renewing is not None
    await asyncio.gather(renewing, return_exceptions=True)
    assert renewals.stop(slow) is None  # not due for 20 s: never renewed
