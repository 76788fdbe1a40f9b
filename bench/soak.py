"""Custody soak test: many messages, ``kill -9`` of the gateway at random moments, reconciliation.

What it does: runs the real ``mailward --config FILE serve`` as a subprocess between real SMTP
clients and a real capture upstream, and checks the custody rule end to end:

1. starts :class:`gateway.smtp.capture.CaptureUpstream` in a thread of this process (it survives
   every gateway kill; each message it accepts is also written to ``<work>/outbox/*.eml``) and a
   "chaos" thread that keeps switching the upstream between healthy and misbehaving phases
   (:data:`PHASES`): 4xx at MAIL, RCPT or end of data, dropped connections after the data, slow
   end of data, and outages (stop listening and abort every open connection). The first phase
   and the last tenth of the run are outages, so the queue is always used and the drain has work;
2. writes a gateway config (SQLite in ``<work>/state``, a loopback listener with ``tls = "none"``
   and ``trusted_networks = ["127.0.0.1/32"]`` so no AUTH, ``[queue] on_upstream_tempfail =
   "queue"`` with second-scale retries and the shortest allowed claim lease) and starts the
   gateway;
3. client threads (smtplib) send ``--messages`` messages, each with a unique Message-ID and one
   to three recipients. A client that gets a 4xx, or loses the connection without a reply, sends
   the message again later to the recipients still not accepted, with the same Message-ID (what a
   real MUA or MTA does, and what makes the legitimate duplicates of the crash window). Every
   attempt uses a fresh EHLO name, which the gateway's ``Received:`` header carries upstream, so
   every copy the upstream receives is traced back to the client attempt it came from;
4. a killer thread sends ``SIGKILL`` to the gateway ``--kills`` times, each when a random number
   of messages is done plus a random delay, and restarts it on the same state directory and
   port; ``--drain-kills`` more kills land while the queue drains;
5. when the clients are done, the upstream turns healthy, the queue drains (polled in the
   database until no recipient is pending), the gateway gets SIGTERM (its stacks are dumped with
   py-spy if it does not stop) and every process it started must be gone;
6. reconciles, per (Message-ID, recipient): client ``250`` s, copies received upstream and the
   queue's rows; prints a summary and exits non-zero on a custody failure.

Figures (per Message-ID and recipient):

* ``lost``: the client got ``250``, the upstream never received it, and the queue does not hold
  it as pending, bounced or dropped (a ``corrupt`` copy counts as lost: it will never be sent).
  Must be 0.
* ``duplicates``: received more than once; split into *client resends* (copies from two client
  attempts: the first one's outcome was unknown to the client, e.g. the gateway died between the
  upstream's 250 and its own) and *redeliveries* (one client attempt delivered twice: the queue
  runner or the relay sent it again after a crash or a lost reply). Allowed, reported; a
  redelivery with no kill between its two copies is counted apart (it points to a bug).
* ``delivered after a refusal``: a copy that came from a client attempt the gateway answered with
  a 4xx or 5xx. The client keeps (or dropped) such a message, so the gateway must not deliver it
  too. Must be 0.
* ``received without a 250``: the client never got a 250 (it gave up), yet the upstream has it.
* ``stuck``: still pending in the queue when the drain's liveness bound ran out; ``unfinished``:
  a client gave up retrying before its bound. Both must be 0.
* queue leftovers: copies by state (``corrupt`` or ``held`` ones are listed); spool files left
  after the drain; audit records left ``relaying`` by kills.

Usage (from the repository root)::

    .venv/bin/python bench/soak.py --messages 1000 --kills 10
    .venv/bin/python bench/soak.py --messages 80 --kills 3 --json /tmp/soak.json   # quick

Exit codes: 0 custody kept and the gateway stopped cleanly; 1 a custody failure (lost, delivered
after a refusal, stuck, unfinished) or a gateway that ignored SIGTERM or left processes behind;
2 the harness or the gateway failed (e.g. did not restart), the log tail is printed.

Reads/writes: a temporary work directory (config, SQLite database, spool, gateway log,
``events.log`` with the upstream phases, kills and restarts, the upstream's outbox), kept when
the run fails or with ``--keep``; ``--json`` writes the figures; reads ``/proc`` (the gateway's
child processes). Timing is never asserted: only generous liveness bounds (``--drain-timeout``,
``--drain-stall``, ``--client-timeout``, ``--start-timeout``, ``--stop-grace``).

Security notes: everything listens on 127.0.0.1 only; the gateway relays without AUTH for
127.0.0.1 only. Every process started here is stopped here, also on failure (the gateway runs in
this process's process group, so a signal to the group also reaches it; its descendants are
tracked and killed if they outlive it); threads are daemons. Message bodies are generated text.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import random
import re
import shutil
import signal
import smtplib
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from email.parser import BytesHeaderParser
from email.utils import format_datetime
from pathlib import Path
from types import FrameType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from common import (  # noqa: E402  (bench/common.py: processes, configuration)
    HOST,
    PIPELINE_OFF,
    descendants,
    free_port,
    gateway_config,
    launch,
    proc_stat,
    pyspy_path,
    read_only,
    tail,
    wait_for_smtp,
)

from gateway.smtp.capture import CaptureThread, CaptureUpstream, drop, reply, stall  # noqa: E402

SENDER_DOMAIN = "soak.example"
RECIPIENT_DOMAIN = "dest.example"
GATEWAY_NAME = "soak.mailward.test"
EXIT_OK, EXIT_CUSTODY, EXIT_HARNESS = 0, 1, 2

# The "id <txn>" and "from <helo>" of the gateway's Received: header (gateway/service.py).
RECEIVED_RE = re.compile(
    rb"^Received: from (?P<helo>\S+) \(\[[^\]]*\]\)\r?\n"
    rb"\s+by \S+ \(Mailward\) with \S+ id (?P<txn>\S+?)[;\s]",
    re.MULTILINE,
)
TXN_RE = re.compile(r"\(transaction (\S+)\)")
WORDS = (
    "custody", "queue", "relay", "spool", "retry", "lease", "upstream", "bounce", "message",
    "recipient", "sender", "gateway", "durable", "commit", "fsync", "restart", "drain", "ledger",
)  # fmt: skip


#: the upstream's phases and their weights (``--skip-phase`` leaves some out; the first and the
#: last phase of a run are always an outage)
PHASES: tuple[tuple[str, float], ...] = (
    ("healthy", 0.55),  # no fault
    ("eom-451", 0.10),  # 451 after the data
    ("mail-451", 0.05),  # 451 at MAIL FROM
    ("rcpt-450", 0.05),  # 450 at every RCPT TO
    ("eom-drop", 0.07),  # connection dropped after the data, no reply
    ("eom-slow", 0.08),  # 0.5-2 s before the reply to the data
    ("outage", 0.10),  # not listening; open connections aborted
)


class HarnessError(Exception):
    """The harness or the gateway failed in a way that is not a custody result (exit 2)."""


# --------------------------------------------------------------------------- records


@dataclass
class Attempt:
    """One client transaction: its EHLO name (unique per attempt), the recipients tried and, per
    recipient, what the client was told: ``250``, ``4xx``, ``5xx``, ``unknown`` (the connection
    was lost before the reply) or ``no-connection`` (the connect failed: nothing was sent)."""

    helo: str
    msgid: str
    outcome: dict[str, str]
    reply: str = ""
    txn: str | None = None


@dataclass
class Message:
    index: int
    msgid: str
    sender: str
    recipients: tuple[str, ...]
    body: bytes
    pending: set[str] = field(default_factory=set)
    accepted: dict[str, str] = field(default_factory=dict)  # rcpt -> helo of the 250 attempt
    rejected: dict[str, str] = field(default_factory=dict)  # rcpt -> 5xx reply
    attempts: int = 0


@dataclass
class Copy:
    """One message the upstream received (a copy of an attempt, for some recipients)."""

    msgid: str | None
    recipients: tuple[str, ...]
    helo: str | None
    txn: str | None
    #: when the upstream stored it (seconds since the epoch, from the outbox file name)
    at: float | None = None


@dataclass
class Figures:
    messages: int = 0
    pairs: int = 0
    attempts: int = 0
    attempt_outcomes: dict[str, int] = field(default_factory=dict)
    kills: int = 0
    drain_kills: int = 0
    restarts: int = 0
    upstream_copies: int = 0
    upstream_unknown: int = 0
    chaos_phases: dict[str, int] = field(default_factory=dict)
    accepted_pairs: int = 0
    rejected_pairs: int = 0
    unfinished_pairs: int = 0
    delivered_pairs: int = 0
    lost: int = 0
    lost_examples: list[str] = field(default_factory=list)
    duplicate_pairs: int = 0
    duplicate_extra_copies: int = 0
    duplicates_client_resend: int = 0
    duplicates_redelivery: int = 0
    duplicate_examples: list[str] = field(default_factory=list)
    redeliveries_without_kill: int = 0
    redelivery_examples: list[str] = field(default_factory=list)
    delivered_after_refusal: int = 0
    refusal_examples: list[str] = field(default_factory=list)
    received_without_250: int = 0
    stuck: int = 0
    bounced_or_dropped: int = 0
    queue_messages: int = 0
    queue_copies: dict[str, int] = field(default_factory=dict)
    queue_recipients: dict[str, int] = field(default_factory=dict)
    queue_leftovers: list[str] = field(default_factory=list)
    audit: dict[str, int] = field(default_factory=dict)
    #: files left in the spool (none is needed once the queue is drained: orphans of a kill
    #: between the spool write and the commit, or between the last attempt and the file's
    #: removal; the runner deletes them after its orphan grace), in tmp/ and in corrupt/
    spool_files: dict[str, int] = field(default_factory=dict)
    drain_seconds: float = 0.0
    run_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    #: None when the final SIGTERM stopped the gateway within --stop-grace
    shutdown_problem: str | None = None
    #: descendants of the gateway (e.g. spam-scan workers) still running after it ended
    orphans: list[str] = field(default_factory=list)

    @property
    def custody_failed(self) -> bool:
        return bool(
            self.lost or self.delivered_after_refusal or self.stuck or self.unfinished_pairs
        )

    @property
    def failed(self) -> bool:
        """A custody failure, or a gateway that did not stop on SIGTERM or left processes."""
        return self.custody_failed or bool(self.shutdown_problem or self.orphans)


# --------------------------------------------------------------------------- small helpers


def still_running(proc: tuple[int, str]) -> bool:
    stat = proc_stat(proc[0])
    return stat is not None and stat[19] == proc[1] and stat[0] != "Z"


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:160]
    except OSError:
        return "?"


def gateway_toml(state_dir: Path, port: int, upstream_port: int, policy: str) -> str:
    return gateway_config(
        title="Mailward soak-test configuration (written by bench/soak.py)",
        src=REPO,
        state_dir=state_dir,
        hostname=GATEWAY_NAME,
        listener="soak",
        port=port,
        upstream_port=upstream_port,
        relay="""\
