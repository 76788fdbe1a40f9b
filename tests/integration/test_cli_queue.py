"""``mailward queue list|show|retry|hold|release|delete`` against real databases and a real spool.

The tests call ``gateway.cli.main`` in-process (and, for the unreachable database, in a subprocess)
through the real entry point, its parser and its error mapping. Messages are put in the queue with
the real :class:`SqlQueueStore` and :class:`Spool` (what the service does when it takes custody);
state changes are read back from the store, audit events from the audit store, and the bounce of
``delete --bounce`` from its spool file, parsed with the ``email`` package. Every test runs on
SQLite and, when configured, on PostgreSQL.
"""

from __future__ import annotations

import email
import email.policy
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

import gateway.cli
from gateway.audit.store import AuditRecord, SqlAuditStore
from gateway.auth.store import SqlAccountStore
from gateway.db.engine import engine_for_url
from gateway.queue.model import (
    BOUNCED,
    DELETED,
    DELIVERED,
    DROPPED,
    HELD,
    PENDING,
    QUEUED,
    AttemptResult,
    NewCopy,
    QueuedMessage,
)
from gateway.queue.spool import Spool
from gateway.queue.store import SqlQueueStore
from tests.fixtures.db import run_async, unreachable_url

REPO = Path(__file__).resolve().parents[2]
BODY_MARKER = b"QUEUE-BODY-MARKER-never-printed"
MESSAGE = (
    b"From: Alice <alice@example.com>\r\n"
    b"To: bob@example.net, carol@example.org\r\n"
    b"Subject: quarterly report\r\n"
    b"Message-ID: <queued-1@example.com>\r\n"
    b"\r\n" + BODY_MARKER + b"\r\n"
)
LATER = datetime.now(UTC) + timedelta(hours=2)

Cli = Callable[..., tuple[int, str, str]]


@dataclass
class Env:
    db_url: str
    state_dir: Path
    config: Path

    @property
    def spool(self) -> Spool:
        return Spool(self.state_dir / "spool")


def write_config(path: Path, db_url: str, state_dir: Path) -> Path:
    path.write_text(
        f"state_dir = {json.dumps(str(state_dir))}\n"
        f"[database]\nurl = {json.dumps(db_url)}\ntimeout = 5.0\n"
        '[smtp]\nhostname = "gw.mailward.test"\n',
        encoding="utf-8",
    )
    return path


@pytest.fixture
def env(db_url: str, tmp_path: Path) -> Env:
    state_dir = tmp_path / "state"
    return Env(db_url, state_dir, write_config(tmp_path / "mailward.toml", db_url, state_dir))


@pytest.fixture
def cli(env: Env, capsys: pytest.CaptureFixture[str]) -> Cli:
    """Run ``mailward --config FILE ARGV...`` in-process: (exit code, stdout, stderr)."""

    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = gateway.cli.main(["--config", str(env.config), *argv])
        out, err = capsys.readouterr()
        return code, out, err

    return run


async def _with_store(db_url: str, fn: Callable[[SqlQueueStore], Any]) -> Any:
    engine = engine_for_url(db_url, timeout=5.0)
    store = SqlQueueStore(engine, timeout=5.0)
    try:
        return await fn(store)
    finally:
        await store.close()
        await engine.dispose()


def enqueue(
    env: Env,
    recipients: tuple[str, ...] = ("bob@example.net", "carol@example.org"),
    *,
    mail_from: str = "alice@example.com",
    login: str | None = "alice@example.com",
    data: bytes = MESSAGE,
    delivered: tuple[str, ...] = (),
    first_attempt: datetime | None = None,
    is_bounce: bool = False,
) -> int:
    """Take a message into custody as the service does: spool file first, then the row."""
    spooled = env.spool.write(data)
    copy = NewCopy(recipients, spooled.name, spooled.size, spooled.sha256, delivered=delivered)
    return int(
        run_async(
            _with_store(
                env.db_url,
                lambda s: s.enqueue(
                    txn_id=f"sess{len(recipients)}.1",
                    mail_from=mail_from,
                    login=login,
                    copies=[copy],
                    smtputf8=False,
                    body_8bitmime=False,
                    is_bounce=is_bounce,
                    message_id_header="<queued-1@example.com>",
                    first_attempt=first_attempt,
                ),
            )
        )
    )


