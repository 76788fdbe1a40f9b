"""MemoryLimitStore's bookkeeping: expired entries are swept and the size cap holds."""

from __future__ import annotations

import pytest

from gateway.ratelimit.memory import MemoryLimitStore
from gateway.ratelimit.store import Charge, Tier
from tests.unit.ratelimit.test_gcra import FakeClock


async def test_expired_entries_are_swept_without_being_touched() -> None:
    clock = FakeClock()
    store = MemoryLimitStore(clock=clock)
    tier = Tier("t", 10, 10.0)
    for i in range(100):
        await store.acquire([Charge(f"k{i}", tier, 1)])  # each bucket empties in 1 s
        await store.incr(f"k{i}", 1, 5.0)
    assert len(store) == 200
    clock.advance(1.5)
    for _ in range(3):
        await store.get("other")  # any call sweeps a little
    assert len(store) == 100  # the buckets are gone, the counters remain
    clock.advance(5.0)
    for _ in range(3):
        await store.get("other")
    assert len(store) == 0


async def test_size_cap_evicts_what_expires_soonest() -> None:
    clock = FakeClock()
    store = MemoryLimitStore(clock=clock, max_keys=10)
    await store.set_flag("keep", 1000.0)
    for i in range(50):
        await store.set_flag(f"f{i}", 10.0 + i)
    assert len(store) == 10
    assert store.evicted == 41
    assert await store.get_flag("keep") is not None  # the longest-lived survive
    assert await store.get_flag("f49") is not None
    assert await store.get_flag("f0") is None


async def test_prolonged_entries_are_not_swept_early() -> None:
    clock = FakeClock()
    store = MemoryLimitStore(clock=clock)
    tier = Tier("t", 10, 10.0)
    await store.acquire([Charge("k", tier, 1)])  # empty again in 1 s
    clock.advance(0.9)
    await store.acquire([Charge("k", tier, 5)])  # now 5.1 units: 5.1 s
    clock.advance(0.5)
    await store.get("other")
    [u] = await store.usage("k", [tier])
    assert u.used == 5 and u.reset_after == pytest.approx(4.6)


async def test_heap_stays_bounded_under_churn() -> None:
    clock = FakeClock()
    store = MemoryLimitStore(clock=clock, max_keys=100)
    tier = Tier("t", 1_000_000, 1.0)
    for i in range(20_000):
        await store.acquire([Charge(f"k{i % 300}", tier, 1)])
        if i % 7 == 0:
            await store.reset(f"k{i % 300}")
        clock.advance(0.000_01)
    assert len(store) <= 100
    assert len(store._heap) <= 2 * len(store) + 1024


def test_max_keys_must_be_positive() -> None:
    with pytest.raises(ValueError):
        MemoryLimitStore(max_keys=0)
