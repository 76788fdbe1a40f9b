"""Contract of SqlAccountStore (AccountStore port + admin API) on every database backend."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest
from argon2 import PasswordHasher
from sqlalchemy import select, text, update

import gateway.auth.store as store_module
from gateway.app import Stores
from gateway.auth.models import Account
from gateway.auth.passwords import WeakPassword, needs_rehash
from gateway.auth.store import (
    AccountError,
    DuplicateLogin,
    DuplicatePattern,
    InvalidLogin,
    InvalidPattern,
    PatternNotFound,
    SqlAccountStore,
    UnknownLogin,
)
from gateway.core.errors import CredentialStoreUnavailable
from gateway.db.engine import engine_for_url
from gateway.db.migrate import upgrade
from tests.fixtures.db import (
    drop_postgres_database,
    postgres_database,
    postgres_server_url,
    unreachable_url,
)

PW = "correct horse battery"


async def test_valid_credentials_give_identity_with_owned_and_send_as(stores: Stores) -> None:
    accounts = stores.accounts
    await accounts.add_user("alice@example.com", PW)
    await accounts.add_address("alice@example.com", "@Example.ORG")
    await accounts.grant_send_as("alice@example.com", "news@other.net")

    identity = await accounts.authenticate("alice@example.com", PW)

    assert identity is not None
    assert identity.login == "alice@example.com"
    assert isinstance(identity.account_id, int)
    assert set(identity.owned) == {"alice@example.com", "@example.org"}
    assert identity.send_as == ("news@other.net",)
    assert identity.may_send_as("Alice@EXAMPLE.com")
    assert identity.may_send_as("anyone@example.org")  # whole domain
    assert identity.may_send_as("news@other.net")  # grant
    assert not identity.owns("news@other.net")  # a grant is not ownership
    assert not identity.may_send_as("bob@example.com")


async def test_wrong_password_gives_none(stores: Stores) -> None:
    await stores.accounts.add_user("alice@example.com", PW)
    assert await stores.accounts.authenticate("alice@example.com", PW + "x") is None
    assert await stores.accounts.authenticate("alice@example.com", "") is None


async def test_unknown_login_gives_none_after_hashing_against_a_dummy(
    stores: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    verified: list[str] = []
    real_verify = store_module.verify_password

    def spy(password_hash: str, password: str) -> bool:
        verified.append(password_hash)
        return real_verify(password_hash, password)

    monkeypatch.setattr(store_module, "verify_password", spy)

    assert await stores.accounts.authenticate("nobody@example.com", PW) is None
    assert await stores.accounts.authenticate("x" * 1000, PW) is None  # not even a valid login

    assert len(verified) == 2
    assert all(h.startswith("$argon2id$") for h in verified)  # the same work as a real check


async def test_disabled_account_gives_none_until_enabled(stores: Stores) -> None:
    await stores.accounts.add_user("alice@example.com", PW)
    await stores.accounts.set_disabled("alice@example.com", True)
    assert await stores.accounts.authenticate("alice@example.com", PW) is None
    assert (await stores.accounts.get_user("alice@example.com")).disabled

    await stores.accounts.set_disabled("alice@example.com", False)
    assert await stores.accounts.authenticate("alice@example.com", PW) is not None


async def test_logins_are_case_insensitive_and_stored_lower_case(stores: Stores) -> None:
    info = await stores.accounts.add_user("  Alice@Example.COM ", PW)
    assert info.login == "alice@example.com"
    assert info.addresses == ("alice@example.com",)
    identity = await stores.accounts.authenticate("ALICE@example.com", PW)
    assert identity is not None and identity.login == "alice@example.com"
    with pytest.raises(DuplicateLogin):
        await stores.accounts.add_user("alice@EXAMPLE.com", PW)


async def test_address_login_owns_itself_other_logins_own_what_is_given(stores: Stores) -> None:
    plain = await stores.accounts.add_user("bob", PW)
    assert plain.addresses == ()
    listed = await stores.accounts.add_user(
        "carol", PW, ["Carol@Corp.Example", "@Sales.Example.", "carol@corp.example"]
    )
    # domain lower-cased, trailing dot dropped, case-insensitive duplicates collapsed
    assert set(listed.addresses) == {"Carol@corp.example", "@sales.example"}


@pytest.mark.parametrize(
    "pattern",
    [
        "",
        "nodomain",
        "a@",
        "@",
        "a b@example.com",
        "a@exa mple.com",
        "a@-bad.com",
        "a@b..com",
        "<a@b.com>",
        "a@b.com,c@d.com",
        ".a@b.com",
        "a\x00@b.com",
    ],
)
async def test_invalid_patterns_are_refused(stores: Stores, pattern: str) -> None:
    await stores.accounts.add_user("bob", PW)
    with pytest.raises(InvalidPattern):
        await stores.accounts.add_address("bob", pattern)
    with pytest.raises(InvalidPattern):
        await stores.accounts.grant_send_as("bob", pattern)


async def test_invalid_logins_are_refused(stores: Stores) -> None:
    for login in ("", "   ", "a b", "a\tb", "x" * 300):
        with pytest.raises(InvalidLogin):
            await stores.accounts.add_user(login, PW)


async def test_an_owned_pattern_belongs_to_one_account(stores: Stores) -> None:
    await stores.accounts.add_user("alice@example.com", PW)
    await stores.accounts.add_user("bob", PW)
    with pytest.raises(DuplicatePattern, match=r"alice@example\.com"):
        await stores.accounts.add_address("bob", "ALICE@example.com")
    with pytest.raises(DuplicatePattern):
        await stores.accounts.add_user("carol", PW, ["alice@example.com"])
    # the failed add_user left nothing behind
    assert [u.login for u in await stores.accounts.list_users()] == ["alice@example.com", "bob"]


async def test_remove_address_and_revoke_grant(stores: Stores) -> None:
    await stores.accounts.add_user("bob", PW, ["bob@example.com", "@team.example"])
    await stores.accounts.grant_send_as("bob", "boss@example.com")
    with pytest.raises(DuplicatePattern):
        await stores.accounts.grant_send_as("bob", "BOSS@example.com")

    await stores.accounts.remove_address("bob", "@TEAM.example")
    await stores.accounts.revoke_send_as("bob", "boss@example.com")

    identity = await stores.accounts.authenticate("bob", PW)
    assert identity is not None
    assert identity.owned == ("bob@example.com",)
    assert identity.send_as == ()
    assert not identity.may_send_as("x@team.example")
    with pytest.raises(PatternNotFound):
        await stores.accounts.remove_address("bob", "@team.example")
    with pytest.raises(PatternNotFound):
        await stores.accounts.revoke_send_as("bob", "boss@example.com")


async def test_unknown_login_in_admin_operations(stores: Stores) -> None:
    accounts = stores.accounts
    for call in (
        accounts.set_password("ghost", PW),
        accounts.set_disabled("ghost", True),
        accounts.add_address("ghost", "g@example.com"),
        accounts.remove_address("ghost", "g@example.com"),
        accounts.grant_send_as("ghost", "g@example.com"),
        accounts.revoke_send_as("ghost", "g@example.com"),
        accounts.get_user("ghost"),
    ):
        with pytest.raises(UnknownLogin, match="ghost"):
            await call
    assert issubclass(UnknownLogin, AccountError)


async def test_set_password_replaces_the_old_one(stores: Stores) -> None:
    await stores.accounts.add_user("bob", PW)
    await stores.accounts.set_password("bob", "another secret")
    assert await stores.accounts.authenticate("bob", PW) is None
    assert await stores.accounts.authenticate("bob", "another secret") is not None


async def test_weak_passwords_are_refused_without_echoing_them(stores: Stores) -> None:
    with pytest.raises(WeakPassword) as info:
        await stores.accounts.add_user("bob", "")
    with pytest.raises(WeakPassword) as info:
        await stores.accounts.add_user("bob", "tiny7ch")
    assert "tiny7ch" not in str(info.value)
    assert await stores.accounts.list_users() == []


async def test_password_is_stored_as_argon2id_hash_only(stores: Stores) -> None:
    await stores.accounts.add_user("bob", PW)
    async with stores.engine.connect() as conn:
        stored = (await conn.execute(select(Account.password_hash))).scalar_one()
    assert stored.startswith("$argon2id$")
    assert PW not in stored


async def test_outdated_hash_is_replaced_at_successful_login(stores: Stores) -> None:
    await stores.accounts.add_user("bob", PW)
    weak = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1).hash(PW)
    assert needs_rehash(weak)
    async with stores.engine.begin() as conn:
        await conn.execute(update(Account).values(password_hash=weak))

    assert await stores.accounts.authenticate("bob", PW) is not None

    async with stores.engine.connect() as conn:
        stored = (await conn.execute(select(Account.password_hash))).scalar_one()
    assert stored != weak and not needs_rehash(stored)
    assert await stores.accounts.authenticate("bob", PW) is not None


async def test_list_users_sorted_with_patterns(stores: Stores) -> None:
    await stores.accounts.add_user("zed@example.com", PW)
    await stores.accounts.add_user("amy", PW, ["amy@example.com"])
    await stores.accounts.grant_send_as("amy", "@shared.example")
    users = await stores.accounts.list_users()
    assert [u.login for u in users] == ["amy", "zed@example.com"]
    assert users[0].addresses == ("amy@example.com",) and users[0].send_as == ("@shared.example",)
    assert users[0].created_at.tzinfo is not None


async def test_concurrent_authentications(stores: Stores) -> None:
    await stores.accounts.add_user("bob", PW)
    results = await asyncio.gather(
        *(stores.accounts.authenticate("bob", PW if i % 2 else "wrong") for i in range(8))
    )
    assert [r is not None for r in results] == [i % 2 == 1 for i in range(8)]


async def test_unreachable_database_raises_credential_store_unavailable_promptly(
    db_backend: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    engine = engine_for_url(unreachable_url(db_backend, tmp_path), timeout=2.0)
    store = SqlAccountStore(engine, timeout=2.0)
    secret = "hunter2-very-secret"
    start = time.monotonic()
    try:
        with pytest.raises(CredentialStoreUnavailable) as info:
            await store.authenticate("bob", secret)
        with pytest.raises(CredentialStoreUnavailable):
            await store.list_users()
    finally:
        await engine.dispose()
    assert time.monotonic() - start < 5
    assert secret not in str(info.value) and secret not in caplog.text
    assert "secret-pw" not in str(info.value)  # the URL's password is masked
    assert info.value.reply.code == 454


if postgres_server_url():  # PostgreSQL-only behaviour: collected only when it can run

    @pytest.mark.postgres
    async def test_dropped_postgres_database_raises_credential_store_unavailable() -> None:
        server = postgres_server_url()
        assert server is not None
        with postgres_database() as url:
            await upgrade(url)
            engine = engine_for_url(url, timeout=2.0)
            store = SqlAccountStore(engine, timeout=2.0)
            await store.add_user("bob", PW)
            assert await store.authenticate("bob", PW) is not None
            name = url.rsplit("/", 1)[1]
            await asyncio.to_thread(drop_postgres_database, server, name)
            start = time.monotonic()
            with pytest.raises(CredentialStoreUnavailable):
                await store.authenticate("bob", PW)
            assert time.monotonic() - start < 5
            await engine.dispose()


async def test_slow_database_raises_credential_store_unavailable_after_timeout(
    db_backend: str, db_url: str
) -> None:
    """A lock held by someone else: the caller gives up after ``timeout``, and the store works
    again as soon as the lock is gone (the abandoned operation did not poison a connection)."""
    engine = engine_for_url(db_url, timeout=1.0)
    store = SqlAccountStore(engine, timeout=0.5)
    await store.add_user("bob", PW)
    blocker = engine_for_url(db_url, timeout=1.0)
    try:
        async with blocker.connect() as conn:
            trans = await conn.begin()
            if db_backend == "sqlite":
                # a pending writer lock blocks other writers (readers are never blocked in WAL)
                await conn.execute(text("UPDATE account SET updated_at = updated_at"))
                slow = store.set_disabled("bob", True)
            else:
                await conn.execute(text("LOCK TABLE account IN ACCESS EXCLUSIVE MODE"))
                slow = store.authenticate("bob", PW)
            start = time.monotonic()
            with pytest.raises(CredentialStoreUnavailable):
                await slow
            assert time.monotonic() - start < 3
            await trans.rollback()
        await asyncio.sleep(1.2)  # let the abandoned operation end (driver timeout)
        await store.set_disabled("bob", False)
        assert await store.authenticate("bob", PW) is not None
    finally:
        await store.close()
        await blocker.dispose()
        await engine.dispose()
