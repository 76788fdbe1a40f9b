"""The SQL quarantine store: take held messages into custody, list them, record decisions.

What it does: :class:`SqlQuarantine` writes one ``quarantine`` row per held message
(:meth:`~SqlQuarantine.hold`: committed before it returns, so the caller answers 250 only once the
message is durable), reads them back (:meth:`~SqlQuarantine.list`: newest first, keyset-paginated
on the id, without the bytes; :meth:`~SqlQuarantine.get`: one row with its bytes) and records the
operator's decision (:meth:`~SqlQuarantine.mark`: an atomic conditional UPDATE, so two operators
can never both release the same message; see :data:`gateway.quarantine.models.STATUSES`).

Every final decision is an audit event written in the same database transaction as the new status
(:data:`DECISION_KINDS`: ``quarantine-release``, ``quarantine-release-failed``,
``quarantine-delete``), so neither exists without the other: the record names the entry (queue id
``Q<id>``), the message's transaction id, the sender's login, the operator (``detail``: "... by
cli:<OS user>") and, for a release, the upstream's reply. Claiming an entry for a release
(``releasing``) is not an event: its outcome is.

A hold that is not committed within ``timeout`` raises StoreUnavailable (the caller answers 4xx
and the client will send the message again). The write is not cancelled midway (that can leave a
connection holding locks); if it commits after the caller gave up, the row is immediately marked
``deleted`` by ``mailward`` and its bytes are cleared, so no message the client was told to retry
stays held (a release would deliver it twice).

Reads/writes: the ``quarantine`` table (Alembic revision ``0003``); decisions write an
``audit_record`` row.

Security notes: held messages are message bodies: they are never logged, and only :meth:`get`
returns them. Envelope addresses are stored exactly as received (they are relayed on release);
other client-supplied text is bounded, NUL-free valid UTF-8. Database and driver exceptions
become :class:`~gateway.core.errors.StoreUnavailable` here, with a one-line description (no SQL,
no parameters, the URL's password masked).
"""

from __future__ import annotations

import builtins
import logging
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any, TypeVar, cast

from sqlalchemy import RowMapping, Table, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.audit.store import SqlAuditStore
from gateway.core.errors import GatewayError
from gateway.core.message import Headers, sha256_hex
from gateway.core.model import Session, Transaction, utcnow
from gateway.db.engine import DB_ERRORS, SqlStore, describe_db_error
from gateway.quarantine.models import (
    DELETED,
    HELD,
    RELEASE_FAILED,
    RELEASED,
    RELEASING,
    STATUSES,
    UNDECIDED,
    QuarantineRow,
)

T = TypeVar("T")

log = logging.getLogger("mailward.quarantine")

QUARANTINE = cast(Table, QuarantineRow.__table__)
MAX_PAGE = 1000
REASON_LIMIT = 4000
TEXT_LIMIT = 2000
#: ``decided_by`` of a hold that committed after its caller had given up (see module docstring).
UNCONFIRMED_BY = "mailward (hold committed after the client was told to retry)"

_METADATA_COLUMNS = tuple(c for c in QUARANTINE.columns if c.name != "message")
#: The audit kind of the event written when a decision sets a status.
DECISION_KINDS = {
    RELEASED: "quarantine-release",
    RELEASE_FAILED: "quarantine-release-failed",
    DELETED: "quarantine-delete",
}


class QuarantineNotFound(GatewayError):
    """No quarantine entry has this id."""


