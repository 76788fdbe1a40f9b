"""``mailward queue list|show|retry|hold|release|delete``: the durable delivery queue, for operators.

What it does:
  * ``queue list [--state S] [--limit N] [--before-id ID] [--json]`` -- messages in the queue,
    newest first (with ``--state``, those having a copy in state S: queued, held, done, corrupt,
    deleted), one table row or JSON object each: envelope, pending recipients, attempts, next
    attempt, last reply;
  * ``queue show ID [--json]`` -- one message: its envelope and flags, and per copy its state,
    schedule, claim, spool file and every recipient with its state and last reply;
  * ``queue retry ID`` / ``queue retry --all`` -- make queued copies due now (the runner picks them
    up at its next look, within ``queue.runner_interval``);
  * ``queue hold ID`` -- stop the message's queued copies: never attempted until released;
  * ``queue release ID`` -- put held copies back in the queue, due now;
  * ``queue delete ID --bounce|--silently`` (one of the two is required) -- take the message out of
    the queue: its pending recipients end ``bounced`` with a delivery status notification queued to
    the envelope sender (``--bounce``: refused for a bounce, the null sender, auto-submitted mail
    and a sender that is not one of the login's own addresses, as the runner would), or ``dropped``
    with no notification (``--silently``); its spool files are erased.
A copy being attempted right now (live claim) is never changed: the command says so (exit 1) and
can be repeated once the attempt is recorded. Each action that changed something is an audit event
(kinds ``queue-retry``, ``queue-hold``, ``queue-release``, ``queue-delete``; listener ``cli``; the
message's transaction id and queue id, the operator ``cli:<OS user>``: ``mailward audit list
--kind ...``) written in the same database transaction as the change (an event that cannot be
written leaves the queue unchanged), and is logged at WARNING (logger ``mailward.queue``). The DSN
of ``delete --bounce`` is enqueued in that transaction too (its spool file is written before; if
the transaction fails, the file is an orphan the runner deletes). They work on the database
directly, with or without a running gateway. Exit 0 on success (also when the message already
was in the state asked for), 1 for an unknown id, a refused action, an unreachable database or
spool (one line), 2 for bad options (an unknown state, a malformed id) or configuration.

Reads/writes: the configuration (``database.*``, ``queue.spool_dir``, ``queue.lifetime``,
``smtp.hostname``), the queue tables, the spool (``delete``: reads the original's header section
for the bounce, writes the bounce, erases the deleted copies' files), ``audit_record`` (events),
the ``account`` tables (``delete --bounce``: the sender's ownership).

Security notes: message bodies are never printed (``show`` prints metadata only); everything
printed that came from clients or upstreams (addresses, replies, Message-ID) has its control and
bidi characters escaped (:func:`gateway.cli.common.printable`); ``--json`` stays exact.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

from gateway.audit.store import SqlAuditStore
from gateway.auth.store import SqlAccountStore
from gateway.cli import common
from gateway.cli.common import EXIT_FAILURE, EXIT_OK, fail, format_fields, load, printable, short
from gateway.config import Config
from gateway.core.errors import GatewayError, StoreUnavailable
from gateway.core.message import Headers
from gateway.core.model import Session, utcnow
from gateway.queue.dsn import build_dsn, envelope_flags, may_bounce
from gateway.queue.model import (
    BOUNCED,
    COPY_STATES,
    CORRUPT,
    DELETED,
    DROPPED,
    HELD,
    PENDING,
    QUEUED,
    NewBounce,
    OperatorChange,
    QueuedCopy,
    QueuedMessage,
    QueuedRecipient,
)
from gateway.queue.spool import Spool, SpoolCorrupt, SpoolError
from gateway.queue.store import ChangeHook, SqlQueueStore

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

T = TypeVar("T")

log = logging.getLogger("mailward.queue")

MAX_PAGE = 1000
#: what ``delete`` takes out of the queue (done and deleted copies have nothing left to do)
DELETABLE = (QUEUED, HELD, CORRUPT)
#: the RFC 3463 status of a recipient bounced by an operator's delete (no better code exists)
DELETED_STATUS = "5.0.0"


#: A queue id: the message's number, as ``queue list`` shows it.
_message_id = common.number_type("a queue id like 42")


def register(sub: Any) -> None:
    sub2 = common.add_actions(
        sub, "queue", "the delivery queue: list, show, retry, hold, release, delete"
    )

    lst = sub2.add_parser("list", help="messages in the queue, newest first")
    lst.add_argument("--state", choices=COPY_STATES, help="only messages with a copy in this state")
    common.add_page_arguments(lst, "messages", MAX_PAGE)
    lst.set_defaults(func=handle_list)

    show = sub2.add_parser("show", help="one message: envelope, copies, recipients (no content)")
    show.add_argument("id", type=_message_id, metavar="ID", help="queue id")
    show.add_argument("--json", action="store_true", help="as one JSON object")
    show.set_defaults(func=handle_show)

    retry = sub2.add_parser("retry", help="make queued copies due now")
    which = retry.add_mutually_exclusive_group(required=True)
    which.add_argument("id", type=_message_id, nargs="?", metavar="ID", help="queue id")
    which.add_argument("--all", action="store_true", help="every queued message")
    retry.set_defaults(func=handle_retry)

    hold = sub2.add_parser("hold", help="stop a message: never attempted until released")
    hold.add_argument("id", type=_message_id, metavar="ID", help="queue id")
    hold.set_defaults(func=handle_hold)

    release = sub2.add_parser("release", help="put a held message back in the queue, due now")
    release.add_argument("id", type=_message_id, metavar="ID", help="queue id")
    release.set_defaults(func=handle_release)

    delete = sub2.add_parser(
        "delete", help="take a message out of the queue, with a bounce or silently"
    )
    delete.add_argument("id", type=_message_id, metavar="ID", help="queue id")
    how = delete.add_mutually_exclusive_group(required=True)
    how.add_argument(
        "--bounce",
        action="store_true",
        help="tell the sender: queue a delivery status notification for the pending recipients",
    )
    how.add_argument(
        "--silently", action="store_true", help="tell nobody: the pending recipients are dropped"
    )
    delete.set_defaults(func=handle_delete)


# --- plumbing -------------------------------------------------------------------------------------


def queue_ref(message_id: int) -> str:
    """How the audit names a queued message (its ``queue_id`` column)."""
    return str(message_id)


@dataclass
class _Context:
    config: Config
    engine: AsyncEngine
    store: SqlQueueStore


def _run(config: Config, fn: Callable[[_Context], Awaitable[T]]) -> T:
    async def run(engine: AsyncEngine) -> T:
        store = SqlQueueStore(
            engine, timeout=config.database.timeout, lifetime=config.queue.lifetime_seconds
        )
        return await common.using(store, lambda s: fn(_Context(config, engine, s)))

    return common.with_engine(config, run)


async def _record_in(
    conn: AsyncConnection, kind: str, detail: str, message: QueuedMessage | None
) -> int:
    """Write the audit event of an operator action inside the change's own database transaction
    ``conn`` (the store's ``event`` hook): the change and its event commit together or not at
    all. Database errors propagate (the store rolls back and reports them)."""
    session = Session(client_ip="-", client_port=0, listener="cli")
    if message is None:
        return await SqlAuditStore.record_event_in(conn, session, kind, detail)
    return await SqlAuditStore.record_decision_in(
        conn,
        session,
        kind,
        detail,
        login=message.login,
        transaction_id=message.txn_id,
        queue_id=queue_ref(message.id),
    )


class _Audited:
    """The store's ``event`` hook for one operator action: writes its audit event, with the
    detail ``describe(change)`` gives (which may refuse the change by raising), in the change's
    transaction; keeps the change and the record id."""

    def __init__(
        self, kind: str, message: QueuedMessage | None, describe: Callable[[OperatorChange], str]
    ) -> None:
        self.kind = kind
        self.message = message
        self.describe = describe
        self.change: OperatorChange | None = None
        self.audit_id: int | None = None

    async def __call__(self, conn: AsyncConnection, change: OperatorChange) -> int:
        detail = self.describe(change)
        self.audit_id = await _record_in(conn, self.kind, detail, self.message)
        self.change = change
        return self.audit_id


def _not_done(what: str, exc: StoreUnavailable) -> StoreUnavailable:
    """A failed change: nothing changed (the change and its audit event were one transaction)."""
    return StoreUnavailable(f"{what}: nothing changed ({exc})")


class _Refused(GatewayError):
    """The action does not apply to the message as it is (exit 1, nothing changed)."""


class _Unchanged(GatewayError):
    """The message already is as asked (exit 0, nothing changed)."""


def _fetch(message: QueuedMessage | None, message_id: int) -> QueuedMessage:
    if message is None:
        raise _Refused(f"no queue message {message_id}")
    return message


def _live_claim(copy: QueuedCopy, now: datetime) -> bool:
    return copy.claim_until is not None and copy.claim_until > now


def _states(message: QueuedMessage) -> str:
    """The message's state as listed: its copies' states (``queued``, or ``queued+held``...)."""
    present = {c.state for c in message.copies}
    return "+".join(s for s in COPY_STATES if s in present) or "-"


def _act(args: argparse.Namespace, action: Callable[[_Context], Awaitable[str]]) -> int:
    """Run an operator action; print what it did (exit 0), that nothing needed doing (exit 0)
    or why it was refused or failed (one line, exit 1: :func:`gateway.cli.main`)."""
    config = load(args)
    try:
        print(_run(config, action))
    except _Unchanged as exc:
        print(printable(str(exc)))
    return EXIT_OK


# --- list / show ----------------------------------------------------------------------------------


def _next_attempt(message: QueuedMessage) -> datetime | None:
    due = [c.next_attempt for c in message.copies if c.state == QUEUED and c.next_attempt]
    return min(due) if due else None


def _last_reply(message: QueuedMessage) -> str | None:
    attempted = [c for c in message.copies if c.last_reply]
    if not attempted:
        return None
    latest = max(attempted, key=lambda c: c.last_attempt or datetime.min.replace(tzinfo=UTC))
    return latest.last_reply


def _recipient_dict(r: QueuedRecipient) -> dict[str, Any]:
    return {
        "address": r.address,
        "state": r.state,
        "last_reply": r.last_reply,
        "status": r.status,
        "updated_at": r.updated_at.isoformat() if r.updated_at else None,
    }


def _copy_dict(c: QueuedCopy) -> dict[str, Any]:
    return {
        "id": c.id,
        "state": c.state,
        "attempts": c.attempts,
        "next_attempt": c.next_attempt.isoformat() if c.next_attempt else None,
        "last_attempt": c.last_attempt.isoformat() if c.last_attempt else None,
        "last_reply": c.last_reply,
        "claimed_by": c.claimed_by,
        "claim_until": c.claim_until.isoformat() if c.claim_until else None,
        "spool_name": c.spool_name,
        "size": c.size,
        "sha256": c.sha256,
        "recipients": [_recipient_dict(r) for r in c.recipients],
    }


def message_dict(m: QueuedMessage) -> dict[str, Any]:
    """The JSON form of a queued message (``list --json``, ``show --json``)."""
    return {
        "id": m.id,
        "state": _states(m),
        "txn_id": m.txn_id,
        "mail_from": m.mail_from,
        "login": m.login,
        "created_at": m.created_at.isoformat(),
        "expires_at": m.expires_at.isoformat(),
        "smtputf8": m.smtputf8,
        "body_8bitmime": m.body_8bitmime,
        "is_bounce": m.is_bounce,
        "audit_id": m.audit_id,
        "message_id_header": m.message_id_header,
        "warned_at": m.warned_at.isoformat() if m.warned_at else None,
        "pending": len(m.pending),
        "copies": [_copy_dict(c) for c in m.copies],
    }


def _summary_row(m: QueuedMessage) -> tuple[str, ...]:
    recipients = [r.address for c in m.copies for r in c.recipients]
    return (
        str(m.id),
        common.utc_time(m.created_at),
        _states(m) + (" (dsn)" if m.is_bounce else ""),
        short(common.sender(m.mail_from), 30),
        short(common.recipients_cell(recipients), 34),
        str(len(m.pending)),
        str(max((c.attempts for c in m.copies), default=0)),
        common.utc_time(_next_attempt(m)),
        short(_last_reply(m), 60),
    )


_LISTING = common.Listing(
    header=(
        "ID",
        "ARRIVED (UTC)",
        "STATE",
        "FROM",
        "RCPTS",
        "PENDING",
        "TRIES",
        "NEXT (UTC)",
        "LAST",
    ),
    row=_summary_row,
    to_json=message_dict,
    empty="no matching queue messages",
)


def handle_list(args: argparse.Namespace) -> int:
    config = load(args)
    limit = min(args.limit, MAX_PAGE)
    messages = _run(
        config, lambda ctx: ctx.store.list(state=args.state, limit=limit, before_id=args.before_id)
    )
    return _LISTING.print_page(messages, as_json=args.json, limit=limit)


def format_message(m: QueuedMessage) -> str:
    """The human-readable form of ``queue show`` (metadata only, never content)."""
    lines = [f"queue message {m.id}"]
    lines += format_fields(
        [
            ("state", _states(m)),
            ("arrived", m.created_at),
            ("expires", m.expires_at),
            ("mail from", common.sender(m.mail_from, common.NULL_SENDER)),
            ("login", m.login),
            ("transaction", m.txn_id),
            ("message-id", m.message_id_header),
            ("audit record", m.audit_id),
            ("bounce (dsn)", m.is_bounce),
            ("smtputf8", m.smtputf8),
            ("8bitmime", m.body_8bitmime),
            ("warned at", m.warned_at),
        ]
    )
    for c in m.copies:
        lines.append(f"  copy {c.id} ({c.state}, {len(c.recipients)} recipient(s)):")
        lines += format_fields(
            [
                ("attempts", c.attempts),
                ("last attempt", c.last_attempt),
                ("next attempt", c.next_attempt),
                ("last reply", c.last_reply),
                (
                    "claimed by",
                    f"{c.claimed_by} until {common.utc_time(c.claim_until)}"
                    if c.claimed_by
                    else None,
                ),
                ("spool file", f"{c.spool_name} ({c.size} bytes)"),
                ("sha256", c.sha256),
            ],
            indent="    ",
            width=14,
        )
        lines.append("    recipients:")
        for i, r in enumerate(c.recipients, 1):
            reply = f"  {r.last_reply}" if r.last_reply else ""
            lines.append(f"      {i}. {printable(r.address)}  {r.state}{printable(reply)}")
    return "\n".join(lines)


def handle_show(args: argparse.Namespace) -> int:
    message = _run(load(args), lambda ctx: ctx.store.get(args.id))
    if message is None:
        return fail(f"no queue message {args.id}", EXIT_FAILURE)
    if args.json:
        print(json.dumps(message_dict(message)))
    else:
        print(format_message(message))
    return EXIT_OK


# --- retry / hold / release -----------------------------------------------------------------------


def _why_unchanged(m: QueuedMessage, action: str, now: datetime) -> GatewayError:
    """Why ``action`` changed no copy of ``m``: refused (exit 1) or already so (exit 0)."""
    states = {c.state for c in m.copies}
    if any(c.state in (QUEUED, HELD) and _live_claim(c, now) for c in m.copies):
        return _Refused(
            f"queue {m.id} is being delivered right now; try again once the attempt is recorded"
        )
    if action == "hold" and HELD in states and QUEUED not in states:
        return _Unchanged(f"queue {m.id} is already held; nothing changed")
    if action == "release" and QUEUED in states and HELD not in states:
        return _Unchanged(f"queue {m.id} is not held (queued); nothing changed")
    if action == "retry" and HELD in states:
        return _Refused(f"queue {m.id} is held: release it first (mailward queue release {m.id})")
    return _Refused(f"queue {m.id} has nothing to {action}: it is {_states(m)}")


def _copies(n: int) -> str:
    return f"{n} copy" if n == 1 else f"{n} copies"


def _change(
    args: argparse.Namespace,
    action: str,
    change: Callable[[SqlQueueStore, ChangeHook], Awaitable[int]],
    done: str,
) -> int:
    """Apply one operator change (``action``) to the message ``args.id`` with its audit event
    (kind ``queue-<action>``; one database transaction) and say what it did."""

    async def apply(ctx: _Context) -> str:
        m = _fetch(await ctx.store.get(args.id), args.id)
        by = common.operator()
        event = _Audited(
            f"queue-{action}",
            m,
            lambda c: f"queue {queue_ref(m.id)} {done} by {by}: {_copies(len(c.copies))}",
        )
        try:
            changed = await change(ctx.store, event)
        except StoreUnavailable as exc:
            raise _not_done(f"queue {m.id}: {action} failed", exc) from None
        if not changed:
            raise _why_unchanged(m, action, utcnow())
        log.warning(
            "queue %d: %s by %s (%s, audit %s)", m.id, done, by, _copies(changed), event.audit_id
        )
        return f"queue {m.id}: {done} ({_copies(changed)}, audit record {event.audit_id})"

    return _act(args, apply)


def handle_retry(args: argparse.Namespace) -> int:
    if args.all:

        async def everything(ctx: _Context) -> str:
            by = common.operator()
            event = _Audited(
                "queue-retry",
                None,
                lambda c: f"queue retry --all by {by}: {_copies(len(c.copies))} due now",
            )
            try:
                changed = await ctx.store.retry_now(None, event=event)
            except StoreUnavailable as exc:
                raise _not_done("queue retry --all failed", exc) from None
            if not changed:
                raise _Unchanged("queue: no queued copy to retry; nothing changed")
            log.warning(
                "queue: retry --all by %s (%s, audit %s)", by, _copies(changed), event.audit_id
            )
            return f"queue: {_copies(changed)} due now (audit record {event.audit_id})"

        return _act(args, everything)

    return _change(
        args, "retry", lambda store, event: store.retry_now(args.id, event=event), "due now"
    )


def _move(args: argparse.Namespace, action: str, origin: str, state: str, done: str) -> int:
    """:func:`_change`: the message's copies in state ``origin`` go to ``state``."""
    return _change(
        args,
        action,
        lambda store, event: store.set_state(args.id, state, origins=(origin,), event=event),
        done,
    )


def handle_hold(args: argparse.Namespace) -> int:
    return _move(args, "hold", QUEUED, HELD, "held")


def handle_release(args: argparse.Namespace) -> int:
    return _move(args, "release", HELD, QUEUED, "released, due now")


# --- delete ---------------------------------------------------------------------------------------


async def _sender_owned(ctx: _Context, login: str | None, address: str) -> bool:
    """The no-backscatter rule the runner applies before it bounces
    (:meth:`SqlAccountStore.sender_owned`)."""
    accounts = SqlAccountStore(ctx.engine, timeout=ctx.config.database.timeout)
    try:
        return await accounts.sender_owned(login, address)
    finally:
        await accounts.close()


async def _original(spool: Spool, copies: list[QueuedCopy]) -> bytes | None:
    """The original message from the first copy whose spool file is intact (for its headers)."""
    for copy in copies:
        if copy.state == CORRUPT:
            continue
        try:
            return await spool.read_async(copy.spool_name, size=copy.size, sha256=copy.sha256)
        except (SpoolCorrupt, SpoolError):
            continue
    return None


async def _bounce_refusal(ctx: _Context, m: QueuedMessage, original: bytes | None) -> str | None:
    """Why ``m`` may not be bounced (the runner's rules), or None."""
    if m.is_bounce:
        return "it is itself a bounce (never a bounce for a bounce)"
    if m.mail_from.strip() in ("", "<>"):
        return "its sender is the null reverse-path"
    if not may_bounce(m, original):
        return "it is marked Auto-Submitted (no automatic answer to automatic mail)"
    if not await _sender_owned(ctx, m.login, m.mail_from):
        return "its envelope sender is not one of the login's own addresses (no backscatter)"
    return None


def _deleted_reply(r: QueuedRecipient, by: str) -> str:
    reply = f"deleted from the queue by the postmaster ({by})"
    return f"{reply}; last attempt: {r.last_reply}" if r.last_reply else reply


class _Changed(GatewayError):
    """The message changed between reading it and deleting it (exit 1, nothing changed)."""


async def _delete(ctx: _Context, message_id: int, bounce: bool) -> str:
    now = utcnow()
    by = common.operator()
    m = _fetch(await ctx.store.get(message_id), message_id)
    targets = [c for c in m.copies if c.state in DELETABLE]
    if not targets:
        raise _Refused(f"queue {m.id} has nothing to delete: it is {_states(m)}")
    spool = Spool(ctx.config.queue.spool_path(ctx.config.state_dir))
    original = await _original(spool, targets) if bounce else None
    if bounce:
        refusal = await _bounce_refusal(ctx, m, original)
        if refusal is not None:
            raise _Refused(f"queue {m.id} may not be bounced: {refusal}; use --silently")
    # what the delete will end: the pending recipients of the copies nobody is delivering now
    ending = [
        r for c in targets if not _live_claim(c, now) for r in c.recipients if r.state == PENDING
    ]
    dsn = (
        await _write_bounce(ctx, spool, m, ending, original, by, now) if bounce and ending else None
    )

    def describe(change: OperatorChange) -> str:
        if bounce and sorted(change.ended) != sorted(r.address for r in ending):
            # the DSN (if any) names other recipients than the delete ends: roll back
            raise _Changed(
                f"queue {m.id} changed while it was being deleted; nothing changed, try again"
            )
        how = _how(bounce, change)
        fate = "bounced" if change.bounce_id is not None else "dropped"
        return (
            f"queue {queue_ref(m.id)} deleted {how} by {by}: {_copies(len(change.copies))}, "
            f"{len(change.ended)} pending recipient(s) {fate}"
        )

    event = _Audited("queue-delete", m, describe)
    try:
        changed = await ctx.store.set_state(
            m.id,
            DELETED,
            origins=DELETABLE,
            pending_state=BOUNCED if bounce else DROPPED,
            reply=f"deleted from the queue by the postmaster ({by})",
            bounce=dsn,
            event=event,
        )
    except _Changed:
        await _discard(spool, dsn)  # rolled back before the commit: nothing refers to it
        raise
    except StoreUnavailable as exc:
        # the DSN's spool file stays: if the commit happened after all, its row needs it; if not,
        # it is an orphan the runner deletes
        raise _not_done(f"queue {m.id}: delete failed", exc) from None
    change = event.change
    if not changed or change is None:
        await _discard(spool, dsn)
        raise _why_unchanged(m, "delete", now)
    deleted = [c for c in targets if c.id in change.copies]
    for copy in deleted:
        try:
            await spool.remove_async(copy.spool_name)
        except (SpoolError, ValueError) as exc:
            log.warning("queue copy %d: spool file not erased (%s)", copy.id, exc)
    how = _how(bounce, change)
    fate = "bounced" if change.bounce_id is not None else "dropped"
    log.warning(
        "queue %d: deleted %s by %s (%s, audit %s)",
        m.id,
        how,
        by,
        _copies(len(deleted)),
        event.audit_id,
    )
    return (
        f"queue {m.id}: deleted {how}; {len(change.ended)} pending recipient(s) "
        f"{fate} (audit record {event.audit_id})"
    )


def _how(bounce: bool, change: OperatorChange) -> str:
    if change.bounce_id is not None:
        return f"with a bounce (queue {change.bounce_id})"
    if bounce:
        return "without a bounce (no pending recipient)"
    return "silently"


async def _discard(spool: Spool, dsn: NewBounce | None) -> None:
    if dsn is None:
        return
    try:
        await spool.remove_async(dsn.spool_name)
    except (SpoolError, ValueError) as exc:  # an orphan now: the runner deletes it later
        log.warning("queue: the unused bounce's spool file was not erased (%s)", exc)


async def _write_bounce(
    ctx: _Context,
    spool: Spool,
    m: QueuedMessage,
    ended: list[QueuedRecipient],
    original: bytes | None,
    by: str,
    now: datetime,
) -> NewBounce:
    """Write the DSN of an operator's delete to the spool (durable); the bounce to enqueue in
    the delete's own database transaction."""
    failed = [replace(r, status=DELETED_STATUS, last_reply=_deleted_reply(r, by)) for r in ended]
    body = build_dsn(
        reporting_mta=_reporting_mta(ctx.config),
        original=m,
        failed=failed,
        original_bytes=original,
        arrival=m.created_at,
        now=now,
    )
    smtputf8, body_8bitmime = envelope_flags(body)
    spooled = await spool.write_async(body)
    return NewBounce(
        recipient=m.mail_from,
        spool_name=spooled.name,
        size=spooled.size,
        sha256=spooled.sha256,
        txn_id=f"{m.txn_id}.dsn"[:80],
        login=m.login,
        message_id_header=Headers(body).message_id,
        smtputf8=smtputf8,
        body_8bitmime=body_8bitmime,
    )


def _reporting_mta(config: Config) -> str:
    from gateway.app import gateway_hostname

    return gateway_hostname(config)


def handle_delete(args: argparse.Namespace) -> int:
    return _act(args, lambda ctx: _delete(ctx, args.id, bounce=args.bounce))
