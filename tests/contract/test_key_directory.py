"""The key directory (cached lookups over the key store) against the real SqlKeyStore on every
database backend, with keys generated at test time: answers equal the store's, changes made by
another store object (another process or instance) are seen within ``refresh`` of a controlled
clock, expiry is exact, the store being down is StoreUnavailable, and ``last_used_at`` is written
at the configured resolution.

Every test runs on SQLite and, when MAILWARD_TEST_POSTGRES_URL is set, on PostgreSQL.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway.core.errors import StoreUnavailable
from gateway.db.engine import engine_for_url
from gateway.keys import InvalidAddress, SqlKeyStore, validate_key
from gateway.keys.directory import KeyDirectory
from gateway.keys.models import OPENPGP, OPERATOR, SMIME
from gateway.keys.store import KeyRecord
from tests.fixtures.db import unreachable_url
from tests.fixtures.keys import OpenPgpKeys, SmimeCerts


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Clock:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class CountingStore:
    """The real store, counting the reads the directory makes."""

    def __init__(self, store: SqlKeyStore) -> None:
        self.store = store
        self.keys_for_calls = 0
        self.generation_calls = 0
        self.mark_used_calls = 0

    async def keys_for(self, address: str) -> list[KeyRecord]:
        self.keys_for_calls += 1
        return await self.store.keys_for(address)

    async def generation(self) -> int:
        self.generation_calls += 1
        return await self.store.generation()

    async def mark_used(self, fingerprint: str, now: dt.datetime) -> None:
        self.mark_used_calls += 1
        await self.store.mark_used(fingerprint, now)

    async def list(self, address: str | None = None, *, kind: str | None = None) -> list[Any]:
        return await self.store.list(address, kind=kind)


@pytest.fixture
async def stores(db_url: str) -> AsyncIterator[tuple[SqlKeyStore, SqlKeyStore]]:
    """Two store objects on two engines: the gateway's and an operator's CLI (another process)."""
    engines = [engine_for_url(db_url, timeout=5.0) for _ in range(2)]
    made = [SqlKeyStore(e, timeout=5.0) for e in engines]
    try:
        yield made[0], made[1]
    finally:
        for store in made:
            await store.close()
        for engine in engines:
            await engine.dispose()


async def put(store: SqlKeyStore, data: bytes, **kwargs: Any) -> Any:
    key = await validate_key(
        data, now=now(), allow_revoked=True, address=kwargs.pop("address", None)
    )
    return await store.import_key(key, now=now(), source=OPERATOR, imported_by="cli:test", **kwargs)


def fingerprints(records: list[KeyRecord]) -> list[str]:
    return [r.fingerprint for r in records]


async def test_answers_equal_the_stores_and_repeat_lookups_are_cached(
    stores: tuple[SqlKeyStore, SqlKeyStore], openpgp_keys: OpenPgpKeys, smime_certs: SmimeCerts
) -> None:
    gateway_store, cli = stores
    await put(cli, smime_certs.valid.data)
    await put(cli, openpgp_keys.two_uids.data)
    counting = CountingStore(gateway_store)
    clock = Clock()
    directory = KeyDirectory(counting, refresh=1.0, monotonic=clock)
    t = now()
    for address in ("carol@example.com", "CAROL@Example.COM", "nobody@example.com"):
        for kind in (None, OPENPGP, SMIME):
            got = await directory.usable_keys(address, now=t, kind=kind)
            want = await cli.usable_keys(address, now=t, kind=kind)
            assert fingerprints(got) == fingerprints(want), (address, kind)
            assert all(r.material for r in got)  # the planner needs the material
    # two canonical addresses were read once each ("no key" is cached too), the counter once
    assert counting.keys_for_calls == 2 and counting.generation_calls == 1
    with pytest.raises(InvalidAddress):
        await directory.usable_keys("bob%example.org@example.com", now=t)


async def test_a_revocation_by_another_process_is_seen_within_refresh(
    stores: tuple[SqlKeyStore, SqlKeyStore], openpgp_keys: OpenPgpKeys
) -> None:
    gateway_store, cli = stores
    await put(cli, openpgp_keys.valid.data)
    clock = Clock()
    directory = KeyDirectory(gateway_store, refresh=1.0, monotonic=clock)
    assert await directory.usable_keys("alice@example.com", now=now())
    await cli.revoke(openpgp_keys.valid.fingerprint, now=now(), revoked_by="cli:op")
    clock.t += 0.5  # within refresh: the cached answer may still be served
    assert await directory.usable_keys("alice@example.com", now=now())
    clock.t += 0.5  # refresh elapsed: the counter moved, the cache is emptied
    assert await directory.usable_keys("alice@example.com", now=now()) == []


@pytest.mark.parametrize("change", ["import", "remove", "verify"])
async def test_every_change_moves_the_counter(
    stores: tuple[SqlKeyStore, SqlKeyStore], openpgp_keys: OpenPgpKeys, change: str
) -> None:
    gateway_store, cli = stores
    directory = KeyDirectory(gateway_store, refresh=0.0)
    if change == "import":
        assert await directory.usable_keys("alice@example.com", now=now()) == []
        before = await cli.generation()
        await put(cli, openpgp_keys.valid.data)
        assert await cli.generation() == before + 1
        assert fingerprints(await directory.usable_keys("alice@example.com", now=now())) == [
            openpgp_keys.valid.fingerprint
        ]
    elif change == "remove":
        await put(cli, openpgp_keys.valid.data)
        assert await directory.usable_keys("alice@example.com", now=now())
        before = await cli.generation()
        await cli.remove(openpgp_keys.valid.fingerprint, removed_by="cli:op")
        assert await cli.generation() == before + 1
        assert await directory.usable_keys("alice@example.com", now=now()) == []
    else:
        await put(cli, openpgp_keys.valid.data)
        (first,) = await directory.usable_keys("alice@example.com", now=now())
        before = await cli.generation()
        await cli.set_verification(first.fingerprint, "verified", now=now(), by="cli:op")
        assert await cli.generation() == before + 1
        (again,) = await directory.usable_keys("alice@example.com", now=now())
        assert again.verification == "verified"


async def test_recording_use_is_not_a_change(
    stores: tuple[SqlKeyStore, SqlKeyStore], openpgp_keys: OpenPgpKeys
) -> None:
    _, cli = stores
    await put(cli, openpgp_keys.valid.data)
    before = await cli.generation()
    await cli.mark_used(openpgp_keys.valid.fingerprint, now())
    assert await cli.generation() == before


async def test_expiry_is_exact_whatever_the_cache(
    stores: tuple[SqlKeyStore, SqlKeyStore], openpgp_keys: OpenPgpKeys
) -> None:
    gateway_store, cli = stores
    await put(cli, openpgp_keys.expiring.data)
    (address,) = openpgp_keys.expiring.addresses
    directory = KeyDirectory(gateway_store, refresh=3600.0, monotonic=Clock())
    t = now()
    (record,) = await directory.usable_keys(address, now=t)
    until = record.usable_until
    assert until is not None
    assert await directory.usable_keys(address, now=until - dt.timedelta(seconds=1))
    assert await directory.usable_keys(address, now=until) == []  # cached, and expired
    # and a key not valid yet is returned once it is (the cache holds it whatever its dates)
    assert await directory.usable_keys(address, now=record.created_at - dt.timedelta(days=1)) == []
    assert await directory.usable_keys(address, now=t)


async def test_store_down_is_store_unavailable_once_refresh_has_elapsed(
    stores: tuple[SqlKeyStore, SqlKeyStore],
    openpgp_keys: OpenPgpKeys,
    db_backend: str,
    tmp_path: Path,
) -> None:
    gateway_store, cli = stores
    await put(cli, openpgp_keys.valid.data)
    clock = Clock()
    directory = KeyDirectory(gateway_store, refresh=1.0, monotonic=clock)
    assert await directory.usable_keys("alice@example.com", now=now())
    gateway_store._engine = engine_for_url(unreachable_url(db_backend, tmp_path), pooled=False)
    clock.t += 1.0
    for _ in range(2):  # no cached answer is served as a fallback, not even the second time
        with pytest.raises(StoreUnavailable):
            await directory.usable_keys("alice@example.com", now=now())
    # with refresh 0 the very first lookup reads the counter
    with pytest.raises(StoreUnavailable):
        await KeyDirectory(gateway_store, refresh=0.0).usable_keys("bob@example.com", now=now())


async def test_concurrent_lookups_share_one_counter_read(
    stores: tuple[SqlKeyStore, SqlKeyStore], openpgp_keys: OpenPgpKeys
) -> None:
    gateway_store, cli = stores
    await put(cli, openpgp_keys.valid.data)
    counting = CountingStore(gateway_store)
    directory = KeyDirectory(counting, refresh=1.0, monotonic=Clock())
    found = await asyncio.gather(
        *(directory.usable_keys("alice@example.com", now=now()) for _ in range(10))
    )
    assert all(fingerprints(f) == [openpgp_keys.valid.fingerprint] for f in found)
    assert counting.generation_calls == 1


async def test_cache_size_is_bounded_and_zero_disables_it(
    stores: tuple[SqlKeyStore, SqlKeyStore], openpgp_keys: OpenPgpKeys
) -> None:
    gateway_store, cli = stores
    await put(cli, openpgp_keys.valid.data)
    counting = CountingStore(gateway_store)
    directory = KeyDirectory(counting, refresh=1.0, max_entries=2, monotonic=Clock())
    for address in ("a@example.com", "b@example.com", "c@example.com", "a@example.com"):
        await directory.usable_keys(address, now=now())
    assert counting.keys_for_calls == 4  # a was the oldest of three: evicted, read again
    assert len(directory._entries) == 2
    off = CountingStore(gateway_store)
    uncached = KeyDirectory(off, max_entries=0)
    for _ in range(3):
        assert await uncached.usable_keys("alice@example.com", now=now())
    assert off.keys_for_calls == 3 and off.generation_calls == 0


async def test_last_used_is_written_at_the_resolution(
    stores: tuple[SqlKeyStore, SqlKeyStore], openpgp_keys: OpenPgpKeys
) -> None:
    gateway_store, cli = stores
    await put(cli, openpgp_keys.valid.data)
    counting = CountingStore(gateway_store)
    directory = KeyDirectory(counting, refresh=1.0, last_used_resolution=60.0, monotonic=Clock())
    (record,) = await directory.usable_keys("alice@example.com", now=now())
    t0 = now()
    await asyncio.gather(*(directory.mark_used(record, t0) for _ in range(5)))
    await directory.mark_used(record, t0 + dt.timedelta(seconds=59))
    assert counting.mark_used_calls == 1  # concurrent and recent uses: one write
    stored = await cli.get(record.fingerprint)
    assert stored is not None and stored.last_used_at == t0
    await directory.mark_used(record, t0 + dt.timedelta(seconds=60))
    assert counting.mark_used_calls == 2
    stored = await cli.get(record.fingerprint)
    assert stored is not None and stored.last_used_at == t0 + dt.timedelta(seconds=60)
    every = KeyDirectory(counting, last_used_resolution=0.0)
    await every.mark_used(record, t0 + dt.timedelta(seconds=61))
    assert counting.mark_used_calls == 3


async def test_a_failed_use_record_is_tried_again(
    stores: tuple[SqlKeyStore, SqlKeyStore],
    openpgp_keys: OpenPgpKeys,
    db_backend: str,
    tmp_path: Path,
) -> None:
    gateway_store, cli = stores
    await put(cli, openpgp_keys.valid.data)
    directory = KeyDirectory(gateway_store, refresh=1.0, monotonic=Clock())
    (record,) = await directory.usable_keys("alice@example.com", now=now())
    working = gateway_store._engine
    gateway_store._engine = engine_for_url(unreachable_url(db_backend, tmp_path), pooled=False)
    t0 = now()
    with pytest.raises(StoreUnavailable):
        await directory.mark_used(record, t0)
    gateway_store._engine = working
    await directory.mark_used(record, t0 + dt.timedelta(seconds=1))  # not skipped: written now
    stored = await cli.get(record.fingerprint)
    assert stored is not None and stored.last_used_at == t0 + dt.timedelta(seconds=1)
