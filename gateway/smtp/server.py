"""The aiosmtpd adapter: listeners, per-connection protocol, hooks → Gateway, reply translation.

What it does: :class:`GatewaySMTP` subclasses aiosmtpd's ``SMTP`` protocol to add what a submission
server needs and aiosmtpd lacks: admission (connection limits, 421 before the banner), a 421 4.4.2
before closing on idle/data timeouts (aiosmtpd closes silently), the timer suspended while our hooks
work (a slow upstream is not the client's idle time), TLS facts for the audit, and one translation
boundary: every line aiosmtpd itself would send is mapped to its catalog Reply (with an enhanced
status code) in :meth:`GatewaySMTP.push`; an unexpected exception becomes 451 4.3.0 with an incident
id (aiosmtpd's default would put the exception text on the wire). :class:`SmtpHandler` holds the
aiosmtpd hooks and AUTH mechanisms and calls the protocol-independent Gateway.

Shutdown: once ``ServerContext.closing`` is set, a new connection gets ``421 4.3.2`` instead of the
banner and is closed; a session with no transaction open and no hook running is closed with that
421 (:meth:`GatewaySMTP.close_if_idle`, and after the reply that ends its transaction), so sessions
in the middle of a transaction finish it first; :meth:`GatewaySMTP.shut_down` ends the rest when
the grace is over.

Reads: the listener/SMTP settings it is given, the client's bytes.

Security notes: AUTH is offered and accepted only under TLS (538 5.7.11 otherwise); credentials are
decoded here, handed to the Gateway and not kept; a failed authenticator returns ``handled=False`` with
a message so aiosmtpd answers at once (``handled=True`` without a reply would hang the client). Only
this package imports aiosmtpd.
"""

from __future__ import annotations

import asyncio
import binascii
import collections
import contextlib
import logging
import re
import ssl
from base64 import b64decode
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope
from aiosmtpd.smtp import Session as AioSession

from gateway.core import replies
from gateway.core.model import Session, Stage, new_id
from gateway.core.replies import Reply
from gateway.service import Exchange, Gateway

log = logging.getLogger("mailward.smtp")

_ENHANCED = re.compile(r"^[245]\d\d [245]\.\d{1,3}\.\d{1,3} ")

