"""Relay benchmark: messages/s through Mailward against smtp-source -> smtp-sink directly.

What it does: starts Postfix's ``smtp-sink`` on a free loopback port and, for each cell (message
size x concurrent sessions x connection mode), measures in the same run

* the baseline: ``smtp-source`` -> ``smtp-sink`` directly, and
* the gateway: ``smtp-source`` -> ``mailward serve`` (a loopback listener, TLS and AUTH off for a
  trusted network, the audit written to SQLite) -> ``smtp-sink``,

interleaving the two for every repetition. It prints messages/s for both and the ratio
gateway/baseline, the gateway's CPU time per message (the gateway process, and its worker
processes below it), and checks that the sink received every message and that the audit holds
one ``delivered`` record per message. Results go to ``bench/results/<timestamp>.json``
(git-ignored). With ``--profile`` each cell is run once more with ``py-spy`` attached to the
gateway (or the gateway under ``cProfile``) and the top functions are added to the results.

``--policy on|off`` measures one gateway, with the shipped policy or with every check off.
``--policy both`` measures the shipped policy's cost as a paired comparison: two gateways per
cell, policy off and policy on (a state directory and configuration each), both warmed up, then
each repetition runs the baseline and both gateways in alternating order (off, on; on, off; ...).
Each repetition gives a paired ratio on/off of two runs seconds apart; the cell's figure is their
median. On a shared virtual machine the speed drifts from minute to minute (hypervisor steal
varies from 5 to 60 % here), so two separate ``--policy off`` and ``--policy on`` invocations
minutes apart measure the drift as much as the policy; the alternating order also cancels a
steady drift within the cell. ``--profile`` then profiles the policy-on gateway only.

Noise: for each timed run the CPU used by processes outside the benchmark ("other": the
machine's busy time from /proc/stat less the harness, smtp-source, the sink and each gateway's
whole process tree) and the hypervisor steal (the ``cpu`` line's 8th value in /proc/stat, not
counted as busy) are recorded, in % of one core. Runs with other load above MAX_OTHER_PERCENT
are "disturbed"; medians use the quiet ones when there are any. Steal cannot be waited out (it
comes and goes with the host's other guests, for minutes), but it moves from one run to the next:
a pair whose off run had 20 % steal and whose on run none measures the host, not the policy. The
paired ratio therefore uses the *calm* pairs when there are any: both runs quiet and both with
steal at most MAX_STEAL_PERCENT of a core (then the quiet pairs, then every pair); the filter
looks only at the machine, never at the ratio, so it drops pairs disturbed either way.

Reads: /proc (CPU times), the measured source tree's ``policies/*.toml`` (rate-limit names), the
gateways' SQLite databases (read-only, after the runs).

Usage (from the repository root)::

    .venv/bin/python bench/run.py            # full run, both connection modes
    .venv/bin/python bench/run.py --quick    # smoke run, small counts
    .venv/bin/python bench/run.py --profile  # plus one profiled gateway run per cell
    .venv/bin/python bench/run.py --policy both --sizes 2KB --sessions 20   # shipped policy's cost

Needs: ``/usr/sbin/smtp-source`` and ``/usr/sbin/smtp-sink`` (Debian package ``postfix``; the
Postfix daemon itself is not used and must not be running), and for ``--profiler py-spy`` the
``py-spy`` package in the venv. Speed is never asserted; this only measures and reports.

Security notes: traffic stays on 127.0.0.1; every process started here is stopped here.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import linecache
import os
import platform
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from common import (
    HOST,
    PIPELINE_OFF,
    free_port,
    gateway_config,
    ours_cpu_seconds,
    pyspy_path,
    read_only,
    start_gateway,
    steal_seconds,
    stop_process,
    system_busy_seconds,
    tail,
    tree_cpu,
    wait_for_smtp,
)

P = TypeVar("P")
R = TypeVar("R", bound="Run")
C = TypeVar("C", bound="Named")

REPO = Path(__file__).resolve().parent.parent
# The gateway sources measured: this checkout, or another tree given with --gateway-src (e.g. a
# `git archive` of a commit), put first on the gateway's PYTHONPATH.
GATEWAY_SRC = REPO
RUN_STAMP = "run"  # the run's UTC timestamp, set by main(); names the kept profile files
RESULTS_DIR = REPO / "bench" / "results"
SMTP_SOURCE = "/usr/sbin/smtp-source"
SMTP_SINK = "/usr/sbin/smtp-sink"
HELO_NAME = "bench.local"
SENDER = "bench@bench.local"
RECIPIENT = "sink@example.test"
SINK_USER = "nobody"
PYSPY_RATE = 200  # samples per second and thread
GOAL_MSGS_PER_SEC = 500.0
GOAL_POLICY_RATIO = 0.8  # issue 3: msgs/s with the shipped policy on / off (paired, --policy both)
# A run during which processes outside the benchmark used more than this (% of one core) is
# "disturbed": medians use the quiet runs when there are any.
MAX_OTHER_PERCENT = 10.0  # at 20 sessions, ~2 KB messages, audit written
MAX_STEAL_PERCENT = 10.0  # hypervisor steal (% of one core) a run of a calm pair may have

SIZES = {"2KB": 2048, "100KB": 102_400}
# Messages per timed run: large enough that the baseline run lasts well over 0.1 s.
FULL_COUNTS = {("2KB", 1): 2000, ("2KB", 20): 10_000, ("100KB", 1): 500, ("100KB", 20): 2000}
QUICK_COUNTS = {("2KB", 1): 100, ("2KB", 20): 400, ("100KB", 1): 30, ("100KB", 20): 100}

# How the gateway is started: "cli" is exactly `mailward --config FILE serve` (the console
# script's entry point); "app" builds GatewayApp the way `serve` does, without the CLI (a fallback
# for when an unrelated sub-command does not import).
LAUNCHERS = {
    # (guarded: the spam-score worker processes are started with multiprocessing's "spawn", which
    # imports this script in each worker; unguarded, a worker would run a second gateway)
    "cli": """\
import sys
from gateway.cli import main
if __name__ == "__main__":
    sys.exit(main())
""",
    "app": """\
import asyncio, sys
from gateway.app import GatewayApp, validate_pipeline
from gateway.config import load_config
from gateway.logs import configure
if __name__ == "__main__":
    config = load_config(sys.argv[2])
    validate_pipeline(config, sys.argv[2])
    configure(config.log)
    asyncio.run(GatewayApp(config).serve_forever())
