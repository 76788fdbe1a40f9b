"""GCRA arithmetic: pure functions, no I/O, no clock of their own.

What it does: the generic cell rate algorithm (ITU-T I.371) in its continuous-state leaky bucket
form. One bucket per (key, tier) holds ``level`` — units in use — and ``updated`` — when it was
last written. The bucket drains one unit every emission interval ``T = period / limit``; a request
of ``amount`` units conforms when ``level + amount <= capacity``. This is the same algorithm as the
"virtual scheduling" form with a theoretical arrival time (``TAT = updated + level * T``), but it
keeps the arithmetic exact where it matters: a burst of whole units from an empty bucket sums
small integers, whereas a TAT near 1.7e9 s (Redis server time) carries only ~0.2 µs resolution.

:func:`plan` evaluates a whole all-or-nothing request over several buckets (the same bucket may
appear more than once: later charges see the earlier ones). The memory store calls it directly;
the Redis store runs a line-by-line port of it in Lua (``gcra_plan`` in ``redis_store``'s Lua
prelude, used by its acquire and admit scripts) and the contract tests prove both agree.

Floating-point policy: a level within :data:`EPSILON` units of a boundary counts as on it, so
``measured``, ``remaining`` and the decision always agree (``measured > limit`` exactly when
denied).

Reads: only its arguments.

Security notes: none (arithmetic).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

EPSILON = 1e-9
"""Units: a level this close to a boundary counts as on it (absorbs float noise)."""


def drained(level: float, updated: float, now: float, interval: float) -> float:
    """The level of a bucket written at ``updated`` with ``level`` units, seen at ``now``.

    A clock that went backwards (``now < updated``) drains nothing; it never fills the bucket."""
    elapsed = now - updated
    if elapsed > 0:
        level -= elapsed / interval
    return level if level > EPSILON else 0.0


def used(level: float) -> int:
    """Units in use, rounded up (a partly drained unit still counts)."""
    return max(0, math.ceil(level - EPSILON))


def remaining(level: float, capacity: int) -> int:
    """Whole units that could be acquired now."""
    return max(0, math.floor(capacity - level + EPSILON))


def refunded(level: float, amount: int) -> float:
    """The level after giving back ``amount`` units (never below empty)."""
    level -= amount
    return level if level > EPSILON else 0.0


class Step(NamedTuple):
    """One charge of a request: ``amount`` units against bucket ``name`` of the given shape."""

    name: str
    interval: float
    capacity: int
    amount: int


class StepResult(NamedTuple):
    """Per charge, when the request is allowed: whole units left and seconds until empty."""

    remaining: int
    reset_after: float


@dataclass(frozen=True, slots=True)
class Denial:
    """The first charge that did not fit, with the request's overall wait."""

    index: int  # 0-based position in the request
    measured: int  # usage the charge would have reached (> capacity)
    capacity: int
    retry_after: float  # seconds until the whole request fits (math.inf when never)
    reset_after: float  # seconds until the denying bucket is empty (as stored, before the request)
    never: bool  # some bucket is asked for more than its capacity in this request


@dataclass(slots=True)
class Plan:
    """What a request does: if ``denial`` is None, write ``levels`` (bucket → level after) with
    ``ttls`` (bucket → seconds until empty); ``results`` has one entry per charge."""

    denial: Denial | None
    levels: dict[str, float] = field(default_factory=dict)
    ttls: dict[str, float] = field(default_factory=dict)
    results: list[StepResult] = field(default_factory=list)

    @property
    def allowed(self) -> bool:
        return self.denial is None


def plan(steps: Sequence[Step], level_of: Callable[[Step], float], *, report: bool = True) -> Plan:
    """Evaluate an all-or-nothing request. ``level_of(step)`` is the bucket's current (drained)
    level; it is asked once per distinct bucket name. ``report=False``: leave ``results`` empty
    (the caller only needs the decision and the levels to write)."""
    levels: dict[str, float] = {}
    initial: dict[str, float] = {}
    asked: dict[str, int] = {}
    ttls: dict[str, float] = {}
    results: list[StepResult] = []
    denial: Denial | None = None
    retry = 0.0
    never = False
    floor = math.floor
    for index, step in enumerate(steps):
        name, interval, capacity, amount = step
        level = levels.get(name)
        if level is None:
            level = initial[name] = level_of(step)
            total = asked[name] = amount
        else:
            total = asked[name] = asked[name] + amount
        after = level + amount
        levels[name] = after
        ttls[name] = after * interval
        if after > capacity + EPSILON:
            if total > capacity:
                never = True
            retry = max(retry, (after - capacity) * interval)
            if denial is None:
                denial = Denial(
                    index=index,
                    measured=math.ceil(after - EPSILON),
                    capacity=capacity,
                    retry_after=0.0,
                    reset_after=initial[name] * interval,
                    never=False,
                )
        elif report and denial is None:  # (after a denial the results are not reported)
            # remaining(after, capacity), inlined
            results.append(StepResult(max(0, floor(capacity - after + EPSILON)), after * interval))
    if denial is not None:
        denial = Denial(
            index=denial.index,
            measured=denial.measured,
            capacity=denial.capacity,
            retry_after=math.inf if never else retry,
            reset_after=denial.reset_after,
            never=never,
        )
        return Plan(denial)
    return Plan(None, levels, ttls, results)
