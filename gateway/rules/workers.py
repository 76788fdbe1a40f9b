"""Spam-scan worker processes: the CPU-heavy rule scan off the event loop, on the other cores.

What it does: :class:`ScanWorkers` runs N worker processes (``multiprocessing``, ``spawn`` context:
a fresh interpreter, never a fork of the running gateway with its threads, sockets and event loop),
like rspamd's and spamd's scanner children. Each worker holds its own
:class:`~gateway.rules.RuleEngine`, built from the :class:`~gateway.rules.RuleSet` it is sent once
at start, and scans one message at a time: request (id, recipients, login, with_fingerprint, then
the message bytes) → reply (a :class:`~gateway.rules.Result`, :class:`MessageTooComplex`, or a
failure). The engine lives in the worker's main function; there is no module-level state.

The parent side is asyncio-native and cheap per message: one Unix socketpair per worker,
non-blocking, read with ``loop.add_reader`` and written with one ``sendmsg`` (``add_writer`` only
while the socket buffer is full, e.g. for a large message); no threads, no executor. The worker side
is a plain blocking :class:`multiprocessing.connection.Connection` (the same framing: a 4-byte
big-endian length, or -1 and an 8-byte length). A scan goes to the least-busy worker; at most
``max_inflight`` requests are queued per worker (so the next message is already waiting when a
worker finishes one); beyond that, scans wait in order for a free slot. Replies are matched by id.

Workers start lazily, at the first scan: building a pipeline only to validate a configuration
starts no process. Start-up (a new interpreter, imports, rebuilding the rule set's regexes and the
engine) takes a fraction of a second; the first scans wait for it within the check's timeout.

Failures (never fail open: every failure is :class:`~gateway.core.errors.CheckFailed` or a
timeout, so the check's ``on_error`` applies, 451 by default):

* A worker that dies (crash, ``kill -9``): its in-flight scans fail and it is replaced at once; a
  worker that died within :data:`STABLE_AFTER` seconds of its start is replaced after a back-off
  (0.5 s doubling to 30 s), so a message that kills workers cannot make the gateway spin.
* A scan whose caller gives up (the pipeline's timeout, a client that hung up) is *abandoned*: its
  answer is dropped. A worker busy with an abandoned scan gets ``abandon_grace`` more seconds to
  finish it, then it is killed (SIGKILL) and replaced: a pathological message cannot wedge a worker,
  and a client that drops the connection mid-scan costs no restart.
* A worker not ready within ``start_timeout`` is killed and replaced (with the back-off).
* :meth:`ScanWorkers.close`: no new scans; in-flight ones get ``grace`` seconds; then each worker
  reads end-of-file, exits and is reaped (killed after 2 s). Without ``close()``: a worker exits by
  itself when its socket reaches end-of-file (the gateway died, or dropped the ScanWorkers: a
  finalizer then also kills and reaps what is left); workers are daemon processes.

Entry scripts: ``spawn`` imports the parent's ``__main__`` module in each worker (multiprocessing's
rule), so a script that runs the gateway must guard its top-level code with
``if __name__ == "__main__":`` (the ``mailward`` console script does).

Reads: the rule set and the messages and envelopes it is given. Writes: nothing but the log
(worker starts, deaths, kills: pids, exit codes, durations).

Security notes: message bytes and envelopes cross only the private socketpair to the workers this
object spawned (same user; the parent's ends are not inheritable). Frames are pickles, exchanged
only between the gateway and its own workers. A failing scan is reported by exception type and code
location, never with the exception's text (which could quote message content); nothing here logs
message content. Workers ignore SIGINT and SIGTERM: their lifetime is the gateway's (a stop signal
sent to the whole service does not kill the scans the gateway is still draining).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import logging
import multiprocessing
import os
import pickle
import re
import signal
import socket
import struct
import time
import traceback
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from gateway.core.errors import CheckFailed
from gateway.rules.engine import RuleEngine
from gateway.rules.loader import _compile_lowered
from gateway.rules.mime import MessageTooComplex
from gateway.rules.model import Pattern, Result, RuleSet, SpamAction, SymbolHit

log = logging.getLogger("mailward.rules.workers")

#: requests queued per worker (the one it scans and the next ones, already in its socket)
MAX_INFLIGHT = 4
#: a worker up for this long is "stable": if it dies, it is replaced without a back-off
STABLE_AFTER = 10.0
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
#: how long a stopping worker may take to exit before it is killed
EXIT_WAIT = 2.0

_PROTOCOL = pickle.HIGHEST_PROTOCOL
_HEADER = struct.Struct("!i")
_LONG_HEADER = struct.Struct("!Q")
#: bytes read per readable event, into a buffer each worker keeps: a fresh 256 KiB ``recv()``
#: buffer per reply would be allocated with mmap and freed again every time (~12 us per reply)
_RECV_SIZE = 256 * 1024

# reply kinds
_READY = 0  # (0, _READY, None): the engine is built, requests are served from now on
_OK = 1  # payload: (score, ((id, score, mode, detail), ...), action, fingerprint)
_TOO_COMPLEX = 2  # payload: MessageTooComplex.reason
_FAILED = 3  # payload: "ExceptionType at file.py:123 in function"


# --- the rule set across the process boundary ----------------------------------------------------


def _rebuild_pattern(
    regex: re.Pattern[str], prefilter: Any, literals_lower: bool, width: int | None
) -> Pattern:
    """A Pattern whose ``lowered`` twin is compiled again (it is built from a parse tree, so the
    compiled object has no source text and cannot be pickled itself)."""
    return Pattern(regex, _compile_lowered(regex.pattern), prefilter, literals_lower, width)


class _RuleSetPickler(pickle.Pickler):
    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is Pattern and obj.lowered is not None:
            return _rebuild_pattern, (obj.regex, obj.prefilter, obj.literals_lower, obj.width)
        return NotImplemented


def dump_ruleset(ruleset: RuleSet) -> bytes:
    """The rule set as bytes a worker can load (:func:`load_ruleset`)."""
    buf = io.BytesIO()
    _RuleSetPickler(buf, protocol=_PROTOCOL).dump(ruleset)
    return buf.getvalue()


def load_ruleset(data: bytes) -> RuleSet:
    ruleset = pickle.loads(data)  # noqa: S301 - from the gateway that spawned this worker
    if not isinstance(ruleset, RuleSet):
        raise TypeError(f"not a rule set: {type(ruleset).__name__}")
    return ruleset


# --- the worker process ----------------------------------------------------------------------------


def _where(exc: BaseException) -> str:
    """The exception's type and innermost code location, without its text."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return type(exc).__name__
    last = frames[-1]
    return f"{type(exc).__name__} at {os.path.basename(last.filename)}:{last.lineno} in {last.name}"