""",
}


# --------------------------------------------------------------------------- small helpers


def wait_quiet(timeout: float, *pids: int, ours: Callable[..., float] = ours_cpu_seconds) -> float:
    """Wait (up to ``timeout`` s) for a 1-second window in which processes outside the benchmark
    use at most MAX_OTHER_PERCENT of a core (hypervisor steal is not a process: not counted).
    Returns the other load of the last window, in %. ``ours(*pids)`` is the CPU time of the
    benchmark's processes (default: this harness, its reaped children and the process trees
    ``pids``: the sink, each gateway with its workers)."""
    deadline = time.monotonic() + timeout
    while True:
        ours0, busy0, t0 = ours(*pids), system_busy_seconds(), time.monotonic()
        time.sleep(1.0)
        other = (system_busy_seconds() - busy0) - (ours(*pids) - ours0)
        percent = 100 * max(0.0, other) / (time.monotonic() - t0)
        if percent <= MAX_OTHER_PERCENT or time.monotonic() >= deadline:
            return round(percent, 1)


def machine_info() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError):
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split(":", 1)[1].strip()
    postfix = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        postfix = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", "postfix"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "memory": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "postfix_package": postfix,
        "loadavg_at_start": os.getloadavg(),
    }


def code_version() -> dict[str, Any]:
    """Which gateway is measured: its source tree, the commit and whether gateway/ has uncommitted
    changes (for this checkout), and a digest of gateway/**/*.py."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted((GATEWAY_SRC / "gateway").rglob("*.py")):
        digest.update(str(path.relative_to(GATEWAY_SRC)).encode() + b"\0" + path.read_bytes())
    info: dict[str, Any] = {
        "gateway_src": str(GATEWAY_SRC),
        "gateway_sources_sha256": digest.hexdigest()[:16],
    }
    if GATEWAY_SRC != REPO:
        return info
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        git = ["git", "-C", str(REPO)]
        info["commit"] = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        info["gateway_dirty"] = bool(
            subprocess.run(
                [*git, "status", "--porcelain", "--", "gateway", "policies", "migrations"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
        )
    return info


def postfix_master_running() -> bool:
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if b"/usr/lib/postfix/sbin/master" in cmdline.read_bytes():
                return True
    return False


# --------------------------------------------------------------------------- smtp-sink


class Sink:
    """``smtp-sink`` on a free loopback port; counts the messages it received (``-c``)."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.out = workdir / "smtp-sink.out"
        self.cmd = [SMTP_SINK, "-c", "-u", SINK_USER, f"{HOST}:{self.port}", "1024"]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.out.open("wb") as out:
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT)
        wait_for_smtp(self.port, self.proc, 10)

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    def messages(self) -> int:
        """The sink's running message counter (its ``-c`` output: ``sess=N quit=N mesg=N``)."""
        text = tail(self.out, 200).replace("\n", "\r")
        for record in reversed(text.split("\r")):
            for item in record.split():
                if item.startswith("mesg="):
                    with contextlib.suppress(ValueError):
                        return int(item[5:])
        return 0

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, grace=5)


# --------------------------------------------------------------------------- smtp-source


@dataclass
class SourceRun:
    count: int
    seconds: float
    msgs_per_sec: float
    sink_received: int
    ok: bool
    error: str = ""
    other_cpu_percent: float | None = None  # CPU used by processes not in the benchmark
    steal_percent: float | None = None  # hypervisor steal over the run, % of one core
    policy: str | None = None  # the gateway's --policy (None: the baseline, sink directly)
    gateway_cpu_seconds: float | None = None  # the gateway process itself (all threads)
    workers_cpu_seconds: float | None = None  # everything below it (spam-score workers)


def source_cmd(port: int, size: int, sessions: int, count: int, reuse: bool) -> list[str]:
    cmd = [SMTP_SOURCE, "-s", str(sessions), "-m", str(count), "-l", str(size)]
    if reuse:
        cmd.append("-d")  # several messages per connection
    cmd += ["-M", HELO_NAME, "-f", SENDER, "-t", RECIPIENT, "-S", "bench", f"{HOST}:{port}"]
    return cmd


@dataclass
class Timed:
    """One timed ``smtp-source`` run (:func:`timed_source`): the fields every benchmark's run
    record has."""

    count: int
    seconds: float
    msgs_per_sec: float
    sink_received: int
    ok: bool
    error: str
    other_cpu_percent: float  # CPU used by processes not in the benchmark, % of one core


def timed_source(
    cmd: list[str],
    sink: Sink,
    count: int,
    *,
    ours: Callable[[], float],
    probe: Callable[[], P],
    expected: int | None = None,
    timeout: float = 1800,
    settle: int = 1,
) -> tuple[Timed, P, P]:
    """Run ``cmd`` (smtp-source sending ``count`` messages) and time it; the sink must receive
    ``expected`` messages (default ``count``; re-read up to ``settle`` times, 0.2 s apart: its
    counter may lag). The CPU used outside the benchmark is the machine's busy time less
    ``ours()`` (the CPU time of the benchmark's processes) over the run. ``probe()`` is sampled
    just before and just after the run (e.g. a gateway's CPU time) and returned with it."""
    expected = count if expected is None else expected
    before = sink.messages()
    probe0 = probe()
    ours0, busy0 = ours(), system_busy_seconds()
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=timeout)
        rc, err = proc.returncode, proc.stderr.decode("utf-8", "replace").strip()
    except subprocess.TimeoutExpired:
        rc, err = -1, f"smtp-source timed out after {timeout:.0f} s"
    seconds = time.perf_counter() - t0
    ours1, busy1 = ours(), system_busy_seconds()
    probe1 = probe()
    other = max(0.0, (busy1 - busy0) - (ours1 - ours0))
    received = sink.messages() - before
    for _ in range(settle):  # the counter file may lag a little
        if received >= expected:
            break
        time.sleep(0.2)
        received = sink.messages() - before
    ok = rc == 0 and received == expected
    if not ok and not err:
        err = f"smtp-source exit {rc}, sink received {received} of {expected}"
    timed = Timed(
        count=count,
        seconds=round(seconds, 4),
        msgs_per_sec=round(count / seconds, 1),
        sink_received=received,
        ok=ok,
        error=err[-800:],
        other_cpu_percent=round(100 * other / seconds, 1),
    )
    return timed, probe0, probe1


def run_source(
    sink: Sink,
    port: int,
    size: int,
    sessions: int,
    count: int,
    reuse: bool,
    gateway_pid: int | None = None,
    timeout: float = 1800,
    *,
    others: Sequence[int] = (),
    policy: str | None = None,
) -> SourceRun:
    """One timed smtp-source run of ``count`` messages to ``port`` (the sink, or the gateway
    ``gateway_pid`` with the policy ``policy``). The benchmark's own CPU, left out of the other
    load, is this harness, smtp-source, the sink and the process trees of ``gateway_pid`` and of
    ``others`` (the other gateway, idle meanwhile). Also read over the run: the gateway's CPU (the
    process itself and everything below it, see :func:`common.tree_cpu`) and the machine's
    hypervisor steal."""
    roots = (sink.pid, gateway_pid or 0, *others)

    def probe() -> tuple[float | None, float | None, float]:
        root, below = tree_cpu(gateway_pid) if gateway_pid else (None, None)
        return root, below, steal_seconds()

    timed, (root0, below0, steal0), (root1, below1, steal1) = timed_source(
        source_cmd(port, size, sessions, count, reuse),
        sink,
        count,
        ours=lambda: ours_cpu_seconds(*roots),
        probe=probe,
        timeout=timeout,
    )

    def delta(a: float | None, b: float | None) -> float | None:
        return round(b - a, 3) if a is not None and b is not None else None

    return SourceRun(
        **asdict(timed),
        steal_percent=round(100 * (steal1 - steal0) / timed.seconds, 1) if timed.seconds else None,
        policy=policy,
        gateway_cpu_seconds=delta(root0, root1),
        workers_cpu_seconds=delta(below0, below1),
    )


