"""Redis limit store: counts shared by every gateway instance (``limits.store = "redis://..."``).

What it does: implements :class:`~gateway.ratelimit.store.LimitStore` on Redis (>= 5) with one
atomic Lua script per operation, registered once and called with EVALSHA (re-loaded on NOSCRIPT):
``acquire`` charges all its buckets in one script call (a port of
:func:`gateway.ratelimit.gcra.plan`), ``admit`` does acquire's and distinct's work in one script
(all or nothing), ``refund``, ``usage`` (reads), ``distinct`` (a sorted set
scored by time: prune, count, add) and ``incr`` (create-with-expiry then add). Flags are single
commands (``SET .. PX`` / ``PTTL``), atomic by themselves. Every script reads the clock with
``redis.call('TIME')``: all instances share the Redis server's clock, never their own.

Every key is ``<prefix><name>`` (``prefix`` default ``mw:rl:``; names as in
:mod:`gateway.ratelimit.store`) and expires by itself: a bucket when it would be empty again, a
distinct set ``window`` after its newest member, a counter ``window`` after its creation, a flag
after its ttl. A bucket's value is ``"<level> <updated>"`` (units in use, server time in seconds,
both ``%.17g``). All keys of one call go to one server: Redis Cluster is not supported (use a
single primary, with Sentinel or a managed failover if needed).

Throughput: script calls are pipelined. A call is queued; up to ``PIPELINES`` (4) senders each
take up to ``BATCH`` (128) waiting calls and send them in one pipeline (one write, one read), so
under load the per-call cost of redis-py (encoding, syscalls, event-loop turns) is shared by many
calls; each script still runs atomically on its own. Acquire, admit and refund pass their charges
as one argument and get one string back (one reply line; admit's member hashes follow as
arguments of their own). A caller waits at most two ``timeout`` s for
its answer; one cancelled before its call was sent withdraws it (nothing is charged). Other
commands (flags, counters' reads) go straight through a pool of at most ``max_connections``
(default 64, RESP2), which a FIFO semaphore guards so that callers queue fairly.

This module is the only importer of ``redis``. Every redis-py exception (connection refused,
timeout, script error) and socket error becomes
:class:`~gateway.ratelimit.store.LimitStoreUnavailable` here. ``timeout`` (default 0.5 s) bounds the
wait for a free connection, the connect and each read, and nothing is retried (a retried acquire
could charge twice), so a dead or hung Redis costs a call at most about two timeouts.

Reads: the Redis server at ``url`` (credentials and TLS as in the URL: ``redis://``,
``rediss://``, ``unix://``).

Security notes: the URL may carry a password; it is never logged or put in an error (errors name
``scheme://host:port/db`` only). Distinct members are hashed before they are sent
(:func:`~gateway.ratelimit.store.hash_member`): Redis never holds a raw address or IP. Keys hold
what the caller chose (logins, client networks, domains). ``reset`` uses SCAN (never KEYS).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, RedisError

from gateway.ratelimit import gcra
from gateway.ratelimit.store import (
    Admission,
    Charge,
    Decision,
    DistinctCharge,
    DistinctResult,
    LimitStoreUnavailable,
    Remaining,
    StoredEntry,
    Tier,
    TierUsage,
    bucket_name,
    check_admission,
    check_amount,
    check_key,
    check_limit,
    check_window,
    counter_name,
    distinct_name,
    flag_name,
    hashed_members,
    kind_of,
    matches_prefix,
)

T = TypeVar("T")

# Shared Lua prelude: server time and reading a bucket (a port of gcra.drained).
_PRELUDE = """
local EPS = 1e-9
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function fmt(x) return string.format('%.17g', x) end
local function level_of(k, interval)
  local raw = redis.call('GET', k)
  if not raw then return 0 end
  local l, u = string.match(raw, '^(%S+) (%S+)$')
  l = tonumber(l)
  u = tonumber(u)
  if not l or not u then return 0 end
  local elapsed = now - u
  if elapsed > 0 then l = l - elapsed / interval end
  if l > EPS then return l end
  return 0
