"""Custody through the durable queue, end to end: the real gateway, real clients, a real upstream
told to misbehave (``gateway.smtp.capture``), the real spool, queue store and runner, on SQLite and
PostgreSQL.

What it tests: for every fault -- upstream refused, blackholed, 421 at the banner, 4xx/5xx at MAIL,
RCPT, DATA and the end of data, a connection dropped in the middle of DATA or at its end, a very slow
end of data, partial results across recipients and across the copies of a (test-only) two-copy
delivery plan, a queue that cannot take custody, a disk nearly full -- in both modes of
``queue.on_upstream_tempfail``, the client's answer, the audit record, and the custody invariant
once the upstream is healthy again and the queue has been run (:func:`check_invariant`):

* every message answered 250 ends delivered **exactly once** to each recipient the client got a
  250 for, or **bounced**: a DSN reached the upstream, with the null reverse-path, addressed to the
  sender, naming the recipient and the original's Message-ID;
* every message answered 4xx/5xx is never delivered later (the one documented exception, a queue
  that fails after a partial delivery, is asserted on its own: a duplicate, never a loss).

Reads: nothing outside the test's temporary directory and databases.

Security notes: none (test code).
"""

from __future__ import annotations

import dataclasses
import email
import email.policy
import re
import shutil
import smtplib
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from email.parser import HeaderParser
from typing import Any

import pytest

from gateway.core.message import Headers
from gateway.core.model import DeliveryCopy, Transaction
from gateway.queue import DONE, QUEUED
from gateway.smtp import capture
from tests.fixtures.gateway import ALICE, RunningGateway

BOB = "bob@example.net"
CAROL = "carol@example.org"
MODES = ["queue", "defer"]

MakeGateway = Callable[..., RunningGateway]


def custody_gateway(
    make_gateway: MakeGateway, mode: str, *, relay: dict[str, Any] | None = None, **queue: Any
) -> RunningGateway:
    """A gateway in ``mode`` whose runner acts only when woken or driven by the test."""
    overrides: dict[str, Any] = {
        "queue": {"on_upstream_tempfail": mode, "runner_interval": "1h", **queue},
        # short upstream timeouts: a blackholed or stalled upstream costs a second, not minutes
        "relay": {"connect_timeout": 1.0, "command_timeout": 1.5, "data_timeout": 1.5},
    }
    overrides["relay"].update(relay or {})
    return make_gateway(overrides)


# --- one client transaction ---------------------------------------------------------------------


@dataclass
class Attempt:
    """What the client sent and heard."""

    message_id: str
    mail: tuple[int, str] = (0, "")
    rcpt: dict[str, tuple[int, str]] = field(default_factory=dict)
    data: tuple[int, str] | None = None

    @property
    def accepted(self) -> bool:
        return self.data is not None and self.data[0] == 250

    @property
    def rcpt_ok(self) -> list[str]:
        return [r for r, (code, _) in self.rcpt.items() if code == 250]

    @property
    def final(self) -> str:
        """The reply that decided the message for the client."""
        if self.data is not None:
            return f"{self.data[0]} {self.data[1]}"
        if self.rcpt:
            code, text = next(iter(self.rcpt.values()))
            return f"{code} {text}"
        return f"{self.mail[0]} {self.mail[1]}"

    @property
    def queue_id(self) -> int:
        found = re.search(r"queued as (\d+) \(transaction", self.final)
        assert found, f"not a queued reply: {self.final}"
        return int(found.group(1))


def message(message_id: str, recipients: Sequence[str]) -> bytes:
    return (
        f"From: Alice <{ALICE}>\r\n"
        f"To: {', '.join(recipients)}\r\n"
        f"Subject: custody test\r\n"
        f"Message-ID: {message_id}\r\n"
        "\r\n"
        "hello through the queue\r\n"
    ).encode()