connect_timeout = 5.0
command_timeout = 15.0
data_timeout = 20.0
pool_size = 16
pool_idle_seconds = 5.0
""",
        sections="""\
[queue]
on_upstream_tempfail = "queue"
retry_first = "1s"
retry_max = "3s"
runner_interval = "1s"
claim_lease = "1m"   # the shortest allowed (a restarted gateway also frees its own claims)
warn_after = "0"
min_free_space = "16M"

""",
        log_level="info",
        pipeline=PIPELINE_OFF if policy == "off" else "",
    )


def make_body(rng: random.Random, msgid: str, sender: str, recipients: tuple[str, ...]) -> bytes:
    lines = [
        f"From: Soak Sender <{sender}>",
        "To: " + ", ".join(f"<{r}>" for r in recipients),
        f"Subject: soak {msgid[1:13]}",
        f"Date: {format_datetime(datetime.now(UTC))}",
        f"Message-ID: {msgid}",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=us-ascii",
        "",
    ]
    for _ in range(rng.randint(3, 120)):
        lines.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))))
    return ("\r\n".join(lines) + "\r\n").encode("ascii")


# --------------------------------------------------------------------------- gateway process


class GatewayProcess:
    """``mailward --config FILE serve`` as a subprocess, killed and restarted on the same state
    directory and port. It stays in this process group so a signal to the group stops it too."""

    def __init__(self, config: Path, port: int, log: Path, workdir: Path) -> None:
        self.config = config
        self.port = port
        self.log = log
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        #: (pid, start time) of every descendant seen: all must be gone at the end
        self.children: set[tuple[int, str]] = set()
        script = Path(sys.executable).parent / "mailward"
        entry = [str(script)] if script.exists() else [
            sys.executable, "-c", "import sys; from gateway.cli import main; sys.exit(main())",
        ]  # fmt: skip
        self.cmd = [*entry, "--config", str(config), "serve"]

    def start(self, timeout: float) -> None:
        self.starts += 1
        header = f"\n===== soak: gateway start #{self.starts} =====\n"
        self.proc = launch(self.cmd, self.log, self.workdir, REPO, header)
        try:
            wait_for_smtp(self.port, self.proc, timeout, poll=0.05, connect_timeout=5)
        except RuntimeError as exc:
            raise HarnessError(f"gateway start #{self.starts} failed: {exc}") from None

    def remember_children(self) -> None:
        """Note the gateway's descendants (spam-scan workers...): they must end with it."""
        if self.proc is not None and self.proc.poll() is None:
            self.children |= descendants(self.proc.pid)

    def kill9(self) -> None:
        """SIGKILL (``kill -9``) and reap."""
        if self.proc is not None and self.proc.poll() is None:
            self.remember_children()
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            with self.log.open("ab") as log:
                log.write(b"\n===== soak: gateway killed with SIGKILL =====\n")

    def terminate(self, grace: float) -> str | None:
        """SIGTERM (graceful), SIGKILL after ``grace`` seconds. None when it stopped by itself,
        else what happened (a hang: its threads' stacks are dumped with py-spy when available,
        to ``<work>/shutdown-hang.txt``)."""
        if self.proc is None or self.proc.poll() is not None:
            return None
        self.remember_children()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(grace)
            return None
        except subprocess.TimeoutExpired:
            pass
        dumped = ""
        spy = pyspy_path()
        if spy:
            out = self.workdir / "shutdown-hang.txt"
            with out.open("wb") as fh, contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run(
                    [spy, "dump", "--pid", str(self.proc.pid)], stdout=fh, stderr=fh, timeout=60
                )
            dumped = f"; stacks in {out}"
        self.proc.kill()
        self.proc.wait()
        return f"did not stop within {grace:.0f} s of SIGTERM: killed{dumped}"

    def leftover_children(self, wait: float) -> list[str]:
        """Descendants of any of the gateway's lives still running after ``wait`` seconds
        (orphans: killed now). Each as "pid cmdline"."""
        deadline = time.monotonic() + wait
        alive = set(self.children)
        while alive and time.monotonic() < deadline:
            alive = {c for c in alive if still_running(c)}
            if alive:
                time.sleep(0.2)
        found = []
        for pid, start in sorted(alive):
            found.append(f"{pid} {cmdline(pid)}")
            with contextlib.suppress(OSError):
                if still_running((pid, start)):
                    os.kill(pid, signal.SIGKILL)
        return found


