"""GCRA arithmetic (gateway.ratelimit.gcra) and the memory store on an injected clock: exact values."""

from __future__ import annotations

import math

import pytest

from gateway.ratelimit import gcra
from gateway.ratelimit.memory import MemoryLimitStore
from gateway.ratelimit.store import Charge, Tier


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def step(name: str, tier: Tier, amount: int) -> gcra.Step:
    return gcra.Step(name, tier.interval, tier.capacity, amount)


# -- pure functions -------------------------------------------------------------------------------


def test_tier_shape() -> None:
    tier = Tier("t", 10, 60.0)
    assert (tier.capacity, tier.interval) == (10, 6.0)
    assert Tier("t", 10, 60.0, burst=3).capacity == 3
    assert Tier("limit#0", 1, 1).interval == 1.0  # ids like "<limit>#<n>" are fine


def test_drained() -> None:
    assert gcra.drained(5.0, 100.0, 100.0, 2.0) == 5.0
    assert gcra.drained(5.0, 100.0, 104.0, 2.0) == 3.0
    assert gcra.drained(5.0, 100.0, 200.0, 2.0) == 0.0  # never below empty
    assert gcra.drained(5.0, 100.0, 90.0, 2.0) == 5.0  # a clock going backwards fills nothing
    assert gcra.drained(1e-12, 100.0, 100.0, 2.0) == 0.0  # float dust is empty


def test_used_and_remaining_round_toward_the_limit() -> None:
    assert (gcra.used(0.0), gcra.remaining(0.0, 10)) == (0, 10)
    assert (gcra.used(4.2), gcra.remaining(4.2, 10)) == (5, 5)  # a partly drained unit counts
    assert (gcra.used(10.0), gcra.remaining(10.0, 10)) == (10, 0)
    assert (gcra.used(7.000000000000001), gcra.remaining(7.000000000000001, 10)) == (7, 3)


def test_refunded() -> None:
    assert gcra.refunded(5.0, 2) == 3.0
    assert gcra.refunded(5.0, 9) == 0.0


def test_plan_allows_and_reports_per_step() -> None:
    tier = Tier("t", 10, 10.0)
    result = gcra.plan([step("a", tier, 4), step("b", tier, 10)], lambda s: 0.0)
    assert result.allowed
    assert result.levels == {"a": 4.0, "b": 10.0}
    assert result.ttls == {"a": 4.0, "b": 10.0}
    assert [(r.remaining, r.reset_after) for r in result.results] == [(6, 4.0), (0, 10.0)]


def test_plan_denial_values() -> None:
    tier = Tier("t", 10, 10.0)  # 1 s per unit
    result = gcra.plan([step("a", tier, 3)], lambda s: 8.5)
    assert not result.allowed and result.denial is not None
    d = result.denial
    assert (d.index, d.measured, d.capacity, d.never) == (0, 12, 10, False)
    assert d.retry_after == pytest.approx(1.5)
    assert d.reset_after == pytest.approx(8.5)
    assert result.levels == {}  # nothing to write


def test_plan_same_bucket_twice_accumulates() -> None:
    tier = Tier("t", 10, 10.0)
    asked: list[str] = []

    def level_of(s: gcra.Step) -> float:
        asked.append(s.name)
        return 2.0

    result = gcra.plan([step("a", tier, 3), step("a", tier, 4)], level_of)
    assert asked == ["a"]  # read once
    assert result.levels == {"a": 9.0}
    assert [r.remaining for r in result.results] == [5, 1]
    denied = gcra.plan([step("a", tier, 5), step("a", tier, 6)], lambda s: 0.0)
    assert denied.denial is not None
    assert (denied.denial.index, denied.denial.never) == (1, True)  # 11 > 10 in one request
    assert denied.denial.reset_after == 0.0  # the stored state, before the request


def test_plan_retry_is_the_longest_wait() -> None:
    fast, slow = Tier("f", 10, 10.0), Tier("s", 1, 100.0)
    result = gcra.plan(
        [step("a", fast, 1), step("b", fast, 2), step("c", slow, 1)],
        lambda s: {"a": 0.0, "b": 9.5, "c": 0.5}[s.name],
    )
    assert result.denial is not None
    assert result.denial.index == 1
    assert result.denial.retry_after == pytest.approx(50.0)  # c waits 50 s, b only 1.5 s


def test_plan_never_means_infinite_retry() -> None:
    tier = Tier("t", 5, 5.0)
    result = gcra.plan([step("a", tier, 6)], lambda s: 0.0)
    assert result.denial is not None
    assert result.denial.never and result.denial.retry_after == math.inf
    assert result.denial.measured == 6


# -- the memory store on a fake clock -------------------------------------------------------------


async def test_exact_refill_on_a_fake_clock() -> None:
    clock = FakeClock()
    store = MemoryLimitStore(clock=clock)
    tier = Tier("t", 10, 1.0)  # 0.1 s per unit
    assert (await store.acquire([Charge("k", tier, 10)])).allowed
    d = await store.acquire([Charge("k", tier, 3)])
    assert not d.allowed
    assert d.retry_after == pytest.approx(0.3)
    assert d.reset_after == pytest.approx(1.0)
    clock.advance(0.3)  # 0.3 / 0.1 is 2.9999999999999996 in floats: still exactly 3 units back
    ok = await store.acquire([Charge("k", tier, 3)])
    assert ok.allowed and ok.remaining[0].remaining == 0
    assert not (await store.acquire([Charge("k", tier, 1)])).allowed
    clock.advance(0.05)  # half a unit back: not enough for one
    [u] = await store.usage("k", [tier])
    assert (u.used, u.remaining) == (10, 0)
    assert u.reset_after == pytest.approx(0.95)
    clock.advance(0.95)
    [u] = await store.usage("k", [tier])
    assert (u.used, u.remaining, u.reset_after) == (0, 10, 0.0)


async def test_sustained_rate_on_a_fake_clock() -> None:
    clock = FakeClock()
    store = MemoryLimitStore(clock=clock)
    tier = Tier("t", 60, 60.0, burst=5)  # 1/s, 5 at once
    admitted = 0
    for _ in range(600):  # 10 requests per second for 60 s
        if (await store.acquire([Charge("k", tier, 1)])).allowed:
            admitted += 1
        clock.advance(0.1)
    assert admitted == 5 + 60 - 1  # the burst, then one per second (the last second not yet due)


async def test_distinct_window_on_a_fake_clock() -> None:
    clock = FakeClock()
    store = MemoryLimitStore(clock=clock)
    await store.distinct("k", ["a"], 10.0)
    clock.advance(5.0)
    await store.distinct("k", ["b"], 10.0)
    clock.advance(5.0)  # "a" is exactly 10 s old: out of the window
    assert (await store.distinct("k", [], 10.0)).count_after == 1
    clock.advance(4.999)
    assert (await store.distinct("k", [], 10.0)).count_after == 1
    clock.advance(0.001)
    assert (await store.distinct("k", [], 10.0)).count_after == 0
    assert len(store) == 0


async def test_counter_and_flag_on_a_fake_clock() -> None:
    clock = FakeClock()
    store = MemoryLimitStore(clock=clock)
    assert await store.incr("k", 2, 10.0) == 2
    clock.advance(9.0)
    assert await store.incr("k", 2, 10.0) == 4  # the window runs from the first increment
    clock.advance(1.0)
    assert await store.get("k") == 0
    await store.set_flag("k", 3.0)
    clock.advance(1.0)
    assert await store.get_flag("k") == pytest.approx(2.0)
    clock.advance(2.0)
    assert await store.get_flag("k") is None
