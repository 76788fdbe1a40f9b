"""Contract of the quarantine: SqlQuarantine on every database backend, and the release of held
messages through a real UpstreamRelay to the real capture upstream (gateway.smtp.capture).

Every test taking ``db_url`` runs on SQLite and, when MAILWARD_TEST_POSTGRES_URL is set, on
PostgreSQL (tests/fixtures/db.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import inspect, text, update

from gateway.core.errors import StoreUnavailable
from gateway.core.model import Identity, Recipient, RecipientStatus, Session, Transaction
from gateway.db.engine import engine_for_url
from gateway.quarantine import (
    QuarantineNotFound,
    QuarantineStateError,
    ReleaseFailed,
    SqlQuarantine,
    release,
    release_held,
)
from gateway.quarantine.models import (
    DELETED,
    HELD,
    RELEASE_FAILED,
    RELEASED,
    RELEASING,
)
from gateway.quarantine.store import QUARANTINE, UNCONFIRMED_BY
from gateway.smtp.capture import CaptureUpstream
from gateway.smtp.capture import reply as fault_reply
from tests.fixtures.db import unreachable_url
from tests.fixtures.upstream import RelayFactory, relay_config

BODY_MARKER = b"SECRET-BODY-MARKER"
# 8-bit bytes, a line that is a lone dot after un-stuffing, lines starting with dots
MESSAGE = (
    b"Received: from client ([192.0.2.10])\r\n\tby gw.test (Mailward) with ESMTPSA id s.1;\r\n"
    b"\tMon, 1 Dec 2026 10:00:00 +0000\r\n"
    b"From: Alice <alice@example.com>\r\n"
    b"To: bob@example.net\r\n"
    b"Subject: =?utf-8?q?caf=C3=A9?=\r\n"
    b"Message-ID: <held-1@example.com>\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b"caf\xc3\xa9 \xff\xfe raw 8-bit\r\n"
    b".\r\n"
    b"..two dots\r\n"
    b".leading dot\r\n" + BODY_MARKER + b"\r\n"
)


def make_txn(
    recipients: tuple[str, ...] = ("bob@example.net",),
    *,
    login: str | None = "alice@example.com",
    mail_from: str = "alice@example.com",
    refused: tuple[str, ...] = (),
    smtputf8: bool = False,
    body_8bitmime: bool = True,
    message_id: str | None = "<held-1@example.com>",
) -> Transaction:
    session = Session(client_ip="192.0.2.10", client_port=40001, listener="submission")
    session.identity = Identity(login=login, account_id=1 if login else None)
    txn = Transaction(session, mail_from, smtputf8=smtputf8, body_8bitmime=body_8bitmime)
    txn.recipients = [Recipient(a) for a in recipients] + [
        Recipient(a, RecipientStatus.REJECTED, "550 5.7.1 no") for a in refused
    ]
    txn.message_id = message_id
    return txn


def mailward_log(caplog: pytest.LogCaptureFixture) -> str:
    """What Mailward's own loggers said (third-party DEBUG logs, e.g. aiosmtpd's, show data)."""
    return "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("mailward"))


def big_message(size: int) -> bytes:
    """About ``size`` bytes of CRLF lines of random 8-bit data (no CR, LF or NUL inside)."""
    rng = random.Random(1234)
    alphabet = bytes(b for b in range(1, 256) if b not in (10, 13))
    line = 76
    count = size // (line + 2)
    raw = bytes(rng.choice(alphabet) for _ in range(line * 64))  # 64 distinct lines, repeated
    lines = [raw[(i % 64) * line : (i % 64 + 1) * line] for i in range(count)]
    for i in range(0, count, 997):  # sprinkle leading dots (dot-stuffing on release)
        lines[i] = b"." + lines[i][1:]
    return b"Subject: big\r\n\r\n" + b"\r\n".join(lines) + b"\r\n"


@pytest.fixture
async def quarantine(db_url: str) -> AsyncIterator[SqlQuarantine]:
    engine = engine_for_url(db_url, timeout=5.0)
    store = SqlQuarantine(engine, timeout=5.0)
    try:
        yield store
    finally:
        await store.close()
        await engine.dispose()


# --- hold / get ----------------------------------------------------------------------------------


async def test_hold_get_round_trip_keeps_the_exact_bytes_and_envelope(
    quarantine: SqlQuarantine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    txn = make_txn(
        ("bob@example.net", "carol@example.org"),
        login="Alice@Example.com",
        refused=("nobody@example.net",),
        body_8bitmime=True,
    )
    before = time.time()
    entry_id = await quarantine.hold(
        txn, MESSAGE, check_id="spam-score", reason="score 7.5 >= 6: FREE_MONEY(5) URL_SHORT(2.5)"
    )
    entry = await quarantine.get(entry_id)
    assert entry is not None
    assert entry.message == MESSAGE
    assert entry.size == len(MESSAGE)
    assert entry.sha256 == hashlib.sha256(MESSAGE).hexdigest()
    assert entry.recipients == ("bob@example.net", "carol@example.org")  # accepted ones only
    assert entry.mail_from == "alice@example.com"
    assert (entry.smtputf8, entry.body_8bitmime) == (False, True)
    assert entry.login == "alice@example.com"
    assert (entry.transaction_id, entry.session_id) == (txn.id, txn.session.id)
    assert entry.client_ip == "192.0.2.10"
    assert entry.message_id == "<held-1@example.com>"
    assert (entry.check_id, entry.reason) == (
        "spam-score",
        "score 7.5 >= 6: FREE_MONEY(5) URL_SHORT(2.5)",
    )
    assert entry.status == HELD
    assert (entry.decided_at, entry.decided_by, entry.upstream_reply) == (None, None, None)
    assert entry.created_at.tzinfo is not None and entry.created_at.timestamp() >= before - 1
    assert BODY_MARKER.decode() not in mailward_log(caplog)

    meta = await quarantine.get(entry_id, with_message=False)
    assert meta is not None and meta.message is None and meta.sha256 == entry.sha256
    assert "message" not in entry.to_dict() and entry.to_dict()["recipients"] == list(
        entry.recipients
    )
    assert await quarantine.get(entry_id + 1000) is None


async def test_hold_null_sender_no_login_smtputf8_and_parsed_message_id(
    quarantine: SqlQuarantine,
) -> None:
    txn = make_txn(
        ("jos\u00e9@ex\u00e4mple.org",),
        login=None,
        mail_from="",
        smtputf8=True,
        message_id=None,
    )
    entry_id = await quarantine.hold(txn, MESSAGE, check_id="spam-score", reason="r")
    entry = await quarantine.get(entry_id)
    assert entry is not None
    assert entry.mail_from == "" and entry.login is None
    assert entry.recipients == ("jos\u00e9@ex\u00e4mple.org",)
    assert entry.smtputf8 is True
    assert entry.message_id == "<held-1@example.com>"  # parsed from the held bytes


async def test_five_megabyte_message_round_trip(quarantine: SqlQuarantine) -> None:
    message = big_message(5 * 1024 * 1024)
    assert len(message) > 5_000_000
    entry_id = await quarantine.hold(make_txn(), message, check_id="spam-score", reason="big")
    entry = await quarantine.get(entry_id)
    assert entry is not None and entry.size == len(message)
    assert entry.message == message


async def test_hold_without_accepted_recipient_is_refused(quarantine: SqlQuarantine) -> None:
    with pytest.raises(ValueError, match="no accepted recipient"):
        await quarantine.hold(
            make_txn((), refused=("x@example.net",)), MESSAGE, check_id="c", reason="r"
        )
    assert await quarantine.list() == []


async def test_client_text_is_made_storable(quarantine: SqlQuarantine) -> None:
    """NUL and lone surrogates (from surrogateescape-decoded headers) cannot reach PostgreSQL."""
    txn = make_txn(message_id="<a\udcffb\x00c@x>")
    entry_id = await quarantine.hold(txn, MESSAGE, check_id="c", reason="x" * 10_000 + "\x00")
    entry = await quarantine.get(entry_id, with_message=False)
    assert entry is not None
    assert entry.message_id is not None and "\x00" not in entry.message_id
    assert len(entry.reason) == 4000


# --- list ----------------------------------------------------------------------------------------


async def test_list_filters_and_keyset_paging(quarantine: SqlQuarantine) -> None:
    ids = []
    for i in range(7):
        login = "alice@example.com" if i % 2 == 0 else "bob@example.com"
        ids.append(
            await quarantine.hold(make_txn(login=login), MESSAGE, check_id="c", reason=str(i))
        )
    await quarantine.mark(ids[0], DELETED, decided_by="test")
    await quarantine.mark(ids[1], RELEASED, decided_by="test", upstream_reply="250 ok")

    everything = await quarantine.list()
    assert [e.id for e in everything] == ids[::-1]
    assert all(e.message is None for e in everything)

    held = await quarantine.list(status=HELD)
    assert [e.id for e in held] == ids[:1:-1]
    assert [e.id for e in await quarantine.list(status=DELETED)] == [ids[0]]
    assert [e.id for e in await quarantine.list(login="ALICE@example.com ")] == [
        ids[6],
        ids[4],
        ids[2],
        ids[0],
    ]
    assert [e.id for e in await quarantine.list(status=HELD, login="bob@example.com")] == [
        ids[5],
        ids[3],
    ]
    assert await quarantine.list(login="nobody") == []

    page1 = await quarantine.list(limit=3)
    page2 = await quarantine.list(limit=3, before_id=page1[-1].id)
    page3 = await quarantine.list(limit=3, before_id=page2[-1].id)
    assert [e.id for e in page1 + page2 + page3] == ids[::-1]
    assert len(page3) == 1
    assert await quarantine.list(limit=3, before_id=ids[0]) == []

    with pytest.raises(ValueError, match="unknown quarantine status"):
        await quarantine.list(status="bogus")


# --- decisions -----------------------------------------------------------------------------------


async def test_status_transitions(quarantine: SqlQuarantine) -> None:
    a = await quarantine.hold(make_txn(), MESSAGE, check_id="c", reason="r")

    claimed = await quarantine.mark(a, RELEASING, decided_by="cli:ops")
    assert claimed.status == RELEASING and claimed.decided_by == "cli:ops"
    with pytest.raises(QuarantineStateError, match="has not finished") as busy:
        await quarantine.mark(a, RELEASING, decided_by="cli:other")
    assert busy.value.status == RELEASING
    with pytest.raises(QuarantineStateError):
        await quarantine.mark(a, DELETED, decided_by="cli:other")

    done = await quarantine.mark(a, RELEASED, decided_by="cli:ops", upstream_reply="250 2.0.0 Ok")
    assert done.status == RELEASED and done.upstream_reply == "250 2.0.0 Ok"
    assert done.decided_at is not None and done.decided_at.tzinfo is not None

    # a second release fails clearly, naming the earlier decision
    with pytest.raises(QuarantineStateError, match=r"already released by cli:ops") as again:
        await quarantine.mark(a, RELEASING, decided_by="cli:ops")
    assert again.value.status == RELEASED
    for status in (RELEASED, RELEASE_FAILED, DELETED):
        with pytest.raises(QuarantineStateError):
            await quarantine.mark(a, status, decided_by="x", force=True)
    still = await quarantine.get(a)
    assert still is not None and still.status == RELEASED and still.message == MESSAGE

    # release-failed may be released again, or deleted; deleting erases the bytes
    b = await quarantine.hold(make_txn(), MESSAGE, check_id="c", reason="r")
    await quarantine.mark(b, RELEASING, decided_by="x")
    failed = await quarantine.mark(b, RELEASE_FAILED, decided_by="x", upstream_reply="550 no")
    assert failed.status == RELEASE_FAILED and failed.upstream_reply == "550 no"
    await quarantine.mark(b, RELEASING, decided_by="x")
    await quarantine.mark(b, RELEASE_FAILED, decided_by="x", upstream_reply="451 later")
    deleted = await quarantine.mark(b, DELETED, decided_by="cli:ops")
    assert deleted.status == DELETED and deleted.upstream_reply is None
    gone = await quarantine.get(b)
    assert gone is not None and gone.message is None and gone.sha256 == failed.sha256
    with pytest.raises(QuarantineStateError, match="already deleted"):
        await quarantine.mark(b, RELEASING, decided_by="x")
    with pytest.raises(QuarantineStateError, match="already deleted"):
        await quarantine.mark(b, DELETED, decided_by="x")

    # an interrupted release (left "releasing") needs force
    c = await quarantine.hold(make_txn(), MESSAGE, check_id="c", reason="r")
    await quarantine.mark(c, RELEASING, decided_by="crashed")
    assert (await quarantine.mark(c, RELEASING, decided_by="x", force=True)).status == RELEASING
    assert (await quarantine.mark(c, DELETED, decided_by="x", force=True)).status == DELETED

    # held can be marked directly too
    d = await quarantine.hold(make_txn(), MESSAGE, check_id="c", reason="r")
    assert (await quarantine.mark(d, DELETED, decided_by="x")).status == DELETED

    with pytest.raises(QuarantineNotFound, match="no quarantine entry 999999"):
        await quarantine.mark(999_999, RELEASING, decided_by="x")
    with pytest.raises(ValueError):
        await quarantine.mark(a, HELD, decided_by="x")
    with pytest.raises(ValueError):
        await quarantine.mark(a, "bogus", decided_by="x")


async def test_concurrent_claims_only_one_wins(quarantine: SqlQuarantine) -> None:
    entry_id = await quarantine.hold(make_txn(), MESSAGE, check_id="c", reason="r")
    results = await asyncio.gather(
        *(quarantine.mark(entry_id, RELEASING, decided_by=f"op{i}") for i in range(6)),
        return_exceptions=True,
    )
    won = [r for r in results if not isinstance(r, BaseException)]
    lost = [r for r in results if isinstance(r, BaseException)]
    assert len(won) == 1
    assert all(isinstance(r, QuarantineStateError) for r in lost)


async def test_schema_has_the_indexes(db_url: str) -> None:
    engine = engine_for_url(db_url, pooled=False)
    try:
        async with engine.connect() as conn:
            indexes = await conn.run_sync(lambda c: inspect(c).get_indexes("quarantine"))
    finally:
        await engine.dispose()
    columns = {i["name"]: tuple(i["column_names"]) for i in indexes}
    assert columns["ix_quarantine_status_created_at"] == ("status", "created_at")
    assert columns["ix_quarantine_login"] == ("login",)


# --- database failures ---------------------------------------------------------------------------


async def test_unreachable_database_raises_store_unavailable_promptly(
    db_backend: str, tmp_path: Path
) -> None:
    engine = engine_for_url(unreachable_url(db_backend, tmp_path), timeout=2.0)
    store = SqlQuarantine(engine, timeout=2.0)
    start = time.monotonic()
    try:
        with pytest.raises(StoreUnavailable) as info:
            await store.hold(make_txn(), MESSAGE, check_id="c", reason="r")
        with pytest.raises(StoreUnavailable):
            await store.list()
        with pytest.raises(StoreUnavailable):
            await store.get(1)
        with pytest.raises(StoreUnavailable):
            await store.mark(1, RELEASING, decided_by="x")
    finally:
        await store.close()
        await engine.dispose()
    assert time.monotonic() - start < 8
    assert "unavailable" in str(info.value)
    assert "secret-pw" not in str(info.value)
    assert info.value.reply.is_temporary
    assert BODY_MARKER.decode() not in str(info.value)


async def test_hold_committed_after_the_caller_gave_up_is_discarded(
    db_backend: str, db_url: str
) -> None:
    """The caller stops waiting after ``timeout`` (and answers 4xx: the client retries); the
    insert still commits once the lock is gone, and is then marked deleted at once, bytes erased,
    so the message cannot be released twice."""
    engine = engine_for_url(db_url, timeout=4.0)  # driver lock wait longer than the store's
    store = SqlQuarantine(engine, timeout=0.5)
    blocker = engine_for_url(db_url, timeout=4.0)
    try:
        async with blocker.connect() as conn:
            trans = await conn.begin()
            if db_backend == "sqlite":
                # a pending writer lock blocks other writers (readers are never blocked in WAL)
                await conn.execute(text("UPDATE quarantine SET status = status"))
            else:
                await conn.execute(text("LOCK TABLE quarantine IN ACCESS EXCLUSIVE MODE"))
            start = time.monotonic()
            with pytest.raises(StoreUnavailable, match="not committed within"):
                await store.hold(make_txn(), MESSAGE, check_id="c", reason="r")
            assert time.monotonic() - start < 2
            await asyncio.sleep(0.5)
            await trans.rollback()
        await store.close()  # waits for the detached insert and its compensation
        rows = await store.list()
        assert len(rows) == 1
        entry = await store.get(rows[0].id)
        assert entry is not None
        assert entry.status == DELETED and entry.decided_by == UNCONFIRMED_BY
        assert entry.message is None
    finally:
        await store.close()
        await blocker.dispose()
        await engine.dispose()


async def test_hold_whose_caller_is_cancelled_is_discarded(db_backend: str, db_url: str) -> None:
    """A client that went away while its message was being held never hears 250: the row that
    commits afterwards is discarded the same way."""
    engine = engine_for_url(db_url, timeout=4.0)
    store = SqlQuarantine(engine, timeout=3.0)
    blocker = engine_for_url(db_url, timeout=4.0)
    try:
        async with blocker.connect() as conn:
            trans = await conn.begin()
            if db_backend == "sqlite":
                await conn.execute(text("UPDATE quarantine SET status = status"))
            else:
                await conn.execute(text("LOCK TABLE quarantine IN ACCESS EXCLUSIVE MODE"))
            waiting = asyncio.create_task(store.hold(make_txn(), MESSAGE, check_id="c", reason="r"))
            await asyncio.sleep(0.3)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            await trans.rollback()
        await store.close()
        [row] = await store.list()
        assert row.status == DELETED and row.decided_by == UNCONFIRMED_BY
    finally:
        await store.close()
        await blocker.dispose()
        await engine.dispose()


# --- release -------------------------------------------------------------------------------------


async def _held(store: SqlQuarantine, message: bytes = MESSAGE, **txn_options: Any) -> int:
    return await store.hold(make_txn(**txn_options), message, check_id="spam-score", reason="7.5")


async def test_release_relays_exactly_the_held_bytes_and_envelope(
    quarantine: SqlQuarantine,
    upstream: CaptureUpstream,
    relay_factory: RelayFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    recipients = ("bob@example.net", "jos\u00e9@ex\u00e4mple.org", "carol@example.org")
    entry_id = await _held(quarantine, recipients=recipients, smtputf8=True, body_8bitmime=True)
    relay = relay_factory(relay_config(upstream))

    entry = await release_held(quarantine, entry_id, relay, decided_by="cli:ops")

    assert entry.status == RELEASED and entry.decided_by == "cli:ops"
    [received] = upstream.messages
    assert received.data == MESSAGE
    assert received.mail_from == "alice@example.com"
    assert received.rcpt_tos == recipients
    assert "BODY=8BITMIME" in received.mail_options and "SMTPUTF8" in received.mail_options
    assert f"SIZE={len(MESSAGE)}" in received.mail_options
    assert entry.upstream_reply == f"250 2.0.0 Ok: queued as {received.queue_id}"
    logged = mailward_log(caplog)
    assert f"quarantine {entry_id} released by cli:ops" in logged
    assert BODY_MARKER.decode() not in logged
    assert "bob@example.net" not in logged

    # a second release fails before anything is sent
    with pytest.raises(QuarantineStateError, match="already released"):
        await release_held(quarantine, entry_id, relay, decided_by="cli:ops")
    assert len(upstream.messages) == 1
    stored = await quarantine.get(entry_id)
    assert stored is not None and stored.status == RELEASED


async def test_release_of_a_five_megabyte_message(
    quarantine: SqlQuarantine, upstream: CaptureUpstream, relay_factory: RelayFactory
) -> None:
    message = big_message(5 * 1024 * 1024)
    entry_id = await _held(quarantine, message, body_8bitmime=True)
    entry = await release_held(
        quarantine, entry_id, relay_factory(relay_config(upstream)), decided_by="t"
    )
    assert entry.status == RELEASED
    assert upstream.messages[0].data == message


async def test_release_with_null_sender_and_plain_7bit(
    quarantine: SqlQuarantine, upstream: CaptureUpstream, relay_factory: RelayFactory
) -> None:
    message = b"Subject: plain\r\n\r\nhello\r\n"
    entry_id = await _held(quarantine, message, mail_from="", body_8bitmime=False)
    entry = await release_held(
        quarantine, entry_id, relay_factory(relay_config(upstream)), decided_by="t"
    )
    assert entry.status == RELEASED
    [received] = upstream.messages
    assert received.mail_from == "" and received.data == message
    assert "BODY=8BITMIME" not in received.mail_options
    assert "SMTPUTF8" not in received.mail_options


async def test_a_refused_recipient_fails_the_release_and_nothing_is_sent(
    quarantine: SqlQuarantine, upstream: CaptureUpstream, relay_factory: RelayFactory
) -> None:
    recipients = ("bob@example.net", "bad@example.net", "worse@example.net", "carol@example.org")
    entry_id = await _held(quarantine, recipients=recipients)
    upstream.fail_rcpt = {
        "bad@example.net": "550 5.1.1 No such user",
        "worse@example.net": "452 4.2.2 Mailbox full",
    }
    relay = relay_factory(relay_config(upstream))

    entry = await release_held(quarantine, entry_id, relay, decided_by="cli:ops")

    assert entry.status == RELEASE_FAILED
    assert entry.upstream_reply is not None
    assert "2 of 4 recipient(s)" in entry.upstream_reply
    assert "<bad@example.net> 550 5.1.1 No such user" in entry.upstream_reply
    assert "<worse@example.net> 452 4.2.2 Mailbox full" in entry.upstream_reply
    assert "bob@example.net" not in entry.upstream_reply
    assert upstream.messages == []
    commands = [c for conn in upstream.connections for c in conn.commands]
    assert commands.count("RCPT") == 4 and "DATA" not in commands and "RSET" in commands

    # release() itself says which recipients were refused
    held = await quarantine.get(entry_id)
    assert held is not None
    with pytest.raises(ReleaseFailed) as info:
        await release(held, relay)
    assert info.value.stage == "RCPT"
    assert [(r.address, r.reply.code) for r in info.value.refused] == [
        ("bad@example.net", 550),
        ("worse@example.net", 452),
    ]
    assert info.value.upstream is not None and info.value.upstream.code == 550

    # once the upstream accepts everyone, the failed release can be repeated
    upstream.fail_rcpt = {}
    again = await release_held(quarantine, entry_id, relay, decided_by="cli:ops")
    assert again.status == RELEASED
    [received] = upstream.messages
    assert received.rcpt_tos == recipients and received.data == MESSAGE


async def test_upstream_failures_are_recorded_as_release_failed(
    quarantine: SqlQuarantine, upstream: CaptureUpstream, relay_factory: RelayFactory
) -> None:
    relay = relay_factory(relay_config(upstream, connect_timeout=2.0))

    a = await _held(quarantine)
    upstream.inject("MAIL", fault_reply("553 5.7.1 Sender refused"))
    entry = await release_held(quarantine, a, relay, decided_by="t")
    assert entry.status == RELEASE_FAILED
    assert entry.upstream_reply == "MAIL FROM refused: 553 5.7.1 Sender refused; nothing was sent"

    upstream.inject("EOM", fault_reply("554 5.7.1 Spam detected"))
    entry = await release_held(quarantine, a, relay, decided_by="t")
    assert entry.status == RELEASE_FAILED
    assert entry.upstream_reply == "message refused: 554 5.7.1 Spam detected; nothing was sent"
    assert upstream.messages == []

    await upstream.refuse()
    await upstream.drop_connections()
    entry = await release_held(quarantine, a, relay, decided_by="t")
    assert entry.status == RELEASE_FAILED
    assert entry.upstream_reply is not None
    assert entry.upstream_reply.startswith("upstream not usable:")

    await upstream.resume()
    entry = await release_held(quarantine, a, relay, decided_by="t")
    assert entry.status == RELEASED and len(upstream.messages) == 1


async def test_a_connection_lost_during_data_is_flagged_uncertain(
    quarantine: SqlQuarantine, upstream: CaptureUpstream, relay_factory: RelayFactory
) -> None:
    from gateway.smtp.capture import drop

    entry_id = await _held(quarantine)
    upstream.inject("EOM", drop())
    entry = await release_held(
        quarantine, entry_id, relay_factory(relay_config(upstream)), decided_by="t"
    )
    assert entry.status == RELEASE_FAILED
    assert entry.upstream_reply is not None
    assert "may or may not have accepted" in entry.upstream_reply


async def test_corrupted_bytes_are_not_sent(
    db_url: str,
    quarantine: SqlQuarantine,
    upstream: CaptureUpstream,
    relay_factory: RelayFactory,
) -> None:
    entry_id = await _held(quarantine)
    engine = engine_for_url(db_url, pooled=False)
    try:
        async with engine.begin() as conn:
            await conn.execute(
                update(QUARANTINE)
                .where(QUARANTINE.c.id == entry_id)
                .values(message=MESSAGE.replace(b"caf", b"CAF"))
            )
    finally:
        await engine.dispose()
    entry = await release_held(
        quarantine, entry_id, relay_factory(relay_config(upstream)), decided_by="t"
    )
    assert entry.status == RELEASE_FAILED
    assert entry.upstream_reply is not None and "SHA-256" in entry.upstream_reply
    assert upstream.messages == [] and upstream.connections == []


async def test_release_of_unknown_deleted_or_interrupted_entries(
    quarantine: SqlQuarantine, upstream: CaptureUpstream, relay_factory: RelayFactory
) -> None:
    relay = relay_factory(relay_config(upstream))
    with pytest.raises(QuarantineNotFound):
        await release_held(quarantine, 424242, relay, decided_by="t")

    deleted = await _held(quarantine)
    await quarantine.mark(deleted, DELETED, decided_by="t")
    with pytest.raises(QuarantineStateError, match="already deleted"):
        await release_held(quarantine, deleted, relay, decided_by="t")

    interrupted = await _held(quarantine)
    await quarantine.mark(interrupted, RELEASING, decided_by="crashed")
    with pytest.raises(QuarantineStateError, match="--force"):
        await release_held(quarantine, interrupted, relay, decided_by="t")
    assert upstream.messages == []
    entry = await release_held(quarantine, interrupted, relay, decided_by="t", force=True)
    assert entry.status == RELEASED and len(upstream.messages) == 1


async def test_an_unrecordable_outcome_leaves_the_entry_releasing(
    quarantine: SqlQuarantine,
    upstream: CaptureUpstream,
    relay_factory: RelayFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Relayed, then the database fails: the entry keeps saying 'releasing' (possibly delivered)
    and the error says the message WAS released, so nobody releases it again blindly."""
    entry_id = await _held(quarantine)
    real_mark = quarantine.mark

    async def failing_mark(entry: int, status: str, **kwargs: Any) -> Any:
        if status == RELEASED:
            raise StoreUnavailable("quarantine database x unavailable: disk I/O error")
        return await real_mark(entry, status, **kwargs)

    monkeypatch.setattr(quarantine, "mark", failing_mark)
    with pytest.raises(StoreUnavailable, match=f"quarantine {entry_id} WAS released") as info:
        await release_held(
            quarantine, entry_id, relay_factory(relay_config(upstream)), decided_by="t"
        )
    assert "queued as" in str(info.value)
    assert len(upstream.messages) == 1
    entry = await quarantine.get(entry_id)
    assert entry is not None and entry.status == RELEASING