def _encode(result: Result) -> tuple[Any, ...]:
    symbols = tuple((s.id, s.score, s.mode, s.detail) for s in result.symbols)
    return (result.score, symbols, result.action.value, result.fingerprint)


def _decode(payload: tuple[Any, ...]) -> Result:
    score, symbols, action, fingerprint = payload
    return Result(score, tuple(SymbolHit(*s) for s in symbols), SpamAction(action), fingerprint)


def worker_main(conn: Connection) -> None:
    """A worker's life: load the rule set, build the engine, then scan until end-of-file."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        engine = RuleEngine(load_ruleset(conn.recv_bytes()))
        conn.send_bytes(pickle.dumps((0, _READY, None), _PROTOCOL))
        while True:
            meta = conn.recv_bytes()
            message = conn.recv_bytes()
            req_id, recipients, login, with_fingerprint = pickle.loads(meta)  # noqa: S301
            reply: tuple[int, int, Any]
            try:
                result = engine.scan(
                    message,
                    recipients=recipients,
                    login=login,
                    with_fingerprint=with_fingerprint,
                )
                reply = (req_id, _OK, _encode(result))
            except MessageTooComplex as exc:
                reply = (req_id, _TOO_COMPLEX, exc.reason)
            except Exception as exc:  # reported to the gateway, which applies on_error
                reply = (req_id, _FAILED, _where(exc))
            del message, meta
            conn.send_bytes(pickle.dumps(reply, _PROTOCOL))
    except (EOFError, BrokenPipeError, ConnectionResetError):
        return  # the gateway closed our socket (close(), or it died): stop
    finally:
        conn.close()


# --- the parent side -------------------------------------------------------------------------------


def _frame_header(n: int) -> bytes:
    if n > 0x7FFFFFFF:
        return _HEADER.pack(-1) + _LONG_HEADER.pack(n)
    return _HEADER.pack(n)


class _Pending:
    """One request in a worker's queue; ``future`` is None once the caller gave up (abandoned)."""

    __slots__ = ("future", "id")

    def __init__(self, req_id: int, future: asyncio.Future[Result] | None) -> None:
        self.id = req_id
        self.future = future


