"""The queue runner end to end: real spool files, the real SQL store (SQLite and PostgreSQL), the
real UpstreamRelay and a real CaptureUpstream told to misbehave, the real DSN writer
(gateway.queue.dsn). Time is a manual clock shared by the store and the runner: schedules are
asserted exactly and retries happen by moving the clock, never by sleeping.

Invariant checked throughout: a queued recipient ends delivered exactly once, or bounced (one DSN
to the envelope sender), or dropped by rule -- never delivered twice, never silently lost.
"""

from __future__ import annotations

import email
import email.policy
import os
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

import gateway.queue.dsn as dsn
from gateway.db.engine import engine_for_url
from gateway.queue import (
    BOUNCED,
    CORRUPT,
    DELIVERED,
    DONE,
    DROPPED,
    PENDING,
    QUEUED,
    NewCopy,
    QueuedMessage,
    QueueRunner,
    RunnerSettings,
    Spool,
    SqlQueueStore,
)
from gateway.smtp.capture import CaptureUpstream, drop_mid_data, stall
from gateway.smtp.capture import reply as fault_reply
from tests.fixtures.upstream import RelayFactory, eventually, relay_config

T0 = datetime(2026, 12, 6, 10, 0, tzinfo=UTC)
SENDER = "alice@example.com"
LOGIN = "alice@example.com"
MESSAGE = (
    b"From: Alice <alice@example.com>\r\n"
    b"To: bob@example.net, carol@example.org\r\n"
    b"Subject: queued\r\n"
    b"Message-ID: <q-1@example.com>\r\n"
    b"\r\n"
    b"SECRET-BODY-MARKER caf\xc3\xa9\r\n"
    b".leading dot\r\n"
)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@dataclass
class Queue:
    """Everything one test needs: the store, spool, runner, upstream and the shared clock."""

    store: SqlQueueStore
    spool: Spool
    runner: QueueRunner
    upstream: CaptureUpstream
    clock: Clock
    owned: set[tuple[str | None, str]]

    async def put(
        self,
        *recipients: str,
        data: bytes = MESSAGE,
        mail_from: str = SENDER,
        login: str | None = LOGIN,
        lifetime: float | None = None,
    ) -> int:
        written = await self.spool.write_async(data)
        message_id = await self.store.enqueue(
            txn_id="s1.1",
            mail_from=mail_from,
            login=login,
            copies=[NewCopy(recipients, written.name, written.size, written.sha256)],
            smtputf8=False,
            body_8bitmime=True,
            message_id_header="<q-1@example.com>",
            lifetime=lifetime,
        )
        return message_id

    async def get(self, message_id: int) -> QueuedMessage:
        message = await self.store.get(message_id)
        assert message is not None
        return message

    async def states(self, message_id: int) -> dict[str, str]:
        message = await self.get(message_id)
        return {r.address: r.state for c in message.copies for r in c.recipients}

    async def bounces(self) -> list[QueuedMessage]:
        return [m for m in await self.store.list() if m.is_bounce]

    def spool_files(self) -> list[str]:
        return sorted(p.name for p in self.spool.directory.iterdir() if p.is_file())


def make_runner(
    store: SqlQueueStore,
    spool: Spool,
    relay: object,
    clock: Clock,
    owned: set[tuple[str | None, str]],
    **settings: object,
) -> QueueRunner:
    async def sender_owned(login: str | None, address: str) -> bool:
        return (login, address.lower()) in owned

    options: dict[str, object] = {
        "reporting_mta": "gw.mailward.test",
        "interval": 0.05,
        "batch": 10,
        "lease": 600.0,
        "retry_first": 300.0,
        "retry_max": 3600.0,
        "jitter": 0.2,
        "warn_after": 4 * 3600.0,
    }
    options.update(settings)
    return QueueRunner(
        store,
        spool,
        relay,  # type: ignore[arg-type]
        RunnerSettings(**options),  # type: ignore[arg-type]
        dsn,  # the real DSN writer, a module satisfying the Dsn protocol
        sender_owned,
        clock=clock,
        rng=random.Random(7),
    )


