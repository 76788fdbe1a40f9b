"""``mailward config check FILE`` and ``mailward config docs`` through the real command entry point.

What it tests: :func:`gateway.cli.main` (argument parsing, dispatch and the ConfigError → exit 2
mapping) with the ``config`` sub-commands: exit 0 and "ok" on stdout for a valid file; exit 2 and
one line on stderr naming the file, the key and the problem otherwise; secrets never printed;
``config docs`` prints the generated reference. One test runs a real process to check the exit
status.

Reads: site files written to a temporary directory and the shipped policies.

Security notes: none beyond checking that secret values are not printed.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.config.docs import render_reference

SECRET = "S3CRET-VALUE-xyz"


def site(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mailward.toml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_check_valid_file_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = site(tmp_path, '[relay]\nhost = "smtp.isp.example"\n')
    assert main(["config", "check", str(path)]) == 0
    out, err = capsys.readouterr()
    assert out == f"{path}: ok (2 listeners, relay smtp.isp.example)\n"
    assert err == ""


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        (
            '[smtp]\ntrusted_networks = ["10.0.0.0/33"]\n',
            "smtp.trusted_networks[0]",
            "not a network",
        ),
        ('[pipeline]\nrcpt = ["sender-identity"]\n', "pipeline.rcpt[0]", "cannot run at rcpt"),
        (
            "[checks.message-size]\nmax_bytes = 5\n",
            "checks.message-size.max_bytes",
            "unknown key",
        ),
    ],
    ids=["schema", "pipeline", "check-option"],
)
def test_check_bad_file_exits_2_naming_file_key_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, key: str, problem: str
) -> None:
    path = site(tmp_path, text)
    assert main(["config", "check", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"mailward: configuration error: {path}: {key}: ")
    assert problem in err
    assert err.count("\n") == 1  # one line, no traceback


def test_check_missing_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "absent.toml"
    assert main(["config", "check", str(path)]) == 2
    assert capsys.readouterr().err == f"mailward: configuration error: {path}: file not found\n"


def test_check_never_prints_a_secret(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = site(tmp_path, f'[relay]\npassword = "{SECRET}"\n')
    assert main(["config", "check", str(path)]) == 2
    out, err = capsys.readouterr()
    assert "relay.username" in err
    assert SECRET not in out + err


def test_check_ignores_a_global_config_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``config check FILE`` checks FILE, whatever ``--config`` names."""
    good = site(tmp_path, "")
    bad = tmp_path / "bad.toml"
    bad.write_text("[smtp]\nport = 25\n", encoding="utf-8")
    assert main(["--config", str(good), "config", "check", str(bad)]) == 2
    assert f"{bad}: smtp.port: unknown key" in capsys.readouterr().err


def test_docs_prints_the_generated_reference(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "docs"]) == 0
    assert capsys.readouterr().out == render_reference()


def test_check_exit_status_of_a_real_process(tmp_path: Path) -> None:
    path = site(tmp_path, "[relay]\nport = 0\n")
    code = "import sys; from gateway.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.run(
        [sys.executable, "-c", code, "config", "check", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=Path(__file__).resolve().parents[3],  # the checkout, so that `gateway` imports
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert (
        proc.stderr == f"mailward: configuration error: {path}: relay.port: 0 is not a TCP port\n"
    )
