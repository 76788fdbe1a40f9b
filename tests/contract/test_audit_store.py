"""Contract of SqlAuditStore (AuditSink port + query API) on every database backend."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, select, text

from gateway.app import Stores
from gateway.audit.store import RECIPIENT, RECORD, VERDICT, SqlAuditStore
from gateway.core import replies
from gateway.core.errors import AuditUnavailable
from gateway.core.model import (
    Action,
    Identity,
    Mode,
    Recipient,
    RecipientStatus,
    Session,
    Stage,
    Transaction,
    VerdictRecord,
)
from gateway.db.engine import engine_for_url
from tests.fixtures.db import unreachable_url

BODY = b"Subject: top secret\r\n\r\nThe launch codes are 0000.\r\n"


def make_session(login: str | None = "alice@example.com") -> Session:
    session = Session("192.0.2.7", 41234, "submission")
    session.helo = "client.example"
    session.tls_version, session.tls_cipher = "TLSv1.3", "TLS_AES_256_GCM_SHA384"
    if login is not None:
        session.identity = Identity(login=login, account_id=1, owned=(login,))
    return session


def make_txn(
    session: Session | None = None,
    mail_from: str = "alice@example.com",
    rcpts: tuple[str, ...] = ("bob@example.net", "carol@example.org"),
) -> Transaction:
    txn = Transaction(session or make_session(), mail_from)
    txn.recipients = [Recipient(r) for r in rcpts]
    txn.content = BODY
    txn.size = len(BODY)
    txn.sha256 = "ab" * 32
    txn.message_id = "<m1@client.example>"
    return txn


def warn_verdict(check_id: str = "recipient-limit", rcpt: str | None = None) -> VerdictRecord:
    return VerdictRecord(
        check_id=check_id,
        stage=Stage.RCPT,
        action=Action.DEFER,
        mode=Mode.WARN,
        reply="452 4.5.3 Too many recipients (limit 1)",
        reason="2 recipients > 1",
        recipient=rcpt,
        measured="2",
        limit="1",
        applied=False,
    )


async def test_begin_and_finish_round_trip(stores: Stores) -> None:
    audit = stores.audit
    txn = make_txn()
    txn.verdicts.append(warn_verdict(rcpt="carol@example.org"))

    audit_id = await audit.begin_message(txn)
    begun = await audit.get_record(audit_id)
    assert begun is not None
    assert begun.kind == "message" and begun.outcome == "relaying" and begun.ended_at is None
    assert [r.status for r in begun.recipients] == ["accepted", "accepted"]

    txn.recipients[0].status, txn.recipients[0].reply = RecipientStatus.DELIVERED, "250 2.1.5 ok"
    txn.recipients[1].status, txn.recipients[1].reply = RecipientStatus.FAILED, "550 5.1.1 no"
    txn.upstream_reply = "250 2.0.0 Ok: queued as ABC123"
    txn.queue_id = "ABC123"
    txn.final_reply = "250 2.0.0 Ok: queued as ABC123"
    await audit.finish_message(audit_id, txn, "delivered")

    record = await audit.get_record(audit_id)
    assert record is not None
    assert record.outcome == "delivered"
    assert record.ended_at is not None and record.ended_at >= record.started_at
    assert record.started_at.tzinfo is not None and record.started_at == txn.started_at
    assert record.session_id == txn.session.id and record.transaction_id == txn.id
    assert (record.listener, record.client_ip, record.client_port) == (
        "submission",
        "192.0.2.7",
        41234,
    )
    assert (record.tls_version, record.helo, record.login) == (
        "TLSv1.3",
        "client.example",
        "alice@example.com",
    )
    assert record.mail_from == "alice@example.com"
    assert (record.size, record.sha256, record.message_id) == (len(BODY), "ab" * 32, txn.message_id)
    assert record.queue_id == "ABC123" and record.upstream_reply == txn.upstream_reply
    assert record.final_reply == txn.final_reply
    assert [(r.position, r.address, r.status, r.reply) for r in record.recipients] == [
        (0, "bob@example.net", "delivered", "250 2.1.5 ok"),
        (1, "carol@example.org", "failed", "550 5.1.1 no"),
    ]
    (verdict,) = record.verdicts
    assert (verdict.check_id, verdict.stage, verdict.action, verdict.mode) == (
        "recipient-limit",
        "rcpt",
        "defer",
        "warn",
    )
    assert verdict.applied is False and verdict.recipient == "carol@example.org"
    assert (verdict.measured, verdict.limit) == ("2", "1")
    assert record.to_dict()["started_at"] == record.started_at.isoformat()


async def test_begin_message_is_committed_before_it_returns(stores: Stores, db_config: Any) -> None:
    audit_id = await stores.audit.begin_message(make_txn())
    other = engine_for_url(db_config.database_url)  # a separate connection pool
    try:
        async with other.connect() as conn:
            outcome = await conn.scalar(select(RECORD.c.outcome).where(RECORD.c.id == audit_id))
    finally:
        await other.dispose()
    assert outcome == "relaying"


async def test_record_transaction_and_session_events(stores: Stores) -> None:
    audit = stores.audit
    txn = make_txn(rcpts=("x@example.net",))
    txn.recipients[0].status = RecipientStatus.REJECTED
    txn.recipients[0].reply = "553 5.7.1 no"
    txn.verdicts.append(
        VerdictRecord(
            "sender-identity",
            Stage.MAIL,
            Action.REJECT,
            Mode.ENFORCE,
            "553 5.7.1 Sender address not owned",
            "not owned",
        )
    )
    txn.final_reply = "553 5.7.1 Sender address not owned"
    await audit.record_transaction(txn, "rejected")
    session = make_session(login=None)
    await audit.record_session_event(session, "auth-failure", "bad credentials", login="Mallory")
    await audit.record_session_event(session, "timeout", "idle")

    timeout_event, failure, rejected = await audit.list_records()
    assert (rejected.kind, rejected.outcome, rejected.ended_at is not None) == (
        "message",
        "rejected",
        True,
    )
    assert rejected.verdicts[0].applied is True and rejected.recipients[0].status == "rejected"
    assert (failure.kind, failure.login, failure.detail, failure.outcome) == (
        "auth-failure",
        "Mallory",
        "bad credentials",
        None,
    )
    assert failure.mail_from is None and failure.recipients == ()
    assert (timeout_event.kind, timeout_event.login, timeout_event.session_id) == (
        "timeout",
        None,
        session.id,
    )


async def test_invalid_kind_or_outcome_is_a_caller_bug(stores: Stores) -> None:
    with pytest.raises(ValueError):
        await stores.audit.record_transaction(make_txn(), "relaying")
    with pytest.raises(ValueError):
        await stores.audit.record_transaction(make_txn(), "exploded")
    with pytest.raises(ValueError):
        await stores.audit.record_session_event(make_session(), "message", "x")
    assert await stores.audit.list_records() == []


async def test_keyset_pagination_newest_first(stores: Stores) -> None:
    for i in range(25):
        await stores.audit.record_transaction(make_txn(mail_from=f"u{i}@example.com"), "aborted")
    pages: list[list[int]] = []
    before: int | None = None
    while True:
        page = await stores.audit.list_records(limit=10, before_id=before)
        if not page:
            break
        pages.append([r.id for r in page])
        before = page[-1].id
    assert [len(p) for p in pages] == [10, 10, 5]
    flat = [i for p in pages for i in p]
    assert flat == sorted(flat, reverse=True) and len(set(flat)) == 25
    newest = await stores.audit.get_record(flat[0])
    assert newest is not None and newest.mail_from == "u24@example.com"


async def test_filters(stores: Stores) -> None:
    audit = stores.audit
    a = make_txn(make_session("alice@example.com"), "alice@example.com", ("bob@Example.NET",))
    a.verdicts.append(warn_verdict())
    await audit.record_transaction(a, "delivered")
    b = make_txn(make_session("bob"), "Bob@Corp.Example", ("x@other.org",))
    await audit.record_transaction(b, "rejected")
    await audit.record_session_event(
        make_session(None), "auth-failure", "bad", login="alice@example.com"
    )

    async def ids(**filters: Any) -> list[str | None]:
        return [r.mail_from or r.kind for r in await audit.list_records(**filters)]

    assert await ids(login="ALICE@example.com") == ["auth-failure", "alice@example.com"]
    assert await ids(sender="bob@corp.example") == ["Bob@Corp.Example"]
    assert await ids(sender="@CORP.example") == ["Bob@Corp.Example"]
    assert await ids(recipient="BOB@example.net") == ["alice@example.com"]
    assert await ids(recipient="@other.org") == ["Bob@Corp.Example"]
    assert await ids(recipient="@example") == []  # a domain match is the whole domain
    assert await ids(check_id="recipient-limit") == ["alice@example.com"]
    assert await ids(outcome="rejected") == ["Bob@Corp.Example"]
    assert await ids(kind="auth-failure") == ["auth-failure"]
    assert await ids(login="alice@example.com", kind="message") == ["alice@example.com"]
    assert await ids(sender="%") == []  # LIKE wildcards are not wildcards here
    now = datetime.now(UTC)
    assert len(await ids(since=now - timedelta(minutes=5))) == 3
    assert await ids(since=now + timedelta(minutes=5)) == []
    assert await ids(until=now - timedelta(minutes=5)) == []
    with pytest.raises(ValueError):
        await audit.list_records(since=datetime(2024, 1, 1))  # naive: ambiguous


async def test_group_commit_many_concurrent_writers(stores: Stores) -> None:
    engine = stores.engine
    commits = 0

    def count(_conn: Any) -> None:
        nonlocal commits
        commits += 1

    event.listen(engine.sync_engine, "commit", count)  # type: ignore[attr-defined]
    txns = [make_txn(mail_from=f"sender{i}@example.com") for i in range(300)]
    try:
        ids = await asyncio.gather(*(stores.audit.begin_message(t) for t in txns))
        for t in txns:
            t.set_pending(RecipientStatus.DELIVERED, "250 ok")
        await asyncio.gather(
            *(
                stores.audit.finish_message(i, t, "delivered")
                for i, t in zip(ids, txns, strict=True)
            )
        )
    finally:
        event.remove(engine.sync_engine, "commit", count)  # type: ignore[attr-defined]

    assert len(set(ids)) == 300
    assert commits < 150  # 600 writes shared far fewer commits
    records = {r.id: r for r in await stores.audit.list_records(limit=1000)}
    for audit_id, t in zip(ids, txns, strict=True):
        assert records[audit_id].transaction_id == t.id  # each caller got its own record's id
        assert records[audit_id].mail_from == t.mail_from
        assert records[audit_id].outcome == "delivered"
        assert [r.status for r in records[audit_id].recipients] == ["delivered", "delivered"]


async def test_linger_lets_records_arriving_during_a_write_share_the_next_commit(
    db_config: Any,
) -> None:
    # under load (a record is pending when a write finishes) the writer waits `linger` for more:
    # w2 waits during w1's write; w3 and w4 come right after w1's commit; with the linger all three
    # share one commit (without it, w2 would be written alone at once: three commits)
    engine = engine_for_url(db_config.database_url)
    audit = SqlAuditStore(engine, batch_size=256, timeout=5.0, linger=0.5)
    await audit.start()
    commits = 0

    def count(_conn: Any) -> None:
        nonlocal commits
        commits += 1

    event.listen(engine.sync_engine, "commit", count)  # type: ignore[attr-defined]
    try:
        w1 = asyncio.ensure_future(audit.record_transaction(make_txn(), "aborted"))
        while not audit._pending:  # w1 submitted
            await asyncio.sleep(0)
        while audit._pending:  # ... and taken by the writer, which is writing it now
            await asyncio.sleep(0)
        w2 = asyncio.ensure_future(audit.record_transaction(make_txn(), "aborted"))
        await w1
        assert not w2.done()
        rest = [audit.record_transaction(make_txn(), "aborted") for _ in range(2)]
        await asyncio.gather(w2, *rest)
    finally:
        event.remove(engine.sync_engine, "commit", count)  # type: ignore[attr-defined]
        await audit.close()
    assert commits == 2
    assert len(await audit.list_records(limit=10)) == 4
    await engine.dispose()


async def test_an_idle_writer_does_not_linger(db_config: Any) -> None:
    engine = engine_for_url(db_config.database_url)
    audit = SqlAuditStore(engine, batch_size=256, timeout=5.0, linger=1.0)
    await audit.start()
    try:
        for _ in range(3):  # one at a time: each finds the writer idle and is written at once
            await asyncio.wait_for(audit.record_transaction(make_txn(), "aborted"), 0.9)
    finally:
        await audit.close()
        await engine.dispose()


def test_linger_is_bounded() -> None:
    engine = engine_for_url("sqlite+aiosqlite://")
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="linger"):
            SqlAuditStore(engine, batch_size=4, timeout=5.0, linger=bad)


async def test_a_bad_row_fails_only_its_own_write(stores: Stores) -> None:
    txn = make_txn()
    good = [make_txn() for _ in range(20)]
    results = await asyncio.gather(
        stores.audit.finish_message(999_999, txn, "delivered"),  # no such record: FK violation
        *(stores.audit.record_transaction(t, "aborted") for t in good),
        return_exceptions=True,
    )
    assert isinstance(results[0], AuditUnavailable)
    assert results[1:] == [None] * 20
    assert len(await stores.audit.list_records(limit=100)) == 20
    # the writer survived
    assert await stores.audit.begin_message(make_txn()) > 0


async def test_no_message_body_is_stored_and_client_text_is_sanitised(
    stores: Stores,
) -> None:
    session = make_session()
    session.helo = "evil\x00helo\udcff"  # NUL and a lone surrogate (PostgreSQL refuses both raw)
    txn = make_txn(session)
    audit_id = await stores.audit.begin_message(txn)
    record = await stores.audit.get_record(audit_id)
    assert record is not None and record.helo is not None
    assert "\x00" not in record.helo and record.helo.startswith("evil")

    async with stores.engine.connect() as conn:
        rows = []
        for table in (RECORD, RECIPIENT, VERDICT):
            rows += [tuple(r) for r in (await conn.execute(select(table))).all()]
    dump = repr(rows)
    assert "launch codes" not in dump and "top secret" not in dump


async def test_closed_store_refuses_writes_and_close_flushes_pending(db_config: Any) -> None:
    engine = engine_for_url(db_config.database_url)
    audit = SqlAuditStore(engine, batch_size=4, timeout=5.0)
    await audit.start()
    writes = [
        asyncio.ensure_future(audit.record_transaction(make_txn(), "aborted")) for _ in range(30)
    ]
    await asyncio.sleep(0)  # all enqueued
    await audit.close()
    assert all(w.done() and w.exception() is None for w in writes)
    with pytest.raises(AuditUnavailable):
        await audit.record_transaction(make_txn(), "aborted")
    reader = SqlAuditStore(engine, batch_size=4, timeout=5.0)
    assert len(await reader.list_records(limit=100)) == 30
    await engine.dispose()


async def test_unreachable_database_raises_audit_unavailable_promptly(
    db_backend: str, tmp_path: Path
) -> None:
    engine = engine_for_url(unreachable_url(db_backend, tmp_path), timeout=2.0)
    audit = SqlAuditStore(engine, batch_size=16, timeout=2.0)
    await audit.start()
    start = time.monotonic()
    try:
        results = await asyncio.gather(
            audit.begin_message(make_txn()),
            audit.record_session_event(make_session(), "dropped", "x"),
            return_exceptions=True,
        )
        with pytest.raises(AuditUnavailable) as info:
            await audit.list_records()
    finally:
        await audit.close()
        await engine.dispose()
    assert all(isinstance(r, AuditUnavailable) for r in results)
    assert time.monotonic() - start < 5
    assert "secret-pw" not in str(info.value)
    assert info.value.reply is replies.AUDIT_UNAVAILABLE


async def test_slow_database_times_out_and_recovers(db_backend: str, db_url: str) -> None:
    """A lock held elsewhere: writers get AuditUnavailable after ``timeout``; a record whose commit
    came too late is completed as deferred; once the lock is gone the store works again."""
    engine = engine_for_url(db_url, timeout=1.0)
    audit = SqlAuditStore(engine, batch_size=16, timeout=0.5)
    await audit.start()
    blocker = engine_for_url(db_url, timeout=1.0)
    try:
        await audit.record_session_event(make_session(), "dropped", "warm-up")
        async with blocker.connect() as conn:
            trans = await conn.begin()
            if db_backend == "sqlite":
                await conn.execute(text("UPDATE audit_record SET detail = detail"))
            else:
                await conn.execute(text("LOCK TABLE audit_record IN ACCESS EXCLUSIVE MODE"))
            start = time.monotonic()
            with pytest.raises(AuditUnavailable):
                await audit.begin_message(make_txn())
            assert time.monotonic() - start < 2
            await trans.rollback()
        await asyncio.sleep(1.5)  # the blocked batch ends (driver-level timeout or success)
        assert await audit.begin_message(make_txn()) > 0
        newest, late = await audit.list_records(kind="message")
        assert newest.outcome == "relaying"
        # the timed-out begin was committed after its caller gave up (it answered 451)
        assert late.outcome == "deferred"
        assert late.final_reply == replies.AUDIT_UNAVAILABLE.line()
        assert {r.status for r in late.recipients} == {"deferred"}
    finally:
        await audit.close()
        await blocker.dispose()
        await engine.dispose()
