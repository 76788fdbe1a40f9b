"""The SQL audit store: the mandatory audit record of every message and session event.

What it does: :class:`SqlAuditStore` implements :class:`gateway.core.ports.AuditSink` with a
group-commit writer. Callers build their rows (from the Transaction/Session, in their own task),
enqueue them and await a future; one writer task takes everything pending (up to ``batch_size``)
and writes it in ONE database transaction with Core executemany statements, then resolves every
future. A caller returns only once its write is committed, so ``begin_message`` is durable before
the message is relayed. Under load many callers share one commit (one fsync), which is what makes
hundreds of messages per second possible on SQLite.

If a batch fails because of one bad row (a data error), its writes are retried one by one so that
only the culprit fails; if the database is unreachable, failing or slower than ``timeout``, every
waiter gets :class:`AuditUnavailable` (the service then answers 4xx: nothing is relayed unaudited).
A caller that gave up waiting (timeout, cancelled) before its ``begin_message`` was written is
skipped, and one whose record was committed too late is completed as "deferred", so no record claims
a message is "relaying" that never was. The writer never cancels a database call midway (that can
leave a connection holding locks); the engine's driver-level timeouts bound each batch. A gateway
that dies between a record's begin and its finish leaves it "relaying": at the next start,
:meth:`SqlAuditStore.finish_interrupted` completes such records once they are older than any live
transaction can be ("queued" when the message is in the durable queue, else "interrupted").

The query side (:meth:`SqlAuditStore.list_records`, :meth:`SqlAuditStore.get_record`) serves the
CLI and a later web UI: newest first, keyset-paginated on the integer id (``before_id``), filtered
by time range, login, sender, recipient (exact address or ``@domain``, case-insensitive), check id,
outcome and kind.

Each recipient row carries the ``encryption`` check's decision for it
(:class:`~gateway.core.model.RecipientEncryption`: policy, decision, format, key fingerprint,
reason), NULL when the check did not judge it.

Reads/writes: the ``audit_record``, ``audit_recipient`` and ``audit_verdict`` tables.

Security notes: no message content is ever written (size, SHA-256 and Message-ID only); strings
from clients are bounded, NUL-free valid UTF-8 before they reach the database. Database and driver
exceptions never reach callers: they become AuditUnavailable, and the log gets a one-line
description (no SQL parameters).
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Literal, TypeVar, cast

from sqlalchemy import (
    ColumnElement,
    Table,
    bindparam,
    delete,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from gateway.audit.models import (
    KINDS,
    OUTCOMES,
    SESSION_EVENT_KINDS,
    AuditRecipientRow,
    AuditRecordRow,
    AuditVerdictRow,
)
from gateway.core import replies
from gateway.core.errors import AuditUnavailable
from gateway.core.model import (
    RecipientEncryption,
    Session,
    Transaction,
    VerdictRecord,
    new_id,
    utcnow,
)
from gateway.db.engine import (
    DB_ERRORS,
    DetachedTimeouts,
    describe_db_error,
    is_data_error,
    safe_url,
)

log = logging.getLogger("mailward.audit")

T = TypeVar("T")

RECORD = cast(Table, AuditRecordRow.__table__)
RECIPIENT = cast(Table, AuditRecipientRow.__table__)
VERDICT = cast(Table, AuditVerdictRow.__table__)

#: the recipient's encryption decision (revision 0008), NULL when the check did not judge it
ENCRYPTION_COLUMNS = (
    "encryption_policy",
    "encryption_decision",
    "encryption_format",
    "encryption_key",
    "encryption_reason",
)
TEXT_LIMIT = 2000
DETAIL_LIMIT = 1000
MAX_PAGE = 1000

#: The columns finish_message may change (everything else was final at begin_message).
_FINISH_COLUMNS = (
    "outcome",
    "ended_at",
    "message_id",
    "size",
    "sha256",
    "final_reply",
    "upstream_reply",
    "queue_id",
    "incident",
    # NULL for a message; finishing also clears what finish_interrupted wrote
    "detail",
)

#: detail of a record found "relaying" long after its transaction must have ended
INTERRUPTED_DETAIL = (
    "the gateway stopped (or could not complete this record) before the outcome was known; "
    "found at start: the upstream may or may not have the message, and a client that got no "
    "reply sends it again"
)
#: detail of such a record whose message is in the durable queue (``{queue_id}``)
INTERRUPTED_QUEUED_DETAIL = (
    "the gateway stopped (or could not complete this record) before the outcome was known; "
    "found at start with the message in the queue as {queue_id}: it is delivered or bounced "
    "from there (a client that got no reply sends it again)"
)
#: records looked at per pass of finish_interrupted
_INTERRUPTED_BATCH = 500


# --- row building (in the caller's task) ----------------------------------------------------------


def _text(value: object, limit: int = TEXT_LIMIT) -> str | None:
    """Bounded, NUL-free, encodable text (PostgreSQL refuses NUL and lone surrogates)."""
    if value is None:
        return None
    text = str(value)
    if len(text) > limit:
        text = text[:limit]
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "replace").decode("utf-8")
    return text


def _session_columns(session: Session) -> dict[str, Any]:
    return {
        "session_id": _text(session.id, 64),
        "listener": _text(session.listener),
        "client_ip": _text(session.client_ip, 64),
        "client_port": session.client_port,
        "tls_version": _text(session.tls_version),
        "tls_cipher": _text(session.tls_cipher),
        "helo": _text(session.helo),
    }


def _message_columns(txn: Transaction, outcome: str, ended_at: datetime | None) -> dict[str, Any]:
    return {
        "kind": "message",
        "outcome": outcome,
        "started_at": txn.started_at,
        "ended_at": ended_at,
        **_session_columns(txn.session),
        "transaction_id": _text(txn.id, 80),
        "login": _text(txn.session.login),
        "mail_from": _text(txn.mail_from),
        "message_id": _text(txn.message_id),
        "size": txn.size,
        "sha256": _text(txn.sha256, 64),
        "final_reply": _text(txn.final_reply),
        "upstream_reply": _text(txn.upstream_reply),
        "queue_id": _text(txn.queue_id),
        "detail": None,
        "incident": _text(txn.incident, 64),
    }


def _encryption_columns(note: RecipientEncryption | None) -> dict[str, Any]:
    if note is None:
        return dict.fromkeys(ENCRYPTION_COLUMNS)
    return {
        "encryption_policy": _text(note.policy, 16),
        "encryption_decision": _text(note.decision, 16),
        "encryption_format": _text(note.format, 16) or None,
        "encryption_key": _text(note.fingerprint, 64) or None,
        "encryption_reason": _text(note.reason),
    }


def _recipient_rows(txn: Transaction) -> list[dict[str, Any]]:
    return [
        {
            "position": i,
            "address": _text(r.address) or "",
            "status": _text(r.status.value, 16),
            "reply": _text(r.reply) or "",
            **_encryption_columns(r.encryption),
        }
        for i, r in enumerate(txn.recipients)
    ]


def _verdict_rows(verdicts: Sequence[VerdictRecord]) -> list[dict[str, Any]]:
    return [
        {
            "position": i,
            "check_id": _text(v.check_id, 64),
            "stage": _text(v.stage.value, 16),
            "action": _text(v.action.value, 16),
            "mode": _text(v.mode.value, 16),
            "applied": bool(v.applied),
            "recipient": _text(v.recipient),
            "reply": _text(v.reply) or "",
            "reason": _text(v.reason) or "",
            "measured": _text(v.measured),
            "limit": _text(v.limit),
        }
        for i, v in enumerate(verdicts)
    ]


def _event_record(session: Session, kind: str, detail: str, login: str | None) -> dict[str, Any]:
    """The ``audit_record`` row of a session-level event (no transaction, no message)."""
    if kind not in SESSION_EVENT_KINDS:
        raise ValueError(f"invalid audit event kind {kind!r}")
    now = utcnow()
    return {
        "kind": kind,
        "outcome": None,
        "started_at": now,
        "ended_at": now,
        **_session_columns(session),
        "transaction_id": None,
        "login": _text(login if login is not None else session.login),
        "mail_from": None,
        "message_id": None,
        "size": None,
        "sha256": None,
        "final_reply": None,
        "upstream_reply": None,
        "queue_id": None,
        "detail": _text(detail, DETAIL_LIMIT),
        "incident": None,
    }


def _check_outcome(outcome: str, *, allow_relaying: bool = False) -> None:
    if outcome not in OUTCOMES or (outcome == "relaying" and not allow_relaying):
        raise ValueError(f"invalid audit outcome {outcome!r}")


def _retrieve(future: asyncio.Future[int]) -> None:
    """Nobody awaits a compensating write: consume its outcome (failures were logged)."""
    if not future.cancelled():
        future.exception()


@dataclass(slots=True)
class _Write:
    """One queued write: a new record (with its children) or the completion of one."""

    op: Literal["insert", "finish"]
    future: asyncio.Future[int]
    record: dict[str, Any]
    recipients: list[dict[str, Any]] = field(default_factory=list)
    verdicts: list[dict[str, Any]] = field(default_factory=list)
    record_id: int = 0
    skip_if_abandoned: bool = False


# --- query results --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AuditRecipient:
    position: int
    address: str
    status: str
    reply: str
    #: the ``encryption`` check's decision (None when it did not judge the recipient)
    encryption_policy: str | None = None
    encryption_decision: str | None = None
    encryption_format: str | None = None
    encryption_key: str | None = None
    encryption_reason: str | None = None


@dataclass(frozen=True, slots=True)
class AuditVerdict:
    position: int
    check_id: str
    stage: str
    action: str
    mode: str
    applied: bool
    recipient: str | None
    reply: str
    reason: str
    measured: str | None
    limit: str | None


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One audit record as read back, with its recipients and verdicts in order."""

    id: int
    kind: str
    outcome: str | None
    started_at: datetime
    ended_at: datetime | None
    session_id: str
    transaction_id: str | None
    listener: str | None
    client_ip: str | None
    client_port: int | None
    tls_version: str | None
    tls_cipher: str | None
    helo: str | None
    login: str | None
    mail_from: str | None
    message_id: str | None
    size: int | None
    sha256: str | None
    final_reply: str | None
    upstream_reply: str | None
    queue_id: str | None
    detail: str | None
    incident: str | None
    recipients: tuple[AuditRecipient, ...] = ()
    verdicts: tuple[AuditVerdict, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: timestamps as ISO 8601 strings."""
        data = asdict(self)
        for key in ("started_at", "ended_at"):
            value = data[key]
            data[key] = value.isoformat() if value is not None else None
        return data


@dataclass(frozen=True, slots=True)
class AuditFilter:
    """Criteria of :meth:`SqlAuditStore.list_records` (all optional, combined with AND)."""

    since: datetime | None = None
    until: datetime | None = None
    login: str | None = None
    sender: str | None = None
    recipient: str | None = None
    check_id: str | None = None
    outcome: str | None = None
    kind: str | None = None


def _like_domain(domain_pattern: str) -> str:
    escaped = domain_pattern.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}"


def _address_condition(column: Any, value: str) -> ColumnElement[bool]:
    """Case-insensitive match on an address column: exact, or a whole ``@domain``."""
    if value.startswith("@") and len(value) > 1:
        condition: ColumnElement[bool] = func.lower(column).like(_like_domain(value), escape="\\")
        return condition
    equal: ColumnElement[bool] = func.lower(column) == value.lower()
    return equal


def _conditions(f: AuditFilter) -> list[ColumnElement[bool]]:
    conds: list[ColumnElement[bool]] = []
    if f.since is not None:
        conds.append(AuditRecordRow.started_at >= f.since)
    if f.until is not None:
        conds.append(AuditRecordRow.started_at < f.until)
    if f.login is not None:
        conds.append(func.lower(AuditRecordRow.login) == f.login.lower())
    if f.sender is not None:
        conds.append(_address_condition(AuditRecordRow.mail_from, f.sender))
    if f.recipient is not None:
        conds.append(
            AuditRecordRow.id.in_(
                select(AuditRecipientRow.record_id).where(
                    _address_condition(AuditRecipientRow.address, f.recipient)
                )
            )
        )
    if f.check_id is not None:
        conds.append(
            AuditRecordRow.id.in_(
                select(AuditVerdictRow.record_id).where(AuditVerdictRow.check_id == f.check_id)
            )
        )
    if f.outcome is not None:
        conds.append(AuditRecordRow.outcome == f.outcome)
    if f.kind is not None:
        conds.append(AuditRecordRow.kind == f.kind)
    return conds


_RECORD_FIELDS = tuple(c.name for c in RECORD.columns)


class SqlAuditStore:
    """The audit log in the SQL database (see the module docstring)."""

    def __init__(
        self, engine: AsyncEngine, batch_size: int, timeout: float, linger: float = 0.0
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if not 0.0 <= linger <= 1.0:
            raise ValueError("linger must be between 0 and 1 second")
        self._engine = engine
        self._batch_size = batch_size
        self._linger = linger
        self._timeout = timeout
        self._pending: collections.deque[_Write] = collections.deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._queries = DetachedTimeouts(timeout)

    # --- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the writer task (idempotent)."""
        if self._task is None:
            self._closing = False
            self._task = asyncio.create_task(self._run(), name="mailward-audit-writer")

    async def close(self) -> None:
        """Write everything still pending, then stop the writer. Later writes are refused."""
        task, self._task = self._task, None
        if task is not None:
            self._closing = True
            self._wakeup.set()
            await task
        await self._queries.drain()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._closing

    # --- AuditSink -------------------------------------------------------------------------------

    async def begin_message(self, txn: Transaction) -> int:
        """Commit the "relaying" record of ``txn``; returns its id. Raises AuditUnavailable."""
        write = self._new_write(
            "insert",
            _message_columns(txn, "relaying", None),
            recipients=_recipient_rows(txn),
            verdicts=_verdict_rows(txn.verdicts),
            skip_if_abandoned=True,
        )
        return await self._submit(write)

    async def finish_message(self, audit_id: int, txn: Transaction, outcome: str) -> None:
        """Complete record ``audit_id`` with the outcome and final per-recipient results."""
        _check_outcome(outcome)
        columns = _message_columns(txn, outcome, utcnow())
        write = self._new_write(
            "finish",
            {key: columns[key] for key in _FINISH_COLUMNS},
            recipients=_recipient_rows(txn),
            verdicts=_verdict_rows(txn.verdicts),
            record_id=audit_id,
        )
        await self._submit(write)

    async def record_transaction(self, txn: Transaction, outcome: str) -> None:
        """Write a finished transaction that never reached the relay."""
        _check_outcome(outcome)
        write = self._new_write(
            "insert",
            _message_columns(txn, outcome, utcnow()),
            recipients=_recipient_rows(txn),
            verdicts=_verdict_rows(txn.verdicts),
        )
        await self._submit(write)

    async def record_session_event(
        self,
        session: Session,
        kind: str,
        detail: str,
        login: str | None = None,
        verdicts: Sequence[VerdictRecord] = (),
    ) -> None:
        """A session-level event ("auth-failure", "auth-tempfail", "auth-throttled", "dropped",
        "refused", "timeout"); ``login`` overrides the session's (e.g. the login that failed);
        ``verdicts`` are the check verdicts that explain it (e.g. auth-throttle's)."""
        record = _event_record(session, kind, detail, login)
        await self._submit(self._new_write("insert", record, verdicts=_verdict_rows(verdicts)))

    @staticmethod
    async def record_event_in(
        conn: AsyncConnection,
        session: Session,
        kind: str,
        detail: str,
        login: str | None = None,
        verdicts: Sequence[VerdictRecord] = (),
    ) -> int:
        """Like :meth:`record_session_event`, but written inside the caller's open database
        transaction ``conn`` instead of through the group-commit writer: the event commits or
        rolls back together with the caller's own change (an account-state transition), so
        neither exists without the other. Returns the record id. Database errors propagate to
        the caller, which translates them (it owns the transaction)."""
        record = _event_record(session, kind, detail, login)
        record_id = int(
            (await conn.execute(insert(RECORD).returning(RECORD.c.id), record)).scalar_one()
        )
        rows = [{**v, "record_id": record_id} for v in _verdict_rows(verdicts)]
        if rows:
            await conn.execute(insert(VERDICT), rows)
        return record_id

    @staticmethod
    async def record_decision_in(
        conn: AsyncConnection,
        session: Session,
        kind: str,
        detail: str,
        *,
        login: str | None,
        transaction_id: str,
        queue_id: str,
        upstream_reply: str | None = None,
    ) -> int:
        """Like :meth:`record_event_in`, for an operator's decision about one message (a
        quarantine release or delete): the record also names the message's transaction and queue
        id (which link it to the message's own record) and the upstream's reply to a release."""
        record = {
            **_event_record(session, kind, detail, login),
            "transaction_id": _text(transaction_id, 80),
            "queue_id": _text(queue_id),
            "upstream_reply": _text(upstream_reply),
        }
        return int((await conn.execute(insert(RECORD).returning(RECORD.c.id), record)).scalar_one())

    # --- records a crash left behind ----------------------------------------------------------

    async def finish_interrupted(
        self,
        *,
        started_before: datetime,
        custody_of: Callable[[Mapping[int, str | None]], Awaitable[Mapping[int, int]]],
    ) -> tuple[int, int]:
        """At start: complete the message records still "relaying" that started before
        ``started_before`` -- a bound past which no live transaction (of this or another gateway
        sharing the database) can still be relaying them: their gateway stopped, or failed to
        complete them, before the outcome was known. ``custody_of`` maps record ids (with their
        transaction ids) to the queue id of the message the transaction left in the durable
        queue; such a record becomes "queued" with that queue id, any other "interrupted"; both
        with an explanatory ``detail`` (recipients keep the status they had). A record completed
        meanwhile is left alone, and a live finish_message still overwrites these. Returns
        (interrupted, queued). Raises AuditUnavailable (``custody_of``'s errors propagate)."""
        interrupted = queued = 0
        while True:
            found = await self._guarded(self._stale_relaying(started_before))
            if not found:
                break
            in_queue = dict(await custody_of(found))
            lost, kept = await self._guarded(self._complete_interrupted(found, in_queue))
            interrupted += lost
            queued += kept
            if len(found) < _INTERRUPTED_BATCH:
                break
        return interrupted, queued

    async def _stale_relaying(self, started_before: datetime) -> dict[int, str | None]:
        """Up to a batch of "relaying" message records started before the bound: id ->
        transaction id."""
        candidates = (
            select(RECORD.c.id, RECORD.c.transaction_id)
            .where(
                RECORD.c.kind == "message",
                RECORD.c.outcome == "relaying",
                RECORD.c.started_at < started_before,
            )
            .order_by(RECORD.c.id)
            .limit(_INTERRUPTED_BATCH)
        )
        async with self._engine.connect() as conn:
            return {int(rid): txn for rid, txn in await conn.execute(candidates)}

    async def _complete_interrupted(
        self, found: Mapping[int, str | None], in_queue: Mapping[int, int]
    ) -> tuple[int, int]:
        """One transaction: ``found`` records still "relaying" become "queued" (those in
        ``in_queue``) or "interrupted"; (interrupted, queued) counts."""
        now = utcnow()
        still = RECORD.c.outcome == "relaying"
        lost = [rid for rid in found if rid not in in_queue]
        interrupted = queued = 0
        async with self._engine.begin() as conn:
            if lost:
                result = await conn.execute(
                    update(RECORD)
                    .where(RECORD.c.id.in_(lost), still)
                    .values(outcome="interrupted", ended_at=now, detail=INTERRUPTED_DETAIL)
                )
                interrupted = int(result.rowcount)
            for rid, queue_id in in_queue.items():
                detail = INTERRUPTED_QUEUED_DETAIL.format(queue_id=queue_id)
                result = await conn.execute(
                    update(RECORD)
                    .where(RECORD.c.id == rid, still)
                    .values(
                        outcome="queued",
                        ended_at=now,
                        queue_id=str(queue_id),
                        detail=_text(detail, DETAIL_LIMIT),
                    )
                )
                queued += int(result.rowcount)
        return interrupted, queued

    async def _guarded(self, operation: Coroutine[Any, Any, T]) -> T:
        try:
            return await self._queries.run(operation)
        except DB_ERRORS as error:
            raise self._unavailable(error) from None

    # --- group-commit writer ---------------------------------------------------------------------

    def _new_write(
        self, op: Literal["insert", "finish"], record: dict[str, Any], **kw: Any
    ) -> _Write:
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        return _Write(op, future, record, **kw)

    async def _submit(self, write: _Write) -> int:
        if not self.running:
            raise AuditUnavailable("audit store is not running")
        self._pending.append(write)
        self._wakeup.set()
        try:
            async with asyncio.timeout(self._timeout):
                return await write.future
        except TimeoutError:
            raise AuditUnavailable(f"audit write not committed within {self._timeout:g}s") from None

    async def _run(self) -> None:
        while True:
            if not self._pending:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            count = min(len(self._pending), self._batch_size)
            batch = [self._pending.popleft() for _ in range(count)]
            batch = [w for w in batch if not (w.skip_if_abandoned and w.future.done())]
            if batch:
                await self._write_batch(batch)
                # group commit under load: records arrived while that batch was written, so
                # more are coming; wait up to `linger` for them to share the next transaction
                # (a writer that was idle writes at once: no delay when the gateway is quiet)
                if (
                    self._linger
                    and self._pending
                    and len(self._pending) < self._batch_size
                    and not self._closing
                ):
                    await asyncio.sleep(self._linger)

    async def _write_batch(self, batch: list[_Write]) -> None:
        # No asyncio timeout here: cancelling a driver call midway can leave its connection holding
        # locks. The driver-level timeouts (see gateway.db.engine) bound the batch; callers stop
        # waiting after `timeout` on their own.
        try:
            async with self._engine.begin() as conn:
                ids = await self._apply(conn, batch)
        except Exception as error:  # the writer must survive anything; callers get AuditUnavailable
            if len(batch) > 1 and is_data_error(error):
                for write in batch:
                    await self._write_batch([write])
                return
            self._fail(batch, error)
            return
        for write, record_id in zip(batch, ids, strict=True):
            if not write.future.done():
                write.future.set_result(record_id)
            elif write.skip_if_abandoned:
                self._compensate(write)

    def _compensate(self, begin: _Write) -> None:
        """A "relaying" record was committed but its caller had given up waiting (and answered
        4xx without relaying): record that truthfully instead of leaving "relaying" forever."""
        reply = replies.AUDIT_UNAVAILABLE.line()
        record = {key: begin.record[key] for key in _FINISH_COLUMNS}
        record.update(outcome="deferred", ended_at=utcnow(), final_reply=reply)
        recipients = [
            {**r, "status": "deferred", "reply": reply} if r["status"] == "accepted" else r
            for r in begin.recipients
        ]
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_retrieve)
        self._pending.appendleft(
            _Write("finish", future, record, recipients, begin.verdicts, begin.record_id)
        )
        self._wakeup.set()

    def _fail(self, batch: Sequence[_Write], error: Exception) -> None:
        if isinstance(error, DB_ERRORS):
            reason = describe_db_error(error)
            log.error("audit write of %d record(s) failed: %s", len(batch), reason)
        else:
            incident = new_id()
            reason = f"internal error (incident {incident})"
            log.error(
                "audit write of %d record(s) failed, incident %s: %s",
                len(batch),
                incident,
                type(error).__name__,
                exc_info=error,
            )
        for write in batch:
            if not write.future.done():
                write.future.set_exception(
                    AuditUnavailable(
                        f"audit database {safe_url(self._engine.url)} unavailable: {reason}"
                    )
                )

    async def _apply(self, conn: AsyncConnection, batch: Sequence[_Write]) -> list[int]:
        inserts = [w for w in batch if w.op == "insert"]
        finishes = [w for w in batch if w.op == "finish"]
        children_rcpt: list[dict[str, Any]] = []
        children_verdict: list[dict[str, Any]] = []
        if inserts:
            if len(inserts) == 1:
                new_ids = [
                    (
                        await conn.execute(insert(RECORD).returning(RECORD.c.id), inserts[0].record)
                    ).scalar_one()
                ]
            else:
                result = await conn.execute(
                    insert(RECORD).returning(RECORD.c.id, sort_by_parameter_order=True),
                    [w.record for w in inserts],
                )
                new_ids = list(result.scalars())
            for write, record_id in zip(inserts, new_ids, strict=True):
                write.record_id = int(record_id)
                children_rcpt.extend({**r, "record_id": write.record_id} for r in write.recipients)
                children_verdict.extend({**v, "record_id": write.record_id} for v in write.verdicts)
        if finishes:
            await conn.execute(
                update(RECORD)
                .where(RECORD.c.id == bindparam("b_id"))
                .values({key: bindparam(f"b_{key}") for key in _FINISH_COLUMNS}),
                [
                    {"b_id": w.record_id, **{f"b_{k}": v for k, v in w.record.items()}}
                    for w in finishes
                ],
            )
            finished_ids = sorted({w.record_id for w in finishes})
            await conn.execute(delete(RECIPIENT).where(RECIPIENT.c.record_id.in_(finished_ids)))
            await conn.execute(delete(VERDICT).where(VERDICT.c.record_id.in_(finished_ids)))
            for write in finishes:
                children_rcpt.extend({**r, "record_id": write.record_id} for r in write.recipients)
                children_verdict.extend({**v, "record_id": write.record_id} for v in write.verdicts)
        if children_rcpt:
            await conn.execute(insert(RECIPIENT), children_rcpt)
        if children_verdict:
            await conn.execute(insert(VERDICT), children_verdict)
        return [w.record_id for w in batch]

    # --- queries ---------------------------------------------------------------------------------

    async def list_records(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        login: str | None = None,
        sender: str | None = None,
        recipient: str | None = None,
        check_id: str | None = None,
        outcome: str | None = None,
        kind: str | None = None,
        limit: int = 50,
        before_id: int | None = None,
    ) -> list[AuditRecord]:
        """Records matching every given filter, newest first; pass the last id of a page as
        ``before_id`` to get the next one. Raises AuditUnavailable."""
        if kind is not None and kind not in KINDS:
            raise ValueError(f"unknown audit kind {kind!r}")
        for bound in (since, until):
            if bound is not None and bound.tzinfo is None:
                raise ValueError("since/until must be timezone-aware")
        criteria = AuditFilter(since, until, login, sender, recipient, check_id, outcome, kind)
        stmt = select(RECORD).where(*_conditions(criteria))
        if before_id is not None:
            stmt = stmt.where(RECORD.c.id < before_id)
        stmt = stmt.order_by(RECORD.c.id.desc()).limit(max(1, min(limit, MAX_PAGE)))

        async def query() -> list[AuditRecord]:
            async with self._engine.connect() as conn:
                rows = (await conn.execute(stmt)).mappings().all()
                return await self._with_children(conn, rows)

        return await self._query(query())

    async def get_record(self, record_id: int) -> AuditRecord | None:
        """One record with its recipients and verdicts, or None. Raises AuditUnavailable."""

        async def query() -> list[AuditRecord]:
            async with self._engine.connect() as conn:
                stmt = select(RECORD).where(RECORD.c.id == record_id)
                rows = (await conn.execute(stmt)).mappings().all()
                return await self._with_children(conn, rows)

        records = await self._query(query())
        return records[0] if records else None

    async def _query(self, operation: Coroutine[Any, Any, list[AuditRecord]]) -> list[AuditRecord]:
        try:
            return await self._queries.run(operation)
        except DB_ERRORS as error:
            raise self._unavailable(error) from None

    async def _with_children(self, conn: AsyncConnection, rows: Iterable[Any]) -> list[AuditRecord]:
        rows = list(rows)
        ids = [row["id"] for row in rows]
        recipients: dict[int, list[AuditRecipient]] = {i: [] for i in ids}
        verdicts: dict[int, list[AuditVerdict]] = {i: [] for i in ids}
        if ids:
            for r in await conn.execute(
                select(RECIPIENT)
                .where(RECIPIENT.c.record_id.in_(ids))
                .order_by(RECIPIENT.c.record_id, RECIPIENT.c.position)
            ):
                recipients[r.record_id].append(
                    AuditRecipient(
                        r.position,
                        r.address,
                        r.status,
                        r.reply,
                        **{name: getattr(r, name) for name in ENCRYPTION_COLUMNS},
                    )
                )
            for v in await conn.execute(
                select(VERDICT)
                .where(VERDICT.c.record_id.in_(ids))
                .order_by(VERDICT.c.record_id, VERDICT.c.position)
            ):
                verdicts[v.record_id].append(
                    AuditVerdict(
                        v.position,
                        v.check_id,
                        v.stage,
                        v.action,
                        v.mode,
                        bool(v.applied),
                        v.recipient,
                        v.reply,
                        v.reason,
                        v.measured,
                        v.limit,
                    )
                )
        return [
            AuditRecord(
                **{name: row[name] for name in _RECORD_FIELDS},
                recipients=tuple(recipients[row["id"]]),
                verdicts=tuple(verdicts[row["id"]]),
            )
            for row in rows
        ]

    def _unavailable(self, error: BaseException) -> AuditUnavailable:
        return AuditUnavailable(
            f"audit database {safe_url(self._engine.url)} unavailable: {describe_db_error(error)}"
        )
