"""In-process limit store: the embedded default (``limits.store = "memory://"``), one gateway only.

What it does: implements :class:`~gateway.ratelimit.store.LimitStore` in a dict, with the same
semantics as the Redis store (the contract tests run against both): GCRA buckets via
:func:`gateway.ratelimit.gcra.plan`, distinct members in a sliding window, both at once
(``admit``), fixed-window counters and flags. Every method runs without awaiting anything, so
on one event loop each call is atomic (no locks needed; the store is not thread-safe and belongs
to one loop), and a check using it never waits (the pipeline then sets no timer for it).

Memory is bounded: every entry has an expiry (a bucket: when it is empty again; a distinct set:
``window`` after its newest member; a counter: ``window`` after its creation; a flag: its ttl). A
heap of expiries is swept a little on every call (expired entries are also dropped when touched),
and at ``max_keys`` entries the one closest to expiry is evicted to make room — the state that
matters least is forgotten first, and memory never grows without bound. ``evicted`` counts those.

Time is ``clock()`` (default :func:`time.monotonic`; unit tests inject a fake clock).

Reads: nothing but its arguments and the clock.

Security notes: distinct members arrive hashed (:func:`~gateway.ratelimit.store.hash_member`);
no raw address is kept. Counts vanish with the process: a restart resets every limit.
"""

from __future__ import annotations

import heapq
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TypeVar

from gateway.ratelimit import gcra
from gateway.ratelimit.store import (
    Admission,
    Charge,
    Decision,
    DistinctCharge,
    DistinctResult,
    Remaining,
    StoredEntry,
    Tier,
    TierUsage,
    bucket_name,
    check_admission,
    check_amount,
    check_key,
    check_limit,
    check_window,
    counter_name,
    distinct_name,
    flag_name,
    hashed_members,
    kind_of,
    matches_prefix,
)

#: an allowed decision without ``remaining`` (what admit answers; immutable, so shared)
_ALLOWED = Decision(True)

SWEEP_BUDGET = 256
"""Expired heap entries handled per call at most (keeps any one call short)."""


class _Entry:
    __slots__ = ("expires",)

    def __init__(self, expires: float) -> None:
        self.expires = expires


class _Bucket(_Entry):
    __slots__ = ("level", "updated")

    def __init__(self, expires: float, level: float, updated: float) -> None:
        super().__init__(expires)
        self.level, self.updated = level, updated


class _Counter(_Entry):
    __slots__ = ("value",)

    def __init__(self, expires: float) -> None:
        super().__init__(expires)
        self.value = 0


class _Flag(_Entry):
    __slots__ = ()


class _Distinct(_Entry):
    __slots__ = ("seen",)

    def __init__(self, expires: float) -> None:
        super().__init__(expires)
        self.seen: OrderedDict[bytes, float] = OrderedDict()  # hash -> last seen, oldest first


E = TypeVar("E", bound=_Entry)


