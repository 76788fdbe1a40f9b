"""Plumbing shared by the benchmarks (``run.py``, ``crypto.py``) and the soak test (``soak.py``).

What it does: the parts every harness here needs to run a real ``mailward serve`` between a load
and an upstream on loopback, written once:

* processes: :func:`free_port`, :func:`launch` (a gateway with its output in a log file and the
  measured sources first on PYTHONPATH), :func:`wait_for_smtp` (its 220 banner),
  :func:`start_gateway` (both, stopping a gateway that does not come up),
  :func:`stop_process` (SIGTERM, SIGKILL after a grace), :func:`tail` (the end of a log),
  :func:`pyspy_path` (the profiler, if installed);
* CPU accounting from ``/proc``: :func:`proc_stat`, :func:`descendants` (a process tree),
  :func:`cpu_seconds` (one process), :func:`tree_cpu` (a process and everything below it),
  :func:`system_busy_seconds` (the whole machine, hypervisor steal excluded), :func:`steal_seconds`
  (the steal itself), :func:`own_cpu_seconds` (this harness and its reaped children) and
  :func:`ours_cpu_seconds` (that plus whole process trees), from which the harnesses derive the
  CPU used by processes outside them;
* :func:`read_only`: a gateway's SQLite database, read while it may be writing;
* the gateway configuration: :func:`gateway_config` (SQLite state, one loopback listener
  without TLS and AUTH for 127.0.0.1, relay to a loopback upstream without TLS), every shipped
  rate-limit rule raised above any load (:func:`limits_overrides`) and, on request, every
  configurable check off (:data:`PIPELINE_OFF`).

Reads: ``/proc`` (process states and CPU times), the shipped ``policies/*.toml`` of the measured
source tree (rate-limit rule names), the gateways' SQLite databases (read-only).

Security notes: everything started here listens on 127.0.0.1 only, and the configurations let
127.0.0.1 relay without AUTH (loopback only); the harnesses stop every process they start. The
environment passed to a gateway is this process's, without ``MAILWARD_CONFIG``.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import tomllib
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"

#: ``[pipeline]`` with every configurable check off (the fixed AUTH gate still applies).
PIPELINE_OFF = """
[pipeline]
connect = []
auth = []
mail = []
rcpt = []
data = []
"""


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def gateway_env(src: Path) -> dict[str, str]:
    """This process's environment for a gateway: ``MAILWARD_CONFIG`` unset (the ``--config`` given
    is the one used), the gateway sources ``src`` first on PYTHONPATH."""
    env = dict(os.environ)
    env.pop("MAILWARD_CONFIG", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(src), env.get("PYTHONPATH")]))
    return env


def launch(
    cmd: list[str], log: Path, cwd: Path, src: Path, header: str = ""
) -> subprocess.Popen[bytes]:
    """Start ``cmd`` (a gateway from the sources in ``src``, see :func:`gateway_env`) in ``cwd``,
    its stdout and stderr appended to ``log`` after the line ``header`` (if any)."""
    with log.open("ab") as out:
        if header:
            out.write(header.encode())
            out.flush()
        return subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=gateway_env(src), cwd=cwd
        )


def start_gateway(
    cmd: list[str],
    *,
    port: int,
    log: Path,
    cwd: Path,
    src: Path,
    label: str = "gateway",
    header: str = "",
    timeout: float = 60.0,
) -> subprocess.Popen[bytes]:
    """:func:`launch` a gateway and wait for its banner on ``port``; if it exits or does not
    answer within ``timeout`` seconds, stop it and raise RuntimeError (``<label> did not start``,
    with the end of its log)."""
    proc = launch(cmd, log, cwd, src, header)
    try:
        wait_for_smtp(port, proc, timeout)
    except RuntimeError as exc:
        stop_process(proc)
        raise RuntimeError(f"{label} did not start: {exc}\n--- log:\n{tail(log)}") from None
    return proc


def wait_for_smtp(
    port: int,
    proc: subprocess.Popen[bytes],
    timeout: float,
    *,
    poll: float = 0.1,
    connect_timeout: float = 2.0,
) -> None:
    """Wait until ``port`` answers with a 220 banner (then QUIT); RuntimeError if ``proc`` exits
    first or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with code {proc.returncode} before listening")
        try:
            with socket.create_connection((HOST, port), timeout=connect_timeout) as s:
                banner = s.makefile("rb").readline()
                if banner.startswith(b"220"):
                    s.sendall(b"QUIT\r\n")
                    with contextlib.suppress(OSError):
                        s.recv(512)
                    return
                last = RuntimeError(f"unexpected banner {banner!r}")
        except OSError as exc:
            last = exc
        time.sleep(poll)
    raise RuntimeError(f"port {port} not ready after {timeout:.0f} s: {last}")


