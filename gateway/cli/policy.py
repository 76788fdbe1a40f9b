"""``mailward policy``: show the pipeline, check/test/evaluate spam rules, reload a running gateway.

What it does:
  * ``policy show`` — the checks per SMTP stage, in order, with mode, timeout and on_error (the
    fixed authentication gate first, because it always runs first);
  * ``policy check DIR`` — validates every rule file in DIR over the shipped rules (bad regex,
    unknown key or symbol, bad action → exit 2 with file, line and reason);
  * ``policy test FILE.eml [--login L] [--rcpt A ...]`` — the verdict for one message: every symbol,
    its score, the total and the action; nothing is sent;
  * ``policy eval DIR`` — on a labelled corpus (``DIR/spam``, ``DIR/ham``): per rule and in total,
    how much spam is flagged and how much ham would be held or refused;
  * ``policy reload`` — asks the running gateway to reload its policy (same as SIGHUP); a policy
    that fails validation leaves the previous one in force.

Reads: the configuration, rule files, the message files given, the control socket.

Security notes: ``policy test`` prints symbols and scores, never message content.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from gateway.cli.common import EXIT_CONFIG, EXIT_OK, fail, load


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser("policy", help="policy tools")
    sub2 = p.add_subparsers(dest="policy_command", metavar="ACTION", required=True)
    show = sub2.add_parser("show", help="print the checks per stage")
    show.set_defaults(func=handle_show)
    check = sub2.add_parser("check", help="validate the rule files in DIR")
    check.add_argument("dir", metavar="DIR")
    check.set_defaults(func=handle_check)
    test = sub2.add_parser("test", help="score one message file, send nothing")
    test.add_argument("file", metavar="FILE.eml")
    test.add_argument("--login", default=None)
    test.add_argument("--rcpt", action="append", default=[], metavar="ADDRESS")
    test.set_defaults(func=handle_test)
    evaluate = sub2.add_parser("eval", help="measure the rules on DIR/spam and DIR/ham")
    evaluate.add_argument("dir", metavar="DIR")
    evaluate.set_defaults(func=handle_eval)
    reload = sub2.add_parser("reload", help="reload the running gateway's policy")
    reload.set_defaults(func=handle_reload)


def handle_show(args: argparse.Namespace) -> int:
    from gateway.app import make_pipeline

    config = load(args)
    pipeline = make_pipeline(config)
    print(f"soft_fail = {'true' if pipeline.soft_fail else 'false'}")
    print(
        "fixed gate (always first, not configurable): relaying requires AUTH or a trusted network"
    )
    for stage, checks in pipeline.describe().items():
        print(f"\n[{stage.value}]")
        if not checks:
            print("  (no checks)")
        for i, c in enumerate(checks, 1):
            print(
                f"  {i}. {c.id:<20} mode={c.mode.value:<8} timeout={c.timeout:g}s "
                f"on_error={c.on_error.value}"
            )
    return EXIT_OK


def _spam_options(args: argparse.Namespace) -> Any:
    """The effective ``[checks.spam-score]`` options (rule directories, fan-out settings)."""
    from gateway.checks import SPECS
    from gateway.pipeline.registry import split_settings

    config = load(args)
    raw = config.checks.get("spam-score", {})
    return split_settings("spam-score", raw, SPECS["spam-score"], "configuration")[1]


def handle_check(args: argparse.Namespace) -> int:
    from pathlib import Path

    from gateway.rules import check_dir

    path = Path(args.dir)
    if not path.is_dir():
        return fail(f"{path}: not a directory", EXIT_CONFIG)
    problems = check_dir(path)
    for problem in problems:
        print(f"{problem}", file=sys.stderr)
    if problems:
        return EXIT_CONFIG
    print(f"{path}: ok")
    return EXIT_OK


def handle_test(args: argparse.Namespace) -> int:
    from pathlib import Path

    from gateway.checks.spam_score import load_engine
    from gateway.rules import MessageTooComplex, format_result
    from gateway.rules.evaluate import read_message

    path = Path(args.file)
    try:
        message = read_message(path)
    except OSError as exc:
        return fail(f"{path}: cannot read ({exc.strerror})")
    engine = load_engine(_spam_options(args))
    try:
        result = engine.scan(message, recipients=args.rcpt, login=args.login)
    except MessageTooComplex as exc:
        print(f"{path}: refused, message too complex to scan ({exc})")
        return EXIT_OK
    print(format_result(result, engine.ruleset))
    return EXIT_OK


def handle_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from gateway.checks.spam_score import load_engine
    from gateway.rules import evaluate, format_report

    path = Path(args.dir)
    if not (path / "spam").is_dir() or not (path / "ham").is_dir():
        return fail(f"{path}: expected the sub-directories spam/ and ham/", EXIT_CONFIG)
    engine = load_engine(_spam_options(args))
    print(format_report(evaluate(engine.ruleset, path), engine.ruleset))
    return EXIT_OK


def handle_reload(args: argparse.Namespace) -> int:
    import asyncio

    from gateway.control import call, socket_path

    config = load(args)
    result = asyncio.run(call(socket_path(config.state_dir), "policy-reload"))
    print(result)
    return EXIT_OK
