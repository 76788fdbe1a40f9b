"""The ordered-checks runner: order, first decisive verdict, modes, errors, soft_fail and records.

What it tests: :class:`gateway.pipeline.runner.Pipeline` with small fake checks written here (test
doubles of the ``Check`` protocol; the runner is the unit under test). Each fake records its calls
and returns a fixed verdict, raises, or sleeps past its timeout.

Reads: nothing.

Security notes: checks that an exception's text never reaches the client's reply nor the audited
reason (only the log), and that a failing check never lets the transaction through when
``on_error = "defer"``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Sequence

import pytest

from gateway.config.schema import CheckSettings
from gateway.core import replies
from gateway.core.model import (
    CONTINUE,
    Action,
    Mode,
    OnError,
    Recipient,
    Session,
    Stage,
    Transaction,
    Verdict,
    VerdictRecord,
)
from gateway.pipeline.runner import ConfiguredCheck, Pipeline

LEAK = "db-password=hunter2 at /srv/internal/path"
ALL_STAGES = frozenset({Stage.CONNECT, Stage.MAIL, Stage.RCPT, Stage.DATA})

REJECT = Verdict.reject(replies.SENDER_NOT_OWNED.format(address="a@b.example", login="u"), "nope")
REJECT_OTHER = Verdict.reject(replies.MESSAGE_TOO_BIG, "too big", measured="9", limit="5")
DEFER = Verdict.defer(replies.TOO_MANY_RECIPIENTS.format(limit=2), "many", measured="3", limit="2")


class FakeCheck:
    """A Check double: returns ``verdict``, or raises ``error``, after ``delay`` seconds."""

    def __init__(
        self,
        check_id: str,
        verdict: Verdict = CONTINUE,
        *,
        error: Exception | None = None,
        delay: float = 0.0,
        calls: list[str] | None = None,
        stages: frozenset[Stage] = ALL_STAGES,
    ) -> None:
        self.id = check_id
        self.stages = stages
        self.verdict = verdict
        self.error = error
        self.delay = delay
        self.calls = calls if calls is not None else []
        self.seen: list[tuple[Stage, Recipient | None]] = []

    async def evaluate(self, stage: Stage, txn: Transaction, rcpt: Recipient | None) -> Verdict:
        self.calls.append(self.id)
        self.seen.append((stage, rcpt))
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.error is not None:
            raise self.error
        return self.verdict


def configured(
    check: FakeCheck,
    mode: Mode = Mode.ENFORCE,
    *,
    timeout: float = 1.0,
    on_error: OnError = OnError.DEFER,
) -> ConfiguredCheck:
    return ConfiguredCheck(check, mode, timeout, on_error)


def pipeline(
    *checks: ConfiguredCheck, stage: Stage = Stage.MAIL, soft_fail: bool = False
) -> Pipeline:
    return Pipeline({stage: list(checks)}, soft_fail=soft_fail)


def transaction() -> Transaction:
    session = Session("192.0.2.10", 40000, "submission")
    return Transaction(session=session, mail_from="alice@example.com")


def only_record(txn: Transaction) -> VerdictRecord:
    assert len(txn.verdicts) == 1, txn.verdicts
    return txn.verdicts[0]


# --- order and the first decisive verdict ---------------------------------------------------------


async def test_checks_run_in_configured_order() -> None:
    calls: list[str] = []
    pipe = pipeline(*(configured(FakeCheck(i, calls=calls)) for i in ("c", "a", "b")))
    txn = transaction()
    assert await pipe.run(Stage.MAIL, txn) is CONTINUE
    assert calls == ["c", "a", "b"]
    assert txn.verdicts == []


@pytest.mark.parametrize("decisive", [REJECT, DEFER], ids=["reject", "defer"])
async def test_first_decisive_verdict_wins_and_later_checks_are_not_called(
    decisive: Verdict,
) -> None:
    calls: list[str] = []
    first = FakeCheck("first", calls=calls)
    second = FakeCheck("second", decisive, calls=calls)
    third = FakeCheck("third", REJECT_OTHER, calls=calls)
    txn = transaction()
    verdict = await pipeline(configured(first), configured(second), configured(third)).run(
        Stage.MAIL, txn
    )
    assert verdict == decisive
    assert calls == ["first", "second"]
    record = only_record(txn)
    assert (record.check_id, record.action, record.applied) == ("second", decisive.action, True)


async def test_only_the_stage_s_checks_run() -> None:
    calls: list[str] = []
    pipe = Pipeline(
        {
            Stage.MAIL: [configured(FakeCheck("at-mail", REJECT, calls=calls))],
            Stage.DATA: [configured(FakeCheck("at-data", calls=calls))],
        }
    )
    assert await pipe.run(Stage.DATA, transaction()) is CONTINUE
    assert await pipe.run(Stage.RCPT, transaction()) is CONTINUE
    assert calls == ["at-data"]


def test_a_check_cannot_be_placed_at_a_stage_it_does_not_support() -> None:
    check = FakeCheck("mail-only", stages=frozenset({Stage.MAIL}))
    with pytest.raises(ValueError, match="mail-only"):
        Pipeline({Stage.RCPT: [configured(check)]})


def test_configured_check_from_settings() -> None:
    settings = CheckSettings(mode="warn", timeout=2.5, on_error="continue")
    c = ConfiguredCheck.from_settings(FakeCheck("x"), settings)
    assert (c.id, c.mode, c.timeout, c.on_error) == ("x", Mode.WARN, 2.5, OnError.CONTINUE)


# --- modes ----------------------------------------------------------------------------------------


async def test_warn_mode_records_would_have_and_continues() -> None:
    calls: list[str] = []
    warned = FakeCheck("warned", REJECT, calls=calls)
    after = FakeCheck("after", calls=calls)
    txn = transaction()
    verdict = await pipeline(configured(warned, Mode.WARN), configured(after)).run(Stage.MAIL, txn)
    assert verdict is CONTINUE
    assert calls == ["warned", "after"]
    record = only_record(txn)
    assert record.applied is False
    assert record.mode is Mode.WARN
    assert record.action is Action.REJECT
    assert REJECT.reply is not None
    assert record.reply == REJECT.reply.line()


async def test_warn_then_enforce_records_both_and_applies_the_enforced_one() -> None:
    txn = transaction()
    verdict = await pipeline(
        configured(FakeCheck("warned", REJECT), Mode.WARN),
        configured(FakeCheck("enforced", REJECT_OTHER)),
    ).run(Stage.MAIL, txn)
    assert verdict == REJECT_OTHER
    assert [(r.check_id, r.applied) for r in txn.verdicts] == [
        ("warned", False),
        ("enforced", True),
    ]


async def test_off_mode_is_never_called_but_still_described() -> None:
    off = FakeCheck("off", REJECT, error=RuntimeError("must not run"))
    after = FakeCheck("after")
    pipe = pipeline(configured(off, Mode.OFF), configured(after))
    txn = transaction()
    assert await pipe.run(Stage.MAIL, txn) is CONTINUE
    assert off.calls == []
    assert after.calls == ["after"]
    assert txn.verdicts == []
    assert [c.id for c in pipe.describe()[Stage.MAIL]] == ["off", "after"]


# --- errors and timeouts --------------------------------------------------------------------------


async def test_timeout_with_on_error_defer_answers_451_naming_the_check() -> None:
    slow = FakeCheck("slow-check", delay=5.0)
    after = FakeCheck("after")
    txn = transaction()
    started = time.monotonic()
    verdict = await pipeline(configured(slow, timeout=0.05), configured(after)).run(Stage.MAIL, txn)
    assert time.monotonic() - started < 2.0  # the check was cut off, not awaited
    assert verdict.action is Action.DEFER
    assert verdict.reply is not None
    assert (verdict.reply.code, verdict.reply.status) == (451, "4.3.0")
    assert "slow-check" in verdict.reply.text
    assert after.calls == []
    record = only_record(txn)
    assert record.check_id == "slow-check"
    assert record.applied is True
    assert record.reply == verdict.reply.line()
    assert "timed out" in record.reason


async def test_timeout_with_on_error_continue_records_and_continues() -> None:
    slow = FakeCheck("slow-check", delay=5.0)
    after = FakeCheck("after")
    txn = transaction()
    verdict = await pipeline(
        configured(slow, timeout=0.05, on_error=OnError.CONTINUE), configured(after)
    ).run(Stage.MAIL, txn)
    assert verdict is CONTINUE
    assert after.calls == ["after"]
    record = only_record(txn)
    assert (record.check_id, record.action, record.applied) == ("slow-check", Action.DEFER, False)
    assert "timed out" in record.reason


@pytest.mark.parametrize(
    "error",
    [RuntimeError(LEAK), ValueError(LEAK), KeyError(LEAK), OSError(LEAK), TimeoutError(LEAK)],
    ids=lambda e: type(e).__name__,
)
async def test_an_exception_never_fails_open_nor_reaches_the_reply(
    error: Exception, caplog: pytest.LogCaptureFixture
) -> None:
    broken = FakeCheck("broken", error=error)
    after = FakeCheck("after")
    txn = transaction()
    with caplog.at_level(logging.ERROR, logger="mailward.pipeline"):
        verdict = await pipeline(configured(broken), configured(after)).run(Stage.MAIL, txn)
    assert verdict.action is Action.DEFER
    assert verdict.reply is not None
    assert verdict.reply.line() == "451 4.3.0 Temporary policy failure (broken), try again later"
    assert after.calls == []
    record = only_record(txn)
    assert "hunter2" not in record.reply + record.reason
    assert record.applied is True
    if not isinstance(error, TimeoutError):
        # the audited reason carries the incident id that leads to the full error in the log
        m = re.search(r"incident (\w+)", record.reason)
        assert m is not None, record.reason
        assert any(
            m.group(1) in r.getMessage() and "hunter2" in r.getMessage() for r in caplog.records
        )


async def test_an_exception_with_on_error_continue_is_recorded_not_applied() -> None:
    broken = FakeCheck("broken", error=RuntimeError(LEAK))
    after = FakeCheck("after", REJECT_OTHER)
    txn = transaction()
    verdict = await pipeline(configured(broken, on_error=OnError.CONTINUE), configured(after)).run(
        Stage.MAIL, txn
    )
    assert verdict == REJECT_OTHER  # the next check still decides
    assert [(r.check_id, r.action, r.applied) for r in txn.verdicts] == [
        ("broken", Action.DEFER, False),
        ("after", Action.REJECT, True),
    ]
    assert "hunter2" not in txn.verdicts[0].reason


async def test_an_exception_in_warn_mode_is_recorded_and_does_not_block() -> None:
    txn = transaction()
    verdict = await pipeline(
        configured(FakeCheck("broken", error=RuntimeError(LEAK)), Mode.WARN)
    ).run(Stage.MAIL, txn)
    assert verdict is CONTINUE
    record = only_record(txn)
    assert (record.mode, record.applied, record.action) == (Mode.WARN, False, Action.DEFER)


async def test_cancellation_is_not_swallowed() -> None:
    """A cancelled session must stop; the runner must not turn CancelledError into a verdict."""
    slow = FakeCheck("slow", delay=5.0)
    task = asyncio.ensure_future(
        pipeline(configured(slow, on_error=OnError.CONTINUE)).run(Stage.MAIL, transaction())
    )
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_an_exception_after_waiting_never_fails_open() -> None:
    broken = FakeCheck("broken", error=RuntimeError(LEAK), delay=0.01)
    txn = transaction()
    verdict = await pipeline(configured(broken)).run(Stage.MAIL, txn)
    assert verdict.action is Action.DEFER
    assert verdict.reply is not None and verdict.reply.code == 451
    assert "hunter2" not in only_record(txn).reason


async def test_checks_that_never_wait_run_without_turning_the_event_loop() -> None:
    """Checks that finish at once (most of them, every message) run within the caller's turn of
    the event loop: no task, no extra turn; warn-mode records still made."""
    turned: list[bool] = []
    asyncio.get_running_loop().call_soon(turned.append, True)
    calls: list[str] = []
    txn = transaction()
    verdict = await pipeline(
        configured(FakeCheck("a", calls=calls)),
        configured(FakeCheck("b", REJECT, calls=calls), Mode.WARN),
        configured(FakeCheck("c", calls=calls)),
    ).run(Stage.MAIL, txn)
    assert verdict is CONTINUE
    assert calls == ["a", "b", "c"]
    assert [r.check_id for r in txn.verdicts] == ["b"]
    assert turned == []


class BusyThenWaiting:
    """Works ``busy`` seconds without yielding, then waits ``wait`` seconds."""

    id = "busy"
    stages = ALL_STAGES

    def __init__(self, busy: float, wait: float) -> None:
        self.busy, self.wait = busy, wait

    async def evaluate(self, stage: Stage, txn: Transaction, rcpt: Recipient | None) -> Verdict:
        time.sleep(self.busy)  # e.g. CPU work before the first await
        await asyncio.sleep(self.wait)
        return CONTINUE


async def test_a_check_s_timeout_counts_from_its_start_not_from_its_first_wait() -> None:
    txn = transaction()
    check = ConfiguredCheck(BusyThenWaiting(0.15, 0.01), Mode.ENFORCE, 0.1, OnError.DEFER)
    verdict = await Pipeline({Stage.MAIL: [check]}).run(Stage.MAIL, txn)
    assert verdict.action is Action.DEFER
    assert "timed out" in only_record(txn).reason
    # within its timeout from the start, the same check passes
    relaxed = ConfiguredCheck(BusyThenWaiting(0.0, 0.01), Mode.ENFORCE, 5.0, OnError.DEFER)
    assert await Pipeline({Stage.MAIL: [relaxed]}).run(Stage.MAIL, transaction()) is CONTINUE


# --- soft_fail ------------------------------------------------------------------------------------


async def test_soft_fail_turns_5xx_into_4xx() -> None:
    txn = transaction()
    verdict = await pipeline(configured(FakeCheck("c", REJECT)), soft_fail=True).run(
        Stage.MAIL, txn
    )
    assert REJECT.reply is not None and verdict.reply is not None
    assert verdict.action is Action.DEFER
    assert (verdict.reply.code, verdict.reply.status) == (453, "4.7.1")
    assert verdict.reply.text == REJECT.reply.text
    record = only_record(txn)
    assert record.reply.startswith("453 4.7.1 ")
    assert record.action is Action.DEFER
    assert "soft_fail" in record.reason


@pytest.mark.parametrize("soft_fail", [False, True])
async def test_soft_fail_leaves_4xx_verdicts_alone(soft_fail: bool) -> None:
    verdict = await pipeline(configured(FakeCheck("c", DEFER)), soft_fail=soft_fail).run(
        Stage.MAIL, transaction()
    )
    assert verdict == DEFER


async def test_without_soft_fail_5xx_stays_5xx() -> None:
    verdict = await pipeline(configured(FakeCheck("c", REJECT))).run(Stage.MAIL, transaction())
    assert verdict == REJECT


# --- per recipient and the records ----------------------------------------------------------------


async def test_per_recipient_verdict_carries_the_recipient() -> None:
    check = FakeCheck("per-rcpt", DEFER)
    txn = transaction()
    rcpt = Recipient("bob@example.org")
    txn.recipients.append(rcpt)
    await pipeline(configured(check), stage=Stage.RCPT).run(Stage.RCPT, txn, rcpt)
    assert check.seen == [(Stage.RCPT, rcpt)]
    assert only_record(txn).recipient == "bob@example.org"


async def test_verdict_record_fields_are_filled() -> None:
    txn = transaction()
    rcpt = Recipient("carol@example.org")
    await pipeline(configured(FakeCheck("sizer", REJECT_OTHER)), stage=Stage.RCPT).run(
        Stage.RCPT, txn, rcpt
    )
    assert only_record(txn) == VerdictRecord(
        check_id="sizer",
        stage=Stage.RCPT,
        action=Action.REJECT,
        mode=Mode.ENFORCE,
        reply="552 5.3.4 Message size exceeds fixed maximum message size",
        reason="too big",
        recipient="carol@example.org",
        measured="9",
        limit="5",
        applied=True,
    )


async def test_records_accumulate_across_stages() -> None:
    txn = transaction()
    stages: dict[Stage, Sequence[ConfiguredCheck]] = {
        Stage.MAIL: [configured(FakeCheck("m", REJECT), Mode.WARN)],
        Stage.DATA: [configured(FakeCheck("d", REJECT_OTHER))],
    }
    pipe = Pipeline(stages)
    assert await pipe.run(Stage.MAIL, txn) is CONTINUE
    assert await pipe.run(Stage.DATA, txn) == REJECT_OTHER
    assert [(r.check_id, r.stage, r.recipient) for r in txn.verdicts] == [
        ("m", Stage.MAIL, None),
        ("d", Stage.DATA, None),
    ]


class MalformedCheck:
    """A buggy check: returns something that is not a usable verdict (after waiting, if asked)."""

    def __init__(self, result: object, wait: bool = False) -> None:
        self.id = "malformed"
        self.stages = ALL_STAGES
        self.result = result
        self.wait = wait

    async def evaluate(self, stage: Stage, txn: Transaction, rcpt: Recipient | None) -> Verdict:
        if self.wait:
            await asyncio.sleep(0)
        return self.result  # type: ignore[return-value]


@pytest.mark.parametrize("wait", [False, True], ids=["at-once", "after-waiting"])
@pytest.mark.parametrize(
    "result",
    [Verdict(Action.REJECT), Verdict(Action.DEFER), None],
    ids=["reject-without-reply", "defer-without-reply", "none"],
)
async def test_an_unusable_verdict_is_a_check_error(result: object, wait: bool) -> None:
    txn = transaction()
    check = ConfiguredCheck(MalformedCheck(result, wait), Mode.ENFORCE, 1.0, OnError.DEFER)
    verdict = await Pipeline({Stage.MAIL: [check]}).run(Stage.MAIL, txn)
    assert verdict.action is Action.DEFER
    assert verdict.reply is not None
    assert verdict.reply.line().startswith("451 4.3.0 ")