class Run(Protocol):
    """A timed run as :func:`kept` and :func:`quiet` judge it."""

    @property
    def ok(self) -> bool: ...

    @property
    def other_cpu_percent(self) -> float | None: ...


def kept(runs: Sequence[R]) -> list[R]:
    """The successful runs during which the machine was quiet (other load at most
    MAX_OTHER_PERCENT of a core); all successful runs if none was."""
    good = [r for r in runs if r.ok]
    quiet_runs = [r for r in good if (r.other_cpu_percent or 0) <= MAX_OTHER_PERCENT]
    return quiet_runs or good


def quiet(runs: Sequence[Run]) -> int:
    """How many of ``runs`` succeeded while the machine was quiet."""
    return sum(1 for r in runs if r.ok and (r.other_cpu_percent or 0) <= MAX_OTHER_PERCENT)


def calm(pair: tuple[SourceRun, SourceRun]) -> bool:
    """Both runs of a pair succeeded, were quiet and had little hypervisor steal (at most
    MAX_STEAL_PERCENT of a core each): the ratio of such a pair measures the gateways."""
    return quiet(pair) == 2 and all(
        r.steal_percent is not None and r.steal_percent <= MAX_STEAL_PERCENT for r in pair
    )


# --------------------------------------------------------------------------- the gateway


def gateway_toml(state_dir: Path, port: int, sink_port: int, policy: str = "on") -> str:
    """The benchmark gateway's configuration; ``policy`` "on": the shipped pipeline (rate limits
    raised so they never refuse), "off": every configurable check off (:data:`POLICY_OFF`)."""
    return gateway_config(
        title="Mailward benchmark configuration (written by bench/run.py)",
        src=GATEWAY_SRC,
        state_dir=state_dir,
        hostname=HELO_NAME,
        listener="bench",
        port=port,
        upstream_port=sink_port,
        relay="pool_size = 32\n",
        log_level="warning",
        pipeline=policy_overrides(policy),
    )


POLICY_OFF = (
    "\n# --policy off: every configurable check switched off (the fixed AUTH gate still applies), "
    "to\n# measure the shipped policy's cost as the ratio of a policy-on run to this one"
    + PIPELINE_OFF
)


def policy_overrides(policy: str) -> str:
    """The configuration added for a gateway's policy: :data:`POLICY_OFF` for "off", else
    nothing (the shipped pipeline)."""
    return POLICY_OFF if policy == "off" else ""


class Gateway:
    """``mailward serve`` with the policy ``policy`` ("on" or "off", see :func:`gateway_toml`) in
    a subprocess, with a state directory and configuration of its own; under cProfile for its
    whole life if asked (py-spy attaches to the running process instead, see :class:`PySpy`)."""

    def __init__(
        self,
        workdir: Path,
        sink_port: int,
        policy: str,
        entry: str = "cli",
        cprofile: bool = False,
    ) -> None:
        self.policy = policy
        self.dir = Path(tempfile.mkdtemp(prefix=f"gw-{policy}-", dir=workdir))
        self.state = self.dir / "state"
        self.state.mkdir()
        self.port = free_port()
        self.config = self.dir / "mailward.toml"
        self.config.write_text(gateway_toml(self.state, self.port, sink_port, policy))
        launcher = self.dir / "launch_mailward.py"
        launcher.write_text(LAUNCHERS[entry])
        self.log = self.dir / "gateway.log"
        self.profile_out = self.dir / "profile.pstats"
        serve = [str(launcher), "--config", str(self.config), "serve"]
        if cprofile:
            self.cmd = [sys.executable, "-m", "cProfile", "-o", str(self.profile_out), *serve]
        else:
            self.cmd = [sys.executable, *serve]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    def start(self) -> None:
        self.proc = start_gateway(
            self.cmd,
            port=self.port,
            log=self.log,
            cwd=self.dir,
            src=GATEWAY_SRC,
            label=f"gateway (policy {self.policy})",
        )

    def stop(self) -> str:
        """SIGTERM (graceful: sessions end, the audit is flushed), SIGKILL after 30 s."""
        if self.proc is None:
            return "not started"
        return stop_process(self.proc)

    def audit_summary(self) -> dict[str, Any]:
        """Counts of audit records by kind and outcome, read from the SQLite database."""
        db = self.state / "mailward.db"
        if not db.exists():
            return {"error": f"no database at {db}"}
        try:
            with read_only(db) as con:
                rows = con.execute(
                    "SELECT kind, coalesce(outcome, ''), count(*), avg(size) "
                    "FROM audit_record GROUP BY 1, 2 ORDER BY 1, 2"
                ).fetchall()
        except sqlite3.Error as exc:
            return {"error": f"cannot read audit_record: {exc}"}
        by = {f"{k}/{o}": n for k, o, n, _ in rows}
        sizes = {f"{k}/{o}": round(s) for k, o, _, s in rows if s is not None}
        return {
            "records": by,
            "avg_size": sizes,
            "delivered": by.get("message/delivered", 0),
        }


# --------------------------------------------------------------------------- profiles


def _short(path: str) -> str:
    if path.endswith("launch_mailward.py"):
        return "launch_mailward.py"
    for marker in ("site-packages/", f"{GATEWAY_SRC}/", f"{REPO}/"):
        if marker in path:
            return path.split(marker, 1)[1]
    if "/lib/python3" in path:
        return "stdlib/" + path.split("/lib/python3", 1)[1].split("/", 1)[-1]
    return path


def _bucket(path: str) -> str:
    """Which software a frame's file belongs to: gateway, a library, asyncio, other stdlib."""
    short = _short(path)
    if short.startswith("gateway/"):
        return "gateway (ours)"
    if short.startswith("stdlib/"):
        rest = short[len("stdlib/") :]
        return "stdlib: asyncio" if rest.startswith("asyncio/") else "stdlib: other"
    if "site-packages/" in path:
        return short.split("/", 1)[0].removesuffix(".py")
    return "other"


class PySpy:
    """``py-spy record`` attached to a running process; stopped with SIGINT, which writes the
    profile. Only what happens between start and stop is sampled (no start-up, no warm-up)."""

    def __init__(self, pid: int, out: Path, rate: int = PYSPY_RATE) -> None:
        self.out = out
        self.log = out.with_suffix(".log")
        self.cmd = [
            pyspy_path() or "py-spy", "record", "--pid", str(pid), "--rate", str(rate),
            "--format", "raw", "--threads", "--full-filenames", "--output", str(out),
        ]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT)
        # It prints "Sampling process ..." once attached.
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if b"Sampling process" in self.log.read_bytes():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"py-spy did not attach: {tail(self.log, 800)}")

    def stop(self) -> str:
        if self.proc is None:
            return "not started"
        return stop_process(self.proc, signal.SIGINT, grace=60)


_TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d[,.]\d+ ")
_WAIT_LINE = re.compile(r"\.get\(|\.wait\(|\.acquire\(")


def _waiting(func: str, file: str, line: int) -> str | None:
    """Whether a leaf frame is a thread waiting rather than working: py-spy's own idle detection
    does not catch these here. The event loop blocked in epoll, or a worker thread blocked on its
    queue (the aiosqlite thread at ``tx.get()``; that line also absorbs the time the thread waits to
    get the GIL back after being woken)."""
    if file.endswith("selectors.py") and func.endswith("select"):
        return "waiting: event loop in epoll"
    if _bucket(file) != "gateway (ours)" and _WAIT_LINE.search(linecache.getline(file, line)):
        return "waiting: worker thread on its queue/lock (or for the GIL)"
    return None


def summarize_pyspy(path: Path, top: int, seconds: float, rate: int) -> dict[str, Any]:
    """From py-spy's raw collapsed stacks (``--threads``): samples per thread, how many were
    waiting, and over the working samples only: self samples per package, the top functions by
    self and by inclusive ('cumulative') samples, and the gateway's own functions by inclusive
    samples (what our code costs, callees included)."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    buckets: Counter[str] = Counter()
    ours: Counter[str] = Counter()
    threads: dict[str, Counter[str]] = {}
    busy = 0
    for raw in path.read_text(errors="replace").splitlines():
        stack, _, n = raw.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        parts = stack.split(";")
        thread = "?"
        if parts[0].startswith("thread ("):
            thread = parts.pop(0).split(": ", 1)[-1]
        frames = []
        for frame in parts:
            func, _, loc = frame.partition(" (")
            file, _, line = loc.rstrip(")").rpartition(":")
            frames.append((f"{func} ({_short(file)})", func, file, int(line or 0)))
        if not frames:
            continue
        per_thread = threads.setdefault(thread, Counter())
        per_thread["samples"] += count
        wait = _waiting(*frames[-1][1:])
        if wait:
            per_thread[wait] += count
            continue
        per_thread["working"] += count
        busy += count
        for name in {f[0] for f in frames}:
            inclusive[name] += count
        for name in {f[0] for f in frames if _bucket(f[2]) == "gateway (ours)"}:
            ours[name] += count
        own[frames[-1][0]] += count
        buckets[_bucket(frames[-1][2])] += count

    def pct(n: int) -> float:
        return round(100.0 * n / busy, 1) if busy else 0.0

    def listing(counter: Counter[str]) -> list[dict[str, Any]]:
        return [
            {"function": f, "samples": n, "percent": pct(n)} for f, n in counter.most_common(top)
        ]

    wall = seconds * rate
    return {
        "profiler": f"py-spy record --threads (sampling, {rate} Hz, all threads), attached after "
        "the warm-up for the timed load only; percentages are of the working samples (waiting "
        "leaves removed)",
        "working_samples": busy,
        "threads": {
            name: {
                **dict(c),
                "working_percent_of_wall": round(100.0 * c["working"] / wall, 1) if wall else None,
            }
            for name, c in sorted(threads.items(), key=lambda kv: -kv[1]["samples"])
        },
        "self_by_package": {b: pct(n) for b, n in buckets.most_common()},
        "top_self": listing(own),
        "top_cumulative": listing(inclusive),
        "top_gateway_cumulative": listing(ours),
    }


def summarize_cprofile(path: Path, top: int) -> dict[str, Any]:
    import pstats

    stats = pstats.Stats(str(path))
    entries = stats.stats  # type: ignore[attr-defined]
    total = sum(tt for (_, _, tt, _, _) in entries.values()) or 1.0
    rows = []
    buckets: Counter[str] = Counter()
    for (file, line, func), (_cc, nc, tt, ct, _) in entries.items():
        name = f"{func} ({_short(file)}:{line})"
        rows.append((name, nc, tt, ct))
        buckets[_bucket(file)] += tt

    def fmt(r: tuple[str, int, float, float]) -> dict[str, Any]:
        return {
            "function": r[0],
            "calls": r[1],
            "tottime": round(r[2], 3),
            "cumtime": round(r[3], 3),
        }

    return {
        "profiler": "cProfile (deterministic, main thread only, whole process life: start-up "
        "and warm-up included)",
        "total_tottime": round(total, 3),
        "top_cumulative": [fmt(r) for r in sorted(rows, key=lambda r: -r[3])[:top]],
        "top_self": [fmt(r) for r in sorted(rows, key=lambda r: -r[2])[:top]],
        "self_by_package": {
            b: round(100.0 * t / total, 1) for b, t in buckets.most_common() if t > 0
        },
    }


# --------------------------------------------------------------------------- the run


#: The gateways of a cell for each ``--policy``: "both" runs policy off and on side by side.
POLICIES = {"on": ("on",), "off": ("off",), "both": ("off", "on")}


@dataclass
class Cell:
    size_label: str
    size: int
    sessions: int
    count: int
    connection: str  # "new" (one message per connection) or "reuse" (smtp-source -d)
    # The gateways measured, by policy: one, or ("off", "on") for the paired comparison.
    policies: tuple[str, ...] = ("on",)
    baseline: list[SourceRun] = field(default_factory=list)
    gateways: dict[str, list[SourceRun]] = field(default_factory=dict)  # timed runs by policy
    warmup: int = 0  # messages of the warm-up, through each gateway
    audit: dict[str, dict[str, Any]] = field(default_factory=dict)  # by policy
    gateway_stop: dict[str, str] = field(default_factory=dict)  # by policy
    error: str = ""
    profile: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.size_label} x{self.sessions} {self.connection}"

    @property
    def paired(self) -> bool:
        """Whether the cell compares policy off and on side by side (``--policy both``)."""
        return len(self.policies) == 2

    @property
    def main_policy(self) -> str:
        """The gateway of the flat figures (msgs/s, ratio to the baseline, the msgs/s goal): the
        only one, or policy on when paired."""
        return "on" if self.paired else self.policies[0]

    def runs(self, policy: str) -> list[SourceRun]:
        return self.gateways.get(policy, [])

    def all_runs(self) -> list[SourceRun]:
        return [*self.baseline, *(r for p in self.policies for r in self.runs(p))]

    def median(self, runs: list[SourceRun]) -> float | None:
        rates = [r.msgs_per_sec for r in kept(runs)]
        return round(statistics.median(rates), 1) if rates else None

    def paired_ratios(self) -> list[float | None]:
        """Per repeat: msgs/s of the policy-on run divided by that of the policy-off run of the
        same repeat (None if either failed)."""
        return [
            round(on.msgs_per_sec / off.msgs_per_sec, 4) if on.ok and off.ok else None
            for off, on in zip(self.runs("off"), self.runs("on"), strict=False)
        ]

    def used_pairs(self) -> list[tuple[SourceRun, SourceRun]]:
        """The (off, on) pairs the paired ratio uses: the calm ones (see :func:`calm`) when there
        are any, else those whose two runs were quiet, else every pair that succeeded."""
        good = [
            (off, on)
            for off, on in zip(self.runs("off"), self.runs("on"), strict=False)
            if off.ok and on.ok
        ]
        return [p for p in good if calm(p)] or [p for p in good if quiet(p) == 2] or good

    def paired_ratio(self) -> float | None:
        """The median of the paired ratios over :meth:`used_pairs`."""
        ratios = [on.msgs_per_sec / off.msgs_per_sec for off, on in self.used_pairs()]
        return round(statistics.median(ratios), 4) if ratios else None

    def gateway_summary(self, policy: str, base: float | None) -> dict[str, Any]:
        """The figures of one gateway: msgs/s (median), ratio to the baseline's median, its CPU
        per message (the gateway process; its workers, i.e. everything below it) and in % of one
        core, and the audit check."""
        runs = self.runs(policy)
        gw = self.median(runs)
        measured = [
            r
            for r in kept(runs)
            if r.gateway_cpu_seconds is not None and r.workers_cpu_seconds is not None
        ]

        def ms_per_msg(values: list[float]) -> float | None:
            return round(1000 * statistics.median(values), 3) if values else None

        busy = [(r.gateway_cpu_seconds or 0.0) / r.seconds for r in measured]
        expected = self.warmup + sum(r.count for r in runs)
        return {
            "msgs_per_sec": gw,
            "ratio": round(gw / base, 4) if base and gw else None,
            "cpu_ms_per_msg": ms_per_msg(
                [(r.gateway_cpu_seconds or 0.0) / r.count for r in measured]
            ),
            "workers_cpu_ms_per_msg": ms_per_msg(
                [(r.workers_cpu_seconds or 0.0) / r.count for r in measured]
            ),
            "cpu_percent": round(100 * statistics.median(busy), 1) if busy else None,
            "quiet_runs": f"{quiet(runs)}/{len(runs)}",
            "audit_expected_delivered": expected,
            "audit_ok": self.audit.get(policy, {}).get("delivered") == expected,
        }

    def summary(self) -> dict[str, Any]:
        base = self.median(self.baseline)
        gateways = {p: self.gateway_summary(p, base) for p in self.policies}
        main = gateways[self.main_policy]
        runs = self.all_runs()
        other = [r.other_cpu_percent for r in runs if r.other_cpu_percent is not None]
        steal = [r.steal_percent for r in runs if r.steal_percent is not None]
        return {
            "policy": "both" if self.paired else self.main_policy,
            "baseline_msgs_per_sec": base,
            "gateway_msgs_per_sec": main["msgs_per_sec"],
            "ratio": main["ratio"],
            "gateway_cpu_ms_per_msg": main["cpu_ms_per_msg"],
            "workers_cpu_ms_per_msg": main["workers_cpu_ms_per_msg"],
            "gateway_cpu_percent": main["cpu_percent"],
            "paired_ratios": self.paired_ratios() if self.paired else None,
            "paired_ratio": self.paired_ratio() if self.paired else None,
            "paired_used": len(self.used_pairs()) if self.paired else None,
            "paired_calm": (
                sum(1 for p in zip(self.runs("off"), self.runs("on"), strict=False) if calm(p))
                if self.paired
                else None
            ),
            "other_cpu_percent_max": max(other) if other else None,
            "steal_percent_max": max(steal) if steal else None,
            "steal_percent_median": round(statistics.median(steal), 1) if steal else None,
            "quiet_runs": " ".join(
                [f"{quiet(self.baseline)}/{len(self.baseline)}"]
                + [gateways[p]["quiet_runs"] for p in self.policies]
            ),
            "audit_ok": all(g["audit_ok"] for g in gateways.values()),
            "gateways": gateways,
        }


def build_cells(args: argparse.Namespace) -> list[Cell]:
    counts = QUICK_COUNTS if args.quick else FULL_COUNTS
    connections = ["new", "reuse"] if args.connection == "both" else [args.connection]
    cells = []
    for connection in connections:
        for label in args.sizes:
            for sessions in args.sessions:
                n = counts.get((label, sessions)) or counts[(label, 20 if sessions > 1 else 1)]
                n = max(sessions, int(n * args.scale))
                cells.append(
                    Cell(label, SIZES[label], sessions, n, connection, POLICIES[args.policy])
                )
    return cells


def gateway_audit(gw: Gateway, stopped: str) -> dict[str, Any]:
    """A stopped gateway's audit counts (:meth:`Gateway.audit_summary`), its log's length and
    most frequent lines, and the end of its log if it did not exit cleanly."""
    audit = gw.audit_summary()
    log_lines = tail(gw.log, 10**8).splitlines()
    audit["gateway_log_lines"] = len(log_lines)
    lines = Counter(_TIMESTAMP.sub("", line) for line in log_lines)
    audit["gateway_log_top"] = lines.most_common(5)
    if "KILLED" in stopped or not stopped.startswith("exited (0"):
        audit["gateway_log_tail"] = tail(gw.log, 1500)
    return audit


def run_cell(
    cell: Cell, sink: Sink, workdir: Path, repeat: int, entry: str, wait: float = 0.0
) -> None:
    """Measure ``cell``: start its gateways (one per policy, each with its own state directory
    and configuration), warm each up, then ``repeat`` times: wait up to ``wait`` s for a quiet
    window, a baseline run, and a run through each gateway. With two gateways the order
    alternates (ABBA: repeat 0 off then on, repeat 1 on then off, ...), so that the machine's
    drift during the cell weighs on both alike and each repeat gives a paired on/off ratio of
    two runs a few seconds apart. Finally the gateways are stopped and their audits read."""
    reuse = cell.connection == "reuse"
    gws = {p: Gateway(workdir, sink.port, p, entry) for p in cell.policies}
    cell.gateways = {p: [] for p in cell.policies}
    roots: list[int] = []  # the gateways' pids, once started

    def through(policy: str, count: int) -> SourceRun:
        gw = gws[policy]
        others = [pid for pid in roots if pid != gw.pid]
        return run_source(
            sink,
            gw.port,
            cell.size,
            cell.sessions,
            count,
            reuse,
            gw.pid,
            others=others,
            policy=policy,
        )

    try:
        for gw in gws.values():
            gw.start()
        roots = [gw.pid for gw in gws.values()]
        cell.warmup = min(cell.count, max(50, 5 * cell.sessions))
        for policy in cell.policies:
            warm = through(policy, cell.warmup)
            if not warm.ok:
                cell.error = f"warm-up through the gateway (policy {policy}) failed: {warm.error}"
                return
        for i in range(repeat):
            if wait > 0:
                wait_quiet(wait, sink.pid, *roots)
            cell.baseline.append(
                run_source(
                    sink, sink.port, cell.size, cell.sessions, cell.count, reuse, others=roots
                )
            )
            for policy in cell.policies if i % 2 == 0 else cell.policies[::-1]:
                cell.gateways[policy].append(through(policy, cell.count))
    except RuntimeError as exc:
        cell.error = str(exc)
    finally:
        for policy, gw in gws.items():
            if gw.proc is not None:
                cell.gateway_stop[policy] = gw.stop()
                cell.audit[policy] = gateway_audit(gw, cell.gateway_stop[policy])


def profile_cell(
    cell: Cell,
    sink: Sink,
    workdir: Path,
    entry: str,
    profiler: str,
    top: int,
    wait: float = 0.0,
) -> None:
    """One more gateway run of the cell's load, profiled; the summary goes to ``cell.profile``.
    The gateway is a fresh one with the cell's main policy (policy on with ``--policy both``)."""
    reuse = cell.connection == "reuse"
    policy = cell.main_policy
    gw = Gateway(workdir, sink.port, policy, entry, cprofile=profiler == "cprofile")
    try:
        gw.start()
    except RuntimeError as exc:
        cell.profile = {"error": str(exc)}
        return
    run: SourceRun | None = None
    raw = gw.dir / "profile.txt"
    try:
        warm = min(cell.count, max(50, 5 * cell.sessions))
        run_source(sink, gw.port, cell.size, cell.sessions, warm, reuse)
        if wait > 0:
            wait_quiet(wait, sink.pid, gw.pid)
        spy = PySpy(gw.pid, raw) if profiler == "py-spy" else None
        if spy is not None:
            spy.start()
        try:
            run = run_source(
                sink, gw.port, cell.size, cell.sessions, cell.count, reuse, gw.pid, policy=policy
            )
        finally:
            if spy is not None:
                spy.stop()
    except RuntimeError as exc:
        cell.profile = {"error": str(exc)}
        return
    finally:
        stopped = gw.stop()
    out = raw if profiler == "py-spy" else gw.profile_out
    if not out.exists():
        cell.profile = {"error": f"no profile written (gateway {stopped})\n{tail(gw.log)}"}
        return
    if profiler == "py-spy":
        summary = summarize_pyspy(out, top, run.seconds if run else 0.0, PYSPY_RATE)
    else:
        summary = summarize_cprofile(out, top)
    kept = RESULTS_DIR / f"{RUN_STAMP}-profile-{cell.size_label}-x{cell.sessions}-{cell.connection}"
    kept = kept.with_suffix(out.suffix)
    shutil.copyfile(out, kept)
    summary["policy"] = policy
    summary["raw_file"] = str(kept.relative_to(REPO))
    summary["profiled_run"] = asdict(run) if run else None
    cell.profile = summary