@pytest.fixture
async def queue(
    db_url: str, tmp_path: Path, upstream: CaptureUpstream, relay_factory: RelayFactory
) -> AsyncIterator[Queue]:
    clock = Clock()
    engine = engine_for_url(db_url, timeout=5.0)
    store = SqlQueueStore(engine, timeout=5.0, clock=clock)
    spool = Spool(tmp_path / "spool")
    spool.ensure()
    owned: set[tuple[str | None, str]] = {(LOGIN, SENDER)}
    relay = relay_factory(relay_config(upstream))
    runner = make_runner(store, spool, relay, clock, owned)
    try:
        yield Queue(store, spool, runner, upstream, clock, owned)
    finally:
        await runner.stop(grace=5)
        await store.close()
        await engine.dispose()


def parse(data: bytes) -> email.message.EmailMessage:
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, email.message.EmailMessage)
    return message


def delivery_status(data: bytes) -> str:
    """The message/delivery-status part of a DSN, as text."""
    report = parse(data)
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    raw = data.decode("utf-8", "replace")
    start = raw.index("Content-Type: message/delivery-status")
    return raw[start : raw.index("\r\n--", start)]


# --- delivery -------------------------------------------------------------------------------------


async def test_a_queued_message_is_delivered_exactly_once(queue: Queue) -> None:
    message_id = await queue.put("bob@example.net", "carol@example.org")
    assert len(queue.spool_files()) == 1

    assert await queue.runner.run_once() == 1
    (received,) = queue.upstream.messages
    assert received.mail_from == SENDER
    assert received.rcpt_tos == ("bob@example.net", "carol@example.org")
    assert received.data == MESSAGE  # exactly the spooled bytes
    assert "BODY=8BITMIME" in received.mail_options
    assert await queue.states(message_id) == {
        "bob@example.net": DELIVERED,
        "carol@example.org": DELIVERED,
    }
    message = await queue.get(message_id)
    (c,) = message.copies
    assert (c.state, c.attempts, c.claimed_by) == (DONE, 1, None)
    assert c.last_reply is not None and c.last_reply.startswith("250")
    assert queue.spool_files() == []  # a finished copy's file is removed

    queue.clock.advance(86400)
    assert await queue.runner.run_once() == 0
    assert len(queue.upstream.messages) == 1
    assert await queue.bounces() == []


async def test_4xx_is_retried_with_backoff_and_delivered_once(queue: Queue) -> None:
    message_id = await queue.put("bob@example.net")
    queue.upstream.inject("EOM", fault_reply("451 4.3.0 Try again later", times=2))

    await queue.runner.run_once()
    assert queue.upstream.messages == []
    first = (await queue.get(message_id)).copies[0]
    assert (first.state, first.attempts) == (QUEUED, 1)
    assert first.recipients[0].state == PENDING
    assert first.recipients[0].last_reply == "451 4.3.0 Try again later"
    assert first.next_attempt is not None
    delay = (first.next_attempt - queue.clock.now).total_seconds()
    assert 240 <= delay <= 360  # retry_first 5 min, +-20 %

    assert await queue.runner.run_once() == 0  # not due yet: nothing is tried early
    queue.clock.now = first.next_attempt
    await queue.runner.run_once()
    second = (await queue.get(message_id)).copies[0]
    assert second.attempts == 2 and second.next_attempt is not None
    delay = (second.next_attempt - queue.clock.now).total_seconds()
    assert 480 <= delay <= 720  # doubled

    queue.clock.now = second.next_attempt
    await queue.runner.run_once()
    assert len(queue.upstream.messages) == 1
    assert await queue.states(message_id) == {"bob@example.net": DELIVERED}
    assert await queue.bounces() == []


async def test_backoff_is_capped(queue: Queue) -> None:
    runner = queue.runner
    for attempts, low, high in ((1, 240, 360), (3, 960, 1440), (5, 2880, 4320), (30, 2880, 4320)):
        delays = [
            (runner._next_attempt(attempts, T0, T0 + timedelta(days=5)) - T0).total_seconds()
            for _ in range(50)
        ]
        assert all(low <= d <= high for d in delays), (attempts, min(delays), max(delays))
        assert len(set(delays)) > 1  # jittered