# aiosmtpd's own reply lines → our catalog. Exact lines first, then prefixes.
_EXACT: dict[str, Reply] = {
    "500 Command line too long": replies.COMMAND_LINE_TOO_LONG,
    "500 Error: bad syntax": replies.SYNTAX_ERROR,
    "500 Error: strict ASCII mode": replies.NON_ASCII_COMMAND,
    "530 Must issue a STARTTLS command first": replies.TLS_REQUIRED_FIRST,
    "554 Command refused due to lack of security": replies.TLS_NOT_OK,
    "502 5.5.1 Too many unrecognized commands, goodbye.": replies.TOO_MANY_BAD_COMMANDS,
    "500 Error: command 'AUTH' not recognized": replies.AUTH_NOT_AVAILABLE,
    "530 5.7.0 Authentication required": replies.AUTH_REQUIRED,
    "538 5.7.11 Encryption required for requested authentication mechanism": (
        replies.AUTH_ENCRYPTION_REQUIRED
    ),
    "503 Already authenticated": replies.AUTH_ALREADY,
    "501 Not enough value": replies.SYNTAX_ERROR_ARGS,
    "501 Too many values": replies.SYNTAX_ERROR_ARGS,
    "504 5.5.4 Unrecognized authentication type": replies.AUTH_MECHANISM_UNKNOWN,
    "501 5.7.0 Auth aborted": replies.AUTH_ABORTED,
    "501 5.5.2 Can't decode base64": replies.AUTH_BAD_BASE64,
    "501 5.5.2 Can't split auth value": replies.AUTH_BAD_FORMAT,
    "553 5.1.3 Error: malformed address": replies.MALFORMED_ADDRESS,
    "503 Error: nested MAIL command": replies.BAD_SEQUENCE_MAIL_NESTED,
    "501 Error: BODY can only be one of 7BIT, 8BITMIME": replies.BODY_PARAMETER_INVALID,
    "501 Error: SMTPUTF8 takes no arguments": replies.SMTPUTF8_ARGUMENT,
    "501 Error: SMTPUTF8 disabled": replies.SMTPUTF8_DISABLED,
    "552 Error: message size exceeds fixed maximum message size": replies.MESSAGE_TOO_BIG,
    "555 MAIL FROM parameters not recognized or not implemented": (
        replies.PARAMETERS_NOT_RECOGNIZED
    ),
    "555 RCPT TO parameters not recognized or not implemented": (replies.PARAMETERS_NOT_RECOGNIZED),
    "503 Error: need MAIL command": replies.BAD_SEQUENCE_NEED_MAIL,
    "503 Error: need RCPT command": replies.BAD_SEQUENCE_NEED_RCPT,
    "354 End data with <CR><LF>.<CR><LF>": replies.START_DATA,
    "500 Line too long (see RFC5321 4.5.3.1.6)": replies.DATA_LINE_TOO_LONG,
    "552 Error: Too much mail data": replies.MESSAGE_TOO_BIG,
    "502 EXPN not implemented": replies.EXPN_REFUSED,
    "220 Ready to start TLS": replies.TLS_READY,
    "454 TLS not available": replies.TLS_UNAVAILABLE,
    "221 Bye": replies.CLOSING,
    "250 OK": replies.OK,
}
_PREFIX: tuple[tuple[str, Reply], ...] = (
    ("501 Syntax:", replies.SYNTAX_ERROR_ARGS),
    ("503 Error: send ", replies.HELO_REQUIRED),
    ("500 Error: command ", replies.COMMAND_UNRECOGNIZED),
    ("502 Could not VRFY", replies.SYNTAX_ERROR_ARGS),
    ("252 Cannot VRFY", replies.VRFY_REFUSED),
    ("250 Supported commands", replies.HELP),
    ("501 Supported commands", replies.HELP),
    ("250 Syntax:", replies.HELP),
)
_COMMAND_FLOOD = re.compile(r"^421 4\.7\.0 (\S+) sent too many times$")
# replies that end a transaction inside the SMTP layer, with the id they are audited under
_PROTOCOL_ENDS: dict[Reply, tuple[str, Stage]] = {
    replies.DATA_LINE_TOO_LONG: ("line-length", Stage.DATA),
}


def _ends_exchange(line: str) -> bool:
    """A final reply after which a session may be closed for shutdown (not a continuation, a
    challenge, the 354, STARTTLS's 220 or the 221 of QUIT, which closes anyway)."""
    return len(line) >= 4 and line[3] == " " and line[:3] not in ("220", "221", "334", "354")


def translate(line: str) -> tuple[str, Reply | None]:
    """Map an aiosmtpd line to the catalog; returns the line to send and the Reply if mapped."""
    reply = _EXACT.get(line)
    if reply is None:
        for prefix, candidate in _PREFIX:
            if line.startswith(prefix):
                reply = candidate
                break
    if reply is None:
        m = _COMMAND_FLOOD.match(line)
        if m:
            reply = replies.COMMAND_FLOOD.format(command=m.group(1))
    if reply is not None:
        return reply.line(), reply
    return line, None


@dataclass(frozen=True)
class ListenerSettings:
    name: str
    implicit_tls: bool
    starttls_context: ssl.SSLContext | None
    hostname: str
    max_message_size: int
    max_line_length: int
    max_command_length: int
    idle_timeout: float
    data_timeout: float
    max_bad_commands: int
    smtputf8: bool