class Named(Protocol):
    """A benchmark cell as :func:`table_cells` lists it."""

    @property
    def name(self) -> str: ...

    @property
    def error(self) -> str: ...


def table_cells(head: str, cells: Sequence[C], width: int) -> Iterator[C]:
    """Print the table head ``head`` and its rule, and for each cell that failed its name
    (``width`` columns) and the first line of its error; yields the others, for their rows."""
    print(head)
    print("-" * len(head))
    for cell in cells:
        if cell.error:
            print(f"{cell.name:<{width}} ERROR: {cell.error.splitlines()[0]}")
            continue
        yield cell


def _fmt(v: Any, spec: str) -> str:
    """``v`` formatted with ``spec``, or "-" right-aligned in its width if there is none."""
    return format(v, spec) if v is not None else format("-", ">" + spec.split(".")[0])


def audit_text(cell: Cell, s: dict[str, Any]) -> str:
    """The table's audit column: "-" without a gateway, "ok", or what each failing gateway has
    (delivered records, or the error reading them) of what it should have."""
    if not any(cell.runs(p) for p in cell.policies):
        return "-"
    if s["audit_ok"]:
        return "ok"
    failed = []
    for policy, g in s["gateways"].items():
        if not g["audit_ok"]:
            audit = cell.audit.get(policy, {})
            label = f"{policy}: " if cell.paired else ""
            failed.append(
                f"{label}{audit.get('delivered', audit.get('error'))}"
                f" of {g['audit_expected_delivered']}"
            )
    return "; ".join(failed)