def get(env: Env, message_id: int) -> QueuedMessage:
    found = run_async(_with_store(env.db_url, lambda s: s.get(message_id)))
    assert isinstance(found, QueuedMessage)
    return found


def listed(env: Env) -> list[QueuedMessage]:
    return list(run_async(_with_store(env.db_url, lambda s: s.list(limit=100))))


def claim(env: Env) -> None:
    claimed = run_async(_with_store(env.db_url, lambda s: s.claim("worker-1", limit=10, lease=600)))
    assert claimed


def audit_events(env: Env, kind: str) -> list[AuditRecord]:
    async def go() -> list[AuditRecord]:
        engine = engine_for_url(env.db_url, timeout=5.0)
        audit = SqlAuditStore(engine, batch_size=10, timeout=5.0)
        try:
            return await audit.list_records(kind=kind, limit=100)
        finally:
            await audit.close()
            await engine.dispose()

    return run_async(go())


def add_account(env: Env, login: str, *addresses: str) -> None:
    async def go() -> None:
        engine = engine_for_url(env.db_url, timeout=5.0)
        accounts = SqlAccountStore(engine, timeout=5.0)
        try:
            await accounts.add_user(login, "a long enough password", addresses)
        finally:
            await accounts.close()
            await engine.dispose()

    run_async(go())


def states(message: QueuedMessage) -> list[str]:
    return [c.state for c in message.copies]


def recipient_states(message: QueuedMessage) -> dict[str, str]:
    return {r.address: r.state for c in message.copies for r in c.recipients}


def assert_one_event(env: Env, kind: str, message_id: int, *words: str) -> AuditRecord:
    [event] = audit_events(env, kind)
    assert event.listener == "cli"
    assert event.queue_id == str(message_id)
    assert event.transaction_id is not None and event.transaction_id.startswith("sess")
    assert event.login == "alice@example.com"
    assert event.detail is not None and "by cli" in event.detail
    for word in words:
        assert word in event.detail
    return event


# --- list / show ---------------------------------------------------------------------------------


def test_list_table_json_state_filter_and_paging(cli: Cli, env: Env) -> None:
    first = enqueue(env)
    second = enqueue(env, ("dave@example.org",), mail_from="", login=None)
    third = enqueue(env, ("erin@example.net",))
    run_async(_with_store(env.db_url, lambda s: s.set_state(third, HELD, origins=(QUEUED,))))

    code, out, err = cli("queue", "list")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["ID", "ARRIVED", "(UTC)", "STATE"]
    assert [line.split()[0] for line in lines[1:]] == [str(third), str(second), str(first)]
    assert "bob@example.net +1" in out and "<>" in out and "held" in out
    assert BODY_MARKER.decode() not in out

    code, out, _ = cli("queue", "list", "--state", "held", "--json")
    assert code == 0
    [row] = [json.loads(line) for line in out.splitlines()]
    assert row["id"] == third and row["state"] == "held" and row["pending"] == 1
    assert row["copies"][0]["recipients"][0]["address"] == "erin@example.net"

    code, out, _ = cli("queue", "list", "--limit", "2")
    assert f"(more may follow: --before-id {second})" in out
    code, out, _ = cli("queue", "list", "--limit", "2", "--before-id", str(second))
    assert [line.split()[0] for line in out.splitlines()[1:]] == [str(first)]

    code, out, _ = cli("queue", "list", "--state", "corrupt")
    assert code == 0 and out.strip() == "no matching queue messages"