def stop_process(
    proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, grace: float = 30.0
) -> str:
    """Signal ``proc`` and wait; SIGKILL after ``grace`` seconds. Returns how it ended."""
    if proc.poll() is not None:
        return f"already exited ({proc.returncode})"
    proc.send_signal(sig)
    try:
        proc.wait(grace)
        return f"exited ({proc.returncode})"
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return f"KILLED after {grace:.0f} s"


def pyspy_path() -> str | None:
    """``py-spy``: the venv's (next to this Python), else the one on PATH, else None."""
    return shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")


def tail(path: Path, n: int = 2000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-n:].decode("utf-8", "replace")


# --------------------------------------------------------------------------- CPU accounting


def proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (field 3 onwards: state is [0],
    ppid [1], utime [11], stime [12], cutime [13], cstime [14], start time [19]), or None."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def descendants(root: int) -> set[tuple[int, str]]:
    """(pid, start time) of every live process below ``root`` (children, grandchildren, ...),
    from /proc; the start time tells a process from a later one with the same pid."""
    children: dict[int, list[tuple[int, str]]] = defaultdict(list)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = proc_stat(int(entry.name))
            if stat is not None:
                children[int(stat[1])].append((int(entry.name), stat[19]))
    found: set[tuple[int, str]] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child[0])
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) from /proc."""
    fields = proc_stat(pid)
    if fields is None:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu(root: int) -> tuple[float, float]:
    """CPU seconds of a process tree as (the root itself, everything below it).

    The root: its utime + stime (all threads). Below it: the root's cutime + cstime (children it
    has waited for: every finished gpg run) plus utime + stime + cutime + cstime of every live
    descendant (a gpg still running, spam-score workers). Each CPU second is counted once: a
    finished child's time moves into its parent's c-times when it is reaped. The live
    descendants are read first and the root last, so a child reaped in between can be counted
    twice (a few ms at most), never lost."""
    ticks = os.sysconf("SC_CLK_TCK")
    below = 0
    for pid, _ in descendants(root):
        fields = proc_stat(pid)
        if fields is not None:
            below += sum(int(v) for v in fields[11:15])  # utime stime cutime cstime
    fields = proc_stat(root)
    if fields is None:
        return float("nan"), float("nan")
    own = int(fields[11]) + int(fields[12])
    below += int(fields[13]) + int(fields[14])
    return own / ticks, below / ticks


def cpu_ticks() -> list[int] | None:
    """The machine's CPU time so far (all cores), from the ``cpu`` line of /proc/stat: user,
    nice, system, idle, iowait, irq, softirq, steal, in USER_HZ ticks (None if unreadable)."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    return values if len(values) == 8 else None


def system_busy_seconds() -> float:
    """CPU time the whole machine ran (all cores, all processes and the kernel), from /proc/stat:
    everything but idle, iowait and steal. Steal (time a virtual CPU wanted to run while the
    hypervisor ran something else) is no process's work here: :func:`steal_seconds` reads it."""
    values = cpu_ticks()
    if values is None:
        return float("nan")
    idle = values[3] + values[4] + values[7]  # idle + iowait + steal
    return (sum(values) - idle) / os.sysconf("SC_CLK_TCK")


