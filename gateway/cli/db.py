"""``mailward db upgrade|downgrade|current``: manage the database schema (Alembic migrations).

What it does: ``upgrade`` brings the schema to the newest revision (or ``--revision``), ``downgrade
REVISION`` takes it back (``base`` drops every Mailward table, audit log included: asks for
confirmation on a terminal unless ``--yes``), ``current`` prints the revision the database is at and
whether it is the newest. Exit 0 on success, 1 when the database is unreachable or the migration is
refused, 2 for configuration errors.

Reads: the configuration (``database.url``), the database, the shipped migration scripts.

Security notes: the database URL is printed with its password masked; no traceback for expected
failures.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from gateway.cli.common import EXIT_FAILURE, EXIT_OK, config_error, fail, load
from gateway.core.errors import ConfigError, GatewayError
from gateway.db.engine import safe_url
from gateway.db.migrate import current, downgrade, head_revision, upgrade


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser("db", help="database schema (migrations)")
    sub2 = p.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    up = sub2.add_parser("upgrade", help="upgrade the schema (default: to the newest revision)")
    up.add_argument("--revision", default="head", help="target revision (default: head)")
    up.set_defaults(func=handle_upgrade)
    down = sub2.add_parser(
        "downgrade", help="downgrade the schema to REVISION (base: drop everything, data included)"
    )
    down.add_argument("revision", metavar="REVISION")
    down.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    down.set_defaults(func=handle_downgrade)
    cur = sub2.add_parser("current", help="print the revision of the database schema")
    cur.set_defaults(func=handle_current)


def report(exc: GatewayError) -> int:
    """Print an expected failure in one line: exit 2 for configuration errors, else 1."""
    if isinstance(exc, ConfigError):
        return config_error(exc)
    return fail(str(exc))


def _describe(revision: str | None) -> str:
    if revision is None:
        return "no schema (run: mailward db upgrade)"
    head = head_revision()
    return f"{revision} (newest)" if revision == head else f"{revision} (newest is {head})"


def handle_upgrade(args: argparse.Namespace) -> int:
    url = load(args).database_url
    try:
        asyncio.run(upgrade(url, args.revision))
        revision = asyncio.run(current(url))
    except GatewayError as exc:
        return report(exc)
    print(f"database {safe_url(url)}: {_describe(revision)}")
    return EXIT_OK


def handle_downgrade(args: argparse.Namespace) -> int:
    url = load(args).database_url
    if not args.yes and sys.stdin.isatty():
        try:
            answer = input(
                f"Downgrading {safe_url(url)} to {args.revision} may drop tables and their data "
                "(the audit log included). Continue? [y/N] "
            )
        except EOFError:
            answer = ""
        if answer.strip().lower() not in ("y", "yes"):
            print("aborted", file=sys.stderr)
            return EXIT_FAILURE
    try:
        asyncio.run(downgrade(url, args.revision))
        revision = asyncio.run(current(url))
    except GatewayError as exc:
        return report(exc)
    print(f"database {safe_url(url)}: {_describe(revision)}")
    return EXIT_OK


def handle_current(args: argparse.Namespace) -> int:
    url = load(args).database_url
    try:
        revision = asyncio.run(current(url))
    except GatewayError as exc:
        return report(exc)
    print(f"database {safe_url(url)}: {_describe(revision)}")
    return EXIT_OK