def test_bad_options_are_usage_errors(cli: Cli) -> None:
    for argv in (
        ("list", "--state", "bogus"),
        ("list", "--limit", "0"),
        ("show", "x"),
        ("show", "0"),
        ("hold", "-1"),
        ("retry",),
        ("retry", "1", "--all"),
        ("delete", "1"),
        ("delete", "1", "--bounce", "--silently"),
    ):
        with pytest.raises(SystemExit) as info:
            cli("queue", *argv)
        assert info.value.code == 2, argv


def test_show_prints_the_envelope_copies_and_recipients_never_the_body(cli: Cli, env: Env) -> None:
    message_id = enqueue(
        env, ("bob@example.net", "carol\x1b[31m@example.org"), delivered=("bob@example.net",)
    )
    code, out, err = cli("queue", "show", str(message_id))
    assert code == 0, err
    assert f"queue message {message_id}" in out
    assert "alice@example.com" in out and "<queued-1@example.com>" in out
    assert "1. bob@example.net  delivered" in out
    assert "2. carol\\x1b[31m@example.org  pending" in out and "\x1b" not in out
    assert BODY_MARKER.decode() not in out and "quarterly report" not in out

    code, out, _ = cli("queue", "show", str(message_id), "--json")
    data = json.loads(out)
    assert data["id"] == message_id and data["pending"] == 1
    assert [r["state"] for r in data["copies"][0]["recipients"]] == [DELIVERED, PENDING]


def test_unknown_ids_are_one_line_and_exit_1(cli: Cli) -> None:
    for argv in (
        ("show", "4242"),
        ("retry", "4242"),
        ("hold", "4242"),
        ("release", "4242"),
        ("delete", "4242", "--silently"),
        ("delete", "4242", "--bounce"),
    ):
        code, out, err = cli("queue", *argv)
        assert code == 1 and out == "", argv
        assert err.strip() == "mailward: no queue message 4242"


# --- retry / hold / release ----------------------------------------------------------------------


def test_hold_and_release_change_the_state_and_are_audited(cli: Cli, env: Env) -> None:
    message_id = enqueue(env, first_attempt=LATER)

    code, out, err = cli("queue", "hold", str(message_id))
    assert code == 0, err
    assert out.startswith(f"queue {message_id}: held (1 copy, audit record ")
    assert states(get(env, message_id)) == [HELD]
    assert_one_event(env, "queue-hold", message_id, "held")

    code, out, _ = cli("queue", "hold", str(message_id))
    assert code == 0 and "already held; nothing changed" in out
    assert len(audit_events(env, "queue-hold")) == 1

    code, out, err = cli("queue", "retry", str(message_id))
    assert code == 1 and out == ""
    assert f"queue {message_id} is held: release it first" in err

    before = datetime.now(UTC)
    code, out, err = cli("queue", "release", str(message_id))
    assert code == 0, err
    assert "released, due now" in out
    [copy] = get(env, message_id).copies
    assert copy.state == QUEUED
    assert copy.next_attempt is not None and copy.next_attempt <= datetime.now(UTC)
    assert copy.next_attempt >= before - timedelta(seconds=5)
    assert_one_event(env, "queue-release", message_id, "released")

    code, out, _ = cli("queue", "release", str(message_id))
    assert code == 0 and "not held (queued); nothing changed" in out
    assert len(audit_events(env, "queue-release")) == 1


def test_retry_makes_a_message_due_now(cli: Cli, env: Env) -> None:
    message_id = enqueue(env, first_attempt=LATER)
    other = enqueue(env, ("zed@example.net",), first_attempt=LATER)
    code, out, err = cli("queue", "retry", str(message_id))
    assert code == 0, err
    assert out.startswith(f"queue {message_id}: due now (1 copy")
    [copy] = get(env, message_id).copies
    assert copy.next_attempt is not None and copy.next_attempt <= datetime.now(UTC)
    [untouched] = get(env, other).copies
    assert untouched.next_attempt is not None and untouched.next_attempt > datetime.now(UTC)
    assert_one_event(env, "queue-retry", message_id, "due now")


