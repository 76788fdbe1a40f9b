"""Helpers shared by the ``mailward`` sub-commands: config loading, error reporting, safe printing.

What it does: loads the configuration named by ``--config`` (or the shipped defaults), validates the
pipeline, and turns ConfigError into exit code 2 with a message naming the file, key and problem.
:func:`printable`, :func:`format_fields` / :func:`print_fields` and :func:`print_table` print stored
values (audit records, quarantine entries, account states) for a human on a terminal.

Reads: the config file, the environment (MAILWARD_CONFIG).

Security notes: messages printed to the terminal never include secret values. Much of what the
sub-commands print came from SMTP clients (HELO, addresses, Subject, Message-ID, replies, reasons):
every such value goes through :func:`printable`, which escapes C0 and C1 control characters, DEL,
the Unicode line/paragraph separators and the bidirectional controls (``\x1b``, ``\u202e``), so a
client can neither drive the operator's terminal (ANSI escape sequences, CR overwriting a line)
nor reorder what it shows ("Trojan Source" bidi overrides). Escaping leaves backslashes as they
are, so it is idempotent (a value escaped twice reads the same). JSON output (``--json``) is left
exact: ``json.dumps`` escapes every control and non-ASCII character itself.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path

from gateway.config import Config, load_config
from gateway.core.errors import ConfigError

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


def print_fields(
    pairs: Iterable[tuple[str, object]], *, indent: str = "  ", width: int = LABEL_WIDTH
) -> None:
    """Print :func:`format_fields` of ``pairs``."""
    for line in format_fields(pairs, indent=indent, width=width):
        print(line)
