"""Limit stores: atomic counters for rate limits ("counts only; checks decide").

What it does: re-exports the port and its types (:mod:`gateway.ratelimit.store`), the in-process
store (:mod:`gateway.ratelimit.memory`) and :func:`open_limit_store`, which opens a store from a
URL: ``memory://`` or ``redis://`` / ``rediss://`` / ``unix://``. The Redis store
(:mod:`gateway.ratelimit.redis_store`, the only importer of ``redis``) is imported only when a Redis
URL is opened.

Reads: nothing itself.

Security notes: a Redis URL may carry a password: it is passed to the client and never logged.
"""

from __future__ import annotations

from gateway.ratelimit.memory import MemoryLimitStore
from gateway.ratelimit.store import (
    Charge,
    Decision,
    DistinctResult,
    LimitStore,
    LimitStoreUnavailable,
    Remaining,
    Tier,
    TierUsage,
)

REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def open_limit_store(
    url: str,
    *,
    prefix: str = "mw:rl:",
    timeout: float = 0.5,
    max_keys: int = 1_000_000,
) -> LimitStore:
    """A store for ``url``: ``memory://`` (``max_keys`` applies) or a Redis URL (``prefix`` and
    ``timeout`` apply). Opening connects to nothing; the first call (or ``ping()``) does.
    Raises ValueError for any other URL."""
    if url == "memory://":
        return MemoryLimitStore(max_keys=max_keys)
    if url.startswith(REDIS_SCHEMES):
        from gateway.ratelimit.redis_store import RedisLimitStore

        return RedisLimitStore(url, prefix=prefix, timeout=timeout)
    scheme = url.partition("://")[0] if "://" in url else "(none)"
    raise ValueError(f"unsupported limit store URL scheme {scheme!r}: use memory:// or redis://")


__all__ = [
    "Charge",
    "Decision",
    "DistinctResult",
    "LimitStore",
    "LimitStoreUnavailable",
    "MemoryLimitStore",
    "Remaining",
    "Tier",
    "TierUsage",
    "open_limit_store",
]
