"""``mailward quarantine list|show|release|delete`` against real databases and a real upstream.

The tests call ``gateway.cli.main`` in-process (and, for the failure paths, in a subprocess) with
"quarantine" in ``gateway.cli.SUBCOMMAND_MODULES`` -- added here when the CLI does not list it yet,
so the module is exercised through the real entry point, its parser and its error mapping either
way. Releases go through a real UpstreamRelay to a CaptureUpstream running in its own thread.
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

import gateway.cli
from gateway.db.engine import engine_for_url
from gateway.quarantine import SqlQuarantine
from gateway.quarantine.models import DELETED, RELEASE_FAILED, RELEASED
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