async def test_unreachable_upstream_and_dropped_data_are_retried(queue: Queue) -> None:
    message_id = await queue.put("bob@example.net")
    await queue.upstream.refuse()
    await queue.upstream.drop_connections()
    await queue.runner.run_once()
    copy = (await queue.get(message_id)).copies[0]
    assert copy.recipients[0].state == PENDING and copy.attempts == 1

    await queue.upstream.resume()
    queue.upstream.inject("DATA", drop_mid_data())
    assert copy.next_attempt is not None
    queue.clock.now = copy.next_attempt
    await queue.runner.run_once()
    copy = (await queue.get(message_id)).copies[0]
    assert copy.recipients[0].state == PENDING and copy.attempts == 2
    assert queue.upstream.messages == []

    assert copy.next_attempt is not None
    queue.clock.now = copy.next_attempt
    await queue.runner.run_once()
    assert len(queue.upstream.messages) == 1
    assert await queue.states(message_id) == {"bob@example.net": DELIVERED}


# --- bounces --------------------------------------------------------------------------------------


async def test_partial_failure_bounces_only_the_refused_recipient(queue: Queue) -> None:
    queue.upstream.fail_rcpt = {"bad@example.net": "550 5.1.1 No such user"}
    message_id = await queue.put("bob@example.net", "bad@example.net", "later@example.org")
    queue.upstream.inject(
        "RCPT", fault_reply("450 4.2.1 Mailbox busy", recipients={"later@example.org"})
    )
    await queue.runner.run_once()

    (received,) = queue.upstream.messages
    assert received.rcpt_tos == ("bob@example.net",)
    assert await queue.states(message_id) == {
        "bob@example.net": DELIVERED,
        "bad@example.net": BOUNCED,
        "later@example.org": PENDING,
    }
    (bounce,) = await queue.bounces()
    assert (bounce.mail_from, bounce.is_bounce) == ("", True)
    assert [r.address for c in bounce.copies for r in c.recipients] == [SENDER]

    # the DSN goes out with the null reverse-path; the retry only goes to the deferred one
    queue.clock.advance(3600)
    await queue.runner.run_once()
    assert len(queue.upstream.messages) == 3
    by_sender = {m.mail_from: m for m in queue.upstream.messages[1:]}
    dsn_received = by_sender[""]
    assert dsn_received.rcpt_tos == (SENDER,)
    status = delivery_status(dsn_received.data)
    assert "Final-Recipient: rfc822; bad@example.net" in status
    assert "Action: failed" in status and "Status: 5.1.1" in status
    assert "Diagnostic-Code: smtp; 550 5.1.1 No such user" in status
    assert "bob@example.net" not in status and "later@example.org" not in status
    assert b"SECRET-BODY-MARKER" not in dsn_received.data  # headers only
    assert b"Subject: queued" in dsn_received.data
    assert by_sender[SENDER].rcpt_tos == ("later@example.org",)
    assert await queue.states(message_id) == {
        "bob@example.net": DELIVERED,
        "bad@example.net": BOUNCED,
        "later@example.org": DELIVERED,
    }
    assert await queue.states(bounce.id) == {SENDER: DELIVERED}


async def test_5xx_at_data_bounces_every_accepted_recipient_once(queue: Queue) -> None:
    message_id = await queue.put("bob@example.net", "carol@example.org")
    queue.upstream.inject("EOM", fault_reply("554 5.7.1 Message rejected"))
    await queue.runner.run_once()
    assert queue.upstream.messages == []
    assert await queue.states(message_id) == {
        "bob@example.net": BOUNCED,
        "carol@example.org": BOUNCED,
    }
    assert len(await queue.bounces()) == 1
    await queue.runner.run_once()
    (received,) = queue.upstream.messages
    status = delivery_status(received.data)
    assert status.count("Action: failed") == 2 and "Status: 5.7.1" in status


