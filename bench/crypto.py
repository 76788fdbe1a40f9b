"""Encryption benchmark: messages/s through Mailward with every recipient encrypted, against the
same load relayed in clear text, in the same run.

What it does: generates throw-away recipient keys (OpenPGP with ``gpg --quick-gen-key`` in a
temporary GNUPGHOME, S/MIME RSA certificates with ``cryptography``), then runs two gateways side
by side, both ``mailward --config FILE serve`` relaying to Postfix's ``smtp-sink``:

* **clear**: ``[checks.encryption] default = "never"`` (clear-text relay, the reference);
* **encrypted**: ``default = "required"``, the recipients' public keys imported with ``mailward
  key import`` into its database: every recipient is encrypted (a recipient without a key would
  be refused at RCPT, so a run cannot silently measure clear text).

For each cell -- OpenPGP 1 recipient; OpenPGP 5 recipients all in To (one ciphertext for 5
keys); OpenPGP 5 Bcc recipients (a copy each); S/MIME 1 recipient; S/MIME 5 in To -- and message
size (2 KB, 100 KB), it sends the same ``smtp-source -F FILE -r N`` load through both gateways,
interleaved, N times, and reports messages/s, the ratio encrypted/clear, the CPU per message of
each gateway's *process tree* (the gateway plus its gpg children, see :func:`common.tree_cpu`)
and messages/s per core (messages per CPU-second of that tree). With ``--policy off`` (default)
both gateways run only the ``encryption`` check, so the ratio isolates encryption; ``--policy
on`` keeps the shipped pipeline (rate limits raised as in ``run.py``).

Before timing, a verification phase sends two rounds of one message per cell and size through
each gateway to a second ``smtp-sink`` that dumps what it receives (``-d``), and checks every
copy: the encrypted gateway's copies are ``multipart/encrypted`` (PGP/MIME, with one recipient
packet per recipient) or ``application/pkcs7-mime``, go to the expected recipients (one copy per
Bcc recipient), never contain a marker line of the clear text, carry the placeholder Subject, and
decrypt (gpg with the recipients' secret keys, ``cryptography`` for S/MIME) to the original body
and Subject; the clear gateway's copies are the clear text. In that phase the encrypted gateway
runs gpg through a wrapper that logs each call: in the second round every OpenPGP copy must be
exactly one gpg process (``--encrypt``), and no round may list the keyring. The timed phase
restarts both gateways on the same state with the real gpg. After it, the audit of both
gateways is counted: every message delivered, every recipient of the encrypted gateway with
decision ``encrypted`` in the expected format. ``--profile`` adds one encrypted run per cell
with ``py-spy record --gil`` attached (where the gateway's Python CPU goes).

Usage (from the repository root)::

    .venv/bin/python bench/crypto.py            # full run (~10-15 min on a quiet 2-core machine)
    .venv/bin/python bench/crypto.py --quick    # smoke run, ~1-2 min
    .venv/bin/python bench/crypto.py --profile  # plus one py-spy-profiled encrypted run per cell

Results: a table, the goal verdicts and ``bench/results/<timestamp>-crypto.json`` (git-ignored).

Needs: ``smtp-source``/``smtp-sink`` (see bench/README.md), ``gpg`` (GnuPG 2.2+). Speed is never
asserted; this only measures and reports (the exit code says whether every check passed).

Security notes: the keys are throw-away, without passphrases, in a temporary directory removed at
the end (its gpg-agent stopped); traffic stays on 127.0.0.1; every process started here is
stopped here.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import email
import email.message
import email.policy
import json
import os
import random
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent)]

import common  # noqa: E402  (bench/common.py: processes, CPU accounting, configuration)
import run as relay  # noqa: E402  (bench/run.py: the relay benchmark's helpers)

REPO = relay.REPO
HOST = common.HOST
PLACEHOLDER = "..."  # the shipped [checks.encryption] subject_placeholder
SUBJECT = "Mailward encryption benchmark"
MARKER = "MAILWARD-BENCH-CLEARTEXT-MARKER"  # a line of every body; never in an encrypted copy
SIZES = {"2KB": 2048, "100KB": 102_400}
# Timed messages per run: the encrypted run should last several seconds.
FULL_COUNTS = {"2KB": 1000, "100KB": 300}
QUICK_COUNTS = {"2KB": 100, "100KB": 30}
# Goals (issue 5): OpenPGP 2 KB, 1 recipient, per core of the gateway's process tree; S/MIME.
GOAL_PGP_PER_CORE = 100.0
GOAL_SMIME_MSGS_PER_SEC = 300.0


@dataclass(frozen=True)
class Kind:
    """A cell's recipients: ``rcpts`` envelope recipients (smtp-source ``-r``: ``rcpt@D``,
    ``2rcpt@D``, ...), named in To (``bcc`` False) or not named at all (To:
    undisclosed-recipients, so each is a Bcc recipient with a copy of its own)."""

    name: str
    fmt: str  # "openpgp" | "smime"
    rcpts: int
    bcc: bool = False

    @property
    def domain(self) -> str:
        return "pgp.bench.test" if self.fmt == "openpgp" else "smime.bench.test"

    @property
    def addresses(self) -> list[str]:
        """In smtp-source's order: ``Nrcpt@D`` ... ``2rcpt@D``, ``rcpt@D``."""
        return [f"{i if i > 1 else ''}rcpt@{self.domain}" for i in range(self.rcpts, 0, -1)]

    @property
    def copies(self) -> int:
        """Upstream transactions per message through the encrypted gateway."""
        return self.rcpts if self.bcc else 1


