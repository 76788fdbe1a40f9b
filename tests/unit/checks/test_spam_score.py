"""``spam-score``: where the scan runs — small messages on the event loop, large ones in a thread —
and that both give the same verdict."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from typing import Any

import pytest

from gateway.checks.spam_score import Options, SpamScore, load_engine
from gateway.core.model import Action, Recipient, Session, Stage, Transaction
from gateway.ratelimit.memory import MemoryLimitStore
from gateway.rules import RuleEngine
from gateway.rules.model import Result

GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


class ObservedEngine(RuleEngine):
    """The real engine; it also notes the thread each scan ran in."""

    threads: list[int]

    def scan(
        self,
        message: bytes,
        *,
        recipients: Sequence[str],
        login: str | None,
        with_fingerprint: bool = False,
    ) -> Result:
        self.threads.append(threading.get_ident())
        return super().scan(
            message, recipients=recipients, login=login, with_fingerprint=with_fingerprint
        )


def transaction(body: bytes) -> Transaction:
    txn = Transaction(session=Session("192.0.2.1", 2525, "test"), mail_from="alice@example.com")
    txn.recipients.append(Recipient("bob@example.net"))
    txn.content = (
        b"From: alice@example.com\r\nTo: bob@example.net\r\nSubject: hi\r\n\r\n" + body + b"\r\n"
    )
    txn.size = len(txn.content)
    return txn


@pytest.mark.parametrize(
    ("inline_max_bytes", "padding", "inline"),
    [(32768, 0, True), (32768, 40000, False), (0, 0, False)],
)
def test_small_messages_scan_on_the_loop_large_ones_in_a_thread(
    inline_max_bytes: int, padding: int, inline: bool
) -> None:
    options = Options(inline_max_bytes=inline_max_bytes, fanout_recipients=0)
    engine = ObservedEngine(load_engine(options).ruleset)
    engine.threads = []
    check = SpamScore(options, engine, MemoryLimitStore())
    body = b"x" * padding + b"\r\n" + GTUBE

    async def run() -> tuple[Any, int]:
        verdict = await check.evaluate(Stage.DATA, transaction(body), None)
        return verdict, threading.get_ident()

    verdict, loop_thread = asyncio.run(run())
    assert verdict.action is Action.REJECT  # the same verdict wherever the scan ran
    assert "GTUBE" in verdict.reason
    assert (engine.threads == [loop_thread]) is inline
    assert len(engine.threads) == 1
