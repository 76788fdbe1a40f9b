"""Capture upstream: a real SMTP server (aiosmtpd) that records what it receives and can misbehave.

What it does: :class:`CaptureUpstream` is the built-in upstream of ``mailward demo`` (every accepted
message is written to ``outbox_dir`` as ``<timestamp>-<queue id>.eml``) and the fake upstream MTA
of the test suite (like Mailman 3's test MTA). It speaks ESMTP with SIZE, 8BITMIME, SMTPUTF8,
optional STARTTLS, implicit TLS and AUTH PLAIN/LOGIN, and answers ``250 2.0.0 Ok: queued as <ID>``
after DATA.

Usage::

    up = CaptureUpstream(outbox_dir=Path("outbox"))
    await up.start()                  # in the running loop; up.port is then the bound port
    ...
    await up.stop()

    handle = CaptureUpstream().run_in_thread()   # own loop in a thread, for synchronous code
    handle.port; handle.upstream.messages; handle.stop()

Records (read them after the client got its reply):

- ``messages``: one :class:`Received` per accepted message -- envelope sender (``""`` for ``<>``),
  MAIL parameters, recipients, ``data`` (exactly the bytes received after dot-unstuffing, which is
  aiosmtpd's), peer, ``connection_id``, ``queue_id``, AUTH login, whether TLS was on, the .eml path.
- ``connections``: one :class:`ConnectionRecord` per accepted TCP connection (``id`` from 1,
  ``transactions`` accepted on it, the command verbs seen, whether QUIT came, whether it is closed);
  ``connections_opened`` and ``transactions_per_connection`` summarise them.

Fault injection (settable at any time, from any thread; takes effect at the next matching command):

- ``inject(command, fault)`` with ``command`` one of ``"BANNER"``, ``"EHLO"``, ``"MAIL"``,
  ``"RCPT"``, ``"DATA"`` (the 354 stage) and ``"EOM"`` (the reply after the data), and ``fault``
  built by:

  - ``reply("450 4.2.0 Busy")`` -- answer this line instead (at BANNER the connection is then
    closed; at EOM the message is not recorded); ``recipients={"bad@x"}`` limits a RCPT fault to
    those addresses;
  - ``drop()`` -- close the connection abruptly instead of answering (at EOM: after all the data
    arrived);
  - ``stall(seconds)`` -- wait, then behave normally (a client that gives up meanwhile is dropped);
  - ``drop_mid_data()`` -- DATA only: answer 354, read the first data line, then drop.

  Each fault fires ``times`` times (default once); ``times=None`` makes it persistent. Faults
  queued for one command fire in order. ``clear_faults()`` removes them all (and ``fail_rcpt`` /
  ``blackhole``).
- ``fail_rcpt = {"bad@x": "550 5.1.1 No such user"}`` -- persistent per-recipient RCPT replies.
- ``blackhole = True`` -- accept TCP connections but never send a banner.
- ``await refuse()`` / ``await resume()`` -- stop / restart listening on the same port (connections
  are then refused); ``await drop_connections()`` aborts every open connection.

Reads: the client's bytes; writes ``outbox_dir`` (files mode 0600, written to a dot-file then
renamed, so a reader never sees a partial message).

Security notes: a test and demo tool, not a production MTA: it binds 127.0.0.1 by default, keeps
every message in memory (``messages``) and accepts any envelope. Passwords in ``auth_users`` are
compared in constant time; aiosmtpd logs command lines on logger ``mail.log`` at INFO (with AUTH
arguments masked). Only ``gateway.smtp`` imports aiosmtpd.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import ssl
import threading
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, AnyStr, Literal, NoReturn, TypeVar, get_args

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, TLSSetupException, syntax
from aiosmtpd.smtp import Session as AioSession

log = logging.getLogger("mailward.capture")

T = TypeVar("T")

Command = Literal["BANNER", "EHLO", "MAIL", "RCPT", "DATA", "EOM"]
Action = Literal["reply", "drop", "stall", "drop_mid_data"]
COMMANDS: tuple[str, ...] = get_args(Command)

DEFAULT_MAX_MESSAGE_SIZE = 64 * 1024 * 1024
_START_DATA = "354 End data with <CR><LF>.<CR><LF>"
_DROP_MID_DATA_WAIT = 5.0


@dataclass(frozen=True)
class Fault:
    """One injected misbehaviour (build it with :func:`reply`, :func:`drop`, :func:`stall` or
    :func:`drop_mid_data`)."""

    action: Action
    text: str = ""
    seconds: float = 0.0
    times: int | None = 1
    recipients: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if self.times is not None and self.times < 1:
            raise ValueError("times must be at least 1 (or None: persistent)")


def reply(text: str, *, times: int | None = 1, recipients: Iterable[str] = ()) -> Fault:
    """Answer ``text`` (a full reply line such as ``"550 5.1.1 No such user"``) instead."""
    if len(text) < 3 or not text[:3].isdigit() or not "2" <= text[0] <= "5" or "\n" in text:
        raise ValueError(f"not a one-line SMTP reply: {text!r}")
    return Fault("reply", text=text, times=times, recipients=_lower_set(recipients))


def drop(*, times: int | None = 1) -> Fault:
    """Close the connection abruptly instead of answering."""
    return Fault("drop", times=times)


def stall(seconds: float, *, times: int | None = 1) -> Fault:
    """Wait ``seconds`` before handling the command normally."""
    return Fault("stall", seconds=seconds, times=times)


def drop_mid_data(*, times: int | None = 1) -> Fault:
    """DATA only: answer 354, read the first line of data, then close the connection."""
    return Fault("drop_mid_data", times=times)


def _lower_set(addresses: Iterable[str]) -> frozenset[str]:
    return frozenset(a.lower() for a in addresses)


@dataclass(frozen=True)
class Received:
    """One accepted message, exactly as received."""

    mail_from: str
    mail_options: tuple[str, ...]
    rcpt_tos: tuple[str, ...]
    data: bytes
    peer: tuple[str, int]
    connection_id: int
    queue_id: str
    rcpt_options: tuple[str, ...] = ()
    login: str | None = None
    tls: bool = False
    path: Path | None = None


@dataclass
class ConnectionRecord:
    """One accepted connection."""

    id: int
    peer: tuple[str, int]
    transactions: int = 0
    commands: list[str] = field(default_factory=list)
    tls: bool = False
    quit: bool = False
    closed: bool = False


@dataclass
class _Armed:
    fault: Fault
    remaining: int | None


class CaptureUpstream:
    """A recording, fault-injecting SMTP server (see the module docstring for the API)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        outbox_dir: Path | None = None,
        tls_context_for_starttls: ssl.SSLContext | None = None,
        implicit_tls_context: ssl.SSLContext | None = None,
        auth_users: dict[str, str] | None = None,
        smtputf8: bool = True,
        eightbitmime: bool = True,
        hostname: str = "capture.mailward.invalid",
        max_message_size: int | None = DEFAULT_MAX_MESSAGE_SIZE,
        auth_require_tls: bool = True,
        session_timeout: float = 300.0,
    ) -> None:
        self.host = host
        self.outbox_dir = outbox_dir
        self.tls_context_for_starttls = tls_context_for_starttls
        self.implicit_tls_context = implicit_tls_context
        self.auth_users = dict(auth_users) if auth_users else None
        self.smtputf8 = smtputf8
        self.eightbitmime = eightbitmime
        self.hostname = hostname
        self.max_message_size = max_message_size
        self.auth_require_tls = auth_require_tls
        self.session_timeout = session_timeout

        self.messages: list[Received] = []
        self.connections: list[ConnectionRecord] = []
        self.fail_rcpt: dict[str, str] = {}
        self.blackhole = False

        self._port = port
        self._lock = threading.Lock()
        self._faults: dict[str, list[_Armed]] = {}
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._live: set[_CaptureSMTP] = set()
        self._connection_ids = 0
        self._handler = _Handler(self)

    # --- state ------------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if not self._port:
            raise RuntimeError("CaptureUpstream is not started")
        return self._port

    @property
    def connections_opened(self) -> int:
        return len(self.connections)

    @property
    def transactions_per_connection(self) -> list[int]:
        return [c.transactions for c in self.connections]

    def reset(self) -> None:
        """Forget recorded messages and connections (faults are kept; ids keep counting)."""
        self.messages.clear()
        self.connections.clear()

    # --- faults -----------------------------------------------------------------------------------

    def inject(self, command: Command, fault: Fault) -> None:
        if command not in COMMANDS:
            raise ValueError(f"unknown command {command!r}; one of {', '.join(COMMANDS)}")
        if fault.action == "drop_mid_data" and command != "DATA":
            raise ValueError("drop_mid_data applies to DATA only")
        if fault.recipients and command != "RCPT":
            raise ValueError("recipients= applies to RCPT only")
        with self._lock:
            self._faults.setdefault(command, []).append(_Armed(fault, fault.times))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()
        self.fail_rcpt = {}
        self.blackhole = False

    def _take_fault(self, command: Command, address: str | None = None) -> Fault | None:
        with self._lock:
            armed = self._faults.get(command, [])
            for i, item in enumerate(armed):
                recipients = item.fault.recipients
                if recipients and (address is None or address.lower() not in recipients):
                    continue
                if item.remaining is not None:
                    item.remaining -= 1
                    if item.remaining <= 0:
                        del armed[i]
                return item.fault
        return None

    def _rcpt_failure(self, address: str) -> str | None:
        table = self.fail_rcpt
        if not table:
            return None
        wanted = address.lower()
        for key, text in table.items():
            if key.lower() == wanted:
                return text
        return None

    # --- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen in the running event loop; :attr:`port` is the bound port afterwards."""
        if self._server is not None:
            raise RuntimeError("CaptureUpstream is already started")
        self._loop = asyncio.get_running_loop()
        if self.outbox_dir is not None:
            self.outbox_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        await self._listen()
        log.info("capture upstream listening on %s:%d", self.host, self._port)

    async def _listen(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._protocol_factory, self.host, self._port, ssl=self.implicit_tls_context
        )
        if not self._port:
            self._port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stop listening and abort every open connection."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        await self.drop_connections()
        if server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 5.0)

    async def refuse(self) -> None:
        """Stop listening (new connections are refused); open connections stay."""
        server, self._server = self._server, None
        if server is not None:
            server.close()

    async def resume(self) -> None:
        """Listen again on the same port after :meth:`refuse`."""
        if self._server is None:
            await self._listen()

    async def drop_connections(self) -> None:
        """Abort every open connection (the clients see a reset)."""
        for protocol in list(self._live):
            _abort(protocol.transport)
        await asyncio.sleep(0)

    def run_in_thread(self, *, timeout: float = 10.0) -> CaptureThread:
        """Start in a new event loop on a daemon thread; returns a handle with ``stop()``."""
        loop = asyncio.new_event_loop()
        started = threading.Event()
        failure: list[BaseException] = []

        def main() -> None:
            asyncio.set_event_loop(loop)
            try:
                try:
                    loop.run_until_complete(self.start())
                except BaseException as exc:
                    failure.append(exc)
                    return
                finally:
                    started.set()
                loop.run_forever()
            finally:
                pending = asyncio.all_tasks(loop)
                for task in pending:
                    task.cancel()
                if pending:
                    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                loop.close()

        thread = threading.Thread(target=main, name="capture-upstream", daemon=True)
        thread.start()
        if not started.wait(timeout):
            raise RuntimeError("capture upstream did not start in time")
        if failure:
            thread.join(timeout)
            raise failure[0]
        return CaptureThread(self, loop, thread)

    # --- per connection ---------------------------------------------------------------------------

    def _protocol_factory(self) -> _CaptureSMTP:
        assert self._loop is not None
        return _CaptureSMTP(
            self,
            self._handler,
            data_size_limit=self.max_message_size,
            enable_SMTPUTF8=self.smtputf8,
            decode_data=False,
            hostname=self.hostname,
            ident="Mailward capture upstream",
            tls_context=self.tls_context_for_starttls,
            timeout=self.session_timeout,
            auth_required=self.auth_users is not None,
            auth_require_tls=self.auth_require_tls,
            authenticator=self._authenticate if self.auth_users is not None else None,
            loop=self._loop,
        )

    def _opened(self, protocol: _CaptureSMTP, peer: tuple[str, int], tls: bool) -> ConnectionRecord:
        self._connection_ids += 1
        record = ConnectionRecord(id=self._connection_ids, peer=peer, tls=tls)
        self.connections.append(record)
        self._live.add(protocol)
        return record

    def _authenticate(
        self, server: SMTP, session: AioSession, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        users = self.auth_users or {}
        if isinstance(data, LoginPassword):
            login = data.login.decode("utf-8", "replace")
            expected = users.get(login)
            if expected is not None and secrets.compare_digest(
                expected.encode("utf-8"), bytes(data.password)
            ):
                return AuthResult(success=True, auth_data=data)
        return AuthResult(success=False, handled=False)

    async def _accept(self, server: _CaptureSMTP, envelope: Envelope) -> str:
        """A message has arrived completely: record it (and write it out); the EOM reply."""
        session = server.session
        assert session is not None and server.record is not None
        data = bytes(envelope.original_content or b"")
        queue_id = secrets.token_hex(6).upper()
        path: Path | None = None
        if self.outbox_dir is not None:
            try:
                path = await asyncio.to_thread(_write_eml, self.outbox_dir, queue_id, data)
            except OSError as exc:
                log.warning("capture upstream could not store a message: %s", exc)
                return "451 4.3.0 Could not store the message"
        auth = session.auth_data
        mail_from = envelope.mail_from or ""
        self.messages.append(
            Received(
                mail_from="" if mail_from == "<>" else mail_from,
                mail_options=tuple(envelope.mail_options),
                rcpt_tos=tuple(envelope.rcpt_tos),
                data=data,
                peer=server.record.peer,
                connection_id=server.record.id,
                queue_id=queue_id,
                rcpt_options=tuple(envelope.rcpt_options),
                login=(
                    auth.login.decode("utf-8", "replace")
                    if isinstance(auth, LoginPassword)
                    else None
                ),
                tls=server.record.tls,
                path=path,
            )
        )
        server.record.transactions += 1
        return f"250 2.0.0 Ok: queued as {queue_id}"


def _abort(transport: asyncio.BaseTransport | None) -> None:
    """Close abruptly (no flush of pending output) when the transport can, else close."""
    if isinstance(transport, asyncio.WriteTransport):
        transport.abort()
    elif transport is not None:
        transport.close()


def _write_eml(directory: Path, queue_id: str, data: bytes) -> Path:
    """Write ``data`` to ``<directory>/<timestamp>-<queue_id>.eml`` atomically (tmp + rename)."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    final = directory / f"{stamp}-{queue_id}.eml"
    tmp = directory / f".{stamp}-{queue_id}.eml.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return final


class CaptureThread:
    """Handle of a :class:`CaptureUpstream` running in its own thread (see ``run_in_thread``)."""

    def __init__(
        self, upstream: CaptureUpstream, loop: asyncio.AbstractEventLoop, thread: threading.Thread
    ) -> None:
        self.upstream = upstream
        self._loop = loop
        self._thread = thread

    @property
    def port(self) -> int:
        return self.upstream.port

    def call(self, fn: Callable[[], Awaitable[T]], *, timeout: float = 10.0) -> T:
        """Run ``fn()`` (e.g. ``upstream.refuse``) on the server's loop and return its result."""

        async def run() -> T:
            return await fn()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout)

    def refuse(self) -> None:
        self.call(self.upstream.refuse)

    def resume(self) -> None:
        self.call(self.upstream.resume)

    def drop_connections(self) -> None:
        self.call(self.upstream.drop_connections)

    def stop(self, *, timeout: float = 10.0) -> None:
        if not self._thread.is_alive():
            return
        try:
            self.call(self.upstream.stop, timeout=timeout)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)

    def __enter__(self) -> CaptureThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _CaptureSMTP(SMTP):
    """aiosmtpd's protocol plus connection records, the banner faults and the DATA faults."""

    def __init__(self, owner: CaptureUpstream, handler: _Handler, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.owner = owner
        self.record: ConnectionRecord | None = None
        self._greeted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.record is None:
            peer = transport.get_extra_info("peername") or ("", 0)
            tls = transport.get_extra_info("sslcontext") is not None  # implicit TLS
            self.record = self.owner._opened(self, (str(peer[0]), int(peer[1])), tls)
        else:
            self.record.tls = True  # called again by aiosmtpd once STARTTLS completed

    def connection_lost(self, error: Exception | None) -> None:
        if self.record is not None:
            self.record.closed = True
        self.owner._live.discard(self)
        super().connection_lost(error)

    async def push(self, status: AnyStr) -> None:
        if not self._greeted:
            self._greeted = True
            await self._banner()
        await super().push(status)

    async def _banner(self) -> None:
        if self.owner.blackhole:
            await self.hang()
        fault = self.owner._take_fault("BANNER")
        if fault is None:
            return
        if fault.action == "reply":
            await super().push(fault.text)
            if self.transport is not None:
                self.transport.close()
            await self.hang()
        await self.apply(fault)

    async def hang(self) -> NoReturn:
        """Wait until the connection is lost (aiosmtpd then cancels this session's task)."""
        await self.loop.create_future()
        raise AssertionError("unreachable")  # pragma: no cover

    async def drop(self) -> NoReturn:
        _abort(self.transport)
        await self.hang()

    async def apply(self, fault: Fault) -> str | None:
        """Carry out ``fault``: the reply line to send instead, or None to proceed normally."""
        if fault.action == "reply":
            return fault.text
        if fault.action in ("drop", "drop_mid_data"):
            await self.drop()
        await asyncio.sleep(fault.seconds)
        return None

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        envelope = self.envelope
        if self.record is not None:
            self.record.commands.append("DATA")
        if envelope is not None and envelope.rcpt_tos and not arg:
            fault = self.owner._take_fault("DATA")
            if fault is not None and fault.action == "drop_mid_data":
                await self.push(_START_DATA)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._reader.readuntil(b"\r\n"), _DROP_MID_DATA_WAIT)
                await self.drop()
            if fault is not None:
                text = await self.apply(fault)
                if text is not None:
                    await self.push(text)
                    return
        await super().smtp_DATA(arg)


