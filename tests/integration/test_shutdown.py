"""Shutdown (SIGTERM): stop accepting, let transactions in flight finish, keep the queue.

What it tests: with the in-process gateway (``tests/fixtures/gateway.py``) and with a real
``mailward serve`` subprocess sent SIGTERM: during the grace period a new connection is answered
``421 4.3.2`` and closed, an idle session is closed with that 421 at once, a transaction in flight
finishes (its client gets the upstream's 250, then the 421), a session still in the middle of a
transaction when the grace ends gets the 421 and its transaction is audited as dropped; the queue
runner stops and the queue is kept: a restarted gateway with the same spool and listeners releases
its previous run's claims at start (stable worker id) and delivers the queued message exactly once.

Reads: nothing outside the test's temporary directory and databases.

Security notes: none (test code).
"""

from __future__ import annotations

import asyncio
import signal
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from gateway.queue import QUEUED
from gateway.smtp.capture import CaptureThread
from tests.fixtures.gateway import ALICE, RunningGateway
from tests.fixtures.parallel import unused_port

BOB = "bob@example.net"
MSG = (
    f"From: {ALICE}\r\nTo: {BOB}\r\nSubject: shutdown\r\nMessage-ID: <shutdown@test>\r\n\r\nhi\r\n"
).encode()
MAILWARD = [sys.executable, "-m", "gateway.cli"]

MakeGateway = Callable[..., RunningGateway]


def first_line(port: int, timeout: float = 10.0) -> bytes:
    """The first line a new connection gets."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        data = b""
        while not data.endswith(b"\r\n"):
            chunk = sock.recv(1024)
            if not chunk:
                break
            data += chunk
        return data


def wait_for(predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def begin_stop(gw: RunningGateway, grace: float) -> Future[None]:
    future = asyncio.run_coroutine_threadsafe(gw.app.stop(grace=grace), gw.loop)
    wait_for(lambda: gw.app.context is not None and gw.app.context.closing)
    return future


def test_stop_refuses_new_sessions_and_lets_transactions_finish(
    make_gateway: MakeGateway,
) -> None:
    gw = make_gateway()
    busy = gw.smtp()
    idle = gw.smtp()
    assert busy.mail(ALICE)[0] == 250 and busy.rcpt(BOB)[0] == 250
    stopping = begin_stop(gw, grace=20)

    code, text = idle.getreply()  # closed at once: no transaction in flight
    assert (code, text[:5]) == (421, b"4.3.2")
    assert first_line(gw.port("submission")).startswith(b"421 4.3.2 ")  # still listening
    assert first_line(gw.port("plain")).startswith(b"421 4.3.2 ")

    code, _ = busy.data(MSG)  # the transaction in flight finishes
    assert code == 250
    code, text = busy.getreply()  # and the session ends with the 421
    assert (code, text[:5]) == (421, b"4.3.2")
    stopping.result(30)
    busy.close()
    idle.close()

    (received,) = gw.upstream.messages
    assert received.rcpt_tos == (BOB,)
    with socket.socket() as sock:  # the listeners are closed now
        assert sock.connect_ex(("127.0.0.1", gw.port("submission"))) != 0


def test_a_transaction_still_open_when_the_grace_ends_is_dropped(
    make_gateway: MakeGateway,
) -> None:
    gw = make_gateway()
    client = gw.smtp()
    assert client.mail(ALICE)[0] == 250 and client.rcpt(BOB)[0] == 250
    started = time.monotonic()
    begin_stop(gw, grace=1.0).result(30)
    assert time.monotonic() - started < 15  # bounded by the grace, not by the client
    code, text = client.getreply()
    assert (code, text[:5]) == (421, b"4.3.2")
    client.close()
    assert gw.upstream.messages == []
    # the stores are closed now: read the record through a fresh engine
    records = gw.run(_records(gw))
    (record,) = [r for r in records if r.kind == "message"]
    assert record.outcome == "dropped" and record.final_reply is None


async def _records(gw: RunningGateway) -> list[Any]:
    from gateway.app import open_stores

    stores = await open_stores(gw.config, migrate=False)
    try:
        return list(await stores.audit.list_records(limit=100))
    finally:
        await stores.close()


def test_queue_survives_a_restart_and_claims_are_released(
    make_gateway: MakeGateway, tmp_path: Path
) -> None:
    spool_dir = str(tmp_path / "shared-spool")
    overrides = {"queue": {"on_upstream_tempfail": "queue", "spool_dir": spool_dir}}
    first = make_gateway(overrides)
    first.upstream_handle.refuse()
    with first.smtp() as client:
        client.sendmail(ALICE, [BOB], MSG)  # queued: the upstream is down
    (queued,) = first.queued(QUEUED)
    # a delivery in flight when the process dies: the claim stays behind
    worker = first.runner.worker
    first.run(first.queue.retry_now(None))
    (claimed,) = first.run(first.queue.claim(worker, limit=10, lease=3600))
    assert claimed.id == queued.id
    first.run(first.app.stop(grace=2))
    assert [p.name for p in Path(spool_dir).iterdir() if p.is_file()] == [
        queued.copies[0].spool_name
    ]

    second = make_gateway(overrides, users=False)
    assert second.runner.worker == worker  # same host, spool and listeners: same worker id
    # released at start: due now, not after the hour-long lease
    second.drain_queue(timeout=15)
    (received,) = second.upstream.messages
    assert received.rcpt_tos == (BOB,) and b"Message-ID: <shutdown@test>" in received.data
    assert first.upstream.messages == []


def _config(tmp_path: Path, port: int, upstream_port: int) -> Path:
    state = tmp_path / "state"
    path = tmp_path / "mailward.toml"
    path.write_text(
        f"""
state_dir = "{state}"

[database]
url = "sqlite+aiosqlite:///{state}/mailward.db"
auto_migrate = true

[smtp]
hostname = "localhost"
trusted_networks = ["127.0.0.0/8"]

[[smtp.listeners]]
name = "plain"
address = "127.0.0.1"
port = {port}
tls = "none"

[relay]
host = "127.0.0.1"
port = {upstream_port}
tls = "none"

[queue]
min_free_space = "1M"
"""
    )
    return path


def test_sigterm_to_mailward_serve(tmp_path: Path, sync_upstream: CaptureThread) -> None:
    port = unused_port()  # mailward serve binds it itself: not an ephemeral one (parallel)
    config = _config(tmp_path, port, sync_upstream.port)
    proc = subprocess.Popen(
        [*MAILWARD, "--config", str(config), "serve"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:

        def greets() -> bool:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            try:
                return first_line(port, timeout=2).startswith(b"220 ")
            except OSError:
                return False

        wait_for(greets, timeout=60)
        client = smtplib.SMTP("127.0.0.1", port, timeout=30)
        client.ehlo("client.example")
        assert client.mail(ALICE)[0] == 250 and client.rcpt(BOB)[0] == 250

        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: first_line(port).startswith(b"421 4.3.2 "))  # refused, not yet gone

        assert client.data(MSG)[0] == 250
        code, text = client.getreply()
        assert (code, text[:5]) == (421, b"4.3.2")
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    (received,) = sync_upstream.upstream.messages
    assert received.rcpt_tos == (BOB,)