def send(
    gw: RunningGateway,
    recipients: Sequence[str],
    *,
    sender: str = ALICE,
    message_id: str | None = None,
) -> Attempt:
    attempt = Attempt(message_id or f"<{uuid.uuid4().hex}@custody.test>")
    with gw.smtp() as client:
        code, text = client.mail(sender)
        attempt.mail = (code, text.decode())
        if code != 250:
            return attempt
        for rcpt in recipients:
            code, text = client.rcpt(rcpt)
            attempt.rcpt[rcpt] = (code, text.decode())
        if not attempt.rcpt_ok:
            client.rset()
            return attempt
        try:
            code, text = client.data(message(attempt.message_id, recipients))
        except smtplib.SMTPDataError as exc:  # refused at DATA (before the 354)
            code, error = exc.smtp_code, exc.smtp_error
            text = error if isinstance(error, bytes) else error.encode()
        attempt.data = (code, text.decode())
    return attempt


# --- what reached the upstream ------------------------------------------------------------------


def deliveries(gw: RunningGateway) -> Counter[tuple[str, str]]:
    """(Message-ID, recipient) -> how many times the upstream accepted it (DSNs excluded)."""
    counts: Counter[tuple[str, str]] = Counter()
    for received in gw.upstream.messages:
        if received.mail_from == "":
            continue
        message_id = Headers(received.data).message_id or ""
        for rcpt in received.rcpt_tos:
            counts[(message_id, rcpt)] += 1
    return counts


@dataclass(frozen=True)
class Bounce:
    original_message_id: str
    recipients: tuple[str, ...]
    action: str


def bounces(gw: RunningGateway) -> list[Bounce]:
    """The DSNs the upstream received; each checked to be a bounce: null reverse-path, to the
    sender, RFC 3464 report with the original's header section."""
    found = []
    for received in gw.upstream.messages:
        if received.mail_from != "":
            continue
        assert received.rcpt_tos == (ALICE,)
        report = email.message_from_bytes(received.data, policy=email.policy.default)
        assert report.get_content_type() == "multipart/report"
        assert report["Auto-Submitted"] == "auto-replied"
        raw = received.data.decode("utf-8", "replace")
        recipients = tuple(re.findall(r"^Final-Recipient: rfc822; (\S+)\r$", raw, re.M))
        actions = set(re.findall(r"^Action: (\w+)\r$", raw, re.M))
        headers = next(p for p in report.walk() if p.get_content_type() == "text/rfc822-headers")
        payload = headers.get_payload(decode=True)
        assert isinstance(payload, bytes)
        original = HeaderParser().parsestr(payload.decode())
        assert len(actions) == 1
        found.append(Bounce(original["Message-ID"], recipients, actions.pop()))
    return found


def check_invariant(gw: RunningGateway, attempts: Sequence[Attempt]) -> None:
    """Run the queue dry, then: each 250 ended delivered exactly once or bounced, per recipient
    the client got a 250 for; each 4xx/5xx (and each recipient refused at RCPT) never got it."""
    gw.drain_queue()
    got = deliveries(gw)
    bounced: Counter[tuple[str, str]] = Counter()
    for bounce in bounces(gw):
        if bounce.action == "failed":
            for rcpt in bounce.recipients:
                bounced[(bounce.original_message_id, rcpt)] += 1
    for attempt in attempts:
        for rcpt in attempt.rcpt:
            key = (attempt.message_id, rcpt)
            if attempt.accepted and rcpt in attempt.rcpt_ok:
                assert (got[key], bounced[key]) in ((1, 0), (0, 1)), (attempt, got, bounced)
            else:
                assert (got[key], bounced[key]) == (0, 0), (attempt, got, bounced)
    assert not gw.queued(QUEUED)


# --- audit --------------------------------------------------------------------------------------


def record_of(gw: RunningGateway, attempt: Attempt) -> Any:
    """The message audit record of ``attempt`` (the last one when it never reached DATA)."""
    records = [r for r in gw.records() if r.kind == "message"]
    mine = [r for r in records if r.message_id == attempt.message_id]
    chosen = mine or records
    assert chosen, "no message audit record"
    return chosen[-1]


def statuses(record: Any) -> dict[str, str]:
    return {r.address: r.status for r in record.recipients}


def queue_events(gw: RunningGateway, queue_id: int) -> list[Any]:
    return [r for r in gw.records() if r.kind.startswith("queue-") and r.queue_id == str(queue_id)]