KINDS = {
    k.name: k
    for k in (
        Kind("pgp-1", "openpgp", 1),
        Kind("pgp-5", "openpgp", 5),
        Kind("pgp-5bcc", "openpgp", 5, bcc=True),
        Kind("smime-1", "smime", 1),
        Kind("smime-5", "smime", 5),
    )
}
DEFAULT_KINDS = "pgp-1,pgp-5,pgp-5bcc,smime-1,smime-5"


# --------------------------------------------------------------------------- CPU accounting


def system_cpu(pid: int) -> float:
    """Kernel-mode CPU seconds of one process (all its threads): its stime."""
    fields = common.proc_stat(pid)
    return int(fields[12]) / os.sysconf("SC_CLK_TCK") if fields is not None else float("nan")


# --------------------------------------------------------------------------- keys and messages


class Recipients:
    """The recipients' keys, generated at run time: OpenPGP keys in a throw-away GNUPGHOME (which
    keeps their secret keys, for decrypting in the verification) and S/MIME certificates."""

    def __init__(self, workdir: Path, kinds: list[Kind], algo: str) -> None:
        from tests.fixtures.keys import GpgHome, make_certificate  # generation code of the tests

        self.dir = workdir / "keys"
        self.dir.mkdir()
        self.home = GpgHome(workdir / "gnupg-recipients")
        self.files: list[Path] = []
        self.smime: dict[str, tuple[Any, Any]] = {}  # address -> (certificate, private key)
        pgp = sorted({a for k in kinds if k.fmt == "openpgp" for a in k.addresses})
        smime = sorted({a for k in kinds if k.fmt == "smime" for a in k.addresses})
        for address in pgp:
            fpr = self.home.generate(f"Bench <{address}>", algo=algo)
            path = self.dir / f"{address}.asc"
            path.write_bytes(self.home.export(fpr))
            self.files.append(path)
        for address in smime:
            from cryptography.hazmat.primitives.serialization import Encoding

            cert, key = make_certificate([address])
            path = self.dir / f"{address}.pem"
            path.write_bytes(cert.public_bytes(Encoding.PEM))
            self.files.append(path)
            self.smime[address] = (cert, key)

    def decrypt_pgp(self, armored: bytes) -> bytes:
        return self.home.decrypt(armored)

    def pgp_recipient_packets(self, armored: bytes) -> int:
        out = self.home.run("--list-packets", input=armored, check=False).stdout.decode()
        return out.count("pubkey enc packet")

    def decrypt_smime(self, der: bytes, address: str) -> bytes:
        from cryptography.hazmat.primitives.serialization import pkcs7

        cert, key = self.smime[address]
        return pkcs7.pkcs7_decrypt_der(der, cert, key, [])

    def close(self) -> None:
        self.home.close()  # stops its gpg-agent (started by decrypt) and deletes the directory


def _words(rng: random.Random, size: int) -> str:
    """About ``size`` bytes of text lines (random words: compresses like prose, unlike the
    repeated X of ``smtp-source -l``, which gpg's compression would make nearly free)."""
    vocabulary = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
        for _ in range(800)
    ]
    lines, line, total = [MARKER], "", len(MARKER) + 1
    while total < size:
        word = rng.choice(vocabulary)
        if len(line) + len(word) + 1 > 72:
            lines.append(line)
            total += len(line) + 1
            line = ""
        line = f"{line} {word}" if line else word
    return "\n".join(lines) + "\n"


def message_body(size_label: str) -> tuple[list[str], str]:
    """(MIME header lines, body) of the benchmark message: 2 KB of text/plain, or 100 KB as a
    multipart/mixed with a short text and a base64 attachment of random bytes (the common shape
    of a large message)."""
    rng = random.Random(5)
    size = SIZES[size_label]
    if size <= 4096:
        headers = ["Content-Type: text/plain; charset=us-ascii", "Content-Transfer-Encoding: 7bit"]
        return headers, _words(rng, size)
    boundary = "bench-boundary-5f1e"
    text = _words(rng, 1500)
    attachment = base64.encodebytes(rng.randbytes(int((size - 2000) * 3 / 4 * 76 / 77))).decode()
    body = (
        f"--{boundary}\nContent-Type: text/plain; charset=us-ascii\n\n{text}\n"
        f'--{boundary}\nContent-Type: application/octet-stream; name="data.bin"\n'
        "Content-Transfer-Encoding: base64\n"
        'Content-Disposition: attachment; filename="data.bin"\n\n'
        f"{attachment}--{boundary}--\n"
    )
    return [f'Content-Type: multipart/mixed; boundary="{boundary}"'], body