class _Worker:
    __slots__ = (
        "alive",
        "fd",
        "inbuf",
        "inflight",
        "out",
        "process",
        "ready",
        "recvbuf",
        "slot",
        "sock",
        "started",
        "watchdog",
    )

    def __init__(self, slot: int, process: BaseProcess, sock: socket.socket) -> None:
        self.slot = slot
        self.process = process
        self.sock = sock
        self.fd = sock.fileno()
        self.started = time.monotonic()
        self.ready = False
        self.alive = True
        self.inflight: dict[int, _Pending] = {}  # in the order sent (= the order scanned)
        self.out: deque[memoryview] = deque()  # bytes not yet written
        self.inbuf = bytearray()  # an incomplete reply frame
        self.recvbuf = memoryview(bytearray(_RECV_SIZE))  # what one read receives into
        self.watchdog: asyncio.TimerHandle | None = None

    @property
    def head(self) -> _Pending | None:
        """The request the worker is scanning now (its queue is first in, first out)."""
        for pending in self.inflight.values():
            return pending
        return None


def _kill_processes(processes: dict[int, BaseProcess]) -> None:
    """Finalizer: kill and reap workers left running (a ScanWorkers dropped without close())."""
    for proc in list(processes.values()):
        with contextlib.suppress(Exception):  # best effort, at garbage collection or at exit
            if proc.is_alive():
                proc.kill()
            proc.join(1.0)
    processes.clear()


