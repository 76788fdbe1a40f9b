"""The SQL queue store: messages in custody, their copies' schedule and claims, per-recipient state.

What it does: :class:`SqlQueueStore` implements :class:`~gateway.queue.model.QueueStore` on the
tables of :mod:`gateway.queue.models`. :meth:`~SqlQueueStore.enqueue` commits a message with its
copies and recipients (its spool files are already durable) before it returns.
:meth:`~SqlQueueStore.claim` hands due copies to one runner for a lease: on PostgreSQL with
``SELECT ... FOR UPDATE SKIP LOCKED`` and an UPDATE of ``claimed_by`` / ``claim_until`` in the same
transaction, so several gateway processes sharing the table never get the same copy; on SQLite
with one conditional ``UPDATE ... RETURNING`` (SQLite serialises writers). A claim whose lease
expired (its worker crashed) is claimable again. :meth:`~SqlQueueStore.record_attempt` stores the
per-recipient results and releases the claim in one transaction -- refused with
:class:`~gateway.queue.model.ClaimLost` if the worker no longer holds it -- and may enqueue the
resulting DSN in the same transaction. Operator actions (:meth:`set_state`, :meth:`retry_now`)
never touch a copy under a live claim; their ``event`` hook runs inside the change's database
transaction (the caller writes the audit event there: never a change without its event), and a
delete with a bounce enqueues its DSN in that same transaction (never a bounced recipient without
its DSN).

An :meth:`enqueue` that is not committed within ``timeout`` raises StoreUnavailable (the caller
answers 4xx and the client sends the message again). The write is not cancelled midway; if it
commits after the caller gave up, its copies are immediately set ``deleted`` (recipients
``dropped``), so a message the client was told to retry is never delivered from the queue too.

Reads/writes: the ``queue_message``, ``queue_copy`` and ``queue_recipient`` tables (revision
``0006``).

Security notes: no message bytes pass through here (only spool names, sizes and digests). Envelope
addresses are stored exactly as received (they are relayed); replies are bounded, NUL-free text.
Database and driver exceptions become :class:`~gateway.core.errors.StoreUnavailable` here, with a
one-line description (no SQL, no parameters, the URL's password masked).
"""

from __future__ import annotations

import builtins
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, TypeVar, cast

