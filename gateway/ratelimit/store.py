"""The limit store port: what rate-limit checks ask of a counter store, and the types they exchange.

What it does: declares :class:`LimitStore` (the protocol both :class:`~gateway.ratelimit.memory.
MemoryLimitStore` and :class:`~gateway.ratelimit.redis_store.RedisLimitStore` implement, proven
identical by one contract test suite) and its value types: :class:`Tier` (a GCRA rate: ``limit``
per ``period`` seconds with an optional ``burst``), :class:`Charge` (an amount against one tier of
one key), :class:`Decision` (the answer to an all-or-nothing acquire), :class:`TierUsage`,
:class:`DistinctResult`, and for :meth:`LimitStore.admit` (GCRA charges and distinct-member counts
in one atomic call: what a rate-limit check asks at one SMTP stage) :class:`DistinctCharge` and
:class:`Admission`. Stores *count only*; the checks decide what a denial means.

It also fixes how a caller's key becomes a stored name (shared by both stores, so that ``reset``
and the key layout are the same everywhere)::

    <key>|g:<tier id>    GCRA bucket of one tier      <key>|d    distinct members (sliding window)
    <key>|c              fixed-window counter         <key>|f    flag (temporary block)

A tier id never contains ``|``, so the text before the last ``|`` is always the caller's key.

Reads: nothing (stdlib only).

Security notes: members of distinct sets are hashed here (:func:`hash_member`: SHA-256 over the key
and the member, truncated to 128 bits) before any store sees them, so no store ever holds a raw
address or IP. The hash is not secret: whoever can read the store and guess a member can confirm
the guess for that key; it keeps addresses out of dumps and logs, it is not encryption. Keys
themselves (logins, client networks, domains) are stored as given. :class:`LimitStoreUnavailable`
is temporary (451): a check that cannot count fails closed unless configured otherwise.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

# re-exported: the stores raise it; it lives in the core error tree
from gateway.core.errors import LimitStoreUnavailable as LimitStoreUnavailable
from gateway.ratelimit import gcra

SEPARATOR = "|"


@dataclass(frozen=True, slots=True)
class Tier:
    """A GCRA rate: ``limit`` units per ``period`` seconds, at most ``burst`` (default: ``limit``)
    at once. The emission interval is ``period / limit``; an empty bucket admits ``capacity`` units
    at once and refills at ``limit / period`` units per second.

    ``id`` names the tier in the stored key and in decisions; one id must always mean the same
    rate for a given key (it may not contain ``|``)."""

    id: str
    limit: int
    period: float
    burst: int | None = None

    def __post_init__(self) -> None:
        if not self.id or SEPARATOR in self.id or any(c.isspace() for c in self.id):
            raise ValueError(f"tier id must be non-empty without '|' or spaces: {self.id!r}")
        if isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 1:
            raise ValueError(f"tier {self.id}: limit must be an integer >= 1, got {self.limit!r}")
        if not (isinstance(self.period, int | float) and math.isfinite(self.period)) or (
            self.period <= 0
        ):
            raise ValueError(f"tier {self.id}: period must be a number > 0, got {self.period!r}")
        if self.burst is not None and (
            isinstance(self.burst, bool) or not isinstance(self.burst, int) or self.burst < 1
        ):
            raise ValueError(f"tier {self.id}: burst must be an integer >= 1, got {self.burst!r}")

    @property
    def capacity(self) -> int:
        """Units an empty bucket admits at once: ``burst``, or the whole ``limit``."""
        return self.burst if self.burst is not None else self.limit

    @property
    def interval(self) -> float:
        """The emission interval T in seconds: one unit refills every T seconds."""
        return float(self.period) / self.limit


def _check_amount(amount: int, what: str) -> None:
    if isinstance(amount, bool) or not isinstance(amount, int) or amount < 0:
        raise ValueError(f"{what} must be an integer >= 0, got {amount!r}")


def _check_key(key: str) -> None:
    if not isinstance(key, str) or not key:
        raise ValueError(f"limit key must be a non-empty string, got {key!r}")


@dataclass(frozen=True, slots=True)
class Charge:
    """``amount`` units (messages, recipients, bytes...) against ``tier`` of ``key``."""

    key: str
    tier: Tier
    amount: int
    #: the stored bucket's name and the charge as a GCRA step, built once with the charge (the
    #: charges of a resolved limit are reused by every transaction it applies to)
    bucket: str = field(init=False, repr=False, compare=False)
    step: gcra.Step = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_key(self.key)
        _check_amount(self.amount, f"charge amount for {self.tier.id}")
        tier = self.tier
        bucket = bucket_name(self.key, tier.id)
        object.__setattr__(self, "bucket", bucket)
        object.__setattr__(
            self, "step", gcra.Step(bucket, tier.interval, tier.capacity, self.amount)
        )


@dataclass(frozen=True, slots=True)
class Remaining:
    """After an allowed acquire: what is left of one charge's tier, and when it is full again."""

    key: str
    tier_id: str
    remaining: int
    reset_after: float


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer to :meth:`LimitStore.acquire`.

    Allowed: ``remaining`` has one entry per charge, in order (for ``dry_run`` too).

    Denied (nothing was charged): ``key``/``tier_id``/``index`` name the first denying charge;
    ``measured`` is the usage that charge would have reached (tier units, > ``limit``); ``limit``
    is that tier's capacity (``burst``, or ``limit``); ``reset_after`` is the seconds until that
    key's tier is empty again; ``retry_after`` the seconds until the whole request would be admitted
    (the longest wait over all its charges). ``never`` is set when some charge asks for more than its
    tier's capacity: it can never be admitted, and ``retry_after`` is ``math.inf``.
    """

    allowed: bool
    remaining: tuple[Remaining, ...] = ()
    key: str = ""
    tier_id: str = ""
    index: int = -1
    measured: int = 0
    limit: int = 0
    retry_after: float = 0.0
    reset_after: float = 0.0
    never: bool = False


@dataclass(frozen=True, slots=True)
class TierUsage:
    """One tier of one key now: units in use (rounded up), capacity, what is left, seconds to empty."""

    tier_id: str
    used: int
    limit: int
    remaining: int
    reset_after: float


@dataclass(frozen=True, slots=True)
class DistinctResult:
    """The answer to :meth:`LimitStore.distinct`.

    ``count_after``: distinct members in the window after the call — when refused (or dry run),
    the count the call would have reached; ``allowed``: False only when a ``limit`` refused it
    (then nothing was added); ``added``: members that were (or would be) new in the window."""

    count_after: int
    allowed: bool
    added: int


@dataclass(frozen=True, slots=True)
class DistinctCharge:
    """``members`` seen now under ``key``, counted over the last ``window`` seconds, refused when
    new members would take the count beyond ``limit`` (None: no limit): one :meth:`LimitStore.
    distinct` call, as part of an :meth:`LimitStore.admit`. The caller normalises the members."""

    key: str
    members: tuple[str, ...]
    window: float
    limit: int | None = None

    def __post_init__(self) -> None:
        _check_key(self.key)
        if isinstance(self.members, str):
            raise ValueError("members must be a sequence of strings, not one string")
        check_window(self.window)
        check_limit(self.limit)


@dataclass(frozen=True, slots=True)
class Admission:
    """The answer to :meth:`LimitStore.admit`.

    ``decision``: the GCRA charges' :class:`Decision`, as :meth:`LimitStore.acquire` gives it,
    except that an allowed one carries no ``remaining`` (admit answers whether the request fits;
    what is left is :meth:`LimitStore.acquire`'s or :meth:`LimitStore.usage`'s answer).
    ``distinct``: when the charges fit, one
    :class:`DistinctResult` per distinct charge, in order, up to and including the first one its
    limit refused (then nothing at all was recorded); empty when the charges were denied (then no
    distinct set was looked at)."""

    decision: Decision
    distinct: tuple[DistinctResult, ...] = ()

    @property
    def allowed(self) -> bool:
        """Everything fit (and, unless it was a dry run, everything was recorded)."""
        return self.decision.allowed and all(r.allowed for r in self.distinct)

    @property
    def refused(self) -> int:
        """The index of the distinct charge that was refused, or -1."""
        for i, r in enumerate(self.distinct):
            if not r.allowed:
                return i
        return -1


def check_admission(distinct: Sequence[DistinctCharge]) -> None:
    """``admit`` arguments: each distinct key at most once (a key's members go in one charge)."""
    keys = [d.key for d in distinct]
    if len(set(keys)) != len(keys):
        raise ValueError("admit: a distinct key may appear only once per call")


@dataclass(frozen=True, slots=True)
class StoredEntry:
    """What a store holds under one name (for diagnostics and tests: ``inspect()``).

    ``kind``: "bucket", "distinct", "counter" or "flag"; ``ttl``: seconds until it expires by
    itself (``math.inf`` if it never would: a bug); ``data``: the stored bytes (a bucket's
    ``"<level> <updated>"``, a distinct set's member hashes concatenated, a counter's value)."""

    kind: str
    ttl: float
    data: bytes


class LimitStore(Protocol):
    """Atomic counters for rate limits. Every method raises :class:`LimitStoreUnavailable` when
    the store cannot answer, and ``ValueError`` for invalid arguments (before any I/O)."""

    async def acquire(self, charges: Sequence[Charge], *, dry_run: bool = False) -> Decision:
        """Charge every charge, or none: atomic across all of them (keys and tiers). A denial
        names the first denying charge. ``dry_run`` evaluates without charging (a peek)."""
        ...

    async def admit(
        self,
        charges: Sequence[Charge],
        distinct: Sequence[DistinctCharge] = (),
        *,
        dry_run: bool = False,
    ) -> Admission:
        """:meth:`acquire` ``charges`` and record every :class:`DistinctCharge` as
        :meth:`distinct` would, all in one atomic call: everything or nothing. The charges are
        judged first (a denial names the first denying charge, as ``acquire``'s; no distinct set
        is looked at); then the distinct charges in order, the first one its limit refuses
        refusing the whole call. ``dry_run`` evaluates without recording (a peek). Each distinct
        key may appear once."""
        ...

    async def refund(self, charges: Sequence[Charge]) -> None:
        """Give back what an earlier acquire charged (never below empty)."""
        ...

    async def usage(self, key: str, tiers: Sequence[Tier]) -> list[TierUsage]:
        """The key's current usage in each tier, in order (a peek: changes nothing)."""
        ...

    async def reset(self, key_prefix: str) -> int:
        """Delete every stored name whose key starts with ``key_prefix`` (buckets, distinct sets,
        counters, flags); returns how many were deleted. ``""`` clears the whole store."""
        ...

    async def distinct(
        self,
        key: str,
        members: Sequence[str],
        window: float,
        *,
        limit: int | None = None,
        dry_run: bool = False,
    ) -> DistinctResult:
        """Record ``members`` as seen now under ``key`` and count the distinct members seen in the
        last ``window`` seconds. With ``limit``, a call that would add new members beyond it is
        refused and adds nothing (re-seeing known members is always allowed: it does not raise the
        count). Members are hashed (:func:`hash_member`); the caller normalises them first."""
        ...

    async def incr(self, key: str, amount: int, window: float) -> int:
        """Add ``amount`` to a fixed-window counter; returns the value after. The counter expires
        ``window`` seconds after the increment that created it."""
        ...

    async def get(self, key: str) -> int:
        """A counter's current value (0 when absent or expired)."""
        ...

    async def set_flag(self, key: str, ttl: float) -> None:
        """Set (or re-set) a flag that disappears after ``ttl`` seconds."""
        ...

    async def get_flag(self, key: str) -> float | None:
        """Seconds the flag has left, or None when it is not set."""
        ...

    async def ping(self) -> None:
        """Check the store answers (raises LimitStoreUnavailable)."""
        ...

    async def close(self) -> None:
        """Release connections; the store is not used afterwards."""
        ...


# -- stored names, shared by every store ----------------------------------------------------------


def bucket_name(key: str, tier_id: str) -> str:
    return f"{key}{SEPARATOR}g:{tier_id}"


def distinct_name(key: str) -> str:
    _check_key(key)
    return f"{key}{SEPARATOR}d"


def counter_name(key: str) -> str:
    _check_key(key)
    return f"{key}{SEPARATOR}c"


def flag_name(key: str) -> str:
    _check_key(key)
    return f"{key}{SEPARATOR}f"


def kind_of(name: str) -> str:
    """ "bucket", "distinct", "counter" or "flag" for a stored name."""
    suffix = name.rpartition(SEPARATOR)[2]
    if suffix.startswith("g:"):
        return "bucket"
    return {"d": "distinct", "c": "counter", "f": "flag"}.get(suffix, "unknown")


def owner_key(name: str) -> str:
    """The caller's key a stored name belongs to (the text before its last ``|``)."""
    return name.rpartition(SEPARATOR)[0]


def matches_prefix(name: str, key_prefix: str) -> bool:
    """``reset`` selection: the owner key starts with ``key_prefix``; a prefix ending in ``|``
    selects exactly one key (``"k|"`` matches key ``k`` but not ``k2``)."""
    return (owner_key(name) + SEPARATOR).startswith(key_prefix)


def hash_member(key: str, member: str) -> bytes:
    """What a distinct set stores for ``member`` of ``key``: SHA-256 of both, first 16 bytes."""
    digest = hashlib.sha256()
    digest.update(key.encode("utf-8", "surrogatepass"))
    digest.update(b"\x00")
    digest.update(member.encode("utf-8", "surrogatepass"))
    return digest.digest()[:16]


def hashed_members(key: str, members: Sequence[str]) -> list[bytes]:
    """The distinct hashes of ``members`` (duplicates removed, first-seen order)."""
    if isinstance(members, str):
        raise ValueError("members must be a sequence of strings, not one string")
    return list(dict.fromkeys(hash_member(key, m) for m in members))


def check_window(window: float, what: str = "window") -> float:
    if isinstance(window, bool) or not isinstance(window, int | float):
        raise ValueError(f"{what} must be a number of seconds > 0, got {window!r}")
    if not math.isfinite(window) or window <= 0:
        raise ValueError(f"{what} must be a number of seconds > 0, got {window!r}")
    return float(window)


def check_limit(limit: int | None) -> None:
    if limit is not None:
        _check_amount(limit, "distinct limit")


def check_amount(amount: int, what: str = "amount") -> None:
    _check_amount(amount, what)


def check_key(key: str) -> None:
    _check_key(key)