def default_count() -> int:
    """One worker per CPU this process may run on, minus one for the event loop; at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return max(1, cpus - 1)


class ScanWorkers:
    """N worker processes scanning with one rule set (see the module docstring)."""

    def __init__(
        self,
        ruleset: RuleSet,
        count: int,
        *,
        max_inflight: int = MAX_INFLIGHT,
        abandon_grace: float = 1.0,
        start_timeout: float = 60.0,
    ) -> None:
        if count < 1:
            raise ValueError("count must be at least 1")
        if max_inflight < 1:
            raise ValueError("max_inflight must be at least 1")
        self.ruleset = ruleset
        self.count = count
        self.max_inflight = max_inflight
        self.abandon_grace = abandon_grace
        self.start_timeout = start_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ruleset_frame: bytes | None = None
        self._workers: list[_Worker | None] = [None] * count
        self._backoff = [0.0] * count
        self._restarts: list[asyncio.TimerHandle | None] = [None] * count
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._ids = itertools.count(1)
        self._closing = False
        self._changed: asyncio.Future[None] | None = None  # close() waits on it
        self._processes: dict[int, BaseProcess] = {}  # every started, not yet reaped process
        self._finalizer = weakref.finalize(self, _kill_processes, self._processes)

    # -- public -------------------------------------------------------------------------------------

    @property
    def pids(self) -> list[int]:
        """The pids of the running workers (ready or starting)."""
        return [w.process.pid for w in self._workers if w is not None and w.process.pid]

    @property
    def closed(self) -> bool:
        """close() was called: scans are refused from now on."""
        return self._closing

    @property
    def inflight(self) -> int:
        """Requests sent to workers and not yet answered (abandoned ones included)."""
        return sum(len(w.inflight) for w in self._workers if w is not None)

    async def scan(
        self,
        message: bytes,
        *,
        recipients: Sequence[str],
        login: str | None,
        with_fingerprint: bool = False,
    ) -> Result:
        """Scan in a worker. Raises MessageTooComplex as the engine does, CheckFailed when no
        worker could answer (it died, was killed, the workers are closed)."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self._loop is not None:
                raise CheckFailed("spam scan workers belong to another event loop")
            self._loop = loop
        if self._closing:
            raise CheckFailed("spam scan workers are closed")
        if self._ruleset_frame is None:
            self._ruleset_frame = dump_ruleset(self.ruleset)
            for slot in range(self.count):
                self._start(slot)
        worker = None if self._waiters else self._pick()
        if worker is None:
            worker = await self._wait_for_slot(loop)
        future: asyncio.Future[Result] = loop.create_future()
        pending = _Pending(next(self._ids), future)
        worker.inflight[pending.id] = pending
        meta = pickle.dumps((pending.id, tuple(recipients), login, with_fingerprint), _PROTOCOL)
        self._send(worker, meta, message)  # a dead worker fails the future at once
        try:
            return await future
        except asyncio.CancelledError:
            self._abandon(worker, pending)
            raise

    async def close(self, grace: float = 10.0) -> None:
        """Stop: refuse new scans, let in-flight ones finish (up to ``grace`` seconds), then stop
        every worker and reap it (a worker that does not exit within 2 s is killed)."""
        if self._closing:
            return
        self._closing = True
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(CheckFailed("spam scan workers are closed"))
        for i, handle in enumerate(self._restarts):
            if handle is not None:
                handle.cancel()
                self._restarts[i] = None
        if self._loop is None:  # never started
            self._finalizer()
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await self._until(lambda: not self.inflight)
        for w in self._workers:
            if w is not None:
                with contextlib.suppress(OSError):
                    w.sock.shutdown(socket.SHUT_WR)  # the worker reads end-of-file and exits
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(EXIT_WAIT):
                await self._until(lambda: not self._processes)
        for w in self._workers:
            if w is not None:
                self._lose(w, "the spam scan workers were closed", kill=True)
        self._finalizer()  # kills and reaps whatever is left

    async def _until(self, done: Callable[[], bool]) -> None:
        """Wait (while closing) until ``done()``; re-checked whenever a worker answers or ends."""
        assert self._loop is not None
        while not done():
            self._changed = self._loop.create_future()
            await self._changed

    def _notify(self) -> None:
        changed = self._changed
        if changed is not None and not changed.done():
            changed.set_result(None)

    # -- dispatch -----------------------------------------------------------------------------------

    def _pick(self) -> _Worker | None:
        best: _Worker | None = None
        for w in self._workers:
            if w is None or len(w.inflight) >= self.max_inflight:
                continue
            if best is None or len(w.inflight) < len(best.inflight):
                best = w
        return best

    async def _wait_for_slot(self, loop: asyncio.AbstractEventLoop) -> _Worker:
        first = False  # a woken waiter that finds no slot keeps its place at the front
        while True:
            waiter: asyncio.Future[None] = loop.create_future()
            if first:
                self._waiters.appendleft(waiter)
            else:
                self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake()  # we were given a slot we will not use: pass it on
                else:
                    with contextlib.suppress(ValueError):  # _wake may have dropped it already
                        self._waiters.remove(waiter)
                raise
            worker = self._pick()
            if worker is not None:
                return worker
            first = True

    def _wake(self) -> None:
        """Wake as many waiting scans as there are free slots."""
        if not self._waiters:
            return
        free = sum(
            self.max_inflight - len(w.inflight)
            for w in self._workers
            if w is not None and len(w.inflight) < self.max_inflight
        )
        while free > 0 and self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                free -= 1

    def _abandon(self, worker: _Worker, pending: _Pending) -> None:
        pending.future = None
        if worker.alive and worker.ready and worker.head is pending:
            self._watch(worker)

    # -- the workers' lives -------------------------------------------------------------------------

    def _start(self, slot: int) -> None:
        self._restarts[slot] = None
        if self._closing:
            return
        loop = self._loop
        assert loop is not None and self._ruleset_frame is not None
        parent, child = socket.socketpair()
        conn = Connection(child.detach())
        began = time.perf_counter()
        try:
            process = multiprocessing.get_context("spawn").Process(
                target=worker_main, args=(conn,), name=f"mailward-scan-{slot}", daemon=True
            )
            process.start()
        except Exception as exc:
            parent.close()
            log.error("spam scan worker %d could not be started: %s", slot, exc)
            self._schedule_restart(slot, failed=True)
            return
        finally:
            conn.close()  # the worker has its own copy
        assert process.pid is not None
        self._processes[process.pid] = process
        parent.setblocking(False)
        worker = _Worker(slot, process, parent)
        self._workers[slot] = worker
        loop.add_reader(worker.fd, self._on_readable, worker)
        worker.watchdog = loop.call_later(self.start_timeout, self._start_overdue, worker)
        log.debug(
            "spam scan worker %d starting, pid %d (%.1f ms on the loop)",
            slot,
            process.pid,
            (time.perf_counter() - began) * 1000,
        )
        self._send(worker, self._ruleset_frame)
        self._wake()

    def _schedule_restart(self, slot: int, *, failed: bool) -> None:
        if self._closing:
            return
        loop = self._loop
        assert loop is not None
        delay = min(BACKOFF_MAX, max(BACKOFF_FIRST, self._backoff[slot] * 2)) if failed else 0.0
        self._backoff[slot] = delay
        if delay:
            log.warning("spam scan worker %d: replaced in %.1f s (back-off)", slot, delay)
            self._restarts[slot] = loop.call_later(delay, self._start, slot)
        else:
            self._start(slot)

    def _lose(self, worker: _Worker, reason: str, *, kill: bool = False) -> None:
        """The worker is gone (or is killed now): fail its scans, reap it, replace it."""
        if not worker.alive:
            return
        worker.alive = False
        loop = self._loop
        assert loop is not None
        loop.remove_reader(worker.fd)
        if worker.out:
            loop.remove_writer(worker.fd)
            worker.out.clear()
        if worker.watchdog is not None:
            worker.watchdog.cancel()
        worker.sock.close()
        process = worker.process
        if kill:
            process.kill()
        error = CheckFailed(f"spam scan worker {worker.slot} (pid {process.pid}): {reason}")
        for pending in worker.inflight.values():
            if pending.future is not None and not pending.future.done():
                pending.future.set_exception(error)
        worker.inflight.clear()
        if self._workers[worker.slot] is worker:
            self._workers[worker.slot] = None
        self._reap(process, loop.time() + EXIT_WAIT)
        if not self._closing:
            lived = time.monotonic() - worker.started
            if not kill:
                log.error("%s; uptime %.1f s", error, lived)
            self._schedule_restart(worker.slot, failed=lived < STABLE_AFTER)
        self._wake()
        self._notify()

    def _reap(self, process: BaseProcess, deadline: float) -> None:
        """Collect the exit status without blocking the loop (kill it after the deadline)."""
        loop = self._loop
        assert loop is not None
        if process.exitcode is None:
            if loop.time() >= deadline:
                process.kill()
            loop.call_later(0.02, self._reap, process, deadline)
            return
        self._processes.pop(process.pid or 0, None)
        process.close()
        self._notify()

    def _watch(self, worker: _Worker) -> None:
        """Give the worker ``abandon_grace`` seconds to finish the abandoned scan it is busy with."""
        loop = self._loop
        assert loop is not None
        head = worker.head
        if worker.watchdog is not None:
            worker.watchdog.cancel()
        worker.watchdog = (
            None
            if head is None
            else loop.call_later(self.abandon_grace, self._overdue, worker, head.id)
        )

    def _overdue(self, worker: _Worker, req_id: int) -> None:
        head = worker.head
        if worker.alive and head is not None and head.id == req_id and head.future is None:
            log.warning(
                "spam scan worker %d (pid %s) still busy %.1f s after its caller gave up on the "
                "scan: killed and replaced",
                worker.slot,
                worker.process.pid,
                self.abandon_grace,
            )
            self._lose(worker, "killed: a scan ran past its deadline", kill=True)

    def _start_overdue(self, worker: _Worker) -> None:
        if worker.alive and not worker.ready:
            log.error(
                "spam scan worker %d (pid %s) not ready after %.0f s: killed",
                worker.slot,
                worker.process.pid,
                self.start_timeout,
            )
            self._lose(worker, "killed: not ready in time", kill=True)

    # -- I/O ----------------------------------------------------------------------------------------

    def _send(self, worker: _Worker, *frames: bytes) -> None:
        buffers: list[bytes] = []
        for frame in frames:
            buffers.append(_frame_header(len(frame)))
            buffers.append(frame)
        if worker.out:
            worker.out.extend(memoryview(b) for b in buffers)
            return
        try:
            sent = worker.sock.sendmsg(buffers)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:  # EPIPE, ECONNRESET: it died
            self._lose(worker, f"exited unexpectedly ({exc.strerror or exc})")
            return
        if sent == sum(map(len, buffers)):  # all of it (the usual case)
            return
        for b in buffers:
            if sent >= len(b):
                sent -= len(b)
                continue
            worker.out.append(memoryview(b)[sent:])
            sent = 0
        if worker.out:
            loop = self._loop
            assert loop is not None
            loop.add_writer(worker.fd, self._on_writable, worker)

    def _on_writable(self, worker: _Worker) -> None:
        out = worker.out
        while out:
            try:
                sent = worker.sock.sendmsg(list(itertools.islice(out, 64)))
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._lose(worker, f"exited unexpectedly ({exc.strerror or exc})")
                return
            while sent and out:
                first = out[0]
                if sent >= len(first):
                    sent -= len(first)
                    out.popleft()
                else:
                    out[0] = first[sent:]
                    sent = 0
        loop = self._loop
        assert loop is not None
        loop.remove_writer(worker.fd)

    def _on_readable(self, worker: _Worker) -> None:
        try:
            data = bytes(worker.recvbuf[: worker.sock.recv_into(worker.recvbuf)])
        except (BlockingIOError, InterruptedError):
            return
        except ConnectionResetError:  # it died with requests unread
            data = b""
        except OSError as exc:
            self._lose(worker, f"cannot read from it: {exc.strerror or exc}", kill=True)
            return
        if not data:
            exitcode = worker.process.exitcode
            shown = "" if exitcode is None else f" (exit code {exitcode})"
            self._lose(worker, f"exited unexpectedly{shown}")
            return
        if worker.inbuf:
            worker.inbuf += data
            data = bytes(worker.inbuf)
            worker.inbuf.clear()
        pos, end = 0, len(data)
        head_before = worker.head
        while end - pos >= 4:
            (n,) = _HEADER.unpack_from(data, pos)
            skip = 4
            if n < 0:
                if end - pos < 12:
                    break
                (n,) = _LONG_HEADER.unpack_from(data, pos + 4)
                skip = 12
            if end - pos - skip < n:
                break
            start = pos + skip
            pos = start + n
            if not self._on_reply(worker, data[start:pos]):
                return
        if pos < end:
            worker.inbuf += data[pos:]
        head = worker.head
        if head is not head_before and worker.alive:
            if head is not None and head.future is None:
                self._watch(worker)  # the next one up was abandoned while it waited
            elif worker.watchdog is not None:
                worker.watchdog.cancel()
                worker.watchdog = None
        self._wake()
        self._notify()

    def _on_reply(self, worker: _Worker, frame: bytes) -> bool:
        """Deliver one reply; False when the worker was lost meanwhile."""
        try:
            req_id, kind, payload = pickle.loads(frame)  # noqa: S301 - from our own worker
        except Exception:
            self._lose(worker, "sent an unreadable reply", kill=True)
            return False
        if kind == _READY:
            worker.ready = True
            if worker.watchdog is not None:
                worker.watchdog.cancel()
                worker.watchdog = None
            log.info(
                "spam scan worker %d ready, pid %s (%.2f s)",
                worker.slot,
                worker.process.pid,
                time.monotonic() - worker.started,
            )
            head = worker.head
            if head is not None and head.future is None:
                self._watch(worker)
            return True
        pending = worker.inflight.pop(req_id, None)
        if pending is None:
            self._lose(worker, f"answered an unknown request {req_id}", kill=True)
            return False
        future = pending.future
        if future is None or future.done():
            return True  # abandoned: nobody waits for the answer
        if kind == _OK:
            future.set_result(_decode(payload))
        elif kind == _TOO_COMPLEX:
            future.set_exception(MessageTooComplex(payload))
        else:
            future.set_exception(
                CheckFailed(f"spam scan failed in worker {worker.slot}: {payload}")
            )
        return True
