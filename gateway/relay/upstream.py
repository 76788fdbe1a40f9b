"""The upstream relay client: a pooled SMTP client to the ISP's MTA, implementing ``Relay``.

What it does: :class:`UpstreamRelay` keeps up to ``relay.pool_size`` SMTP connections to
``relay.host:port`` (plain, mandatory STARTTLS or implicit TLS; optional AUTH) and hands one to
each upstream transaction (:meth:`UpstreamRelay.begin` = MAIL FROM, then RCPT TO / DATA / RSET
through the returned :class:`UpstreamTransaction`). A caller waits for a free connection at most
``connect_timeout`` seconds. Connections are reused across messages, renewed after
``max_messages_per_connection`` messages, closed with QUIT after ``pool_idle_seconds`` idle (a
background reaper, plus a lazy check when a connection is taken), and discarded -- never reused --
after any connection-level failure. A pooled connection found dead at MAIL FROM (the upstream closed
it while idle) is replaced transparently, once: nothing of the message was sent yet.

Every aiosmtplib / socket / TLS exception is translated here into ``gateway.core.errors``:
refused / unreachable / TLS or AUTH failure / unusable greeting -> ``UpstreamUnreachable``; a
timeout -> ``UpstreamTimeout``; a connection lost during a transaction -> ``UpstreamDropped``; a
missing extension the message needs -> ``UpstreamRejected`` carrying the catalog reply. 4xx/5xx
replies to MAIL, RCPT and DATA are returned as :class:`UpstreamReply`, not raised.

DATA is sent by this module rather than ``aiosmtplib.SMTP.data`` so that the ``DATA`` command
uses ``command_timeout`` and only the reply after the message uses ``data_timeout``; the payload is
built by :func:`gateway.relay.wire.dot_stuff`.

Reads: ``[relay]`` (RelayConfig), the CA bundle (once), the network.

Security notes: this module is the only importer of aiosmtplib. The password is held in memory only,
handed to aiosmtplib's AUTH and never logged; message content and addresses are never logged
(connection events and failures are, on logger ``mailward.relay``). With ``tls = "starttls"`` an
upstream that does not offer STARTTLS is an error, never a silent plain-text fallback.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections import deque
from collections.abc import Coroutine
from typing import Any

import aiosmtplib

from gateway.config.schema import RelayConfig
from gateway.core import replies
from gateway.core.errors import (
    ConfigError,
    UpstreamDropped,
    UpstreamError,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from gateway.core.message import has_bare_newline_or_nul
from gateway.core.ports import UpstreamReply
from gateway.relay.wire import (
    AddressError,
    client_tls_context,
    dot_stuff,
    smtp_path,
)

log = logging.getLogger("mailward.relay")

#: Exceptions that mean "the connection (or its setup) failed"; all are translated at this boundary.
_TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    aiosmtplib.SMTPException,
    OSError,
    TimeoutError,
)
#: Upper bound for a polite QUIT when closing a connection we no longer need.
_QUIT_TIMEOUT = 5.0


class _Connection:
    """One upstream SMTP connection and its pool bookkeeping."""

    __slots__ = ("closed", "idle_since", "messages", "number", "reused", "smtp")

    def __init__(self, smtp: aiosmtplib.SMTP, number: int) -> None:
        self.smtp = smtp
        self.number = number
        self.messages = 0  # messages whose content was sent on this connection
        self.idle_since = 0.0
        self.reused = False  # has been in the idle pool at least once
        self.closed = False  # discarded or retired: no longer counted as usable

    @property
    def usable(self) -> bool:
        return not self.closed and self.smtp.is_connected


class UpstreamRelay:
    """The :class:`~gateway.core.ports.Relay` to the configured upstream MTA (see module doc)."""

    def __init__(self, config: RelayConfig, *, helo_name: str, password: str = "") -> None:
        helo = helo_name.strip() or socket.getfqdn()
        if not helo.isascii() or any(c.isspace() or not c.isprintable() for c in helo):
            raise ConfigError("", "relay.helo_name", "must be an ASCII host name without spaces")
        self._config = config
        self._helo = helo
        self._password = password
        self._tls: ssl.SSLContext | None = (
            client_tls_context(config) if config.tls != "none" else None
        )
        self._where = f"{config.host}:{config.port}"
        self._idle: list[_Connection] = []  # LIFO: the most recently used is taken first
        self._all: set[_Connection] = set()
        self._open = 0  # counted against pool_size: connecting, busy, idle and quitting
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._tasks: set[asyncio.Task[None]] = set()
        self._reaper: asyncio.Task[None] | None = None
        self._serial = 0
        self._closed = False
        if config.username and config.tls == "none":
            log.warning("relay AUTH without TLS: the credentials cross the network in clear")

    # --- introspection (tests, metrics) -------------------------------------------------------

    @property
    def open_connections(self) -> int:
        """Connections counted against ``pool_size`` (connecting, busy, idle or closing)."""
        return self._open

    @property
    def idle_connections(self) -> int:
        return len(self._idle)

    # --- Relay protocol -----------------------------------------------------------------------

    async def begin(
        self, mail_from: str, *, smtputf8: bool, body_8bitmime: bool, size: int | None
    ) -> tuple[UpstreamReply, UpstreamTransaction | None]:
        """MAIL FROM on a pooled connection; returns the reply and, if it was 2xx, the transaction.

        Raises UpstreamUnreachable / UpstreamTimeout / UpstreamDropped on connection failure (or
        when no connection frees up within ``connect_timeout``), UpstreamRejected when the message
        needs SMTPUTF8 or 8BITMIME and the upstream does not offer it.
        """
        try:
            path = smtp_path(mail_from, smtputf8=smtputf8)
        except AddressError as exc:
            raise _address_rejected(exc) from None
        for attempt in (1, 2):
            conn = await self._acquire()
            try:
                command = (
                    b"MAIL FROM:"
                    + path
                    + self._mail_parameters(
                        conn, smtputf8=smtputf8, body_8bitmime=body_8bitmime, size=size
                    )
                )
            except UpstreamRejected:
                self._release(conn)
                raise
            may_retry = conn.reused and attempt == 1
            try:
                reply = await self._command(conn, command, "MAIL FROM")
            except UpstreamDropped:
                if not may_retry:
                    raise
                log.info("upstream connection was stale at MAIL FROM; retrying on a new one")
                continue
            if reply.code == 421 and may_retry:
                self._discard(conn, "421 at MAIL FROM on a reused connection", level=logging.INFO)
                continue
            if 200 <= reply.code < 300:
                return reply, UpstreamTransaction(self, conn, smtputf8=smtputf8)
            await self._reset_and_release(conn)
            return reply, None
        raise AssertionError("unreachable")  # pragma: no cover

    async def close(self) -> None:
        """QUIT every idle connection, close the busy ones, refuse new transactions."""
        self._closed = True
        if self._reaper is not None:
            self._reaper.cancel()
        idle, self._idle = self._idle, []
        for conn in idle:
            self._retire(conn, "shutdown")
        for conn in list(self._all):
            if not conn.closed:
                self._discard(conn, "shutdown", level=logging.INFO)
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
        pending = [t for t in (*self._tasks, self._reaper) if t is not None]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        self._reaper = None

    # --- pool -----------------------------------------------------------------------------------

    async def _acquire(self) -> _Connection:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._config.connect_timeout
        while True:
            if self._closed:
                raise UpstreamUnreachable("the upstream relay client is closed")
            conn = self._take_idle(loop.time())
            if conn is not None:
                return conn
            if self._open < self._config.pool_size:
                self._open += 1
                try:
                    return await self._connect()
                except BaseException:
                    self._open -= 1
                    self._wake()
                    raise
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise self._pool_exhausted()
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, remaining)
            except TimeoutError:
                raise self._pool_exhausted() from None
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._wake()  # we were handed a slot but leave: pass it on
                raise
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    def _pool_exhausted(self) -> UpstreamUnreachable:
        return UpstreamUnreachable(
            f"all {self._config.pool_size} upstream connections stayed busy for "
            f"{self._config.connect_timeout:g}s"
        )

    def _take_idle(self, now: float) -> _Connection | None:
        while self._idle:
            conn = self._idle.pop()
            if not conn.usable:
                self._discard(conn, "closed by the upstream while idle", level=logging.INFO)
            elif now - conn.idle_since >= self._config.pool_idle_seconds:
                self._retire(conn, "idle")
            else:
                return conn
        return None

    def _release(self, conn: _Connection) -> None:
        """Give a connection back after a finished (or never started) transaction."""
        if conn.closed:
            return
        if self._closed:
            self._retire(conn, "shutdown")
        elif not conn.smtp.is_connected:
            self._discard(conn, "closed by the upstream", level=logging.INFO)
        elif conn.messages >= self._config.max_messages_per_connection:
            self._retire(conn, f"renewed after {conn.messages} messages")
        else:
            conn.idle_since = asyncio.get_running_loop().time()
            conn.reused = True
            self._idle.append(conn)
            self._ensure_reaper()
            self._wake()

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _discard(self, conn: _Connection, reason: str, *, level: int = logging.WARNING) -> None:
        """Close a connection at once (no QUIT) and free its slot. Idempotent."""
        if conn in self._idle:
            self._idle.remove(conn)
        if conn.closed:
            return
        conn.closed = True
        conn.smtp.close()
        self._all.discard(conn)
        self._open -= 1
        log.log(
            level,
            "upstream connection #%d to %s discarded (%s) after %d message(s)",
            conn.number,
            self._where,
            reason,
            conn.messages,
        )
        self._wake()

    def _retire(self, conn: _Connection, reason: str) -> None:
        """Close a healthy connection politely (QUIT, in the background); its slot frees after."""
        if conn in self._idle:
            self._idle.remove(conn)
        if conn.closed:
            return
        conn.closed = True
        self._spawn(self._quit(conn, reason))

    async def _quit(self, conn: _Connection, reason: str) -> None:
        try:
            if conn.smtp.is_connected:
                await conn.smtp.quit(timeout=min(self._config.command_timeout, _QUIT_TIMEOUT))
        except _TRANSPORT_ERRORS:
            pass  # closing anyway: a failed QUIT on a dying connection changes nothing
        finally:
            conn.smtp.close()
            self._all.discard(conn)
            self._open -= 1
            log.info(
                "upstream connection #%d to %s closed (%s) after %d message(s)",
                conn.number,
                self._where,
                reason,
                conn.messages,
            )
            self._wake()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _ensure_reaper(self) -> None:
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.get_running_loop().create_task(self._reap())

    async def _reap(self) -> None:
        """Close idle connections once they have been idle ``pool_idle_seconds``; ends when none."""
        loop = asyncio.get_running_loop()
        limit = self._config.pool_idle_seconds
        while self._idle and not self._closed:
            now = loop.time()
            for conn in list(self._idle):
                if not conn.usable:
                    self._discard(conn, "closed by the upstream while idle", level=logging.INFO)
                elif now - conn.idle_since >= limit:
                    self._retire(conn, "idle")
            if not self._idle:
                break
            oldest = min(c.idle_since for c in self._idle)
            await asyncio.sleep(max(oldest + limit - loop.time(), 0.01))

    # --- connection setup -----------------------------------------------------------------------

    async def _connect(self) -> _Connection:
        cfg = self._config
        self._serial += 1
        number = self._serial
        smtp = aiosmtplib.SMTP(
            hostname=cfg.host,
            port=cfg.port,
            local_hostname=self._helo,
            timeout=cfg.command_timeout,
            use_tls=cfg.tls == "implicit",
            start_tls=False,
            tls_context=self._tls,
        )
        stage = "connect"
        try:
            await smtp.connect(timeout=cfg.connect_timeout)
            stage = "EHLO"
            await smtp.ehlo()
            if cfg.tls == "starttls":
                if not smtp.supports_extension("starttls"):
                    raise UpstreamUnreachable(
                        f"upstream {self._where} does not offer STARTTLS "
                        "(relay.tls = starttls requires it)"
                    )
                stage = "STARTTLS"
                await smtp.starttls(server_hostname=cfg.host, timeout=cfg.connect_timeout)
                stage = "EHLO after STARTTLS"
                await smtp.ehlo()
            if cfg.username:
                if not smtp.supports_extension("auth"):
                    raise UpstreamUnreachable(f"upstream {self._where} does not offer AUTH")
                stage = "AUTH"
                await smtp.login(cfg.username, self._password)
        except BaseException as exc:
            smtp.close()
            if isinstance(exc, UpstreamError):
                log.warning("upstream connection to %s failed: %s", self._where, exc)
                raise
            if isinstance(exc, _TRANSPORT_ERRORS):
                error = self._translate(exc, stage, setup=True)
                log.warning("upstream connection to %s failed: %s", self._where, error)
                raise error from exc
            raise
        conn = _Connection(smtp, number)
        self._all.add(conn)
        cipher = smtp.get_transport_info("cipher") if cfg.tls != "none" else None
        log.info(
            "upstream connection #%d to %s opened (%s)",
            number,
            self._where,
            f"{cipher[1]} {cipher[0]}" if cipher else "no TLS",
        )
        return conn

    def _mail_parameters(
        self, conn: _Connection, *, smtputf8: bool, body_8bitmime: bool, size: int | None
    ) -> bytes:
        smtp = conn.smtp
        if smtputf8 and not smtp.supports_extension("smtputf8"):
            raise UpstreamRejected(
                f"upstream {self._where} does not offer SMTPUTF8",
                reply=replies.UPSTREAM_SMTPUTF8_UNSUPPORTED,
            )
        if body_8bitmime and not smtp.supports_extension("8bitmime"):
            raise UpstreamRejected(
                f"upstream {self._where} does not offer 8BITMIME",
                reply=replies.UPSTREAM_8BIT_UNSUPPORTED,
            )
        params = b""
        if size is not None and size >= 0 and smtp.supports_extension("size"):
            params += b" SIZE=%d" % size
        if body_8bitmime:
            params += b" BODY=8BITMIME"
        if smtputf8:
            params += b" SMTPUTF8"
        return params

    # --- commands -------------------------------------------------------------------------------

    async def _command(self, conn: _Connection, command: bytes, stage: str) -> UpstreamReply:
        """One command, one reply. On any failure the connection is discarded and the error is
        translated; a reply of any code is returned."""
        if not conn.usable:
            self._discard(conn, f"closed by the upstream before {stage}")
            raise UpstreamDropped(f"upstream {self._where} closed the connection before {stage}")
        try:
            response = await conn.smtp.execute_command(
                command, timeout=self._config.command_timeout
            )
        except BaseException as exc:
            self._discard(conn, f"{stage} failed")
            if isinstance(exc, _TRANSPORT_ERRORS):
                raise self._translate(exc, stage, setup=False) from exc
            raise
        return UpstreamReply.parse(response.code, response.message)

    async def _send_payload(self, conn: _Connection, payload: bytes) -> UpstreamReply:
        """After a 354: the dot-stuffed content and its terminator; the reply within
        ``data_timeout``."""
        protocol = conn.smtp.protocol
        try:
            if protocol is None or not conn.usable:
                raise aiosmtplib.SMTPServerDisconnected("Connection lost")
            protocol.write(payload)
            response = await protocol.read_response(timeout=self._config.data_timeout)
        except BaseException as exc:
            self._discard(conn, "end of data failed")
            if isinstance(exc, _TRANSPORT_ERRORS):
                raise self._translate(exc, "end of data", setup=False) from exc
            raise
        if response.code == 421:
            conn.smtp.close()  # "service closing transmission channel": never reuse
        return UpstreamReply.parse(response.code, response.message)

    async def _reset_and_release(self, conn: _Connection) -> None:
        """RSET, then back to the pool; a failing RSET discards the connection. Raises nothing
        but cancellation."""
        if not conn.usable:
            self._discard(conn, "closed by the upstream", level=logging.INFO)
            return
        try:
            response = await conn.smtp.execute_command(
                b"RSET", timeout=self._config.command_timeout
            )
        except _TRANSPORT_ERRORS as exc:
            self._discard(conn, f"RSET failed: {self._translate(exc, 'RSET', setup=False)}")
            return
        except BaseException:
            self._discard(conn, "RSET interrupted")
            raise
        if response.code != 250:
            self._discard(conn, f"RSET answered {response.code}")
            return
        self._release(conn)

    def _translate(self, exc: BaseException, stage: str, *, setup: bool) -> UpstreamError:
        where = self._where
        if isinstance(exc, aiosmtplib.SMTPConnectResponseError):
            text = _one_line(exc.message)
            return UpstreamUnreachable(
                f"upstream {where} refused the session: {exc.code} {text}",
                upstream_code=exc.code,
                upstream_text=text,
            )
        if isinstance(exc, TimeoutError):  # aiosmtplib's timeouts subclass it
            return UpstreamTimeout(f"upstream {where} timed out ({stage})")
        tls_error = exc if isinstance(exc, ssl.SSLError) else exc.__cause__
        if isinstance(tls_error, ssl.SSLError):  # STARTTLS raw, implicit TLS wrapped by aiosmtplib
            return UpstreamUnreachable(
                f"TLS with upstream {where} failed: "
                f"{tls_error.reason or tls_error.__class__.__name__}"
            )
        if isinstance(exc, aiosmtplib.SMTPConnectError):
            return UpstreamUnreachable(
                f"cannot connect to upstream {where}: {_one_line(exc.message)}"
            )
        lost: type[UpstreamError] = UpstreamUnreachable if setup else UpstreamDropped
        if isinstance(exc, aiosmtplib.SMTPResponseException):
            text = _one_line(exc.message)
            code = exc.code if 200 <= exc.code <= 599 else None
            return lost(
                f"upstream {where} answered {exc.code} {text} ({stage})",
                upstream_code=code,
                upstream_text=text,
            )
        if isinstance(exc, OSError):  # includes SMTPServerDisconnected, resets, refusals
            return lost(f"upstream {where} closed the connection ({stage})")
        return UpstreamUnreachable(f"upstream {where}: {stage} failed: {_one_line(str(exc))}")


class UpstreamTransaction:
    """One MAIL FROM .. DATA exchange on a pooled connection (see ``gateway.core.ports``).

    The connection goes back to the pool after :meth:`data` or :meth:`abort` (one of them must be
    called unless a method raised). Any exception from :meth:`rcpt` or :meth:`data` ends the
    transaction: the connection is already released (RSET) or discarded, :meth:`abort` is a no-op
    and further :meth:`rcpt` / :meth:`data` calls raise RuntimeError.
    """

    def __init__(self, relay: UpstreamRelay, conn: _Connection, *, smtputf8: bool) -> None:
        self._relay = relay
        self._conn: _Connection | None = conn
        self._smtputf8 = smtputf8

    def _current(self, what: str) -> _Connection:
        if self._conn is None:
            raise RuntimeError(f"{what} after the upstream transaction ended")
        return self._conn

    async def rcpt(self, address: str) -> UpstreamReply:
        """RCPT TO; a 4xx/5xx reply is returned. Raises UpstreamError on connection failure."""
        conn = self._current("RCPT")
        try:
            path = smtp_path(address, smtputf8=self._smtputf8)
        except AddressError as exc:
            self._conn = None
            await self._relay._reset_and_release(conn)
            raise _address_rejected(exc) from None
        try:
            return await self._relay._command(conn, b"RCPT TO:" + path, "RCPT TO")
        except BaseException:
            self._conn = None  # discarded by _command
            raise

    async def data(self, content: bytes) -> UpstreamReply:
        """DATA + content (CRLF lines, not dot-stuffed) + terminator; the final reply is returned
        (any code). Raises UpstreamError on connection failure or timeout."""
        conn = self._current("DATA")
        self._conn = None
        if has_bare_newline_or_nul(content):
            log.warning("message content has bare CR or LF; normalised to CRLF for the upstream")
        payload = dot_stuff(content)
        reply = await self._relay._command(conn, b"DATA", "DATA")
        if reply.code != 354:
            await self._relay._reset_and_release(conn)
            return reply
        reply = await self._relay._send_payload(conn, payload)
        conn.messages += 1
        self._relay._release(conn)
        return reply

    async def abort(self) -> None:
        """RSET and give the connection back (if healthy). Idempotent; raises nothing but
        cancellation."""
        conn, self._conn = self._conn, None
        if conn is not None:
            await self._relay._reset_and_release(conn)


def _address_rejected(exc: AddressError) -> UpstreamRejected:
    reply = replies.RECIPIENT_NOT_ASCII if exc.non_ascii else replies.MALFORMED_ADDRESS
    return UpstreamRejected(f"address cannot be relayed: {exc}", reply=reply)


def _one_line(text: str) -> str:
    return " ".join(text.split())
