"""``mailward account status|list|release|suspend``: compromised-account stages (``account-guard``).

What it does:
  * ``account status LOGIN [--json]`` — the login's stage (``ok``, ``flagged``, ``held``,
    ``suspended``), since when and set by whom, the evidence of its last transition (signals,
    measured values, thresholds; or the operator's reason) and its last transitions from the
    audit log;
  * ``account list [--stage S] [--json]`` — every login that is not ``ok`` (or every login at S);
  * ``account release LOGIN [--reason T]`` — back to ``ok``: mail flows again, and the check's
    counters for the login start afresh; says how many of its messages are still held in the
    quarantine (``mailward quarantine`` releases or deletes them, one by one, after review);
  * ``account suspend LOGIN [--reason T]`` — suspend by hand: MAIL FROM is refused
    ``550 5.7.1 Account suspended, contact support`` until a release.
Release and suspend are audited (kinds ``account-released`` / ``account-suspended``, with the
operator and the reason; written in the same database transaction as the new stage) and logged at
WARNING.
They work on the database directly, with or without a running gateway; each gateway instance
picks a change up within ``[checks.account-guard] state_cache``. Exit 0 on success (also when the
login already was at the stage asked for), 1 for an unknown login (suspend) or an unreachable
database, 2 for bad options or configuration.

Reads/writes: the configuration (``database.*``), the ``account_state`` table, the audit log
(history; the transition events), the ``account`` table (suspend checks the login exists) and the
``quarantine`` table (release counts held messages).

Security notes: ``updated_by`` is ``cli:<OS user>``; reasons are operator free text kept in the
audit log and the state row (printed back with control characters escaped). No message content is
read or printed.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

from gateway.checks.account_guard import CHECK_ID
from gateway.cli.common import EXIT_OK, load, print_fields, print_table, printable
from gateway.cli.db import report
from gateway.config import Config
from gateway.core import replies
from gateway.core.errors import GatewayError
from gateway.core.model import Action, Mode, Session, Stage, VerdictRecord
from gateway.policystate.account_state import EVENT_KINDS
from gateway.policystate.models import ACCOUNT_STAGES

if TYPE_CHECKING:
    from gateway.app import Stores
    from gateway.policystate.account_state import AccountState

T = TypeVar("T")

log = logging.getLogger("mailward.account")

HISTORY = 10
#: Width of the labels of ``account status``.
_LABEL_WIDTH = 12


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "account", help="compromised-account stages (account-guard)"
    )
    sub2 = p.add_subparsers(dest="account_command", metavar="ACTION", required=True)
    status = sub2.add_parser("status", help="a login's stage, evidence and last transitions")
    status.add_argument("login")
    status.add_argument("--json", action="store_true", help="as one JSON object")
    status.set_defaults(func=handle_status)
    listing = sub2.add_parser("list", help="logins that are not ok (or at --stage)")
    listing.add_argument("--stage", choices=ACCOUNT_STAGES, help="only logins at this stage")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    listing.set_defaults(func=handle_list)
    release = sub2.add_parser("release", help="back to ok: mail flows again")
    release.add_argument("login")
    release.add_argument("--reason", default="", help="kept in the audit log")
    release.set_defaults(func=handle_release)
    suspend = sub2.add_parser("suspend", help="refuse the login's mail until a release")
    suspend.add_argument("login")
    suspend.add_argument("--reason", default="", help="kept in the audit log")
    suspend.set_defaults(func=handle_suspend)


def operator() -> str:
    """``updated_by`` for changes made here: ``cli:<OS user>`` (``cli`` if unknown)."""
    try:
        return f"cli:{getpass.getuser()}"
    except (OSError, KeyError, ImportError):
        return "cli"


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%SZ") if value else "-"


def _with_stores(config: Config, fn: Callable[[Stores], Awaitable[T]]) -> T:
    async def run() -> T:
        from gateway.app import open_stores

        stores = await open_stores(config, migrate=False)
        try:
            return await fn(stores)
        finally:
            await stores.close()

    return asyncio.run(run())


def _operator_event(stage: str, by: str, reason: str) -> tuple[Session, VerdictRecord]:
    """The audit context of an operator's change: no SMTP session, so a minimal one (listener
    ``cli``); the verdict's stage is ``mail``, where a suspension is enforced and lifted."""
    session = Session(client_ip="-", client_port=0, listener="cli")
    verdict = VerdictRecord(
        check_id=CHECK_ID,
        stage=Stage.MAIL,
        action=Action.REJECT if stage == "suspended" else Action.CONTINUE,
        mode=Mode.ENFORCE,
        reply=replies.ACCOUNT_SUSPENDED.line() if stage == "suspended" else "",
        reason=f"operator {by}: {reason or 'no reason given'}",
    )
    return session, verdict


