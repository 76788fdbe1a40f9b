"""Contract of the limit stores: MemoryLimitStore and RedisLimitStore behave identically.

Every test taking ``limit_store`` runs on the memory store and, when MAILWARD_TEST_REDIS_URL is set,
on a real Redis (tests/fixtures/limits.py). Times are real: refill and expiry tests use sub-second
periods and sleeps, and compare with tolerances, never exact timings. The unreachable-Redis tests
need no Redis (a closed port, a silent server) and always run.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable

import pytest

from gateway.core.errors import StoreUnavailable
from gateway.ratelimit import open_limit_store
from gateway.ratelimit.memory import MemoryLimitStore
from gateway.ratelimit.redis_store import RedisLimitStore
from gateway.ratelimit.store import (
    Charge,
    DistinctCharge,
    LimitStore,
    LimitStoreUnavailable,
    Tier,
    hash_member,
)
from tests.fixtures.limits import UNREACHABLE_REDIS_URL, redis_server_url, silent_server

HOUR = 3600.0


def one(key: str, tier: Tier, amount: int = 1) -> list[Charge]:
    return [Charge(key, tier, amount)]


# -- GCRA -----------------------------------------------------------------------------------------


async def test_burst_then_deny(limit_store: LimitStore) -> None:
    tier = Tier("msgs", 5, 60.0)
    for left in (4, 3, 2, 1, 0):
        d = await limit_store.acquire(one("login:a", tier))
        assert d.allowed
        assert [r.remaining for r in d.remaining] == [left]
        assert d.remaining[0].key == "login:a" and d.remaining[0].tier_id == "msgs"
    d = await limit_store.acquire(one("login:a", tier))
    assert not d.allowed and not d.never
    assert (d.key, d.tier_id, d.index) == ("login:a", "msgs", 0)
    assert (d.measured, d.limit) == (6, 5)
    assert d.retry_after == pytest.approx(12.0, abs=0.5)  # one unit refills every 60/5 s
    assert d.reset_after == pytest.approx(60.0, abs=0.5)
    assert d.measured > d.limit


async def test_burst_caps_what_an_empty_bucket_admits(limit_store: LimitStore) -> None:
    tier = Tier("msgs", 60, 60.0, burst=3)  # 1/s sustained, 3 at once
    for _ in range(3):
        assert (await limit_store.acquire(one("k", tier))).allowed
    d = await limit_store.acquire(one("k", tier))
    assert not d.allowed
    assert (d.measured, d.limit) == (4, 3)
    assert d.retry_after == pytest.approx(1.0, abs=0.2)
    assert d.reset_after == pytest.approx(3.0, abs=0.2)


async def test_refill_over_time(limit_store: LimitStore) -> None:
    tier = Tier("fast", 20, 0.5)  # one unit every 25 ms
    assert (await limit_store.acquire(one("k", tier, 20))).allowed
    denied = await limit_store.acquire(one("k", tier, 4))
    assert not denied.allowed
    assert denied.retry_after == pytest.approx(0.1, abs=0.05)
    await asyncio.sleep(denied.retry_after + 0.03)
    assert (await limit_store.acquire(one("k", tier, 4))).allowed
    assert not (await limit_store.acquire(one("k", tier, 4))).allowed
    [usage] = await limit_store.usage("k", [tier])
    await asyncio.sleep(usage.reset_after + 0.03)
    [usage] = await limit_store.usage("k", [tier])
    assert (usage.used, usage.remaining) == (0, 20)
    assert (await limit_store.acquire(one("k", tier, 20))).allowed


async def test_multi_tier_denial_charges_no_tier(limit_store: LimitStore) -> None:
    minute, day = Tier("per-min", 100, 60.0), Tier("per-day", 2, 86400.0)
    both = [Charge("login:a", minute, 1), Charge("login:a", day, 1)]
    assert (await limit_store.acquire(both)).allowed
    assert (await limit_store.acquire(both)).allowed
    d = await limit_store.acquire(both)
    assert not d.allowed
    assert (d.tier_id, d.index, d.measured, d.limit) == ("per-day", 1, 3, 2)
    usage = await limit_store.usage("login:a", [minute, day])
    assert [u.used for u in usage] == [2, 2]  # the denied request left the minute tier alone
    assert [u.remaining for u in usage] == [98, 0]


async def test_multiple_keys_in_one_acquire(limit_store: LimitStore) -> None:
    tier, tight = Tier("t", 10, HOUR), Tier("t", 1, HOUR)
    request = [
        Charge("login:a", tier, 1),
        Charge("ip:192.0.2.0/24", tight, 1),
        Charge("domain:example.com", tier, 1),
    ]
    ok = await limit_store.acquire(request)
    assert ok.allowed
    assert [(r.key, r.remaining) for r in ok.remaining] == [
        ("login:a", 9),
        ("ip:192.0.2.0/24", 0),
        ("domain:example.com", 9),
    ]
    d = await limit_store.acquire(request)
    assert not d.allowed and (d.key, d.index) == ("ip:192.0.2.0/24", 1)
    for key in ("login:a", "domain:example.com"):
        [u] = await limit_store.usage(key, [tier])
        assert u.used == 1, key
    assert (await limit_store.acquire([request[0], request[2]])).allowed


async def test_dry_run_charges_nothing(limit_store: LimitStore) -> None:
    tier = Tier("t", 3, HOUR)
    for _ in range(5):
        peek = await limit_store.acquire(one("k", tier, 3), dry_run=True)
        assert peek.allowed and peek.remaining[0].remaining == 0
    [u] = await limit_store.usage("k", [tier])
    assert (u.used, u.remaining, u.reset_after) == (0, 3, 0.0)
    assert (await limit_store.acquire(one("k", tier, 2))).allowed
    peek = await limit_store.acquire(one("k", tier, 2), dry_run=True)
    assert not peek.allowed and (peek.measured, peek.limit) == (4, 3)
    [u] = await limit_store.usage("k", [tier])
    assert u.used == 2


async def test_refund_gives_back_never_below_empty(limit_store: LimitStore) -> None:
    tier, other = Tier("t", 5, HOUR), Tier("o", 5, HOUR)
    assert (await limit_store.acquire([Charge("k", tier, 5), Charge("k", other, 1)])).allowed
    await limit_store.refund(one("k", tier, 3))
    [u, v] = await limit_store.usage("k", [tier, other])
    assert (u.used, u.remaining) == (2, 3)
    assert v.used == 1  # only what was refunded moved
    await limit_store.refund(one("k", tier, 10))
    [u] = await limit_store.usage("k", [tier])
    assert (u.used, u.remaining, u.reset_after) == (0, 5, 0.0)
    assert (await limit_store.acquire(one("k", tier, 5))).allowed
    await limit_store.refund(one("never-charged", tier, 2))  # nothing to give back: no effect
    [u] = await limit_store.usage("never-charged", [tier])
    assert u.used == 0


async def test_amount_beyond_capacity_is_never_allowed(limit_store: LimitStore) -> None:
    tier = Tier("t", 5, HOUR)
    d = await limit_store.acquire(one("k", tier, 6))
    assert not d.allowed and d.never
    assert d.retry_after == math.inf and (d.measured, d.limit) == (6, 5)
    # a request whose charges on one bucket add up beyond the capacity can never fit either
    d = await limit_store.acquire([Charge("k", tier, 3), Charge("k", tier, 3)])
    assert not d.allowed and d.never and d.index == 1
    burst = Tier("b", 100, HOUR, burst=10)
    d = await limit_store.acquire(one("k", burst, 11))
    assert d.never and d.limit == 10
    [u] = await limit_store.usage("k", [tier])
    assert u.used == 0


async def test_decision_values(limit_store: LimitStore) -> None:
    tier = Tier("t", 4, 40.0)  # one unit every 10 s
    ok = await limit_store.acquire(one("k", tier, 3))
    assert ok.allowed
    assert ok.remaining[0].remaining == 1
    assert ok.remaining[0].reset_after == pytest.approx(30.0, abs=0.5)
    d = await limit_store.acquire(one("k", tier, 2))
    assert not d.allowed
    assert (d.measured, d.limit, d.never) == (5, 4, False)
    assert d.retry_after == pytest.approx(10.0, abs=0.5)
    assert d.reset_after == pytest.approx(30.0, abs=0.5)
    # the request waits for its slowest charge; the first denying charge is named
    slow = Tier("slow", 1, 100.0)
    assert (await limit_store.acquire(one("k2", slow))).allowed
    d = await limit_store.acquire([Charge("k", tier, 2), Charge("k2", slow, 1)])
    assert not d.allowed and d.tier_id == "t"
    assert d.retry_after == pytest.approx(100.0, abs=0.5)


async def test_empty_and_zero_charges(limit_store: LimitStore) -> None:
    assert (await limit_store.acquire([])).allowed
    tier = Tier("t", 2, HOUR)
    d = await limit_store.acquire(one("k", tier, 0))
    assert d.allowed and d.remaining[0].remaining == 2
    assert await limit_store.inspect() == {}  # type: ignore[attr-defined]


async def test_usage_and_reset(limit_store: LimitStore) -> None:
    a, b = Tier("a", 10, HOUR), Tier("b", 100, 60.0)
    [ua, ub] = await limit_store.usage("login:alice", [a, b])
    assert (ua.tier_id, ua.used, ua.limit, ua.remaining, ua.reset_after) == ("a", 0, 10, 10, 0.0)
    assert (
        await limit_store.acquire([Charge("login:alice", a, 4), Charge("login:alice", b, 4)])
    ).allowed
    assert (await limit_store.acquire(one("login:bob", a, 1))).allowed
    await limit_store.distinct("login:alice", ["x@example.net"], 60.0)
    await limit_store.incr("login:alice", 1, 60.0)
    await limit_store.set_flag("login:alice", 60.0)
    [ua, ub] = await limit_store.usage("login:alice", [a, b])
    assert (ua.used, ua.remaining) == (4, 6)
    assert ua.reset_after == pytest.approx(4 * 360.0, abs=1.0)
    assert (ub.used, ub.remaining) == (4, 96)
    assert ub.reset_after == pytest.approx(2.4, abs=0.5)

    assert await limit_store.reset("login:nobody") == 0
    assert await limit_store.reset("login:alice") == 5  # two buckets, distinct, counter, flag
    [ua, ub] = await limit_store.usage("login:alice", [a, b])
    assert ua.used == ub.used == 0
    assert await limit_store.get("login:alice") == 0
    assert await limit_store.get_flag("login:alice") is None
    assert (await limit_store.distinct("login:alice", [], 60.0)).count_after == 0
    [ub_bob] = await limit_store.usage("login:bob", [a])
    assert ub_bob.used == 1  # another key is untouched
    assert await limit_store.reset("login:") == 1  # a prefix of keys


async def test_reset_treats_glob_characters_literally(limit_store: LimitStore) -> None:
    tier = Tier("t", 5, HOUR)
    for key in ("a*", "ab", "a?", "a[b]"):
        assert (await limit_store.acquire(one(key, tier))).allowed
    assert await limit_store.reset("a*") == 1
    assert await limit_store.reset("a[") == 1
    [u] = await limit_store.usage("ab", [tier])
    assert u.used == 1


# -- distinct members -----------------------------------------------------------------------------


async def test_distinct_counts_limits_and_forgets(limit_store: LimitStore) -> None:
    key, window = "login:a|rcpts", 0.6
    r = await limit_store.distinct(key, ["a@x.test", "b@x.test", "a@x.test"], window)
    assert (r.count_after, r.allowed, r.added) == (2, True, 2)
    r = await limit_store.distinct(key, ["b@x.test", "c@x.test"], window, limit=3)
    assert (r.count_after, r.allowed, r.added) == (3, True, 1)
    r = await limit_store.distinct(key, ["d@x.test", "a@x.test"], window, limit=3)
    assert (r.count_after, r.allowed, r.added) == (4, False, 0)  # refused: nothing added
    r = await limit_store.distinct(key, ["a@x.test"], window, limit=3)
    assert (r.count_after, r.allowed, r.added) == (3, True, 0)  # known members always pass
    r = await limit_store.distinct(key, ["e@x.test"], window, dry_run=True)
    assert (r.count_after, r.allowed, r.added) == (4, True, 1)
    r = await limit_store.distinct(key, [], window)
    assert r.count_after == 3  # the dry run added nothing
    await asyncio.sleep(window + 0.1)
    r = await limit_store.distinct(key, ["d@x.test"], window, limit=1)
    assert (r.count_after, r.allowed, r.added) == (1, True, 1)


async def test_distinct_window_slides(limit_store: LimitStore) -> None:
    key, window = "k", 0.6
    await limit_store.distinct(key, ["old"], window)
    await asyncio.sleep(0.4)
    await limit_store.distinct(key, ["new"], window)
    await asyncio.sleep(0.3)  # "old" is 0.7 s old, "new" 0.3 s
    r = await limit_store.distinct(key, [], window)
    assert r.count_after == 1
    r = await limit_store.distinct(key, ["new"], window, limit=1)
    assert (r.allowed, r.added) == (True, 0)


async def test_distinct_members_are_stored_hashed(limit_store: LimitStore) -> None:
    key, address = "fp:3f9a", "alice.secret@example.com"
    await limit_store.distinct(key, [address, "10.1.2.3"], 60.0)
    stored = await limit_store.inspect()  # type: ignore[attr-defined]
    assert list(stored) == ["fp:3f9a|d"]
    entry = stored["fp:3f9a|d"]
    assert entry.kind == "distinct"
    for raw in (address, "alice.secret", "10.1.2.3"):
        assert raw.encode() not in entry.data
    assert hash_member(key, address) in entry.data
    assert len(hash_member(key, address)) == 16
    assert hash_member(key, address) != hash_member("fp:other", address)


# -- admit: GCRA charges and distinct counts in one call -------------------------------------------


async def test_admit_without_distinct_is_acquire(limit_store: LimitStore) -> None:
    tier = Tier("t", 2, HOUR)
    for _ in range(2):
        a = await limit_store.admit(one("k", tier))
        assert a.allowed and a.distinct == () and a.refused == -1
        assert a.decision.remaining == ()  # admit says whether; usage() says what is left
    assert [u.remaining for u in await limit_store.usage("k", [tier])] == [0]
    a = await limit_store.admit(one("k", tier))
    assert not a.allowed and a.distinct == ()
    assert (a.decision.key, a.decision.tier_id, a.decision.measured, a.decision.limit) == (
        "k",
        "t",
        3,
        2,
    )
    nothing = await limit_store.admit([])
    assert nothing.allowed and nothing.decision.remaining == () and nothing.distinct == ()


async def test_admit_charges_and_records_together(limit_store: LimitStore) -> None:
    tier = Tier("t", 10, HOUR)
    rcpts = DistinctCharge("login:a", ("a@x.test", "b@x.test"), 60.0, 5)
    ips = DistinctCharge("login:a:ips", ("192.0.2.1",), 60.0)
    a = await limit_store.admit(one("login:a", tier, 2), [rcpts, ips])
    assert a.allowed and a.refused == -1
    assert [(r.count_after, r.allowed, r.added) for r in a.distinct] == [(2, True, 2), (1, True, 1)]
    [u] = await limit_store.usage("login:a", [tier])
    assert u.used == 2
    # the same as distinct() would have recorded
    assert (await limit_store.distinct("login:a", [], 60.0)).count_after == 2
    assert (await limit_store.distinct("login:a:ips", ["192.0.2.1"], 60.0)).added == 0


async def test_admit_is_all_or_nothing(limit_store: LimitStore) -> None:
    tier = Tier("t", 10, HOUR)
    await limit_store.distinct("login:a", ["a@x.test", "b@x.test"], 60.0)
    first = DistinctCharge("other", ("z@x.test",), 60.0, 10)
    over = DistinctCharge("login:a", ("c@x.test", "a@x.test"), 60.0, 2)
    later = DistinctCharge("later", ("y@x.test",), 60.0)
    a = await limit_store.admit(one("login:a", tier, 3), [first, over, later])
    assert not a.allowed and a.decision.allowed and a.refused == 1
    # up to the refused one; its count is the one it would have reached; the next is not looked at
    assert [(r.count_after, r.allowed, r.added) for r in a.distinct] == [
        (1, True, 1),
        (3, False, 0),
    ]
    [u] = await limit_store.usage("login:a", [tier])
    assert u.used == 0  # the charge was not made
    for key in ("other", "later"):  # nor any member recorded, before or after the refused set
        assert (await limit_store.distinct(key, [], 60.0)).count_after == 0, key
    assert (await limit_store.distinct("login:a", [], 60.0)).count_after == 2
    # known members always pass, and then everything is recorded
    known = DistinctCharge("login:a", ("a@x.test",), 60.0, 2)
    assert (await limit_store.admit(one("login:a", tier, 3), [first, known])).allowed
    assert [u.used for u in await limit_store.usage("login:a", [tier])] == [3]
    assert (await limit_store.distinct("other", [], 60.0)).count_after == 1


async def test_admit_denied_charges_leave_the_sets_alone(limit_store: LimitStore) -> None:
    tier = Tier("t", 1, HOUR)
    assert (await limit_store.acquire(one("k", tier))).allowed
    rcpts = DistinctCharge("k", ("a@x.test",), 60.0)
    a = await limit_store.admit(one("k", tier), [rcpts])
    assert not a.allowed and not a.decision.allowed and a.distinct == () and a.refused == -1
    assert (a.decision.index, a.decision.measured, a.decision.limit) == (0, 2, 1)
    assert (await limit_store.distinct("k", [], 60.0)).count_after == 0


async def test_admit_dry_run_records_nothing(limit_store: LimitStore) -> None:
    tier = Tier("t", 3, HOUR)
    rcpts = DistinctCharge("k", ("a@x.test", "b@x.test"), 60.0, 2)
    for _ in range(3):
        a = await limit_store.admit(one("k", tier, 3), [rcpts], dry_run=True)
        assert a.allowed and [(r.count_after, r.added) for r in a.distinct] == [(2, 2)]
    [u] = await limit_store.usage("k", [tier])
    assert u.used == 0
    assert (await limit_store.distinct("k", [], 60.0)).count_after == 0
    over = DistinctCharge("k", ("a@x.test", "b@x.test", "c@x.test"), 60.0, 2)
    a = await limit_store.admit([], [over], dry_run=True)
    assert not a.allowed and a.refused == 0 and a.distinct[0].count_after == 3
    assert a.decision.allowed and a.decision.remaining == ()
    stored = await limit_store.inspect()  # type: ignore[attr-defined]
    assert stored == {}


async def test_admit_keys_expire_like_their_calls(limit_store: LimitStore) -> None:
    tier = Tier("t", 10, 100.0)  # 10 s per unit
    rcpts = DistinctCharge("k", ("m1", "m2"), 7.0)
    assert (await limit_store.admit(one("k", tier, 3), [rcpts])).allowed
    stored = await limit_store.inspect()  # type: ignore[attr-defined]
    assert {name: e.kind for name, e in stored.items()} == {"k|g:t": "bucket", "k|d": "distinct"}
    assert stored["k|g:t"].ttl == pytest.approx(30.0, abs=0.5)
    assert stored["k|d"].ttl == pytest.approx(7.0, abs=0.5)
    assert hash_member("k", "m1") in stored["k|d"].data  # hashed, as distinct() stores them


async def test_concurrent_admits_never_over_admit(limit_store: LimitStore) -> None:
    tier = Tier("t", 1000, HOUR)
    admissions = await asyncio.gather(
        *(
            limit_store.admit(one("k", tier), [DistinctCharge("k", (f"r{i}@x.test",), 60.0, 25)])
            for i in range(100)
        )
    )
    assert sum(a.allowed for a in admissions) == 25
    assert (await limit_store.distinct("k", [], 60.0)).count_after == 25
    [u] = await limit_store.usage("k", [tier])
    assert u.used == 25  # only the admitted ones were charged


# -- counters and flags ---------------------------------------------------------------------------


async def test_counters_in_fixed_windows(limit_store: LimitStore) -> None:
    assert await limit_store.get("auth-fail:ip:192.0.2.1") == 0
    assert await limit_store.incr("auth-fail:ip:192.0.2.1", 3, 0.5) == 3
    await asyncio.sleep(0.25)
    assert await limit_store.incr("auth-fail:ip:192.0.2.1", 2, 0.5) == 5  # does not extend
    assert await limit_store.get("auth-fail:ip:192.0.2.1") == 5
    await asyncio.sleep(0.35)
    assert await limit_store.get("auth-fail:ip:192.0.2.1") == 0
    assert await limit_store.incr("auth-fail:ip:192.0.2.1", 1, 0.5) == 1  # a new window


async def test_flags_expire(limit_store: LimitStore) -> None:
    assert await limit_store.get_flag("block:ip:192.0.2.1") is None
    await limit_store.set_flag("block:ip:192.0.2.1", 0.4)
    left = await limit_store.get_flag("block:ip:192.0.2.1")
    assert left is not None and 0.2 < left <= 0.4
    await limit_store.set_flag("block:ip:192.0.2.1", 30.0)  # re-set: extended
    left = await limit_store.get_flag("block:ip:192.0.2.1")
    assert left is not None and 29.0 < left <= 30.0
    await limit_store.set_flag("block:ip:192.0.2.1", 0.3)  # and shortened
    await asyncio.sleep(0.4)
    assert await limit_store.get_flag("block:ip:192.0.2.1") is None


async def test_every_key_expires_by_itself(limit_store: LimitStore) -> None:
    tier = Tier("t", 10, 100.0)  # 10 s per unit
    started = time.monotonic()
    await limit_store.acquire([Charge("k", tier, 3), Charge("k", Tier("u", 5, 5.0), 1)])
    await limit_store.acquire(one("k2", tier, 1), dry_run=True)  # a peek stores nothing
    await limit_store.distinct("k", ["m1", "m2"], 7.0)
    await limit_store.incr("k", 1, 9.0)
    await limit_store.set_flag("k", 11.0)
    stored = await limit_store.inspect()  # type: ignore[attr-defined]
    assert {name: e.kind for name, e in stored.items()} == {
        "k|g:t": "bucket",
        "k|g:u": "bucket",
        "k|d": "distinct",
        "k|c": "counter",
        "k|f": "flag",
    }
    elapsed = time.monotonic() - started  # a loaded machine may take a while between the calls

    def about(expected: float) -> tuple[float, float]:
        return expected - elapsed - 0.5, expected + 0.5

    for name, entry in stored.items():
        assert 0 < entry.ttl < math.inf, name
    expected = {"k|g:t": 30.0, "k|g:u": 1.0, "k|d": 7.0, "k|c": 9.0, "k|f": 11.0}  # t: until empty
    for name, ttl in expected.items():
        low, high = about(ttl)
        assert low <= stored[name].ttl <= high, (name, stored[name].ttl, ttl, elapsed)
    await limit_store.refund(one("k", tier, 3))  # emptied: the bucket is gone
    assert "k|g:t" not in await limit_store.inspect()  # type: ignore[attr-defined]


# -- concurrency ----------------------------------------------------------------------------------


async def test_concurrent_acquires_never_over_admit(limit_store: LimitStore) -> None:
    tier = Tier("t", 50, HOUR)
    decisions = await asyncio.gather(*(limit_store.acquire(one("k", tier)) for _ in range(200)))
    assert sum(d.allowed for d in decisions) == 50
    [u] = await limit_store.usage("k", [tier])
    assert (u.used, u.remaining) == (50, 0)


async def test_concurrent_multi_key_acquires_stay_consistent(limit_store: LimitStore) -> None:
    tight, loose = Tier("tight", 30, HOUR), Tier("loose", 1000, HOUR)
    request = [Charge("a", loose, 1), Charge("b", tight, 1), Charge("c", loose, 2)]
    decisions = await asyncio.gather(*(limit_store.acquire(request) for _ in range(100)))
    assert sum(d.allowed for d in decisions) == 30
    assert [u.used for u in await limit_store.usage("a", [loose])] == [30]
    assert [u.used for u in await limit_store.usage("c", [loose])] == [60]


async def test_concurrent_distinct_with_limit_never_over_admits(limit_store: LimitStore) -> None:
    results = await asyncio.gather(
        *(limit_store.distinct("k", [f"r{i}@x.test"], 60.0, limit=25) for i in range(100))
    )
    assert sum(r.allowed for r in results) == 25
    assert (await limit_store.distinct("k", [], 60.0)).count_after == 25


async def test_calls_beyond_the_pool_queue_fairly(limit_backend: str, limit_prefix: str) -> None:
    """More concurrent calls than connections: they wait their turn; none fails for want of one."""
    url = redis_server_url()
    store: LimitStore = (
        RedisLimitStore(url, prefix=limit_prefix, timeout=0.5, max_connections=4)
        if limit_backend == "redis" and url
        else MemoryLimitStore()
    )
    try:
        tier = Tier("t", 300, HOUR)
        request = [Charge("k", tier, 1), Charge("k2", tier, 1)]
        decisions = await asyncio.gather(*(store.acquire(request) for _ in range(400)))
        assert sum(d.allowed for d in decisions) == 300
    finally:
        await store.reset("")
        await store.close()


async def test_scripts_are_reloaded_after_a_script_flush(limit_store: LimitStore) -> None:
    tier = Tier("t", 40, HOUR)
    assert (await limit_store.acquire(one("k", tier))).allowed
    if isinstance(limit_store, RedisLimitStore):
        await limit_store._redis.script_flush()  # as after a Redis restart or failover
    decisions = await asyncio.gather(*(limit_store.acquire(one("k", tier)) for _ in range(50)))
    assert sum(d.allowed for d in decisions) == 39  # run once each: none lost, none doubled
    await limit_store.refund(one("k", tier))
    assert (await limit_store.distinct("k", ["a"], 60.0)).added == 1
    assert await limit_store.incr("k", 1, 60.0) == 1
    [u] = await limit_store.usage("k", [tier])
    assert u.used == 39


async def test_a_cancelled_call_is_not_charged(limit_store: LimitStore) -> None:
    tier = Tier("t", 5, HOUR)
    task = asyncio.create_task(limit_store.acquire(one("k", tier, 2)))
    await asyncio.sleep(0)  # the call is queued (Redis) or already done (memory: instant)
    task.cancel()
    try:
        charged = (await task).allowed
    except asyncio.CancelledError:
        charged = False
    await asyncio.sleep(0.05)
    [u] = await limit_store.usage("k", [tier])
    assert u.used == (2 if charged else 0)
    if isinstance(limit_store, RedisLimitStore):
        assert not charged  # withdrawn before it was sent


# -- arguments ------------------------------------------------------------------------------------


async def test_invalid_arguments_raise_before_any_io(limit_store: LimitStore) -> None:
    for bad in (
        lambda: Tier("", 1, 1.0),
        lambda: Tier("a|b", 1, 1.0),
        lambda: Tier("t", 0, 1.0),
        lambda: Tier("t", 1, 0.0),
        lambda: Tier("t", 1, math.inf),
        lambda: Tier("t", 1, 1.0, burst=0),
        lambda: Charge("k", Tier("t", 1, 1.0), -1),
        lambda: Charge("", Tier("t", 1, 1.0), 1),
        lambda: DistinctCharge("", ("a",), 60.0),
        lambda: DistinctCharge("k", "a@x.test", 60.0),  # type: ignore[arg-type]
        lambda: DistinctCharge("k", ("a",), 0.0),
        lambda: DistinctCharge("k", ("a",), 60.0, -1),
    ):
        with pytest.raises(ValueError):
            bad()
    with pytest.raises(ValueError):
        await limit_store.distinct("k", "a@x.test", 60.0)  # a string is not a list of members
    with pytest.raises(ValueError):
        await limit_store.distinct("k", ["a"], 0.0)
    twice = [DistinctCharge("k", ("a",), 60.0), DistinctCharge("k", ("b",), 60.0)]
    with pytest.raises(ValueError):  # one key, one charge
        await limit_store.admit([], twice)
    with pytest.raises(ValueError):
        await limit_store.incr("k", -1, 60.0)
    with pytest.raises(ValueError):
        await limit_store.set_flag("k", -5.0)


# -- an unreachable Redis (needs no Redis) --------------------------------------------------------


async def test_unreachable_redis_raises_promptly() -> None:
    store = RedisLimitStore(UNREACHABLE_REDIS_URL, prefix="mw:test:", timeout=0.5)
    tier = Tier("t", 5, 60.0)
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: store.acquire(one("k", tier)),
        lambda: store.refund(one("k", tier)),
        lambda: store.usage("k", [tier]),
        lambda: store.reset("k"),
        lambda: store.distinct("k", ["a"], 60.0),
        lambda: store.admit(one("k", tier), [DistinctCharge("k", ("a",), 60.0)]),
        lambda: store.incr("k", 1, 60.0),
        lambda: store.get("k"),
        lambda: store.set_flag("k", 1.0),
        lambda: store.get_flag("k"),
        lambda: store.ping(),
    ]
    try:
        for call in calls:
            started = time.monotonic()
            with pytest.raises(LimitStoreUnavailable) as caught:
                await call()
            assert time.monotonic() - started < 1.5
            assert isinstance(caught.value, StoreUnavailable)
            assert caught.value.temporary and caught.value.reply.code == 451
            assert "not-the-password" not in str(caught.value)
            assert "127.0.0.1:1" in str(caught.value)
    finally:
        await store.close()


async def test_hung_redis_times_out() -> None:
    async with silent_server() as url:
        store = RedisLimitStore(url, timeout=0.3)
        try:
            started = time.monotonic()
            with pytest.raises(LimitStoreUnavailable, match="Timeout"):
                await store.acquire(one("k", Tier("t", 5, 60.0)))
            assert time.monotonic() - started < 1.5
        finally:
            await store.close()


async def test_hung_redis_fails_every_concurrent_call_promptly() -> None:
    async with silent_server() as url:
        store = RedisLimitStore(url, timeout=0.3)
        tier = Tier("t", 5, 60.0)
        try:
            started = time.monotonic()
            results = await asyncio.gather(
                *(store.acquire(one(f"k{i}", tier)) for i in range(300)), return_exceptions=True
            )
            assert time.monotonic() - started < 2.0
            assert all(isinstance(r, LimitStoreUnavailable) for r in results)
        finally:
            await store.close()


async def test_close_fails_waiting_calls() -> None:
    async with silent_server() as url:
        store = RedisLimitStore(url, timeout=5.0)
        calls = [
            asyncio.create_task(store.acquire(one("k", Tier("t", 5, 60.0)))) for _ in range(20)
        ]
        await asyncio.sleep(0.1)
        started = time.monotonic()
        await store.close()
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert time.monotonic() - started < 1.0
        assert all(isinstance(r, LimitStoreUnavailable) for r in results)
        with pytest.raises(LimitStoreUnavailable):
            await store.acquire(one("k", Tier("t", 5, 60.0)))


async def test_open_limit_store_by_url() -> None:
    assert isinstance(open_limit_store("memory://"), MemoryLimitStore)
    redis_store = open_limit_store("redis://127.0.0.1:1/0", prefix="mw:x:", timeout=0.2)
    assert isinstance(redis_store, RedisLimitStore)
    assert redis_store.prefix == "mw:x:" and redis_store.timeout == 0.2
    await redis_store.close()  # opening connected to nothing
    with pytest.raises(ValueError, match="unsupported"):
        open_limit_store("postgresql://u:secret@h/db")