# --- whole-message temporary failures -----------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    """A temporary failure of the whole message: how to cause it and how to heal it."""

    name: str
    cause: Callable[[RunningGateway], None]
    heal: Callable[[RunningGateway], None]
    #: what the client hears with on_upstream_tempfail = "defer"
    deferred: str
    #: where: "rcpt" (proxied at RCPT time) or "data" (the end of data)
    stage: str


def _inject(command: capture.Command, fault: capture.Fault) -> Callable[[RunningGateway], None]:
    return lambda gw: gw.upstream.inject(command, fault)


def _clear(gw: RunningGateway) -> None:
    gw.upstream.clear_faults()


def _set_blackhole(on: bool) -> Callable[[RunningGateway], None]:
    def apply(gw: RunningGateway) -> None:
        gw.upstream.blackhole = on
        if not on:
            gw.upstream_handle.drop_connections()

    return apply


TEMPORARY_FAULTS = [
    Fault(
        "refused",
        lambda gw: gw.upstream_handle.refuse(),
        lambda gw: gw.upstream_handle.resume(),
        "451 4.4.1",
        "rcpt",
    ),
    Fault("blackholed", _set_blackhole(True), _set_blackhole(False), "451 4.4.", "rcpt"),
    Fault(
        "421-banner",
        _inject("BANNER", capture.reply("421 4.3.2 Not now", times=None)),
        _clear,
        "451 4.4.1",
        "rcpt",
    ),
    Fault(
        "4xx-mail", _inject("MAIL", capture.reply("451 4.3.0 Busy")), _clear, "451 4.4.3", "rcpt"
    ),
    Fault(
        "4xx-rcpt", _inject("RCPT", capture.reply("450 4.2.1 Later")), _clear, "451 4.4.3", "rcpt"
    ),
    Fault(
        "4xx-data", _inject("DATA", capture.reply("451 4.3.0 Busy")), _clear, "451 4.4.3", "data"
    ),
    Fault("4xx-eom", _inject("EOM", capture.reply("452 4.3.1 Full")), _clear, "451 4.4.3", "data"),
    Fault("drop-mid-data", _inject("DATA", capture.drop_mid_data()), _clear, "451 4.4.2", "data"),
    Fault("drop-at-eom", _inject("EOM", capture.drop()), _clear, "451 4.4.2", "data"),
    Fault("slow-eom", _inject("EOM", capture.stall(4)), _clear, "451 4.4.2", "data"),
]


@pytest.mark.parametrize("fault", TEMPORARY_FAULTS, ids=[f.name for f in TEMPORARY_FAULTS])
def test_temporary_failure_is_queued_then_delivered_once(
    make_gateway: MakeGateway, fault: Fault
) -> None:
    gw = custody_gateway(make_gateway, "queue")
    fault.cause(gw)
    attempt = send(gw, [BOB])
    fault.heal(gw)
    assert attempt.rcpt[BOB][0] == 250  # accepted locally when the upstream could not say
    assert attempt.accepted, attempt
    assert attempt.final.startswith("250 2.0.0 Ok: queued as ")
    queue_id = attempt.queue_id
    assert deliveries(gw)[(attempt.message_id, BOB)] == 0  # not yet: it is in the queue
    (queued,) = gw.queued(QUEUED)
    assert queued.id == queue_id and queued.mail_from == ALICE and queued.login == ALICE
    assert [r.address for r in queued.pending] == [BOB]
    rec = record_of(gw, attempt)
    assert (rec.outcome, rec.queue_id) == ("queued", str(queue_id))
    assert rec.final_reply.startswith("250 2.0.0 Ok: queued as")
    assert statuses(rec) == {BOB: "queued"}
    assert queued.audit_id == rec.id and queued.txn_id == rec.transaction_id

    check_invariant(gw, [attempt])
    (event,) = queue_events(gw, queue_id)
    assert event.kind == "queue-delivered"
    assert event.transaction_id == rec.transaction_id and event.login == ALICE
    assert event.upstream_reply.startswith("250") and BOB in event.detail


