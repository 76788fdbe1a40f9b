"""``mailward demo``: the embedded default, ready to try in one command.

What it does: in a working directory (default ``./mailward-demo``) writes a site configuration
(SQLite database migrated automatically, self-signed TLS generated on first start, loopback listeners
with STARTTLS and implicit TLS), starts a built-in capture upstream that writes every relayed message
as ``.eml`` into ``<dir>/outbox``, creates or refreshes the demo account ``demo@example.com`` with a
fresh random password, prints the ports, credentials and a ready swaks command, and serves until
Ctrl-C.

Reads/writes: the demo directory only.

Security notes: the demo listens on 127.0.0.1 only; the password is random per start and printed to
the terminal (it is a demo account), never logged.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
from pathlib import Path
from typing import Any

from gateway.cli.common import EXIT_OK
from gateway.config import Config

DEMO_LOGIN = "demo@example.com"

CONFIG_TEMPLATE = """# Written by `mailward demo`: the embedded default on loopback.
state_dir = "{state_dir}"

[database]
auto_migrate = true

[smtp]
hostname = "localhost"

[[smtp.listeners]]
name = "submission"
address = "127.0.0.1"
port = {submission}
tls = "starttls"

[[smtp.listeners]]
name = "submissions"
address = "127.0.0.1"
port = {submissions}
tls = "implicit"

[relay]
host = "127.0.0.1"
port = {upstream}
tls = "none"
"""


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "demo", help="run the embedded default with a capture upstream and a demo account"
    )
    p.add_argument(
        "--dir", default="mailward-demo", help="working directory (default: %(default)s)"
    )
    p.add_argument("--submission-port", type=int, default=2587)
    p.add_argument("--submissions-port", type=int, default=2465)
    p.add_argument("--upstream-port", type=int, default=2525)
    p.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> int:
    from gateway.config import load_config
    from gateway.logs import configure

    base = Path(args.dir).resolve()
    base.mkdir(parents=True, exist_ok=True)
    config_file = base / "mailward.toml"
    config_file.write_text(
        CONFIG_TEMPLATE.format(
            state_dir=str(base),
            submission=args.submission_port,
            submissions=args.submissions_port,
            upstream=args.upstream_port,
        ),
        encoding="utf-8",
    )
    config = load_config(config_file)
    configure(config.log)
    outbox = base / "outbox"
    outbox.mkdir(exist_ok=True)
    asyncio.run(run_demo(config, config_file, outbox, args.upstream_port))
    return EXIT_OK


async def run_demo(config: Config, config_file: Path, outbox: Path, upstream_port: int) -> None:
    from gateway.app import GatewayApp, open_stores
    from gateway.smtp.capture import CaptureUpstream

    upstream = CaptureUpstream("127.0.0.1", upstream_port, outbox_dir=outbox)
    await upstream.start()

    password = secrets.token_urlsafe(12)
    stores = await open_stores(config, migrate=True)
    try:
        users = {u.login for u in await stores.accounts.list_users()}
        if DEMO_LOGIN in users:
            await stores.accounts.set_password(DEMO_LOGIN, password)
            await stores.accounts.set_disabled(DEMO_LOGIN, False)
        else:
            await stores.accounts.add_user(DEMO_LOGIN, password, [DEMO_LOGIN])
    finally:
        await stores.close()

    app = GatewayApp(config, config_file=config_file)
    stop = asyncio.Event()
    try:
        await app.start()
        sub, subs = app.ports["submission"], app.ports["submissions"]
        print(
            f"""
Mailward demo is running (Ctrl-C to stop).
  configuration : {config_file}
  database      : {config.database_url}
  submission    : 127.0.0.1:{sub}  (STARTTLS, RFC 6409)
  submissions   : 127.0.0.1:{subs}  (implicit TLS, RFC 8314)
  upstream      : capture server on 127.0.0.1:{upstream.port}, messages written to {outbox}/
  demo account  : {DEMO_LOGIN}  password: {password}

Try it:
  swaks --server 127.0.0.1:{sub} -tls --auth-user {DEMO_LOGIN} --auth-password '{password}' \\
        --from {DEMO_LOGIN} --to someone@example.net
  mailward --config {config_file} audit list
""",
            flush=True,
        )
        await _wait_for_signal(stop)
    finally:
        await app.stop()
        await upstream.stop()


async def _wait_for_signal(stop: asyncio.Event) -> None:
    import signal

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
