"""Spam-scan worker processes (``gateway.rules.workers``), with real processes.

What it tests: the rule set survives the trip to a worker; workers give exactly the in-process
engine's results (GTUBE, clean mail, the whole development corpus, MIME bounds, a message large
enough to need several writes), matched by id under concurrency; a worker killed with SIGKILL fails
its scans and is replaced; a scan past its caller's deadline gets its worker killed and replaced,
while a caller that merely gives up costs no restart; ``close()`` and a ScanWorkers dropped without
``close()`` leave no child process (checked in ``/proc``).

Reads: ``tests/data/corpus``.

Security notes: a worker is stopped with SIGSTOP to hold a scan in flight (a wedged worker, without
test hooks in the product code); only processes these tests started are signalled.
"""

from __future__ import annotations

import asyncio
import gc
import multiprocessing
import os
import signal
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from gateway.checks.spam_score import Options, load_engine
from gateway.core.errors import CheckFailed
from gateway.rules import MessageTooComplex, Result, RuleEngine, RuleSet
from gateway.rules.workers import ScanWorkers, dump_ruleset, load_ruleset

CORPUS = Path(__file__).resolve().parents[2] / "data" / "corpus"
GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
RCPTS = ["bob@example.net", "carol@example.org"]
LIVENESS = 60.0  # generous bound for anything that involves starting a process


def message(body: bytes, subject: bytes = b"hi") -> bytes:
    return (
        b"From: alice@example.com\r\nTo: bob@example.net\r\nSubject: " + subject + b"\r\n"
        b"Date: Thu, 26 Nov 2026 10:00:00 +0000\r\nMessage-ID: <w1@example.com>\r\n\r\n"
        + body
        + b"\r\n"
    )


CLEAN = message(b"Meeting moved to 3pm, see you there.\r\nAlice")
SPAM = message(GTUBE)


@pytest.fixture(scope="module")
def engine() -> RuleEngine:
    return load_engine(Options())


@pytest.fixture
async def workers(engine: RuleEngine) -> AsyncIterator[ScanWorkers]:
    pool = ScanWorkers(engine.ruleset, 1, abandon_grace=0.2)
    try:
        yield pool
    finally:
        await pool.close(grace=1.0)


def corpus() -> Iterator[Path]:
    for kind in ("spam", "ham"):
        yield from sorted((CORPUS / kind).glob("*.eml"))


def in_process(engine: RuleEngine, data: bytes, login: str | None = "alice") -> Result | str:
    try:
        return engine.scan(data, recipients=RCPTS, login=login, with_fingerprint=True)
    except MessageTooComplex as exc:
        return f"too complex: {exc.reason}"


async def in_worker(pool: ScanWorkers, data: bytes, login: str | None = "alice") -> Result | str:
    try:
        return await pool.scan(data, recipients=RCPTS, login=login, with_fingerprint=True)
    except MessageTooComplex as exc:
        return f"too complex: {exc.reason}"