def goal_status(cells: Sequence[Cell], figure: str, goal: float) -> dict[str, dict[str, Any]]:
    """Per connection mode: the cell summary's ``figure``, the ``goal`` and whether it is met (at
    least the goal, with the audit rows all there)."""
    status: dict[str, dict[str, Any]] = {}
    for cell in cells:
        s = cell.summary()
        met = (s[figure] or 0) >= goal and s["audit_ok"]
        status[cell.connection] = {figure: s[figure], "goal": goal, "met": met}
    return status


def print_failed_runs(cell: Cell) -> None:
    for kind, runs in (
        ("baseline", cell.baseline),
        *((f"gateway (policy {p})", cell.runs(p)) for p in cell.policies),
    ):
        for r in runs:
            if not r.ok:
                print(f"    {kind} run failed: {r.error.splitlines()[-1] if r.error else ''}")


def print_table(cells: list[Cell]) -> None:
    if any(c.paired for c in cells):
        print_paired_table(cells)
        return
    head = (
        f"{'cell':<18} {'msgs':>6}  {'baseline/s':>10}  {'gateway/s':>9}  {'ratio':>6}  "
        f"{'gw CPU ms/msg':>13}  {'workers ms/msg':>14}  {'gw CPU%':>7}  {'other%':>6}  "
        f"{'steal%':>6}  {'quiet':>7}  audit"
    )
    for cell in table_cells(head, cells, 18):
        s = cell.summary()
        print(
            f"{cell.name:<18} {cell.count:>6}  {_fmt(s['baseline_msgs_per_sec'], '10.1f')}  "
            f"{_fmt(s['gateway_msgs_per_sec'], '9.1f')}  {_fmt(s['ratio'], '6.3f')}  "
            f"{_fmt(s['gateway_cpu_ms_per_msg'], '13.2f')}  "
            f"{_fmt(s['workers_cpu_ms_per_msg'], '14.2f')}  "
            f"{_fmt(s['gateway_cpu_percent'], '7.1f')}  "
            f"{_fmt(s['other_cpu_percent_max'], '6.1f')}  {_fmt(s['steal_percent_max'], '6.1f')}  "
            f"{s['quiet_runs']:>7}  {audit_text(cell, s)}"
        )
        print_failed_runs(cell)


