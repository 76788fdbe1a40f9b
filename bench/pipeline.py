"""Pipeline micro-benchmark: the event-loop CPU the shipped policy costs per message, without sockets.

What it does: builds the pipeline the way the gateway does (``gateway.app.make_pipeline`` on the
shipped policies, with the stores of ``gateway.app.open_stores`` on a fresh SQLite database in a
temporary state directory, and the configured limit store: ``memory://`` unless ``--limit-store``)
and drives synthetic transactions through it as ``gateway.service`` does: MAIL, one RCPT, end of
data with a 2 KB message shaped like ``smtp-source -l 2048``'s (the load of ``bench/run.py``),
then ``finish`` with the message delivered. ``--sessions`` transactions run at once (default 20,
like the goal cell of ``bench/run.py``), each on its own session (one message per connection).

It measures the process's CPU time (``time.process_time``: every thread of this process, not the
spam-score scan workers) per message with the shipped policy on and with every check off (the
pipeline ``bench/run.py --policy off`` configures), timed in alternating pairs (off, on, off, on...)
so that other load on the machine weighs on both alike. It reports the medians, what the policy
adds per message (on - off; the smallest pair too), and the ratio on/off in messages per CPU second
(off / on; the issue-3 goal: >= 0.8), measured, and as it would be for a gateway costing 1010 us
and 1300 us per message without the policy (``bench/run.py``'s goal cells, connections reused and
one per message).

The rest of the gateway is stood in for by ``--base-us`` microseconds of CPU work per message
(default 1000; calibrated at start, so only roughly that), spread over the commands, each after
one turn of the event loop (as a command read from a socket). Without it, the loop would run the
policy alone as fast as it can: the scan worker would become the bottleneck, scans would queue up
(a cost the gateway, whose worker is busy a fifth of the time, does not have) and the loop would
sleep and wake for every scan. ``--base-us 0`` measures the pipeline alone (useful with
``--profile``; the measured ratio then means nothing, only the differences and the estimates do).

Identities (``--identity``): ``trusted`` is what ``bench/run.py`` measures (a trusted-network
client, no login: the login limits, account-guard and the fan-out count do not apply); ``login``
authenticates every connection (AUTH stage, ``record_auth``) as ``bench@bench.local``, so every
check does its full work. The rate-limit tiers are raised far above the load (as ``bench/run.py``
does, keeping each rule's tiers) and account-guard's baseline floors likewise, so that nothing is
refused or held.

Usage (from the repository root)::

    .venv/bin/python bench/pipeline.py                        # both identities, policy on and off
    .venv/bin/python bench/pipeline.py --messages 4000 --repeat 7 --identity trusted
    .venv/bin/python bench/pipeline.py --base-us 0 --profile on --identity login   # + cProfile
    .venv/bin/python bench/pipeline.py --drop spam-score      # what one check costs
    .venv/bin/python bench/pipeline.py --set spam-score.workers=0
    .venv/bin/python bench/pipeline.py --limit-store redis://127.0.0.1:6379/0

Nothing is asserted and nothing is written but a temporary directory (removed at the end) and, with
a Redis limit store, keys under a random ``mw:bench:<hex>:`` prefix (deleted at the end). Figures
are only comparable on the same machine, and other load on it moves them: compare the differences
and the ratios of runs made one after the other.

The ``if __name__ == "__main__":`` guard is required: the spam-score scan workers are started with
the ``spawn`` method, which imports this module again in each worker.

Reads: the shipped policies and rules of this checkout.

Security notes: synthetic messages and addresses only; nothing is logged.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import logging
import math
import pstats
import statistics
import sys
import tempfile
import time
import tomllib
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gateway.app import key_directory, make_pipeline, open_stores  # noqa: E402
from gateway.config.loader import load_config, read_toml, shipped_dir  # noqa: E402
from gateway.config.schema import Config  # noqa: E402
from gateway.core.message import Headers, sha256_hex  # noqa: E402
from gateway.core.model import (  # noqa: E402
    Identity,
    Recipient,
    RecipientStatus,
    Session,
    Stage,
    Transaction,
)
from gateway.pipeline.runner import Pipeline  # noqa: E402
from gateway.ratelimit import open_limit_store  # noqa: E402
from gateway.ratelimit.store import LimitStore  # noqa: E402

SENDER = "bench@bench.local"
RECIPIENT = "sink@example.test"
POLICY_OFF: dict[str, list[str]] = {"connect": [], "auth": [], "mail": [], "rcpt": [], "data": []}
#: the gateway's CPU per message with the policy off in bench/run.py's goal cells (2 KB x 20,
#: connections reused / one per message, docs/performance.md session 2): the ratio the policy's
#: cost would give there
REFERENCE_US = (1010.0, 1300.0)


def smtp_source_message(n: int, size: int = 2048) -> bytes:
    """A message shaped like ``smtp-source -l SIZE``'s: five header lines, then ``size`` bytes of
    numbered lines of X (CRLF line ends, as smtp-source sends them)."""
    head = (
        f"From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\n"
        "Date: Fri, 27 Nov 2026 00:19:43 +0000 (UTC)\r\n"
        f"Message-Id: <{n:x}.0003.0000@bench.local>\r\nSubject: bench\r\n\r\n"
    )
    lines: list[str] = []
    total, i = 0, 1
    while total < size:
        line = (str(i % 10) + "X" * 78)[: max(1, size - total - 2)]
        lines.append(line)
        total += len(line) + 2
        i += 1
    return (head + "\r\n".join(lines) + "\r\n").encode("ascii")


def raised_limits() -> dict[str, Any]:
    """Every shipped rate-limit rule with its tiers kept but raised far above the load."""
    rules: dict[str, Any] = {}
    for path in sorted(shipped_dir("policies").glob("*.toml")):
        rules.update(read_toml(path).get("limits", {}).get("rules", {}))
    return {
        name: {"tiers": [{"limit": 10**12, "period": t["period"]} for t in rule.get("tiers", [])]}
        for name, rule in rules.items()
    }


def bench_config(
    state_dir: Path,
    policy: str,
    limit_store: str,
    drop: frozenset[str] = frozenset(),
    checks: dict[str, dict[str, Any]] | None = None,
) -> Config:
    overrides: dict[str, Any] = {
        "state_dir": str(state_dir),
        "database": {"auto_migrate": True},
        "smtp": {"trusted_networks": ["127.0.0.1/32"]},
        "limits": {"store": limit_store, "rules": raised_limits()},
        # one login sends thousands of messages: keep account-guard measuring, never holding
        "checks": {"account-guard": {"min_messages": 1e12, "min_recipients": 1e12}},
    }
    for check_id, options in (checks or {}).items():
        overrides["checks"].setdefault(check_id, {}).update(options)
    if policy == "off":
        overrides["pipeline"] = dict(POLICY_OFF)
    config = load_config(None, overrides)
    if drop and policy == "on":  # the shipped lists without the dropped checks
        stages = {
            stage: [c for c in getattr(config.pipeline, stage) if c not in drop]
            for stage in POLICY_OFF
        }
        config = load_config(None, {**overrides, "pipeline": stages})
    return config


def calibrate() -> float:
    """Iterations of :func:`spin` per microsecond of CPU on this machine (the fastest of a few,
    after a warm-up)."""
    spin(2_000_000)
    best = math.inf
    for _ in range(7):
        begin = time.process_time()
        spin(200_000)
        best = min(best, time.process_time() - begin)
    return 200_000 / (best * 1e6)


def spin(iterations: int) -> None:
    """CPU work standing in for the rest of the gateway (parsing, relaying, the audit)."""
    while iterations > 0:
        iterations -= 1


@dataclass
class Driver:
    pipeline: Pipeline
    identity: Identity
    login: bool
    messages: list[bytes]
    work: int = 0  # spin() iterations before each of the four steps of a message

    async def command(self) -> None:
        """A command arrives: a turn of the event loop (the socket read), then the gateway's own
        work on it."""
        await asyncio.sleep(0)
        spin(self.work)

    async def connection(self, n: int) -> None:
        """One connection with one transaction, as gateway.service drives the pipeline."""
        session = Session(client_ip="127.0.0.1", client_port=40000 + n % 20000, listener="bench")
        session.helo = "bench.local"
        pipeline = self.pipeline
        if self.login:
            attempt = Transaction(session=session, mail_from="", id=f"{session.id}.auth")
            attempt.auth_login = SENDER
            verdict = await pipeline.run(Stage.AUTH, attempt)
            assert not verdict.decisive, verdict
            await pipeline.auth_result(attempt, True)
        session.identity = self.identity
        await self.command()
        txn = Transaction(session=session, mail_from=SENDER)
        txn.declared_size = 2300
        verdict = await pipeline.run(Stage.MAIL, txn)
        assert not verdict.decisive, verdict
        await self.command()
        rcpt = Recipient(RECIPIENT)
        txn.recipients.append(rcpt)
        verdict = await pipeline.run(Stage.RCPT, txn, rcpt)
        assert not verdict.decisive, verdict
        rcpt.reply = "250 2.1.5 Ok"
        await self.command()
        content = self.messages[n % len(self.messages)]
        txn.content = content
        txn.size = len(content)
        txn.sha256 = sha256_hex(content)
        txn.headers = Headers(content)
        txn.message_id = txn.headers.message_id
        verdict = await pipeline.run(Stage.DATA, txn)
        assert not verdict.decisive, (verdict, txn.verdicts)
        await self.command()  # the relay
        txn.set_pending(RecipientStatus.DELIVERED, "250 2.0.0 Ok")
        await pipeline.finish(txn, True)

    async def run(self, count: int, sessions: int, start: int) -> None:
        """``count`` connections, ``sessions`` at a time."""
        queue = iter(range(start, start + count))

        async def session_loop() -> None:
            for n in queue:
                await self.connection(n)

        await asyncio.gather(*(session_loop() for _ in range(sessions)))


@dataclass
class Figure:
    """One identity: CPU per message of each timed run, policy off and on, run in pairs."""

    identity: str
    off_us: list[float]
    on_us: list[float]

    @property
    def adds(self) -> list[float]:
        return [on - off for off, on in zip(self.off_us, self.on_us, strict=True)]

    @property
    def ratios(self) -> list[float]:
        return [off / on for off, on in zip(self.off_us, self.on_us, strict=True)]


@dataclass
class Arm:
    """The pipeline of one policy (on or off) and what it runs on."""

    policy: str
    driver: Driver
    close: Callable[[], Awaitable[None]]


async def arm(args: argparse.Namespace, identity_name: str, policy: str, workdir: Path) -> Arm:
    state = workdir / f"{identity_name}-{policy}"
    state.mkdir()
    prefix = f"mw:bench:{uuid.uuid4().hex[:12]}:"
    config = bench_config(state, policy, args.limit_store, args.drop, args.checks)
    stores = await open_stores(config)
    store: LimitStore = open_limit_store(config.limits.store, prefix=prefix)
    pipeline = make_pipeline(
        config,
        limit_store=store,
        policy_state=stores.policy,
        account_state=stores.account_state,
        key_store=key_directory(config, stores.keys),
    )
    login = identity_name == "login"
    identity = (
        Identity(SENDER, 1, owned=("@bench.local",))
        if login
        else Identity(None, None, trusted_network=True)
    )
    messages = [smtp_source_message(i) for i in range(64)]
    work = round(args.base_us * args.spin_per_us / 4)

    async def close() -> None:
        await pipeline.close()
        if args.limit_store != "memory://":
            await store.reset("")  # only this run's prefix
        await store.close()
        await stores.close()

    return Arm(policy, Driver(pipeline, identity, login, messages, work), close)


async def timed(args: argparse.Namespace, arm: Arm, start: int, profile: bool) -> float:
    """One timed run: CPU microseconds per message."""
    profiler = None
    if profile:
        # wall-clock timing charges this process with time it spent waiting or was preempted
        # (e.g. by a scan worker it woke); "cpu" counts its own CPU only
        timer = time.thread_time if args.profile_timer == "cpu" else time.perf_counter
        profiler = cProfile.Profile(timer)
        profiler.enable()
    begin = time.process_time()
    await arm.driver.run(args.messages, args.sessions, start)
    used = time.process_time() - begin
    if profiler is not None:
        profiler.disable()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats(args.sort).print_stats(args.top)
        print(f"--- cProfile, policy {arm.policy} ---")
        print(out.getvalue())
    return float(used / args.messages * 1e6)


async def measure(args: argparse.Namespace, identity_name: str, workdir: Path) -> Figure:
    """Policy off and on, timed in alternation (off, on, off, on...), so that other load on the
    machine weighs on both alike; each pair gives one difference and one ratio."""
    arms = [await arm(args, identity_name, policy, workdir) for policy in ("off", "on")]
    figure = Figure(identity_name, [], [])
    try:
        for a in arms:  # starts the scan workers, fills caches
            await a.driver.run(args.warmup, args.sessions, 0)
        done = args.warmup
        for i in range(args.repeat):
            for a in arms:
                us = await timed(args, a, done, profile=args.profile == a.policy and i == 0)
                (figure.off_us if a.policy == "off" else figure.on_us).append(us)
            done += args.messages
            print(
                f"identity {identity_name:7s} run {i + 1}: off {figure.off_us[-1]:7.1f}, "
                f"on {figure.on_us[-1]:7.1f} us/msg",
                flush=True,
            )
    finally:
        for a in arms:
            await a.close()
    return figure


async def main_async(args: argparse.Namespace) -> list[Figure]:
    with tempfile.TemporaryDirectory(prefix="mw-bench-pipeline-") as tmp:
        return [await measure(args, name, Path(tmp)) for name in args.identity.split(",")]


def report(figures: list[Figure], base_us: float) -> None:
    """Medians over the pairs, the smallest difference (the least disturbed pair), and what the
    difference makes of a gateway costing ``REFERENCE_US`` per message with the policy off."""
    med = statistics.median
    refs = "".join(f" {f'at {r:g} us':>10s}" for r in REFERENCE_US)
    print()
    print("CPU per message (us), policy off and on; ratio on/off = off/on (= msg/s on / off)")
    print(
        f"{'identity':8s} {'off':>8s} {'on':>8s} {'adds (min)':>16s} "
        f"{'ratio' if base_us else '':>6s}{refs}"
    )
    for f in figures:
        adds = med(f.adds)
        measured = f"{med(f.ratios):6.3f}" if base_us else " " * 6
        estimates = "".join(f" {r / (r + adds):10.3f}" for r in REFERENCE_US)
        print(
            f"{f.identity:8s} {med(f.off_us):8.1f} {med(f.on_us):8.1f} "
            f"{adds:7.1f} ({min(f.adds):6.1f}) {measured}{estimates}"
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--messages", type=int, default=3000, help="messages per timed run")
    p.add_argument("--warmup", type=int, default=300, help="untimed messages first")
    p.add_argument("--repeat", type=int, default=5, help="timed pairs (off, on) per identity")
    p.add_argument("--sessions", type=int, default=20, help="transactions at once")
    p.add_argument("--identity", default="trusted,login", help="trusted, login or both")
    p.add_argument("--limit-store", default="memory://", help="memory:// or a Redis URL")
    p.add_argument(
        "--drop",
        type=lambda v: frozenset(filter(None, v.split(","))),
        default=frozenset(),
        help="check ids to leave out of the shipped lists (attribution: what one check costs)",
    )
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="CHECK.OPTION=VALUE",
        help="a check option (TOML value), e.g. spam-score.workers=0; repeatable",
    )
    p.add_argument("--profile", choices=("on", "off", "none"), default="none",
                   help="cProfile the first timed run of this policy")  # fmt: skip
    p.add_argument(
        "--profile-timer",
        choices=("cpu", "wall"),
        default="cpu",
        help="cProfile clock: this thread's CPU time (default) or wall-clock time",
    )
    p.add_argument("--sort", default="tottime", help="cProfile sort key (tottime, cumulative)")
    p.add_argument("--top", type=int, default=30, help="cProfile lines")
    p.add_argument(
        "--base-us",
        type=float,
        default=1000.0,
        help="CPU work per message standing in for the rest of the gateway (bench/run.py, policy "
        "off: ~1000-1300 us); 0: the pipeline alone",
    )
    args = p.parse_args(argv)
    args.checks = {}
    for item in args.sets:
        key, eq, value = item.partition("=")
        check_id, dot, option = key.partition(".")
        if not (eq and dot and check_id and option):
            p.error(f"--set: expected CHECK.OPTION=VALUE, got {item!r}")
        try:
            parsed = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            parsed = value  # a bare string
        args.checks.setdefault(check_id, {})[option] = parsed
    for name in args.identity.split(","):
        if name not in ("trusted", "login"):
            p.error(f"--identity: unknown {name!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    args.spin_per_us = calibrate() if args.base_us else 0.0
    figures = asyncio.run(main_async(args))
    report(figures, args.base_us)
    return 0


if __name__ == "__main__":
    sys.exit(main())
