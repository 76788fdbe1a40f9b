"""Durable queue follow-ups: what a crash leaves in the audit log, shutdown grace, corrupt copies
found at start, and the relay pool in queue mode.

What it tests, with the real gateway (``tests/fixtures/gateway.py``: real listeners, TLS, relay,
spool, queue store and runner), a real capture upstream told to misbehave, and the real database
(SQLite and, when MAILWARD_TEST_POSTGRES_URL is set, PostgreSQL):

* audit records left ``relaying`` by a gateway that died mid-transaction are completed at the next
  start, before it listens: ``queued`` (with the queue id) when their message is in the queue,
  else ``interrupted``, each with a detail saying the gateway stopped before the outcome was
  known; a recent one (a live transaction, maybe of another gateway sharing the database) and a
  finished one are left alone; a live finish still overwrites the mark;
* ``smtp.shutdown_grace`` is the grace :meth:`GatewayApp.stop` uses (SIGTERM) when not told one;
* a copy whose spool file is found damaged at start (``QueueRunner.recover``) is set corrupt and
  audited ``queue-corrupt``, like one found during a delivery;
* in queue mode, with the upstream answering 450 to every RCPT, the upstream transaction opened at
  RCPT time is closed at the end of data: with ``relay.pool_size = 1`` several such messages in a
  row are all queued with the pool slot free after each, and all delivered by the runner once the
  upstream is healthy (the relay pool leak the soak test found).

Reads: nothing outside the test's temporary directory and databases.

Security notes: none (test code).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from gateway.app import relaying_bound
from gateway.audit.store import SqlAuditStore
from gateway.config import load_config
from gateway.core.errors import ConfigError
from gateway.core.model import (
    Identity,
    Recipient,
    RecipientStatus,
    Session,
    Transaction,
    utcnow,
)
from gateway.db.engine import engine_for_url
from gateway.queue import CORRUPT, DONE, QUEUED, NewCopy, SqlQueueStore
from gateway.queue.spool import Spool
from gateway.smtp import capture
from tests.fixtures.db import run_async
from tests.fixtures.gateway import ALICE, RunningGateway

BOB = "bob@example.net"
MakeGateway = Callable[..., RunningGateway]


def message(n: int) -> bytes:
    return (
        f"From: {ALICE}\r\nTo: {BOB}\r\nSubject: follow-up {n}\r\n"
        f"Message-ID: <followup-{n}@example.com>\r\n\r\nhello {n}\r\n"
    ).encode()


# --- audit records left "relaying" by a crash ----------------------------------------------------


def _txn(txn_id: str, started_at: datetime) -> Transaction:
    session = Session(client_ip="192.0.2.7", client_port=40000, listener="submission")
    session.identity = Identity(login=ALICE, account_id=None)
    txn = Transaction(session, ALICE, id=txn_id, started_at=started_at)
    txn.recipients = [Recipient(BOB, RecipientStatus.ACCEPTED, "250 2.1.5 Ok")]
    return txn


async def _seed_crash_leftovers(db_url: str, spool_dir: Path) -> dict[str, int]:
    """What gateways that died mid-transaction leave: "relaying" audit records (one whose
    message is in the queue by its audit id, one by its transaction id, one lost), next to a
    recent one (a transaction still live) and a finished one. Name -> record id; "queue" and
    "queue-by-txn" -> queue ids."""
    engine = engine_for_url(db_url, timeout=5.0)
    audit = SqlAuditStore(engine, batch_size=10, timeout=5.0)
    queue = SqlQueueStore(engine, timeout=5.0)
    spool = Spool(spool_dir)
    spool.ensure()
    await audit.start()
    old = utcnow() - timedelta(days=1)
    ids: dict[str, int] = {}
    try:
        for name, started in (
            ("lost", old),
            ("queued", old),
            ("queued-by-txn", old),
            ("finished", old),
            ("recent", utcnow() - timedelta(seconds=30)),
        ):
            ids[name] = await audit.begin_message(_txn(f"crash-{name}.1", started))
        await audit.finish_message(ids["finished"], _txn("crash-finished.1", old), "delivered")
        for name, audit_id in (("queued", ids["queued"]), ("queued-by-txn", None)):
            spooled = spool.write(message(len(ids)))
            ids[f"queue-{name}"] = await queue.enqueue(
                txn_id=f"crash-{name}.1",
                mail_from=ALICE,
                login=ALICE,
                copies=[NewCopy((BOB,), spooled.name, spooled.size, spooled.sha256)],
                smtputf8=False,
                body_8bitmime=False,
                audit_id=audit_id,
                first_attempt=utcnow() + timedelta(days=1),  # not attempted during the test
            )
    finally:
        await audit.close()
        await queue.close()
        await engine.dispose()
    return ids


def test_records_left_relaying_by_a_crash_are_completed_at_start(
    make_gateway: MakeGateway, db_url: str, tmp_path: Path
) -> None:
    spool_dir = tmp_path / "spool"
    ids = run_async(_seed_crash_leftovers(db_url, spool_dir))
    gw = make_gateway({"queue": {"spool_dir": str(spool_dir)}})
    assert relaying_bound(gw.config) < timedelta(days=1).total_seconds()
    assert gw.app.stores is not None
    audit = gw.app.stores.audit
    records = {name: gw.run(audit.get_record(ids[name])) for name in ids if "queue-" not in name}

    lost = records["lost"]
    assert lost is not None and lost.outcome == "interrupted" and lost.ended_at is not None
    assert lost.detail is not None and "stopped" in lost.detail
    assert "before the outcome was known" in lost.detail
    assert lost.queue_id is None and lost.final_reply is None
    assert [(r.address, r.status) for r in lost.recipients] == [(BOB, "accepted")]

    for name in ("queued", "queued-by-txn"):
        record = records[name]
        queue_id = str(ids[f"queue-{name}"])
        assert record is not None and record.outcome == "queued", name
        assert record.queue_id == queue_id and record.ended_at is not None
        assert record.detail is not None and f"in the queue as {queue_id}" in record.detail

    recent = records["recent"]  # maybe a live transaction (of another gateway): untouched
    assert recent is not None and recent.outcome == "relaying" and recent.ended_at is None
    finished = records["finished"]
    assert finished is not None and finished.outcome == "delivered" and finished.detail is None

    listed = {r.id for r in gw.records(outcome="interrupted")}
    assert listed == {ids["lost"]}

    # a transaction that was live after all (its gateway slow, not dead) still has the last word
    txn = _txn("crash-lost.1", lost.started_at)
    txn.recipients[0].status = RecipientStatus.DELIVERED
    gw.run(audit.finish_message(ids["lost"], txn, "delivered"))
    corrected = gw.run(audit.get_record(ids["lost"]))
    assert corrected is not None and corrected.outcome == "delivered"
    assert corrected.detail is None


# --- shutdown grace ------------------------------------------------------------------------------


def test_stop_uses_the_configured_shutdown_grace(
    make_gateway: MakeGateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mailward.app")
    gw = make_gateway({"smtp": {"shutdown_grace": "1s"}})
    assert gw.config.smtp.shutdown_grace_seconds == 1.0
    client = gw.smtp()
    assert client.mail(ALICE)[0] == 250 and client.rcpt(BOB)[0] == 250
    gw.run(gw.app.stop(), timeout=60)  # what SIGTERM does: no grace given
    assert any(
        "stopping: new connections refused, 1s for transactions in flight" in r.getMessage()
        for r in caplog.records
    )
    code, text = client.getreply()  # the transaction outlived the grace: closed with the 421
    assert (code, text[:5]) == (421, b"4.3.2")
    client.close()
    assert gw.upstream.messages == []


def test_default_and_bad_shutdown_grace() -> None:
    assert load_config().smtp.shutdown_grace_seconds == 10.0
    with pytest.raises(ConfigError, match="shutdown_grace"):
        load_config(overrides={"smtp": {"shutdown_grace": "soon"}})


# --- a copy found corrupt at start ---------------------------------------------------------------


async def _enqueue_damaged(db_url: str, spool_dir: Path) -> int:
    engine = engine_for_url(db_url, timeout=5.0)
    queue = SqlQueueStore(engine, timeout=5.0)
    spool = Spool(spool_dir)
    spool.ensure()
    try:
        spooled = spool.write(message(1))
        queue_id = await queue.enqueue(
            txn_id="crashed.1",
            mail_from=ALICE,
            login=ALICE,
            copies=[NewCopy((BOB,), spooled.name, spooled.size, spooled.sha256)],
            smtputf8=False,
            body_8bitmime=False,
        )
    finally:
        await queue.close()
        await engine.dispose()
    path = spool.path(spooled.name)
    path.write_bytes(path.read_bytes()[:-10])  # what a crash in a disk write could leave
    return queue_id


def test_a_copy_found_corrupt_at_start_is_audited(
    make_gateway: MakeGateway, db_url: str, tmp_path: Path
) -> None:
    spool_dir = tmp_path / "spool"
    queue_id = run_async(_enqueue_damaged(db_url, spool_dir))
    gw = make_gateway({"queue": {"spool_dir": str(spool_dir)}})
    (m,) = gw.queued()
    assert m.id == queue_id and [c.state for c in m.copies] == [CORRUPT]
    (event,) = gw.records(kind="queue-corrupt")
    assert event.queue_id == str(queue_id) and event.transaction_id == "crashed.1"
    assert event.login == ALICE and event.listener == "queue"
    assert event.detail == f"queue {queue_id} copy {m.copies[0].id} (message) corrupt, never sent"
    assert gw.upstream.messages == []


# --- the relay pool in queue mode ----------------------------------------------------------------


def _pool(gw: RunningGateway) -> tuple[int, int]:
    """(open, idle) connections of the gateway's relay pool, read on its loop."""

    async def read() -> tuple[int, int]:
        relay = gw.app.relay
        assert relay is not None
        return relay.open_connections, relay.idle_connections

    return gw.run(read())