def proc_children() -> dict[int, tuple[str, bytes]]:
    """This process's children from /proc: pid → (state, command line); zombies included."""
    me = str(os.getpid())
    found: dict[int, tuple[str, bytes]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if fields[1] == me:
            found[int(entry.name)] = (fields[0], cmdline)
    return found


def spawned_workers() -> set[int]:
    """Children running a multiprocessing spawn worker, or dead and not reaped (zombies)."""
    return {
        pid
        for pid, (state, cmdline) in proc_children().items()
        if b"spawn_main" in cmdline or state == "Z"
    }


async def until(condition: Callable[[], bool], what: str) -> None:
    """Poll ``condition()`` until ``what`` holds (a liveness bound, not a timing assertion)."""
    async with asyncio.timeout(LIVENESS):
        while not condition():
            await asyncio.sleep(0.02)


def test_the_rule_set_survives_the_trip_to_a_worker(engine: RuleEngine) -> None:
    copy = load_ruleset(dump_ruleset(engine.ruleset))
    assert isinstance(copy, RuleSet)
    assert copy == engine.ruleset  # compiled regexes included, the lowered twins rebuilt
    lowered = [r for r in copy.rules if getattr(getattr(r.matcher, "pattern", None), "lowered", 0)]
    assert lowered, "the shipped rules have case-insensitive regexes with lowered twins"


async def test_workers_give_the_in_process_results(
    engine: RuleEngine, workers: ScanWorkers
) -> None:
    samples = [CLEAN, SPAM, *(p.read_bytes() for p in corpus())]
    deep = "".join(
        f"Content-Type: multipart/mixed; boundary=b{i}\r\n\r\n--b{i}\r\n" for i in range(40)
    )
    samples.append(b"Subject: deep\r\n" + deep.encode() + b"x\r\n")
    assert len(samples) > 200
    got = [await in_worker(workers, data) for data in samples]
    assert got == [in_process(engine, data) for data in samples]
    assert isinstance(got[1], Result) and "GTUBE" in got[1].symbol_ids
    assert isinstance(got[0], Result) and got[0].fingerprint
    assert got[-1] == "too complex: MIME nesting deeper than 20"
    assert await in_worker(workers, CLEAN, login=None) == in_process(engine, CLEAN, login=None)


async def test_concurrent_scans_are_matched_to_their_messages(engine: RuleEngine) -> None:
    pool = ScanWorkers(engine.ruleset, 2, max_inflight=3)
    try:
        samples = [SPAM if i % 3 == 0 else message(f"note number {i}".encode()) for i in range(60)]
        got = await asyncio.gather(*(in_worker(pool, data) for data in samples))
        assert list(got) == [in_process(engine, data) for data in samples]
        assert len(pool.pids) == 2
    finally:
        await pool.close()


async def test_scans_waiting_for_a_slot_may_give_up_without_harm(engine: RuleEngine) -> None:
    pool = ScanWorkers(engine.ruleset, 1, max_inflight=1, abandon_grace=LIVENESS)
    try:
        assert isinstance(await in_worker(pool, CLEAN), Result)
        (pid,) = pool.pids
        os.kill(pid, signal.SIGSTOP)  # the worker's one slot stays taken
        samples = [SPAM if i % 2 else message(f"note {i}".encode()) for i in range(12)]
        tasks = [asyncio.create_task(in_worker(pool, data)) for data in samples]
        await until(lambda: pool.inflight == 1, "one scan in flight, the others wait")
        for task in tasks[1::3]:
            task.cancel()  # their callers give up while waiting for a slot
        os.kill(pid, signal.SIGCONT)
        done = await asyncio.gather(*tasks, return_exceptions=True)
        for i, (data, got) in enumerate(zip(samples, done, strict=True)):
            if i % 3 == 1:
                assert isinstance(got, asyncio.CancelledError)
            else:
                assert got == in_process(engine, data)
        assert pool.pids == [pid] and pool.inflight == 0
    finally:
        await pool.close()


async def test_a_large_message_is_written_in_pieces(
    engine: RuleEngine, workers: ScanWorkers
) -> None:
    big = message(b"a line of an attachment-sized body, repeated\r\n" * 200_000 + GTUBE)
    assert len(big) > 8 * 1024 * 1024  # far beyond a socket buffer: written as it drains
    assert await in_worker(workers, big) == in_process(engine, big)


async def test_a_killed_worker_fails_its_scans_and_is_replaced(workers: ScanWorkers) -> None:
    assert isinstance(await in_worker(workers, CLEAN), Result)
    (pid,) = workers.pids
    os.kill(pid, signal.SIGSTOP)  # hold the next scan in flight
    scan = asyncio.create_task(in_worker(workers, SPAM))
    await until(lambda: workers.inflight == 1, "the scan is in flight")
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(CheckFailed, match="exited unexpectedly"):
        await scan
    async with asyncio.timeout(LIVENESS):
        result = await in_worker(workers, SPAM)  # waits for the replacement
    assert isinstance(result, Result) and "GTUBE" in result.symbol_ids
    assert workers.pids and pid not in workers.pids
    await until(lambda: pid not in proc_children(), "the killed worker is reaped")


async def test_a_scan_past_its_deadline_gets_its_worker_replaced(workers: ScanWorkers) -> None:
    assert isinstance(await in_worker(workers, CLEAN), Result)
    (pid,) = workers.pids
    os.kill(pid, signal.SIGSTOP)  # a wedged worker: it never answers
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.3):  # the pipeline's timeout, as the check sees it
            await in_worker(workers, SPAM)
    # abandon_grace later the worker is killed (even stopped) and replaced
    await until(lambda: pid not in proc_children(), "the wedged worker is killed and reaped")
    async with asyncio.timeout(LIVENESS):
        result = await in_worker(workers, SPAM)
    assert isinstance(result, Result) and "GTUBE" in result.symbol_ids
    assert pid not in workers.pids


async def test_a_caller_that_gives_up_costs_no_restart(engine: RuleEngine) -> None:
    pool = ScanWorkers(engine.ruleset, 1, abandon_grace=LIVENESS)
    try:
        assert isinstance(await in_worker(pool, CLEAN), Result)
        (pid,) = pool.pids
        os.kill(pid, signal.SIGSTOP)
        scan = asyncio.create_task(in_worker(pool, SPAM))
        await until(lambda: pool.inflight == 1, "the scan is in flight")
        scan.cancel()  # e.g. the client hung up during the scan
        with pytest.raises(asyncio.CancelledError):
            await scan
        os.kill(pid, signal.SIGCONT)  # the worker finishes well within its grace
        await until(lambda: pool.inflight == 0, "the abandoned answer is read and dropped")
        assert await in_worker(pool, SPAM) == in_process(engine, SPAM)
        assert pool.pids == [pid]
    finally:
        await pool.close()


async def test_close_leaves_no_child_process(engine: RuleEngine) -> None:
    before = spawned_workers()
    pool = ScanWorkers(engine.ruleset, 2)
    assert pool.pids == []  # nothing starts before the first scan
    assert isinstance(await in_worker(pool, CLEAN), Result)
    pids = set(pool.pids)
    assert len(pids) == 2 and pids <= spawned_workers()
    await pool.close()
    assert pool.pids == []
    assert not pids & {p.pid for p in multiprocessing.active_children()}
    assert not pids & set(proc_children())  # exited and reaped, no zombie
    assert spawned_workers() <= before
    with pytest.raises(CheckFailed, match="closed"):
        await in_worker(pool, CLEAN)
    await pool.close()  # idempotent


def test_workers_dropped_without_close_are_cleaned_up(engine: RuleEngine) -> None:
    before = spawned_workers()
    pool = ScanWorkers(engine.ruleset, 1)

    async def scan_once(workers: ScanWorkers) -> list[int]:
        assert isinstance(await in_worker(workers, SPAM), Result)
        return workers.pids

    pids = set(asyncio.run(scan_once(pool)))  # the loop is closed, close() never called
    assert pids <= spawned_workers()
    del pool
    gc.collect()
    assert not pids & set(proc_children())
    assert spawned_workers() <= before