@pytest.mark.parametrize("fault", TEMPORARY_FAULTS, ids=[f.name for f in TEMPORARY_FAULTS])
def test_temporary_failure_is_451_in_defer_mode_and_never_delivered(
    make_gateway: MakeGateway, fault: Fault
) -> None:
    gw = custody_gateway(make_gateway, "defer")
    fault.cause(gw)
    attempt = send(gw, [BOB])
    fault.heal(gw)
    assert not attempt.accepted
    assert attempt.final.startswith(fault.deferred), attempt
    if fault.stage == "rcpt":
        assert attempt.data is None  # refused at RCPT, in the session
    assert gw.queued() == []
    rec = record_of(gw, attempt)
    assert rec.outcome in ("deferred", "aborted") and rec.queue_id is None
    check_invariant(gw, [attempt])


def test_a_queued_message_that_fails_for_good_is_bounced(make_gateway: MakeGateway) -> None:
    gw = custody_gateway(make_gateway, "queue")
    gw.upstream_handle.refuse()
    attempt = send(gw, [BOB, CAROL])
    gw.upstream_handle.resume()
    assert attempt.accepted
    gw.upstream.fail_rcpt = {CAROL: "550 5.1.1 No such user"}
    check_invariant(gw, [attempt])
    assert deliveries(gw)[(attempt.message_id, BOB)] == 1
    (bounce,) = bounces(gw)
    assert bounce == Bounce(attempt.message_id, (CAROL,), "failed")
    kinds = sorted(e.kind for e in queue_events(gw, attempt.queue_id))
    assert kinds == ["queue-bounced"]
    (event,) = queue_events(gw, attempt.queue_id)
    assert f"delivered: {BOB}" in event.detail and f"bounced: {CAROL}" in event.detail


# --- permanent failures: answered in the session, never bounced --------------------------------

PERMANENT = [
    ("MAIL", "553 5.7.1 Sender rejected", "rcpt"),
    ("RCPT", "550 5.1.1 No such user", "rcpt"),
    ("DATA", "554 5.3.0 No data today", "data"),
    ("EOM", "554 5.7.1 Message rejected", "data"),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("command", "line", "stage"), PERMANENT, ids=[p[0] for p in PERMANENT])
def test_permanent_failure_is_answered_in_the_session(
    make_gateway: MakeGateway, mode: str, command: capture.Command, line: str, stage: str
) -> None:
    gw = custody_gateway(make_gateway, mode)
    gw.upstream.inject(command, capture.reply(line))
    attempt = send(gw, [BOB])
    assert attempt.final[:1] == "5" and line.split(" ", 2)[2] in attempt.final, attempt
    assert (attempt.data is None) == (stage == "rcpt")
    assert gw.queued() == []
    check_invariant(gw, [attempt])
    assert bounces(gw) == []


# --- partial results across recipients ----------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_recipient_deferred_at_rcpt_time(make_gateway: MakeGateway, mode: str) -> None:
    gw = custody_gateway(make_gateway, mode)
    gw.upstream.inject("RCPT", capture.reply("450 4.2.1 Greylisted", recipients=[CAROL]))
    attempt = send(gw, [BOB, CAROL])
    assert attempt.rcpt[BOB][0] == 250 and attempt.accepted
    assert deliveries(gw)[(attempt.message_id, BOB)] == 1  # delivered in the session
    rec = record_of(gw, attempt)
    if mode == "queue":
        assert attempt.rcpt[CAROL][0] == 250
        assert attempt.final.startswith("250 2.0.0 Ok: queued as")
        assert statuses(rec) == {BOB: "delivered", CAROL: "queued"}
        assert rec.outcome == "queued"
        (queued,) = gw.queued(QUEUED)
        states = {r.address: r.state for c in queued.copies for r in c.recipients}
        assert states == {BOB: "delivered", CAROL: "pending"}  # BOB is never sent again
    else:
        assert attempt.rcpt[CAROL][:1] == (451,)
        assert statuses(rec) == {BOB: "delivered", CAROL: "rejected"}
        assert gw.queued() == []
    check_invariant(gw, [attempt])


