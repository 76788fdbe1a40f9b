"""The SQL key store: the public keys and certificates the gateway encrypts to.

What it does: :class:`SqlKeyStore` records validated keys (:meth:`~SqlKeyStore.import_key`, from
:func:`gateway.keys.validate.validate_key`), reads them back (:meth:`~SqlKeyStore.get`,
:meth:`~SqlKeyStore.list`), answers the per-recipient lookup the ``encryption`` check makes
(:meth:`~SqlKeyStore.usable_keys`) and records use (:meth:`~SqlKeyStore.mark_used`); operators
remove (:meth:`~SqlKeyStore.remove`), revoke (:meth:`~SqlKeyStore.revoke`) and vouch for
(:meth:`~SqlKeyStore.set_verification`) keys.

* **Use-time checks.** :meth:`usable_keys` returns only keys that are usable *at the ``now`` it is
  given*: not revoked, created no later than ``now``, the primary key (or certificate) not expired
  and -- OpenPGP -- at least one encryption subkey not expired (``encryption_expires_at``). A key
  that was valid at import and expired since is therefore never returned. The result is ordered
  by kind (``openpgp`` before ``smime``), verified keys first, newest first; every record carries
  its material (OpenPGP binary transferable public key, or certificate DER).
* **Addresses** are looked up and stored in canonical form
  (:func:`gateway.keys.address.canonical_address`); a refused form raises
  :class:`~gateway.keys.address.InvalidAddress` (no key can be found for it).
* **Re-import** of a fingerprint the store holds updates it: the new material and dates replace
  the old, the recorded addresses are the old ones the key still names plus the new selection,
  ``last_used_at`` stays. Importing the *revoked* version of a stored key records the revocation
  (``revoked``, ``revoked_at``); a key revoked in the store cannot be imported again, and a revoked
  key the store does not hold is refused.
* **Change counter.** Every change (import, update, revocation, removal, verification) also
  increments ``encryption_key_generation.generation`` in its transaction; :meth:`generation`
  reads it. Recording use does not count as a change. :meth:`keys_for` returns every
  non-revoked key of an address regardless of dates: what a cache may hold until the counter
  moves, the use-time date checks being made on each use
  (:class:`gateway.keys.directory.KeyDirectory`).
* **Audit.** Every change is an audit event written in the same database transaction
  (:data:`AUDIT_KINDS`: ``key-import``, ``key-revoke``, ``key-remove``, ``key-verify``; listener =
  the operator's interface, ``detail`` = fingerprint, kind, addresses, by whom).

Reads/writes: ``encryption_key``, ``encryption_key_address`` (revision ``0007``),
``encryption_key_generation`` (revision ``0009``); changes write an ``audit_record`` row.

Security notes: only public material passes through here (validation refused secret keys before).
Database and driver exceptions become :class:`~gateway.core.errors.StoreUnavailable` (one line,
no SQL, no parameters, the URL's password masked): the ``encryption`` check must then answer 451,
never send in clear text. A lookup that does not finish within ``timeout`` is StoreUnavailable too.
"""

from __future__ import annotations

import base64
import builtins
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any, Literal, TypeVar, cast