end
local function write(levels, ttls)
  for k, level in pairs(levels) do
    if level > EPS then
      redis.call('SET', k, fmt(level) .. ' ' .. fmt(now),
                 'PX', math.max(1, math.ceil(ttls[k] * 1000)))
    else
      redis.call('DEL', k)
    end
  end
end
-- Record ARGV[first..last] as members of the sorted set k seen now (ZADD in slices of 500, so
-- a long list never exceeds Lua's unpack limit) and keep the set for window seconds.
local function add_members(k, window, first, last)
  local score = fmt(now)
  local batch = {}
  for i = first, last do
    batch[#batch + 1] = score
    batch[#batch + 1] = ARGV[i]
    if #batch >= 1000 then
      redis.call('ZADD', k, unpack(batch))
      batch = {}
    end
  end
  if #batch > 0 then redis.call('ZADD', k, unpack(batch)) end
  redis.call('PEXPIRE', k, math.max(1, math.ceil(window * 1000)))
end
-- All-or-nothing GCRA charges, a port of gateway.ratelimit.gcra.plan: charge i is against
-- bucket KEYS[i] (a bucket may repeat; later charges see the earlier ones), with its interval,
-- capacity and amount in words a[base + 3i - 2 .. base + 3i]. Returns the levels and TTLs to
-- write, the reply words so far ('1', then "<remaining_i> <reset_after_i>" per charge when
-- report), and the denial words (nil when allowed): "0 <index, 0-based> <measured> <capacity>
-- <retry_after> <reset_after> <never 0|1>" (durations %.17g, "inf" when never).
local function gcra_plan(n, a, base, report)
  local levels, initial, asked, ttls = {}, {}, {}, {}
  local out = {'1'}
  local denied = nil
  local retry = 0
  local never = false
  for i = 1, n do
    local k = KEYS[i]
    local interval = tonumber(a[base + 3 * i - 2])
    local capacity = tonumber(a[base + 3 * i - 1])
    local amount = tonumber(a[base + 3 * i])
    local level = levels[k]
    if level == nil then
      level = level_of(k, interval)
      initial[k] = level
    end
    local after = level + amount
    levels[k] = after
    asked[k] = (asked[k] or 0) + amount
    ttls[k] = after * interval
    if after > capacity + EPS then
      if asked[k] > capacity then never = true end
      local wait = (after - capacity) * interval
      if wait > retry then retry = wait end
      if denied == nil then
        denied = {'0', i - 1, fmt(math.ceil(after - EPS)), fmt(capacity), '0',
                  fmt(initial[k] * interval), '0'}
      end
    elseif report and denied == nil then
      out[#out + 1] = fmt(math.max(0, math.floor(capacity - after + EPS)))
      out[#out + 1] = fmt(after * interval)
    end
  end
  if denied ~= nil then
    if never then
      denied[5] = fmt(math.huge)
      denied[7] = '1'
    else
      denied[5] = fmt(retry)
    end
  end
  return levels, ttls, out, denied
end
"""

ACQUIRE_LUA = (
    _PRELUDE
    + """
-- acquire: all-or-nothing GCRA charges, a port of gateway.ratelimit.gcra.plan.
-- KEYS[i]: bucket of charge i (a bucket may repeat; later charges see the earlier ones).
-- ARGV[1]: words "<dry> <interval_1> <capacity_1> <amount_1> ..." (dry: 1 = dry run; seconds).
-- Returns one string (one reply line, cheap to parse):
--   allowed: "1 <remaining_1> <reset_after_1> ...", written unless dry run;
--   denied:  "0 <index, 0-based> <measured> <capacity> <retry_after> <reset_after> <never 0|1>",
--            nothing written. Durations are %.17g ("inf" when never).
local a = {}
for w in string.gmatch(ARGV[1], '%S+') do a[#a + 1] = w end
local levels, ttls, out, denied = gcra_plan(#KEYS, a, 1, true)
if denied ~= nil then return table.concat(denied, ' ') end
if a[1] ~= '1' then write(levels, ttls) end
return table.concat(out, ' ')
"""
)

ADMIT_LUA = (
    _PRELUDE
    + """
-- admit: acquire's GCRA charges and distinct's member sets in one all-or-nothing call (the
-- GCRA part is the prelude's gcra_plan, as in acquire; the sets DISTINCT_LUA's loop; both write only
-- at the end).
-- KEYS[1..n]: the buckets of the n charges; KEYS[n+1..]: the distinct sets (each once).
-- ARGV[1]: words "<dry> <n> <interval_1> <capacity_1> <amount_1> ..." (dry: 1 = dry run);
-- ARGV[2]: words "<window_1> <limit_1> <members_1> ..." per set (limit -1: none; members: how
--          many of the following hashes are the set's); ARGV[3..]: the member hashes, set by set.
-- Returns one string: charges denied: acquire's "0 ..." denial, nothing written; else
-- "1 <count_after_1> <allowed_1> <added_1> ...", the sets up to the first one its limit refused
-- (allowed 0: then nothing is written); written unless dry run.
local a = {}
for w in string.gmatch(ARGV[1], '%S+') do a[#a + 1] = w end
local n = tonumber(a[2])
local levels, ttls, out, denied = gcra_plan(n, a, 2, false)
if denied ~= nil then return table.concat(denied, ' ') end
local d = {}
for w in string.gmatch(ARGV[2], '%S+') do d[#d + 1] = w end
local sets = {}
local pos = 3
for j = 1, #KEYS - n do
  local k = KEYS[n + j]
  local window = tonumber(d[3 * j - 2])
  local limit = tonumber(d[3 * j - 1])
  local count_members = tonumber(d[3 * j])
  redis.call('ZREMRANGEBYSCORE', k, '-inf', fmt(now - window))
  local count = redis.call('ZCARD', k)
  local new = 0
  for i = pos, pos + count_members - 1 do
    if not redis.call('ZSCORE', k, ARGV[i]) then new = new + 1 end
  end
  local after = count + new
  if limit >= 0 and new > 0 and after > limit then
    out[#out + 1] = fmt(after)
    out[#out + 1] = '0'
    out[#out + 1] = '0'
    return table.concat(out, ' ')
  end
  out[#out + 1] = fmt(after)
  out[#out + 1] = '1'
  out[#out + 1] = fmt(new)
  sets[j] = {k, window, pos, count_members}
  pos = pos + count_members
end
if a[1] ~= '1' then
  write(levels, ttls)
  for j = 1, #sets do
    local k, window, first, count_members = unpack(sets[j])
    if count_members > 0 then add_members(k, window, first, first + count_members - 1) end
  end
end
return table.concat(out, ' ')
"""
)

REFUND_LUA = (
    _PRELUDE
    + """
-- refund: give back charges (never below empty). KEYS[i]: bucket of charge i;
-- ARGV[1]: words "<interval_1> <amount_1> ...".
local a = {}
for w in string.gmatch(ARGV[1], '%S+') do a[#a + 1] = w end
local levels, ttls = {}, {}
for i = 1, #KEYS do
  local k = KEYS[i]
  local interval = tonumber(a[2 * i - 1])
  local level = levels[k]
  if level == nil then level = level_of(k, interval) end
  level = level - tonumber(a[2 * i])
  if level <= EPS then level = 0 end
  levels[k] = level
  ttls[k] = level * interval
end
write(levels, ttls)
return #KEYS
"""
)

USAGE_LUA = """
-- usage: the server time and the raw buckets (Python does the arithmetic).
local t = redis.call('TIME')
local out = {t[1], t[2]}
for i = 1, #KEYS do out[#out + 1] = redis.call('GET', KEYS[i]) end
return out
"""

DISTINCT_LUA = (
    _PRELUDE
    + """
-- distinct: members seen in a sliding window, in a sorted set scored by server time.
-- KEYS[1]: the set; ARGV[1] window (s); ARGV[2] limit (-1: none); ARGV[3] '1' = dry run;
-- ARGV[4..]: member hashes, already distinct. Returns {count_after, allowed, added}.
local k = KEYS[1]
local window = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', k, '-inf', fmt(now - window))
local count = redis.call('ZCARD', k)
local new = 0
for i = 4, #ARGV do
  if not redis.call('ZSCORE', k, ARGV[i]) then new = new + 1 end
end
local after = count + new
if limit >= 0 and new > 0 and after > limit then return {after, 0, 0} end
if ARGV[3] == '1' or #ARGV < 4 then return {after, 1, new} end
add_members(k, window, 4, #ARGV)
return {after, 1, new}
"""
)

INCR_LUA = """
-- incr: a fixed-window counter. KEYS[1]; ARGV[1] amount; ARGV[2] window in ms.
redis.call('SET', KEYS[1], 0, 'PX', ARGV[2], 'NX')
return redis.call('INCRBY', KEYS[1], ARGV[1])
"""

#: an allowed decision without ``remaining`` (what admit answers; immutable, so shared)
_ALLOWED = Decision(True)

PIPELINES = 4
"""Pipelines in flight at once; calls arriving meanwhile wait and go out together in the next."""
BATCH = 128
"""Script calls per pipeline at most."""


@dataclass(slots=True)
class _Request:
    op: str
    script: AsyncScript
    keys: list[str]
    args: list[Any]
    future: asyncio.Future[Any]


def _settle(request: _Request, outcome: Any) -> None:
    """Hand a reply (or an exception) to a waiting caller, unless it gave up already."""
    if request.future.done():
        return
    if isinstance(outcome, BaseException):
        request.future.set_exception(outcome)
    else:
        request.future.set_result(outcome)


_GLOB_SPECIAL = frozenset("\\*?[]")


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in _GLOB_SPECIAL else c for c in text)


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


def _where(url: str) -> str:
    """``scheme://host:port/db`` of a Redis URL, without credentials or query."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "redis"
    return f"{parts.scheme}://{host}{port}{parts.path}"


class RedisLimitStore:
    """The Redis :class:`~gateway.ratelimit.store.LimitStore`. Constructing it connects to nothing;
    it belongs to the event loop that first uses it, and :meth:`close` releases it."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "mw:rl:",
        timeout: float = 0.5,
        max_connections: int = 64,
    ) -> None:
        timeout = check_window(timeout, "timeout")
        self.prefix = prefix
        self.timeout = timeout
        self._where = _where(url)
        if isinstance(max_connections, bool) or not isinstance(max_connections, int):
            raise ValueError(f"max_connections must be an integer >= 1, got {max_connections!r}")
        if max_connections < 1:
            raise ValueError(f"max_connections must be an integer >= 1, got {max_connections!r}")
        # At most max_connections calls are in flight: a FIFO semaphore hands out the slots
        # (fair under load, unlike the pool's own blocking wait), so the pool never runs dry.
        self._slots = asyncio.Semaphore(max_connections)
        pool = ConnectionPool.from_url(
            url,
            max_connections=max_connections,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            protocol=2,  # RESP2: no HELLO, so any Redis >= 5 will do
            health_check_interval=0,
        )
        self._redis: Redis = Redis.from_pool(pool)
        self._acquire = self._redis.register_script(ACQUIRE_LUA)
        self._admit = self._redis.register_script(ADMIT_LUA)
        self._refund = self._redis.register_script(REFUND_LUA)
        self._usage = self._redis.register_script(USAGE_LUA)
        self._distinct = self._redis.register_script(DISTINCT_LUA)
        self._incr = self._redis.register_script(INCR_LUA)
        self._pending: deque[_Request] = deque()
        self._senders = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    def __repr__(self) -> str:
        return f"RedisLimitStore({self._where!r}, prefix={self.prefix!r})"

    # -- plumbing ---------------------------------------------------------------------------------
    def _unavailable(self, op: str, exc: BaseException, detail: str = "") -> LimitStoreUnavailable:
        return LimitStoreUnavailable(
            f"limit store {self._where}: {op} failed: {type(exc).__name__}: {detail or exc}"
        )

    async def _call(self, op: str, call: Callable[[], Awaitable[T]]) -> T:
        """Run ``call()`` in a connection slot; every failure becomes LimitStoreUnavailable."""
        slots = self._slots
        if slots.locked():  # all connections busy: wait in line, at most ``timeout``
            try:
                async with asyncio.timeout(self.timeout):
                    await slots.acquire()
            except TimeoutError as exc:
                raise self._unavailable(op, exc, "no free connection within the timeout") from exc
        else:
            await slots.acquire()  # returns at once
        try:
            return await call()
        except (RedisError, OSError) as exc:
            raise self._unavailable(op, exc) from exc
        finally:
            slots.release()

    # -- script calls, pipelined -------------------------------------------------------------------
    async def _eval(self, op: str, script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
        """EVALSHA ``script``: queued, and sent with whatever other calls are waiting in one
        pipeline. Waits at most two timeouts; cancelling the caller before its call was sent
        withdraws it (nothing is charged)."""
        if self._closed:
            raise LimitStoreUnavailable(f"limit store {self._where}: {op} after close()")
        loop = asyncio.get_running_loop()
        request = _Request(op, script, keys, args, loop.create_future())
        self._pending.append(request)
        if self._senders < PIPELINES:
            self._senders += 1
            task = loop.create_task(self._send_pending())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        try:
            async with asyncio.timeout(2 * self.timeout):
                return await request.future
        except TimeoutError as exc:
            raise self._unavailable(op, exc, "no answer within the timeout") from exc

    async def _send_pending(self) -> None:
        """One sender: while calls are waiting, send up to BATCH of them in one pipeline."""
        try:
            while self._pending:
                batch: list[_Request] = []
                while self._pending and len(batch) < BATCH:
                    request = self._pending.popleft()
                    if not request.future.done():  # its caller gave up: never sent
                        batch.append(request)
                if batch:
                    await self._send(batch, reload=True)
        finally:
            self._senders -= 1

    async def _send(self, batch: list[_Request], *, reload: bool) -> None:
        try:
            replies = await self._call("pipeline", lambda: self._pipeline(batch))
        except LimitStoreUnavailable as exc:
            cause = exc.__cause__ or exc
            for request in batch:
                _settle(request, self._unavailable(request.op, cause))
            return
        except asyncio.CancelledError:  # close(): nobody will answer these callers
            for request in batch:
                _settle(request, LimitStoreUnavailable(f"limit store {self._where}: closed"))
            raise
        unknown: list[_Request] = []
        for request, reply in zip(batch, replies, strict=True):
            if isinstance(reply, NoScriptError) and reload:
                unknown.append(request)  # not run: the server lost its script cache
            elif isinstance(reply, BaseException):
                _settle(request, self._unavailable(request.op, reply))
            else:
                _settle(request, reply)
        if unknown:
            scripts = {r.script.sha: r.script for r in unknown}
            try:
                await self._call(
                    "script load",
                    lambda: asyncio.gather(
                        *(self._redis.script_load(sc.script) for sc in scripts.values())
                    ),
                )
            except LimitStoreUnavailable as exc:
                for request in unknown:
                    _settle(request, self._unavailable(request.op, exc.__cause__ or exc))
                return
            await self._send(unknown, reload=False)

    async def _pipeline(self, batch: list[_Request]) -> list[Any]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for r in batch:
                pipe.evalsha(r.script.sha, len(r.keys), *r.keys, *r.args)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        return replies

    def _list(self, op: str, reply: Any) -> list[Any]:
        if not isinstance(reply, list):
            raise self._unavailable(op, TypeError(f"unexpected reply {type(reply).__name__}"))
        return reply

    def _words(self, op: str, reply: Any) -> list[bytes]:
        if not isinstance(reply, bytes):
            raise self._unavailable(op, TypeError(f"unexpected reply {type(reply).__name__}"))
        return reply.split()

    def _key(self, name: str) -> str:
        return self.prefix + name

    # -- GCRA -------------------------------------------------------------------------------------
    async def acquire(self, charges: Sequence[Charge], *, dry_run: bool = False) -> Decision:
        if not charges:
            return Decision(True)
        keys = [self._key(c.bucket) for c in charges]
        words = ["1" if dry_run else "0"]
        for c in charges:
            words += (repr(c.tier.interval), str(c.tier.capacity), str(c.amount))
        reply = await self._eval("acquire", self._acquire, keys, [" ".join(words)])
        return self._decision(charges, self._words("acquire", reply))

    @staticmethod
    def _decision(charges: Sequence[Charge], r: list[bytes]) -> Decision:
        """The Decision in the words of acquire's reply (``r[0]``: 1 allowed, 0 denied)."""
        if r[0] == b"0":
            index = int(r[1])
            denied = charges[index]
            return Decision(
                False,
                key=denied.key,
                tier_id=denied.tier.id,
                index=index,
                measured=int(float(r[2])),
                limit=int(float(r[3])),
                retry_after=float(r[4]),
                reset_after=float(r[5]),
                never=r[6] == b"1",
            )
        return Decision(
            True,
            remaining=tuple(
                Remaining(c.key, c.tier.id, int(float(r[1 + 2 * i])), float(r[2 + 2 * i]))
                for i, c in enumerate(charges)
            ),
        )

    async def admit(
        self,
        charges: Sequence[Charge],
        distinct: Sequence[DistinctCharge] = (),
        *,
        dry_run: bool = False,
    ) -> Admission:
        check_admission(distinct)
        if not distinct:  # the same call, as one script: acquire's
            decision = await self.acquire(charges, dry_run=dry_run)
            return Admission(decision if not decision.allowed else _ALLOWED)
        hashed = [hashed_members(d.key, d.members) for d in distinct]
        keys = [self._key(c.bucket) for c in charges]
        keys += [self._key(distinct_name(d.key)) for d in distinct]
        words = ["1" if dry_run else "0", str(len(charges))]
        for c in charges:
            words += (repr(c.tier.interval), str(c.tier.capacity), str(c.amount))
        sets = " ".join(
            f"{float(d.window)!r} {-1 if d.limit is None else d.limit} {len(h)}"
            for d, h in zip(distinct, hashed, strict=True)
        )
        members = [m for h in hashed for m in h]
        reply = await self._eval("admit", self._admit, keys, [" ".join(words), sets, *members])
        r = self._words("admit", reply)
        if r[0] == b"0":
            return Admission(self._decision(charges, r))
        counts = r[1:]
        return Admission(
            _ALLOWED,
            tuple(
                DistinctResult(int(float(counts[i])), counts[i + 1] == b"1", int(counts[i + 2]))
                for i in range(0, len(counts), 3)
            ),
        )

    async def refund(self, charges: Sequence[Charge]) -> None:
        if not charges:
            return
        keys = [self._key(c.bucket) for c in charges]
        words = " ".join(f"{c.tier.interval!r} {c.amount}" for c in charges)
        await self._eval("refund", self._refund, keys, [words])

    async def usage(self, key: str, tiers: Sequence[Tier]) -> list[TierUsage]:
        check_key(key)
        keys = [self._key(bucket_name(key, tier.id)) for tier in tiers]
        r = self._list("usage", await self._eval("usage", self._usage, keys, []))
        now = int(r[0]) + int(r[1]) / 1000000
        out = []
        for tier, raw in zip(tiers, r[2:], strict=True):
            level = 0.0
            if raw:
                parts = bytes(raw).split()
                if len(parts) == 2:
                    level = gcra.drained(float(parts[0]), float(parts[1]), now, tier.interval)
            out.append(
                TierUsage(
                    tier.id,
                    gcra.used(level),
                    tier.capacity,
                    gcra.remaining(level, tier.capacity),
                    level * tier.interval,
                )
            )
        return out

    async def reset(self, key_prefix: str) -> int:
        pattern = _glob_escape(self.prefix + key_prefix) + "*"
        cut = len(self.prefix)

        async def scan_and_unlink() -> int:
            deleted = 0
            batch: list[bytes] = []
            async for raw in self._redis.scan_iter(match=pattern, count=1000):
                if matches_prefix(bytes(raw)[cut:].decode("utf-8", "replace"), key_prefix):
                    batch.append(bytes(raw))
                if len(batch) >= 500:
                    deleted += int(await self._redis.unlink(*batch))
                    batch = []
            if batch:
                deleted += int(await self._redis.unlink(*batch))
            return deleted

        return await self._call("reset", scan_and_unlink)

    # -- distinct members -------------------------------------------------------------------------
    async def distinct(
        self,
        key: str,
        members: Sequence[str],
        window: float,
        *,
        limit: int | None = None,
        dry_run: bool = False,
    ) -> DistinctResult:
        name = distinct_name(key)
        window = check_window(window)
        check_limit(limit)
        hashes = hashed_members(key, members)
        args: list[Any] = [repr(window), -1 if limit is None else limit, "1" if dry_run else "0"]
        keys = [self._key(name)]
        reply = await self._eval("distinct", self._distinct, keys, args + hashes)
        r = self._list("distinct", reply)
        return DistinctResult(int(r[0]), bool(r[1]), int(r[2]))

    # -- counters and flags -----------------------------------------------------------------------
    async def incr(self, key: str, amount: int, window: float) -> int:
        name = counter_name(key)
        check_amount(amount, "counter amount")
        window = check_window(window)
        keys, args = [self._key(name)], [amount, _ms(window)]
        result: Any = await self._eval("incr", self._incr, keys, args)
        return int(result)

    async def get(self, key: str) -> int:
        name = counter_name(key)
        value: Any = await self._call("get", lambda: self._redis.get(self._key(name)))
        return int(value) if value is not None else 0

    async def set_flag(self, key: str, ttl: float) -> None:
        name = flag_name(key)
        ttl = check_window(ttl, "flag ttl")
        await self._call("set_flag", lambda: self._redis.set(self._key(name), b"1", px=_ms(ttl)))

    async def get_flag(self, key: str) -> float | None:
        name = flag_name(key)
        ms: Any = await self._call("get_flag", lambda: self._redis.pttl(self._key(name)))
        ms = int(ms)
        if ms == -2:
            return None
        return math.inf if ms < 0 else ms / 1000

    # -- diagnostics ------------------------------------------------------------------------------
    async def inspect(self) -> dict[str, StoredEntry]:
        """Every key under this store's prefix by name (prefix removed), with its PTTL and stored
        bytes (tests, debugging; SCANs the keyspace: not for the hot path)."""
        cut = len(self.prefix)

        async def scan() -> dict[str, StoredEntry]:
            out: dict[str, StoredEntry] = {}
            async for raw in self._redis.scan_iter(match=_glob_escape(self.prefix) + "*"):
                rkey = bytes(raw)
                name = rkey[cut:].decode("utf-8", "replace")
                kind = kind_of(name)
                ms = int(await self._redis.pttl(rkey))
                if ms == -2:
                    continue
                if kind == "distinct":
                    members: list[Any] = await self._redis.zrange(rkey, 0, -1)
                    data = b"".join(members)
                else:
                    value: Any = await self._redis.get(rkey)
                    data = value if value is not None else b""
                out[name] = StoredEntry(kind, math.inf if ms < 0 else ms / 1000, data)
            return out

        return await self._call("inspect", scan)

    # -- lifecycle --------------------------------------------------------------------------------
    async def ping(self) -> None:
        await self._call("ping", lambda: self._redis.ping())

    async def close(self) -> None:
        self._closed = True
        while self._pending:
            request = self._pending.popleft()
            _settle(request, LimitStoreUnavailable(f"limit store {self._where}: closed"))
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(RedisError, OSError):  # a dead connection: nothing to release
            await self._redis.aclose()