def print_paired_table(cells: list[Cell]) -> None:
    """The table of ``--policy both``: both gateways' msgs/s, the median paired on/off ratio
    (and each repeat's on the line below: its order, * if a run of the pair was disturbed), and
    CPU per message of each gateway process and of its workers."""
    head = (
        f"{'cell':<18} {'msgs':>6}  {'baseline/s':>10}  {'off/s':>7}  {'on/s':>7}  "
        f"{'on/off':>6}  {'gw CPU ms/msg off on':>20}  {'workers ms/msg off on':>21}  "
        f"{'other%':>6}  {'steal%':>6}  {'quiet':>11}  audit"
    )
    for cell in table_cells(head, cells, 18):
        s = cell.summary()
        off, on = s["gateways"]["off"], s["gateways"]["on"]
        print(
            f"{cell.name:<18} {cell.count:>6}  {_fmt(s['baseline_msgs_per_sec'], '10.1f')}  "
            f"{_fmt(off['msgs_per_sec'], '7.1f')}  {_fmt(on['msgs_per_sec'], '7.1f')}  "
            f"{_fmt(s['paired_ratio'], '6.3f')}  "
            f"{_fmt(off['cpu_ms_per_msg'], '13.2f')} {_fmt(on['cpu_ms_per_msg'], '6.2f')}  "
            f"{_fmt(off['workers_cpu_ms_per_msg'], '14.2f')} "
            f"{_fmt(on['workers_cpu_ms_per_msg'], '6.2f')}  "
            f"{_fmt(s['other_cpu_percent_max'], '6.1f')}  {_fmt(s['steal_percent_max'], '6.1f')}  "
            f"{s['quiet_runs']:>11}  {audit_text(cell, s)}"
        )
        pairs = []
        for i, (ratio, r_off, r_on) in enumerate(
            zip(s["paired_ratios"], cell.runs("off"), cell.runs("on"), strict=False)
        ):
            order = "off,on" if i % 2 == 0 else "on,off"
            mark = "*" if quiet([r_off, r_on]) < 2 else "" if calm((r_off, r_on)) else "s"
            pairs.append(f"{_fmt(ratio, '.3f')}{mark} ({order})")
        if pairs:
            print(
                f"    on/off by repeat: {'  '.join(pairs)}   "
                f"(calm pairs {s['paired_calm']}, median over {s['paired_used']})"
            )
        print_failed_runs(cell)


def print_legend(cells: list[Cell]) -> None:
    paired = any(c.paired for c in cells)
    if paired:
        print(
            "\nTwo gateways per cell, side by side: policy off (every check off) and policy on "
            "(the shipped policy); each repeat runs the baseline, then both gateways, the order "
            "alternating (off,on / on,off). off/s, on/s: median msgs/s of their timed runs; "
            "on/off: the median of the paired ratios (each on run / the off run of the same "
            "repeat, listed below the row; * = a run of the pair was disturbed by other "
            f"processes, s = a run had more than {MAX_STEAL_PERCENT:.0f} % steal), over the calm "
            "pairs (neither) when there are any, else the quiet ones."
        )
    else:
        print("\nmsgs/s: median of the timed runs; ratio: gateway/baseline.")
    print(
        "gw CPU: the gateway process (all threads), per message"
        + ("" if paired else " and in % of one core")
        + "; workers: everything below it (spam-score workers), per message; other%: the most "
        "CPU (in % of one core) used by processes outside the benchmark (both gateways' trees, "
        "sink, smtp-source and harness count as ours; steal does not count) during any run of "
        "the cell; steal%: the most hypervisor steal during any run (% of one core: how much "
        "the host held the machine's CPUs back); quiet: runs with other% <= "
        f"{MAX_OTHER_PERCENT:.0f} (baseline, "
        + ("off, on" if paired else "gateway")
        + "), the only ones the medians use when there are any."
    )
    busy = [
        c.name
        for c in cells
        if c.baseline
        and (not quiet(c.baseline) or any(c.runs(p) and not quiet(c.runs(p)) for p in c.policies))
    ]
    if busy:
        print(f"WARNING: no quiet run for: {', '.join(busy)}; figures disturbed, rerun")


def profile_head(title: str, p: dict[str, Any]) -> dict[str, Any] | None:
    """Print the ``title`` of the profile summary ``p``; if profiling failed, its error and None,
    else the profiled run (its figures, possibly none)."""
    print(title)
    if "error" in p:
        print(f"  ERROR: {p['error']}")
        return None
    return dict(p.get("profiled_run") or {})


def print_top(p: dict[str, Any], top: int) -> None:
    """The ``top`` functions of each list of the profile summary ``p`` (py-spy or cProfile)."""
    for key in ("top_self", "top_cumulative", "top_gateway_cumulative"):
        if key not in p:
            continue
        print(f"  {key}:")
        for e in p[key][:top]:
            amount = f"{e['percent']:5.1f}%" if "percent" in e else f"{e['cumtime']:8.3f}s"
            print(f"    {amount}  {e['function']}")


def print_profile(cell: Cell, top: int) -> None:
    p = cell.profile
    run = profile_head(
        f"\nProfile of the gateway (policy {p.get('policy', cell.main_policy)}), {cell.name} "
        f"({p.get('profiler', '')}):",
        p,
    )
    if run is None:
        return
    print(
        f"  profiled run: {run.get('msgs_per_sec')} msgs/s (slowed by the profiler; other load "
        f"{run.get('other_cpu_percent')}% of a core)"
    )
    for name, t in p.get("threads", {}).items():
        waits = ", ".join(f"{k} {v}" for k, v in t.items() if k.startswith("waiting"))
        print(
            f"  thread {name}: {t['samples']} samples, working {t.get('working', 0)} "
            f"(~{t.get('working_percent_of_wall')}% of wall time){'; ' + waits if waits else ''}"
        )
    print(
        "  self time by package: " + ", ".join(f"{b} {v}%" for b, v in p["self_by_package"].items())
    )
    print_top(p, top)


def add_wait_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--wait-quiet",
        type=float,
        help="before each timed pair, wait up to this many seconds for other processes to be "
        f"quiet (<= {MAX_OTHER_PERCENT:.0f}%% of a core); default 60, quick 0",
    )


def quick_defaults(args: argparse.Namespace) -> None:
    """``--repeat`` and ``--wait-quiet`` when not given: 3 and 60 s, with ``--quick`` 1 and 0."""
    args.repeat = args.repeat or (1 if args.quick else 3)
    if args.wait_quiet is None:
        args.wait_quiet = 0.0 if args.quick else 60.0


def tools_found() -> bool:
    """Whether smtp-source and smtp-sink can run; if not, says how to install them."""
    for tool in (SMTP_SOURCE, SMTP_SINK):
        if not os.access(tool, os.X_OK):
            print(f"bench: {tool} not found: apt-get install postfix (see bench/README.md)")
            return False
    return True


