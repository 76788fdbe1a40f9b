"""The SQL account store: SMTP AUTH credential checks and the account admin operations.

What it does: :class:`SqlAccountStore` implements :class:`gateway.core.ports.AccountStore`.
``authenticate`` looks the login up, verifies the password (argon2id, in a worker thread so the
event loop keeps serving other sessions) and returns an :class:`~gateway.core.model.Identity`
carrying the login's owned addresses/domains and send-as grants. The admin methods (used by
``mailward user``) add accounts, change passwords, enable/disable them and manage owned patterns
and send-as grants. :meth:`SqlAccountStore.sender_owned` is the no-backscatter rule (may a
bounce go to this envelope sender?) shared by the queue runner, the service and the CLI.

Patterns are ``user@domain`` (one address) or ``@domain`` (the whole domain). They are validated and
stored with a lower-case domain; an owned pattern belongs to one account only (compared
case-insensitively). Logins are case-insensitive and stored lower-case.

Reads: the ``account``, ``account_address`` and ``send_as_grant`` tables.

Security notes: unknown logins, wrong passwords and disabled accounts all answer None after the same
hashing work (an unknown login is verified against a dummy hash), so timing does not reveal which
logins exist. Passwords are never logged and never appear in exceptions. Database and driver
exceptions are translated here into :class:`CredentialStoreUnavailable`; so is a timeout. At most
``max_parallel_verifications`` hashes run at once (each takes ~64 MiB). A hash made with older
parameters is replaced at the next successful login.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from gateway.auth.models import LOGIN_MAX, PATTERN_MAX, Account, AccountAddress, SendAsGrant
from gateway.auth.passwords import (
    check_password_policy,
    hash_password,
    needs_rehash,
    verify_password,
)
from gateway.core.errors import CredentialStoreUnavailable, GatewayError
from gateway.core.model import Identity, address_matches
from gateway.db.base import utcnow
from gateway.db.engine import DB_ERRORS, DetachedTimeouts, describe_db_error, safe_url

log = logging.getLogger("mailward.auth")
T = TypeVar("T")

#: argon2id hash of a random string nobody knows, with argon2-cffi's default parameters. Unknown
#: logins are verified against it so that they cost the same as a wrong password. Replaced by a
#: fresh hash at start if the library's defaults ever change (see SqlAccountStore.__init__).
_DUMMY_HASH = (
    "$argon2id$v=19$m=65536,t=3,p=4$"
    "irMiCjOtTKCrckcfk12GXQ$5B/nwWVykkKqpY6jXVad/qPgVCpIHQ91Y4kEOoJn5io"
)

_LOCAL_FORBIDDEN = set(' "(),:;<>@[\\]')


class AccountError(GatewayError):
    """An account admin request cannot be done; ``str()`` says why (for the CLI)."""


class InvalidLogin(AccountError):
    """The login is empty or not acceptable as a login."""


class UnknownLogin(AccountError):
    def __init__(self, login: str) -> None:
        super().__init__(f"no account with login {login!r}")


class DuplicateLogin(AccountError):
    def __init__(self, login: str) -> None:
        super().__init__(f"an account with login {login!r} already exists")


class InvalidPattern(AccountError):
    """An address or ``@domain`` pattern that is not well formed."""


class DuplicatePattern(AccountError):
    """The pattern is already owned (or already granted) by an account."""


class PatternNotFound(AccountError):
    """The account has no such address or grant."""


@dataclass(frozen=True, slots=True)
class AccountInfo:
    """An account as the admin sees it (never its password hash)."""

    id: int
    login: str
    disabled: bool
    created_at: datetime
    updated_at: datetime
    addresses: tuple[str, ...]
    send_as: tuple[str, ...]


def normalize_login(login: str) -> str:
    """The stored form of a login (stripped, lower-case); raises InvalidLogin."""
    key = login.strip().lower()
    if not key:
        raise InvalidLogin("the login is empty")
    if len(key) > LOGIN_MAX:
        raise InvalidLogin(f"the login is longer than {LOGIN_MAX} characters")
    if any(ch.isspace() or not ch.isprintable() for ch in key):
        raise InvalidLogin("the login contains spaces or control characters")
    return key


def _valid_domain(domain: str) -> bool:
    if not domain or len(domain) > 253:
        return False
    for label in domain.split("."):
        if not 1 <= len(label) <= 63 or label.startswith("-") or label.endswith("-"):
            return False
        if not all(ch.isalnum() or ch == "-" for ch in label):
            return False
    return True


def normalize_pattern(pattern: str) -> str:
    """``user@domain`` or ``@domain`` with a lower-case domain; raises InvalidPattern."""
    text = pattern.strip()
    local, at, domain = text.rpartition("@")
    domain = domain.lower().rstrip(".")
    shown = text[:80]
    if not at:
        raise InvalidPattern(f"{shown!r} is neither user@domain nor @domain")
    if not _valid_domain(domain):
        raise InvalidPattern(f"{shown!r} has an invalid domain")
    if local:
        if len(local) > 64:
            raise InvalidPattern(f"{shown!r} has a local part longer than 64 characters")
        if any(ch in _LOCAL_FORBIDDEN or not ch.isprintable() for ch in local):
            raise InvalidPattern(f"{shown!r} has an invalid local part")
        if local.startswith(".") or local.endswith(".") or ".." in local:
            raise InvalidPattern(f"{shown!r} has an invalid local part")
    result = f"{local}@{domain}"
    if len(result) > PATTERN_MAX:
        raise InvalidPattern(f"{shown!r} is too long")
    return result


def _dedupe(patterns: Sequence[str]) -> list[str]:
    seen: set[str] = set()
    out: list[str] = []
    for p in patterns:
        if p.lower() not in seen:
            seen.add(p.lower())
            out.append(p)
    return out


class SqlAccountStore:
    """Accounts in the SQL database (see the module docstring)."""

    def __init__(
        self,
        engine: AsyncEngine,
        timeout: float,
        *,
        max_parallel_verifications: int | None = None,
    ) -> None:
        self._engine = engine
        self._operations = DetachedTimeouts(timeout)
        self._hash_slots = asyncio.Semaphore(
            max_parallel_verifications or max(2, os.cpu_count() or 2)
        )
        self._dummy_hash = (
            _DUMMY_HASH if not needs_rehash(_DUMMY_HASH) else hash_password(os.urandom(16).hex())
        )

    # --- AUTH ------------------------------------------------------------------------------------

    async def authenticate(self, login: str, password: str) -> Identity | None:
        """The identity for valid credentials; None otherwise. Raises CredentialStoreUnavailable."""
        try:
            key: str | None = normalize_login(login)
        except InvalidLogin:
            key = None
        row = None
        if key is not None:

            async def lookup(conn: AsyncConnection) -> Any:
                result = await conn.execute(
                    select(
                        Account.id, Account.login, Account.password_hash, Account.disabled
                    ).where(Account.login == key)
                )
                return result.first()

            row = await self._read(lookup)
        stored = row.password_hash if row is not None else self._dummy_hash
        ok = await self._verify(stored, password)
        if row is None or not ok or row.disabled:
            return None
        if needs_rehash(stored):
            await self._rehash(row.id, stored, password)
        owned, send_as = await self._read(lambda conn: self._patterns(conn, row.id))
        return Identity(login=row.login, account_id=row.id, owned=owned, send_as=send_as)

    async def _verify(self, stored: str, password: str) -> bool:
        async with self._hash_slots:
            return await asyncio.to_thread(verify_password, stored, password)

    async def _rehash(self, account_id: int, old_hash: str, password: str) -> None:
        async with self._hash_slots:
            new_hash = await asyncio.to_thread(hash_password, password)

        async def store(conn: AsyncConnection) -> None:
            await conn.execute(
                update(Account)
                .where(Account.id == account_id, Account.password_hash == old_hash)
                .values(password_hash=new_hash, updated_at=utcnow())
            )

        try:
            await self._write(store)
        except GatewayError as error:
            # The login itself succeeded; the rehash is tried again at the next one.
            log.warning("could not rehash the password of account %d: %s", account_id, error)

    async def _patterns(
        self, conn: AsyncConnection, account_id: int
    ) -> tuple[tuple[str, ...], tuple[str, ...]]:
        owned = await conn.scalars(
            select(AccountAddress.pattern)
            .where(AccountAddress.account_id == account_id)
            .order_by(AccountAddress.pattern)
        )
        grants = await conn.scalars(
            select(SendAsGrant.pattern)
            .where(SendAsGrant.account_id == account_id)
            .order_by(SendAsGrant.pattern)
        )
        return tuple(owned), tuple(grants)

    # --- plumbing --------------------------------------------------------------------------------

    def _unavailable(self, error: BaseException) -> CredentialStoreUnavailable:
        return CredentialStoreUnavailable(
            f"account database {safe_url(self._engine.url)} unavailable: {describe_db_error(error)}"
        )

    async def _guarded(self, operation: Coroutine[Any, Any, T]) -> T:
        """Run a database operation; the caller waits at most ``timeout`` (see DetachedTimeouts)."""
        try:
            return await self._operations.run(operation)
        except IntegrityError:
            raise AccountError("the change conflicts with a concurrent one; try again") from None
        except DB_ERRORS as error:
            raise self._unavailable(error) from None

    async def _read(self, fn: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        async def operation() -> T:
            async with self._engine.connect() as conn:
                return await fn(conn)

        return await self._guarded(operation())

    async def _write(self, fn: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        async def operation() -> T:
            async with self._engine.begin() as conn:
                return await fn(conn)

        return await self._guarded(operation())

    async def _account_id(self, conn: AsyncConnection, login: str) -> int:
        key = normalize_login(login)
        account_id = await conn.scalar(select(Account.id).where(Account.login == key))
        if account_id is None:
            raise UnknownLogin(key)
        return int(account_id)

    async def _owner_of(self, conn: AsyncConnection, pattern: str) -> str | None:
        owner = await conn.scalar(
            select(Account.login)
            .join(AccountAddress, AccountAddress.account_id == Account.id)
            .where(func.lower(AccountAddress.pattern) == pattern.lower())
        )
        return None if owner is None else str(owner)

    async def _hash_new_password(self, password: str) -> str:
        check_password_policy(password)
        async with self._hash_slots:
            return await asyncio.to_thread(hash_password, password)

    async def _touch(self, conn: AsyncConnection, account_id: int) -> None:
        await conn.execute(
            update(Account).where(Account.id == account_id).values(updated_at=utcnow())
        )

    # --- admin -----------------------------------------------------------------------------------

    async def add_user(
        self, login: str, password: str, addresses: Sequence[str] = ()
    ) -> AccountInfo:
        """Create an account. With no ``addresses``, a login that is an address owns itself."""
        key = normalize_login(login)
        if addresses:
            patterns = _dedupe([normalize_pattern(a) for a in addresses])
        elif "@" in key and not key.startswith("@"):
            patterns = [normalize_pattern(key)]
        else:
            patterns = []
        password_hash = await self._hash_new_password(password)

        async def create(conn: AsyncConnection) -> None:
            if await conn.scalar(select(Account.id).where(Account.login == key)) is not None:
                raise DuplicateLogin(key)
            for pattern in patterns:
                owner = await self._owner_of(conn, pattern)
                if owner is not None:
                    raise DuplicatePattern(f"{pattern} is already owned by {owner!r}")
            now = utcnow()
            account_id = await conn.scalar(
                insert(Account)
                .values(
                    login=key,
                    password_hash=password_hash,
                    disabled=False,
                    created_at=now,
                    updated_at=now,
                )
                .returning(Account.id)
            )
            if patterns:
                await conn.execute(
                    insert(AccountAddress),
                    [{"account_id": account_id, "pattern": p} for p in patterns],
                )

        await self._write(create)
        return await self.get_user(key)

    async def set_password(self, login: str, password: str) -> None:
        password_hash = await self._hash_new_password(password)

        async def change(conn: AsyncConnection) -> None:
            account_id = await self._account_id(conn, login)
            await conn.execute(
                update(Account)
                .where(Account.id == account_id)
                .values(password_hash=password_hash, updated_at=utcnow())
            )

        await self._write(change)

    async def set_disabled(self, login: str, disabled: bool) -> None:
        async def change(conn: AsyncConnection) -> None:
            account_id = await self._account_id(conn, login)
            await conn.execute(
                update(Account)
                .where(Account.id == account_id)
                .values(disabled=disabled, updated_at=utcnow())
            )

        await self._write(change)

    async def get_user(self, login: str) -> AccountInfo:
        """One account (raises UnknownLogin)."""

        async def fetch(conn: AsyncConnection) -> AccountInfo:
            account_id = await self._account_id(conn, login)
            return (await self._infos(conn, Account.id == account_id))[0]

        return await self._read(fetch)

    async def sender_owned(self, login: str | None, address: str) -> bool:
        """Whether ``address`` is one of ``login``'s own addresses: an address or domain the
        account owns, not a send-as grant (whether or not the account is disabled). The one
        no-backscatter rule: a bounce or delay notice goes to an envelope sender only when this
        holds (the queue runner, the service's in-session bounces, ``mailward queue delete
        --bounce``). False without a login (a trusted-network client owns no address) or for an
        unknown login. Raises CredentialStoreUnavailable when the store cannot answer."""
        if login is None:
            return False
        try:
            info = await self.get_user(login)
        except (UnknownLogin, InvalidLogin):
            return False
        return address_matches(address, info.addresses)

    async def list_users(self) -> list[AccountInfo]:
        """Every account, by login."""
        return await self._read(lambda conn: self._infos(conn, None))

    async def _infos(
        self, conn: AsyncConnection, where: ColumnElement[bool] | None
    ) -> list[AccountInfo]:
        stmt = select(
            Account.id, Account.login, Account.disabled, Account.created_at, Account.updated_at
        ).order_by(Account.login)
        if where is not None:
            stmt = stmt.where(where)
        rows = (await conn.execute(stmt)).all()
        ids = [r.id for r in rows]
        owned: dict[int, list[str]] = {i: [] for i in ids}
        grants: dict[int, list[str]] = {i: [] for i in ids}
        if ids:
            for account_id, pattern in await conn.execute(
                select(AccountAddress.account_id, AccountAddress.pattern)
                .where(AccountAddress.account_id.in_(ids))
                .order_by(AccountAddress.pattern)
            ):
                owned[account_id].append(pattern)
            for account_id, pattern in await conn.execute(
                select(SendAsGrant.account_id, SendAsGrant.pattern)
                .where(SendAsGrant.account_id.in_(ids))
                .order_by(SendAsGrant.pattern)
            ):
                grants[account_id].append(pattern)
        return [
            AccountInfo(
                id=r.id,
                login=r.login,
                disabled=r.disabled,
                created_at=r.created_at,
                updated_at=r.updated_at,
                addresses=tuple(owned[r.id]),
                send_as=tuple(grants[r.id]),
            )
            for r in rows
        ]

    async def add_address(self, login: str, pattern: str) -> str:
        """Give ``login`` ownership of ``pattern``; returns the stored form."""
        normalized = normalize_pattern(pattern)

        async def change(conn: AsyncConnection) -> None:
            account_id = await self._account_id(conn, login)
            owner = await self._owner_of(conn, normalized)
            if owner is not None:
                raise DuplicatePattern(f"{normalized} is already owned by {owner!r}")
            await conn.execute(
                insert(AccountAddress).values(account_id=account_id, pattern=normalized)
            )
            await self._touch(conn, account_id)

        await self._write(change)
        return normalized

    async def remove_address(self, login: str, pattern: str) -> None:
        normalized = normalize_pattern(pattern)

        async def change(conn: AsyncConnection) -> None:
            account_id = await self._account_id(conn, login)
            result = await conn.execute(
                delete(AccountAddress).where(
                    AccountAddress.account_id == account_id,
                    func.lower(AccountAddress.pattern) == normalized.lower(),
                )
            )
            if not result.rowcount:
                raise PatternNotFound(f"{normalize_login(login)!r} does not own {normalized}")
            await self._touch(conn, account_id)

        await self._write(change)

    async def grant_send_as(self, login: str, pattern: str) -> str:
        """Let ``login`` send as ``pattern`` without owning it; returns the stored form."""
        normalized = normalize_pattern(pattern)

        async def change(conn: AsyncConnection) -> None:
            account_id = await self._account_id(conn, login)
            existing = await conn.scalar(
                select(SendAsGrant.id).where(
                    SendAsGrant.account_id == account_id,
                    func.lower(SendAsGrant.pattern) == normalized.lower(),
                )
            )
            if existing is not None:
                raise DuplicatePattern(
                    f"{normalize_login(login)!r} already may send as {normalized}"
                )
            await conn.execute(
                insert(SendAsGrant).values(account_id=account_id, pattern=normalized)
            )
            await self._touch(conn, account_id)

        await self._write(change)
        return normalized

    async def revoke_send_as(self, login: str, pattern: str) -> None:
        normalized = normalize_pattern(pattern)

        async def change(conn: AsyncConnection) -> None:
            account_id = await self._account_id(conn, login)
            result = await conn.execute(
                delete(SendAsGrant).where(
                    SendAsGrant.account_id == account_id,
                    func.lower(SendAsGrant.pattern) == normalized.lower(),
                )
            )
            if not result.rowcount:
                raise PatternNotFound(
                    f"{normalize_login(login)!r} has no send-as grant for {normalized}"
                )
            await self._touch(conn, account_id)

        await self._write(change)

    async def close(self) -> None:
        """Wait for database operations whose callers stopped waiting (before engine disposal)."""
        await self._operations.drain()