class QuarantineStateError(GatewayError):
    """The entry's status does not allow the requested decision (e.g. a second release)."""

    def __init__(self, message: str, *, status: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class QuarantineEntry:
    """One held message as read back. ``message`` is set only by :meth:`SqlQuarantine.get`
    (None in listings, and once the entry was deleted)."""

    id: int
    created_at: datetime
    transaction_id: str
    session_id: str
    login: str | None
    client_ip: str | None
    mail_from: str
    recipients: tuple[str, ...]
    message_id: str | None
    size: int
    sha256: str
    smtputf8: bool
    body_8bitmime: bool
    check_id: str
    reason: str
    status: str
    decided_at: datetime | None
    decided_by: str | None
    upstream_reply: str | None
    message: bytes | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready metadata (timestamps as ISO 8601); never the message bytes."""
        data = asdict(self)
        del data["message"]
        data["recipients"] = list(self.recipients)
        for key in ("created_at", "decided_at"):
            value = data[key]
            data[key] = value.isoformat() if value is not None else None
        return data


def _text(value: object, limit: int = TEXT_LIMIT) -> str | None:
    """Bounded, NUL-free, encodable text (PostgreSQL refuses NUL and lone surrogates)."""
    if value is None:
        return None
    text = str(value)[:limit]
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "replace").decode("utf-8")
    return text


def _hold_row(txn: Transaction, message: bytes, check_id: str, reason: str) -> dict[str, Any]:
    recipients = [r.address for r in txn.accepted]
    if not recipients:
        raise ValueError("nothing to hold: the transaction has no accepted recipient")
    session = txn.session
    message_id = txn.message_id if txn.message_id is not None else Headers(message).message_id
    login = session.login
    return {
        "created_at": utcnow(),
        "transaction_id": _text(txn.id, 80),
        "session_id": _text(session.id, 64),
        "login": _text(login.strip().lower() if login else None, 255),
        "client_ip": _text(session.client_ip, 64),
        "mail_from": txn.mail_from,  # exactly as received: it is relayed on release
        "recipients": recipients,
        "message_id": _text(message_id, 998),
        "size": len(message),
        "sha256": sha256_hex(message),
        "message": bytes(message),
        "smtputf8": bool(txn.smtputf8),
        "body_8bitmime": bool(txn.body_8bitmime),
        "check_id": _text(check_id, 64) or "",
        "reason": _text(reason, REASON_LIMIT) or "",
        "status": HELD,
        "decided_at": None,
        "decided_by": None,
        "upstream_reply": None,
    }


def _entry(row: RowMapping) -> QuarantineEntry:
    return QuarantineEntry(
        id=int(row["id"]),
        created_at=row["created_at"],
        transaction_id=row["transaction_id"],
        session_id=row["session_id"],
        login=row["login"],
        client_ip=row["client_ip"],
        mail_from=row["mail_from"],
        recipients=tuple(row["recipients"]),
        message_id=row["message_id"],
        size=int(row["size"]),
        sha256=row["sha256"],
        smtputf8=bool(row["smtputf8"]),
        body_8bitmime=bool(row["body_8bitmime"]),
        check_id=row["check_id"],
        reason=row["reason"],
        status=row["status"],
        decided_at=row["decided_at"],
        decided_by=row["decided_by"],
        upstream_reply=row["upstream_reply"],
        message=bytes(row["message"]) if row.get("message") is not None else None,
    )


def _origins(status: str, force: bool) -> tuple[str, ...]:
    """The statuses an entry may be in for :meth:`SqlQuarantine.mark` to set ``status``."""
    if status in (RELEASED, RELEASE_FAILED):
        return (*UNDECIDED, RELEASING)
    if status in (RELEASING, DELETED):
        return (*UNDECIDED, RELEASING) if force else UNDECIDED
    raise ValueError(f"cannot mark a quarantine entry {status!r}")


_VERBS = {RELEASING: "released", DELETED: "deleted", RELEASED: "marked released"}
_DECISION_VERBS = {RELEASED: "released", RELEASE_FAILED: "release failed", DELETED: "deleted"}


def queue_id(entry_id: int) -> str:
    """How the client's 250 reply and the audit name a quarantine entry: ``Q<id>``."""
    return f"Q{entry_id}"


def _decision_detail(entry: QuarantineEntry, by: str, forced: bool) -> str:
    """The audit ``detail`` of a decision: what was decided about which entry, by whom."""
    detail = f"quarantine {queue_id(entry.id)} {_DECISION_VERBS[entry.status]} by {by}"
    if forced:
        detail += " (forced)"
    detail += f"; held by check {entry.check_id}"
    if entry.upstream_reply:
        detail += f": {entry.upstream_reply}"
    return detail


def _refusal(entry_id: int, wanted: str, current: str, by: str | None, at: datetime | None) -> str:
    verb = _VERBS.get(wanted, f"marked {wanted}")
    who = f" by {by}" if by else ""
    when = f" at {at.isoformat(timespec='seconds')}" if at else ""
    if current == RELEASING:
        return (
            f"quarantine {entry_id} cannot be {verb}: a release started{when}{who} has not "
            "finished; if it was interrupted, the upstream may or may not have the message: "
            "check before forcing (--force)"
        )
    return (
        f"quarantine {entry_id} cannot be {verb}: it is already {current}{who}{when}; only "
        f"{' or '.join(UNDECIDED)} messages can be {verb}"
    )


class SqlQuarantine(SqlStore):
    """The quarantine in the SQL database (see the module docstring)."""

    what = "quarantine database"

    # --- hold -------------------------------------------------------------------------------------

    async def hold(self, txn: Transaction, message: bytes, *, check_id: str, reason: str) -> int:
        """Take ``message`` (the exact bytes to relay on release) into custody with the envelope
        of ``txn`` (its accepted recipients); returns the entry id once the row is committed.

        Raises StoreUnavailable when the database fails or does not commit within ``timeout``
        (the caller must then answer 4xx), ValueError when ``txn`` has no accepted recipient.
        """
        row = _hold_row(txn, message, check_id, reason)

        async def write(conn: AsyncConnection) -> int:
            result = await conn.execute(insert(QUARANTINE).returning(QUARANTINE.c.id), row)
            return int(result.scalar_one())

        return await self._custody_write(write, self._discard_unconfirmed, what="quarantine write")

    async def _discard_unconfirmed(self, entry_id: int) -> None:
        try:
            async with self._engine.begin() as conn:
                await conn.execute(
                    update(QUARANTINE)
                    .where(QUARANTINE.c.id == entry_id, QUARANTINE.c.status == HELD)
                    .values(
                        status=DELETED,
                        message=None,
                        decided_at=utcnow(),
                        decided_by=UNCONFIRMED_BY,
                    )
                )
        except DB_ERRORS as error:
            log.error(
                "quarantine %d was committed after its client was told to retry, and could not "
                "be discarded (%s): delete it, the client sends the message again",
                entry_id,
                describe_db_error(error),
            )
            return
        log.warning(
            "quarantine %d discarded: committed after its client was told to retry", entry_id
        )

    # --- queries ----------------------------------------------------------------------------------

    async def list(
        self,
        status: str | None = None,
        login: str | None = None,
        limit: int = 50,
        before_id: int | None = None,
    ) -> builtins.list[QuarantineEntry]:
        """Entries (without their bytes) matching ``status`` and ``login``, newest first; pass
        the last id of a page as ``before_id`` for the next one. Raises StoreUnavailable."""
        if status is not None and status not in STATUSES:
            raise ValueError(f"unknown quarantine status {status!r}")
        stmt = select(*_METADATA_COLUMNS)
        if status is not None:
            stmt = stmt.where(QUARANTINE.c.status == status)
        if login is not None:
            stmt = stmt.where(QUARANTINE.c.login == login.strip().lower())
        if before_id is not None:
            stmt = stmt.where(QUARANTINE.c.id < before_id)
        stmt = stmt.order_by(QUARANTINE.c.id.desc()).limit(max(1, min(limit, MAX_PAGE)))

        async def fn(conn: AsyncConnection) -> builtins.list[QuarantineEntry]:
            return [_entry(r) for r in (await conn.execute(stmt)).mappings()]

        return await self._run(fn, write=False)

    async def get(self, entry_id: int, *, with_message: bool = True) -> QuarantineEntry | None:
        """One entry with its message bytes (unless ``with_message`` is false, or it was
        deleted), or None. Raises StoreUnavailable."""
        columns = QUARANTINE.columns if with_message else _METADATA_COLUMNS
        stmt = select(*columns).where(QUARANTINE.c.id == entry_id)

        async def fn(conn: AsyncConnection) -> QuarantineEntry | None:
            row = (await conn.execute(stmt)).mappings().first()
            return _entry(row) if row is not None else None

        return await self._run(fn, write=False)

    # --- decisions --------------------------------------------------------------------------------

    async def mark(
        self,
        entry_id: int,
        status: str,
        *,
        decided_by: str,
        upstream_reply: str | None = None,
        force: bool = False,
        interface: str = "cli",
    ) -> QuarantineEntry:
        """Record a decision atomically and return the entry as it now is (without bytes).

        ``releasing`` (a release claims the entry before relaying) and ``deleted`` (which also
        clears the bytes) are allowed from ``held`` and ``release-failed`` -- with ``force`` also
        from ``releasing``, for a release that was interrupted; ``released`` and
        ``release-failed`` from those three. ``released``, ``release-failed`` and ``deleted``
        write their audit event (:data:`DECISION_KINDS`; ``interface`` is the operator's tool,
        recorded as the event's listener) in the same database transaction. Raises
        QuarantineNotFound, QuarantineStateError (e.g. a second release), StoreUnavailable;
        ValueError for an unknown status.
        """
        origins = _origins(status, force)
        by = _text(decided_by, 255) or ""
        values: dict[str, Any] = {
            "status": status,
            "decided_at": utcnow(),
            "decided_by": by,
            "upstream_reply": _text(upstream_reply),
        }
        if status == DELETED:
            values["message"] = None

        async def fn(conn: AsyncConnection) -> QuarantineEntry:
            result = await conn.execute(
                update(QUARANTINE)
                .where(QUARANTINE.c.id == entry_id, QUARANTINE.c.status.in_(origins))
                .values(values)
            )
            current = (
                (await conn.execute(select(*_METADATA_COLUMNS).where(QUARANTINE.c.id == entry_id)))
                .mappings()
                .first()
            )
            if current is None:
                raise QuarantineNotFound(f"no quarantine entry {entry_id}")
            if not result.rowcount:
                raise QuarantineStateError(
                    _refusal(
                        entry_id,
                        status,
                        current["status"],
                        current["decided_by"],
                        current["decided_at"],
                    ),
                    status=current["status"],
                )
            entry = _entry(current)
            if status in DECISION_KINDS:
                await SqlAuditStore.record_decision_in(
                    conn,
                    Session(client_ip="-", client_port=0, listener=interface),
                    DECISION_KINDS[status],
                    _decision_detail(entry, by, force),
                    login=entry.login,
                    transaction_id=entry.transaction_id,
                    queue_id=queue_id(entry.id),
                    upstream_reply=entry.upstream_reply,
                )
            return entry

        return await self._run(fn, write=True)