def result_head(started: dt.datetime, code: dict[str, Any]) -> dict[str, Any]:
    """The first entries of a results file: when, how, on what machine, which gateway."""
    return {
        "started": started.isoformat(timespec="seconds"),
        "argv": sys.argv,
        "machine": machine_info(),
        "code": code,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="smoke run: small counts, 1 repetition")
    p.add_argument(
        "--repeat", type=int, help="timed runs per cell (median kept; default 3, quick 1)"
    )
    p.add_argument("--scale", type=float, default=1.0, help="multiply every message count")
    p.add_argument(
        "--connection",
        choices=["new", "reuse", "both"],
        help="new: one message per connection (smtp-source default); reuse: smtp-source -d; "
        "default: both (quick: new)",
    )
    p.add_argument("--sizes", default="2KB,100KB", help="comma list of 2KB,100KB")
    p.add_argument("--sessions", default="1,20", help="comma list of concurrent sessions")
    p.add_argument(
        "--policy",
        choices=["on", "off", "both"],
        default="on",
        help="on: the shipped policy (limits raised so they never refuse); off: every check off; "
        "both: a gateway of each side by side per cell, runs alternating, with the paired on/off "
        "ratio (the shipped policy's cost, robust to the machine's drift); --profile then "
        "profiles the policy-on gateway",
    )
    p.add_argument(
        "--entry",
        choices=["cli", "app"],
        default="cli",
        help="cli: `mailward --config FILE serve` (default); app: GatewayApp without the CLI",
    )
    p.add_argument(
        "--gateway-src",
        type=Path,
        help="measure the gateway in this source tree (with gateway/, policies/, migrations/), "
        "e.g. `git archive <commit> | tar -x -C DIR`; default: this checkout",
    )
    add_wait_quiet(p)
    p.add_argument("--baseline-only", action="store_true", help="skip the gateway (harness check)")
    p.add_argument("--profile", action="store_true", help="one extra profiled gateway run per cell")
    p.add_argument("--profiler", choices=["py-spy", "cprofile"], default=None)
    p.add_argument("--top", type=int, default=25, help="functions listed per profile")
    p.add_argument(
        "--output", type=Path, help="JSON results file (default bench/results/<ts>.json)"
    )
    args = p.parse_args(argv)
    args.sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    for s in args.sizes:
        if s not in SIZES:
            p.error(f"unknown size {s!r} (use {', '.join(SIZES)})")
    args.sessions = [int(s) for s in args.sessions.split(",") if s.strip()]
    quick_defaults(args)
    args.connection = args.connection or ("new" if args.quick else "both")
    if args.profile and args.profiler is None:
        args.profiler = "py-spy" if pyspy_path() else "cprofile"
    return args


def main(argv: list[str] | None = None) -> int:
    global GATEWAY_SRC, RUN_STAMP
    args = parse_args(argv)
    if args.gateway_src:
        GATEWAY_SRC = args.gateway_src.resolve()
        if not (GATEWAY_SRC / "gateway" / "cli").is_dir():
            print(f"bench: {GATEWAY_SRC} has no gateway/cli")
            return 2
    if not tools_found():
        return 2
    if postfix_master_running():
        print("bench: warning: a Postfix master daemon is running; stop it (postfix stop)")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    started = dt.datetime.now(dt.UTC)
    RUN_STAMP = f"{started:%Y%m%dT%H%M%SZ}"
    out = args.output or RESULTS_DIR / f"{RUN_STAMP}.json"
    cells = build_cells(args)
    code = code_version()
    with tempfile.TemporaryDirectory(prefix="mailward-bench-") as tmp:
        workdir = Path(tmp)
        sink = Sink(workdir)
        example = source_cmd(sink.port, SIZES["2KB"], 20, 10_000, False)
        sample_configs = {
            policy: gateway_toml(Path("<tmp>/state"), 0, sink.port, policy)
            for policy in POLICIES[args.policy]
        }
        sink.start()
        try:
            for cell in cells:
                print(f"... {cell.name}: {cell.count} messages x {args.repeat}", flush=True)
                if args.baseline_only:
                    for _ in range(args.repeat):
                        cell.baseline.append(
                            run_source(
                                sink,
                                sink.port,
                                cell.size,
                                cell.sessions,
                                cell.count,
                                cell.connection == "reuse",
                            )
                        )
                else:
                    run_cell(cell, sink, workdir, args.repeat, args.entry, args.wait_quiet)
            if args.profile and not args.baseline_only:
                for cell in cells:
                    if not cell.error:
                        print(f"... profiling {cell.name} with {args.profiler}", flush=True)
                        profile_cell(
                            cell,
                            sink,
                            workdir,
                            args.entry,
                            args.profiler,
                            args.top,
                            args.wait_quiet,
                        )
        finally:
            sink.stop()
    print()
    print_table(cells)
    print_legend(cells)
    goal_cells = [c for c in cells if c.size_label == "2KB" and c.sessions == 20 and not c.error]
    goal = goal_status(goal_cells, "gateway_msgs_per_sec", GOAL_MSGS_PER_SEC)
    goal_paired = goal_status(
        [c for c in goal_cells if c.paired], "paired_ratio", GOAL_POLICY_RATIO
    )
    if goal and not args.baseline_only:
        which = " (policy on)" if args.policy == "both" else ""
        print(
            f"\nGoal{which} (2KB, 20 sessions, audit written, >= {GOAL_MSGS_PER_SEC:.0f} msgs/s): "
            f"{goal}"
        )
    if goal_paired and not args.baseline_only:
        figures = ", ".join(
            f"{conn} {_fmt(g['paired_ratio'], '.3f')} ({'met' if g['met'] else 'not met'})"
            for conn, g in goal_paired.items()
        )
        print(
            f"Goal (shipped policy on/off, paired ratio, 2KB, 20 sessions, audit written, "
            f">= {GOAL_POLICY_RATIO}): {figures}"
        )
    for cell in cells:
        if cell.profile:
            print_profile(cell, min(args.top, 15))
    result = {
        **result_head(started, code),
        "commands": {
            "sink": [SMTP_SINK, "-c", "-u", SINK_USER, f"{HOST}:<port>", "1024"],
            "source_example": example,
            "gateway": [sys.executable, "<tmp>/launch_mailward.py", "--config", "<tmp>", "serve"],
            "gateway_entry": args.entry,
            "gateway_launcher": LAUNCHERS[args.entry],
        },
        "policy": args.policy,
        "gateway_config": sample_configs,  # by policy
        "repeat": args.repeat,
        "max_other_percent": MAX_OTHER_PERCENT,
        "wait_quiet": args.wait_quiet,
        "goal": goal,
        "goal_paired": goal_paired or None,
        "cells": [
            {
                "cell": c.name,
                "size": c.size,
                "sessions": c.sessions,
                "connection": c.connection,
                "count": c.count,
                "warmup": c.warmup,
                **c.summary(),
                "baseline_runs": [asdict(r) for r in c.baseline],
                "gateway_runs": {p: [asdict(r) for r in c.runs(p)] for p in c.policies},
                "audit": c.audit,  # by policy
                "gateway_stop": c.gateway_stop,  # by policy
                "error": c.error,
                "profile": c.profile,
            }
            for c in cells
        ],
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nresults: {out}")
    failed = any(c.error for c in cells) or any(not r.ok for c in cells for r in c.all_runs())
    if not args.baseline_only:
        failed = failed or any(not c.summary()["audit_ok"] for c in cells)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