def _score(state: AccountState) -> str:
    score = state.evidence.get("score")
    return f"{score:g}" if isinstance(score, int | float) else "-"


# --- status ---------------------------------------------------------------------------------------


def handle_status(args: argparse.Namespace) -> int:
    config = load(args)

    async def fetch(stores: Stores) -> tuple[AccountState, list[Any]]:
        state = await stores.account_state.get(args.login)
        records = await stores.audit.list_records(login=state.login, check_id=CHECK_ID, limit=200)
        kinds = set(EVENT_KINDS.values())
        history = [r for r in records if r.kind in kinds][:HISTORY]
        return state, history

    try:
        state, history = _with_stores(config, fetch)
    except GatewayError as exc:
        return report(exc)
    if args.json:
        data = state.to_dict()
        data["history"] = [
            {
                "id": r.id,
                "kind": r.kind,
                "at": r.started_at.isoformat(),
                "listener": r.listener,
                "client_ip": r.client_ip,
                "detail": r.detail,
            }
            for r in history
        ]
        print(json.dumps(data))
        return EXIT_OK
    stage = (
        "ok (never flagged)"
        if state.since is None
        else f"{state.stage} since {_when(state.since)} by {state.updated_by}"
    )
    print_fields([("login", state.login), ("stage", stage)], indent="", width=_LABEL_WIDTH)
    if state.evidence:
        # JSON escapes every control and non-ASCII character; printable() is belt and braces
        lines = json.dumps(dict(state.evidence), indent=2, sort_keys=True).splitlines()
        print(
            f"{'evidence:':<{_LABEL_WIDTH}}"
            + ("\n" + " " * _LABEL_WIDTH).join(printable(line) for line in lines)
        )
    if history:
        width = max(len(kind) for kind in EVENT_KINDS.values())
        print("history (newest first):")
        for r in history:
            print(
                f"  {r.id:>8}  {_when(r.started_at)}  {printable(r.kind):<{width}} "
                f"{printable(r.detail or '')}"
            )
    return EXIT_OK


# --- list -----------------------------------------------------------------------------------------


def handle_list(args: argparse.Namespace) -> int:
    config = load(args)
    try:
        states = _with_stores(config, lambda s: s.account_state.list(args.stage))
    except GatewayError as exc:
        return report(exc)
    if args.json:
        for state in states:
            print(json.dumps(state.to_dict()))
        return EXIT_OK
    if not states:
        print(
            "no logins at stage " + args.stage
            if args.stage
            else "no flagged, held or suspended logins"
        )
        return EXIT_OK
    rows = [("LOGIN", "STAGE", "SINCE (UTC)", "SCORE", "BY")]
    rows += [
        (printable(s.login), s.stage, _when(s.since), _score(s), printable(s.updated_by))
        for s in states
    ]
    print_table(rows)
    return EXIT_OK


# --- release / suspend ----------------------------------------------------------------------------


def _change(args: argparse.Namespace, stage: str) -> int:
    config = load(args)
    by = operator()
    reason = args.reason.strip()
    session, verdict = _operator_event(stage, by, reason)
    verb = "released" if stage == "ok" else "suspended"
    detail = f"{verb} by operator {by}" + (f": {reason}" if reason else "")

    async def change(stores: Stores) -> tuple[Any, int]:
        if stage == "suspended":
            await stores.accounts.get_user(args.login)  # raises UnknownLogin: a typo
        transition = await stores.account_state.set_stage(
            args.login,
            stage,
            evidence={"operator": by, "reason": reason},
            updated_by=by,
            session=session,
            detail=detail,
            verdict=verdict,
        )
        held = 0
        if stage == "ok":
            held = len(await stores.quarantine.list("held", transition.after.login, limit=1000))
        return transition, held

    try:
        transition, held = _with_stores(config, change)
    except GatewayError as exc:
        return report(exc)
    login = printable(transition.after.login)
    if not transition.changed:
        print(f"{login}: already {transition.after.stage}; nothing changed")
        return EXIT_OK
    log.warning(
        "account %s %s -> %s by %s (audit %s): %s",
        transition.after.login,
        transition.before.stage,
        transition.after.stage,
        by,
        transition.audit_id,
        printable(reason or "no reason given"),
    )
    print(
        f"{login}: {transition.before.stage} -> {transition.after.stage} "
        f"(audit record {transition.audit_id})"
    )
    if stage == "ok":
        print("the check's counters for this login start afresh")
    if held:
        more = "+" if held >= 1000 else ""
        print(
            f"{held}{more} message(s) of {login} are held for review: "
            f"mailward quarantine list --login {login} --status held"
        )
    return EXIT_OK


def handle_release(args: argparse.Namespace) -> int:
    return _change(args, "ok")


def handle_suspend(args: argparse.Namespace) -> int:
    return _change(args, "suspended")