def test_retry_all_makes_every_queued_copy_due_and_is_one_event(cli: Cli, env: Env) -> None:
    ids = [enqueue(env, first_attempt=LATER) for _ in range(3)]
    code, out, err = cli("queue", "retry", "--all")
    assert code == 0, err
    assert out.startswith("queue: 3 copies due now (audit record ")
    for message_id in ids:
        [copy] = get(env, message_id).copies
        assert copy.next_attempt is not None and copy.next_attempt <= datetime.now(UTC)
    [event] = audit_events(env, "queue-retry")
    assert event.listener == "cli" and event.queue_id is None
    assert event.detail is not None and "retry --all by cli" in event.detail


def test_a_copy_being_delivered_is_left_alone(cli: Cli, env: Env) -> None:
    message_id = enqueue(env)
    claim(env)
    for argv in (("hold",), ("retry",), ("delete", "--silently")):
        code, out, err = cli("queue", argv[0], str(message_id), *argv[1:])
        assert code == 1 and out == "", argv
        assert "being delivered right now" in err
    assert states(get(env, message_id)) == [QUEUED]
    for kind in ("queue-hold", "queue-retry", "queue-delete"):
        assert audit_events(env, kind) == []


# --- delete --------------------------------------------------------------------------------------


def test_delete_silently_drops_the_pending_recipients_and_erases_the_file(
    cli: Cli, env: Env
) -> None:
    message_id = enqueue(env, delivered=("bob@example.net",))
    [copy] = get(env, message_id).copies
    assert env.spool.path(copy.spool_name).exists()

    code, out, err = cli("queue", "delete", str(message_id), "--silently")
    assert code == 0, err
    assert out.startswith(f"queue {message_id}: deleted silently; 1 pending recipient(s) dropped")
    after = get(env, message_id)
    assert states(after) == [DELETED]
    assert recipient_states(after) == {"bob@example.net": DELIVERED, "carol@example.org": DROPPED}
    [carol] = [r for r in after.copies[0].recipients if r.state == DROPPED]
    assert carol.last_reply is not None and "deleted from the queue" in carol.last_reply
    assert not env.spool.path(copy.spool_name).exists()
    assert [m.id for m in listed(env)] == [message_id]  # no bounce queued
    assert_one_event(env, "queue-delete", message_id, "silently")

    code, out, err = cli("queue", "delete", str(message_id), "--silently")
    assert code == 1 and f"queue {message_id} has nothing to delete: it is deleted" in err


def parse(data: bytes) -> EmailMessage:
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


def test_delete_with_a_bounce_queues_a_dsn_to_the_sender(cli: Cli, env: Env) -> None:
    add_account(env, "alice@example.com", "alice@example.com")
    message_id = enqueue(env, delivered=("bob@example.net",))

    code, out, err = cli("queue", "delete", str(message_id), "--bounce")
    assert code == 0, err
    after = get(env, message_id)
    assert states(after) == [DELETED]
    assert recipient_states(after) == {"bob@example.net": DELIVERED, "carol@example.org": BOUNCED}

    [dsn] = [m for m in listed(env) if m.id != message_id]
    assert f"deleted with a bounce (queue {dsn.id}); 1 pending recipient(s) bounced" in out
    assert dsn.is_bounce and dsn.mail_from == "" and dsn.login == "alice@example.com"
    assert dsn.txn_id == f"{after.txn_id}.dsn"
    [dsn_copy] = dsn.copies
    assert dsn_copy.state == QUEUED
    assert [r.address for r in dsn_copy.recipients] == ["alice@example.com"]

    body = env.spool.read(dsn_copy.spool_name, size=dsn_copy.size, sha256=dsn_copy.sha256)
    assert dsn.message_id_header is not None and dsn.message_id_header.encode() in body
    assert BODY_MARKER not in body
    report = parse(body)
    assert report.get_content_type() == "multipart/report"
    assert report["To"].addresses[0].addr_spec == "alice@example.com"
    text, status, headers = list(report.iter_parts())
    assert "<carol@example.org>: deleted from the queue by the postmaster" in " ".join(
        text.get_content().split()
    )
    assert "bob@example.net" not in text.get_content()  # delivered: not in the bounce
    blocks = status.get_payload()
    assert isinstance(blocks, list) and len(blocks) == 2
    assert blocks[1]["Final-Recipient"] == "rfc822; carol@example.org"
    assert blocks[1]["Action"] == "failed" and blocks[1]["Status"] == "5.0.0"
    assert "deleted from the queue by the postmaster" in blocks[1]["Diagnostic-Code"]
    assert "Message-ID: <queued-1@example.com>" in headers.get_content()

    assert_one_event(env, "queue-delete", message_id, f"with a bounce (queue {dsn.id})")


