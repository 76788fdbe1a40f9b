"""Helpers shared by the ``mailward`` sub-commands: config loading, error reporting, argument
types, opening a store, safe printing.

What it does: loads the configuration named by ``--config`` (or the shipped defaults), validates the
pipeline, and turns ConfigError into exit code 2 with a message naming the file, key and problem.
:func:`number_type` / :func:`positive_int` parse ids and counts (the message names what was
expected and the value given); :func:`with_store` / :func:`with_engine` open the database for one
command and close what they opened; :func:`operator` names who acted (``cli:<OS user>``).
:func:`printable`, :func:`format_fields` / :func:`print_fields`, :func:`format_stored`,
:func:`print_table`, :class:`Listing` and :func:`short` print stored values (audit records,
quarantine entries, queued messages, keys, account states) for a human on a terminal.

Reads: the config file, the environment (MAILWARD_CONFIG); the database (``database.*``) for the
stores it opens; the OS user name (:func:`operator`).

Security notes: messages printed to the terminal never include secret values. Much of what the
sub-commands print came from SMTP clients (HELO, addresses, Subject, Message-ID, replies, reasons):
every such value goes through :func:`printable`, which escapes C0 and C1 control characters, DEL,
the Unicode line/paragraph separators and the bidirectional controls (``\x1b``, ``\u202e``), so a
client can neither drive the operator's terminal (ANSI escape sequences, CR overwriting a line)
nor reorder what it shows ("Trojan Source" bidi overrides). Escaping leaves backslashes as they
are, so it is idempotent (a value escaped twice reads the same). The table helpers
(:func:`print_table`, :class:`Listing`, :func:`short`) and the field helpers escape every
cell themselves. JSON output (``--json``) is left exact: ``json.dumps`` escapes every control and
non-ASCII character itself.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import re
import sys
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from gateway.config import Config, load_config
from gateway.core.errors import ConfigError
from gateway.db.engine import open_engine

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2

#: Characters a terminal may act on, or that reorder the text it shows: C0 controls but tab, DEL,
#: C1 controls, the Arabic letter mark, LRM/RLM, the line and paragraph separators, the bidi
#: embeddings and overrides (U+202A-U+202E) and isolates (U+2066-U+2069).
_UNSAFE_CLASS = r"\x00-\x08\x0a-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069"
_UNSAFE = re.compile(f"[{_UNSAFE_CLASS}]")
_UNSAFE_OR_TAB = re.compile(rf"[\t{_UNSAFE_CLASS}]")
#: Width of the label column of :func:`format_fields` (a label, its colon and the padding).
LABEL_WIDTH = 16
#: How a stored record's fields show the null reverse-path (``MAIL FROM:<>``).
NULL_SENDER = "<> (null sender)"

T = TypeVar("T")


class Closable(Protocol):
    """A store the CLI opens for one command: :func:`with_store` closes it afterwards."""

    async def close(self) -> None: ...


class Numbered(Protocol):
    """A stored item with a numeric id (the ``--before-id`` of the next page)."""

    @property
    def id(self) -> int: ...


S = TypeVar("S", bound=Closable)
N = TypeVar("N", bound=Numbered)


def config_path(args: argparse.Namespace) -> Path | None:
    value = getattr(args, "config", None) or os.environ.get("MAILWARD_CONFIG")
    return Path(value) if value else None


def load(args: argparse.Namespace) -> Config:
    """The validated configuration (raises ConfigError; ``main`` maps it to exit 2)."""
    from gateway.app import validate_pipeline

    path = config_path(args)
    config = load_config(path)
    validate_pipeline(config, str(path) if path else "shipped policies")
    return config


def operator() -> str:
    """Who acts from this command line, as decisions and audit events record it: ``cli:<OS
    user>`` (``cli`` if the user is unknown)."""
    try:
        return f"cli:{getpass.getuser()}"
    except (OSError, KeyError, ImportError):
        return "cli"


def number_type(expected: str, prefix: str = "") -> Callable[[str], int]:
    """An argparse ``type``: a whole number from 1, optionally written after ``prefix`` (any
    case: ``Q5`` for 5). Anything else is refused with ``expected <expected>, got '<value>'``,
    which argparse prints after the argument's name (exit 2)."""

    def parse(value: str) -> int:
        has_prefix = bool(prefix) and value[: len(prefix)].upper() == prefix.upper()
        digits = value[len(prefix) :] if has_prefix else value
        try:
            number = int(digits)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value!r}") from None
        if number < 1:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value!r}")
        return number

    return parse


#: argparse ``type`` of counts and ids given as plain numbers (``--limit``, ``--before-id``).
positive_int = number_type("a positive integer")


def add_actions(sub: Any, name: str, help: str) -> Any:
    """Register the sub-command ``name`` whose actions are sub-commands of their own (``mailward
    NAME ACTION ...``, one required): returns the parsers' collection to add the actions to."""
    parser: argparse.ArgumentParser = sub.add_parser(name, help=help)
    return parser.add_subparsers(dest=f"{name}_command", metavar="ACTION", required=True)


