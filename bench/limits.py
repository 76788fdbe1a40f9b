"""Limit-store benchmark: rate-limit checks per second from one process, Redis and memory.

What it does: one "check" is what the ``rate-limit`` check does at end of data — a single
``acquire`` of 2 tiers (per minute, per day) x 3 keys (login, client network, sender domain), i.e.
6 charges, all-or-nothing, in one Lua script call on Redis. N coroutines issue checks back to back
for a fixed time against one store (keys drawn at random from a key space; the tiers are such that
nearly all checks are admitted, so nearly every one writes its 6 buckets); the run reports
checks/s, the latency percentiles of one check, and the process's CPU use. It does so for the
Redis store and, for comparison, the in-process memory store, at each requested concurrency.
Nothing is asserted; the goal line (>= 5,000 checks/s from one process on Redis) is printed with
the figure.

Usage (from the repository root)::

    .venv/bin/python bench/limits.py                      # Redis at MAILWARD_TEST_REDIS_URL or
                                                          # redis://127.0.0.1:6379/0, and memory
    .venv/bin/python bench/limits.py --seconds 10 --concurrency 1,16,64,256
    .venv/bin/python bench/limits.py --url redis://host:6379/2 --no-memory

Results are also written to ``bench/results/limits-<UTC timestamp>.json`` (git-ignored).

Reads: the Redis server at ``--url``; writes only keys under a random ``mw:bench:<hex>:`` prefix,
all deleted at the end.

Security notes: the URL's password (if any) is never printed.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import random
import statistics
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gateway.ratelimit.memory import MemoryLimitStore  # noqa: E402
from gateway.ratelimit.redis_store import RedisLimitStore  # noqa: E402
from gateway.ratelimit.store import Charge, LimitStore, Tier  # noqa: E402

RESULTS_DIR = REPO / "bench" / "results"
GOAL_CHECKS_PER_SEC = 5000.0
# Realistic shapes: 600/min and 1,000,000/day. With 10,000 logins and 1,000 domains drawn at random
# nearly every check is admitted, and every bucket written stays in Redis (it drains in seconds).
TIERS = (Tier("msgs#0", 600, 60.0), Tier("msgs#1", 1_000_000, 86400.0))


@dataclass
class Result:
    store: str
    concurrency: int
    checks: int
    seconds: float
    checks_per_sec: float
    p50_ms: float
    p99_ms: float
    cpu_percent: float
    denied: int


def check_for(rng: random.Random, keys: int) -> list[Charge]:
    """One check's charges: 2 tiers x (login, client network, sender domain)."""
    n = rng.randrange(keys)
    owners = (
        f"login-messages:login:user{n}@example.com",
        f"client-ip-messages:ip:10.{n // 65536 % 256}.{n // 256 % 256}.{n % 256}/32",
        f"sender-domain-messages:domain:d{n % 1000}.example",
    )
    return [Charge(key, tier, 1) for key in owners for tier in TIERS]


async def drive(
    store: LimitStore, name: str, concurrency: int, seconds: float, keys: int
) -> Result:
    latencies: list[float] = []
    denied = 0
    stop = False

    # The memory store never suspends: without an explicit yield one worker would run forever.
    in_process = isinstance(store, MemoryLimitStore)

    async def worker(seed: int) -> None:
        nonlocal denied
        rng = random.Random(seed)
        while not stop:
            charges = check_for(rng, keys)
            started = time.perf_counter()
            decision = await store.acquire(charges)
            latencies.append(time.perf_counter() - started)
            denied += not decision.allowed
            if in_process:
                await asyncio.sleep(0)

    # warm-up: connections opened, scripts loaded, caches warm
    warm = [asyncio.create_task(worker(-i - 1)) for i in range(concurrency)]
    await asyncio.sleep(min(1.0, seconds / 4))
    stop = True
    await asyncio.gather(*warm)
    latencies.clear()
    denied = 0
    stop = False

    cpu0, wall0 = time.process_time(), time.perf_counter()
    tasks = [asyncio.create_task(worker(i)) for i in range(concurrency)]
    await asyncio.sleep(seconds)
    stop = True
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - wall0
    cpu = time.process_time() - cpu0
    ordered = sorted(latencies)
    return Result(
        store=name,
        concurrency=concurrency,
        checks=len(latencies),
        seconds=round(wall, 3),
        checks_per_sec=round(len(latencies) / wall, 1),
        p50_ms=round(statistics.median(ordered) * 1000, 3),
        p99_ms=round(ordered[int(len(ordered) * 0.99)] * 1000, 3),
        cpu_percent=round(100 * cpu / wall, 1),
        denied=denied,
    )


def redacted(url: str) -> str:
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.rpartition('@')[2]}"


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--url",
        default=os.environ.get("MAILWARD_TEST_REDIS_URL") or "redis://127.0.0.1:6379/0",
        help="Redis URL (default: $MAILWARD_TEST_REDIS_URL or redis://127.0.0.1:6379/0)",
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="timed seconds per run")
    parser.add_argument(
        "--concurrency", default="1,8,32,64", help="comma-separated coroutine counts"
    )
    parser.add_argument("--keys", type=int, default=10_000, help="distinct logins/IPs drawn from")
    parser.add_argument("--max-connections", type=int, default=64, help="Redis pool size")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory store")
    parser.add_argument("--no-redis", action="store_true", help="skip the Redis store")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",") if c]

    results: list[Result] = []
    if not args.no_redis:
        prefix = f"mw:bench:{uuid.uuid4().hex[:8]}:"
        store = RedisLimitStore(
            args.url, prefix=prefix, timeout=2.0, max_connections=args.max_connections
        )
        try:
            await store.ping()
            for c in levels:
                results.append(await drive(store, "redis", c, args.seconds, args.keys))
                print(format_row(results[-1]), flush=True)
        finally:
            removed = await store.reset("")
            await store.close()
            print(f"(removed {removed} benchmark keys under {prefix})")
    if not args.no_memory:
        memory = MemoryLimitStore()
        for c in levels:
            results.append(await drive(memory, "memory", c, args.seconds, args.keys))
            print(format_row(results[-1]), flush=True)

    best = max((r.checks_per_sec for r in results if r.store == "redis"), default=None)
    if best is not None:
        verdict = "met" if best >= GOAL_CHECKS_PER_SEC else "NOT met"
        print(
            f"goal: >= {GOAL_CHECKS_PER_SEC:,.0f} checks/s from one process on Redis "
            f"(2 tiers x 3 keys per check): best {best:,.0f} checks/s -> {verdict}"
        )
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = RESULTS_DIR / f"limits-{stamp}.json"
    out.write_text(
        json.dumps(
            {
                "when": stamp,
                "machine": {
                    "nproc": os.cpu_count(),
                    "python": platform.python_version(),
                    "platform": platform.platform(),
                },
                "redis_url": redacted(args.url),
                "seconds": args.seconds,
                "keys": args.keys,
                "tiers": [asdict(t) for t in TIERS],
                "results": [asdict(r) for r in results],
            },
            indent=2,
        )
    )
    print(f"results: {out.relative_to(REPO)}")
    return 0


def format_row(r: Result) -> str:
    return (
        f"{r.store:>6}  x{r.concurrency:<4} {r.checks_per_sec:>10,.0f} checks/s  "
        f"p50 {r.p50_ms:7.3f} ms  p99 {r.p99_ms:7.3f} ms  cpu {r.cpu_percent:5.1f}%  "
        f"({r.checks} checks, {r.denied} denied)"
    )


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