async def test_lifetime_expiry_bounces_with_5_4_7(queue: Queue) -> None:
    message_id = await queue.put("bob@example.net", lifetime=3600)
    queue.upstream.inject("RCPT", fault_reply("451 4.4.1 Not now", times=None))
    await queue.runner.run_once()
    copy = (await queue.get(message_id)).copies[0]
    assert copy.recipients[0].state == PENDING and copy.next_attempt is not None
    attempts = 1
    while copy.recipients[0].state == PENDING:
        assert copy.next_attempt is not None
        assert copy.next_attempt <= T0 + timedelta(hours=1)  # never scheduled past expiry
        queue.clock.now = copy.next_attempt
        await queue.runner.run_once()
        attempts += 1
        copy = (await queue.get(message_id)).copies[0]
    assert queue.clock.now == T0 + timedelta(hours=1)  # the last attempt was at expiry
    (recipient,) = copy.recipients
    assert (recipient.state, recipient.status) == (BOUNCED, "5.4.7")
    assert copy.state == DONE and copy.attempts == attempts
    assert copy.last_reply is not None and "delivery time expired" in copy.last_reply

    queue.upstream.clear_faults()
    assert len(await queue.bounces()) == 1
    await queue.runner.run_once()
    (received,) = queue.upstream.messages
    assert received.mail_from == "" and received.rcpt_tos == (SENDER,)
    status = delivery_status(received.data)
    assert "Final-Recipient: rfc822; bob@example.net" in status and "Status: 5.4.7" in status


async def test_no_bounce_to_a_sender_the_login_does_not_own(queue: Queue) -> None:
    message_id = await queue.put("bad@example.net", mail_from="victim@elsewhere.example")
    queue.upstream.fail_rcpt = {"bad@example.net": "550 5.1.1 No such user"}
    await queue.runner.run_once()
    assert await queue.states(message_id) == {"bad@example.net": DROPPED}
    assert await queue.bounces() == []
    assert queue.spool_files() == []


async def test_a_failing_dsn_is_dropped_never_bounced(queue: Queue) -> None:
    queue.upstream.fail_rcpt = {"bad@example.net": "550 5.1.1 No such user"}
    message_id = await queue.put("bad@example.net", mail_from="bad@example.net", login=None)
    queue.owned.add((None, "bad@example.net"))
    await queue.runner.run_once()
    (bounce,) = await queue.bounces()
    await queue.runner.run_once()  # the DSN to bad@example.net fails with 550 too
    assert await queue.states(message_id) == {"bad@example.net": BOUNCED}
    assert await queue.states(bounce.id) == {"bad@example.net": DROPPED}
    assert len(await queue.bounces()) == 1  # no bounce for a bounce
    queue.clock.advance(86400)
    assert await queue.runner.run_once() == 0


async def test_warning_dsn_once_after_warn_after(queue: Queue) -> None:
    message_id = await queue.put("bob@example.net", "carol@example.org")
    queue.upstream.inject("RCPT", fault_reply("451 4.2.0 Later", times=None))
    await queue.runner.run_once()
    assert await queue.runner.send_warnings() == 0  # too early
    queue.clock.advance(4 * 3600 + 1)
    assert await queue.runner.send_warnings() == 1
    assert await queue.runner.send_warnings() == 0  # once per message
    (warning,) = await queue.bounces()
    assert (await queue.get(message_id)).warned_at == queue.clock.now
    queue.upstream.clear_faults()
    queue.clock.advance(1)
    await queue.runner.run_once()
    received = {m.mail_from: m for m in queue.upstream.messages}
    status = delivery_status(received[""].data)
    assert status.count("Action: delayed") == 2 and "Will-Retry-Until:" in status
    assert "Undelivered" not in parse(received[""].data)["Subject"]
    assert await queue.states(warning.id) == {SENDER: DELIVERED}


# --- integrity, recovery, lifecycle ---------------------------------------------------------------


async def test_a_corrupt_spool_file_is_quarantined_and_never_sent(queue: Queue) -> None:
    message_id = await queue.put("bob@example.net")
    (name,) = queue.spool_files()
    path = queue.spool.directory / name
    path.write_bytes(path.read_bytes()[:-5])  # a half-written file
    await queue.runner.run_once()
    assert queue.upstream.messages == []
    copy = (await queue.get(message_id)).copies[0]
    assert copy.state == CORRUPT and copy.recipients[0].state == PENDING
    assert queue.spool_files() == []
    assert (queue.spool.directory / "corrupt" / name).exists()
    queue.clock.advance(86400)
    assert await queue.runner.run_once() == 0


