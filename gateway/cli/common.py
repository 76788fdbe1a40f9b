"""Helpers shared by the ``mailward`` sub-commands: config loading and error reporting.

What it does: loads the configuration named by ``--config`` (or the shipped defaults), validates the
pipeline, and turns ConfigError into exit code 2 with a message naming the file, key and problem.

Reads: the config file, the environment (MAILWARD_CONFIG).

Security notes: messages printed to the terminal never include secret values.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from gateway.config import Config, load_config
from gateway.core.errors import ConfigError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2


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
    """Rows of text cells, columns padded to their widest cell (the last column is not padded)."""
    if not rows:
        return
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [cell.ljust(w) for cell, w in zip(row, widths, strict=False)]
        print("  ".join([*cells, row[-1]]))