from sqlalchemy import (
    RowMapping,
    Table,
    and_,
    bindparam,
    case,
    delete,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.audit.store import SqlAuditStore
from gateway.core.errors import GatewayError
from gateway.core.model import Session
from gateway.db.engine import SqlStore
from gateway.keys.address import canonical_address
from gateway.keys.models import (
    KINDS,
    OPENPGP,
    SMIME,
    SOURCES,
    VERIFICATIONS,
    VERIFIED,
    EncryptionKeyAddressRow,
    EncryptionKeyGenerationRow,
    EncryptionKeyRow,
)
from gateway.keys.validate import KeyRejected, ValidatedKey, usable_until

T = TypeVar("T")

KEYS = cast(Table, EncryptionKeyRow.__table__)
ADDRESSES = cast(Table, EncryptionKeyAddressRow.__table__)
GENERATION = cast(Table, EncryptionKeyGenerationRow.__table__)
_METADATA_COLUMNS = tuple(c for c in KEYS.columns if c.name != "material")
#: Audit kinds of the changes this store writes.
AUDIT_KINDS = ("key-import", "key-revoke", "key-remove", "key-verify")
_IN_CHUNK = 500
_FINGERPRINT = re.compile(r"^(?:[0-9A-F]{40}|[0-9A-F]{64})$")

ImportAction = Literal["imported", "updated", "revoked"]


class KeyNotFound(GatewayError):
    """No key in the store has this fingerprint."""


def normalize_fingerprint(text: str) -> str:
    """A full fingerprint as the store writes it: upper-case hex, 40 (OpenPGP v4) or 64
    (OpenPGP v5, or an S/MIME certificate's SHA-256) digits; spaces, colons and a ``0x`` prefix
    are removed. Short key IDs are refused (ValueError): they are not unique."""
    cleaned = re.sub(r"[\s:]", "", text).upper().removeprefix("0X")
    if not _FINGERPRINT.match(cleaned):
        raise ValueError(
            f"{text!r} is not a full fingerprint (40 or 64 hex digits; short key IDs are not "
            "accepted)"
        )
    return cleaned


def _armor_crc24(data: bytes) -> int:
    crc = 0xB704CE
    for byte in data:
        crc ^= byte << 16
        for _ in range(8):
            crc <<= 1
            if crc & 0x1000000:
                crc ^= 0x1864CFB
    return crc & 0xFFFFFF


def _wrap(encoded: str, width: int) -> list[str]:
    return [encoded[i : i + width] for i in range(0, len(encoded), width)]


def armor(kind: str, material: bytes) -> str:
    """``material`` as text: an OpenPGP ``PUBLIC KEY BLOCK`` (RFC 4880 6.2, with CRC-24) or a
    PEM ``CERTIFICATE``."""
    body = _wrap(base64.b64encode(material).decode("ascii"), 64)
    if kind == SMIME:
        return "\n".join(["-----BEGIN CERTIFICATE-----", *body, "-----END CERTIFICATE-----", ""])
    crc = base64.b64encode(_armor_crc24(material).to_bytes(3, "big")).decode("ascii")
    return "\n".join(
        [
            "-----BEGIN PGP PUBLIC KEY BLOCK-----",
            "",
            *body,
            f"={crc}",
            "-----END PGP PUBLIC KEY BLOCK-----",
            "",
        ]
    )


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """One stored key as read back. ``material`` is None in listings (:meth:`SqlKeyStore.list`)."""

    id: int
    fingerprint: str
    kind: str
    algorithm: str
    addresses: tuple[str, ...]
    user_ids: tuple[str, ...]
    created_at: datetime
    expires_at: datetime | None
    encryption_expires_at: datetime | None
    revoked: bool
    revoked_at: datetime | None
    source: str
    verification: str
    imported_at: datetime
    imported_by: str
    updated_at: datetime
    last_used_at: datetime | None
    material_sha256: str
    material: bytes | None = None

    @property
    def usable_until(self) -> datetime | None:
        """When the key stops being usable (None: never, unless revoked)."""
        return usable_until(self.expires_at, self.encryption_expires_at)

    def state(self, now: datetime) -> str:
        """``usable``, ``revoked``, ``expired`` or ``not-yet-valid`` at ``now``."""
        if self.revoked:
            return "revoked"
        if self.created_at > now:
            return "not-yet-valid"
        until = self.usable_until
        if until is not None and until <= now:
            return "expired"
        return "usable"

    def is_usable(self, now: datetime) -> bool:
        return self.state(now) == "usable"

    def armored(self) -> str:
        """The material as armored OpenPGP or PEM text (ValueError when not loaded)."""
        if self.material is None:
            raise ValueError("the key material was not loaded (use SqlKeyStore.get)")
        return armor(self.kind, self.material)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready metadata (timestamps ISO 8601); never the material (see :meth:`armored`)."""
        data = asdict(self)
        del data["material"]
        data["addresses"] = list(self.addresses)
        data["user_ids"] = list(self.user_ids)
        for key, value in data.items():
            if isinstance(value, datetime):
                data[key] = value.isoformat()
        return data


@dataclass(frozen=True, slots=True)
class ImportResult:
    """What :meth:`SqlKeyStore.import_key` did: ``imported`` (new), ``updated`` (the
    fingerprint was stored already) or ``revoked`` (the revocation of a stored key)."""

    record: KeyRecord
    action: ImportAction


def _record(row: RowMapping, addresses: Iterable[str]) -> KeyRecord:
    material = row.get("material")
    return KeyRecord(
        id=int(row["id"]),
        fingerprint=row["fingerprint"],
        kind=row["kind"],
        algorithm=row["algorithm"],
        addresses=tuple(sorted(addresses)),
        user_ids=tuple(row["user_ids"] or ()),
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        encryption_expires_at=row["encryption_expires_at"],
        revoked=bool(row["revoked"]),
        revoked_at=row["revoked_at"],
        source=row["source"],
        verification=row["verification"],
        imported_at=row["imported_at"],
        imported_by=row["imported_by"],
        updated_at=row["updated_at"],
        last_used_at=row["last_used_at"],
        material_sha256=row["material_sha256"],
        material=bytes(material) if material is not None else None,
    )


def _text(value: str, limit: int) -> str:
    text = value[:limit].replace("\x00", "\\x00")
    return text.encode("utf-8", "replace").decode("utf-8")


def _usable_clause(now: datetime) -> Any:
    return and_(
        KEYS.c.revoked.is_(False),
        KEYS.c.created_at <= now,
        or_(KEYS.c.expires_at.is_(None), KEYS.c.expires_at > now),
        or_(KEYS.c.encryption_expires_at.is_(None), KEYS.c.encryption_expires_at > now),
    )


_PREFERENCE = (
    KEYS.c.kind,
    case((KEYS.c.verification == VERIFIED, 0), else_=1),
    KEYS.c.created_at.desc(),
    KEYS.c.id.desc(),
)
_BUMP = (
    update(GENERATION).where(GENERATION.c.id == 1).values(generation=GENERATION.c.generation + 1)
)
_GENERATION = select(GENERATION.c.generation).where(GENERATION.c.id == 1)
_KEYS_FOR = (
    select(*KEYS.columns)
    .join(ADDRESSES, ADDRESSES.c.key_id == KEYS.c.id)
    .where(ADDRESSES.c.address == bindparam("address"), KEYS.c.revoked.is_(False))
    .order_by(*_PREFERENCE)
)


class SqlKeyStore(SqlStore):
    """The key store in the SQL database (see the module docstring)."""

    what = "key store database"

    @staticmethod
    async def _addresses(conn: AsyncConnection, ids: list[int]) -> dict[int, list[str]]:
        found: dict[int, list[str]] = {i: [] for i in ids}
        for start in range(0, len(ids), _IN_CHUNK):
            chunk = ids[start : start + _IN_CHUNK]
            rows = await conn.execute(
                select(ADDRESSES.c.key_id, ADDRESSES.c.address).where(ADDRESSES.c.key_id.in_(chunk))
            )
            for key_id, address in rows:
                found[int(key_id)].append(address)
        return found

    async def _records(self, conn: AsyncConnection, stmt: Any) -> builtins.list[KeyRecord]:
        rows = list((await conn.execute(stmt)).mappings())
        addresses = await self._addresses(conn, [int(r["id"]) for r in rows])
        return [_record(r, addresses[int(r["id"])]) for r in rows]

    @staticmethod
    async def _fetch(
        conn: AsyncConnection, fingerprint: str, *, material: bool = True
    ) -> KeyRecord | None:
        columns = KEYS.columns if material else _METADATA_COLUMNS
        row = (
            (await conn.execute(select(*columns).where(KEYS.c.fingerprint == fingerprint)))
            .mappings()
            .first()
        )
        if row is None:
            return None
        addresses = await SqlKeyStore._addresses(conn, [int(row["id"])])
        return _record(row, addresses[int(row["id"])])

    @staticmethod
    async def _audit(
        conn: AsyncConnection, kind: str, record: KeyRecord, what: str, by: str, interface: str
    ) -> None:
        addresses = ", ".join(record.addresses) or "-"
        detail = f"key {record.fingerprint} ({record.kind}) {what} by {by}; addresses: {addresses}"
        await SqlAuditStore.record_event_in(
            conn, Session(client_ip="-", client_port=0, listener=interface), kind, detail
        )

    # --- lookups ----------------------------------------------------------------------------------

    async def usable_keys(
        self, address: str, *, now: datetime, kind: str | None = None
    ) -> builtins.list[KeyRecord]:
        """The keys usable at ``now`` for ``address`` (canonicalised here), with their material,
        preferred first (see the module docstring); ``kind`` restricts to ``openpgp`` or
        ``smime``. Raises InvalidAddress (a refused address form), StoreUnavailable."""
        canonical = canonical_address(address)
        stmt = (
            select(*KEYS.columns)
            .join(ADDRESSES, ADDRESSES.c.key_id == KEYS.c.id)
            .where(ADDRESSES.c.address == canonical, _usable_clause(now))
            .order_by(*_PREFERENCE)
        )
        if kind is not None:
            stmt = stmt.where(KEYS.c.kind == _checked(kind, KINDS, "kind"))

        async def fn(conn: AsyncConnection) -> builtins.list[KeyRecord]:
            return await self._records(conn, stmt)

        return await self._run(fn, write=False)

    async def keys_for(self, address: str) -> builtins.list[KeyRecord]:
        """Every key recorded for ``address`` (canonicalised here) that is not revoked, with its
        material, preferred first -- *whatever its dates*: the caller checks
        :meth:`KeyRecord.is_usable` at each use. Raises InvalidAddress, StoreUnavailable."""
        canonical = canonical_address(address)

        async def fn(conn: AsyncConnection) -> builtins.list[KeyRecord]:
            rows = list((await conn.execute(_KEYS_FOR, {"address": canonical})).mappings())
            if not rows:
                return []
            addresses = await self._addresses(conn, [int(r["id"]) for r in rows])
            return [_record(r, addresses[int(r["id"])]) for r in rows]

        return await self._run(fn, write=False)

    async def generation(self) -> int:
        """The change counter (see the module docstring). Raises StoreUnavailable."""

        async def fn(conn: AsyncConnection) -> int:
            return int((await conn.execute(_GENERATION)).scalar_one())

        return await self._run(fn, write=False)

    async def all_usable_keys(
        self, *, now: datetime, kind: str | None = None
    ) -> builtins.list[KeyRecord]:
        """Every key usable at ``now`` (with material): what a keyring must hold
        (:meth:`gateway.keys.gpghome.KeyRing.sync`). Raises StoreUnavailable."""
        stmt = select(*KEYS.columns).where(_usable_clause(now)).order_by(KEYS.c.id)
        if kind is not None:
            stmt = stmt.where(KEYS.c.kind == _checked(kind, KINDS, "kind"))

        async def fn(conn: AsyncConnection) -> builtins.list[KeyRecord]:
            return await self._records(conn, stmt)

        return await self._run(fn, write=False)

    async def mark_used(self, fingerprint: str, now: datetime) -> None:
        """Record that the key was used at ``now`` (``last_used_at`` only moves forward; a key
        removed meanwhile is ignored). Raises StoreUnavailable."""
        stmt = (
            update(KEYS)
            .where(
                KEYS.c.fingerprint == fingerprint,
                or_(KEYS.c.last_used_at.is_(None), KEYS.c.last_used_at < now),
            )
            .values(last_used_at=now)
        )

        async def fn(conn: AsyncConnection) -> None:
            await conn.execute(stmt)

        await self._run(fn, write=True)

    async def get(self, fingerprint: str) -> KeyRecord | None:
        """One key with its material, or None. Raises StoreUnavailable."""

        async def fn(conn: AsyncConnection) -> KeyRecord | None:
            return await self._fetch(conn, fingerprint)

        return await self._run(fn, write=False)

    async def list(
        self, address: str | None = None, *, kind: str | None = None
    ) -> builtins.list[KeyRecord]:
        """Every stored key (without material; usable or not), or those recorded for
        ``address`` (canonicalised here), oldest import first. Raises InvalidAddress,
        StoreUnavailable."""
        stmt = select(*_METADATA_COLUMNS).order_by(KEYS.c.id)
        if address is not None:
            canonical = canonical_address(address)
            stmt = stmt.where(
                KEYS.c.id.in_(select(ADDRESSES.c.key_id).where(ADDRESSES.c.address == canonical))
            )
        if kind is not None:
            stmt = stmt.where(KEYS.c.kind == _checked(kind, KINDS, "kind"))

        async def fn(conn: AsyncConnection) -> builtins.list[KeyRecord]:
            return await self._records(conn, stmt)

        return await self._run(fn, write=False)

    # --- changes ----------------------------------------------------------------------------------

    async def import_key(
        self,
        key: ValidatedKey,
        *,
        now: datetime,
        source: str,
        imported_by: str,
        verification: str | None = None,
        interface: str = "cli",
    ) -> ImportResult:
        """Record ``key`` (a :func:`~gateway.keys.validate.validate_key` result): a new row, an
        update of the stored fingerprint, or its revocation (see the module docstring), with its
        audit event, in one database transaction. ``verification`` None keeps a stored key's
        state (``unverified`` for a new one).

        Raises KeyRejected (a revoked key the store does not hold; a key revoked in the store),
        StoreUnavailable; ValueError for an unknown source or verification.
        """
        _checked(source, SOURCES, "source")
        if verification is not None:
            _checked(verification, VERIFICATIONS, "verification")
        by = _text(imported_by, 255)
        values: dict[str, Any] = {
            "kind": key.kind,
            "algorithm": _text(key.algorithm, 64),
            "user_ids": [_text(u, 1000) for u in key.user_ids],
            "created_at": key.created_at,
            "expires_at": key.expires_at,
            "encryption_expires_at": key.encryption_expires_at,
            "source": source,
            "imported_by": by,
            "updated_at": now,
            "material": key.material,
            "material_sha256": key.material_sha256,
        }

        async def fn(conn: AsyncConnection) -> ImportResult:
            existing = await self._fetch(conn, key.fingerprint, material=False)
            if existing is None:
                if key.revoked:
                    raise KeyRejected("the key is revoked")
                key_id = (
                    await conn.execute(
                        insert(KEYS).returning(KEYS.c.id),
                        {
                            **values,
                            "fingerprint": key.fingerprint,
                            "revoked": False,
                            "revoked_at": None,
                            "verification": verification or "unverified",
                            "imported_at": now,
                            "last_used_at": None,
                        },
                    )
                ).scalar_one()
                await conn.execute(
                    insert(ADDRESSES), [{"key_id": key_id, "address": a} for a in key.addresses]
                )
                action: ImportAction = "imported"
            elif existing.revoked:
                raise KeyRejected(
                    f"key {key.fingerprint} is revoked in the store; a revoked key cannot be "
                    "imported again"
                )
            elif key.revoked:
                await conn.execute(
                    update(KEYS)
                    .where(KEYS.c.id == existing.id)
                    .values(
                        revoked=True,
                        revoked_at=now,
                        updated_at=now,
                        material=key.material,
                        material_sha256=key.material_sha256,
                    )
                )
                action = "revoked"
            else:
                if existing.kind != key.kind:
                    raise KeyRejected(f"fingerprint {key.fingerprint} is stored as {existing.kind}")
                kept = [a for a in existing.addresses if a in key.key_addresses]
                wanted = sorted(set(kept) | set(key.addresses))
                update_values = dict(values)
                if verification is not None:
                    update_values["verification"] = verification
                await conn.execute(
                    update(KEYS).where(KEYS.c.id == existing.id).values(update_values)
                )
                await conn.execute(delete(ADDRESSES).where(ADDRESSES.c.key_id == existing.id))
                await conn.execute(
                    insert(ADDRESSES), [{"key_id": existing.id, "address": a} for a in wanted]
                )
                action = "updated"
            await conn.execute(_BUMP)
            record = await self._fetch(conn, key.fingerprint, material=False)
            assert record is not None
            kind = "key-revoke" if action == "revoked" else "key-import"
            what = f"{action} (source {source}, {record.verification})"
            await self._audit(conn, kind, record, what, by, interface)
            return ImportResult(record, action)

        return await self._run(fn, write=True)

    async def remove(
        self, fingerprint: str, *, removed_by: str, interface: str = "cli"
    ) -> KeyRecord:
        """Delete the key and its addresses (audit ``key-remove``); returns what was removed.
        Raises KeyNotFound, StoreUnavailable."""

        async def fn(conn: AsyncConnection) -> KeyRecord:
            record = await self._fetch(conn, fingerprint, material=False)
            if record is None:
                raise KeyNotFound(f"no key {fingerprint}")
            await conn.execute(delete(ADDRESSES).where(ADDRESSES.c.key_id == record.id))
            await conn.execute(delete(KEYS).where(KEYS.c.id == record.id))
            await conn.execute(_BUMP)
            await self._audit(
                conn, "key-remove", record, "removed", _text(removed_by, 255), interface
            )
            return record

        return await self._run(fn, write=True)

    async def revoke(
        self, fingerprint: str, *, now: datetime, revoked_by: str, interface: str = "cli"
    ) -> KeyRecord:
        """Mark the key revoked from ``now`` on (audit ``key-revoke``): it is never returned by
        :meth:`usable_keys` again. Revoking a revoked key changes nothing. Raises KeyNotFound,
        StoreUnavailable."""

        async def fn(conn: AsyncConnection) -> KeyRecord:
            record = await self._fetch(conn, fingerprint, material=False)
            if record is None:
                raise KeyNotFound(f"no key {fingerprint}")
            if record.revoked:
                return record
            await conn.execute(
                update(KEYS)
                .where(KEYS.c.id == record.id)
                .values(revoked=True, revoked_at=now, updated_at=now)
            )
            await conn.execute(_BUMP)
            record = await self._fetch(conn, fingerprint, material=False)
            assert record is not None
            await self._audit(
                conn, "key-revoke", record, "revoked", _text(revoked_by, 255), interface
            )
            return record

        return await self._run(fn, write=True)

    async def set_verification(
        self, fingerprint: str, verification: str, *, now: datetime, by: str, interface: str = "cli"
    ) -> KeyRecord:
        """Set ``verification`` (audit ``key-verify``). Raises KeyNotFound, StoreUnavailable;
        ValueError for an unknown state."""
        _checked(verification, VERIFICATIONS, "verification")

        async def fn(conn: AsyncConnection) -> KeyRecord:
            result = await conn.execute(
                update(KEYS)
                .where(KEYS.c.fingerprint == fingerprint)
                .values(verification=verification, updated_at=now)
            )
            if not result.rowcount:
                raise KeyNotFound(f"no key {fingerprint}")
            await conn.execute(_BUMP)
            record = await self._fetch(conn, fingerprint, material=False)
            assert record is not None
            await self._audit(
                conn, "key-verify", record, f"marked {verification}", _text(by, 255), interface
            )
            return record

        return await self._run(fn, write=True)


def _checked(value: str, allowed: tuple[str, ...], what: str) -> str:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r} (one of {', '.join(allowed)})")
    return value


__all__ = [
    "AUDIT_KINDS",
    "OPENPGP",
    "SMIME",
    "ImportResult",
    "KeyNotFound",
    "KeyRecord",
    "SqlKeyStore",
    "armor",
    "normalize_fingerprint",
]