@pytest.mark.parametrize("mode", MODES)
def test_late_rcpt_4xx_without_verification(make_gateway: MakeGateway, mode: str) -> None:
    gw = custody_gateway(make_gateway, mode, relay={"verify_recipients": False})
    gw.upstream.inject("RCPT", capture.reply("451 4.7.1 Slow down", recipients=[CAROL]))
    attempt = send(gw, [BOB, CAROL])
    assert attempt.rcpt_ok == [BOB, CAROL]
    if mode == "queue":  # BOB now, CAROL from the queue
        assert attempt.final.startswith("250 2.0.0 Ok: queued as")
        assert deliveries(gw)[(attempt.message_id, BOB)] == 1
        assert statuses(record_of(gw, attempt)) == {BOB: "delivered", CAROL: "queued"}
    else:  # nothing was sent: the whole message is deferred, the client keeps it
        assert attempt.final.startswith("451 4.4.3")
        assert deliveries(gw) == Counter()
    check_invariant(gw, [attempt])


@pytest.mark.parametrize("mode", MODES)
def test_late_rcpt_5xx_without_verification_refuses_the_message(
    make_gateway: MakeGateway, mode: str
) -> None:
    gw = custody_gateway(make_gateway, mode, relay={"verify_recipients": False})
    gw.upstream.fail_rcpt = {CAROL: "550 5.1.1 No such user"}
    attempt = send(gw, [BOB, CAROL])
    assert attempt.final.startswith("550 5.1.1") and "No such user" in attempt.final
    assert statuses(record_of(gw, attempt)) == {BOB: "failed", CAROL: "failed"}
    check_invariant(gw, [attempt])
    assert bounces(gw) == []


@pytest.mark.parametrize("mode", MODES)
def test_upstream_lost_between_recipients_loses_nobody(
    make_gateway: MakeGateway, mode: str
) -> None:
    # BOB is accepted on one upstream transaction, the connection drops at CAROL's RCPT: BOB's
    # acceptance died with it, so he is sent (or queued) on a new one, never silently dropped
    gw = custody_gateway(make_gateway, mode)
    gw.upstream.inject("RCPT", dataclasses.replace(capture.drop(), recipients=frozenset({CAROL})))
    attempt = send(gw, [BOB, CAROL])
    assert attempt.accepted and attempt.rcpt[BOB][0] == 250
    if mode == "defer":
        assert attempt.rcpt[CAROL][:1] == (451,)
        assert deliveries(gw)[(attempt.message_id, BOB)] == 1
    else:
        assert attempt.rcpt[CAROL][0] == 250
    check_invariant(gw, [attempt])


# --- partial results across the copies of a delivery plan --------------------------------------


def two_copy_plan(order: Sequence[str]) -> Any:
    """A test-only plan: one copy per recipient, in ``order``, each marked with its own header
    (what per-recipient encryption will do: several copies, different bytes)."""

    async def plan(txn: Transaction, wire: bytes) -> list[DeliveryCopy]:
        accepted = {r.address for r in txn.accepted}
        return [
            DeliveryCopy((rcpt,), f"X-Copy-For: {rcpt}\r\n".encode() + wire)
            for rcpt in order
            if rcpt in accepted
        ]

    return plan


@pytest.fixture
def two_copies(make_gateway: MakeGateway) -> Iterator[Callable[[str], RunningGateway]]:
    def build(mode: str) -> RunningGateway:
        gw = custody_gateway(make_gateway, mode)
        assert gw.app.context is not None
        gw.app.context.gateway.planner = two_copy_plan([CAROL, BOB])  # CAROL's copy goes first
        return gw

    yield build


@pytest.mark.parametrize("mode", MODES)
def test_copy_deferred_while_another_is_delivered_is_queued(
    two_copies: Callable[[str], RunningGateway], mode: str
) -> None:
    gw = two_copies(mode)
    gw.upstream.inject("EOM", capture.reply("451 4.3.0 Try again"))  # CAROL's copy
    attempt = send(gw, [BOB, CAROL])
    # even in defer mode: BOB has it, a 451 would make the client send it to him again
    assert attempt.final.startswith("250 2.0.0 Ok: queued as"), attempt
    assert statuses(record_of(gw, attempt)) == {BOB: "delivered", CAROL: "queued"}
    (queued,) = gw.queued(QUEUED)
    (copy,) = queued.copies
    assert [r.address for r in copy.recipients] == [CAROL]
    check_invariant(gw, [attempt])
    (carols,) = [m for m in gw.upstream.messages if m.rcpt_tos == (CAROL,)]
    assert carols.data.startswith(f"X-Copy-For: {CAROL}\r\n".encode())  # her copy's own bytes