def message_file(workdir: Path, kind: Kind, size_label: str) -> tuple[Path, str]:
    """The ``smtp-source -F`` file for a cell (LF line ends: smtp-source sends CRLF), and the
    body as sent (CRLF), for comparing with the decrypted copies."""
    mime, body = message_body(size_label)
    to = "undisclosed-recipients:;" if kind.bcc else ", ".join(f"<{a}>" for a in kind.addresses)
    lines = [
        f"From: Bench <{relay.SENDER}>",
        f"To: {to}",
        f"Subject: {SUBJECT}",
        "Date: Thu, 26 Nov 2026 12:00:00 +0000",
        "Message-ID: <crypto-bench@bench.local>",
        "MIME-Version: 1.0",
        *mime,
        "",
    ]
    path = workdir / f"message-{kind.name}-{size_label}.eml"
    path.write_text("\n".join(lines) + "\n" + body)
    return path, body.replace("\n", "\r\n")


# --------------------------------------------------------------------------- gateways


POLICY_OFF = """
# --policy off: every check off except `encryption` (the fixed AUTH gate still applies), so the
# ratio encrypted/clear isolates encryption
[pipeline]
connect = []
auth = []
mail = []
rcpt = ["encryption"]
data = []
"""


class CryptoGateway:
    """``mailward serve`` for one arm (``clear`` or ``encrypted``): a fixed state directory and
    port; each :meth:`start` writes the config with the given relay port (and gpg program)."""

    def __init__(self, workdir: Path, arm: str, entry: str, policy: str) -> None:
        self.arm = arm
        self.dir = workdir / f"gw-{arm}"
        self.state = self.dir / "state"
        self.state.mkdir(parents=True)
        self.port = common.free_port()
        self.config = self.dir / "mailward.toml"
        self.launcher = self.dir / "launch_mailward.py"
        self.launcher.write_text(relay.LAUNCHERS[entry])
        self.log = self.dir / "gateway.log"
        self.policy = policy
        self.proc: subprocess.Popen[bytes] | None = None
        self.stops: list[str] = []

    def config_text(self, sink_port: int, gpg: str = "gpg") -> str:
        default = "required" if self.arm == "encrypted" else "never"
        text = relay.gateway_toml(self.state, self.port, sink_port)
        text += POLICY_OFF if self.policy == "off" else ""
        text += f"""
[checks.encryption]
default = "{default}"   # the {self.arm} arm

[keys]
gpg = "{gpg}"
"""
        return text

    def write_config(self, sink_port: int, gpg: str = "gpg") -> None:
        self.config.write_text(self.config_text(sink_port, gpg))

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``mailward --config FILE ARGS`` (the launcher, i.e. the console script), checked."""
        cmd = [sys.executable, str(self.launcher), "--config", str(self.config), *args]
        result = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            env=common.gateway_env(relay.GATEWAY_SRC),
            cwd=self.dir,
            timeout=300,
        )
        if result.returncode:
            raise RuntimeError(f"{' '.join(args)} failed: {result.stdout}{result.stderr}")
        return result

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    def start(self) -> None:
        cmd = [sys.executable, str(self.launcher), "--config", str(self.config), "serve"]
        self.proc = common.start_gateway(
            cmd,
            port=self.port,
            log=self.log,
            cwd=self.dir,
            src=relay.GATEWAY_SRC,
            label=f"{self.arm} gateway",
            header=f"--- start {dt.datetime.now(dt.UTC).isoformat()}\n",
        )

    def stop(self) -> str:
        if self.proc is None:
            return "not started"
        how = common.stop_process(self.proc)
        self.stops.append(how)
        self.proc = None
        return how

    def audit(self) -> dict[str, Any]:
        """Delivered message records, and the encryption decisions of their recipients."""
        db = self.state / "mailward.db"
        try:
            with common.read_only(db) as con:
                records = dict(
                    con.execute(
                        "SELECT kind || '/' || coalesce(outcome, ''), count(*) FROM audit_record "
                        "GROUP BY 1"
                    ).fetchall()
                )
                decisions = con.execute(
                    "SELECT coalesce(r.encryption_decision, '-'), "
                    "coalesce(r.encryption_format, '-'), r.status, count(*) "
                    "FROM audit_recipient r JOIN audit_record a ON a.id = r.record_id "
                    "WHERE a.kind = 'message' GROUP BY 1, 2, 3"
                ).fetchall()
        except sqlite3.Error as exc:
            return {"error": f"cannot read the audit: {exc}"}
        return {
            "records": records,
            "delivered": records.get("message/delivered", 0),
            "recipients": {f"{d}/{f}/{s}": n for d, f, s, n in decisions},
        }


# --------------------------------------------------------------------------- runs


@dataclass
class ArmRun:
    arm: str
    count: int
    seconds: float
    msgs_per_sec: float
    sink_expected: int
    sink_received: int
    ok: bool
    error: str = ""
    cpu_gateway: float = 0.0  # the gateway process itself (all threads), s
    cpu_children: float = 0.0  # its children (gpg, workers), s
    cpu_gateway_system: float = 0.0  # the kernel-mode part of cpu_gateway, s
    other_cpu_percent: float = 0.0  # processes outside the benchmark, % of one core

    @property
    def cpu_tree(self) -> float:
        return self.cpu_gateway + self.cpu_children


def source_cmd(
    port: int, kind: Kind, file: Path, sessions: int, count: int, reuse: bool
) -> list[str]:
    cmd = [relay.SMTP_SOURCE, "-s", str(sessions), "-m", str(count), "-r", str(kind.rcpts)]
    if reuse:
        cmd.append("-d")
    return [
        *cmd,
        *("-F", str(file), "-M", relay.HELO_NAME, "-f", relay.SENDER, "-t", kind.addresses[-1]),
        f"{HOST}:{port}",
    ]


def send(
    sink: relay.Sink,
    gw: CryptoGateway,
    kind: Kind,
    file: Path,
    sessions: int,
    count: int,
    reuse: bool,
    others: tuple[int, ...],
    timeout: float = 1800,
) -> ArmRun:
    """One timed smtp-source run through ``gw``; ``others`` are the other benchmark processes
    (sink, the other gateway) for the other-load figure."""
    copies = kind.copies if gw.arm == "encrypted" else 1
    timed, (own0, below0, sys0), (own1, below1, sys1) = relay.timed_source(
        source_cmd(gw.port, kind, file, sessions, count, reuse),
        sink,
        count,
        ours=lambda: common.ours_cpu_seconds(gw.pid, *others),
        probe=lambda: (*common.tree_cpu(gw.pid), system_cpu(gw.pid)),
        expected=count * copies,
        timeout=timeout,
        settle=10,
    )
    return ArmRun(
        arm=gw.arm,
        sink_expected=count * copies,
        **asdict(timed),
        cpu_gateway=round(own1 - own0, 3),
        cpu_children=round(below1 - below0, 3),
        cpu_gateway_system=round(sys1 - sys0, 3),
    )


@dataclass
class Cell:
    kind: Kind
    size_label: str
    count: int
    file: Path
    clear: list[ArmRun] = field(default_factory=list)
    encrypted: list[ArmRun] = field(default_factory=list)
    warmup: int = 0
    error: str = ""
    profile: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.kind.name} {self.size_label}"

    @staticmethod
    def arm_summary(runs: list[ArmRun]) -> dict[str, Any]:
        kept = relay.kept(runs)
        if not kept:
            return {}

        def med(values: list[float], digits: int = 2) -> float:
            return round(statistics.median(values), digits)

        return {
            "msgs_per_sec": med([r.msgs_per_sec for r in kept], 1),
            "cpu_ms_per_msg": med([1000 * r.cpu_tree / r.count for r in kept]),
            "gpg_cpu_ms_per_msg": med([1000 * r.cpu_children / r.count for r in kept]),
            "gateway_system_cpu_ms_per_msg": med(
                [1000 * r.cpu_gateway_system / r.count for r in kept]
            ),
            "cores_busy": med([r.cpu_tree / r.seconds for r in kept]),
            "msgs_per_sec_per_core": med([r.count / r.cpu_tree for r in kept if r.cpu_tree], 1),
            "runs_msgs_per_sec": [r.msgs_per_sec for r in runs],
            "quiet_runs": f"{relay.quiet(runs)}/{len(runs)}",
        }

    def summary(self) -> dict[str, Any]:
        clear, enc = self.arm_summary(self.clear), self.arm_summary(self.encrypted)
        ratio = None
        if clear.get("msgs_per_sec") and enc.get("msgs_per_sec"):
            ratio = round(enc["msgs_per_sec"] / clear["msgs_per_sec"], 3)
        others = [r.other_cpu_percent for r in (*self.clear, *self.encrypted)]
        return {
            "clear": clear,
            "encrypted": enc,
            "ratio": ratio,
            "other_cpu_percent_max": max(others) if others else None,
        }


# --------------------------------------------------------------------------- verification


GPG_WRAPPER = """\
#!/bin/sh
# Mailward encryption benchmark: logs each gpg call of the gateway (verification phase only)
printf '%s\\n' "$*" >> {log}
exec {gpg} "$@"
"""


def _body(msg: email.message.Message) -> bytes:
    raw = msg.as_bytes(policy=email.policy.compat32)
    return raw.split(b"\n\n", 1)[1] if b"\n\n" in raw else b""


def verify_copies(
    dumps: list[bytes], kind: Kind, arm: str, body: str, keys: Recipients
) -> tuple[list[str], dict[str, Any]]:
    """Check what the sink received for one message of ``kind`` through ``arm``: returns the
    problems found (empty: verified) and facts for the results (sizes, content types)."""
    problems: list[str] = []
    expected_groups = (
        [{a} for a in kind.addresses] if arm == "encrypted" and kind.bcc else [set(kind.addresses)]
    )
    want_body = body.replace("\r\n", "\n").encode()
    groups, facts = [], []
    for raw in dumps:
        msg = email.message_from_bytes(raw, policy=email.policy.compat32)
        rcpts = {str(v).strip().strip("<>").lower() for v in msg.get_all("X-Rcpt-Args") or []}
        groups.append(rcpts)
        ctype = msg.get_content_type()
        info = {"recipients": sorted(rcpts), "content_type": ctype, "bytes": len(raw)}
        facts.append(info)
        if arm == "clear":
            if MARKER.encode() not in raw or ctype not in {"text/plain", "multipart/mixed"}:
                problems.append(f"clear copy is not the clear text ({ctype})")
            continue
        if MARKER.encode() in raw:
            problems.append(f"CLEAR TEXT in an encrypted copy for {sorted(rcpts)}")
        if str(msg.get("Subject", "")).strip() != PLACEHOLDER:
            problems.append(f"outer Subject is {msg.get('Subject')!r}, not the placeholder")
        if kind.fmt == "openpgp":
            parts: list[Any] = msg.get_payload() if msg.is_multipart() else []  # type: ignore[assignment]
            if (
                ctype != "multipart/encrypted"
                or msg.get_param("protocol") != "application/pgp-encrypted"
                or len(parts) != 2
                or not isinstance(parts[1], email.message.Message)
            ):
                problems.append(f"not PGP/MIME: {ctype} {msg.get_param('protocol')}")
                continue
            armored = _body(parts[1])
            info["pgp_recipient_packets"] = keys.pgp_recipient_packets(armored)
            if info["pgp_recipient_packets"] != len(rcpts):
                problems.append(
                    f"{info['pgp_recipient_packets']} recipient packets for {len(rcpts)} recipients"
                )
            inner = keys.decrypt_pgp(armored)
        else:
            if ctype != "application/pkcs7-mime" or msg.get_param("smime-type") != (
                "enveloped-data"
            ):
                problems.append(f"not S/MIME enveloped-data: {ctype}")
                continue
            der = base64.b64decode(_body(msg))
            inner = keys.decrypt_smime(der, sorted(rcpts)[0])
        inner = inner.replace(b"\r\n", b"\n")
        if want_body not in inner or f"Subject: {SUBJECT}".encode() not in inner:
            problems.append("the decrypted copy does not hold the original body and Subject")
    if sorted(map(sorted, groups)) != sorted(map(sorted, expected_groups)):
        problems.append(f"copies for {sorted(map(sorted, groups))}, expected {expected_groups}")
    return problems, {"copies": facts}


def verification(
    workdir: Path,
    gateways: dict[str, CryptoGateway],
    cells: list[Cell],
    bodies: dict[str, str],
    keys: Recipients,
) -> dict[str, Any]:
    """Two rounds of one message per cell through each gateway to a dumping sink (see the module
    docstring)."""
    dumps = workdir / "dumps"
    dumps.mkdir(mode=0o777)
    dumps.chmod(0o777)  # smtp-sink writes as nobody
    sink = relay.Sink(workdir)
    sink.out = workdir / "smtp-sink-dump.out"
    sink.cmd[1:1] = ["-d", f"{dumps}/%H%M%S."]
    gpg_log = workdir / "gpg-calls.log"
    wrapper = workdir / "gpg-logged"
    wrapper.write_text(GPG_WRAPPER.format(log=gpg_log, gpg=shutil.which("gpg") or "gpg"))
    wrapper.chmod(0o755)
    results: dict[str, Any] = {"cells": {}, "problems": []}
    sink.start()
    try:
        for gw in gateways.values():
            gw.write_config(sink.port, str(wrapper) if gw.arm == "encrypted" else "gpg")
            gw.start()
        try:
            for gw in gateways.values():
                for round_ in (1, 2):
                    for cell in cells:
                        name = f"{gw.arm} {cell.name} #{round_}"
                        facts = verify_one(gw, cell, bodies[cell.name], keys, dumps, gpg_log)
                        results["cells"][name] = facts
                        results["problems"] += [f"{name}: {p}" for p in facts["problems"]]
        finally:
            for gw in gateways.values():
                gw.stop()
    finally:
        sink.stop()
    calls = gpg_log.read_text().splitlines() if gpg_log.exists() else []
    results["gpg_calls_total"] = dict(Counter(_gpg_call_kind(c) for c in calls))
    # The first round may import keys into the gateway's keyring (first use) and build the gpg
    # engine; in the second, each OpenPGP copy must be exactly one gpg process (--encrypt): no
    # keyring listing, no import. No round may list the keyring.
    for name, facts in results["cells"].items():
        calls_seen = facts.get("gpg_calls", {})
        if "list-keys" in calls_seen:
            results["problems"].append(f"{name}: the keyring was listed ({calls_seen})")
        if name.startswith("encrypted pgp") and name.endswith("#2"):
            want = {"encrypt": len(facts["copies"])}
            if calls_seen != want:
                results["problems"].append(f"{name}: gpg calls {calls_seen}, expected {want}")
    return results


def verify_one(
    gw: CryptoGateway, cell: Cell, body: str, keys: Recipients, dumps: Path, gpg_log: Path
) -> dict[str, Any]:
    """Send one message of ``cell`` through ``gw`` to the dumping sink and check its copies."""
    seen = set(dumps.iterdir())
    log_lines = len(gpg_log.read_text().splitlines()) if gpg_log.exists() else 0
    cmd = source_cmd(gw.port, cell.kind, cell.file, 1, 1, False)
    proc = subprocess.run(cmd, capture_output=True, timeout=120)
    expected = cell.kind.copies if gw.arm == "encrypted" else 1
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and len(set(dumps.iterdir()) - seen) < expected:
        time.sleep(0.1)
    time.sleep(0.3)  # a dump file may still be being written; a surplus copy would show now
    new = sorted(set(dumps.iterdir()) - seen)
    problems, facts = verify_copies([p.read_bytes() for p in new], cell.kind, gw.arm, body, keys)
    if proc.returncode:
        problems.append(f"smtp-source failed: {proc.stderr.decode()[-300:]}")
    calls = gpg_log.read_text().splitlines()[log_lines:] if gpg_log.exists() else []
    facts["gpg_calls"] = dict(Counter(_gpg_call_kind(c) for c in calls))
    facts["problems"] = problems
    return facts


def _gpg_call_kind(args: str) -> str:
    for word in ("--encrypt", "--import", "--list-keys", "--list-config", "--version", "--delete"):
        if word in args.split():
            return word.lstrip("-")
    return "other"


# --------------------------------------------------------------------------- the run


def build_cells(args: argparse.Namespace, workdir: Path) -> tuple[list[Cell], dict[str, str]]:
    counts = QUICK_COUNTS if args.quick else FULL_COUNTS
    cells, bodies = [], {}
    for label in args.sizes:
        for name in args.kinds:
            kind = KINDS[name]
            n = max(args.sessions, int(counts[label] * args.scale / (2 if kind.bcc else 1)))
            path, body = message_file(workdir, kind, label)
            cell = Cell(kind, label, n, path)
            cells.append(cell)
            bodies[cell.name] = body
    return cells, bodies


def run_cells(
    cells: list[Cell],
    gateways: dict[str, CryptoGateway],
    sink: relay.Sink,
    args: argparse.Namespace,
) -> None:
    reuse = args.connection == "reuse"
    clear, enc = gateways["clear"], gateways["encrypted"]
    for cell in cells:
        print(f"... {cell.name}: {cell.count} messages x {args.repeat} pairs", flush=True)
        cell.warmup = min(cell.count, max(40, 2 * args.sessions))
        for gw in (clear, enc):
            warm = send(sink, gw, cell.kind, cell.file, args.sessions, cell.warmup, reuse, ())
            if not warm.ok:
                cell.error = f"warm-up through the {gw.arm} gateway failed: {warm.error}"
                break
        if cell.error:
            continue
        for i in range(args.repeat):
            if args.wait_quiet > 0:
                relay.wait_quiet(args.wait_quiet, sink.pid, clear.pid, enc.pid)
            order = ((clear, enc), (enc, clear)) if i % 2 == 0 else ((enc, clear), (clear, enc))
            for gw, other in order:
                r = send(
                    sink, gw, cell.kind, cell.file, args.sessions, cell.count, reuse,
                    (sink.pid, other.pid),
                )  # fmt: skip
                (cell.clear if gw.arm == "clear" else cell.encrypted).append(r)
                print(
                    f"    {gw.arm:<9} {r.msgs_per_sec:7.1f} msg/s  tree CPU "
                    f"{1000 * r.cpu_tree / r.count:6.2f} ms/msg  other {r.other_cpu_percent}%"
                    f"{'' if r.ok else '  FAILED: ' + r.error}",
                    flush=True,
                )


def profile_cells(
    cells: list[Cell],
    gateways: dict[str, CryptoGateway],
    sink: relay.Sink,
    args: argparse.Namespace,
    stamp: str,
) -> None:
    """One more encrypted run per cell with ``py-spy record --gil`` attached to the encrypted
    gateway for the timed load only: samples of the thread holding the GIL, i.e. where the
    gateway's Python CPU goes (gpg, and native code running without the GIL, do not appear).
    The summary goes to ``cell.profile``, the raw stacks to
    ``bench/results/<stamp>-crypto-profile-<cell>.txt``."""
    enc = gateways["encrypted"]
    for cell in cells:
        if cell.error:
            continue
        print(f"... profiling {cell.name} (encrypted arm)", flush=True)
        if args.wait_quiet > 0:
            relay.wait_quiet(args.wait_quiet, sink.pid, *(gw.pid for gw in gateways.values()))
        raw = enc.dir / f"profile-{cell.kind.name}-{cell.size_label}.txt"
        spy = relay.PySpy(enc.pid, raw)
        spy.cmd.append("--gil")  # only the thread holding the GIL: where the Python CPU goes
        try:
            spy.start()
        except RuntimeError as exc:
            cell.profile = {"error": str(exc)}
            continue
        try:
            run = send(
                sink, enc, cell.kind, cell.file, args.sessions, cell.count,
                args.connection == "reuse", (sink.pid, gateways["clear"].pid),
            )  # fmt: skip
        finally:
            spy.stop()
        if not raw.exists():
            cell.profile = {"error": f"py-spy wrote nothing: {common.tail(spy.log, 500)}"}
            continue
        summary = relay.summarize_pyspy(raw, args.top, run.seconds, relay.PYSPY_RATE)
        kept = relay.RESULTS_DIR / f"{stamp}-crypto-profile-{cell.kind.name}-{cell.size_label}.txt"
        shutil.copyfile(raw, kept)
        summary["raw_file"] = str(kept.relative_to(REPO))
        summary["profiled_run"] = asdict(run)
        cell.profile = summary


def expected_audit(cells: list[Cell], verified: bool) -> dict[str, dict[str, int]]:
    """Per arm: messages delivered, and recipients by (decision/format/status)."""
    out: dict[str, dict[str, int]] = {"clear": Counter(), "encrypted": Counter()}
    for cell in cells:
        for arm, runs in (("clear", cell.clear), ("encrypted", cell.encrypted)):
            if cell.error and not runs:
                continue
            n = cell.warmup + sum(r.count for r in runs) + (2 if verified else 0)  # 2 rounds
            if arm == "encrypted" and cell.profile.get("profiled_run"):
                n += cell.profile["profiled_run"]["count"]
            out[arm]["delivered"] += n
            if arm == "encrypted":
                out[arm][f"encrypted/{cell.kind.fmt}/delivered"] += n * cell.kind.rcpts
    return {k: dict(v) for k, v in out.items()}


def audit_ok(actual: dict[str, Any], expected: dict[str, int], arm: str) -> bool:
    if actual.get("delivered") != expected.get("delivered"):
        return False
    if arm == "clear":
        return True
    recipients = actual.get("recipients", {})
    want = {k: v for k, v in expected.items() if k != "delivered"}
    return bool(recipients == want)


def print_table(cells: list[Cell]) -> None:
    head = (
        f"{'cell':<15} {'msgs':>5}  {'clear/s':>7}  {'enc/s':>6}  {'ratio':>5}  "
        f"{'CPU ms/msg clear':>16}  {'enc (gpg)':>13}  {'enc cores':>9}  {'enc/s/core':>10}  "
        f"{'other%':>6}  {'quiet c,e':>9}"
    )
    for cell in relay.table_cells(head, cells, 15):
        s = cell.summary()
        c, e = s["clear"], s["encrypted"]
        if not c or not e:
            print(f"{cell.name:<15} no successful run")
            continue
        print(
            f"{cell.name:<15} {cell.count:>5}  {c['msgs_per_sec']:7.1f}  {e['msgs_per_sec']:6.1f}  "
            f"{s['ratio']:5.3f}  {c['cpu_ms_per_msg']:16.2f}  "
            f"{e['cpu_ms_per_msg']:6.2f} ({e['gpg_cpu_ms_per_msg']:4.2f})  "
            f"{e['cores_busy']:9.2f}  {e['msgs_per_sec_per_core']:10.1f}  "
            f"{s['other_cpu_percent_max']:6.1f}  {c['quiet_runs']:>4},{e['quiet_runs']:>4}"
        )
    print(
        "\nmsgs/s: median of the timed runs (quiet runs only when there are any); ratio: "
        "encrypted/clear; CPU: the gateway's process tree (gateway + gpg children) per message, "
        "(gpg): the children's part; cores: tree CPU / wall time; enc/s/core: messages per "
        "CPU-second of the tree; other%: most CPU used outside the benchmark during a run."
    )


def print_profile(cell: Cell, top: int) -> None:
    p = cell.profile
    run = relay.profile_head(f"\nProfile of the encrypted gateway, {cell.name}:", p)
    if run is None:
        return
    print(f"  profiled run: {run.get('msgs_per_sec')} msg/s, other {run.get('other_cpu_percent')}%")
    for name, t in p.get("threads", {}).items():
        print(f"  thread {name}: {t['samples']} samples, working {t.get('working', 0)}")
    print("  self by package: " + ", ".join(f"{b} {v}%" for b, v in p["self_by_package"].items()))
    relay.print_top(p, top)


#: The goals, judged on the 2 KB cells: cell -> (results key, the figure judged, the figure shown
#: with it, the goal).
GOALS = {
    "pgp-1": (
        "openpgp_2KB_1rcpt_per_core", "msgs_per_sec_per_core", "msgs_per_sec", GOAL_PGP_PER_CORE
    ),
    "smime-1": (
        "smime_2KB_1rcpt_msgs_per_sec", "msgs_per_sec", "msgs_per_sec_per_core",
        GOAL_SMIME_MSGS_PER_SEC,
    ),
}  # fmt: skip


def goals(cells: list[Cell]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for cell in cells:
        e = cell.summary()["encrypted"] if not cell.error else {}
        if cell.size_label != "2KB" or not e or cell.kind.name not in GOALS:
            continue
        key, figure, other, goal = GOALS[cell.kind.name]
        out[key] = {figure: e[figure], other: e[other], "goal": goal, "met": e[figure] >= goal}
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="smoke run: small counts, 1 pair")
    p.add_argument("--repeat", type=int, help="timed pairs per cell (default 3, quick 1)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every message count")
    p.add_argument("--sizes", default="2KB,100KB", help="comma list of 2KB,100KB")
    p.add_argument(
        "--cells",
        dest="kinds",
        default=DEFAULT_KINDS,
        help=f"comma list of {','.join(KINDS)} (default {DEFAULT_KINDS})",
    )
    p.add_argument("--sessions", type=int, default=20, help="concurrent sessions (default 20)")
    p.add_argument(
        "--connection",
        choices=["new", "reuse"],
        default="new",
        help="new: one message per connection (smtp-source default); reuse: smtp-source -d",
    )
    p.add_argument(
        "--policy",
        choices=["off", "on"],
        default="off",
        help="off (default): only the encryption check in both arms; on: the shipped policy "
        "(rate limits raised as in run.py)",
    )
    p.add_argument(
        "--pgp-algo",
        default="future-default",
        help="gpg --quick-gen-key algorithm of the recipients' keys (default future-default: "
        "ed25519/cv25519; e.g. rsa3072)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="one more encrypted run per cell with py-spy attached to the encrypted gateway",
    )
    p.add_argument("--top", type=int, default=25, help="functions listed per profile")
    p.add_argument("--entry", choices=["cli", "app"], default="cli")
    p.add_argument("--gateway-src", type=Path, help="measure the gateway in this source tree")
    relay.add_wait_quiet(p)
    p.add_argument(
        "--output", type=Path, help="JSON results (default bench/results/<ts>-crypto.json)"
    )
    args = p.parse_args(argv)
    args.sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    args.kinds = [s.strip() for s in args.kinds.split(",") if s.strip()]
    for s in args.sizes:
        if s not in SIZES:
            p.error(f"unknown size {s!r}")
    for k in args.kinds:
        if k not in KINDS:
            p.error(f"unknown cell {k!r}")
    relay.quick_defaults(args)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.gateway_src:
        relay.GATEWAY_SRC = args.gateway_src.resolve()
    if not relay.tools_found():
        return 2
    if not shutil.which("gpg"):
        print("bench: gpg not found")
        return 2
    relay.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    started = dt.datetime.now(dt.UTC)
    out = args.output or relay.RESULTS_DIR / f"{started:%Y%m%dT%H%M%SZ}-crypto.json"
    code = relay.code_version()
    with tempfile.TemporaryDirectory(prefix="mw-crypto-") as tmp:
        workdir = Path(tmp)
        workdir.chmod(0o711)  # smtp-sink (nobody) writes its dumps below
        cells, bodies = build_cells(args, workdir)
        kinds = [c.kind for c in cells]
        print("... generating recipient keys", flush=True)
        keys = Recipients(workdir, kinds, args.pgp_algo)
        gateways = {
            arm: CryptoGateway(workdir, arm, args.entry, args.policy)
            for arm in ("clear", "encrypted")
        }
        sink = relay.Sink(workdir)
        verified: dict[str, Any] = {}
        try:
            enc = gateways["encrypted"]
            enc.write_config(sink.port)
            enc.cli("db", "upgrade")
            for path in keys.files:
                enc.cli("key", "import", str(path))
            print("... verifying what the upstream receives", flush=True)
            verified = verification(workdir, gateways, cells, bodies, keys)
            for problem in verified["problems"]:
                print(f"    VERIFICATION FAILED: {problem}")
            if not verified["problems"]:
                print(f"    ok: every copy as expected; gpg calls {verified['gpg_calls_total']}")
            sink.start()
            for gw in gateways.values():
                gw.write_config(sink.port)
                gw.start()
            try:
                run_cells(cells, gateways, sink, args)
                if args.profile:
                    profile_cells(cells, gateways, sink, args, f"{started:%Y%m%dT%H%M%SZ}")
            finally:
                for gw in gateways.values():
                    gw.stop()
        finally:
            sink.stop()
            keys.close()
            for gw in gateways.values():
                if gw.proc is not None:
                    gw.stop()
        audit = {arm: gw.audit() for arm, gw in gateways.items()}
        logs = {arm: common.tail(gw.log, 3000) for arm, gw in gateways.items()}
        stops = {arm: gw.stops for arm, gw in gateways.items()}
        sample_config = gateways["encrypted"].config_text(0).replace(str(workdir), "<tmp>")
    expected = expected_audit(cells, bool(verified))
    audit_verdict = {arm: audit_ok(audit[arm], expected[arm], arm) for arm in audit}
    print()
    print_table(cells)
    print(f"\naudit: {audit_verdict} (expected {expected}; found {audit})")
    goal = goals(cells)
    print(f"goals: {json.dumps(goal)}")
    for cell in cells:
        if cell.profile:
            print_profile(cell, min(args.top, 15))
    result = {
        **relay.result_head(started, code),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "source_example": source_cmd(0, KINDS["pgp-1"], Path("<message file>"), 20, 1000, False),
        "gateway_config_encrypted": sample_config,
        "verification": verified,
        "goal": goal,
        "audit": audit,
        "audit_expected": expected,
        "audit_ok": audit_verdict,
        "gateway_stops": stops,
        "cells": [
            {
                "cell": c.name,
                "kind": asdict(c.kind),
                "size": c.size_label,
                "count": c.count,
                "warmup": c.warmup,
                **c.summary(),
                "clear_runs": [asdict(r) for r in c.clear],
                "encrypted_runs": [asdict(r) for r in c.encrypted],
                "error": c.error,
                "profile": c.profile,
            }
            for c in cells
        ],
    }
    bad_stop = any(not s.startswith("exited (0") for v in stops.values() for s in v)
    if bad_stop:
        result["gateway_log_tails"] = logs
        print(f"WARNING: a gateway did not stop cleanly: {stops}")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results: {out}")
    failed = (
        bool(verified.get("problems"))
        or any(c.error for c in cells)
        or any(not r.ok for c in cells for r in (*c.clear, *c.encrypted))
        or not all(audit_verdict.values())
        or bad_stop
    )
    return 1 if failed else 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop the children on SIGTERM too
    sys.exit(main())
