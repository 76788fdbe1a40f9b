"""``mailward serve``: run the gateway with the site configuration until SIGTERM/SIGINT.

What it does: loads and validates the configuration (exit 2 with file/key/problem on a defect),
configures logging, starts the composition root's GatewayApp and serves.

Reads: the configuration file, then whatever the gateway reads.

Security notes: nothing secret is printed; start-up failures are one line, not a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from gateway.cli.common import EXIT_OK, config_path, load


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser("serve", help="run the gateway")
    p.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> int:
    from gateway.app import GatewayApp
    from gateway.logs import configure

    config = load(args)
    configure(config.log)
    asyncio.run(GatewayApp(config, config_file=config_path(args)).serve_forever())
    return EXIT_OK
