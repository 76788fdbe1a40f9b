"""``mailward quarantine list|show|release|delete``: review the messages held for review.

What it does: ``list`` prints held messages newest first (a table, or one JSON object per line with
``--json``), filtered by ``--status`` and ``--login``, ``--limit`` per page and ``--before-id`` for
the next page. ``ID`` is the entry id, also accepted as ``Q<id>`` (how the client's 250 reply and
the audit's queue id name it). ``show ID`` prints one entry's metadata (envelope, who held it and
why, the decision); ``--headers`` adds the message's header block -- never the body. ``release ID``
sends the held message with the original envelope to the configured upstream (``[relay]``) as
live mail is sent (:mod:`gateway.quarantine.release`): each recipient is judged now by the
``encryption`` check (policy from this configuration, keys from the key store, the gateway's
GNUPGHOME ``keys.gnupg_home``), the recipients are grouped and encrypted, one upstream
transaction per copy; what fails temporarily after a copy was delivered goes to the durable queue
(``queue.spool_dir``), which the running gateway retries. It records ``released`` with the report
(what each recipient got, what was queued, who was not sent), or ``release-failed`` with why
(exit 1; nothing was sent: every refused recipient is named, a copy is sent only when the
upstream accepts all its recipients, the key store down or a failed encryption sends nothing).
After ``released`` each recipient is printed with what happened; exit 1 when one was not sent (a
``required`` recipient without a usable key now, or refused for good by the upstream).
``delete ID`` records ``deleted`` and erases the stored bytes. Release and delete work only on
``held`` or ``release-failed`` entries; a second release is refused. ``--force`` also acts on
an entry left ``releasing`` by an interrupted release (check first whether the upstream got it).
Each decision records ``decided_at`` and ``decided_by`` (``cli:<OS user>``) in the row, is an audit event
written in the same database transaction (kinds ``quarantine-release``,
``quarantine-release-failed``, ``quarantine-delete``; listener ``cli``; the entry's queue id and
transaction id, the operator and the upstream's reply: ``mailward audit list --kind ...``) and is
logged at WARNING (logger ``mailward.quarantine``). Exit 0 on success, 1 for an unknown id, a
refused decision, a failed release or an unreachable database (one line), 2 for bad options or
configuration.

Reads/writes: the configuration (``database.*``; for release ``[relay]``, ``smtp.hostname``,
``[pipeline]`` and ``[checks.encryption]``, ``[keys]``, ``[queue]``), the ``quarantine`` table,
``audit_record`` (decisions); release only: the upstream relay, the key store (``last_used_at``),
the GNUPGHOME, the spool and the queue tables (a queued remainder). Run it as the gateway's user:
the GNUPGHOME and the spool must stay readable by the gateway.

Security notes: the body of a held message is never printed; ``--headers`` prints the header block
only. Everything printed that came from clients (addresses, Message-ID, headers, reasons, replies)
has its control and bidi characters escaped (:func:`gateway.cli.common.printable`), so no terminal
escape sequence or text reordering reaches the terminal; ``--json`` stays exact (JSON-escaped).
The relay password is resolved from the configuration and never printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from gateway.cli import common
from gateway.cli.common import EXIT_FAILURE, EXIT_OK, fail, load, print_table, printable, short
from gateway.config import Config
from gateway.core.message import header_block
from gateway.db.engine import open_engine
from gateway.quarantine.models import DELETED, RELEASED, STATUSES
from gateway.quarantine.store import MAX_PAGE, QuarantineEntry, SqlQuarantine

T = TypeVar("T")

log = logging.getLogger("mailward.quarantine")

#: An entry id: ``5``, or ``Q5`` as the client's reply and the audit's queue id show it.
_entry_id = common.number_type("an entry id like 5 or Q5", prefix="Q")


def register(sub: Any) -> None:
    sub2 = common.add_actions(
        sub, "quarantine", "messages held for review: list, show, release, delete"
    )

    lst = sub2.add_parser("list", help="list held messages, newest first")
    lst.add_argument("--status", choices=STATUSES, help="only entries with this status")
    lst.add_argument("--login", metavar="L", help="only messages sent by this login")
    common.add_page_arguments(lst, "entries", MAX_PAGE)
    lst.set_defaults(func=handle_list)

    show = sub2.add_parser("show", help="print one entry's metadata")
    show.add_argument("id", type=_entry_id, metavar="ID", help="entry id (5 or Q5)")
    show.add_argument(
        "--headers",
        action="store_true",
        help="also print the message's header block (never the body)",
    )
    show.add_argument("--json", action="store_true", help="as one JSON object")
    show.set_defaults(func=handle_show)

    for name, helptext in (
        ("release", "send the held message upstream, encrypted per recipient as live mail"),
        ("delete", "delete the held message (its bytes are erased)"),
    ):
        cmd = sub2.add_parser(name, help=helptext)
        cmd.add_argument("id", type=_entry_id, metavar="ID", help="entry id (5 or Q5)")
        cmd.add_argument(
            "--force",
            action="store_true",
            help="also when an earlier release was interrupted (status releasing): check first "
            "whether the upstream has the message",
        )
        cmd.set_defaults(func=handle_release if name == "release" else handle_delete)


def _with_store(config: Config, fn: Callable[[SqlQuarantine], Awaitable[T]]) -> T:
    return common.with_store(config, SqlQuarantine, fn)


def _summary_row(e: QuarantineEntry) -> tuple[str, ...]:
    return (
        str(e.id),
        common.utc_time(e.created_at),
        e.status,
        short(e.check_id, 20),
        short(e.login, 24),
        short(common.sender(e.mail_from), 30),
        short(common.recipients_cell(e.recipients), 34),
        str(e.size),
        short(e.reason, 60),
    )


_LISTING = common.Listing(
    header=("ID", "HELD (UTC)", "STATUS", "CHECK", "LOGIN", "FROM", "RCPTS", "SIZE", "REASON"),
    row=_summary_row,
    to_json=QuarantineEntry.to_dict,
    empty="no matching quarantine entries",
)


def handle_list(args: argparse.Namespace) -> int:
    entries = _with_store(
        load(args),
        lambda s: s.list(
            status=args.status, login=args.login, limit=args.limit, before_id=args.before_id
        ),
    )
    return _LISTING.print_page(entries, as_json=args.json, limit=args.limit)


_FIELDS = (
    ("status", "status"),
    ("created_at", "held at"),
    ("check_id", "held by check"),
    ("reason", "reason"),
    ("decided_at", "decided at"),
    ("decided_by", "decided by"),
    ("upstream_reply", "upstream reply"),
    ("transaction_id", "transaction"),
    ("session_id", "session"),
    ("login", "login"),
    ("client_ip", "client ip"),
    ("mail_from", "mail from"),
    ("smtputf8", "smtputf8"),
    ("body_8bitmime", "8bitmime"),
    ("message_id", "message-id"),
    ("size", "size"),
    ("sha256", "sha256"),
)


def format_entry(entry: QuarantineEntry) -> str:
    """The human-readable metadata of ``quarantine show`` (no message content)."""
    lines = common.format_stored(f"quarantine entry {entry.id}", entry, _FIELDS)
    lines.append(f"  recipients ({len(entry.recipients)}):")
    for i, address in enumerate(entry.recipients, 1):
        lines.append(f"    {i}. {printable(address)}")
    return "\n".join(lines)


def header_lines(message: bytes) -> list[str]:
    """The header block of ``message`` as printable lines (invalid UTF-8 shown as \\xNN)."""
    block = header_block(message)
    lines = block.decode("utf-8", "backslashreplace").split("\r\n")
    while lines and not lines[-1]:
        lines.pop()
    return [printable(line, keep_tabs=True) for line in lines]


def handle_show(args: argparse.Namespace) -> int:
    entry = _with_store(load(args), lambda s: s.get(args.id, with_message=args.headers))
    if entry is None:
        return fail(f"no quarantine entry {args.id}", EXIT_FAILURE)
    headers: list[str] | None = None
    if args.headers and entry.message is not None:
        headers = header_lines(entry.message)
    if args.json:
        data = entry.to_dict()
        if args.headers:
            data["headers"] = "\r\n".join(headers) if headers is not None else None
        print(json.dumps(data))
        return EXIT_OK
    print(format_entry(entry))
    if args.headers:
        if headers is None:
            print("  headers: - (the message was deleted)")
        else:
            print("  headers:")
            for line in headers:
                print(f"    {line}")
    return EXIT_OK


def handle_release(args: argparse.Namespace) -> int:
    config = load(args)
    from gateway.app import encryption_planner, gateway_hostname, key_directory
    from gateway.auth.store import SqlAccountStore
    from gateway.checks.encryption import rcpt_stage, stored_message_planner
    from gateway.config import resolve_secret
    from gateway.keys.store import SqlKeyStore
    from gateway.quarantine.release import ReleaseReport, release_and_record
    from gateway.queue import dsn
    from gateway.queue.spool import Spool
    from gateway.queue.store import SqlQueueStore
    from gateway.relay import UpstreamRelay
    from gateway.service import Custody

    password = resolve_secret(config.relay.password, "relay.password")
    by = common.operator()
    hostname = gateway_hostname(config)
    timeout = config.database.timeout

    async def run() -> tuple[QuarantineEntry, ReleaseReport | None]:
        # wired as the composition root wires the live gateway (gateway/app.py)
        async with open_engine(config) as engine:
            store = SqlQuarantine(engine, timeout=timeout)
            keys = SqlKeyStore(engine, timeout=timeout)
            accounts = SqlAccountStore(engine, timeout=timeout)
            queue = SqlQueueStore(engine, timeout=timeout, lifetime=config.queue.lifetime_seconds)
            relay = UpstreamRelay(
                config.relay, helo_name=config.relay.helo_name or hostname, password=password
            )
            directory = key_directory(config, keys)
            planner = stored_message_planner(
                rcpt_stage(config, directory),
                encryption_planner(config, directory, gpg_workers=0),  # no worker processes
            )
            custody = Custody(
                Spool(config.queue.spool_path(config.state_dir)),
                queue,
                dsn=dsn,
                sender_owned=accounts.sender_owned,
                reporting_mta=hostname,
                min_free_space=config.queue.min_free_bytes,
                retry_first=config.queue.retry_first_seconds,
            )
            try:
                return await release_and_record(
                    store,
                    args.id,
                    relay,
                    decided_by=by,
                    force=args.force,
                    planner=planner,
                    custody=custody,
                )
            finally:
                await relay.close()
                for closing in (store, keys, accounts, queue):
                    await closing.close()

    entry, outcome = asyncio.run(run())
    if entry.status != RELEASED:
        return fail(f"quarantine {args.id} release failed: {printable(entry.upstream_reply or '')}")
    print(f"quarantine {args.id} released: {printable(entry.upstream_reply or '')}")
    if outcome is None or (len(outcome.sent) == 1 and outcome.complete and not outcome.queued):
        return EXIT_OK
    rows: list[tuple[str, ...]] = [("RECIPIENT", "RESULT", "REPLY")]
    rows += [(f"<{address}>", what, reply) for address, what, reply in outcome.recipients()]
    print_table(rows)
    if not outcome.complete:
        missing = len(outcome.refused) + len(outcome.not_sent)
        return fail(f"quarantine {args.id}: {missing} recipient(s) did not get the message")
    return EXIT_OK


def handle_delete(args: argparse.Namespace) -> int:
    config = load(args)
    by = common.operator()
    _with_store(config, lambda s: s.mark(args.id, DELETED, decided_by=by, force=args.force))
    log.warning("quarantine %d deleted by %s", args.id, by)
    print(f"quarantine {args.id} deleted")
    return EXIT_OK
