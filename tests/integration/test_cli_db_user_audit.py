"""``mailward db``, ``mailward user`` and ``mailward audit`` against real databases.

Most tests call ``gateway.cli.main`` in-process (the function the ``mailward`` console script
runs); a few run the installed ``mailward`` script in a subprocess to check exit codes and the
absence of tracebacks end to end. Client-supplied text holding terminal control and bidi
characters is checked to be printed escaped (and exact in JSON).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.app import open_stores
from gateway.cli import main
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
from gateway.db.migrate import head_revision
from tests.fixtures.db import make_db_config, run_async, unreachable_url

REPO = Path(__file__).resolve().parents[2]
PW = "s3cret-enough"
ENTRY = "import sys; from gateway.cli import main; sys.exit(main(sys.argv[1:]))"

Cli = Callable[..., tuple[int, str, str]]

#: Client text that would clear the screen, return the cursor, reverse the line (RLO) and open a
#: bidi isolate, plus a C1 CSI and DEL: printed, each must appear escaped and never raw.
NASTY = "\x1b[2J\r\u202e\u2066\x9b\x7f"
NASTY_ESCAPED = "\\x1b[2J\\x0d\\u202e\\u2066\\x9b\\x7f"
RAW_CONTROLS = ("\x1b", "\r", "\u202e", "\u2066", "\x9b", "\x7f")


def write_config(path: Path, db_url: str, state_dir: Path) -> Path:
    path.write_text(
        f"state_dir = {json.dumps(str(state_dir))}\n"
        f"[database]\nurl = {json.dumps(db_url)}\ntimeout = 5.0\n",
        encoding="utf-8",
    )
    return path


def mailward_command() -> list[str]:
    """The installed console script (``pip install -e .``), else the same entry point via -c."""
    script = shutil.which("mailward", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-c", ENTRY]


def run_subprocess(config: Path, *argv: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MAILWARD_CONFIG", None)
    return subprocess.run(
        [*mailward_command(), "--config", str(config), *argv],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


@pytest.fixture
def config_file(db_url: str, tmp_path: Path) -> Path:
    return write_config(tmp_path / "mailward.toml", db_url, tmp_path / "state")


@pytest.fixture
def cli(
    config_file: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Cli:
    """Run ``mailward --config FILE ARGV...`` in-process: (exit code, stdout, stderr)."""

    def run(*argv: str, stdin: str | None = None) -> tuple[int, str, str]:
        if stdin is not None:
            monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        capsys.readouterr()
        code = main(["--config", str(config_file), *argv])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def authenticate(db_url: str, tmp_path: Path, login: str, password: str) -> Identity | None:
    async def go() -> Identity | None:
        stores = await open_stores(make_db_config(db_url, tmp_path / "s"), migrate=False)
        try:
            return await stores.accounts.authenticate(login, password)
        finally:
            await stores.close()

    return run_async(go())


# --- db -------------------------------------------------------------------------------------------


def test_db_upgrade_current_downgrade_in_a_subprocess(empty_db_url: str, tmp_path: Path) -> None:
    config = write_config(tmp_path / "m.toml", empty_db_url, tmp_path / "state")

    before = run_subprocess(config, "db", "current")
    assert before.returncode == 0 and "no schema" in before.stdout

    up = run_subprocess(config, "db", "upgrade")
    assert up.returncode == 0, up.stderr
    head = head_revision()
    assert f"{head} (newest)" in up.stdout

    assert f"{head} (newest)" in run_subprocess(config, "db", "current").stdout

    down = run_subprocess(config, "db", "downgrade", "base", "--yes")
    assert down.returncode == 0, down.stderr
    assert "no schema" in down.stdout

    again = run_subprocess(config, "db", "upgrade", "--revision", "0001")
    assert again.returncode == 0 and "0001" in again.stdout
    assert "0001 (newest)" not in again.stdout  # older than head: not the newest


def test_db_upgrade_to_unknown_revision_fails_cleanly(cli: Cli) -> None:
    code, _, err = cli("db", "upgrade", "--revision", "zzz")
    assert code == 1
    assert "zzz" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "argv",
    [
        ("db", "current"),
        ("db", "upgrade"),
        ("user", "list"),
        ("audit", "list"),
        ("audit", "show", "1"),
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


def test_unsupported_database_url_is_a_configuration_error(tmp_path: Path) -> None:
    config = write_config(tmp_path / "m.toml", "mysql://u@h/db", tmp_path)
    result = run_subprocess(config, "user", "list")
    assert result.returncode == 2
    assert "database.url" in result.stderr and "Traceback" not in result.stderr


# --- user -----------------------------------------------------------------------------------------


def test_user_add_with_password_stdin_in_a_subprocess(
    db_url: str, config_file: Path, tmp_path: Path
) -> None:
    result = run_subprocess(
        config_file, "user", "add", "Alice@Example.COM", "--password-stdin", stdin=f"{PW}\n"
    )
    assert result.returncode == 0, result.stderr
    assert "alice@example.com" in result.stdout
    assert PW not in result.stdout + result.stderr

    identity = authenticate(db_url, tmp_path, "alice@example.com", PW)
    assert identity is not None and identity.owned == ("alice@example.com",)


@pytest.mark.parametrize("password", ["", "short7!"])
def test_user_add_refuses_empty_or_short_password(cli: Cli, password: str) -> None:
    code, _, err = cli("user", "add", "bob", "--password-stdin", stdin=password + "\n")
    assert code == 2
    assert "password" in err and ("empty" in err or "too short" in err)
    assert cli("user", "list")[1].startswith("no accounts")


def test_user_add_interactive_asks_twice(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    answers = iter([PW, PW + "typo"])
    monkeypatch.setattr("getpass.getpass", lambda prompt="": next(answers))
    code, _, err = cli("user", "add", "bob")
    assert code == 2 and "do not match" in err

    answers = iter([PW, PW])
    code, out, _ = cli("user", "add", "bob", "--address", "bob@example.com")
    assert code == 0 and "bob@example.com" in out


def test_user_lifecycle(cli: Cli, db_url: str, tmp_path: Path) -> None:
    assert (
        cli("user", "add", "bob", "--address", "@Team.Example", "--password-stdin", stdin=PW)[0]
        == 0
    )
    assert cli("user", "address", "add", "bob", "bob@other.example")[0] == 0
    assert cli("user", "grant", "add", "bob", "boss@example.com")[0] == 0

    identity = authenticate(db_url, tmp_path, "bob", PW)
    assert identity is not None
    assert set(identity.owned) == {"@team.example", "bob@other.example"}
    assert identity.send_as == ("boss@example.com",)

    code, out, _ = cli("user", "list")
    assert code == 0
    header, row = out.strip().splitlines()
    assert header.split() == ["LOGIN", "STATUS", "ADDRESSES", "SEND-AS"]
    assert row.split()[0:2] == ["bob", "enabled"] and "boss@example.com" in row

    assert cli("user", "disable", "bob")[0] == 0
    assert authenticate(db_url, tmp_path, "bob", PW) is None
    code, out, _ = cli("user", "list", "--json")
    assert json.loads(out)["disabled"] is True
    assert cli("user", "enable", "bob")[0] == 0

    assert cli("user", "passwd", "bob", "--password-stdin", stdin="new-password-1\n")[0] == 0
    assert authenticate(db_url, tmp_path, "bob", PW) is None
    assert authenticate(db_url, tmp_path, "bob", "new-password-1") is not None

    assert cli("user", "address", "remove", "bob", "@team.example")[0] == 0
    assert cli("user", "grant", "remove", "bob", "boss@example.com")[0] == 0
    code, out, _ = cli("user", "list", "--json")
    data = json.loads(out)
    assert data["addresses"] == ["bob@other.example"] and data["send_as"] == []


def test_user_errors_are_clear_and_exit_1(cli: Cli) -> None:
    cli("user", "add", "bob", "--password-stdin", stdin=PW)
    cases = [
        (("user", "disable", "ghost"), "no account with login 'ghost'"),
        (("user", "passwd", "ghost", "--password-stdin"), "no account with login 'ghost'"),
        (("user", "address", "add", "bob", "not-an-address"), "neither user@domain nor @domain"),
        (("user", "grant", "remove", "bob", "x@example.com"), "no send-as grant"),
    ]
    for argv, message in cases:
        code, _, err = cli(*argv, stdin=PW + "\n")
        assert code == 1, argv
        assert message in err and "Traceback" not in err
    code, _, err = cli("user", "add", "BOB", "--password-stdin", stdin=PW)
    assert code == 1 and "already exists" in err


# --- audit ----------------------------------------------------------------------------------------


def _seed_audit(db_url: str, tmp_path: Path) -> list[int]:
    async def go() -> list[int]:
        stores = await open_stores(make_db_config(db_url, tmp_path / "s"), migrate=False)
        try:
            session = Session("198.51.100.4", 50000, "submission")
            session.identity = Identity("alice@example.com", 1, ("alice@example.com",))
            txn = Transaction(session, "alice@example.com")
            txn.recipients = [Recipient("bob@example.net"), Recipient("carol@example.org")]
            txn.verdicts.append(
                VerdictRecord(
                    "recipient-limit",
                    Stage.RCPT,
                    Action.DEFER,
                    Mode.WARN,
                    "452 4.5.3 Too many recipients (limit 1)",
                    "2 > 1",
                    measured="2",
                    limit="1",
                    applied=False,
                )
            )
            first = await stores.audit.begin_message(txn)
            txn.set_pending(RecipientStatus.DELIVERED, "250 2.0.0 ok")
            txn.final_reply = "250 2.0.0 Ok: queued as Q1"
            txn.queue_id = "Q1"
            await stores.audit.finish_message(first, txn, "delivered")
            other = Transaction(Session("198.51.100.5", 50001, "submission"), "eve@evil.example")
            other.final_reply = "553 5.7.1 Sender address not owned"
            await stores.audit.record_transaction(other, "rejected")
            await stores.audit.record_session_event(
                Session("203.0.113.9", 1, "submission"), "auth-failure", "bad credentials", "eve"
            )
            return [r.id for r in await stores.audit.list_records()]
        finally:
            await stores.close()

    return run_async(go())


def test_audit_list_table_json_filters_and_paging(cli: Cli, db_url: str, tmp_path: Path) -> None:
    event_id, rejected_id, delivered_id = _seed_audit(db_url, tmp_path)

    code, out, _ = cli("audit", "list")
    assert code == 0
    lines = out.strip().splitlines()
    assert lines[0].split()[:3] == ["ID", "STARTED", "(UTC)"]
    assert [int(line.split()[0]) for line in lines[1:]] == [event_id, rejected_id, delivered_id]
    assert "bob@example.net +1" in lines[3] and "queued as Q1" in lines[3]

    code, out, _ = cli("audit", "list", "--json")
    records = [json.loads(line) for line in out.strip().splitlines()]
    assert [r["id"] for r in records] == [event_id, rejected_id, delivered_id]

    def ids(*argv: str) -> list[int]:
        code, out, err = cli("audit", "list", "--json", *argv)
        assert code == 0, err
        return [json.loads(line)["id"] for line in out.strip().splitlines() if line]

    assert ids("--login", "ALICE@example.com") == [delivered_id]
    assert ids("--sender", "@evil.example") == [rejected_id]
    assert ids("--recipient", "carol@example.org") == [delivered_id]
    assert ids("--verdict", "recipient-limit") == [delivered_id]
    assert ids("--outcome", "rejected") == [rejected_id]
    assert ids("--kind", "auth-failure") == [event_id]
    assert ids("--since", "2000-01-01", "--until", "2999-01-01T00:00:00+00:00") == [
        event_id,
        rejected_id,
        delivered_id,
    ]
    assert ids("--until", "2000-01-01") == []
    assert ids("--limit", "2") == [event_id, rejected_id]
    assert ids("--limit", "2", "--before-id", str(rejected_id)) == [delivered_id]

    code, out, _ = cli("audit", "list", "--limit", "1")
    assert f"--before-id {event_id}" in out


@pytest.mark.parametrize("option", ["--since", "--until"])
def test_audit_list_bad_date_names_the_option(cli: Cli, option: str) -> None:
    code, _, err = cli("audit", "list", option, "last tuesday")
    assert code == 2
    assert option in err and "last tuesday" in err


def test_audit_list_bad_limit_is_a_usage_error(cli: Cli) -> None:
    with pytest.raises(SystemExit) as info:
        cli("audit", "list", "--limit", "0")
    assert info.value.code == 2


def test_audit_show_everything(cli: Cli, db_url: str, tmp_path: Path) -> None:
    delivered_id = _seed_audit(db_url, tmp_path)[-1]

    code, out, _ = cli("audit", "show", str(delivered_id))
    assert code == 0
    for expected in (
        f"audit record {delivered_id}",
        "outcome:        delivered",
        "client ip:      198.51.100.4",
        "login:          alice@example.com",
        "queue id:       Q1",
        "recipients (2):",
        "1. bob@example.net  delivered  250 2.0.0 ok",
        "verdicts (1):",
        "recipient-limit at rcpt: defer (warn, not applied (would have))",
        "measured: 2  limit: 1",
    ):
        assert expected in out, expected

    code, out, _ = cli("audit", "show", str(delivered_id), "--json")
    data = json.loads(out)
    assert data["id"] == delivered_id and len(data["recipients"]) == 2
    assert data["verdicts"][0]["check_id"] == "recipient-limit"

    code, _, err = cli("audit", "show", "999999")
    assert code == 1 and "no audit record 999999" in err


def test_audit_list_on_an_empty_log(cli: Cli) -> None:
    code, out, _ = cli("audit", "list")
    assert code == 0 and "no matching audit records" in out


# --- terminal safety -----------------------------------------------------------------------------


def _seed_nasty(db_url: str, tmp_path: Path) -> tuple[int, int]:
    """A message record and a session event whose client-supplied text holds NASTY."""

    async def go() -> tuple[int, int]:
        stores = await open_stores(make_db_config(db_url, tmp_path / "s"), migrate=False)
        try:
            session = Session("198.51.100.4", 50000, "submission")
            session.helo = f"helo{NASTY}"
            session.identity = Identity(f"alice{NASTY}", 1, ("alice@example.com",))
            txn = Transaction(session, f"alice{NASTY}@example.com")
            txn.recipients = [
                Recipient(f"bob{NASTY}@example.net", RecipientStatus.REJECTED, f"550 5.1.1 {NASTY}")
            ]
            txn.message_id = f"<id{NASTY}@example.com>"
            txn.verdicts.append(
                VerdictRecord(
                    "spam-score",
                    Stage.DATA,
                    Action.REJECT,
                    Mode.ENFORCE,
                    f"550 5.7.1 {NASTY}",
                    f"subject {NASTY}",
                    measured=f"m{NASTY}",
                )
            )
            txn.final_reply = f"550 5.7.1 {NASTY}"
            await stores.audit.record_transaction(txn, "rejected")
            await stores.audit.record_session_event(
                session, "auth-failure", f"detail {NASTY}", f"eve{NASTY}"
            )
            event, message = [r.id for r in await stores.audit.list_records()]
            return message, event
        finally:
            await stores.close()

    return run_async(go())


def _assert_no_raw_controls(out: str) -> None:
    for raw in RAW_CONTROLS:
        assert raw not in out, repr(raw)


def test_audit_show_and_list_escape_client_text(cli: Cli, db_url: str, tmp_path: Path) -> None:
    message_id, event_id = _seed_nasty(db_url, tmp_path)

    code, out, err = cli("audit", "show", str(message_id))
    assert code == 0, err
    _assert_no_raw_controls(out)
    for expected in (
        f"helo:           helo{NASTY_ESCAPED}",
        f"login:          alice{NASTY_ESCAPED}",
        f"mail from:      alice{NASTY_ESCAPED}@example.com",
        f"message-id:     <id{NASTY_ESCAPED}@example.com>",
        f"final reply:    550 5.7.1 {NASTY_ESCAPED}",
        f"1. bob{NASTY_ESCAPED}@example.net  rejected  550 5.1.1 {NASTY_ESCAPED}",
        f"reply: 550 5.7.1 {NASTY_ESCAPED}",
        f"reason: subject {NASTY_ESCAPED}",
        f"measured: m{NASTY_ESCAPED}",
    ):
        assert expected in out, expected

    code, out, _ = cli("audit", "show", str(event_id))
    _assert_no_raw_controls(out)
    assert f"detail:         detail {NASTY_ESCAPED}" in out

    code, out, _ = cli("audit", "list")
    assert code == 0
    _assert_no_raw_controls(out)
    assert f"eve{NASTY_ESCAPED}"[:21] in out and f"alice{NASTY_ESCAPED}"[:21] in out  # truncated
    assert len(out.splitlines()) == 3  # header and two rows: no line was split or overwritten

    # JSON stays exact: the stored values come back unchanged, escaped by JSON itself
    code, out, _ = cli("audit", "show", str(message_id), "--json")
    _assert_no_raw_controls(out)
    data = json.loads(out)
    assert (data["helo"], data["mail_from"], data["message_id"]) == (
        f"helo{NASTY}",
        f"alice{NASTY}@example.com",
        f"<id{NASTY}@example.com>",
    )
    assert data["recipients"][0]["address"] == f"bob{NASTY}@example.net"
    assert data["verdicts"][0]["reason"] == f"subject {NASTY}"
    code, out, _ = cli("audit", "list", "--json")
    _assert_no_raw_controls(out)
    assert [json.loads(line)["login"] for line in out.splitlines()] == [
        f"eve{NASTY}",
        f"alice{NASTY}",
    ]


def test_account_status_escapes_the_operator_reason(cli: Cli) -> None:
    assert cli("user", "add", "bob", "--password-stdin", stdin=PW)[0] == 0
    code, _, err = cli("account", "suspend", "bob", "--reason", f"abuse {NASTY}")
    assert code == 0, err

    code, out, err = cli("account", "status", "bob")
    assert code == 0, err
    _assert_no_raw_controls(out)
    assert out.startswith("login:      bob\nstage:      suspended since ")
    assert "history (newest first):" in out
    assert "account-suspended ok -> suspended: suspended by operator cli" in out
    assert f": abuse {NASTY_ESCAPED}" in out  # the history line's detail
    assert "abuse \\u001b[2J\\r\\u202e" in out  # the evidence, JSON-escaped

    code, out, _ = cli("account", "status", "bob", "--json")
    data = json.loads(out)
    assert data["evidence"]["reason"] == f"abuse {NASTY}"
    assert data["history"][0]["kind"] == "account-suspended"
