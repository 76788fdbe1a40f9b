"""``mailward user ...``: manage SMTP AUTH accounts, their addresses and send-as grants.

What it does: ``add LOGIN [--address A ...]`` creates an account (a login that is an address owns
that address when no ``--address`` is given), ``passwd`` changes a password, ``disable``/``enable``
lock and unlock an account, ``list`` shows every account, ``address add|remove LOGIN PATTERN``
manages what a login owns and ``grant add|remove LOGIN PATTERN`` its send-as grants. PATTERN is
``user@domain`` or ``@domain`` (the whole domain). Passwords are asked twice on the terminal, or
read as one line from standard input with ``--password-stdin`` (for scripts). Exit 0 on success, 1
for a refused request (unknown login, duplicate...) or an unreachable database, 2 for usage errors
(weak or mismatched password, bad configuration).

Reads: the configuration (``database.*``), the terminal or standard input, the account tables.

Security notes: passwords are never echoed, printed, logged or put in error messages; only their
argon2id hash is stored.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from gateway.auth.passwords import WeakPassword, check_password_policy
from gateway.auth.store import AccountInfo, SqlAccountStore
from gateway.cli.common import EXIT_CONFIG, EXIT_OK, fail, load
from gateway.cli.db import report
from gateway.config import Config
from gateway.core.errors import GatewayError
from gateway.db.engine import open_engine

T = TypeVar("T")


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser("user", help="manage SMTP AUTH accounts")
    sub2 = p.add_subparsers(dest="user_command", metavar="ACTION", required=True)

    add = sub2.add_parser("add", help="create an account")
    add.add_argument("login", metavar="LOGIN")
    add.add_argument(
        "--address",
        action="append",
        default=[],
        metavar="PATTERN",
        help="address (user@domain) or domain (@domain) the login owns; repeatable. Default: "
        "the login itself when it is an address",
    )
    _password_option(add)
    add.set_defaults(func=handle_add)

    passwd = sub2.add_parser("passwd", help="change the password of an account")
    passwd.add_argument("login", metavar="LOGIN")
    _password_option(passwd)
    passwd.set_defaults(func=handle_passwd)

    for name, disabled in (("disable", True), ("enable", False)):
        cmd = sub2.add_parser(name, help=f"{name} an account")
        cmd.add_argument("login", metavar="LOGIN")
        cmd.set_defaults(func=handle_set_disabled, disabled=disabled)

    lst = sub2.add_parser("list", help="list the accounts")
    lst.add_argument("--json", action="store_true", help="one JSON object per line")
    lst.set_defaults(func=handle_list)

    for group, what in (("address", "owned addresses/domains"), ("grant", "send-as grants")):
        gp = sub2.add_parser(group, help=f"manage {what}")
        gsub = gp.add_subparsers(dest=f"{group}_action", metavar="ACTION", required=True)
        for action in ("add", "remove"):
            cmd = gsub.add_parser(action, help=f"{action} one of the {what} of LOGIN")
            cmd.add_argument("login", metavar="LOGIN")
            cmd.add_argument("pattern", metavar="PATTERN", help="user@domain or @domain")
            cmd.set_defaults(func=handle_pattern, group=group, action=action)


def _password_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password as one line from standard input instead of asking twice",
    )


class _PasswordInputError(Exception):
    pass


def read_password(from_stdin: bool) -> str:
    """The new password: one stdin line, or asked twice on the terminal (raises on mismatch)."""
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass("New password: ")
    second = getpass.getpass("Repeat the password: ")
    if first != second:
        raise _PasswordInputError("the passwords do not match")
    return first


def _new_password(args: argparse.Namespace) -> str | int:
    """The validated password, or an exit code after printing why it was refused."""
    try:
        password = read_password(args.password_stdin)
        check_password_policy(password)
    except (_PasswordInputError, WeakPassword) as exc:
        return fail(str(exc), EXIT_CONFIG)
    except EOFError:
        return fail("no password given", EXIT_CONFIG)
    return password


def _with_store(config: Config, fn: Callable[[SqlAccountStore], Awaitable[T]]) -> T:
    async def run() -> T:
        async with open_engine(config) as engine:
            return await fn(SqlAccountStore(engine, timeout=config.database.timeout))

    return asyncio.run(run())


def handle_add(args: argparse.Namespace) -> int:
    config = load(args)
    password = _new_password(args)
    if isinstance(password, int):
        return password
    try:
        info = _with_store(config, lambda s: s.add_user(args.login, password, args.address))
    except GatewayError as exc:
        return report(exc)
    owned = ", ".join(info.addresses) or "nothing yet (add with: mailward user address add)"
    print(f"account {info.login} created; owns {owned}")
    return EXIT_OK


def handle_passwd(args: argparse.Namespace) -> int:
    config = load(args)
    password = _new_password(args)
    if isinstance(password, int):
        return password
    try:
        _with_store(config, lambda s: s.set_password(args.login, password))
    except GatewayError as exc:
        return report(exc)
    print(f"password of {args.login.strip().lower()} changed")
    return EXIT_OK


def handle_set_disabled(args: argparse.Namespace) -> int:
    config = load(args)
    try:
        _with_store(config, lambda s: s.set_disabled(args.login, args.disabled))
    except GatewayError as exc:
        return report(exc)
    state = "disabled" if args.disabled else "enabled"
    print(f"account {args.login.strip().lower()} {state}")
    return EXIT_OK


def _info_dict(info: AccountInfo) -> dict[str, Any]:
    return {
        "id": info.id,
        "login": info.login,
        "disabled": info.disabled,
        "addresses": list(info.addresses),
        "send_as": list(info.send_as),
        "created_at": info.created_at.isoformat(),
        "updated_at": info.updated_at.isoformat(),
    }


def handle_list(args: argparse.Namespace) -> int:
    config = load(args)
    try:
        users = _with_store(config, lambda s: s.list_users())
    except GatewayError as exc:
        return report(exc)
    if args.json:
        for info in users:
            print(json.dumps(_info_dict(info)))
        return EXIT_OK
    if not users:
        print("no accounts (add one with: mailward user add LOGIN)")
        return EXIT_OK
    rows = [("LOGIN", "STATUS", "ADDRESSES", "SEND-AS")] + [
        (
            u.login,
            "disabled" if u.disabled else "enabled",
            ", ".join(u.addresses) or "-",
            ", ".join(u.send_as) or "-",
        )
        for u in users
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print(
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[3]
        )
    return EXIT_OK


def handle_pattern(args: argparse.Namespace) -> int:
    config = load(args)
    login = args.login

    async def run(store: SqlAccountStore) -> str:
        if args.group == "address":
            if args.action == "add":
                stored = await store.add_address(login, args.pattern)
                return f"{login.strip().lower()} now owns {stored}"
            await store.remove_address(login, args.pattern)
            return f"{login.strip().lower()} no longer owns {args.pattern.strip()}"
        if args.action == "add":
            stored = await store.grant_send_as(login, args.pattern)
            return f"{login.strip().lower()} may now send as {stored}"
        await store.revoke_send_as(login, args.pattern)
        return f"{login.strip().lower()} may no longer send as {args.pattern.strip()}"

    try:
        message = _with_store(config, run)
    except GatewayError as exc:
        return report(exc)
    print(message)
    return EXIT_OK
