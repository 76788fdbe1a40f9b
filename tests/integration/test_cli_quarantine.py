"""``mailward quarantine list|show|release|delete`` against real databases and a real upstream.

The tests call ``gateway.cli.main`` in-process (and, for the failure paths, in a subprocess) with
"quarantine" in ``gateway.cli.SUBCOMMAND_MODULES`` -- added here when the CLI does not list it yet,
so the module is exercised through the real entry point, its parser and its error mapping either
way. Releases go through a real UpstreamRelay to a CaptureUpstream running in its own thread.
Decisions are checked in the audit log as well (read back with the real SqlAuditStore), and
client-supplied text with terminal control and bidi characters is checked to be printed escaped.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

import gateway.cli
from gateway.audit.store import AuditRecord, SqlAuditStore
from gateway.cli.common import operator
from gateway.db.engine import engine_for_url
from gateway.quarantine import SqlQuarantine
from gateway.quarantine.models import DELETED, HELD, RELEASE_FAILED, RELEASED, RELEASING
from gateway.smtp.capture import CaptureThread
from tests.contract.test_quarantine_store import BODY_MARKER, MESSAGE, make_txn
from tests.fixtures.db import run_async, unreachable_url

REPO = Path(__file__).resolve().parents[2]
ENTRY = (
    "import sys, gateway.cli as c; "
    "c.SUBCOMMAND_MODULES = tuple(dict.fromkeys((*c.SUBCOMMAND_MODULES, 'quarantine'))); "
    "sys.exit(c.main(sys.argv[1:]))"
)

Cli = Callable[..., tuple[int, str, str]]

#: Client text that would clear the screen, return the cursor, reverse the line (RLO) and open a
#: bidi isolate, plus a C1 CSI and DEL: printed, each must appear escaped and never raw.
NASTY = "\x1b[2J\r\u202e\u2066\x9b\x7f"
NASTY_ESCAPED = "\\x1b[2J\\x0d\\u202e\\u2066\\x9b\\x7f"
RAW_CONTROLS = ("\x1b", "\r", "\u202e", "\u2066", "\x9b", "\x7f")


def write_config(path: Path, db_url: str, state_dir: Path, upstream_port: int = 1) -> Path:
    path.write_text(
        f"state_dir = {json.dumps(str(state_dir))}\n"
        f"[database]\nurl = {json.dumps(db_url)}\ntimeout = 5.0\n"
        '[smtp]\nhostname = "gw.mailward.test"\n'
        f'[relay]\nhost = "127.0.0.1"\nport = {upstream_port}\ntls = "none"\n'
        "connect_timeout = 5.0\ncommand_timeout = 5.0\ndata_timeout = 5.0\n",
        encoding="utf-8",
    )
    return path


@pytest.fixture(autouse=True)
def quarantine_subcommand(monkeypatch: pytest.MonkeyPatch) -> None:
    modules = gateway.cli.SUBCOMMAND_MODULES
    if "quarantine" not in modules:
        monkeypatch.setattr(gateway.cli, "SUBCOMMAND_MODULES", (*modules, "quarantine"))


@pytest.fixture
def config_file(db_url: str, tmp_path: Path, sync_upstream: CaptureThread) -> Path:
    return write_config(tmp_path / "mailward.toml", db_url, tmp_path / "state", sync_upstream.port)


@pytest.fixture
def cli(config_file: Path, capsys: pytest.CaptureFixture[str]) -> Cli:
    """Run ``mailward --config FILE ARGV...`` in-process: (exit code, stdout, stderr)."""

    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = gateway.cli.main(["--config", str(config_file), *argv])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def run_subprocess(config: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MAILWARD_CONFIG", None)
    return subprocess.run(
        [sys.executable, "-c", ENTRY, "--config", str(config), *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def hold(db_url: str, message: bytes = MESSAGE, **txn_options: Any) -> int:
    async def go() -> int:
        engine = engine_for_url(db_url, timeout=5.0)
        store = SqlQuarantine(engine, timeout=5.0)
        try:
            return await store.hold(
                make_txn(**txn_options), message, check_id="spam-score", reason="score 7.5"
            )
        finally:
            await store.close()
            await engine.dispose()

    return run_async(go())


def audit_events(db_url: str, kind: str) -> list[AuditRecord]:
    """The audit records of ``kind``, newest first, read with the real audit store."""

    async def go() -> list[AuditRecord]:
        engine = engine_for_url(db_url, timeout=5.0)
        try:
            store = SqlAuditStore(engine, batch_size=1, timeout=5.0)
            return await store.list_records(kind=kind, limit=100)
        finally:
            await engine.dispose()

    return run_async(go())


def decision_events(db_url: str) -> list[AuditRecord]:
    return [
        *audit_events(db_url, "quarantine-release"),
        *audit_events(db_url, "quarantine-release-failed"),
        *audit_events(db_url, "quarantine-delete"),
    ]


def execute(db_url: str, statement: str) -> None:
    async def go() -> None:
        engine = engine_for_url(db_url, timeout=5.0)
        try:
            async with engine.begin() as conn:
                await conn.execute(text(statement))
        finally:
            await engine.dispose()

    run_async(go())


def mark_releasing(db_url: str, entry_id: int) -> None:
    """Leave ``entry_id`` as an interrupted release would (status ``releasing``)."""

    async def go() -> None:
        engine = engine_for_url(db_url, timeout=5.0)
        store = SqlQuarantine(engine, timeout=5.0)
        try:
            await store.mark(entry_id, RELEASING, decided_by="crashed")
        finally:
            await store.close()
            await engine.dispose()

    run_async(go())


def shown(cli: Cli, entry_id: int) -> dict[str, Any]:
    code, out, err = cli("quarantine", "show", str(entry_id), "--json")
    assert code == 0, err
    data: dict[str, Any] = json.loads(out)
    return data


@pytest.fixture
def entries(db_url: str) -> Iterator[list[int]]:
    ids = [
        hold(db_url, login="alice@example.com", recipients=("bob@example.net",)),
        hold(
            db_url,
            login="bob@example.com",
            recipients=("carol@example.org", "dave@example.org"),
            mail_from="",
        ),
        hold(db_url, login="alice@example.com", recipients=("erin@example.net",)),
    ]
    yield ids


# --- list ----------------------------------------------------------------------------------------


def test_list_table_json_filters_and_paging(cli: Cli, entries: list[int]) -> None:
    code, out, err = cli("quarantine", "list")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["ID", "HELD", "(UTC)", "STATUS"]
    assert [line.split()[0] for line in lines[1:]] == [str(i) for i in entries[::-1]]
    assert "carol@example.org +1" in out and "<>" in out and "spam-score" in out
    assert BODY_MARKER.decode() not in out

    code, out, _ = cli("quarantine", "list", "--json", "--login", "ALICE@example.com")
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["id"] for r in rows] == [entries[2], entries[0]]
    assert rows[0]["status"] == "held" and rows[0]["recipients"] == ["erin@example.net"]
    assert "message" not in rows[0]

    code, out, _ = cli("quarantine", "list", "--limit", "2")
    assert f"(more may follow: --before-id {entries[1]})" in out
    code, out, _ = cli("quarantine", "list", "--limit", "2", "--before-id", str(entries[1]))
    assert [line.split()[0] for line in out.splitlines()[1:]] == [str(entries[0])]

    code, out, _ = cli("quarantine", "list", "--status", "released")
    assert code == 0 and out.strip() == "no matching quarantine entries"


def test_list_bad_options_are_usage_errors(cli: Cli) -> None:
    for argv in (
        ("list", "--status", "bogus"),
        ("list", "--limit", "0"),
        ("list", "--before-id", "x"),
        ("show", "0"),
        ("release", "Qx"),
        ("delete", "-1"),
    ):
        with pytest.raises(SystemExit) as info:
            cli("quarantine", *argv)
        assert info.value.code == 2


# --- show ----------------------------------------------------------------------------------------


def test_show_prints_metadata_and_headers_only_on_request(cli: Cli, db_url: str) -> None:
    message = (
        b"From: Alice <alice@example.com>\r\n"
        b"Subject: \x1b[31mred\x1b[0m caf\xc3\xa9 \xff\r\n"
        b"Message-ID: <show-1@example.com>\r\n"
        b"\r\n" + BODY_MARKER + b"\r\n"
    )
    entry_id = hold(db_url, message, recipients=("bob@example.net", "carol@example.org"))

    code, out, err = cli("quarantine", "show", str(entry_id))
    assert code == 0, err
    assert f"quarantine entry {entry_id}" in out
    assert "status:" in out and "held" in out and "spam-score" in out and "score 7.5" in out
    assert "1. bob@example.net" in out and "2. carol@example.org" in out
    assert "Subject" not in out and BODY_MARKER.decode() not in out

    code, out, _ = cli("quarantine", "show", str(entry_id), "--headers")
    assert code == 0
    assert "From: Alice <alice@example.com>" in out
    assert "Subject: \\x1b[31mred\\x1b[0m caf\u00e9 \\xff" in out  # no raw escape sequences
    assert "\x1b" not in out
    assert BODY_MARKER.decode() not in out

    code, out, _ = cli("quarantine", "show", str(entry_id), "--json", "--headers")
    data = json.loads(out)
    assert data["id"] == entry_id and data["status"] == "held"
    assert data["headers"].startswith("From: Alice")
    assert BODY_MARKER.decode() not in out

    code, out, _ = cli("quarantine", "show", f"Q{entry_id}", "--json")
    assert code == 0 and "headers" not in json.loads(out)


def test_show_unknown_id(cli: Cli) -> None:
    code, out, err = cli("quarantine", "show", "4242")
    assert code == 1 and out == ""
    assert err.strip() == "mailward: no quarantine entry 4242"


# --- release / delete ----------------------------------------------------------------------------


def test_release_relays_the_held_bytes_and_refuses_a_second_release(
    cli: Cli, sync_upstream: CaptureThread, entries: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="mailward")
    target = entries[1]
    code, out, err = cli("quarantine", "release", str(target))
    assert code == 0, err
    assert out.startswith(f"quarantine {target} released: 250 2.0.0 Ok: queued as ")
    [received] = sync_upstream.upstream.messages
    assert received.data == MESSAGE
    assert received.mail_from == ""
    assert received.rcpt_tos == ("carol@example.org", "dave@example.org")
    assert any(
        r.name == "mailward.quarantine"
        and r.levelno == logging.WARNING
        and r.getMessage().startswith(f"quarantine {target} released by cli")
        for r in caplog.records
    )
    assert BODY_MARKER.decode() not in caplog.text

    code, out, err = cli("quarantine", "show", str(target))
    assert "released" in out and "decided by:" in out and "cli" in out and "queued as" in out

    code, out, err = cli("quarantine", "release", str(target))
    assert code == 1 and out == ""
    assert f"quarantine {target} cannot be released: it is already released" in err
    assert len(sync_upstream.upstream.messages) == 1

    code, _, err = cli("quarantine", "delete", str(target))
    assert code == 1 and "already released" in err


def test_release_with_a_refused_recipient_names_it_and_exits_1(
    cli: Cli, sync_upstream: CaptureThread, db_url: str
) -> None:
    entry_id = hold(db_url, recipients=("ok@example.net", "bad@example.net"))
    sync_upstream.upstream.fail_rcpt = {"bad@example.net": "550 5.1.1 No such user"}
    code, out, err = cli("quarantine", "release", str(entry_id))
    assert code == 1 and out == ""
    assert err.startswith(f"mailward: quarantine {entry_id} release failed: ")
    assert "<bad@example.net> 550 5.1.1 No such user" in err and "nothing was sent" in err
    assert sync_upstream.upstream.messages == []

    code, out, _ = cli("quarantine", "list", "--json", "--status", RELEASE_FAILED)
    [row] = [json.loads(line) for line in out.splitlines()]
    assert row["id"] == entry_id and "bad@example.net" in row["upstream_reply"]

    sync_upstream.upstream.fail_rcpt = {}
    code, out, err = cli("quarantine", "release", str(entry_id))
    assert code == 0, err
    assert sync_upstream.upstream.messages[0].rcpt_tos == ("ok@example.net", "bad@example.net")


def test_delete_erases_the_message(cli: Cli, entries: list[int], db_url: str) -> None:
    target = entries[0]
    code, out, err = cli("quarantine", "delete", str(target))
    assert code == 0, err
    assert out.strip() == f"quarantine {target} deleted"

    code, out, _ = cli("quarantine", "show", str(target), "--headers")
    assert code == 0 and "deleted" in out and "the message was deleted" in out

    code, out, _ = cli("quarantine", "list", "--json", "--status", DELETED)
    assert [json.loads(line)["id"] for line in out.splitlines()] == [target]

    code, _, err = cli("quarantine", "delete", str(target))
    assert code == 1 and "already deleted" in err
    code, _, err = cli("quarantine", "release", str(target))
    assert code == 1 and "already deleted" in err


def test_release_and_delete_of_an_unknown_id(cli: Cli) -> None:
    for action in ("release", "delete"):
        code, out, err = cli("quarantine", action, "777")
        assert code == 1 and out == ""
        assert err.strip() == "mailward: no quarantine entry 777"


def test_release_when_the_upstream_is_down_records_release_failed(
    db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    entry_id = hold(db_url)
    config = write_config(tmp_path / "down.toml", db_url, tmp_path / "state", upstream_port=1)
    code = gateway.cli.main(["--config", str(config), "quarantine", "release", str(entry_id)])
    _, err = capsys.readouterr()
    assert code == 1
    assert f"quarantine {entry_id} release failed: upstream not usable" in err
    code = gateway.cli.main(["--config", str(config), "quarantine", "list", "--json"])
    out, _ = capsys.readouterr()
    assert json.loads(out)["status"] == RELEASE_FAILED


# --- database down -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ("quarantine", "list"),
        ("quarantine", "show", "1"),
        ("quarantine", "show", "1", "--headers"),
        ("quarantine", "release", "1"),
        ("quarantine", "delete", "1"),
    ],
)
def test_unreachable_database_is_one_line_and_exit_1(
    db_backend: str, tmp_path: Path, argv: tuple[str, ...]
) -> None:
    config = write_config(tmp_path / "m.toml", unreachable_url(db_backend, tmp_path), tmp_path)
    result = run_subprocess(config, *argv)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mailward: ") and "unavailable" in lines[0]
    assert "secret-pw" not in result.stderr


def test_subprocess_release_happy_path(
    config_file: Path, sync_upstream: CaptureThread, db_url: str
) -> None:
    entry_id = hold(db_url)
    result = run_subprocess(config_file, "quarantine", "release", str(entry_id))
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout.startswith(f"quarantine {entry_id} released: 250")
    assert sync_upstream.upstream.messages[0].data == MESSAGE
    assert RELEASED in result.stdout


# --- decisions in the audit log ------------------------------------------------------------------


def test_release_and_delete_are_audit_events(
    cli: Cli, sync_upstream: CaptureThread, entries: list[int], db_url: str
) -> None:
    released, deleted = entries[1], entries[0]
    code, _, err = cli("quarantine", "release", str(released))
    assert code == 0, err
    entry = shown(cli, released)
    [event] = audit_events(db_url, "quarantine-release")
    assert entry["upstream_reply"].startswith("250 2.0.0 Ok: queued as ")
    assert (event.kind, event.listener, event.login) == (
        "quarantine-release",
        "cli",
        "bob@example.com",
    )
    assert (event.transaction_id, event.queue_id, event.upstream_reply) == (
        entry["transaction_id"],
        f"Q{released}",
        entry["upstream_reply"],
    )
    assert event.detail == (
        f"quarantine Q{released} released by {operator()}; held by check spam-score: "
        f"{entry['upstream_reply']}"
    )
    assert event.outcome is None and event.ended_at is not None
    assert event.mail_from is None and event.recipients == () and event.verdicts == ()

    code, _, err = cli("quarantine", "delete", str(deleted))
    assert code == 0, err
    entry = shown(cli, deleted)
    [event] = audit_events(db_url, "quarantine-delete")
    assert (event.listener, event.login, event.transaction_id, event.queue_id) == (
        "cli",
        "alice@example.com",
        entry["transaction_id"],
        f"Q{deleted}",
    )
    assert event.upstream_reply is None
    assert (
        event.detail == f"quarantine Q{deleted} deleted by {operator()}; held by check spam-score"
    )

    # refused decisions change nothing and are not events
    assert cli("quarantine", "release", str(released))[0] == 1
    assert cli("quarantine", "delete", str(deleted))[0] == 1
    assert [e.kind for e in decision_events(db_url)] == ["quarantine-release", "quarantine-delete"]
    assert len(sync_upstream.upstream.messages) == 1

    # the audit CLI knows the kinds and links the event to the entry
    code, out, err = cli("audit", "list", "--kind", "quarantine-delete", "--json")
    assert code == 0, err
    assert [json.loads(line)["queue_id"] for line in out.splitlines()] == [f"Q{deleted}"]
    code, out, _ = cli("audit", "show", str(event.id))
    assert (
        f"queue id:       Q{deleted}" in out and f"transaction:    {entry['transaction_id']}" in out
    )


def test_a_failed_release_is_an_audit_event(
    cli: Cli, sync_upstream: CaptureThread, db_url: str
) -> None:
    entry_id = hold(db_url, recipients=("ok@example.net", "bad@example.net"))
    sync_upstream.upstream.fail_rcpt = {"bad@example.net": "550 5.1.1 No such user"}
    assert cli("quarantine", "release", str(entry_id))[0] == 1
    entry = shown(cli, entry_id)
    [failed] = audit_events(db_url, "quarantine-release-failed")
    assert (failed.queue_id, failed.transaction_id, failed.login, failed.listener) == (
        f"Q{entry_id}",
        entry["transaction_id"],
        "alice@example.com",
        "cli",
    )
    assert failed.upstream_reply == entry["upstream_reply"]
    assert "<bad@example.net> 550 5.1.1 No such user" in (failed.upstream_reply or "")
    assert failed.detail is not None
    assert failed.detail.startswith(f"quarantine Q{entry_id} release failed by {operator()}; ")
    assert audit_events(db_url, "quarantine-release") == []

    sync_upstream.upstream.fail_rcpt = {}
    assert cli("quarantine", "release", str(entry_id))[0] == 0
    [released] = audit_events(db_url, "quarantine-release")
    assert released.queue_id == f"Q{entry_id}" and released.id > failed.id
    assert (released.upstream_reply or "").startswith("250 2.0.0 Ok: queued as ")


def test_a_release_to_an_unreachable_upstream_is_an_audit_event(
    db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    entry_id = hold(db_url)
    config = write_config(tmp_path / "down.toml", db_url, tmp_path / "state", upstream_port=1)
    assert gateway.cli.main(["--config", str(config), "quarantine", "release", str(entry_id)]) == 1
    capsys.readouterr()
    [event] = audit_events(db_url, "quarantine-release-failed")
    assert event.queue_id == f"Q{entry_id}"
    assert (event.upstream_reply or "").startswith("upstream not usable")


def test_forced_decisions_say_so(cli: Cli, sync_upstream: CaptureThread, db_url: str) -> None:
    """An entry left ``releasing`` by an interrupted release may already be at the upstream:
    acting on it with --force is recorded as forced."""
    deleted, released = hold(db_url), hold(db_url)
    for entry_id in (deleted, released):
        mark_releasing(db_url, entry_id)
    assert decision_events(db_url) == []  # claiming an entry is not a decision
    assert cli("quarantine", "delete", str(deleted), "--force")[0] == 0
    assert cli("quarantine", "release", str(released), "--force")[0] == 0
    [delete_event] = audit_events(db_url, "quarantine-delete")
    [release_event] = audit_events(db_url, "quarantine-release")
    assert delete_event.detail == (
        f"quarantine Q{deleted} deleted by {operator()} (forced); held by check spam-score"
    )
    assert (release_event.detail or "").startswith(
        f"quarantine Q{released} released by {operator()} (forced); held by check spam-score: 250"
    )


def test_no_decision_without_its_audit_event(
    cli: Cli, sync_upstream: CaptureThread, db_url: str
) -> None:
    """The decision and its audit event are one database transaction: when the event cannot be
    written, the entry keeps its status (and the operator is told)."""
    entry_id = hold(db_url)
    execute(db_url, "ALTER TABLE audit_record RENAME TO audit_record_away")
    try:
        code, out, err = cli("quarantine", "delete", str(entry_id))
    finally:
        execute(db_url, "ALTER TABLE audit_record_away RENAME TO audit_record")
    assert code == 1 and out == ""
    assert err.startswith("mailward: ") and "unavailable" in err
    entry = shown(cli, entry_id)
    assert (entry["status"], entry["decided_by"]) == (HELD, None)
    assert decision_events(db_url) == []
    code, out, _ = cli("quarantine", "show", str(entry_id), "--headers")
    assert "the message was deleted" not in out  # the bytes are still there

    assert cli("quarantine", "delete", str(entry_id))[0] == 0
    assert [e.queue_id for e in decision_events(db_url)] == [f"Q{entry_id}"]


# --- terminal safety -----------------------------------------------------------------------------


def test_client_text_is_printed_escaped_and_json_stays_exact(cli: Cli, db_url: str) -> None:
    message = (
        (
            f"From: a@example.com\r\nSubject: {NASTY}\r\nMessage-ID: <m{NASTY}@example.com>\r\n\r\n"
        ).encode()
        + BODY_MARKER
        + b"\r\n"
    )
    entry_id = hold(
        db_url,
        message,
        recipients=(f"bob{NASTY}@example.net",),
        mail_from=f"alice{NASTY}@example.com",
        message_id=f"<m{NASTY}@example.com>",
    )
    outputs = [
        cli("quarantine", "show", str(entry_id), "--headers")[1],
        cli("quarantine", "list")[1],
    ]
    for out in outputs:
        for raw in RAW_CONTROLS:
            assert raw not in out, repr(raw)
    show, listing = outputs
    assert f"message-id:     <m{NASTY_ESCAPED}@example.com>" in show
    assert f"mail from:      alice{NASTY_ESCAPED}@example.com" in show
    assert f"1. bob{NASTY_ESCAPED}@example.net" in show
    assert f"Subject: {NASTY_ESCAPED}" in show
    assert f"alice{NASTY_ESCAPED}"[:20] in listing

    data = shown(cli, entry_id)
    assert data["message_id"] == f"<m{NASTY}@example.com>"
    assert data["recipients"] == [f"bob{NASTY}@example.net"]
    code, out, _ = cli("quarantine", "list", "--json")
    assert code == 0 and json.loads(out)["mail_from"] == f"alice{NASTY}@example.com"
    for raw in RAW_CONTROLS:
        assert raw not in out  # JSON escapes them itself
