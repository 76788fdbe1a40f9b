"""``mailward limit``: rate-limit usage, reset and time-boxed overrides for a login.

What it does:
  * ``limit status LOGIN`` — each login-keyed limit and tier: used, remaining, seconds to refill;
  * ``limit reset LOGIN`` — clears the login's counters;
  * ``limit override LOGIN --limit ID --tier N/PERIOD[/BURST] ... --until WHEN [--reason T]`` —
    replaces a limit's tiers for that login until WHEN (ISO 8601 time or a duration like ``2h``);
  * ``limit overrides [LOGIN] [--all]`` and ``limit override-remove ID``.
With ``limits.store = "memory://"`` the counters live inside the running gateway, so status and
reset go through its control socket; with Redis they go to the store directly. Overrides are rows in
the database and work without a running gateway.

Reads: the configuration, the database, the limit store or the control socket.

Security notes: exit 2 with a clear message for bad arguments; no traceback for expected errors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from datetime import datetime, timedelta
from typing import Any

from gateway.cli.common import EXIT_CONFIG, EXIT_OK, fail, load
from gateway.config.schema import Config, TierConfig, parse_duration
from gateway.config.typed import build
from gateway.core.errors import ConfigError
from gateway.core.model import utcnow


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser("limit", help="rate limits of a login")
    sub2 = p.add_subparsers(dest="limit_command", metavar="ACTION", required=True)
    status = sub2.add_parser("status", help="usage per limit and tier")
    status.add_argument("login")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=handle_status)
    reset = sub2.add_parser("reset", help="clear the login's counters")
    reset.add_argument("login")
    reset.set_defaults(func=handle_reset)
    override = sub2.add_parser("override", help="time-boxed tiers for one limit and login")
    override.add_argument("login")
    override.add_argument("--limit", required=True, dest="limit_id", metavar="ID")
    override.add_argument(
        "--tier",
        required=True,
        action="append",
        metavar="N/PERIOD[/BURST]",
        help="e.g. 100/1h (repeat for several tiers)",
    )
    override.add_argument("--until", required=True, metavar="WHEN", help="ISO 8601 time or 2h, 3d")
    override.add_argument("--reason", default="")
    override.set_defaults(func=handle_override)
    listing = sub2.add_parser("overrides", help="list overrides")
    listing.add_argument("login", nargs="?")
    listing.add_argument("--all", action="store_true", help="include expired ones")
    listing.set_defaults(func=handle_list)
    remove = sub2.add_parser("override-remove", help="remove an override by id")
    remove.add_argument("id", type=int)
    remove.set_defaults(func=handle_remove)


def parse_tier(text: str) -> dict[str, Any]:
    parts = text.split("/")
    if (
        len(parts) not in (2, 3)
        or not parts[0].isdigit()
        or (len(parts) == 3 and not parts[2].isdigit())
    ):
        raise ConfigError("--tier", text, "expected N/PERIOD or N/PERIOD/BURST, e.g. 100/1h")
    raw: dict[str, Any] = {"limit": int(parts[0]), "period": parts[1]}
    if len(parts) == 3:
        raw["burst"] = int(parts[2])
    build(TierConfig, raw, "--tier", text)  # validates
    return raw


def parse_until(text: str) -> datetime:
    try:
        return utcnow() + timedelta(seconds=parse_duration(text))
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(
            "--until", text, "expected an ISO 8601 time or a duration like 2h"
        ) from None
    if when.tzinfo is None:
        raise ConfigError("--until", text, "give a time zone, e.g. 2026-12-01T00:00:00Z")
    if when <= utcnow():
        raise ConfigError("--until", text, "is in the past")
    return when


async def _direct(config: Config, command: str, login: str) -> Any:
    from gateway.app import open_limit_store, open_stores
    from gateway.checks.rate_limit import LimitAdmin

    stores = await open_stores(config, migrate=False)
    store = open_limit_store(config)
    try:
        admin = LimitAdmin(config.limits, store, stores.policy)
        return await (admin.status(login) if command == "limit-status" else admin.reset(login))
    finally:
        await store.close()
        await stores.close()


async def _limit_command(config: Config, command: str, login: str) -> Any:
    if config.limits.store == "memory://":
        from gateway.control import call, socket_path

        return await call(socket_path(config.state_dir), command, {"login": login})
    return await _direct(config, command, login)


def handle_status(args: argparse.Namespace) -> int:
    config = load(args)
    rows = asyncio.run(_limit_command(config, "limit-status", args.login))
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return EXIT_OK
    print(f"{'limit':<28} {'tier':<22} {'used':>12} {'remaining':>12} {'refill in':>10}")
    for row in rows:
        refill = "-" if row["reset_after"] is None else f"{row['reset_after']:.0f}s"
        print(
            f"{row['limit']:<28} {row['tier']:<22} {row['used']:>12g} {row['remaining']:>12g} "
            f"{refill:>10}"
        )
    return EXIT_OK


def handle_reset(args: argparse.Namespace) -> int:
    config = load(args)
    cleared = asyncio.run(_limit_command(config, "limit-reset", args.login))
    print(f"{args.login}: {cleared} counter(s) cleared")
    return EXIT_OK


def handle_override(args: argparse.Namespace) -> int:
    config = load(args)
    if args.limit_id not in config.limits.rules:
        known = ", ".join(sorted(config.limits.rules))
        return fail(f"--limit: no limit {args.limit_id!r} (known: {known})", EXIT_CONFIG)
    tiers = [parse_tier(t) for t in args.tier]
    until = parse_until(args.until)

    async def add() -> int:
        from gateway.app import open_stores

        stores = await open_stores(config, migrate=False)
        try:
            return await stores.policy.add_limit_override(
                args.login, args.limit_id, tiers, until, reason=args.reason, created_by="cli"
            )
        finally:
            await stores.close()

    new_id = asyncio.run(add())
    print(
        f"override {new_id}: {args.login} {args.limit_id} = {', '.join(args.tier)} "
        f"until {until.isoformat()}"
    )
    return EXIT_OK


def handle_list(args: argparse.Namespace) -> int:
    config = load(args)

    async def listing() -> Any:
        from gateway.app import open_stores

        stores = await open_stores(config, migrate=False)
        try:
            return await stores.policy.list_limit_overrides(args.login, include_expired=args.all)
        finally:
            await stores.close()

    for o in asyncio.run(listing()):
        tiers = ", ".join(f"{t['limit']}/{t['period']}" for t in o.tiers)
        print(
            f"{o.id:>5} {o.login:<32} {o.limit_id:<28} {tiers:<24} "
            f"until {o.until.isoformat()} {o.reason}"
        )
    return EXIT_OK


def handle_remove(args: argparse.Namespace) -> int:
    config = load(args)

    async def remove() -> None:
        from gateway.app import open_stores

        stores = await open_stores(config, migrate=False)
        try:
            await stores.policy.remove_limit_override(args.id)
        finally:
            await stores.close()

    asyncio.run(remove())
    print(f"override {args.id} removed")
    return EXIT_OK
