"""Contract of the key store: SqlKeyStore on every database backend, with keys and certificates
generated at test time and validated by the real import path (gpg, cryptography).

Every test taking ``db_url`` runs on SQLite and, when MAILWARD_TEST_POSTGRES_URL is set, on
PostgreSQL (tests/fixtures/db.py).
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from sqlalchemy import func, select, text

from gateway.core.errors import StoreUnavailable
from gateway.db.engine import engine_for_url
from gateway.keys import (
    InvalidAddress,
    KeyNotFound,
    KeyRejected,
    SqlKeyStore,
    ValidatedKey,
    normalize_fingerprint,
    validate_key,
)
from gateway.keys.models import OPENPGP, OPERATOR, SMIME, UNVERIFIED, USER, VERIFIED
from gateway.keys.store import ADDRESSES, KEYS
from tests.fixtures.db import unreachable_url
from tests.fixtures.keys import OpenPgpKeys, SmimeCerts


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@pytest.fixture
async def engine(db_url: str) -> AsyncIterator[Any]:
    engine = engine_for_url(db_url, timeout=5.0)
    try:
        yield engine
    finally:
        await engine.dispose()


@pytest.fixture
async def store(engine: Any) -> AsyncIterator[SqlKeyStore]:
    store = SqlKeyStore(engine, timeout=5.0)
    try:
        yield store
    finally:
        await store.close()


async def valid(data: bytes, **kwargs: Any) -> ValidatedKey:
    return await validate_key(data, now=now(), allow_revoked=True, **kwargs)


async def put(store: SqlKeyStore, data: bytes, **kwargs: Any) -> Any:
    address = kwargs.pop("address", None)
    key = await valid(data, address=address)
    kwargs.setdefault("source", OPERATOR)
    kwargs.setdefault("imported_by", "cli:test")
    return await store.import_key(key, now=kwargs.pop("at", now()), **kwargs)


async def audit_rows(engine: Any) -> list[tuple[str, str, str]]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            text("SELECT kind, listener, detail FROM audit_record ORDER BY id")
        )
        return [tuple(r) for r in rows]


async def counts(engine: Any) -> tuple[int, int]:
    async with engine.connect() as conn:
        keys = (await conn.execute(select(func.count()).select_from(KEYS))).scalar_one()
        addresses = (await conn.execute(select(func.count()).select_from(ADDRESSES))).scalar_one()
    return int(keys), int(addresses)


# --- import and read back -------------------------------------------------------------------------


async def test_import_and_get_round_trip(store: SqlKeyStore, openpgp_keys: OpenPgpKeys) -> None:
    before = now()
    result = await put(store, openpgp_keys.two_uids.data, source=USER, imported_by="cli:alice")
    assert result.action == "imported"
    record = result.record
    assert record.fingerprint == openpgp_keys.two_uids.fingerprint
    assert record.kind == OPENPGP
    assert record.addresses == ("carol.work@example.org", "carol@example.com")
    assert set(record.user_ids) == {
        "Carol <carol@example.com>",
        "Carol Work <Carol.Work@Example.ORG>",
    }
    assert record.source == USER
    assert record.verification == UNVERIFIED
    assert record.revoked is False and record.revoked_at is None
    assert record.last_used_at is None
    assert record.imported_by == "cli:alice"
    assert before <= record.imported_at <= now()
    assert record.material is None  # listings and results carry no material
    got = await store.get(record.fingerprint)
    assert got is not None
    validated = await valid(openpgp_keys.two_uids.data)
    assert got.material == validated.material
    assert got.material_sha256 == validated.material_sha256
    assert got.created_at == validated.created_at
    assert got.algorithm == "ed25519/cv25519"
    assert got.armored().startswith("-----BEGIN PGP PUBLIC KEY BLOCK-----")
    assert await store.get("0" * 40) is None


async def test_armored_material_imports_again(
    store: SqlKeyStore, openpgp_keys: OpenPgpKeys, smime_certs: SmimeCerts
) -> None:
    await put(store, openpgp_keys.valid.data)
    await put(store, smime_certs.der.data)
    pgp = await store.get(openpgp_keys.valid.fingerprint)
    cert = await store.get(smime_certs.der.fingerprint)
    assert pgp is not None and cert is not None
    again = await valid(pgp.armored().encode())
    assert again.fingerprint == pgp.fingerprint and again.material == pgp.material
    assert cert.armored().startswith("-----BEGIN CERTIFICATE-----")
    assert (await valid(cert.armored().encode())).material == cert.material


async def test_certificates_are_stored_with_their_dates(
    store: SqlKeyStore, smime_certs: SmimeCerts
) -> None:
    record = (await put(store, smime_certs.valid.data, verification=VERIFIED)).record
    assert record.kind == SMIME
    assert record.fingerprint == smime_certs.valid.fingerprint
    assert record.addresses == ("carol@example.com",)
    assert record.expires_at == smime_certs.valid.cert.not_valid_after_utc
    assert record.created_at == smime_certs.valid.cert.not_valid_before_utc
    assert record.verification == VERIFIED
    got = await store.get(record.fingerprint)
    assert got is not None
    assert got.material == smime_certs.valid.cert.public_bytes(Encoding.DER)


async def test_list_all_and_by_address(
    store: SqlKeyStore, openpgp_keys: OpenPgpKeys, smime_certs: SmimeCerts
) -> None:
    await put(store, openpgp_keys.valid.data)
    await put(store, openpgp_keys.two_uids.data)
    await put(store, smime_certs.valid.data)
    everything = await store.list()
    assert [r.fingerprint for r in everything] == [
        openpgp_keys.valid.fingerprint,
        openpgp_keys.two_uids.fingerprint,
        smime_certs.valid.fingerprint,
    ]
    assert all(r.material is None for r in everything)
    carol = await store.list("CAROL@EXAMPLE.COM")
    assert {r.fingerprint for r in carol} == {
        openpgp_keys.two_uids.fingerprint,
        smime_certs.valid.fingerprint,
    }
    assert [r.fingerprint for r in await store.list("carol@example.com", kind=SMIME)] == [
        smime_certs.valid.fingerprint
    ]
    assert await store.list("nobody@example.com") == []
    with pytest.raises(InvalidAddress):
        await store.list("a%b@example.com")


# --- use-time lookup ------------------------------------------------------------------------------


async def test_usable_keys_by_canonical_address(
    store: SqlKeyStore, openpgp_keys: OpenPgpKeys
) -> None:
    await put(store, openpgp_keys.two_uids.data)
    await put(store, openpgp_keys.idn.data)
    t = now()
    for address in ("carol@example.com", "Carol@Example.COM", "CAROL.WORK@example.org"):
        (record,) = await store.usable_keys(address, now=t)
        assert record.fingerprint == openpgp_keys.two_uids.fingerprint
        assert record.material is not None  # what the transform encrypts with
    for address in ("jörg@bücher.example", "Jörg@BÜCHER.EXAMPLE", "jörg@xn--bcher-kva.example"):
        (record,) = await store.usable_keys(address, now=t)
        assert record.fingerprint == openpgp_keys.idn.fingerprint
    assert await store.usable_keys("carol@example.net", now=t) == []
    assert await store.usable_keys("carol+tag@example.com", now=t) == []


@pytest.mark.parametrize(
    "address",
    ["carol%example.com@relay.example", "@relay.example:carol@example.com", '"carol"@example.com'],
)
async def test_usable_keys_refuses_forms_that_could_miss_a_key(
    store: SqlKeyStore, openpgp_keys: OpenPgpKeys, address: str
) -> None:
    await put(store, openpgp_keys.two_uids.data)
    with pytest.raises(InvalidAddress):
        await store.usable_keys(address, now=now())


async def test_expiry_is_checked_at_use_time(
    store: SqlKeyStore, openpgp_keys: OpenPgpKeys, smime_certs: SmimeCerts
) -> None:
    await put(store, openpgp_keys.expiring.data)
    await put(store, openpgp_keys.expiring_subkey.data)
    await put(store, smime_certs.valid.data)
    t = now()
    later = t + dt.timedelta(days=3)
    for key in (openpgp_keys.expiring, openpgp_keys.expiring_subkey):
        (address,) = key.addresses
        assert [r.fingerprint for r in await store.usable_keys(address, now=t)] == [key.fingerprint]
        assert await store.usable_keys(address, now=later) == []  # expired since the import
        (listed,) = await store.list(address)
        assert listed.state(t) == "usable" and listed.state(later) == "expired"
    # the primary key never expires, its only encryption subkey does: the subkey decides
    soon = (await store.list("soon@example.com"))[0]
    assert soon.expires_at is None and soon.encryption_expires_at is not None
    assert soon.usable_until == soon.encryption_expires_at
    cert_end = smime_certs.valid.cert.not_valid_after_utc
    assert await store.usable_keys("carol@example.com", now=cert_end - dt.timedelta(seconds=1))
    assert await store.usable_keys("carol@example.com", now=cert_end) == []
    # before the key existed it is not usable either
    assert await store.usable_keys("carol@example.com", now=t - dt.timedelta(days=30)) == []
    every = await store.all_usable_keys(now=later)
    assert [r.fingerprint for r in every] == [smime_certs.valid.fingerprint]


async def test_revoked_keys_are_never_returned(
    store: SqlKeyStore, engine: Any, openpgp_keys: OpenPgpKeys
) -> None:
    await put(store, openpgp_keys.valid.data)
    assert await store.usable_keys("alice@example.com", now=now())
    revoked = await store.revoke(openpgp_keys.valid.fingerprint, now=now(), revoked_by="cli:op")
    assert revoked.revoked and revoked.revoked_at is not None
    assert await store.usable_keys("alice@example.com", now=now()) == []
    assert await store.all_usable_keys(now=now()) == []
    assert revoked.state(now()) == "revoked"
    again = await store.revoke(openpgp_keys.valid.fingerprint, now=now(), revoked_by="cli:op")
    assert again.revoked_at == revoked.revoked_at  # revoking twice changes nothing
    with pytest.raises(KeyRejected, match="revoked in the store"):
        await put(store, openpgp_keys.valid.data)  # and it cannot come back
    kinds = [row[0] for row in await audit_rows(engine)]
    assert kinds == ["key-import", "key-revoke"]
    with pytest.raises(KeyNotFound):
        await store.revoke("A" * 40, now=now(), revoked_by="cli:op")


async def test_importing_the_revoked_key_records_the_revocation(
    store: SqlKeyStore, openpgp_keys: OpenPgpKeys
) -> None:
    with pytest.raises(KeyRejected, match="revoked"):
        await put(store, openpgp_keys.revoked.data)  # not in the store: refused
    assert await store.list() == []
    first = await put(store, openpgp_keys.revoked_before.data)
    assert await store.usable_keys("rev@example.com", now=now())
    result = await put(store, openpgp_keys.revoked.data)
    assert result.action == "revoked"
    assert result.record.revoked
    assert result.record.addresses == first.record.addresses
    assert await store.usable_keys("rev@example.com", now=now()) == []
    stored = await store.get(openpgp_keys.revoked.fingerprint)
    assert stored is not None
    assert stored.material == (await valid(openpgp_keys.revoked.data)).material


async def test_preference_order(
    store: SqlKeyStore, openpgp_keys: OpenPgpKeys, smime_certs: SmimeCerts
) -> None:
    # carol@example.com: an S/MIME certificate (imported first) and an OpenPGP key
    await put(store, smime_certs.valid.data)
    await put(store, openpgp_keys.two_uids.data)
    found = await store.usable_keys("carol@example.com", now=now())
    assert [r.kind for r in found] == [OPENPGP, SMIME]
    assert [
        r.kind for r in await store.usable_keys("carol@example.com", now=now(), kind=SMIME)
    ] == [SMIME]


async def test_verified_keys_come_first(
    store: SqlKeyStore, engine: Any, openpgp_keys: OpenPgpKeys
) -> None:
    older = await put(store, openpgp_keys.valid.data)
    newer = await put(store, openpgp_keys.wrong_uid.data)
    # record the wrong-UID key for alice as well, directly: two OpenPGP keys for one address
    async with engine.begin() as conn:
        await conn.execute(
            ADDRESSES.insert(), {"key_id": newer.record.id, "address": "alice@example.com"}
        )
    found = await store.usable_keys("alice@example.com", now=now())
    assert len(found) == 2
    await store.set_verification(older.record.fingerprint, VERIFIED, now=now(), by="cli:op")
    found = await store.usable_keys("alice@example.com", now=now())
    assert found[0].fingerprint == older.record.fingerprint
    assert found[0].verification == VERIFIED


async def test_mark_used_moves_forward_only(store: SqlKeyStore, openpgp_keys: OpenPgpKeys) -> None:
    fpr = (await put(store, openpgp_keys.valid.data)).record.fingerprint
    t1 = now()
    await store.mark_used(fpr, t1)
    got = await store.get(fpr)
    assert got is not None and got.last_used_at == t1
    await store.mark_used(fpr, t1 - dt.timedelta(hours=1))
    got = await store.get(fpr)
    assert got is not None and got.last_used_at == t1
    t2 = t1 + dt.timedelta(minutes=5)
    await store.mark_used(fpr, t2)
    (record,) = await store.usable_keys("alice@example.com", now=t2)
    assert record.last_used_at == t2
    await store.mark_used("B" * 40, t2)  # unknown (removed meanwhile): nothing happens


# --- updates, removal, audit ----------------------------------------------------------------------


async def test_reimport_updates_and_keeps_addresses_the_key_still_names(
    store: SqlKeyStore, engine: Any, openpgp_keys: OpenPgpKeys
) -> None:
    first = await put(store, openpgp_keys.two_uids.data, address="carol@example.com")
    assert first.record.addresses == ("carol@example.com",)
    await store.mark_used(first.record.fingerprint, now())
    second = await put(
        store,
        openpgp_keys.two_uids.data,
        address="carol.work@example.org",
        source=USER,
        verification=VERIFIED,
    )
    assert second.action == "updated"
    assert second.record.id == first.record.id
    assert second.record.addresses == ("carol.work@example.org", "carol@example.com")
    assert second.record.source == USER and second.record.verification == VERIFIED
    assert second.record.last_used_at is not None  # kept
    third = await put(store, openpgp_keys.two_uids.data)  # verification None: kept
    assert third.record.verification == VERIFIED
    assert await counts(engine) == (1, 2)
    details = [row for row in await audit_rows(engine)]
    assert [d[0] for d in details] == ["key-import"] * 3
    assert "imported" in details[0][2] and "updated" in details[1][2]
    assert all(d[1] == "cli" for d in details)


async def test_remove_deletes_key_and_addresses_and_audits(
    store: SqlKeyStore, engine: Any, openpgp_keys: OpenPgpKeys
) -> None:
    fpr = (await put(store, openpgp_keys.two_uids.data)).record.fingerprint
    await put(store, openpgp_keys.valid.data)
    assert await counts(engine) == (2, 3)
    removed = await store.remove(fpr, removed_by="cli:op")
    assert removed.fingerprint == fpr
    assert await counts(engine) == (1, 1)
    assert await store.usable_keys("carol@example.com", now=now()) == []
    with pytest.raises(KeyNotFound):
        await store.remove(fpr, removed_by="cli:op")
    kind, listener, detail = (await audit_rows(engine))[-1]
    assert kind == "key-remove" and listener == "cli"
    assert fpr in detail and "cli:op" in detail and "carol@example.com" in detail


async def test_address_rows_cascade_with_their_key(
    store: SqlKeyStore, engine: Any, openpgp_keys: OpenPgpKeys
) -> None:
    fpr = (await put(store, openpgp_keys.two_uids.data)).record.fingerprint
    async with engine.begin() as conn:
        await conn.execute(KEYS.delete().where(KEYS.c.fingerprint == fpr))
    assert await counts(engine) == (0, 0)


async def test_failed_import_stores_nothing_and_audits_nothing(
    store: SqlKeyStore, engine: Any, openpgp_keys: OpenPgpKeys
) -> None:
    with pytest.raises(KeyRejected):
        await put(store, openpgp_keys.revoked.data)
    assert await counts(engine) == (0, 0)
    assert await audit_rows(engine) == []


async def test_set_verification(store: SqlKeyStore, engine: Any, openpgp_keys: OpenPgpKeys) -> None:
    fpr = (await put(store, openpgp_keys.valid.data)).record.fingerprint
    record = await store.set_verification(fpr, VERIFIED, now=now(), by="cli:op")
    assert record.verification == VERIFIED
    record = await store.set_verification(fpr, UNVERIFIED, now=now(), by="cli:op")
    assert record.verification == UNVERIFIED
    with pytest.raises(KeyNotFound):
        await store.set_verification("C" * 40, VERIFIED, now=now(), by="cli:op")
    with pytest.raises(ValueError, match="verification"):
        await store.set_verification(fpr, "trusted", now=now(), by="cli:op")
    assert [row[0] for row in await audit_rows(engine)] == [
        "key-import",
        "key-verify",
        "key-verify",
    ]


async def test_schema_constraints(engine: Any) -> None:
    async with engine.connect() as conn:
        with pytest.raises(Exception):  # noqa: B017  (IntegrityError on both backends)
            await conn.execute(
                KEYS.insert(),
                {
                    "fingerprint": "D" * 40,
                    "kind": "x509",
                    "algorithm": "a",
                    "user_ids": [],
                    "created_at": now(),
                    "revoked": False,
                    "source": OPERATOR,
                    "verification": UNVERIFIED,
                    "imported_at": now(),
                    "imported_by": "t",
                    "updated_at": now(),
                    "material": b"x",
                    "material_sha256": "0" * 64,
                },
            )


def test_normalize_fingerprint() -> None:
    fpr = "F087D4805439C652657B55B5CA1EF57A52352201"
    assert normalize_fingerprint(fpr.lower()) == fpr
    assert normalize_fingerprint("F087 D480 5439 C652 657B  55B5 CA1E F57A 5235 2201") == fpr
    assert normalize_fingerprint("0x" + fpr) == fpr
    assert normalize_fingerprint("ab:" * 31 + "ab") == "AB" * 32
    for bad in ("CA1EF57A52352201", "G" * 40, "", fpr + "0"):
        with pytest.raises(ValueError):
            normalize_fingerprint(bad)


# --- database failures ----------------------------------------------------------------------------


async def test_unreachable_database_raises_store_unavailable(
    db_backend: str, tmp_path: Path, openpgp_keys: OpenPgpKeys
) -> None:
    engine = engine_for_url(unreachable_url(db_backend, tmp_path), timeout=2.0)
    store = SqlKeyStore(engine, timeout=2.0)
    key = await valid(openpgp_keys.valid.data)
    start = time.monotonic()
    try:
        with pytest.raises(StoreUnavailable) as info:
            await store.usable_keys("alice@example.com", now=now())
        with pytest.raises(StoreUnavailable):
            await store.mark_used(key.fingerprint, now())
        with pytest.raises(StoreUnavailable):
            await store.import_key(key, now=now(), source=OPERATOR, imported_by="t")
        with pytest.raises(StoreUnavailable):
            await store.list()
        with pytest.raises(StoreUnavailable):
            await store.get(key.fingerprint)
        with pytest.raises(StoreUnavailable):
            await store.remove(key.fingerprint, removed_by="t")
        with pytest.raises(StoreUnavailable):
            await store.all_usable_keys(now=now())
    finally:
        await store.close()
        await engine.dispose()
    assert time.monotonic() - start < 20
    assert "key store" in str(info.value) and "unavailable" in str(info.value)
    assert "secret-pw" not in str(info.value)
    assert info.value.reply.code == 451 and info.value.reply.is_temporary


async def test_missing_schema_is_store_unavailable(empty_db_url: str) -> None:
    engine = engine_for_url(empty_db_url, timeout=2.0)
    store = SqlKeyStore(engine, timeout=2.0)
    try:
        with pytest.raises(StoreUnavailable, match="key store"):
            await store.usable_keys("alice@example.com", now=now())
    finally:
        await store.close()
        await engine.dispose()