async def test_recover_quarantines_bad_files_and_deletes_old_orphans(queue: Queue) -> None:
    good = await queue.put("bob@example.net")
    bad = await queue.put("carol@example.org")
    bad_name = (await queue.get(bad)).copies[0].spool_name
    (queue.spool.directory / bad_name).write_bytes(b"MWSPOOL1 truncated")
    old_orphan = await queue.spool.write_async(b"never acknowledged")
    new_orphan = await queue.spool.write_async(b"being taken into custody right now")
    old = time.time() - 7200
    os.utime(queue.spool.directory / old_orphan.name, (old, old))

    recovery = await queue.runner.recover()
    bad_copy = (await queue.get(bad)).copies[0]
    assert recovery.corrupt == [bad_copy.id] and recovery.orphans_deleted == 1
    assert bad_copy.state == CORRUPT
    assert (queue.spool.directory / "corrupt" / bad_name).exists()
    good_name = (await queue.get(good)).copies[0].spool_name
    assert queue.spool_files() == sorted([good_name, new_orphan.name])

    await queue.runner.run_once()
    assert [m.rcpt_tos for m in queue.upstream.messages] == [("bob@example.net",)]


async def test_background_loop_wakes_and_stops(queue: Queue) -> None:
    queue.runner.start()
    assert queue.runner.running
    message_id = await queue.put("bob@example.net")
    queue.runner.wake()
    await eventually(lambda: len(queue.upstream.messages) == 1)
    await queue.runner.stop(grace=5)
    assert not queue.runner.running
    assert await queue.states(message_id) == {"bob@example.net": DELIVERED}


async def test_stop_lets_a_delivery_in_flight_finish_within_the_grace(queue: Queue) -> None:
    message_id = await queue.put("bob@example.net")
    queue.upstream.inject("EOM", stall(0.5))
    queue.runner.start()
    queue.runner.wake()
    await eventually(lambda: _in_data(queue.upstream))
    await queue.runner.stop(grace=30)
    assert len(queue.upstream.messages) == 1
    copy = (await queue.get(message_id)).copies[0]
    assert (copy.state, copy.attempts, copy.claimed_by) == (DONE, 1, None)


async def test_stop_abandons_a_stalled_delivery_without_half_state(
    queue: Queue, relay_factory: RelayFactory
) -> None:
    message_id = await queue.put("bob@example.net")
    queue.upstream.inject("EOM", stall(30))
    queue.runner.start()
    queue.runner.wake()
    await eventually(lambda: bool(queue.upstream.connections) and _in_data(queue.upstream))
    await queue.runner.stop(grace=0.2)
    copy = (await queue.get(message_id)).copies[0]
    assert (copy.state, copy.attempts) == (QUEUED, 0)  # nothing recorded
    assert copy.claimed_by == queue.runner.worker  # the claim expires by itself
    assert queue.upstream.messages == []

    # another runner (a restarted gateway) takes over once the lease has expired
    queue.upstream.clear_faults()
    other = make_runner(
        queue.store,
        queue.spool,
        relay_factory(relay_config(queue.upstream)),
        queue.clock,
        queue.owned,
    )
    assert await other.run_once() == 0
    queue.clock.advance(601)
    assert await other.run_once() == 1
    await eventually(lambda: len(queue.upstream.messages) == 1)
    assert await queue.states(message_id) == {"bob@example.net": DELIVERED}


def _in_data(upstream: CaptureUpstream) -> bool:
    return any("DATA" in c.commands for c in upstream.connections)


async def test_many_messages_each_delivered_once(queue: Queue) -> None:
    ids = [await queue.put(f"r{i}@example.net") for i in range(25)]
    queue.upstream.inject("EOM", fault_reply("451 4.3.0 busy", times=5))
    for _ in range(6):
        await queue.runner.run_once()
        queue.clock.advance(3600)
    got = sorted(m.rcpt_tos[0] for m in queue.upstream.messages)
    assert got == sorted(f"r{i}@example.net" for i in range(25))  # each exactly once
    for message_id in ids:
        assert set((await queue.states(message_id)).values()) == {DELIVERED}