@pytest.mark.parametrize("mode", MODES)
def test_copy_refused_while_another_is_delivered_is_bounced(
    two_copies: Callable[[str], RunningGateway], mode: str
) -> None:
    gw = two_copies(mode)
    gw.upstream.inject("EOM", capture.reply("550 5.7.1 Not for her"))  # CAROL's copy
    attempt = send(gw, [BOB, CAROL])
    assert attempt.final.startswith("250 2.0.0 Ok: queued as "), attempt  # the upstream's id
    rec = record_of(gw, attempt)
    assert statuses(rec) == {BOB: "delivered", CAROL: "bounced"}
    assert rec.outcome == "delivered"
    (dsn,) = gw.queued()
    assert dsn.is_bounce and dsn.mail_from == ""
    check_invariant(gw, [attempt])
    (bounce,) = bounces(gw)
    assert bounce == Bounce(attempt.message_id, (CAROL,), "failed")
    (received,) = [m for m in gw.upstream.messages if m.mail_from == ""]
    assert b"550 5.7.1 Not for her" in received.data
    assert [e.kind for e in queue_events(gw, dsn.id)] == ["queue-delivered"]


def test_no_bounce_to_a_sender_the_login_does_not_own(
    two_copies: Callable[[str], RunningGateway],
) -> None:
    gw = two_copies("queue")
    gw.grant(ALICE, "@shared.example")  # send-as: may send, may not receive bounces
    gw.upstream.inject("EOM", capture.reply("550 5.7.1 Not for her"))
    attempt = send(gw, [BOB, CAROL], sender="team@shared.example")
    assert attempt.accepted
    assert statuses(record_of(gw, attempt)) == {BOB: "delivered", CAROL: "bounced"}
    gw.drain_queue()
    assert bounces(gw) == [] and gw.queued() == []


@pytest.mark.parametrize("mode", MODES)
def test_every_copy_refused_is_refused_in_the_session(
    two_copies: Callable[[str], RunningGateway], mode: str
) -> None:
    gw = two_copies(mode)
    gw.upstream.inject("EOM", capture.reply("550 5.7.1 Not for her"))
    gw.upstream.inject("EOM", capture.reply("554 5.7.1 Not for him either"))
    attempt = send(gw, [BOB, CAROL])
    assert attempt.final.startswith("550 5.7.1"), attempt
    check_invariant(gw, [attempt])
    assert bounces(gw) == [] and gw.queued() == []


@pytest.mark.parametrize("mode", MODES)
def test_every_copy_deferred(two_copies: Callable[[str], RunningGateway], mode: str) -> None:
    gw = two_copies(mode)
    gw.upstream.inject("EOM", capture.reply("451 4.3.0 Later"))
    gw.upstream.inject("EOM", capture.reply("451 4.3.0 Later"))
    attempt = send(gw, [BOB, CAROL])
    if mode == "queue":
        assert attempt.final.startswith("250 2.0.0 Ok: queued as")
        (queued,) = gw.queued(QUEUED)
        assert len(queued.copies) == 2  # one message, a copy per upstream transaction
    else:
        assert attempt.final.startswith("451 4.4.3")
    check_invariant(gw, [attempt])


def test_verified_recipients_get_fresh_transactions_per_copy(
    two_copies: Callable[[str], RunningGateway],
) -> None:
    gw = two_copies("queue")
    attempt = send(gw, [BOB, CAROL])
    assert attempt.final.startswith("250 2.0.0 Ok: queued as ")
    assert sorted(m.rcpt_tos for m in gw.upstream.messages) == [(BOB,), (CAROL,)]
    check_invariant(gw, [attempt])
    assert statuses(record_of(gw, attempt)) == {BOB: "delivered", CAROL: "delivered"}


# --- when the queue cannot take custody ---------------------------------------------------------


def break_spool(gw: RunningGateway) -> Callable[[], None]:
    """Make every spool write fail (its ``tmp/`` becomes a file); returns the repair."""
    assert gw.app.spool is not None
    tmp = gw.app.spool.directory / "tmp"
    shutil.rmtree(tmp)
    tmp.write_bytes(b"")

    def repair() -> None:
        tmp.unlink()
        tmp.mkdir(mode=0o700)

    return repair