def add_page_arguments(parser: argparse.ArgumentParser, items: str, max_page: int) -> None:
    """The options of a ``list`` sub-command that prints ``items`` newest first, a page at a
    time: ``--limit`` (default 50), ``--before-id`` (the next page) and ``--json``."""
    parser.add_argument(
        "--limit",
        type=positive_int,
        default=50,
        help=f"{items} per page (default 50, max {max_page})",
    )
    parser.add_argument(
        "--before-id",
        type=positive_int,
        metavar="ID",
        help=f"only {items} older than ID (next page)",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per line")


def with_engine(config: Config, fn: Callable[[AsyncEngine], Awaitable[T]]) -> T:
    """Run ``fn`` with an engine on the configured database (``database.*``), in an event loop
    of its own; the engine is disposed afterwards."""

    async def run() -> T:
        async with open_engine(config) as engine:
            return await fn(engine)

    return asyncio.run(run())


async def using(store: S, fn: Callable[[S], Awaitable[T]]) -> T:
    """``fn(store)``, then close the store (its detached operations end first) whatever the
    outcome."""
    try:
        return await fn(store)
    finally:
        await store.close()


def with_store(
    config: Config, make: Callable[..., S], fn: Callable[[S], Awaitable[T]], **options: Any
) -> T:
    """Run ``fn`` on the store ``make(engine, timeout=database.timeout, **options)`` opened on
    the configured database, and close the store and the engine afterwards (one command's
    work: store errors propagate, :func:`gateway.cli.main` prints them in one line)."""
    return with_engine(
        config,
        lambda engine: using(make(engine, timeout=config.database.timeout, **options), fn),
    )


def fail(message: str, code: int = EXIT_FAILURE) -> int:
    print(f"mailward: {message}", file=sys.stderr)
    return code


def config_error(exc: ConfigError) -> int:
    return fail(f"configuration error: {exc}", EXIT_CONFIG)


def print_table(rows: Sequence[Sequence[str]]) -> None:
    """Rows of text cells, columns padded to their widest cell (the last column is not padded);
    every cell goes through :func:`printable`."""
    if not rows:
        return
    rows = [[printable(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [cell.ljust(w) for cell, w in zip(row, widths, strict=False)]
        print("  ".join([*cells, row[-1]]))


@dataclass(frozen=True)
class Listing(Generic[N]):
    """What a ``list`` sub-command prints of its items: ``to_json`` of each with ``--json``,
    else ``empty`` when there is none, else a table of ``header`` and ``row`` of each item."""

    header: tuple[str, ...]
    row: Callable[[N], tuple[str, ...]]
    to_json: Callable[[N], dict[str, Any]]
    empty: str

    def print_page(self, items: Sequence[N], *, as_json: bool, limit: int | None = None) -> int:
        """Print one page and return EXIT_OK: one JSON object per line with ``as_json``, else
        the table (every cell escaped) and, when the page is full (``limit`` items), the option
        that shows the next one."""
        if as_json:
            for item in items:
                print(json.dumps(self.to_json(item)))
            return EXIT_OK
        if not items:
            print(self.empty)
            return EXIT_OK
        print_table([self.header, *(self.row(item) for item in items)])
        if len(items) == limit:
            print(f"(more may follow: --before-id {items[-1].id})")
        return EXIT_OK


def short(value: object, width: int) -> str:
    """A table cell: ``value`` through :func:`printable` (``-`` for None or empty), cut to
    ``width`` characters with ``...``."""
    text = "-" if value is None or value == "" else printable(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def utc_time(value: datetime | None) -> str:
    """A table cell for a time: UTC, to the second (``-`` for None)."""
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def sender(mail_from: str | None, null: str = "<>") -> str | None:
    """The envelope sender as shown: ``null`` for the null reverse-path (None stays None: no
    transaction)."""
    return null if mail_from == "" else mail_from


def recipients_cell(addresses: Sequence[str]) -> str:
    """A table cell for recipients: the first one and how many more (``a@x +2``), ``-`` if
    none."""
    text = addresses[0] if addresses else "-"
    return f"{text} +{len(addresses) - 1}" if len(addresses) > 1 else text


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(value: object, *, keep_tabs: bool = False) -> str:
    """``str(value)`` safe to print on a terminal: control and bidi characters escaped visibly
    (``\\x1b``, ``\\x0d``, ``\\u202e``), everything else unchanged. Tabs are escaped too unless
    ``keep_tabs`` (a header block's folded lines)."""
    pattern = _UNSAFE if keep_tabs else _UNSAFE_OR_TAB
    return pattern.sub(_escape, str(value))


def field_text(value: object) -> str:
    """One value as :func:`format_fields` shows it: ``-`` for None, ISO 8601 for a datetime,
    ``yes``/``no`` for a bool, anything else through :func:`printable`."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, datetime):
        return value.isoformat()
    return printable(value)


def format_fields(
    pairs: Iterable[tuple[str, object]], *, indent: str = "  ", width: int = LABEL_WIDTH
) -> list[str]:
    """``label: value`` lines, the values aligned after ``width`` columns and made safe by
    :func:`field_text`."""
    return [f"{indent}{label + ':':<{width}}{field_text(value)}" for label, value in pairs]


def format_stored(title: str, item: object, fields: Iterable[tuple[str, str]]) -> list[str]:
    """``title``, then the :func:`format_fields` lines of the attributes of a stored item that
    ``fields`` names (``(attribute, label)`` pairs); an empty ``mail_from`` shows as
    :data:`NULL_SENDER`."""
    pairs: list[tuple[str, object]] = []
    for attr, label in fields:
        value = getattr(item, attr)
        pairs.append((label, sender(value, NULL_SENDER) if attr == "mail_from" else value))
    return [title, *format_fields(pairs)]


def print_fields(
    pairs: Iterable[tuple[str, object]], *, indent: str = "  ", width: int = LABEL_WIDTH
) -> None:
    """Print :func:`format_fields` of ``pairs``."""
    for line in format_fields(pairs, indent=indent, width=width):
        print(line)