@pytest.mark.parametrize(
    ("setup", "reason"),
    [
        ({"is_bounce": True, "mail_from": ""}, "never a bounce for a bounce"),
        ({"mail_from": "", "login": None}, "null reverse-path"),
        (
            {"data": b"Auto-Submitted: auto-generated\r\nSubject: cron\r\n\r\nx\r\n"},
            "Auto-Submitted",
        ),
        ({"mail_from": "someone-else@example.org"}, "no backscatter"),
        ({"login": None}, "no backscatter"),
    ],
)
def test_delete_with_a_bounce_is_refused_where_the_runner_would_not_bounce(
    cli: Cli, env: Env, setup: dict[str, Any], reason: str
) -> None:
    add_account(env, "alice@example.com", "alice@example.com")
    message_id = enqueue(env, **setup)
    code, out, err = cli("queue", "delete", str(message_id), "--bounce")
    assert code == 1 and out == ""
    assert f"queue {message_id} may not be bounced: " in err
    assert reason in err and "use --silently" in err
    assert states(get(env, message_id)) == [QUEUED]
    assert len(listed(env)) == 1
    assert audit_events(env, "queue-delete") == []


def test_the_audit_cli_lists_queue_events(cli: Cli, env: Env) -> None:
    message_id = enqueue(env)
    assert cli("queue", "hold", str(message_id))[0] == 0
    code, out, err = cli("audit", "list", "--kind", "queue-hold", "--json")
    assert code == 0, err
    [row] = [json.loads(line) for line in out.splitlines()]
    assert row["kind"] == "queue-hold" and row["queue_id"] == str(message_id)


# --- a change and its audit event are one transaction ----------------------------------------


def execute(env: Env, statement: str) -> None:
    async def go() -> None:
        engine = engine_for_url(env.db_url, timeout=5.0)
        try:
            async with engine.begin() as conn:
                await conn.execute(text(statement))
        finally:
            await engine.dispose()

    run_async(go())


def snapshot(env: Env) -> list[tuple[int, str, str, str, str | None]]:
    """Every copy and recipient of the queue: (message, copy state, next attempt, address,
    recipient state)."""
    return [
        (m.id, c.state, str(c.next_attempt), r.address, r.state)
        for m in listed(env)
        for c in m.copies
        for r in c.recipients
    ]


@pytest.mark.parametrize(
    ("setup", "argv"),
    [
        (QUEUED, ("hold",)),
        (HELD, ("release",)),
        (QUEUED, ("retry",)),
        (QUEUED, ("retry", "--all")),
        (QUEUED, ("delete", "--silently")),
        (QUEUED, ("delete", "--bounce")),
    ],
    ids=["hold", "release", "retry", "retry-all", "delete-silently", "delete-bounce"],
)
def test_no_change_without_its_audit_event(
    cli: Cli, env: Env, setup: str, argv: tuple[str, ...]
) -> None:
    """The change and its audit event are one database transaction: when the event cannot be
    written, the queue is unchanged (no state, schedule or recipient changed, no DSN queued, the
    spool files kept), the command says so (exit 1), and it works once the audit log is back."""
    add_account(env, "alice@example.com", "alice@example.com")
    message_id = enqueue(env, first_attempt=LATER)
    if setup == HELD:
        run_async(
            _with_store(env.db_url, lambda s: s.set_state(message_id, HELD, origins=(QUEUED,)))
        )
    command = (argv[0], str(message_id), *argv[1:]) if argv != ("retry", "--all") else argv
    before = snapshot(env)
    files = {p.name for p in env.spool.directory.iterdir() if p.is_file()}

    execute(env, "ALTER TABLE audit_record RENAME TO audit_record_away")
    try:
        code, out, err = cli("queue", *command)
    finally:
        execute(env, "ALTER TABLE audit_record_away RENAME TO audit_record")
    assert code == 1 and out == "", err
    assert err.startswith("mailward: ") and "nothing changed" in err and "unavailable" in err
    assert len(err.strip().splitlines()) == 1
    assert snapshot(env) == before
    # the spool files are kept (a bounce's own file, written before, is an orphan: swept later)
    assert {p.name for p in env.spool.directory.iterdir() if p.is_file()} >= files
    kind = f"queue-{argv[0]}"
    assert audit_events(env, kind) == []

    code, out, err = cli("queue", *command)
    assert code == 0, err
    assert snapshot(env) != before
    assert len(audit_events(env, kind)) == 1


