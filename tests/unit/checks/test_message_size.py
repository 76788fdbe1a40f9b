"""Check ``message-size``: declared SIZE= at MAIL, actual size at end of data, under the ceiling.

What it tests: the limit (equal passes, one byte more is 552 5.3.4), that MAIL judges the declared
size and DATA the received size, the evidence recorded, and how ``max_size`` combines with the
protocol ceiling ``smtp.max_message_size`` (0 means the ceiling; never above it).

Reads: nothing.

Security notes: none.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from gateway.checks import SPECS
from gateway.checks.message_size import MessageSize, Options
from gateway.config.schema import Config, SmtpConfig
from gateway.core import replies
from gateway.core.model import CONTINUE, Action, Identity, Session, Stage, Transaction

CEILING = 10_000


def transaction(declared: int | None = None, size: int | None = None) -> Transaction:
    identity = Identity(login="alice", account_id=1, owned=("alice@example.com",))
    session = Session("192.0.2.40", 50000, "submission", identity=identity)
    txn = Transaction(session=session, mail_from="alice@example.com", declared_size=declared)
    txn.size = size
    return txn


@pytest.mark.parametrize(
    ("max_size", "limit"),
    [(0, CEILING), (5_000, 5_000), (CEILING, CEILING), (CEILING + 1, CEILING), (10**12, CEILING)],
)
def test_limit_is_max_size_capped_by_the_ceiling(max_size: int, limit: int) -> None:
    assert MessageSize(Options(max_size=max_size), CEILING).limit == limit


async def test_declared_size_at_mail() -> None:
    check = MessageSize(Options(max_size=1000), CEILING)
    assert await check.evaluate(Stage.MAIL, transaction(declared=1000), None) is CONTINUE
    verdict = await check.evaluate(Stage.MAIL, transaction(declared=1001), None)
    assert verdict.action is Action.REJECT
    assert verdict.reply is replies.MESSAGE_TOO_BIG
    assert verdict.reply.line() == "552 5.3.4 Message size exceeds fixed maximum message size"
    assert (verdict.measured, verdict.limit) == ("1001", "1000")
    assert "declared" in verdict.reason


async def test_no_declared_size_passes_at_mail() -> None:
    check = MessageSize(Options(max_size=1000), CEILING)
    assert await check.evaluate(Stage.MAIL, transaction(declared=None), None) is CONTINUE


async def test_actual_size_at_end_of_data() -> None:
    check = MessageSize(Options(max_size=1000), CEILING)
    assert await check.evaluate(Stage.DATA, transaction(size=1000), None) is CONTINUE
    verdict = await check.evaluate(Stage.DATA, transaction(size=1001), None)
    assert verdict.action is Action.REJECT
    assert verdict.reply is replies.MESSAGE_TOO_BIG
    assert (verdict.measured, verdict.limit) == ("1001", "1000")


async def test_data_judges_the_received_size_not_the_declared_one() -> None:
    check = MessageSize(Options(max_size=1000), CEILING)
    # declared small, sent big: refused at end of data
    lied = await check.evaluate(Stage.DATA, transaction(declared=10, size=5000), None)
    assert lied.action is Action.REJECT
    assert lied.measured == "5000"
    # declared big (already judged at MAIL), sent small: not refused again at end of data
    assert await check.evaluate(Stage.DATA, transaction(declared=5000, size=10), None) is CONTINUE


async def test_ceiling_applies_when_max_size_is_zero() -> None:
    check = MessageSize(Options(max_size=0), CEILING)
    assert await check.evaluate(Stage.DATA, transaction(size=CEILING), None) is CONTINUE
    verdict = await check.evaluate(Stage.DATA, transaction(size=CEILING + 1), None)
    assert verdict.action is Action.REJECT
    assert verdict.limit == str(CEILING)


async def test_max_size_above_the_ceiling_cannot_raise_it() -> None:
    check = MessageSize(Options(max_size=CEILING * 10), CEILING)
    verdict = await check.evaluate(Stage.MAIL, transaction(declared=CEILING + 1), None)
    assert verdict.action is Action.REJECT


def test_spec_uses_the_configured_ceiling() -> None:
    spec = SPECS["message-size"]
    assert spec.stages == frozenset({Stage.MAIL, Stage.DATA})
    config = Config(smtp=SmtpConfig(max_message_size=4096))
    check = spec.factory(Options(max_size=0), SimpleNamespace(config=config))
    assert isinstance(check, MessageSize)
    assert check.limit == 4096
