"""Check ``recipient-limit``: at most ``max_recipients`` accepted recipients per message.

What it tests: the limit itself (the recipient that would exceed it gets 452 4.5.3 with the limit in
the text), that rejected recipients do not count, and the evidence recorded. Recipients are fed the
way ``gateway.service.Gateway.on_rcpt`` does it: the new recipient is appended to the transaction
(status ACCEPTED) before the pipeline runs, and marked REJECTED when refused.

Reads: nothing.

Security notes: none.
"""

from __future__ import annotations

import pytest

from gateway.checks import SPECS
from gateway.checks.recipient_limit import Options, RecipientLimit
from gateway.core import replies
from gateway.core.model import (
    CONTINUE,
    Action,
    Identity,
    Recipient,
    RecipientStatus,
    Session,
    Stage,
    Transaction,
    Verdict,
)


def transaction() -> Transaction:
    identity = Identity(login="alice", account_id=1, owned=("alice@example.com",))
    session = Session("192.0.2.30", 50000, "submission", identity=identity)
    return Transaction(session=session, mail_from="alice@example.com")


async def rcpt_to(check: RecipientLimit, txn: Transaction, address: str) -> Verdict:
    """One RCPT TO as the service runs it: append, evaluate, mark refused recipients."""
    rcpt = Recipient(address)
    txn.recipients.append(rcpt)
    verdict = await check.evaluate(Stage.RCPT, txn, rcpt)
    if verdict.decisive:
        rcpt.status = RecipientStatus.REJECTED
    return verdict


@pytest.mark.parametrize("limit", [1, 3, 100])
async def test_exactly_max_recipients_are_accepted_in_service_order(limit: int) -> None:
    """The recipient being evaluated is already in the list (status ACCEPTED): it must not count."""
    check = RecipientLimit(Options(max_recipients=limit))
    txn = transaction()
    verdicts = [await rcpt_to(check, txn, f"r{i}@example.org") for i in range(limit + 2)]
    assert verdicts[:limit] == [CONTINUE] * limit
    assert all(v.action is Action.DEFER for v in verdicts[limit:])
    assert len(txn.accepted) == limit


async def test_the_recipient_beyond_the_limit_gets_452() -> None:
    check = RecipientLimit(Options(max_recipients=2))
    txn = transaction()
    txn.recipients += [Recipient("a@example.org"), Recipient("b@example.org")]
    verdict = await check.evaluate(Stage.RCPT, txn, Recipient("c@example.org"))
    assert verdict.action is Action.DEFER
    assert verdict.reply == replies.TOO_MANY_RECIPIENTS.format(limit=2)
    assert verdict.reply.line() == "452 4.5.3 Too many recipients (limit 2)"
    assert (verdict.measured, verdict.limit) == ("3", "2")


async def test_under_the_limit_continues() -> None:
    check = RecipientLimit(Options(max_recipients=2))
    txn = transaction()
    txn.recipients.append(Recipient("a@example.org"))
    assert await check.evaluate(Stage.RCPT, txn, Recipient("b@example.org")) is CONTINUE


async def test_rejected_recipients_do_not_count() -> None:
    check = RecipientLimit(Options(max_recipients=2))
    txn = transaction()
    txn.recipients += [
        Recipient(f"refused{i}@example.org", RecipientStatus.REJECTED) for i in range(5)
    ]
    txn.recipients.append(Recipient("a@example.org"))
    assert await check.evaluate(Stage.RCPT, txn, Recipient("b@example.org")) is CONTINUE
    txn.recipients.append(Recipient("b@example.org"))
    verdict = await check.evaluate(Stage.RCPT, txn, Recipient("c@example.org"))
    assert verdict.action is Action.DEFER


async def test_every_recipient_after_the_limit_gets_452() -> None:
    """After a 452 the client may go on; each further RCPT is refused too, none is accepted."""
    check = RecipientLimit(Options(max_recipients=1))
    txn = transaction()
    txn.recipients.append(Recipient("a@example.org"))
    for address in ("b@example.org", "c@example.org"):
        verdict = await rcpt_to(check, txn, address)
        assert verdict.action is Action.DEFER
    assert [r.address for r in txn.accepted] == ["a@example.org"]


def test_spec_runs_at_rcpt_only_and_builds_from_options() -> None:
    spec = SPECS["recipient-limit"]
    assert spec.stages == frozenset({Stage.RCPT})
    check = spec.factory(Options(max_recipients=7), None)
    assert isinstance(check, RecipientLimit)
    assert check.limit == 7