# --------------------------------------------------------------------------- the soak


class Soak:
    """One soak run: the upstream, the gateway, the threads (clients, killer, chaos), the drain
    and the reconciliation; :meth:`run` returns the figures, :meth:`close` stops everything."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.rng = random.Random(args.seed)
        self.stop_all = threading.Event()
        self.lock = threading.Lock()
        self.attempt_count = 0
        self.done_count = 0  # messages with no recipient left to send
        self.attempts: dict[tuple[str, str], Attempt] = {}
        self.messages: list[Message] = []
        self.figures = Figures(messages=args.messages)
        self.chaos_counts: Counter[str] = Counter()
        self.errors: list[str] = []
        self.upstream: CaptureThread | None = None
        self.gateway: GatewayProcess | None = None
        self.state = workdir / "state"
        self.db = self.state / "mailward.db"
        self.restart_lock = threading.Lock()
        self.clients_done = threading.Event()
        self.notes_lock = threading.Lock()
        self.kill_times: list[float] = []

    # -- setup ---------------------------------------------------------------------------------
    def build_messages(self) -> None:
        run = f"{self.rng.getrandbits(32):08x}"
        for i in range(self.args.messages):
            n = self.rng.choice((1, 1, 1, 2, 3))
            rcpts = tuple(f"r{i}-{k}@{RECIPIENT_DOMAIN}" for k in range(n))
            sender = f"s{i % 7}@{SENDER_DOMAIN}"
            msgid = f"<soak-{run}-{i:05d}@{SENDER_DOMAIN}>"
            body = make_body(self.rng, msgid, sender, rcpts)
            self.messages.append(Message(i, msgid, sender, rcpts, body, pending=set(rcpts)))
        self.figures.pairs = sum(len(m.recipients) for m in self.messages)

    def start_upstream(self) -> None:
        up = CaptureUpstream(outbox_dir=self.workdir / "outbox", session_timeout=60.0)
        self.upstream = up.run_in_thread()

    def start_gateway(self) -> None:
        assert self.upstream is not None
        self.state.mkdir(parents=True, exist_ok=True)
        port = self.args.port or free_port()
        config = self.workdir / "mailward.toml"
        config.write_text(gateway_toml(self.state, port, self.upstream.port, self.args.policy))
        self.gateway = GatewayProcess(config, port, self.workdir / "gateway.log", self.workdir)
        self.gateway.start(self.args.start_timeout)

    def note(self, text: str) -> None:
        """One timestamped line in ``<work>/events.log`` (upstream phases, kills, restarts), in
        the gateway log's time format, to read the two side by side."""
        stamp = datetime.now().strftime("%Y-%m-%d %H:%M:%S,%f")[:-3]
        with self.notes_lock, (self.workdir / "events.log").open("a") as fh:
            fh.write(f"{stamp} {text}\n")

    def kill_and_restart(self, label: str) -> None:
        assert self.gateway is not None
        with self.restart_lock:
            self.note(f"kill -9 ({label})")
            self.kill_times.append(time.time())
            self.gateway.kill9()
            if label == "drain":
                self.figures.drain_kills += 1
            else:
                self.figures.kills += 1
            self.gateway.start(self.args.start_timeout)
            self.figures.restarts += 1
            self.note("gateway restarted")

    # -- threads -------------------------------------------------------------------------------
    def guarded(self, fn: Callable[..., None]) -> Callable[..., None]:
        """A thread body whose unexpected exception ends the run as a harness failure."""

        def run(*args: Any) -> None:
            try:
                fn(*args)
            except Exception as exc:
                self.errors.append(f"{threading.current_thread().name}: {exc!r}")
                self.stop_all.set()

        return run

    def chaos(self) -> None:
        """Switch the upstream between healthy and misbehaving phases until told to stop."""
        assert self.upstream is not None
        handle, up = self.upstream, self.upstream.upstream
        skip = set(self.args.skip_phase or ())
        names, weights = zip(*((n, w) for n, w in PHASES if n not in skip), strict=True)
        rng = random.Random(self.rng.getrandbits(32))
        listening = True
        first = True
        final = False
        while not self.stop_all.is_set():
            # the first phase is an outage, so that every run uses the queue from the start; so
            # is the last (the last tenth of the messages), so that the drain starts with a queue
            # to deliver and its kills land while the runner works
            with self.lock:
                final = self.done_count >= self.args.messages * 0.9
            name = "outage" if first or final else rng.choices(names, weights)[0]
            first = False
            self.chaos_counts[name] += 1
            self.note(f"upstream phase {name}")
            up.clear_faults()
            if not listening:
                handle.resume()
                listening = True
            if name == "eom-451":
                up.inject("EOM", reply("451 4.3.0 Soak: try again later", times=None))
            elif name == "mail-451":
                up.inject("MAIL", reply("451 4.3.2 Soak: not now", times=None))
            elif name == "rcpt-450":
                up.inject("RCPT", reply("450 4.2.1 Soak: mailbox busy", times=None))
            elif name == "eom-drop":
                up.inject("EOM", drop(times=None))
            elif name == "eom-slow":
                up.inject("EOM", stall(rng.uniform(0.5, 2.0), times=None))
            elif name == "outage":
                handle.refuse()
                handle.drop_connections()
                listening = False
            if final:
                self.stop_all.wait()
            else:
                self.stop_all.wait(
                    rng.uniform(0.2, 1.5) if name != "healthy" else rng.uniform(0.5, 3)
                )
        up.clear_faults()
        if not listening:
            handle.resume()

    def killer(self, points: list[int]) -> None:
        rng = random.Random(self.rng.getrandbits(32))
        for point in points:
            while not self.stop_all.is_set():
                with self.lock:
                    if self.done_count >= point or self.clients_done.is_set():
                        break
                time.sleep(0.01)
            if self.stop_all.is_set():
                return
            time.sleep(rng.uniform(0.0, self.args.kill_delay))
            try:
                self.kill_and_restart("drain" if self.clients_done.is_set() else "send")
            except HarnessError as exc:
                self.errors.append(str(exc))
                self.stop_all.set()
                return

    def client(self, worker: int, work: list[Message]) -> None:
        rng = random.Random(self.rng.getrandbits(32))
        conn: smtplib.SMTP | None = None
        conn_no = 0
        uses = 0
        deadline = time.monotonic() + self.args.client_timeout
        while not self.stop_all.is_set():
            with self.lock:
                if not work:
                    break
                msg = work.pop()
            while msg.pending and not self.stop_all.is_set() and time.monotonic() < deadline:
                if conn is None:
                    conn_no += 1
                    uses = 0
                helo = f"soak-w{worker}-c{conn_no}"
                conn, ok = self.attempt(conn, helo, msg)
                uses += 1
                if not ok or uses >= 10 or rng.random() < 0.3:
                    close(conn)
                    conn = None
                if msg.pending and not ok:
                    time.sleep(rng.uniform(0.05, 0.4))
            with self.lock:
                self.done_count += 1
        close(conn)

    def attempt(
        self, conn: smtplib.SMTP | None, helo: str, msg: Message
    ) -> tuple[smtplib.SMTP | None, bool]:
        """One transaction for ``msg``'s pending recipients; (connection to keep, all accepted)."""
        assert self.gateway is not None
        rcpts = sorted(msg.pending)
        att = Attempt(helo, msg.msgid, {r: "unknown" for r in rcpts})
        with self.lock:
            self.attempt_count += 1
            msg.attempts += 1
            self.attempts[(helo, msg.msgid)] = att
        try:
            if conn is None:
                try:
                    conn = smtplib.SMTP(HOST, self.gateway.port, local_hostname=helo, timeout=60)
                except OSError as exc:  # e.g. refused while the gateway restarts: nothing sent
                    with self.lock:
                        att.outcome = dict.fromkeys(rcpts, "no-connection")
                        att.reply = f"connect: {exc!r}"[:200]
                    return None, False
                code, resp = conn.ehlo(helo)
                if code != 250:
                    raise smtplib.SMTPHeloError(code, resp)
            code, resp = conn.mail(msg.sender)
            if code != 250:
                self.refused(att, msg, rcpts, code, resp)
                conn.rset()
                return conn, False
            accepted = []
            for r in rcpts:
                code, resp = conn.rcpt(r)
                if code in (250, 251):
                    accepted.append(r)
                else:
                    self.refused(att, msg, [r], code, resp)
            if not accepted:
                conn.rset()
                return conn, False
            try:
                code, resp = conn.data(msg.body)
            except smtplib.SMTPDataError as exc:  # no 354
                self.refused(att, msg, accepted, exc.smtp_code, exc.smtp_error)
                return conn, False
            if code == 250:
                text = resp.decode("utf-8", "replace")
                found = TXN_RE.search(text)
                with self.lock:
                    att.reply, att.txn = f"{code} {text}", found.group(1) if found else None
                    for r in accepted:
                        att.outcome[r] = "250"
                        msg.accepted[r] = helo
                        msg.pending.discard(r)
                return conn, len(accepted) == len(rcpts)
            self.refused(att, msg, accepted, code, resp)
            return conn, False
        except (smtplib.SMTPServerDisconnected, OSError) as exc:
            # no (complete) reply: the outcome of what is still "unknown" is unknown to the client
            att.reply = f"connection lost: {exc!r}"[:200]
            return conn, False
        except smtplib.SMTPResponseException as exc:  # EHLO refused etc.: nothing was sent
            self.refused(att, msg, rcpts, exc.smtp_code, exc.smtp_error)
            return conn, False

    def refused(
        self, att: Attempt, msg: Message, rcpts: list[str], code: int, resp: bytes | str
    ) -> None:
        text = resp.decode("utf-8", "replace") if isinstance(resp, bytes) else str(resp)
        with self.lock:
            att.reply = f"{code} {text}"[:300]
            for r in rcpts:
                if 500 <= code < 600:
                    att.outcome[r] = "5xx"
                    msg.rejected[r] = att.reply
                    msg.pending.discard(r)
                else:
                    att.outcome[r] = "4xx"

    # -- drain ---------------------------------------------------------------------------------
    def pending_in_queue(self) -> int | None:
        """Recipients still pending in queued copies (None: the database cannot be read yet)."""
        try:
            with read_only(self.db, timeout=10) as con:
                row = con.execute(
                    "SELECT count(*) FROM queue_recipient r JOIN queue_copy c ON r.copy_id = c.id "
                    "WHERE c.state = 'queued' AND r.state = 'pending'"
                ).fetchone()
        except sqlite3.Error:
            return None
        return int(row[0])

    def drain(self) -> None:
        """Wait until no recipient is pending in the queue (``--drain-kills`` kills land while
        some are). Liveness bounds: ``--drain-timeout`` in all, and ``--drain-stall`` without
        any progress (longer than a claim lease plus the retry schedule)."""
        start = time.monotonic()
        rng = random.Random(self.rng.getrandbits(32))
        kills_left = self.args.drain_kills
        deadline = start + self.args.drain_timeout
        quiet_since: float | None = None
        fewest: int | None = None
        progress = start
        while time.monotonic() < deadline and time.monotonic() - progress < self.args.drain_stall:
            pending = self.pending_in_queue()
            if pending is not None and (fewest is None or pending < fewest):
                fewest, progress = pending, time.monotonic()
            if pending and kills_left:
                # while the runner retries (retry_max is 3 s): a kill mid-delivery
                time.sleep(rng.uniform(0.3, 3.0))
                kills_left -= 1
                self.kill_and_restart("drain")
                progress = time.monotonic()
                continue
            if pending == 0:
                # twice, a runner interval apart: a restart may still be recovering
                if quiet_since is not None and time.monotonic() - quiet_since > 2.0:
                    break
                quiet_since = quiet_since or time.monotonic()
            else:
                quiet_since = None
            time.sleep(0.5)
        if kills_left:
            self.figures.notes.append(f"{kills_left} drain kill(s) skipped: the queue was empty")
        self.figures.drain_seconds = round(time.monotonic() - start, 1)

    # -- run -----------------------------------------------------------------------------------
    def run(self) -> Figures:
        t0 = time.monotonic()
        self.build_messages()
        self.start_upstream()
        self.start_gateway()
        chaos = threading.Thread(target=self.guarded(self.chaos), name="soak-chaos", daemon=True)
        chaos.start()
        total_points = max(1, self.args.messages)
        points = sorted(
            self.rng.sample(range(1, total_points + 1), min(self.args.kills, total_points))
        )
        killer = threading.Thread(
            target=self.guarded(self.killer), args=(points,), name="soak-killer", daemon=True
        )
        killer.start()
        work = list(reversed(self.messages))
        clients = [
            threading.Thread(
                target=self.guarded(self.client),
                args=(w, work),
                name=f"soak-client-{w}",
                daemon=True,
            )
            for w in range(self.args.clients)
        ]
        for t in clients:
            t.start()
        for t in clients:
            t.join()
        self.clients_done.set()
        killer.join()
        self.stop_all.set()
        chaos.join(30)
        if self.errors:
            raise HarnessError("; ".join(self.errors))
        self.stop_all.clear()
        self.drain()
        assert self.gateway is not None
        self.figures.shutdown_problem = self.gateway.terminate(self.args.stop_grace)
        self.figures.orphans = self.gateway.leftover_children(15.0)
        self.figures.run_seconds = round(time.monotonic() - t0, 1)
        assert self.upstream is not None
        self.upstream.stop()
        self.reconcile()
        return self.figures

    def close(self) -> None:
        """Stop whatever is still running (also after a failure): no process outlives the run."""
        self.stop_all.set()
        if self.gateway is not None and self.gateway.proc is not None:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                if self.gateway.proc.poll() is None:
                    self.gateway.remember_children()
                    self.gateway.proc.kill()
                self.gateway.proc.wait(10)
            self.gateway.leftover_children(5.0)
        if self.upstream is not None:
            with contextlib.suppress(Exception):
                self.upstream.stop()

    # -- reconciliation ------------------------------------------------------------------------
    def received_copies(self) -> list[Copy]:
        assert self.upstream is not None
        parser = BytesHeaderParser()
        copies = []
        for rec in self.upstream.upstream.messages:
            headers = parser.parsebytes(rec.data, headersonly=True)
            msgid = headers.get("Message-ID")
            found = RECEIVED_RE.search(rec.data.split(b"\r\n\r\n", 1)[0])
            copies.append(
                Copy(
                    msgid=str(msgid).strip() if msgid else None,
                    recipients=tuple(rec.rcpt_tos),
                    helo=found.group("helo").decode() if found else None,
                    txn=found.group("txn").decode() if found else None,
                    at=stored_at(rec.path),
                )
            )
        return copies

    def queue_rows(self) -> list[tuple[str | None, str, str, str, str, str]]:
        """(Message-ID header, transaction id, copy state, recipient address, recipient state,
        description) of every recipient row; the description names the queue message, copy,
        transaction, attempts and last reply (for the examples)."""
        try:
            with read_only(self.db, timeout=30) as con:
                rows = con.execute(
                    "SELECT m.message_id_header, c.state, r.address, r.state, m.id, c.id, "
                    "m.txn_id, c.attempts, r.last_reply "
                    "FROM queue_message m JOIN queue_copy c ON c.message_id = m.id "
                    "JOIN queue_recipient r ON r.copy_id = c.id"
                ).fetchall()
                self.figures.queue_messages = int(
                    con.execute("SELECT count(*) FROM queue_message").fetchone()[0]
                )
                self.figures.audit = {
                    f"{k}/{o}": n
                    for k, o, n in con.execute(
                        "SELECT kind, coalesce(outcome, ''), count(*) FROM audit_record "
                        "GROUP BY 1, 2 ORDER BY 1, 2"
                    )
                }
        except sqlite3.Error as exc:
            self.figures.notes.append(f"queue tables not readable: {exc}")
            return []
        return [
            (m, txn, c, a, s, f"queue {qm}/{qc} txn {txn} {c}/{s} after {n} attempt(s): {last}")
            for m, c, a, s, qm, qc, txn, n, last in rows
        ]

    def reconcile(self) -> None:
        f = self.figures
        f.attempts = len(self.attempts)
        f.attempt_outcomes = dict(
            Counter(o for a in self.attempts.values() for o in a.outcome.values())
        )
        f.chaos_phases = dict(self.chaos_counts)
        copies = self.received_copies()
        f.upstream_copies = len(copies)
        known = {m.msgid: m for m in self.messages}
        received: dict[tuple[str, str], list[Copy]] = defaultdict(list)
        for c in copies:
            if c.msgid not in known:
                f.upstream_unknown += 1
                continue
            for r in c.recipients:
                received[(c.msgid, r.lower())].append(c)
        queue: dict[tuple[str, str], set[str]] = defaultdict(set)
        rcpt_states: Counter[str] = Counter()
        described: dict[tuple[str, str], list[str]] = defaultdict(list)
        by_txn: dict[tuple[str, str], set[str]] = defaultdict(set)
        for mid, txn, cstate, addr, rstate, text in self.queue_rows():
            rcpt_states[rstate] += 1
            queue[(str(mid).strip(), addr.lower())].add(f"{cstate}/{rstate}")
            by_txn[(txn, addr.lower())].add(f"{cstate}/{rstate}")
            described[(str(mid).strip(), addr.lower())].append(text)
            if cstate in ("corrupt", "held"):
                f.queue_leftovers.append(f"{mid} {addr}: copy {cstate}, recipient {rstate}")
        f.queue_recipients = dict(rcpt_states)
        spool = self.state / "spool"
        f.spool_files = {
            where: sum(1 for x in (spool / sub).glob("*") if x.is_file()) if spool.is_dir() else 0
            for where, sub in (("spool", "."), ("tmp", "tmp"), ("corrupt", "corrupt"))
        }
        f.queue_copies = self.copy_state_counts()
        for m in self.messages:
            for r in m.recipients:
                key = (m.msgid, r.lower())
                got = received.get(key, [])
                states = queue.get(key, set())
                if r in m.accepted:
                    f.accepted_pairs += 1
                elif r in m.rejected:
                    f.rejected_pairs += 1
                else:
                    f.unfinished_pairs += 1
                if got:
                    f.delivered_pairs += 1
                if len(got) > 1:
                    f.duplicate_pairs += 1
                    f.duplicate_extra_copies += len(got) - 1
                    sources = Counter((c.helo, c.txn) for c in got)
                    helos = {c.helo for c in got}
                    f.duplicates_client_resend += len(helos) - 1
                    f.duplicates_redelivery += sum(n - 1 for n in sources.values())
                    self.check_redeliveries(m.msgid, r, got, described.get(key))
                    if len(f.duplicate_examples) < 10:
                        traced = [
                            f"{c.helo}/{c.txn}: " + self.told(c.helo, m.msgid, r) for c in got
                        ]
                        f.duplicate_examples.append(
                            f"{m.msgid} {r}: {'; '.join(traced)}; {described.get(key) or 'not queued'}"
                        )
                for c in got:
                    att = self.attempts.get((c.helo or "", m.msgid))
                    told = att.outcome.get(r) if att is not None else None
                    if told in ("4xx", "5xx"):
                        f.delivered_after_refusal += 1
                        if len(f.refusal_examples) < 10:
                            f.refusal_examples.append(
                                f"{m.msgid} {r}: attempt {c.helo} was answered {att.reply!r}"
                                if att
                                else ""
                            )
                if got and r not in m.accepted:
                    f.received_without_250 += 1
                if any(s.endswith("/pending") and s.startswith("queued") for s in states):
                    f.stuck += 1
                if not got and r in m.accepted:
                    # what the queue did with the transaction that got the 250 (a bounced or
                    # dropped row of another attempt, e.g. one the client was told to retry,
                    # does not account for this one)
                    took = self.attempts.get((m.accepted[r], m.msgid))
                    if took is not None and took.txn is not None:
                        states = by_txn.get((took.txn, r.lower()), set())
                    if any(s.endswith(("/bounced", "/dropped")) for s in states):
                        f.bounced_or_dropped += 1
                    elif any(s.endswith("/pending") for s in states):
                        pass  # counted as stuck (or held) above
                    else:
                        f.lost += 1
                        if len(f.lost_examples) < 10:
                            f.lost_examples.append(
                                f"{m.msgid} {r}: 250 to attempt {m.accepted[r]}; "
                                f"queue: {sorted(states) or 'no row'}"
                            )

    def check_redeliveries(
        self, msgid: str, rcpt: str, got: list[Copy], queue: list[str] | None
    ) -> None:
        """A client attempt delivered twice is expected only across a gateway kill (the queue
        runner died between the upstream's 250 and recording it); count the others."""
        f = self.figures
        by_source: dict[tuple[str | None, str | None], list[float]] = defaultdict(list)
        for c in got:
            by_source[(c.helo, c.txn)].append(c.at or 0.0)
        for (helo, txn), times in by_source.items():
            times.sort()
            for t1, t2 in itertools.pairwise(times):
                if any(t1 <= k <= t2 for k in self.kill_times):
                    continue
                f.redeliveries_without_kill += 1
                if len(f.redelivery_examples) < 10:
                    f.redelivery_examples.append(
                        f"{msgid} {rcpt}: attempt {helo} (txn {txn}) received at "
                        f"{fmt_time(t1)} and {fmt_time(t2)} with no kill in between; "
                        f"{queue or 'not queued'}"
                    )

    def told(self, helo: str | None, msgid: str, rcpt: str) -> str:
        """What the client attempt ``helo`` was told for ``rcpt`` (for the examples)."""
        att = self.attempts.get((helo or "", msgid))
        if att is None:
            return "no such client attempt"
        return f"client {att.outcome.get(rcpt, '?')} ({att.reply[:80]})"

    def copy_state_counts(self) -> dict[str, int]:
        try:
            with read_only(self.db, timeout=30) as con:
                return {
                    s: n
                    for s, n in con.execute("SELECT state, count(*) FROM queue_copy GROUP BY 1")
                }
        except sqlite3.Error:
            return {}


