"""The ``mailward`` command: one sub-command module per area, wired here.

What it does: parses the global options (``--config``), dispatches to the sub-command modules
(``serve``, ``demo``, ``config``, ``policy``, ``db``, ``user``, ``audit``, ``limit``,
``quarantine``, ``account``, ``queue``, ``key``), and maps errors to exit
codes: 0 ok, 1 operational failure, 2 configuration/usage error.

Reads: argv, ``MAILWARD_CONFIG``.

Security notes: no traceback reaches the terminal for expected errors; unexpected ones print an
incident id and are logged.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from gateway.cli.common import EXIT_CONFIG, EXIT_FAILURE, config_error, fail
from gateway.core.errors import ConfigError, GatewayError
from gateway.core.model import new_id

SUBCOMMAND_MODULES = (
    "serve",
    "demo",
    "config",
    "policy",
    "db",
    "user",
    "audit",
    "limit",
    "quarantine",
    "account",
    "queue",
    "key",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mailward", description="Mailward outbound mail gateway")
    parser.add_argument(
        "--config",
        "-c",
        metavar="FILE",
        help="site configuration file (TOML); default: $MAILWARD_CONFIG or shipped defaults",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(f"gateway.cli.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
        return code
    except ConfigError as exc:
        return config_error(exc)
    except GatewayError as exc:
        return fail(str(exc))
    except KeyboardInterrupt:
        return 130
    except Exception:
        incident = new_id()
        logging.getLogger("mailward.cli").exception("unexpected error, incident %s", incident)
        return fail(f"internal error (incident {incident}); see the log", EXIT_FAILURE)


def run() -> None:  # pragma: no cover - console entry point convenience
    sys.exit(main())


__all__ = ["EXIT_CONFIG", "build_parser", "main"]
