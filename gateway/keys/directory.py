"""The gateway's view of the key store: per-recipient key lookups cached in process, validated
against the store's change counter, and use recorded at a bounded rate.

What it does: :class:`KeyDirectory` answers the two questions the hot path asks of the key store
-- "which keys are usable for this recipient now?" (the ``encryption`` check at RCPT) and "record
that this key was used" (the planner at end of data) -- without a database round trip per
recipient and per message:

* **Lookups.** :meth:`KeyDirectory.usable_keys` keeps, per canonical address, what
  :meth:`~gateway.keys.store.SqlKeyStore.keys_for` returned: every non-revoked key of the address
  with its material, preferred first, *whatever its dates* -- or nothing (most recipients have no
  key; that answer is cached too). The use-time checks are made on every lookup from the cached
  dates (:meth:`~gateway.keys.store.KeyRecord.is_usable` at the ``now`` given): a key that expired
  a second ago is never returned, cache or not.
* **Freshness.** Every change to the store increments its change counter in the same transaction
  (``encryption_key_generation``, revision ``0009``). The directory reads the counter at most every
  ``refresh`` seconds (``keys.lookup_refresh``, default 1 s; one small read, shared by all lookups
  waiting for it) and empties itself when it moved. So a key imported, revoked, removed or
  re-verified by ``mailward key ...`` -- on this instance or any other sharing the database --
  takes effect on every gateway within ``refresh`` seconds; ``refresh = 0`` validates on every
  lookup (always current, one read per lookup). A lookup that started before a change cannot put
  its stale answer into a cache emptied after it (an epoch counter guards the insert).
* **Store down.** When the counter cannot be read, the lookup raises
  :class:`~gateway.core.errors.StoreUnavailable` (the check answers 451): cached answers are
  served only while they are known to be at most ``refresh`` seconds old, never as a fallback.
* **Size.** At most ``max_entries`` addresses are kept (``keys.lookup_cache_size``); the oldest
  entry goes first. ``max_entries = 0`` disables the cache (every lookup reads the store).
* **Use.** :meth:`KeyDirectory.mark_used` writes ``last_used_at`` only when the value this
  process knows (from the record, or its own last write) is older than ``last_used_resolution``
  seconds (``keys.last_used_resolution``, default 60 s): ``last_used_at`` is then exact to that
  resolution, and a busy key costs one write per minute instead of one per message.

Reads: the key store (:class:`~gateway.keys.store.SqlKeyStore`): ``keys_for``, ``generation``,
``list`` (passed through, for the check's explanations); writes ``last_used_at`` through
``mark_used``.

Security notes: the cache holds public key material and addresses only, in this process's memory;
nothing is logged here. Revocation reaches a running gateway within ``refresh`` seconds (document
that to operators; set ``refresh = 0`` where that is too long); expiry is exact.
"""

from __future__ import annotations

import asyncio
import builtins
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Protocol

from gateway.keys.address import canonical_address
from gateway.keys.store import KeyRecord


class KeySource(Protocol):
    """What the directory needs of the key store (:class:`gateway.keys.store.SqlKeyStore`)."""

    async def keys_for(self, address: str) -> builtins.list[KeyRecord]: ...

    async def generation(self) -> int: ...

    async def mark_used(self, fingerprint: str, now: datetime) -> None: ...

    async def list(
        self, address: str | None = None, *, kind: str | None = None
    ) -> builtins.list[KeyRecord]: ...