def stored_at(path: Path | None) -> float | None:
    """The capture upstream's outbox names start with the UTC time it stored the message."""
    if path is None:
        return None
    try:
        stamp = datetime.strptime(path.name[:22], "%Y%m%dT%H%M%S.%f")
    except ValueError:
        return None
    return stamp.replace(tzinfo=UTC).timestamp()


def fmt_time(t: float) -> str:
    return datetime.fromtimestamp(t).strftime("%H:%M:%S.%f")[:-3]


def close(conn: smtplib.SMTP | None) -> None:
    if conn is None:
        return
    with contextlib.suppress(Exception):
        if conn.sock is not None:
            conn.sock.settimeout(2)
        conn.quit()
    with contextlib.suppress(Exception):
        conn.close()


# --------------------------------------------------------------------------- report


def report(f: Figures, args: argparse.Namespace) -> str:
    def row(label: str, value: object, note: str = "") -> str:
        return f"  {label:<38} {value!s:>10}  {note}".rstrip()

    out = [
        "Mailward custody soak",
        row("messages (Message-IDs)", f.messages),
        row("(Message-ID, recipient) pairs", f.pairs),
        row("client attempts", f.attempts, f"{args.clients} client threads"),
    ]
    for k in ("250", "4xx", "5xx", "unknown", "no-connection"):
        out.append(row(f"  recipient outcome {k}", f.attempt_outcomes.get(k, 0)))
    out += [
        row("gateway kill -9 while sending", f.kills),
        row("gateway kill -9 while draining", f.drain_kills),
        row("upstream phases", ", ".join(f"{k} {v}" for k, v in sorted(f.chaos_phases.items()))),
        row("upstream copies received", f.upstream_copies),
        row("  with an unknown Message-ID", f.upstream_unknown),
        row("queue messages", f.queue_messages),
        row("queue copies by state", json.dumps(f.queue_copies, sort_keys=True)),
        row("queue recipients by state", json.dumps(f.queue_recipients, sort_keys=True)),
        row("drain time (s)", f.drain_seconds),
        row("run time (s)", f.run_seconds),
        "",
        row("pairs accepted (client got 250)", f.accepted_pairs),
        row("pairs rejected (client got 5xx)", f.rejected_pairs),
        row("pairs delivered upstream", f.delivered_pairs),
        row("LOST", f.lost, "must be 0"),
        row("delivered after a 4xx/5xx to the client", f.delivered_after_refusal, "must be 0"),
        row("stuck in the queue after the drain", f.stuck, "must be 0"),
        row("unfinished (client gave up)", f.unfinished_pairs, "must be 0"),
        row("duplicate pairs", f.duplicate_pairs, f"{f.duplicate_extra_copies} extra copies"),
        row("  from client resends", f.duplicates_client_resend, "unknown outcome, sent again"),
        row("  from redeliveries", f.duplicates_redelivery, "one attempt delivered twice"),
        row("    of which with no kill in between", f.redeliveries_without_kill),
        row("received without a 250", f.received_without_250),
        row("accepted, bounced or dropped", f.bounced_or_dropped),
        row("queue leftovers (corrupt/held)", len(f.queue_leftovers)),
        row("spool files left (orphans, tmp, corrupt)", json.dumps(f.spool_files, sort_keys=True)),
        row("audit records left 'relaying'", f.audit.get("message/relaying", 0), "killed mid-way"),
    ]
    for title, items in (
        ("lost", f.lost_examples),
        ("delivered after a refusal", f.refusal_examples),
        ("duplicates (first 10)", f.duplicate_examples),
        ("redeliveries with no kill in between", f.redelivery_examples),
        ("queue leftovers", f.queue_leftovers[:10]),
        ("gateway processes left running (orphans, killed)", f.orphans),
        ("notes", f.notes),
    ):
        if items:
            out.append(f"{title}:")
            out += [f"  - {x}" for x in items]
    if f.shutdown_problem:
        out.append(f"gateway shutdown: {f.shutdown_problem}")
    if f.custody_failed:
        out.append("RESULT: FAIL (custody)")
    elif f.failed:
        out.append("RESULT: FAIL (nothing lost, but the gateway did not stop cleanly)")
    else:
        out.append("RESULT: ok: nothing lost")
    return "\n".join(out)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--messages", type=int, default=1000, help="messages to send (default 1000)")
    p.add_argument("--kills", type=int, default=10, help="kill -9 while sending (default 10)")
    p.add_argument("--drain-kills", type=int, default=1, help="kill -9 while draining (default 1)")
    p.add_argument("--clients", type=int, default=6, help="client threads (default 6)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    p.add_argument(
        "--kill-delay", type=float, default=0.2, help="max random delay (s) after a kill point"
    )
    p.add_argument(
        "--policy",
        choices=("shipped", "off"),
        default="shipped",
        help="the shipped pipeline with rate limits raised (default), or no checks",
    )
    p.add_argument(
        "--skip-phase",
        action="append",
        choices=[n for n, _ in PHASES if n not in ("healthy", "outage")],
        help="leave this upstream fault out (repeatable)",
    )
    p.add_argument("--drain-timeout", type=float, default=600.0, help="liveness bound (s)")
    p.add_argument(
        "--drain-stall",
        type=float,
        default=150.0,
        help="liveness bound (s): the drain fails when no queued recipient went out for this long",
    )
    p.add_argument("--client-timeout", type=float, default=1800.0, help="liveness bound (s)")
    p.add_argument("--start-timeout", type=float, default=90.0, help="gateway start bound (s)")
    p.add_argument("--stop-grace", type=float, default=60.0, help="SIGTERM grace (s)")
    p.add_argument("--workdir", type=Path, default=None, help="parent of the work directory")
    p.add_argument("--port", type=int, default=0, help="the gateway's port (default: a free one)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = p.parse_args(argv)
    if args.seed is None:
        args.seed = random.SystemRandom().getrandbits(32)
    if args.messages < 1 or args.kills < 0 or args.drain_kills < 0 or args.clients < 1:
        p.error("--messages and --clients must be positive, kills not negative")
    return args


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """SIGTERM/SIGHUP to the harness end it through the normal cleanup."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    parent = args.workdir or Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="mailward-soak-", dir=parent))
    print(f"soak: seed {args.seed}, work directory {workdir}", flush=True)
    soak = Soak(args, workdir)
    code = EXIT_HARNESS
    try:
        with signals_raise():
            figures = soak.run()
        print(report(figures, args), flush=True)
        code = EXIT_CUSTODY if figures.failed else EXIT_OK
        if args.json:
            data = asdict(figures) | {"seed": args.seed, "failed": figures.failed,
                                      "workdir": str(workdir)}  # fmt: skip
            args.json.write_text(json.dumps(data, indent=2, sort_keys=True))
    except HarnessError as exc:
        print(f"soak: HARNESS FAILURE: {exc}", file=sys.stderr)
        print(f"--- gateway log (tail):\n{tail(workdir / 'gateway.log', 4000)}", file=sys.stderr)
    except KeyboardInterrupt as exc:
        print(f"soak: interrupted ({exc})", file=sys.stderr)
    finally:
        soak.close()
    if code == EXIT_OK and not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"soak: work directory kept: {workdir}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