class MemoryLimitStore:
    """The in-process :class:`~gateway.ratelimit.store.LimitStore`."""

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, max_keys: int = 1_000_000
    ) -> None:
        if isinstance(max_keys, bool) or not isinstance(max_keys, int) or max_keys < 1:
            raise ValueError(f"max_keys must be an integer >= 1, got {max_keys!r}")
        self._clock = clock
        self._max_keys = max_keys
        self._data: dict[str, _Entry] = {}
        self._heap: list[tuple[float, str]] = []
        self.evicted = 0

    def __len__(self) -> int:
        """Entries held (including expired ones not yet swept)."""
        return len(self._data)

    # -- bookkeeping ------------------------------------------------------------------------------
    def _now(self) -> float:
        now = self._clock()
        self._sweep(now, SWEEP_BUDGET)
        return now

    def _sweep(self, now: float, budget: int) -> None:
        heap, data = self._heap, self._data
        while heap and heap[0][0] <= now and budget > 0:
            budget -= 1
            _, name = heapq.heappop(heap)
            entry = data.get(name)
            if entry is None:
                continue
            if entry.expires <= now:
                del data[name]
            else:  # prolonged since it was queued
                heapq.heappush(heap, (entry.expires, name))

    def _evict_one(self, now: float) -> None:
        """Drop the entry closest to expiry (called only when the store is full)."""
        if not self._heap:  # cannot happen (every entry is queued); rebuild to be safe
            self._compact()
        heap, data = self._heap, self._data
        while heap:
            queued, name = heapq.heappop(heap)
            entry = data.get(name)
            if entry is None:
                continue
            if entry.expires > queued:  # prolonged: requeue at its real expiry
                heapq.heappush(heap, (entry.expires, name))
                continue
            del data[name]
            if entry.expires > now:
                self.evicted += 1
            return

    def _get(self, name: str, kind: type[E], now: float) -> E | None:
        entry = self._data.get(name)
        if entry is None:
            return None
        if entry.expires <= now or not isinstance(entry, kind):
            del self._data[name]
            return None
        return entry

    def _put(self, name: str, entry: _Entry, now: float) -> None:
        data = self._data
        if name not in data:
            while len(data) >= self._max_keys:
                self._evict_one(now)
            heapq.heappush(self._heap, (entry.expires, name))
            if len(self._heap) > 2 * len(data) + 1024:
                self._compact()
        data[name] = entry

    def _compact(self) -> None:
        self._heap = [(e.expires, n) for n, e in self._data.items()]
        heapq.heapify(self._heap)

    def _level(self, name: str, interval: float, now: float) -> float:
        bucket = self._get(name, _Bucket, now)
        if bucket is None:
            return 0.0
        return gcra.drained(bucket.level, bucket.updated, now, interval)

    def _write_level(self, name: str, level: float, ttl: float, now: float) -> None:
        if level <= 0.0:
            self._data.pop(name, None)
            return
        bucket = self._get(name, _Bucket, now)
        if bucket is None:
            self._put(name, _Bucket(now + ttl, level, now), now)
        else:
            bucket.level, bucket.updated, bucket.expires = level, now, now + ttl

    # -- GCRA -------------------------------------------------------------------------------------
    def _plan(
        self, charges: Sequence[Charge], now: float, *, report: bool = True
    ) -> tuple[Decision, gcra.Plan]:
        """What acquiring ``charges`` now would do (nothing is written); ``report=False``: an
        allowed decision without ``remaining``."""
        steps = [c.step for c in charges]
        result = gcra.plan(
            steps, lambda step: self._level(step.name, step.interval, now), report=report
        )
        denial = result.denial
        if denial is not None:
            denied = charges[denial.index]
            return Decision(
                False,
                key=denied.key,
                tier_id=denied.tier.id,
                index=denial.index,
                measured=denial.measured,
                limit=denial.capacity,
                retry_after=denial.retry_after,
                reset_after=denial.reset_after,
                never=denial.never,
            ), result
        if not report:
            return _ALLOWED, result
        return Decision(
            True,
            remaining=tuple(
                Remaining(c.key, c.tier.id, r.remaining, r.reset_after)
                for c, r in zip(charges, result.results, strict=True)
            ),
        ), result

    def _charge(self, result: gcra.Plan, now: float) -> None:
        for name, level in result.levels.items():
            self._write_level(name, level, result.ttls[name], now)

    async def acquire(self, charges: Sequence[Charge], *, dry_run: bool = False) -> Decision:
        if not charges:
            return Decision(True)
        now = self._now()
        decision, result = self._plan(charges, now)
        if decision.allowed and not dry_run:
            self._charge(result, now)
        return decision

    async def admit(
        self,
        charges: Sequence[Charge],
        distinct: Sequence[DistinctCharge] = (),
        *,
        dry_run: bool = False,
    ) -> Admission:
        if not distinct:  # (the common case, without the distinct bookkeeping)
            if not charges:
                return Admission(_ALLOWED)
            now = self._now()
            decision, acquired = self._plan(charges, now, report=False)
            if decision.allowed and not dry_run:
                self._charge(acquired, now)
            return Admission(decision)
        check_admission(distinct)
        hashed = [hashed_members(d.key, d.members) for d in distinct]
        now = self._now()
        plan: gcra.Plan | None = None
        decision = _ALLOWED
        if charges:
            decision, plan = self._plan(charges, now, report=False)
            if not decision.allowed:
                return Admission(decision)
        results: list[DistinctResult] = []
        entries: list[_Distinct | None] = []
        for d, hashes in zip(distinct, hashed, strict=True):
            entry, result = self._count(distinct_name(d.key), hashes, float(d.window), d.limit, now)
            results.append(result)
            if not result.allowed:  # nothing is recorded, nothing charged
                return Admission(decision, tuple(results))
            entries.append(entry)
        if not dry_run:
            if plan is not None:
                self._charge(plan, now)
            for d, hashes, entry in zip(distinct, hashed, entries, strict=True):
                self._record(distinct_name(d.key), entry, hashes, float(d.window), now)
        return Admission(decision, tuple(results))

    async def refund(self, charges: Sequence[Charge]) -> None:
        now = self._now()
        for c in charges:
            name, interval = c.bucket, c.tier.interval
            level = gcra.refunded(self._level(name, interval, now), c.amount)
            self._write_level(name, level, level * interval, now)

    async def usage(self, key: str, tiers: Sequence[Tier]) -> list[TierUsage]:
        check_key(key)
        now = self._now()
        out = []
        for tier in tiers:
            level = self._level(bucket_name(key, tier.id), tier.interval, now)
            out.append(
                TierUsage(
                    tier.id,
                    gcra.used(level),
                    tier.capacity,
                    gcra.remaining(level, tier.capacity),
                    level * tier.interval,
                )
            )
        return out

    async def reset(self, key_prefix: str) -> int:
        now = self._now()
        doomed = [n for n in self._data if matches_prefix(n, key_prefix)]
        live = 0
        for name in doomed:
            if self._data.pop(name).expires > now:
                live += 1
        return live

    # -- distinct members -------------------------------------------------------------------------
    def _count(
        self, name: str, hashes: list[bytes], window: float, limit: int | None, now: float
    ) -> tuple[_Distinct | None, DistinctResult]:
        """The set ``name`` with the members older than ``window`` dropped (None: empty), and what
        recording ``hashes`` now would give (nothing is recorded)."""
        entry = self._get(name, _Distinct, now)
        if entry is not None:
            seen = entry.seen
            cutoff = now - window
            while seen and next(iter(seen.values())) <= cutoff:
                seen.popitem(last=False)
            if not seen:
                del self._data[name]
                entry = None
        count = len(entry.seen) if entry is not None else 0
        new = sum(1 for h in hashes if entry is None or h not in entry.seen)
        after = count + new
        if limit is not None and new > 0 and after > limit:
            return entry, DistinctResult(after, False, 0)
        return entry, DistinctResult(after, True, new)

    def _record(
        self, name: str, entry: _Distinct | None, hashes: list[bytes], window: float, now: float
    ) -> None:
        if not hashes:
            return
        if entry is None or self._data.get(name) is not entry:  # (evicted meanwhile: store full)
            entry = _Distinct(now + window)
            self._put(name, entry, now)
        for h in hashes:
            entry.seen[h] = now
            entry.seen.move_to_end(h)
        entry.expires = now + window

    async def distinct(
        self,
        key: str,
        members: Sequence[str],
        window: float,
        *,
        limit: int | None = None,
        dry_run: bool = False,
    ) -> DistinctResult:
        name = distinct_name(key)
        window = check_window(window)
        check_limit(limit)
        hashes = hashed_members(key, members)
        now = self._now()
        entry, result = self._count(name, hashes, window, limit, now)
        if result.allowed and not dry_run:
            self._record(name, entry, hashes, window, now)
        return result

    # -- counters and flags -----------------------------------------------------------------------
    async def incr(self, key: str, amount: int, window: float) -> int:
        name = counter_name(key)
        check_amount(amount, "counter amount")
        window = check_window(window)
        now = self._now()
        counter = self._get(name, _Counter, now)
        if counter is None:
            counter = _Counter(now + window)
            self._put(name, counter, now)
        counter.value += amount
        return counter.value

    async def get(self, key: str) -> int:
        name = counter_name(key)
        counter = self._get(name, _Counter, self._now())
        return counter.value if counter is not None else 0

    async def set_flag(self, key: str, ttl: float) -> None:
        name = flag_name(key)
        ttl = check_window(ttl, "flag ttl")
        now = self._now()
        flag = self._get(name, _Flag, now)
        if flag is None:
            self._put(name, _Flag(now + ttl), now)
        else:
            flag.expires = now + ttl

    async def get_flag(self, key: str) -> float | None:
        name = flag_name(key)
        now = self._now()
        flag = self._get(name, _Flag, now)
        return flag.expires - now if flag is not None else None

    # -- diagnostics ------------------------------------------------------------------------------
    async def inspect(self) -> dict[str, StoredEntry]:
        """Every live entry by name, with its time to expiry and stored bytes (tests, debugging)."""
        now = self._clock()
        out: dict[str, StoredEntry] = {}
        for name, entry in self._data.items():
            if entry.expires <= now:
                continue
            data = b""
            if isinstance(entry, _Bucket):
                data = f"{entry.level!r} {entry.updated!r}".encode()
            elif isinstance(entry, _Distinct):
                data = b"".join(entry.seen)
            elif isinstance(entry, _Counter):
                data = str(entry.value).encode()
            elif isinstance(entry, _Flag):
                data = b"1"
            out[name] = StoredEntry(kind_of(name), entry.expires - now, data)
        return out

    # -- lifecycle --------------------------------------------------------------------------------
    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None