class KeyDirectory:
    """Cached, counter-validated key lookups and rate-bounded use records (module docstring)."""

    def __init__(
        self,
        store: KeySource,
        *,
        refresh: float = 1.0,
        max_entries: int = 100_000,
        last_used_resolution: float = 60.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if refresh < 0 or max_entries < 0 or last_used_resolution < 0:
            raise ValueError("refresh, max_entries and last_used_resolution must be >= 0")
        self.store = store
        self.refresh = refresh
        self.max_entries = max_entries
        self.resolution = timedelta(seconds=last_used_resolution)
        self._monotonic = monotonic
        self._entries: dict[str, tuple[KeyRecord, ...]] = {}
        self._generation: int | None = None
        self._validated_at = float("-inf")
        self._epoch = 0
        self._validating: asyncio.Future[None] | None = None
        self._used: dict[str, datetime] = {}

    # --- lookups ------------------------------------------------------------------------------

    async def usable_keys(
        self, address: str, *, now: datetime, kind: str | None = None
    ) -> builtins.list[KeyRecord]:
        """The keys usable at ``now`` for ``address``, preferred first (the contract of
        :meth:`gateway.keys.store.SqlKeyStore.usable_keys`). Raises InvalidAddress,
        StoreUnavailable."""
        canonical = canonical_address(address)
        records = await self._lookup(canonical)
        return [r for r in records if r.is_usable(now) and (kind is None or r.kind == kind)]

    async def list(
        self, address: str | None = None, *, kind: str | None = None
    ) -> builtins.list[KeyRecord]:
        """Every stored key of ``address`` (any state, no material), straight from the store: the
        check's explanation of why no key is usable (a refusal, not the hot path)."""
        return await self.store.list(address, kind=kind)

    async def _lookup(self, canonical: str) -> tuple[KeyRecord, ...]:
        if self.max_entries == 0:
            return tuple(await self.store.keys_for(canonical))
        await self._validate()
        cached = self._entries.get(canonical)
        if cached is not None:
            return cached
        epoch = self._epoch
        records = tuple(await self.store.keys_for(canonical))
        if epoch == self._epoch:  # not emptied meanwhile: the answer is not older than the cache
            if len(self._entries) >= self.max_entries:
                del self._entries[next(iter(self._entries))]
            self._entries[canonical] = records
        return records

    async def _validate(self) -> None:
        """Make sure the cache reflects a counter read at most ``refresh`` seconds ago (with
        ``refresh = 0``: read by this very lookup). Concurrent lookups share one read."""
        if self.refresh == 0:
            self._observe(await self.store.generation(), self._monotonic())
            return
        while self._monotonic() - self._validated_at >= self.refresh:
            pending = self._validating
            if pending is not None:
                await asyncio.shield(pending)  # re-raises the read's StoreUnavailable
                continue
            started = self._monotonic()
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._validating = future
            try:
                generation = await self.store.generation()
            except Exception as exc:
                future.set_exception(exc)
                future.exception()  # marked retrieved: only the waiters re-raise it
                raise
            except BaseException:
                future.set_result(None)  # this lookup was cancelled: the waiters read again
                raise
            finally:
                self._validating = None
            self._observe(generation, started)
            future.set_result(None)

    def _observe(self, generation: int, read_started: float) -> None:
        if generation != self._generation:
            self.clear()
            self._generation = generation
        self._validated_at = read_started

    def clear(self) -> None:
        """Forget every cached answer (the next lookups read the store)."""
        self._entries.clear()
        self._used.clear()
        self._epoch += 1

    # --- use ----------------------------------------------------------------------------------

    async def mark_used(self, record: KeyRecord, now: datetime) -> None:
        """Record that ``record`` was used at ``now`` when the last known use is older than the
        resolution (see the module docstring). Raises StoreUnavailable (the known value is then
        left as it was, so the next use tries again)."""
        fingerprint = record.fingerprint
        known = self._used.get(fingerprint, record.last_used_at)
        if known is not None and now - known < self.resolution:
            return
        self._used[fingerprint] = now  # concurrent uses of the key do not write again
        try:
            await self.store.mark_used(fingerprint, now)
        except BaseException:
            if self._used.get(fingerprint) == now:
                if known is None:
                    self._used.pop(fingerprint, None)
                else:
                    self._used[fingerprint] = known
            raise


__all__ = ["KeyDirectory", "KeySource"]
