"""``spam-score``: where the scan runs and that every place gives the same verdict.

With ``workers = 0``: small messages on the event loop, large ones in a thread. With workers (real
processes): every message in a worker, none in the gateway process; a worker killed or wedged past
the check's timeout answers 451 4.3.0 through the pipeline (never fail open), then a replacement
scans again; ``Pipeline.close()`` stops the workers, and a scan after it runs in a thread. Option
validation names the key."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from gateway.checks.spam_score import Options, SpamScore, load_engine, worker_count
from gateway.config.typed import build
from gateway.core import replies
from gateway.core.errors import ConfigError
from gateway.core.model import Action, Mode, OnError, Recipient, Session, Stage, Transaction
from gateway.pipeline.runner import ConfiguredCheck, Pipeline
from gateway.ratelimit.memory import MemoryLimitStore
from gateway.rules import RuleEngine
from gateway.rules.model import Result
from gateway.rules.workers import default_count

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
    options = Options(workers=0, inline_max_bytes=inline_max_bytes, fanout_recipients=0)
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


# --- worker processes ---------------------------------------------------------------------------

LIVENESS = 60.0
TEMPFAIL = replies.POLICY_TEMPFAIL.format(check="spam-score")


def observed_check(**options: Any) -> tuple[SpamScore, ObservedEngine]:
    opts = Options(fanout_recipients=0, **options)
    engine = ObservedEngine(load_engine(opts).ruleset)
    engine.threads = []
    return SpamScore(opts, engine, MemoryLimitStore()), engine


def pipeline(check: SpamScore, timeout: float = LIVENESS) -> Pipeline:
    configured = ConfiguredCheck(check, Mode.ENFORCE, timeout, OnError.DEFER)
    return Pipeline({Stage.DATA: [configured]})


def reaped(pid: int) -> bool:
    """The process is gone from /proc, or is no longer our child (its pid was reused)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[1] != str(os.getpid())


async def until(condition: Any) -> None:
    async with asyncio.timeout(LIVENESS):
        while not condition():
            await asyncio.sleep(0.02)


def test_workers_option_defaults_to_the_cpus_but_one_and_names_its_key() -> None:
    assert Options().workers == "auto"
    assert worker_count(Options()) == default_count() == max(1, len(os.sched_getaffinity(0)) - 1)
    assert worker_count(Options(workers=0)) == 0
    assert build(Options, {"workers": 3}, "test").workers == 3
    for bad in (-1, 1000, "many", 1.5):
        with pytest.raises(ConfigError) as caught:
            build(Options, {"workers": bad}, "site.toml", "checks.spam-score")
        assert caught.value.key == "checks.spam-score.workers"
    assert SpamScore(Options(workers=0), load_engine(Options()), MemoryLimitStore()).workers is None


@pytest.mark.parametrize("padding", [0, 40000])
async def test_with_workers_every_message_is_scanned_in_a_worker(padding: int) -> None:
    check, engine = observed_check(workers=1)
    try:
        body = b"x" * padding + b"\r\n" + GTUBE
        verdict = await check.evaluate(Stage.DATA, transaction(body), None)
        assert verdict.action is Action.REJECT and "GTUBE(1000)" in verdict.reason
        clean = await check.evaluate(Stage.DATA, transaction(b"See you at 3pm."), None)
        assert clean.action is Action.CONTINUE
        assert engine.threads == []  # nothing was scanned in the gateway process
        assert check.workers is not None and len(check.workers.pids) == 1
    finally:
        await check.close()


async def test_a_killed_worker_defers_then_a_replacement_scans() -> None:
    check, _ = observed_check(workers=1)
    pipe = pipeline(check)
    try:
        assert (await pipe.run(Stage.DATA, transaction(GTUBE))).action is Action.REJECT
        assert check.workers is not None
        (pid,) = check.workers.pids
        os.kill(pid, signal.SIGSTOP)  # hold the next scan in flight
        txn = transaction(GTUBE)
        run = asyncio.create_task(pipe.run(Stage.DATA, txn))
        await until(lambda: check.workers is not None and check.workers.inflight == 1)
        os.kill(pid, signal.SIGKILL)
        verdict = await run
        assert (verdict.action, verdict.reply) == (Action.DEFER, TEMPFAIL)  # 451 4.3.0
        assert verdict.reason.startswith("check error (incident ")
        again = await pipe.run(Stage.DATA, transaction(GTUBE))
        assert again.action is Action.REJECT
        assert check.workers.pids and pid not in check.workers.pids
        await until(lambda: reaped(pid))
    finally:
        await pipe.close()


async def test_a_scan_past_the_timeout_defers_and_its_worker_is_replaced() -> None:
    check, _ = observed_check(workers=1)
    pipe = pipeline(check, timeout=0.5)
    try:
        # the first scan waits for the worker to start: outside the short timeout
        assert (await check.evaluate(Stage.DATA, transaction(GTUBE), None)).action is Action.REJECT
        assert check.workers is not None
        (pid,) = check.workers.pids
        os.kill(pid, signal.SIGSTOP)  # a wedged worker
        verdict = await pipe.run(Stage.DATA, transaction(GTUBE))
        assert (verdict.action, verdict.reply) == (Action.DEFER, TEMPFAIL)
        assert verdict.reason == "check timed out after 0.5s"
        await until(lambda: reaped(pid))  # killed about a second later, then replaced
        async with asyncio.timeout(LIVENESS):  # the replacement starts
            assert (
                await check.evaluate(Stage.DATA, transaction(b"hi"), None)
            ).action is Action.CONTINUE
        assert (await pipe.run(Stage.DATA, transaction(GTUBE))).action is Action.REJECT
        assert pid not in check.workers.pids
    finally:
        await pipe.close()


async def test_pipeline_close_stops_the_workers_and_a_late_scan_runs_in_a_thread() -> None:
    check, engine = observed_check(workers=2)
    pipe = pipeline(check)
    assert (await pipe.run(Stage.DATA, transaction(GTUBE))).action is Action.REJECT
    assert check.workers is not None
    pids = check.workers.pids
    assert len(pids) == 2
    await pipe.close()
    assert check.workers.pids == []
    assert all(reaped(pid) for pid in pids)
    assert engine.threads == []
    # a transaction that began on a pipeline a reload retired still gets its scan, off the loop
    verdict = await pipe.run(Stage.DATA, transaction(GTUBE))
    assert verdict.action is Action.REJECT and "GTUBE(1000)" in verdict.reason
    assert len(engine.threads) == 1 and engine.threads[0] != threading.get_ident()
    assert check.workers.pids == []  # no worker was started again
    await pipe.close()  # idempotent