def test_a_bounce_names_exactly_the_recipients_the_delete_ends(
    cli: Cli, env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The DSN is written from what the command read; if a delivery recorded results in between
    (here: bob delivered), the delete would end other recipients than the DSN names: it changes
    nothing, queues no DSN, erases the unused bounce file and asks to be run again."""
    add_account(env, "alice@example.com", "alice@example.com")
    message_id = enqueue(env)
    stale = get(env, message_id)

    async def deliver_bob(store: SqlQueueStore) -> None:
        (claimed,) = await store.claim("worker-1", limit=1, lease=600)
        result = AttemptResult({"bob@example.net": (DELIVERED, "250 ok", None)}, "250 ok")
        await store.record_attempt(claimed.copies[0].id, "worker-1", result, next_attempt=LATER)

    run_async(_with_store(env.db_url, deliver_bob))
    before = snapshot(env)
    files = {p.name for p in env.spool.directory.iterdir() if p.is_file()}

    async def stale_get(self: SqlQueueStore, wanted: int) -> QueuedMessage | None:
        return stale if wanted == message_id else None

    monkeypatch.setattr(SqlQueueStore, "get", stale_get)
    code, out, err = cli("queue", "delete", str(message_id), "--bounce")
    monkeypatch.undo()
    assert code == 1 and out == ""
    assert f"queue {message_id} changed while it was being deleted; nothing changed" in err
    assert snapshot(env) == before and [m.id for m in listed(env)] == [message_id]
    assert {p.name for p in env.spool.directory.iterdir() if p.is_file()} == files
    assert audit_events(env, "queue-delete") == []

    code, out, err = cli("queue", "delete", str(message_id), "--bounce")  # read afresh: fine
    assert code == 0, err
    assert recipient_states(get(env, message_id)) == {
        "bob@example.net": DELIVERED,
        "carol@example.org": BOUNCED,
    }
    [dsn] = [m for m in listed(env) if m.id != message_id]
    body = env.spool.read(dsn.copies[0].spool_name)
    assert b"carol@example.org" in body and b"Final-Recipient: rfc822; bob" not in body


# --- database down -------------------------------------------------------------------------------


ENTRY = "import sys, gateway.cli as c; sys.exit(c.main(sys.argv[1:]))"


@pytest.mark.parametrize(
    "argv",
    [
        ("queue", "list"),
        ("queue", "show", "1"),
        ("queue", "retry", "--all"),
        ("queue", "hold", "1"),
        ("queue", "delete", "1", "--bounce"),
    ],
)
def test_unreachable_database_is_one_line_and_exit_1(
    db_backend: str, tmp_path: Path, argv: tuple[str, ...]
) -> None:
    config = write_config(tmp_path / "m.toml", unreachable_url(db_backend, tmp_path), tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MAILWARD_CONFIG", None)
    result = subprocess.run(
        [sys.executable, "-c", ENTRY, "--config", str(config), *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mailward: ") and "unavailable" in lines[0]
    assert "secret-pw" not in result.stderr
