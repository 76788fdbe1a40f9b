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
import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from gateway.audit.models import KINDS, OUTCOMES
from gateway.audit.store import MAX_PAGE, AuditRecord, SqlAuditStore
from gateway.cli.common import (
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_OK,
    fail,
    format_fields,
    load,
    print_table,
    printable,
)
from gateway.cli.db import report
from gateway.config import Config
from gateway.core.errors import GatewayError
from gateway.db.engine import open_engine

T = TypeVar("T")


def _positive(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return number


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser("audit", help="read the audit log")
    sub2 = p.add_subparsers(dest="audit_command", metavar="ACTION", required=True)

    lst = sub2.add_parser("list", help="list audit records, newest first")
    lst.add_argument("--since", metavar="ISO", help="records started at or after this time")
    lst.add_argument("--until", metavar="ISO", help="records started before this time")
    lst.add_argument("--login", metavar="L", help="authenticated (or attempted) login")
    lst.add_argument("--sender", metavar="S", help="envelope sender: address or @domain")
    lst.add_argument("--recipient", metavar="R", help="a recipient: address or @domain")
    lst.add_argument("--verdict", metavar="CHECK_ID", help="records with a verdict of this check")
    lst.add_argument("--outcome", choices=OUTCOMES, help="message outcome")
    lst.add_argument("--kind", choices=KINDS, help="record kind")
    lst.add_argument(
        "--limit", type=_positive, default=50, help=f"records per page (default 50, max {MAX_PAGE})"
    )
    lst.add_argument(
        "--before-id", type=_positive, metavar="ID", help="only records older than ID (next page)"
    )
    lst.add_argument("--json", action="store_true", help="one JSON object per line")
    lst.set_defaults(func=handle_list)

    show = sub2.add_parser("show", help="print one audit record completely")
    show.add_argument("id", type=_positive, metavar="ID")
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
    async def run() -> T:
        async with open_engine(config) as engine:
            store = SqlAuditStore(
                engine, batch_size=config.audit.batch_size, timeout=config.database.timeout
            )
            return await fn(store)

    return asyncio.run(run())


def _short(value: object, width: int) -> str:
    text = "-" if value is None or value == "" else printable(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _summary_rows(records: list[AuditRecord]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = [
        ("ID", "STARTED (UTC)", "KIND", "OUTCOME", "LOGIN", "FROM", "RCPTS", "REPLY")
    ]
    for r in records:
        rcpts = r.recipients[0].address if r.recipients else "-"
        if len(r.recipients) > 1:
            rcpts += f" +{len(r.recipients) - 1}"
        reply = r.final_reply if r.kind == "message" else r.detail
        rows.append(
            (
                str(r.id),
                r.started_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S"),
                r.kind,
                _short(r.outcome, 11),
                _short(r.login, 24),
                _short("<>" if r.mail_from == "" else r.mail_from, 30),
                _short(rcpts, 34),
                _short(reply, 60),
            )
        )
    return rows


def handle_list(args: argparse.Namespace) -> int:
    try:
        since = parse_time(args.since, "--since")
        until = parse_time(args.until, "--until")
    except _BadOption as exc:
        return fail(str(exc), EXIT_CONFIG)
    config = load(args)
    try:
        records = _with_store(
            config,
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
    except GatewayError as exc:
        return report(exc)
    if args.json:
        for record in records:
            print(json.dumps(record.to_dict()))
        return EXIT_OK
    if not records:
        print("no matching audit records")
        return EXIT_OK
    rows = _summary_rows(records)
    print_table(rows)
    if len(records) == args.limit:
        print(f"(more may follow: --before-id {records[-1].id})")
    return EXIT_OK


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
    pairs: list[tuple[str, object]] = []
    for attr, label in _FIELDS:
        value = getattr(record, attr)
        if attr == "mail_from" and value == "":
            value = "<> (null sender)"
        pairs.append((label, value))
    lines = [f"audit record {record.id}", *format_fields(pairs)]
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
    config = load(args)
    try:
        record = _with_store(config, lambda s: s.get_record(args.id))
    except GatewayError as exc:
        return report(exc)
    if record is None:
        return fail(f"no audit record {args.id}", EXIT_FAILURE)
    if args.json:
        print(json.dumps(record.to_dict()))
    else:
        print(format_record(record))
    return EXIT_OK
