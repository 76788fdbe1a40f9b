"""``rate-limit`` and its store: one combined store call per stage, overrides picked up.

What it tests: with the shipped limits (a login: messages, recipients, distinct recipients, bytes;
client IP; sender domain) the check asks the limit store once per SMTP stage — the GCRA charges and
the distinct-recipient count together (``admit``) — peeking at MAIL and RCPT and charging at end of
data; a distinct-recipient refusal at end of data charges nothing at all; the limits resolved for a
login, client and sender are reused until the login's time-boxed overrides change. The store is the
real in-process store, wrapped to record the calls.

Reads: the shipped policies.

Security notes: none.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gateway.checks.rate_limit import RateLimit
from gateway.config.loader import load_config
from gateway.core.model import (
    CONTINUE,
    Action,
    Identity,
    Recipient,
    RecipientStatus,
    Session,
    Stage,
    Transaction,
)
from gateway.ratelimit.memory import MemoryLimitStore
from gateway.ratelimit.store import Admission, Charge, DistinctCharge, DistinctResult

LOGIN = "alice@example.com"


class RecordingStore(MemoryLimitStore):
    """The memory store, recording every call (name, dry run)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, bool]] = []

    async def admit(
        self,
        charges: Sequence[Charge],
        distinct: Sequence[DistinctCharge] = (),
        *,
        dry_run: bool = False,
    ) -> Admission:
        self.calls.append(("admit", dry_run))
        return await super().admit(charges, distinct, dry_run=dry_run)

    async def acquire(self, charges: Sequence[Charge], *, dry_run: bool = False) -> Any:
        self.calls.append(("acquire", dry_run))
        return await super().acquire(charges, dry_run=dry_run)

    async def distinct(self, *args: Any, **kwargs: Any) -> DistinctResult:
        self.calls.append(("distinct", bool(kwargs.get("dry_run"))))
        return await super().distinct(*args, **kwargs)

    async def refund(self, charges: Sequence[Charge]) -> None:
        self.calls.append(("refund", False))
        await super().refund(charges)


class Overrides:
    """A time-boxed override source whose answer the test changes (a new dict, as the policy
    state's cache gives once it has read the table again)."""

    def __init__(self) -> None:
        self.current: dict[str, list[dict[str, Any]]] = {}

    async def active_overrides(self, login: str) -> dict[str, list[dict[str, Any]]]:
        return self.current


def check(rules: dict[str, Any] | None = None) -> tuple[RateLimit, RecordingStore, Overrides]:
    config = load_config(None, {"limits": {"rules": rules or {}}})
    store, overrides = RecordingStore(), Overrides()
    return RateLimit(config.limits, store, overrides), store, overrides


def transaction() -> Transaction:
    session = Session("192.0.2.10", 40000, "submission")
    session.identity = Identity(LOGIN, 1, owned=(LOGIN,))
    txn = Transaction(session=session, mail_from=LOGIN)
    txn.declared_size = 1000
    return txn


async def one_message(limit: RateLimit, rcpts: Sequence[str]) -> list[Any]:
    """MAIL, RCPT per recipient, end of data: the verdicts."""
    txn = transaction()
    verdicts = [await limit.evaluate(Stage.MAIL, txn, None)]
    for address in rcpts:
        rcpt = Recipient(address)
        txn.recipients.append(rcpt)
        verdict = await limit.evaluate(Stage.RCPT, txn, rcpt)
        if verdict.decisive:
            rcpt.status = RecipientStatus.REJECTED
        verdicts.append(verdict)
    txn.content = b"Subject: x\r\n\r\nhello\r\n"
    txn.size = len(txn.content)
    verdicts.append(await limit.evaluate(Stage.DATA, txn, None))
    await limit.finish(txn, True)
    return verdicts


async def test_one_store_call_per_stage_peek_then_charge() -> None:
    limit, store, _ = check()
    verdicts = await one_message(limit, ["a@example.net", "b@example.net"])
    assert verdicts == [CONTINUE] * 4
    # MAIL and each RCPT peek; end of data charges everything (GCRA and distinct) in one call
    assert store.calls == [("admit", True), ("admit", True), ("admit", True), ("admit", False)]
    distinct = await store.distinct("login-distinct-recipients:login:" + LOGIN, [], 86400.0)
    assert distinct.count_after == 2


async def test_distinct_counts_span_messages_and_known_recipients_pass() -> None:
    limit, store, _ = check(
        {"login-distinct-recipients": {"tiers": [{"limit": 2, "period": "1d"}]}}
    )
    assert await one_message(limit, ["a@example.net"]) == [CONTINUE] * 3
    # a second message to two new recipients: each fits alone at RCPT, not both at end of data
    txn = transaction()
    assert await limit.evaluate(Stage.MAIL, txn, None) is CONTINUE
    for address in ("b@example.net", "c@example.net"):
        rcpt = Recipient(address)
        txn.recipients.append(rcpt)
        verdict = await limit.evaluate(Stage.RCPT, txn, rcpt)
    assert verdict.action is Action.DEFER  # c would be the third distinct recipient
    txn.recipients[-1].status = RecipientStatus.REJECTED
    store.calls.clear()
    txn.recipients.append(Recipient("a@example.net"))  # a known one: b alone is new, it fits
    txn.size = 10
    assert await limit.evaluate(Stage.DATA, txn, None) is CONTINUE
    assert store.calls == [("admit", False)]
    usage = await store.usage(f"login-messages:login:{LOGIN}", limit.table.rules["login-messages"])
    assert usage[0].used == 2


async def test_distinct_refused_at_data_leaves_the_message_limits_uncharged() -> None:
    limit, store, _ = check(
        {"login-distinct-recipients": {"tiers": [{"limit": 1, "period": "1d"}]}}
    )
    txn = transaction()
    txn.recipients += [Recipient("a@example.net"), Recipient("b@example.net")]
    txn.content = b"x"
    txn.size = 1
    verdict = await limit.evaluate(Stage.DATA, txn, None)
    assert verdict.action is Action.DEFER
    assert verdict.reply is not None and verdict.reply.code == 451
    assert "login-distinct-recipients" in verdict.reason
    assert [c for c, _ in store.calls] == ["admit"]  # one call, nothing to refund
    tiers = limit.table.rules["login-messages"]
    assert [u.used for u in await store.usage(f"login-messages:login:{LOGIN}", tiers)] == [0] * 3


async def test_a_new_time_boxed_override_takes_effect_for_the_next_message() -> None:
    limit, _, overrides = check()
    assert await one_message(limit, ["a@example.net"]) == [CONTINUE] * 3
    overrides.current = {"login-messages": [{"limit": 1, "period": "1h"}]}  # used up already
    verdict = await limit.evaluate(Stage.MAIL, transaction(), None)
    assert verdict.action is Action.DEFER and "login-messages" in verdict.reason