from sqlalchemy import (
    ColumnElement,
    RowMapping,
    Select,
    Table,
    and_,
    exists,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from gateway.core import replies
from gateway.core.model import utcnow
from gateway.db.engine import DB_ERRORS, SqlStore, describe_db_error
from gateway.queue.model import (
    BOUNCED,
    COPY_STATES,
    CORRUPT,
    DELETED,
    DELIVERED,
    DONE,
    DROPPED,
    HELD,
    PENDING,
    QUEUED,
    RECIPIENT_STATES,
    AttemptResult,
    ClaimLost,
    NewBounce,
    NewCopy,
    OperatorChange,
    QueuedCopy,
    QueuedMessage,
    QueuedRecipient,
)
from gateway.queue.models import QueueCopyRow, QueueMessageRow, QueueRecipientRow
from gateway.queue.spool import check_name

T = TypeVar("T")

#: ``event(conn, change)``: called inside the database transaction of an operator change that
#: changed something, with the open connection; writes the change's audit event there
#: (``SqlAuditStore.record_decision_in``). Anything it raises rolls the change back.
ChangeHook = Callable[[AsyncConnection, OperatorChange], Awaitable[object]]

log = logging.getLogger("mailward.queue")

MESSAGE = cast(Table, QueueMessageRow.__table__)
COPY = cast(Table, QueueCopyRow.__table__)
RECIPIENT = cast(Table, QueueRecipientRow.__table__)

MAX_PAGE = 1000
TEXT_LIMIT = 2000
DEFAULT_LIFETIME = 5 * 86400.0
#: reply recorded on the recipients of an enqueue that committed after its caller gave up
UNCONFIRMED_REPLY = "committed after the client was told to retry; not delivered from the queue"
#: copy states that still need their spool file
LIVE_STATES = (QUEUED, HELD)
#: states an operator (or the runner, for CORRUPT) may move copies to with set_state
SETTABLE_STATES = (QUEUED, HELD, DELETED, CORRUPT)


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


def _not_claimed(now: datetime) -> ColumnElement[bool]:
    """No live claim: never claimed, released, or its lease expired."""
    return or_(COPY.c.claim_until.is_(None), COPY.c.claim_until < now)


class SqlQueueStore(SqlStore):
    """The queue in the SQL database (see the module docstring).

    ``lifetime`` (seconds) is the default time a message is retried (``expires_at``); ``clock``
    gives "now" for schedules, claims and leases (tests inject one).
    """

    what = "queue database"
    unavailable_reply = replies.QUEUE_UNAVAILABLE

    def __init__(
        self,
        engine: AsyncEngine,
        timeout: float,
        *,
        lifetime: float = DEFAULT_LIFETIME,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        super().__init__(engine, timeout)
        self._lifetime = lifetime
        self._clock = clock
        self._postgres = engine.dialect.name == "postgresql"

    # --- plumbing ---------------------------------------------------------------------------------

    # --- taking custody ---------------------------------------------------------------------------

    async def enqueue(
        self,
        *,
        txn_id: str,
        mail_from: str,
        login: str | None,
        copies: builtins.list[NewCopy],
        smtputf8: bool,
        body_8bitmime: bool,
        is_bounce: bool = False,
        audit_id: int | None = None,
        message_id_header: str | None = None,
        first_attempt: datetime | None = None,
        lifetime: float | None = None,
    ) -> int:
        """Take a message into custody; its queue id once committed (see the module docstring).

        Raises StoreUnavailable (failure, or not committed within ``timeout``), ValueError for a
        message without copies or a copy without recipients or with a malformed spool name.
        """
        now = self._clock()
        message = {
            "txn_id": _text(txn_id, 80) or "",
            "mail_from": mail_from,  # exactly as received: it is relayed
            "login": _text(login.strip().lower() if login else None, 255),
            "created_at": now,
            "expires_at": now + timedelta(seconds=self._lifetime if lifetime is None else lifetime),
            "smtputf8": bool(smtputf8),
            "body_8bitmime": bool(body_8bitmime),
            "is_bounce": bool(is_bounce),
            "audit_id": audit_id,
            "message_id_header": _text(message_id_header, 998),
            "warned_at": None,
        }
        planned = [_copy_rows(copy, first_attempt or now, now) for copy in copies]
        if not planned:
            raise ValueError("nothing to queue: no copy")

        async def write(conn: AsyncConnection) -> int:
            return await _insert_message(conn, message, planned)

        return await self._custody_write(
            write, self._discard_unconfirmed, what="queue write", reply=replies.QUEUE_UNAVAILABLE
        )

    async def _discard_unconfirmed(self, message_id: int) -> None:
        now = self._clock()
        try:
            async with self._engine.begin() as conn:
                await _delete_copies(
                    conn,
                    COPY.c.message_id == message_id,
                    pending_state=DROPPED,
                    reply=UNCONFIRMED_REPLY,
                    now=now,
                    origins=(QUEUED,),
                )
        except DB_ERRORS as error:
            log.error(
                "queue message %d was committed after its client was told to retry, and could "
                "not be discarded (%s): delete it (mailward queue delete), the client sends the "
                "message again",
                message_id,
                describe_db_error(error),
            )
            return
        log.warning(
            "queue message %d discarded: committed after its client was told to retry", message_id
        )

    # --- the runner -------------------------------------------------------------------------------

    async def claim(self, worker: str, *, limit: int, lease: float) -> builtins.list[QueuedMessage]:
        """Claim up to ``limit`` due copies (oldest schedule first) for ``lease`` seconds; the
        messages holding them (each with only its claimed copies). Raises StoreUnavailable."""
        if not worker or len(worker) > 64:
            raise ValueError("worker must be 1 to 64 characters")
        now = self._clock()
        until = now + timedelta(seconds=lease)
        due = (
            select(COPY.c.id)
            .where(COPY.c.state == QUEUED, COPY.c.next_attempt <= now, _not_claimed(now))
            .order_by(COPY.c.next_attempt, COPY.c.id)
            .limit(max(1, limit))
        )
        claim = {"claimed_by": worker, "claim_until": until}

        async def fn(conn: AsyncConnection) -> builtins.list[QueuedMessage]:
            if self._postgres:
                ids = list((await conn.execute(due.with_for_update(skip_locked=True))).scalars())
                if ids:
                    await conn.execute(update(COPY).where(COPY.c.id.in_(ids)).values(claim))
            else:
                result = await conn.execute(
                    update(COPY).where(COPY.c.id.in_(due)).values(claim).returning(COPY.c.id)
                )
                ids = list(result.scalars())
            if not ids:
                return []
            messages = await _load(conn, COPY.c.id.in_(ids))
            return sorted(messages, key=lambda m: min(c.next_attempt or now for c in m.copies))

        return await self._run(fn, write=True)

    async def release_claims(self, worker: str) -> int:
        """Release every claim ``worker`` holds (see ``QueueStore.release_claims``); how many."""

        async def fn(conn: AsyncConnection) -> int:
            result = await conn.execute(
                update(COPY)
                .where(COPY.c.claimed_by == worker)
                .values(claimed_by=None, claim_until=None)
            )
            return int(result.rowcount)

        return await self._run(fn, write=True)

    async def record_attempt(
        self,
        copy_id: int,
        worker: str,
        result: AttemptResult,
        *,
        next_attempt: datetime | None,
        bounce: NewBounce | None = None,
    ) -> QueuedCopy:
        """Store one attempt and release the claim (see ``QueueStore.record_attempt``).

        A recipient already in a final state keeps it; addresses not in ``result`` stay pending.
        Raises ClaimLost, StoreUnavailable; ValueError when recipients stay pending and
        ``next_attempt`` is None.
        """
        now = self._clock()
        groups: dict[tuple[str, str | None, str | None], builtins.list[str]] = defaultdict(list)
        for address, (state, reply, status) in result.recipients.items():
            if state not in RECIPIENT_STATES:
                raise ValueError(f"unknown recipient state {state!r}")
            groups[(state, _text(reply), _text(status, 16))].append(address)
        bounce_rows = _bounce_rows(bounce, now, self._lifetime) if bounce else None

        async def fn(conn: AsyncConnection) -> QueuedCopy:
            claimed = await conn.execute(
                update(COPY)
                .where(COPY.c.id == copy_id, COPY.c.claimed_by == worker, COPY.c.state == QUEUED)
                .values(
                    claimed_by=None,
                    claim_until=None,
                    attempts=COPY.c.attempts + 1,
                    last_attempt=now,
                    last_reply=_text(result.reply),
                )
            )
            if not claimed.rowcount:
                raise ClaimLost(f"queue copy {copy_id} is no longer claimed by {worker}")
            for (state, reply, status), addresses in groups.items():
                if state == PENDING and reply is None:
                    continue
                await conn.execute(
                    update(RECIPIENT)
                    .where(
                        RECIPIENT.c.copy_id == copy_id,
                        RECIPIENT.c.state == PENDING,
                        RECIPIENT.c.address.in_(addresses),
                    )
                    .values(state=state, last_reply=reply, status=status, updated_at=now)
                )
            pending = await conn.scalar(
                select(func.count())
                .select_from(RECIPIENT)
                .where(RECIPIENT.c.copy_id == copy_id, RECIPIENT.c.state == PENDING)
            )
            if pending:
                if next_attempt is None:
                    raise ValueError(f"queue copy {copy_id}: recipients pending, no next attempt")
                values: dict[str, Any] = {"state": QUEUED, "next_attempt": next_attempt}
            else:
                values = {"state": DONE, "next_attempt": None}
            await conn.execute(update(COPY).where(COPY.c.id == copy_id).values(values))
            if bounce_rows is not None:
                await _insert_message(conn, *bounce_rows)
            (message,) = await _load(conn, COPY.c.id == copy_id)
            return message.copies[0]

        return await self._run(fn, write=True)

    async def mark_corrupt(self, copy_id: int, reason: str, *, worker: str | None = None) -> bool:
        """Set a queued or held copy CORRUPT (see ``QueueStore.mark_corrupt``)."""
        now = self._clock()
        owner = COPY.c.claimed_by == worker if worker is not None else _not_claimed(now)

        async def fn(conn: AsyncConnection) -> bool:
            result = await conn.execute(
                update(COPY)
                .where(COPY.c.id == copy_id, COPY.c.state.in_(LIVE_STATES), owner)
                .values(
                    state=CORRUPT,
                    last_reply=_text(reason),
                    claimed_by=None,
                    claim_until=None,
                    next_attempt=None,
                )
            )
            return bool(result.rowcount)

        return await self._run(fn, write=True)

    async def warn_candidates(
        self, *, created_before: datetime, limit: int
    ) -> builtins.list[QueuedMessage]:
        """Messages due a warning DSN (see ``QueueStore.warn_candidates``), oldest first."""
        waiting = and_(
            COPY.c.state == QUEUED,
            COPY.c.attempts > 0,
            exists().where(RECIPIENT.c.copy_id == COPY.c.id, RECIPIENT.c.state == PENDING),
        )
        ids = (
            select(MESSAGE.c.id)
            .where(
                MESSAGE.c.is_bounce.is_(False),
                MESSAGE.c.warned_at.is_(None),
                MESSAGE.c.created_at <= created_before,
                exists().where(COPY.c.message_id == MESSAGE.c.id, waiting),
            )
            .order_by(MESSAGE.c.id)
            .limit(max(1, min(limit, MAX_PAGE)))
        )

        async def fn(conn: AsyncConnection) -> builtins.list[QueuedMessage]:
            chosen = list((await conn.execute(ids)).scalars())
            if not chosen:
                return []
            return await _load(conn, and_(COPY.c.message_id.in_(chosen), waiting))

        return await self._run(fn, write=False)

    async def mark_warned(self, message_id: int, *, bounce: NewBounce | None) -> bool:
        """Record the warning DSN of a message once, enqueueing ``bounce`` with it."""
        now = self._clock()
        bounce_rows = _bounce_rows(bounce, now, self._lifetime) if bounce else None

        async def fn(conn: AsyncConnection) -> bool:
            result = await conn.execute(
                update(MESSAGE)
                .where(MESSAGE.c.id == message_id, MESSAGE.c.warned_at.is_(None))
                .values(warned_at=now)
            )
            if not result.rowcount:
                return False
            if bounce_rows is not None:
                await _insert_message(conn, *bounce_rows)
            return True

        return await self._run(fn, write=True)

    async def spool_names(self) -> dict[str, int]:
        """Spool name -> copy id of every queued or held copy."""

        async def fn(conn: AsyncConnection) -> dict[str, int]:
            rows = await conn.execute(
                select(COPY.c.spool_name, COPY.c.id).where(COPY.c.state.in_(LIVE_STATES))
            )
            return {str(name): int(copy_id) for name, copy_id in rows}

        return await self._run(fn, write=False)

    # --- queries ----------------------------------------------------------------------------------

    async def get(self, message_id: int) -> QueuedMessage | None:
        """One message with all its copies, or None. Raises StoreUnavailable."""

        async def fn(conn: AsyncConnection) -> QueuedMessage | None:
            found = await _load(conn, COPY.c.message_id == message_id)
            return found[0] if found else None

        return await self._run(fn, write=False)

    async def get_copy(self, copy_id: int) -> QueuedMessage | None:
        """The message holding copy ``copy_id``, with only that copy, or None."""

        async def fn(conn: AsyncConnection) -> QueuedMessage | None:
            found = await _load(conn, COPY.c.id == copy_id)
            return found[0] if found else None

        return await self._run(fn, write=False)

    async def custody_of(self, records: Mapping[int, str | None]) -> dict[int, int]:
        """Audit record id -> queue id of the message that record's transaction left in the
        queue, for the given audit records (id -> transaction id): matched by the message's
        ``audit_id``, else by its transaction id; DSNs never match. Records without one are
        absent. Raises StoreUnavailable."""
        if not records:
            return {}
        txn_ids = {txn: rid for rid, txn in records.items() if txn}
        query = (
            select(MESSAGE.c.id, MESSAGE.c.audit_id, MESSAGE.c.txn_id)
            .where(
                MESSAGE.c.is_bounce.is_(False),
                or_(
                    MESSAGE.c.audit_id.in_(list(records)),
                    MESSAGE.c.txn_id.in_(list(txn_ids)),
                ),
            )
            .order_by(MESSAGE.c.id)
        )

        async def fn(conn: AsyncConnection) -> dict[int, int]:
            found: dict[int, int] = {}
            for message_id, audit_id, txn_id in await conn.execute(query):
                record = audit_id if audit_id in records else txn_ids.get(txn_id)
                if record is not None:
                    found.setdefault(int(record), int(message_id))
            return found

        return await self._run(fn, write=False)

    async def list(
        self, *, state: str | None = None, limit: int = 100, before_id: int | None = None
    ) -> builtins.list[QueuedMessage]:
        """Messages newest first, each with all its copies; with ``state``, only messages having
        a copy in that state. Keyset pagination: pass the last id as ``before_id``."""
        if state is not None and state not in COPY_STATES:
            raise ValueError(f"unknown queue state {state!r}")
        ids = select(MESSAGE.c.id)
        if state is not None:
            ids = ids.where(
                exists().where(COPY.c.message_id == MESSAGE.c.id, COPY.c.state == state)
            )
        if before_id is not None:
            ids = ids.where(MESSAGE.c.id < before_id)
        ids = ids.order_by(MESSAGE.c.id.desc()).limit(max(1, min(limit, MAX_PAGE)))

        async def fn(conn: AsyncConnection) -> builtins.list[QueuedMessage]:
            chosen = list((await conn.execute(ids)).scalars())
            if not chosen:
                return []
            found = await _load(conn, COPY.c.message_id.in_(chosen))
            return sorted(found, key=lambda m: m.id, reverse=True)

        return await self._run(fn, write=False)

    # --- operator actions -------------------------------------------------------------------------

    async def set_state(
        self,
        message_id: int,
        state: str,
        *,
        origins: tuple[str, ...],
        pending_state: str = DROPPED,
        reply: str | None = None,
        bounce: NewBounce | None = None,
        event: ChangeHook | None = None,
    ) -> int:
        """Move copies of a message (see ``QueueStore.set_state``); how many changed.

        ``bounce`` (a delete with ``pending_state`` BOUNCED only) is the DSN for the recipients
        the delete ends: enqueued in the same transaction when it ends any (its spool file is
        already durable; when none ends, nothing is enqueued and the file is the caller's to
        remove). ``event`` is called in that transaction when some copy changed, with what
        changed (see :data:`ChangeHook`): it checks that the ended recipients are those its DSN
        names and writes the audit event; what it raises rolls everything back and propagates
        (database errors as StoreUnavailable)."""
        if state not in SETTABLE_STATES:
            raise ValueError(f"cannot set a queue copy {state!r}")
        if not set(origins) <= set(COPY_STATES):
            raise ValueError(f"unknown origin state in {origins!r}")
        if pending_state not in (DROPPED, BOUNCED):
            raise ValueError("pending recipients of a deleted copy end dropped or bounced")
        if bounce is not None and (state != DELETED or pending_state != BOUNCED):
            raise ValueError("only a delete that bounces its pending recipients has a DSN")
        now = self._clock()
        where = COPY.c.message_id == message_id
        bounce_rows = _bounce_rows(bounce, now, self._lifetime) if bounce else None

        async def fn(conn: AsyncConnection) -> int:
            if state == DELETED:
                ids, ended = await _delete_copies(
                    conn, where, pending_state=pending_state, reply=reply, now=now, origins=origins
                )
                bounce_id = None
                if ended and bounce_rows is not None:
                    bounce_id = await _insert_message(conn, *bounce_rows)
                if ids and event is not None:
                    await event(conn, OperatorChange(ids, ended, bounce_id))
                return len(ids)
            values: dict[str, Any] = {"state": state, "claimed_by": None, "claim_until": None}
            if state == QUEUED:
                values["next_attempt"] = now
            elif state == CORRUPT:
                values["next_attempt"] = None
            if reply is not None:
                values["last_reply"] = _text(reply)
            result = await conn.execute(
                update(COPY)
                .where(where, COPY.c.state.in_(origins), _not_claimed(now))
                .values(values)
                .returning(COPY.c.id)
            )
            ids = tuple(sorted(int(i) for i in result.scalars()))
            if ids and event is not None:
                await event(conn, OperatorChange(ids))
            return len(ids)

        return await self._run(fn, write=True)

    async def retry_now(self, message_id: int | None, *, event: ChangeHook | None = None) -> int:
        """Make queued copies (of one message, or all) due now; how many changed. ``event`` as
        for :meth:`set_state`."""
        now = self._clock()
        stmt = update(COPY).where(COPY.c.state == QUEUED, _not_claimed(now))
        if message_id is not None:
            stmt = stmt.where(COPY.c.message_id == message_id)

        async def fn(conn: AsyncConnection) -> int:
            result = await conn.execute(stmt.values(next_attempt=now).returning(COPY.c.id))
            ids = tuple(sorted(int(i) for i in result.scalars()))
            if ids and event is not None:
                await event(conn, OperatorChange(ids))
            return len(ids)

        return await self._run(fn, write=True)


# --- rows ---------------------------------------------------------------------------------------

_Planned = tuple[dict[str, Any], builtins.list[dict[str, Any]]]


def _copy_rows(copy: NewCopy, due: datetime, now: datetime) -> _Planned:
    check_name(copy.spool_name)
    if not copy.recipients:
        raise ValueError("a queued copy needs at least one recipient")
    delivered = set(copy.delivered)
    unknown = delivered - set(copy.recipients)
    if unknown:
        raise ValueError("delivered recipients must be recipients of the copy")
    recipients = [
        {
            "position": position,
            "address": address,  # exactly as received: it is relayed
            "state": DELIVERED if address in delivered else PENDING,
            "last_reply": None,
            "status": None,
            "updated_at": now if address in delivered else None,
        }
        for position, address in enumerate(copy.recipients)
    ]
    pending = any(r["state"] == PENDING for r in recipients)
    row = {
        "state": QUEUED if pending else DONE,
        "spool_name": copy.spool_name,
        "size": int(copy.size),
        "sha256": copy.sha256.lower(),
        "attempts": 0,
        "next_attempt": due if pending else None,
        "last_attempt": None,
        "last_reply": None,
        "claimed_by": None,
        "claim_until": None,
    }
    return row, recipients


def _bounce_rows(bounce: NewBounce, now: datetime, lifetime: float) -> tuple[dict[str, Any], Any]:
    copy = NewCopy((bounce.recipient,), bounce.spool_name, bounce.size, bounce.sha256)
    message = {
        "txn_id": _text(bounce.txn_id, 80) or "",
        "mail_from": "",
        "login": _text(bounce.login, 255),
        "created_at": now,
        "expires_at": now + timedelta(seconds=lifetime),
        "smtputf8": bool(bounce.smtputf8),
        "body_8bitmime": bool(bounce.body_8bitmime),
        "is_bounce": True,
        "audit_id": None,
        "message_id_header": _text(bounce.message_id_header, 998),
        "warned_at": None,
    }
    return message, [_copy_rows(copy, now, now)]


async def _insert_message(
    conn: AsyncConnection, message: dict[str, Any], copies: Sequence[_Planned]
) -> int:
    result = await conn.execute(insert(MESSAGE).returning(MESSAGE.c.id), message)
    message_id = int(result.scalar_one())
    for copy, recipients in copies:
        inserted = await conn.execute(
            insert(COPY).returning(COPY.c.id), {**copy, "message_id": message_id}
        )
        copy_id = int(inserted.scalar_one())
        await conn.execute(insert(RECIPIENT), [{**r, "copy_id": copy_id} for r in recipients])
    return message_id


async def _delete_copies(
    conn: AsyncConnection,
    where: ColumnElement[bool],
    *,
    pending_state: str,
    reply: str | None,
    now: datetime,
    origins: Iterable[str],
) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """Set the matching copies DELETED and end their pending recipients as ``pending_state``:
    (the copies' ids, the recipients ended, in copy and position order)."""
    result = await conn.execute(
        update(COPY)
        .where(where, COPY.c.state.in_(tuple(origins)), _not_claimed(now))
        .values(state=DELETED, claimed_by=None, claim_until=None, next_attempt=None)
        .returning(COPY.c.id)
    )
    ids = tuple(sorted(int(i) for i in result.scalars()))
    if not ids:
        return ids, ()
    pending = RECIPIENT.c.copy_id.in_(ids) & (RECIPIENT.c.state == PENDING)
    rows = await conn.execute(
        select(RECIPIENT.c.address)
        .where(pending)
        .order_by(RECIPIENT.c.copy_id, RECIPIENT.c.position)
    )
    ended = tuple(str(address) for address in rows.scalars())
    await conn.execute(
        update(RECIPIENT)
        .where(pending)
        .values(state=pending_state, last_reply=_text(reply), updated_at=now)
    )
    return ids, ended


async def _load(conn: AsyncConnection, copies: ColumnElement[bool]) -> builtins.list[QueuedMessage]:
    """The messages having a copy matching ``copies``, each with only its matching copies."""
    copy_rows = list(
        (await conn.execute(select(COPY).where(copies).order_by(COPY.c.id))).mappings()
    )
    if not copy_rows:
        return []
    copy_ids = [row["id"] for row in copy_rows]
    recipients: dict[int, builtins.list[QueuedRecipient]] = defaultdict(list)
    recipient_query: Select[Any] = (
        select(RECIPIENT)
        .where(RECIPIENT.c.copy_id.in_(copy_ids))
        .order_by(RECIPIENT.c.copy_id, RECIPIENT.c.position)
    )
    for row in (await conn.execute(recipient_query)).mappings():
        recipients[int(row["copy_id"])].append(_recipient(row))
    by_message: dict[int, builtins.list[QueuedCopy]] = defaultdict(list)
    for row in copy_rows:
        by_message[int(row["message_id"])].append(_copy(row, recipients[int(row["id"])]))
    message_rows = (
        await conn.execute(select(MESSAGE).where(MESSAGE.c.id.in_(list(by_message))))
    ).mappings()
    return [_message(row, by_message[int(row["id"])]) for row in message_rows]


def _recipient(row: RowMapping) -> QueuedRecipient:
    return QueuedRecipient(
        address=row["address"],
        state=row["state"],
        last_reply=row["last_reply"],
        status=row["status"],
        updated_at=row["updated_at"],
    )


def _copy(row: RowMapping, recipients: Iterable[QueuedRecipient]) -> QueuedCopy:
    return QueuedCopy(
        id=int(row["id"]),
        message_id=int(row["message_id"]),
        state=row["state"],
        recipients=tuple(recipients),
        spool_name=row["spool_name"],
        size=int(row["size"]),
        sha256=row["sha256"],
        attempts=int(row["attempts"]),
        next_attempt=row["next_attempt"],
        last_attempt=row["last_attempt"],
        last_reply=row["last_reply"],
        claimed_by=row["claimed_by"],
        claim_until=row["claim_until"],
    )


def _message(row: RowMapping, copies: Iterable[QueuedCopy]) -> QueuedMessage:
    return QueuedMessage(
        id=int(row["id"]),
        txn_id=row["txn_id"],
        mail_from=row["mail_from"],
        login=row["login"],
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        smtputf8=bool(row["smtputf8"]),
        body_8bitmime=bool(row["body_8bitmime"]),
        is_bounce=bool(row["is_bounce"]),
        audit_id=row["audit_id"],
        message_id_header=row["message_id_header"],
        warned_at=row["warned_at"],
        copies=tuple(copies),
    )