def _send(gw: RunningGateway, n: int) -> str:
    with gw.smtp() as client:
        assert client.mail(ALICE)[0] == 250
        assert client.rcpt(BOB)[0] == 250  # the upstream said 450: accepted locally
        code, text = client.data(message(n))
    return f"{code} {text.decode()}"


def test_rcpt_tempfail_in_queue_mode_frees_the_relay_connection(
    make_gateway: MakeGateway,
) -> None:
    gw = make_gateway(
        {
            "queue": {"on_upstream_tempfail": "queue", "runner_interval": "1h"},
            "relay": {"pool_size": 1},
        }
    )
    gw.upstream.inject("RCPT", capture.reply("450 4.2.1 Mailbox busy, try later", times=None))
    queue_ids: list[int] = []
    for n in range(4):
        reply = _send(gw, n)
        found = re.match(r"250 2\.0\.0 Ok: queued as (\d+) \(transaction .*retried", reply)
        assert found, reply
        queue_ids.append(int(found.group(1)))
        # the upstream transaction opened at RCPT time was closed: its slot is free again
        opened, idle = _pool(gw)
        assert opened == idle <= 1, (n, opened, idle)
    commands = [c for conn in gw.upstream.connections for c in conn.commands]
    assert commands.count("MAIL") == 4 and commands.count("RSET") >= 4
    assert gw.upstream.messages == []

    gw.upstream.clear_faults()
    gw.drain_queue()
    received = sorted(
        m.data.split(b"Message-ID: ")[1].split(b"\r\n")[0] for m in gw.upstream.messages
    )
    assert received == [f"<followup-{n}@example.com>".encode() for n in range(4)]
    for queue_id in queue_ids:
        queued = gw.run(gw.queue.get(queue_id))
        assert queued is not None and [c.state for c in queued.copies] == [DONE]
    assert gw.queued(QUEUED) == []
    opened, idle = _pool(gw)
    assert opened == idle <= 1
