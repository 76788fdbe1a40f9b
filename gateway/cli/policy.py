"""``mailward policy show``: the checks per SMTP stage, in order, with mode, timeout and on_error.

What it does: builds the pipeline from the effective configuration (shipped policies + site file)
and prints it; the fixed authentication gate is shown first because it always runs first.

Reads: the configuration.

Security notes: none.
"""

from __future__ import annotations

import argparse
from typing import Any

from gateway.cli.common import EXIT_OK, load


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser("policy", help="policy tools")
    sub2 = p.add_subparsers(dest="policy_command", metavar="ACTION", required=True)
    show = sub2.add_parser("show", help="print the checks per stage")
    show.set_defaults(func=handle_show)


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
