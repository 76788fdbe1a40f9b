"""The ``mailward`` command as an operator uses it: policy show, config check, demo, packaging."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from tests.fixtures.parallel import unused_ports

ROOT = Path(__file__).resolve().parents[2]
MAILWARD = [sys.executable, "-m", "gateway.cli"]


def run(*args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*MAILWARD, *args],
        capture_output=True,
        text=True,
        timeout=120,
        **kw,  # type: ignore[call-overload]
    )


def test_policy_show_lists_stages_in_order(tmp_path: Path) -> None:
    site = tmp_path / "site.toml"
    site.write_text('[checks.recipient-limit]\nmode = "warn"\ntimeout = 0.5\n')
    result = run("--config", str(site), "policy", "show")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "fixed gate" in out
    mail = out[out.index("[mail]") : out.index("[rcpt]")]
    assert mail.index("sender-identity") < mail.index("message-size")
    assert re.search(r"recipient-limit\s+mode=warn\s+timeout=0.5s on_error=defer", out)


def test_config_check_names_file_and_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[relay]\nport = 99999\n")
    result = run("config", "check", str(bad))
    assert result.returncode == 2
    assert str(bad) in result.stderr and "relay.port" in result.stderr
    assert "Traceback" not in result.stderr


def test_demo_runs_and_swaks_delivers_to_the_outbox(tmp_path: Path) -> None:
    ports = unused_ports(3)  # the demo binds them itself: not ephemeral ones (parallel workers)
    proc = subprocess.Popen(
        [
            *MAILWARD,
            "demo",
            "--dir",
            str(tmp_path / "demo"),
            "--submission-port",
            str(ports[0]),
            "--submissions-port",
            str(ports[1]),
            "--upstream-port",
            str(ports[2]),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if line.startswith("  mailward --config"):
                break
        text = "".join(lines)
        password = re.search(r"password: (\S+)", text)
        assert password, text
        swaks = subprocess.run(
            [
                "swaks",
                "--server",
                f"127.0.0.1:{ports[0]}",
                "-tls",
                "--auth-user",
                "demo@example.com",
                "--auth-password",
                password.group(1),
                "--from",
                "demo@example.com",
                "--to",
                "someone@example.net",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert swaks.returncode == 0, swaks.stdout + swaks.stderr
        emls = list((tmp_path / "demo" / "outbox").glob("*.eml"))
        assert len(emls) == 1
        assert b"someone@example.net" in emls[0].read_bytes()
        audit = run("--config", str(tmp_path / "demo" / "mailward.toml"), "audit", "list")
        assert audit.returncode == 0 and "delivered" in audit.stdout
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        finally:
            proc.kill()
    assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
        check=True,
        timeout=300,
    )
    (whl,) = out.glob("mailward-*.whl")
    return whl


def test_wheel_ships_policies_and_migrations(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert "gateway/_shipped/policies/00-pipeline.toml" in names
    assert "gateway/_shipped/migrations/env.py" in names
    assert any(n.startswith("gateway/_shipped/migrations/versions/0001") for n in names)


def test_db_upgrade_works_from_the_installed_wheel(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        timeout=300,
    )
    config = tmp_path / "mw.toml"
    config.write_text(f'state_dir = "{tmp_path}"\n')
    env = {**os.environ, "PYTHONPATH": str(target)}
    # run from an empty directory so the source checkout cannot be imported by accident
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    probe = subprocess.run(
        [sys.executable, "-c", "import gateway, sys; print(gateway.__file__)"],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        check=True,
    )
    assert probe.stdout.startswith(str(target))
    result = subprocess.run(
        [*MAILWARD, "--config", str(config), "db", "upgrade"],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    import sqlite3

    tables = {
        r[0]
        for r in sqlite3.connect(tmp_path / "mailward.db").execute(
            "select name from sqlite_master where type='table'"
        )
    }
    assert {"account", "audit_record", "audit_recipient", "audit_verdict"} <= tables