def steal_seconds() -> float:
    """Hypervisor steal time of the whole machine (all cores) so far, from /proc/stat (the 8th
    value of the ``cpu`` line)."""
    values = cpu_ticks()
    return values[7] / os.sysconf("SC_CLK_TCK") if values is not None else float("nan")


def own_cpu_seconds(*pids: int) -> float:
    """CPU time of this process, its finished children (smtp-source) and the given processes."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (
        time.process_time()
        + usage.ru_utime
        + usage.ru_stime
        + sum(cpu_seconds(pid) for pid in pids if pid)
    )


def ours_cpu_seconds(*roots: int) -> float:
    """CPU time of everything that belongs to the benchmark: this process, its finished children
    (smtp-source) and the process trees ``roots`` (each process and everything below it, e.g. a
    gateway with its spam-score workers and gpg runs; 0 is skipped)."""
    total = own_cpu_seconds()
    for root in roots:
        if root:
            own, below = tree_cpu(root)
            total += own + below
    return total


@contextlib.contextmanager
def read_only(db: Path, timeout: float = 5.0) -> Iterator[sqlite3.Connection]:
    """The SQLite database ``db`` opened read-only (a gateway may be writing it; waits up to
    ``timeout`` seconds for its locks), closed afterwards."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=timeout)
    try:
        yield con
    finally:
        con.close()


# --------------------------------------------------------------------------- configuration


def limits_overrides(src: Path) -> str:
    """Raise every rate-limit rule shipped in ``src/policies`` far above any benchmark's load, so
    the ``rate-limit`` check still runs (and counts) but never refuses: the harnesses send
    thousands of messages per minute from one IP and sender domain, which the shipped tiers are
    meant to stop."""
    rules: dict[str, Any] = {}
    for path in sorted((src / "policies").glob("*.toml")):
        with contextlib.suppress(OSError, tomllib.TOMLDecodeError):
            rules.update(tomllib.loads(path.read_text()).get("limits", {}).get("rules", {}))
    if not rules:
        return ""
    lines = ["", "# Rate limits raised so that the check runs but never refuses the benchmark."]
    for name in sorted(rules):
        lines += [
            f'[limits.rules."{name}"]',
            'tiers = [{ limit = 1_000_000_000_000, period = "1m" }]',
        ]
    return "\n".join(lines) + "\n"


def gateway_config(
    *,
    title: str,
    src: Path,
    state_dir: Path,
    hostname: str,
    listener: str,
    port: int,
    upstream_port: int,
    relay: str,
    log_level: str,
    sections: str = "",
    pipeline: str = "",
) -> str:
    """A gateway configuration (TOML) for a harness: the state (SQLite database, spool) in
    ``state_dir``, one listener ``listener`` on 127.0.0.1:``port`` without TLS and without AUTH
    for 127.0.0.1, the relay to 127.0.0.1:``upstream_port`` without TLS plus the ``relay``
    lines, the ``sections`` (TOML text) and the log level; then :func:`limits_overrides` of
    ``src`` and ``pipeline`` (e.g. :data:`PIPELINE_OFF`)."""
    return f"""\
# {title}
state_dir = "{state_dir}"

[database]
auto_migrate = true          # SQLite at {{state_dir}}/mailward.db, synchronous = normal (default)

[smtp]
hostname = "{hostname}"
trusted_networks = ["127.0.0.1/32"]   # relaying without AUTH from loopback only
# Many connections from 127.0.0.1 at once (smtp-source opens a new one per message, and a closing
# one may still be counted when the next opens): the per-IP limit (default 20) is raised.
max_connections_per_ip = 200

[[smtp.listeners]]
name = "{listener}"
address = "{HOST}"
port = {port}
tls = "none"

[relay]
host = "{HOST}"
port = {upstream_port}
tls = "none"
{relay}
{sections}[log]
level = "{log_level}"
{limits_overrides(src)}{pipeline}"""
