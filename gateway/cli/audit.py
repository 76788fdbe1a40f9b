"""``mailward audit list|show``: read the audit log.

What it does: ``list`` prints the newest records first (a table, or one JSON object per line with
``--json``), filtered by time range (``--since``/``--until``, ISO 8601; a time without zone is UTC),
login, sender, recipient (an address or ``@domain``, case-insensitive), check id (``--verdict``),
outcome and kind; ``--limit`` sets the page size and ``--before-id`` continues after the last id of
the previous page. ``show ID`` prints one record completely: session, envelope, replies, each
recipient with its result (and, when the ``encryption`` check judged it, its encryption decision,
policy, format, the fingerprint of the key used and the reason) and each check verdict. Exit 0
on success, 1 when the database is unreachable or the record does not exist, 2 for bad options
(a bad date names the option).

Reads: the configuration (``database.*``) and the audit tables.

Security notes: the audit holds no message content, so none can be printed. Values that came from
clients (HELO, addresses, Message-ID, replies, reasons, details) are printed with control and bidi
characters escaped (:func:`gateway.cli.common.printable`: ``\x1b``, ``\x0d``, ``\u202e``), in the
table and in ``show``, so a client cannot drive or reorder the operator's terminal; ``--json``
prints them exactly, JSON-escaped.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from gateway.audit.models import KINDS, OUTCOMES
from gateway.audit.store import MAX_PAGE, AuditRecord, SqlAuditStore
from gateway.cli import common
from gateway.cli.common import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, fail, load, printable, short
from gateway.config import Config

T = TypeVar("T")


def register(sub: Any) -> None:
    sub2 = common.add_actions(sub, "audit", "read the audit log")

    lst = sub2.add_parser("list", help="list audit records, newest first")
    lst.add_argument("--since", metavar="ISO", help="records started at or after this time")
    lst.add_argument("--until", metavar="ISO", help="records started before this time")
    lst.add_argument("--login", metavar="L", help="authenticated (or attempted) login")
    lst.add_argument("--sender", metavar="S", help="envelope sender: address or @domain")
    lst.add_argument("--recipient", metavar="R", help="a recipient: address or @domain")
    lst.add_argument("--verdict", metavar="CHECK_ID", help="records with a verdict of this check")
    lst.add_argument("--outcome", choices=OUTCOMES, help="message outcome")
    lst.add_argument("--kind", choices=KINDS, help="record kind")
    common.add_page_arguments(lst, "records", MAX_PAGE)
    lst.set_defaults(func=handle_list)

    show = sub2.add_parser("show", help="print one audit record completely")
    show.add_argument("id", type=common.positive_int, metavar="ID")
    show.add_argument("--json", action="store_true", help="as one JSON object")
    show.set_defaults(func=handle_show)


class _BadOption(Exception):
    pass


def parse_time(value: str | None, option: str) -> datetime | None:
    """An aware datetime from ISO 8601 (date or date-time; no zone means UTC)."""
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        raise _BadOption(
            f"invalid {option} {value!r}: expected ISO 8601, e.g. 2024-05-01 or "
            "2024-05-01T12:00:00+02:00"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed


def _with_store(config: Config, fn: Callable[[SqlAuditStore], Awaitable[T]]) -> T:
    return common.with_store(config, SqlAuditStore, fn, batch_size=config.audit.batch_size)


def _summary_row(r: AuditRecord) -> tuple[str, ...]:
    reply = r.final_reply if r.kind == "message" else r.detail
    return (
        str(r.id),
        common.utc_time(r.started_at),
        r.kind,
        short(r.outcome, 11),
        short(r.login, 24),
        short(common.sender(r.mail_from), 30),
        short(common.recipients_cell([rcpt.address for rcpt in r.recipients]), 34),
        short(reply, 60),
    )


_LISTING = common.Listing(
    header=("ID", "STARTED (UTC)", "KIND", "OUTCOME", "LOGIN", "FROM", "RCPTS", "REPLY"),
    row=_summary_row,
    to_json=AuditRecord.to_dict,
    empty="no matching audit records",
)


def handle_list(args: argparse.Namespace) -> int:
    try:
        since = parse_time(args.since, "--since")
        until = parse_time(args.until, "--until")
    except _BadOption as exc:
        return fail(str(exc), EXIT_CONFIG)
    records = _with_store(
        load(args),
        lambda s: s.list_records(
            since=since,
            until=until,
            login=args.login,
            sender=args.sender,
            recipient=args.recipient,
            check_id=args.verdict,
            outcome=args.outcome,
            kind=args.kind,
            limit=args.limit,
            before_id=args.before_id,
        ),
    )
    return _LISTING.print_page(records, as_json=args.json, limit=args.limit)


_FIELDS = (
    ("kind", "kind"),
    ("outcome", "outcome"),
    ("started_at", "started"),
    ("ended_at", "ended"),
    ("session_id", "session"),
    ("transaction_id", "transaction"),
    ("listener", "listener"),
    ("client_ip", "client ip"),
    ("client_port", "client port"),
    ("tls_version", "tls version"),
    ("tls_cipher", "tls cipher"),
    ("helo", "helo"),
    ("login", "login"),
    ("mail_from", "mail from"),
    ("message_id", "message-id"),
    ("size", "size"),
    ("sha256", "sha256"),
    ("final_reply", "final reply"),
    ("upstream_reply", "upstream reply"),
    ("queue_id", "queue id"),
    ("detail", "detail"),
    ("incident", "incident"),
)


def format_record(record: AuditRecord) -> str:
    """The human-readable form of ``audit show`` (every stored value through ``printable``)."""
    lines = common.format_stored(f"audit record {record.id}", record, _FIELDS)
    lines.append(f"  recipients ({len(record.recipients)}):")
    for rcpt in record.recipients:
        lines.append(
            f"    {rcpt.position + 1}. {printable(rcpt.address)}  {printable(rcpt.status)}  "
            f"{printable(rcpt.reply or '-')}"
        )
        if rcpt.encryption_decision is not None:
            lines.append(
                f"       encryption: {printable(rcpt.encryption_decision)}"
                f"  policy={printable(rcpt.encryption_policy or '-')}"
                f"  format={printable(rcpt.encryption_format or '-')}"
                f"  key={printable(rcpt.encryption_key or '-')}"
            )
            lines.append(f"       encryption reason: {printable(rcpt.encryption_reason or '-')}")
    lines.append(f"  verdicts ({len(record.verdicts)}):")
    for v in record.verdicts:
        applied = "applied" if v.applied else "not applied (would have)"
        target = f" rcpt={printable(v.recipient)}" if v.recipient else ""
        lines.append(
            f"    {v.position + 1}. {printable(v.check_id)} at {printable(v.stage)}: "
            f"{printable(v.action)} ({printable(v.mode)}, {applied}){target}"
        )
        lines.append(f"       reply: {printable(v.reply or '-')}")
        lines.append(f"       reason: {printable(v.reason or '-')}")
        if v.measured is not None or v.limit is not None:
            lines.append(
                f"       measured: {printable(v.measured or '-')}  "
                f"limit: {printable(v.limit or '-')}"
            )
    return "\n".join(lines)


def handle_show(args: argparse.Namespace) -> int:
    record = _with_store(load(args), lambda s: s.get_record(args.id))
    if record is None:
        return fail(f"no audit record {args.id}", EXIT_FAILURE)
    if args.json:
        print(json.dumps(record.to_dict()))
    else:
        print(format_record(record))
    return EXIT_OK