@dataclass
class ServerContext:
    """State shared by the connections of one gateway process (no module-level state)."""

    gateway: Gateway
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    connections: set[GatewaySMTP] = field(default_factory=set)
    untranslated: list[str] = field(default_factory=list)
    closing: bool = False
    drained: asyncio.Event = field(default_factory=asyncio.Event)
    # set whenever a session is told 421 4.3.2 or closes (shutdown waits on it)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def opened(self, conn: GatewaySMTP) -> None:
        self.connections.add(conn)
        self.drained.clear()

    def closed(self, conn: GatewaySMTP) -> None:
        self.connections.discard(conn)
        self.changed.set()
        if not self.connections:
            self.drained.set()

    def spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


@dataclass
class ConnState:
    session: Session
    exchange: Exchange | None = None
    refusal: Reply | None = None
    admitted: bool = False
    end_reason: str = "dropped"


class GatewaySMTP(SMTP):
    """One client connection."""

    def __init__(self, handler: SmtpHandler, settings: ListenerSettings) -> None:
        # aiosmtpd builds its StreamReader from this attribute inside __init__; CRLF counts too.
        self.line_length_limit = settings.max_line_length + 2
        super().__init__(
            handler,
            data_size_limit=settings.max_message_size,
            enable_SMTPUTF8=settings.smtputf8,
            decode_data=False,
            hostname=settings.hostname,
            ident="ESMTP Mailward",
            tls_context=settings.starttls_context,
            require_starttls=False,
            timeout=settings.idle_timeout,
            auth_required=False,
            auth_require_tls=True,
            command_call_limit=None,
        )
        self.command_size_limit = settings.max_command_length
        self.command_size_limits = collections.defaultdict(lambda: settings.max_command_length)
        self.mw_settings = settings
        self.mw_handler = handler
        self.mw: ConnState | None = None
        self._mw_bad_commands = 0
        self._mw_busy = 0  # hooks running (the Gateway is working for this session)
        self._mw_closing = False
        self.mw_ehlo_lines: frozenset[str] = frozenset()

    @property
    def ctx(self) -> ServerContext:
        return self.mw_handler.ctx

    # -- connection lifecycle ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.mw is None
        if first:
            peer = transport.get_extra_info("peername") or ("?", 0)
            self.mw = ConnState(Session(str(peer[0]), int(peer[1]), self.mw_settings.name))
            self.ctx.opened(self)
        super().connection_made(transport)
        assert self.mw is not None
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None and first:
            # Implicit TLS (RFC 8314): aiosmtpd only knows STARTTLS; mark the session as
            # protected so that AUTH is offered and accepted.
            self._tls_protocol = transport  # type: ignore[assignment]
        if ssl_object is not None:
            cipher = ssl_object.cipher()
            self.mw.session.tls_version = ssl_object.version()
            self.mw.session.tls_cipher = cipher[0] if cipher else None

    def connection_lost(self, error: Exception | None) -> None:
        state = self.mw
        super().connection_lost(error)
        self.ctx.closed(self)
        if state is not None and state.admitted:
            state.admitted = False
            exchange, state.exchange = state.exchange, None
            gateway = self.ctx.gateway
            gateway.release(state.session)
            self.ctx.spawn(gateway.on_disconnect(state.session, exchange, state.end_reason))

    def eof_received(self) -> bool | None:
        # The client is gone. aiosmtpd cancels the session and closes "gracefully", which on a
        # TLS transport waits up to 30 s for a close_notify the client will never send; abort
        # so the disconnect (and its audit record) happens now.
        super().eof_received()
        if isinstance(self.transport, asyncio.Transport):
            self.transport.abort()
        return False

    async def _handle_client(self) -> None:
        assert self.mw is not None
        if self.ctx.closing:
            await self._refuse(replies.SHUTTING_DOWN)
            return
        refusal = await self.ctx.gateway.on_connect(self.mw.session)
        if refusal is not None:
            await self._refuse(refusal)
            return
        self.mw.admitted = True
        await super()._handle_client()

    async def _refuse(self, reply: Reply) -> None:
        assert self.mw is not None
        self.mw.end_reason = "refused"
        try:
            await self.push(reply.line())
        finally:
            if self.transport is not None:
                self.transport.close()

    def _timeout_cb(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            assert self.mw is not None
            self.mw.end_reason = "timeout"
            log.info("session=%s timeout", self.mw.session.id)
            # the transport may be half-closed already; closing is what matters
            with contextlib.suppress(Exception):
                self._writer.write(replies.TIMEOUT.line().encode() + b"\r\n")
        super()._timeout_cb()  # type: ignore[no-untyped-call]

    async def _call_handler_hook(self, command: str, *args: Any) -> Any:
        # The client is not idle while we work (policy checks, upstream): suspend its timer.
        if self._timeout_handle is not None:
            self._timeout_handle.cancel()
        self._mw_busy += 1
        try:
            return await super()._call_handler_hook(command, *args)
        finally:
            self._mw_busy -= 1
            if self.transport is not None:
                self._reset_timeout()

    # -- shutdown ------------------------------------------------------------------------------
    @property
    def idle(self) -> bool:
        """No transaction open and the Gateway not working for this session."""
        return self._mw_busy == 0 and (self.mw is None or self.mw.exchange is None)

    @property
    def shutting_down(self) -> bool:
        """Told 421 4.3.2 (or closing anyway): only its transport's close is pending."""
        return self._mw_closing or self.transport is None or self.transport.is_closing()

    def close_if_idle(self) -> bool:
        """Shutting down: close an idle session now with 421 4.3.2; True if it was closed."""
        if not self.idle:
            return False
        self.shut_down()
        return True

    def shut_down(self) -> None:
        """Send 421 4.3.2 and close (an open transaction is abandoned by the disconnect)."""
        if self._mw_closing or self.transport is None or self.transport.is_closing():
            return
        self._mw_closing = True
        self.ctx.changed.set()
        if self.mw is not None:
            self.mw.end_reason = "shutdown"
        # the transport may be half-closed already; closing is what matters
        with contextlib.suppress(Exception):
            self._writer.write(replies.SHUTTING_DOWN.line().encode() + b"\r\n")
        self.transport.close()

    def force_close(self) -> None:
        """Close now, without waiting for buffered output or a TLS close_notify."""
        if self.mw is not None:
            self.mw.end_reason = "shutdown"
        if isinstance(self.transport, asyncio.Transport):
            self.transport.abort()

    async def smtp_MAIL(self, arg: str | None) -> None:
        # Let the message-size check judge the declared SIZE (so the refusal is audited);
        # aiosmtpd would refuse it before our hook. The DATA ceiling stays enforced by aiosmtpd.
        limit, self.data_size_limit = self.data_size_limit, None
        try:
            await super().smtp_MAIL(arg)
        finally:
            self.data_size_limit = limit

    async def smtp_HELP(self, arg: str) -> None:
        await self.push(replies.HELP.line())

    async def smtp_QUIT(self, arg: str) -> None:
        if self.mw is not None:
            self.mw.end_reason = "quit"
        await super().smtp_QUIT(arg)

    # -- the translation boundary ------------------------------------------------------------
    async def push(self, status: str | bytes) -> None:
        line = status.decode("utf-8", "replace") if isinstance(status, bytes) else status
        if line in self.mw_ehlo_lines:
            pass  # our own EHLO reply (its last line carries no status code by definition)
        elif len(line) >= 4 and line[3] == " " and not _ENHANCED.match(line):
            translated, reply = translate(line)
            if reply is None and not line.startswith(("220 ", "334 ", "354 ", "235 ")):
                log.warning("untranslated SMTP reply %r", line[:80])
                if len(self.ctx.untranslated) < 100:  # evidence for tests, bounded
                    self.ctx.untranslated.append(line[:80])
            line = translated
            if reply is not None:
                await self._on_protocol_reply(reply)
        if line.startswith("354"):
            self._reset_timeout(self.mw_settings.data_timeout)
        if line.startswith(("500", "501", "502", "503", "504", "555")):
            self._mw_bad_commands += 1
            if self._mw_bad_commands > self.mw_settings.max_bad_commands:
                await super().push(replies.TOO_MANY_BAD_COMMANDS.line())
                if self.transport is not None:
                    self.transport.close()
                return
        await super().push(line)
        if self.ctx.closing and _ends_exchange(line) and self.idle:
            self.shut_down()  # its transaction (if any) is over: no new one during shutdown

    async def _on_protocol_reply(self, reply: Reply) -> None:
        state = self.mw
        if state is None:
            return
        end = _PROTOCOL_ENDS.get(reply)
        if reply == replies.MESSAGE_TOO_BIG and state.exchange is not None:
            end = ("message-size", Stage.DATA)
        if end is not None and state.exchange is not None:
            exchange, state.exchange = state.exchange, None
            await self.ctx.gateway.on_protocol_reject(exchange, end[0], end[1], reply)

    async def handle_exception(self, error: Exception) -> str:
        incident = new_id()
        state = self.mw
        session_id = state.session.id if state else "-"
        log.error(
            "session=%s incident=%s unexpected %s",
            session_id,
            incident,
            type(error).__name__,
            exc_info=error,
        )
        if state is not None and state.exchange is not None:
            exchange, state.exchange = state.exchange, None
            await self.ctx.gateway.fail_internal(exchange, incident)
            self._set_rset_state()  # type: ignore[no-untyped-call]
        return replies.INTERNAL_ERROR.format(incident=incident).line()


class SmtpHandler:
    """aiosmtpd hooks: parse what aiosmtpd hands over and ask the Gateway for the reply."""

    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx

    @staticmethod
    def _state(server: GatewaySMTP) -> ConnState:
        assert server.mw is not None
        return server.mw

    async def _abandon(self, state: ConnState) -> None:
        exchange, state.exchange = state.exchange, None
        if exchange is not None:
            await self.ctx.gateway.abandon(exchange)

    async def handle_HELO(
        self, server: GatewaySMTP, session: AioSession, envelope: Envelope, hostname: str
    ) -> str:
        state = self._state(server)
        await self._abandon(state)
        session.host_name = state.session.helo = hostname
        line = f"250 {server.hostname}"
        server.mw_ehlo_lines = frozenset({line})  # a greeting reply: no enhanced status code
        return line

    async def handle_EHLO(
        self,
        server: GatewaySMTP,
        session: AioSession,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        state = self._state(server)
        await self._abandon(state)
        session.host_name = state.session.helo = hostname
        keywords = [r[4:] for r in responses[1:] if r[4:] != "HELP"]
        keywords = [
            f"SIZE {server.mw_settings.max_message_size}" if k.startswith("SIZE") else k
            for k in keywords
        ]
        keywords.append("ENHANCEDSTATUSCODES")
        lines = [f"250-{server.hostname}"] + [f"250-{k}" for k in keywords]
        lines[-1] = "250 " + lines[-1][4:]
        server.mw_ehlo_lines = frozenset(lines)
        return lines

    async def handle_NOOP(
        self, server: GatewaySMTP, session: AioSession, envelope: Envelope, arg: str
    ) -> str:
        return replies.NOOP_OK.line()

    async def handle_VRFY(
        self, server: GatewaySMTP, session: AioSession, envelope: Envelope, address: str
    ) -> str:
        return replies.VRFY_REFUSED.line()

    async def handle_RSET(
        self, server: GatewaySMTP, session: AioSession, envelope: Envelope
    ) -> str:
        await self._abandon(self._state(server))
        return replies.RESET_OK.line()

    async def handle_QUIT(
        self, server: GatewaySMTP, session: AioSession, envelope: Envelope
    ) -> str:
        state = self._state(server)
        state.end_reason = "quit"
        await self._abandon(state)
        return replies.CLOSING.line()

    async def handle_MAIL(
        self,
        server: GatewaySMTP,
        session: AioSession,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        state = self._state(server)
        reply, exchange = await self.ctx.gateway.on_mail(state.session, address, mail_options)
        if exchange is not None:
            state.exchange = exchange
            envelope.mail_from = address
            envelope.mail_options.extend(mail_options)
        return reply.line()

    async def handle_RCPT(
        self,
        server: GatewaySMTP,
        session: AioSession,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        state = self._state(server)
        if state.exchange is None:
            return replies.BAD_SEQUENCE_NEED_MAIL.line()
        reply = await self.ctx.gateway.on_rcpt(state.exchange, address)
        if reply.is_positive:
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(rcpt_options)
        return reply.line()

    async def handle_DATA(
        self, server: GatewaySMTP, session: AioSession, envelope: Envelope
    ) -> str:
        state = self._state(server)
        exchange, state.exchange = state.exchange, None
        if exchange is None:
            return replies.BAD_SEQUENCE_NEED_MAIL.line()
        content = envelope.original_content
        assert isinstance(content, bytes)
        envelope.original_content = envelope.content = None
        reply = await self.ctx.gateway.on_data(exchange, content)
        return reply.line()

    # -- AUTH (only reachable under TLS: aiosmtpd answers 538 5.7.11 otherwise) -----------------
    async def auth_PLAIN(self, server: GatewaySMTP, args: list[str]) -> AuthResult:
        if len(args) == 1:
            raw = await server.challenge_auth("")
            if not isinstance(raw, bytes):  # "*" or an unparsable answer: aiosmtpd replied
                return AuthResult(success=False, handled=True)
        else:
            try:
                raw = b64decode(args[1].encode(), validate=True)
            except (binascii.Error, ValueError):
                return await self._malformed(server, "PLAIN", replies.AUTH_BAD_BASE64)
        parts = raw.split(b"\x00")
        if len(parts) != 3:
            return await self._malformed(server, "PLAIN", replies.AUTH_BAD_FORMAT)
        return await self._check(server, "PLAIN", parts[1], parts[2])

    async def auth_LOGIN(self, server: GatewaySMTP, args: list[str]) -> AuthResult:
        if len(args) == 1:
            login = await server.challenge_auth(server.AuthLoginUsernameChallenge)
            if not isinstance(login, bytes):
                return AuthResult(success=False, handled=True)
        else:
            try:
                login = b64decode(args[1].encode(), validate=True)
            except (binascii.Error, ValueError):
                return await self._malformed(server, "LOGIN", replies.AUTH_BAD_BASE64)
        password = await server.challenge_auth(server.AuthLoginPasswordChallenge)
        if not isinstance(password, bytes):
            return AuthResult(success=False, handled=True)
        return await self._check(server, "LOGIN", login, password)

    async def _malformed(self, server: GatewaySMTP, mechanism: str, reply: Reply) -> AuthResult:
        state = self._state(server)
        reply = await self.ctx.gateway.on_auth_malformed(state.session, mechanism, reply)
        return AuthResult(success=False, handled=False, message=reply.line())

    async def _check(
        self, server: GatewaySMTP, mechanism: str, login_b: bytes, password_b: bytes
    ) -> AuthResult:
        state = self._state(server)
        try:
            login, password = login_b.decode("utf-8"), password_b.decode("utf-8")
        except UnicodeDecodeError:
            return await self._malformed(server, mechanism, replies.AUTH_BAD_FORMAT)
        if not login or not password:
            return await self._malformed(server, mechanism, replies.AUTH_BAD_FORMAT)
        reply = await self.ctx.gateway.on_auth(state.session, mechanism, login, password)
        if reply.is_positive:
            return AuthResult(success=True, handled=False, auth_data=login, message=reply.line())
        return AuthResult(success=False, handled=False, message=reply.line())


ProtocolFactory = Callable[[], GatewaySMTP]


def protocol_factory(handler: SmtpHandler, settings: ListenerSettings) -> ProtocolFactory:
    def factory() -> GatewaySMTP:
        return GatewaySMTP(handler, settings)

    return factory
