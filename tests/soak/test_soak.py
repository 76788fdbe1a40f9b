"""Custody under ``kill -9``: the short variant of the soak test (``bench/soak.py``).

Runs the real harness as a subprocess -- the real ``mailward serve`` between smtplib clients and a
misbehaving capture upstream, SIGKILLed and restarted on the same state directory -- with a small
load, and asserts what the harness reconciles: every (Message-ID, recipient) the client got a 250
for reached the upstream (or the queue bounced/dropped it by rule), nothing the client was refused
was delivered anyway, nothing is left pending, and the kills really happened. The full run (1,000
messages, 10 kills) is ``.venv/bin/python bench/soak.py --messages 1000 --kills 10``
(bench/README.md).

No timed assertions: the harness's bounds (drain, start, client retries) and the test's timeout are
liveness bounds only. The harness runs in its own process group, which is killed if the bound
runs out, so no gateway process outlives the test.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.parallel import unused_port

REPO = Path(__file__).resolve().parents[2]
SOAK = REPO / "bench" / "soak.py"
MESSAGES = 80
KILLS = 3
# liveness bounds (seconds), never timing assertions: a run takes 10-30 s on a quiet 2-core
# machine; the harness's own bounds end it (and report why) well before the test's
LIVENESS = 600
HARNESS_BOUNDS = ("--client-timeout", "240", "--drain-timeout", "240", "--drain-stall", "150")


def run_soak(tmp_path: Path, *args: str) -> tuple[int, dict[str, Any], str]:
    out = tmp_path / "figures.json"
    cmd = [sys.executable, str(SOAK), "--json", str(out), "--workdir", str(tmp_path), *args]
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # the harness and its gateway form one process group
    )
    try:
        output, _ = proc.communicate(timeout=LIVENESS)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"soak did not finish within {LIVENESS} s:\n{output.decode(errors='replace')}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = output.decode(errors="replace")
    figures = json.loads(out.read_text()) if out.exists() else {}
    return proc.returncode, figures, text


@pytest.mark.timeout(LIVENESS + 60)
def test_no_message_with_a_250_is_lost_across_kill_9() -> None:
    # a short work directory, not tmp_path: the gateway's control socket
    # (<work>/mailward-soak-XXXXXXXX/state/control.sock) must fit in the 107 bytes of a Unix socket
    # path, and under pytest-xdist tmp_path (/tmp/pytest-of-<user>/pytest-<n>/popen-gw<k>/<test>/)
    # leaves too little room; removed when the test passes, kept for a look when it fails
    workdir = Path(tempfile.mkdtemp(prefix="mw-soak-"))
    code, f, output = run_soak(
        workdir,
        *("--messages", str(MESSAGES), "--kills", str(KILLS), "--drain-kills", "1"),
        # the gateway listens on this port again after every kill -9: not an ephemeral port, which
        # another xdist worker's bind(0) could take while the gateway is down
        *("--port", str(unused_port())),
        *HARNESS_BOUNDS,
    )
    assert code == 0, output
    assert f["lost"] == 0, output
    assert f["delivered_after_refusal"] == 0, output
    assert f["stuck"] == 0 and f["unfinished_pairs"] == 0, output
    # the run really did what it claims: every message went through, the gateway died KILLS
    # times (a kill scheduled too late to land while sending lands while draining instead)
    assert f["accepted_pairs"] == f["pairs"], output
    assert f["kills"] + f["drain_kills"] >= KILLS, output
    assert f["restarts"] == f["kills"] + f["drain_kills"], output
    # the queue was really used (the upstream's first and last phases are outages)
    assert f["queue_messages"] > 0, output
    assert f["queue_leftovers"] == [], output
    # every SIGTERM'd or killed gateway left no process behind, and stopped when asked
    assert f["orphans"] == [] and f["shutdown_problem"] is None, output
    shutil.rmtree(workdir)