class _Handler:
    """aiosmtpd hooks: recording and the EHLO / MAIL / RCPT / EOM faults."""

    def __init__(self, owner: CaptureUpstream) -> None:
        self.owner = owner

    @staticmethod
    def _note(server: _CaptureSMTP, verb: str) -> None:
        if server.record is not None:
            server.record.commands.append(verb)

    async def handle_EHLO(
        self,
        server: _CaptureSMTP,
        session: AioSession,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        self._note(server, "EHLO")
        fault = self.owner._take_fault("EHLO")
        if fault is not None:
            text = await server.apply(fault)
            if text is not None:
                return [text]
        session.host_name = hostname
        drop_keywords = set()
        if not self.owner.eightbitmime:
            drop_keywords.add("8BITMIME")
        if self.owner.auth_users is None:
            drop_keywords.add("AUTH")
        kept = [r for r in responses if r[4:].split(" ")[0].upper() not in drop_keywords]
        # the last line must be "250 ..." and the others "250-..."
        return [("250-" if i < len(kept) - 1 else "250 ") + r[4:] for i, r in enumerate(kept)]

    async def handle_MAIL(
        self,
        server: _CaptureSMTP,
        session: AioSession,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        self._note(server, "MAIL")
        fault = self.owner._take_fault("MAIL")
        if fault is not None:
            text = await server.apply(fault)
            if text is not None:
                return text
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self,
        server: _CaptureSMTP,
        session: AioSession,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        self._note(server, "RCPT")
        failure = self.owner._rcpt_failure(address)
        if failure is not None:
            return failure
        fault = self.owner._take_fault("RCPT", address)
        if fault is not None:
            text = await server.apply(fault)
            if text is not None:
                return text
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Ok"

    async def handle_DATA(
        self, server: _CaptureSMTP, session: AioSession, envelope: Envelope
    ) -> str:
        fault = self.owner._take_fault("EOM")
        if fault is not None:
            text = await server.apply(fault)
            if text is not None:
                return text
        return await self.owner._accept(server, envelope)

    async def handle_exception(self, error: Exception) -> str:
        """aiosmtpd's hook for an exception in a session: log it (briefly for a failed TLS
        handshake, which clients cause on purpose in tests) and answer 451."""
        if isinstance(error, TLSSetupException):
            log.info("capture upstream: TLS handshake failed: %r", error.__cause__)
        else:
            log.warning("capture upstream session error", exc_info=error)
        return "451 4.3.0 Internal error"

    async def handle_RSET(
        self, server: _CaptureSMTP, session: AioSession, envelope: Envelope
    ) -> str:
        self._note(server, "RSET")
        return "250 2.0.0 Ok"

    async def handle_QUIT(
        self, server: _CaptureSMTP, session: AioSession, envelope: Envelope
    ) -> str:
        self._note(server, "QUIT")
        if server.record is not None:
            server.record.quit = True
        return "221 2.0.0 Bye"
