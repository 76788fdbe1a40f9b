"""``mailward config check FILE`` and ``mailward config docs``: configuration tools.

What it does: ``check`` loads the shipped defaults and FILE, binds every key to the typed schema and
builds the pipeline (check ids, stages, check options). Exit 0 and "ok", or exit 2 with a message
naming the file, the key and the problem. ``docs`` prints the Markdown reference of every key
(generated from the schema, the same text as in ``docs/configuration.md``).

Reads: FILE and the shipped policies (``docs`` reads only the shipped policies).

Security notes: secret values are never printed.
"""

from __future__ import annotations

import argparse
from typing import Any

from gateway.cli.common import EXIT_OK


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser("config", help="configuration tools")
    sub2 = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    check = sub2.add_parser("check", help="validate a configuration file")
    check.add_argument("file", metavar="FILE")
    check.set_defaults(func=handle_check)
    docs = sub2.add_parser("docs", help="print the reference of every configuration key (Markdown)")
    docs.set_defaults(func=handle_docs)


def handle_check(args: argparse.Namespace) -> int:
    from gateway.app import validate_pipeline
    from gateway.config import load_config

    config = load_config(args.file)
    validate_pipeline(config, args.file)
    print(f"{args.file}: ok ({len(config.smtp.listeners)} listeners, relay {config.relay.host})")
    return EXIT_OK


def handle_docs(args: argparse.Namespace) -> int:
    from gateway.config.docs import render_reference

    print(render_reference(), end="")
    return EXIT_OK