def test_queue_unavailable_is_451_and_nothing_is_delivered_later(
    make_gateway: MakeGateway,
) -> None:
    gw = custody_gateway(make_gateway, "queue")
    repair = break_spool(gw)
    gw.upstream_handle.refuse()
    attempt = send(gw, [BOB])
    gw.upstream_handle.resume()
    repair()
    assert attempt.final.startswith("451 4.3.0 Queue unavailable"), attempt
    rec = record_of(gw, attempt)
    assert rec.outcome == "deferred" and statuses(rec) == {BOB: "deferred"}
    assert gw.queued() == []
    check_invariant(gw, [attempt])


def test_queue_failing_after_a_partial_delivery_prefers_a_duplicate(
    make_gateway: MakeGateway,
) -> None:
    # BOB got it in the session; CAROL (greylisted) cannot be queued: the client is told 451
    # and sends the whole message again -- BOB gets it twice, nobody loses it
    gw = custody_gateway(make_gateway, "queue")
    repair = break_spool(gw)
    gw.upstream.inject("RCPT", capture.reply("450 4.2.1 Greylisted", recipients=[CAROL]))
    first = send(gw, [BOB, CAROL])
    repair()
    assert first.final.startswith("451 4.3.0"), first
    assert deliveries(gw)[(first.message_id, BOB)] == 1
    assert statuses(record_of(gw, first)) == {BOB: "delivered", CAROL: "deferred"}
    gw.drain_queue()
    assert deliveries(gw)[(first.message_id, CAROL)] == 0  # the 451 was never delivered later
    again = send(gw, [BOB, CAROL], message_id=first.message_id)  # the client's retry
    assert again.accepted
    gw.drain_queue()
    got = deliveries(gw)
    assert got[(first.message_id, BOB)] == 2 and got[(first.message_id, CAROL)] == 1


def test_disk_nearly_full_refuses_at_mail_from(make_gateway: MakeGateway) -> None:
    gw = custody_gateway(make_gateway, "queue", min_free_space="1000000T")
    with gw.smtp() as client:
        code, text = client.mail(ALICE)
    assert (code, text[:5]) == (452, b"4.3.1")
    rec = [r for r in gw.records() if r.kind == "message"][-1]
    assert rec.outcome == "deferred" and rec.final_reply.startswith("452 4.3.1")
    assert [v.check_id for v in rec.verdicts] == ["spool-space"]
    assert gw.upstream.connections == []  # nothing was accepted or sent
    assert gw.app.spool is not None
    assert [p for p in gw.app.spool.directory.iterdir() if p.is_file()] == []


def test_many_faulty_messages_each_end_once(make_gateway: MakeGateway) -> None:
    """Several faulty messages in a row, then one drain: each ends once, and every finished copy
    has exactly one final audit event."""
    gw = custody_gateway(make_gateway, "queue")
    attempts = []
    for fault in TEMPORARY_FAULTS[3:8]:
        fault.cause(gw)
        attempts.append(send(gw, [BOB, CAROL]))
        fault.heal(gw)
    assert all(a.accepted for a in attempts)
    check_invariant(gw, attempts)
    for attempt in attempts:
        events = queue_events(gw, attempt.queue_id)
        assert [e.kind for e in events] == ["queue-delivered"], attempt
        (message,) = [m for m in gw.queued() if m.id == attempt.queue_id]
        assert all(c.state == DONE for c in message.copies)


def test_a_damaged_spool_file_is_never_sent_and_is_audited(make_gateway: MakeGateway) -> None:
    gw = custody_gateway(make_gateway, "queue")
    gw.upstream_handle.refuse()
    attempt = send(gw, [BOB])
    gw.upstream_handle.resume()
    (queued,) = gw.queued(QUEUED)
    assert gw.app.spool is not None
    path = gw.app.spool.path(queued.copies[0].spool_name)
    path.write_bytes(path.read_bytes()[:-5])  # what a crash or a bad disk can leave
    gw.drain_queue()
    assert deliveries(gw)[(attempt.message_id, BOB)] == 0
    (event,) = queue_events(gw, attempt.queue_id)
    assert event.kind == "queue-corrupt" and event.transaction_id == queued.txn_id
    assert "never sent" in event.detail
