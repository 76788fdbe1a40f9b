"""The protocol-independent Gateway: what happens at each SMTP stage, and the custody rule.

What it does: the SMTP adapter calls ``on_connect``, ``on_auth``, ``on_mail``, ``on_rcpt``,
``on_data``, ``abandon`` and ``on_disconnect``; each returns the catalog Reply to send. Relaying
requires an authenticated login or a trusted network — a fixed gate before any configurable check.
Then the pipeline runs per stage. Accepted recipients are proxied to the upstream at RCPT time
(``relay.verify_recipients``) so the upstream's refusals reach the client then. At end of data the
message is checked, its audit record is committed (or the client gets 451 and nothing is relayed),
the bytes go upstream, and the client gets 250 only when the upstream said 250 (custody rule). Every
transaction, rejected or accepted, ends in exactly one audit record.

Reads: its collaborators (pipeline, account store, audit sink, relay) given at construction.

Security notes: passwords are passed to the account store and dropped; message bytes are held only in
memory for the transaction and never logged. Upstream reply text is sanitised into the catalog reply.
Unexpected exceptions are the adapter's to catch (451 4.3.0 + incident id); this module raises only
GatewayError subclasses for expected failures and handles those itself.
"""

from __future__ import annotations

import ipaddress
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from email.utils import format_datetime

from gateway.core import replies
from gateway.core.errors import (
    AuditUnavailable,
    CredentialStoreUnavailable,
    StoreUnavailable,
    UpstreamError,
)
from gateway.core.message import (
    Headers,
    has_bare_newline_or_nul,
    normalize_line_endings,
    sha256_hex,
)
from gateway.core.model import (
    Action,
    Identity,
    Mode,
    Recipient,
    RecipientStatus,
    Session,
    Stage,
    Transaction,
    VerdictRecord,
    utcnow,
)
from gateway.core.ports import (
    AccountStore,
    AuditSink,
    Quarantine,
    Relay,
    UpstreamReply,
    UpstreamTransaction,
)
from gateway.core.replies import Reply
from gateway.pipeline.runner import Pipeline

log = logging.getLogger("mailward.gateway")


@dataclass(frozen=True)
class GatewaySettings:
    """The slice of configuration the service needs (built by the composition root)."""

    hostname: str
    trusted_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    max_connections: int = 1000
    max_connections_per_ip: int = 20
    bare_newline: str = "reject"
    verify_recipients: bool = True
    add_received_header: bool = True


@dataclass
class Exchange:
    """One transaction in flight: the model object plus its open upstream transaction."""

    txn: Transaction
    upstream: UpstreamTransaction | None = None
    upstream_closed: bool = False
    finished: bool = False


@dataclass
class _Admission:
    total: int = 0
    per_ip: Counter[str] = field(default_factory=Counter)


class Gateway:
    def __init__(
        self,
        settings: GatewaySettings,
        *,
        pipeline: Pipeline,
        accounts: AccountStore,
        audit: AuditSink,
        relay: Relay,
        quarantine: Quarantine,
    ) -> None:
        self.settings = settings
        self.pipeline = pipeline
        self.accounts = accounts
        self.audit = audit
        self.relay = relay
        self.quarantine = quarantine
        self._admission = _Admission()

    # -- connection ----------------------------------------------------------------------------
    async def on_connect(self, session: Session) -> Reply | None:
        """Admit the connection (None) or refuse it with a 421 (counted connections only)."""
        adm = self._admission
        refusal: Reply | None = None
        if adm.total >= self.settings.max_connections:
            refusal = replies.TOO_MANY_CONNECTIONS
        elif adm.per_ip[session.client_ip] >= self.settings.max_connections_per_ip:
            refusal = replies.TOO_MANY_CONNECTIONS_FROM_IP
        if refusal is not None:
            log.warning("refused connection from %s: %s", session.client_ip, refusal.text)
            await self._session_event(session, "refused", refusal.line())
            return refusal
        adm.total += 1
        adm.per_ip[session.client_ip] += 1
        if self._is_trusted(session.client_ip):
            session.identity = Identity(login=None, account_id=None, trusted_network=True)
        return None

    def release(self, session: Session) -> None:
        """The connection closed: free its admission slot (refused ones never took one)."""
        adm = self._admission
        adm.total -= 1
        adm.per_ip[session.client_ip] -= 1
        if adm.per_ip[session.client_ip] <= 0:
            del adm.per_ip[session.client_ip]

    async def on_disconnect(self, session: Session, exchange: Exchange | None, reason: str) -> None:
        """Connection gone: ``reason`` is "quit", "dropped", "timeout" or "shutdown"."""
        if exchange is not None and not exchange.finished:
            await self.abandon(exchange, "dropped" if reason != "quit" else "aborted")
        elif reason in ("dropped", "timeout"):
            await self._session_event(session, reason, f"connection {reason}")

    def _is_trusted(self, ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(addr in net for net in self.settings.trusted_networks)

    # -- AUTH ----------------------------------------------------------------------------------
    async def on_auth(self, session: Session, mechanism: str, login: str, password: str) -> Reply:
        # the AUTH-stage checks (auth-throttle) see the attempt before the password is verified
        attempt = Transaction(session=session, mail_from="", id=f"{session.id}.auth")
        attempt.auth_login = login
        verdict = await self.pipeline.run(Stage.AUTH, attempt)
        if verdict.decisive and verdict.reply is not None:
            log.info("AUTH refused by policy session=%s ip=%s", session.id, session.client_ip)
            await self._session_event(
                session, "auth-throttled", f"AUTH {mechanism}", login, attempt.verdicts
            )
            # AUTH's temporary failure is 454 (RFC 4954), also when a check failed (on_error)
            return verdict.reply if verdict.reply.code == 454 else replies.AUTH_TEMPFAIL
        try:
            identity = await self.accounts.authenticate(login, password)
        except CredentialStoreUnavailable as exc:
            log.error("credential store unavailable session=%s: %s", session.id, exc)
            await self._session_event(session, "auth-tempfail", "credential store down", login)
            return replies.AUTH_TEMPFAIL
        await self.pipeline.auth_result(attempt, identity is not None)  # may tarpit a failure
        if identity is None:
            log.info("AUTH %s failed session=%s ip=%s", mechanism, session.id, session.client_ip)
            await self._session_event(
                session, "auth-failure", f"AUTH {mechanism}", login, attempt.verdicts
            )
            return replies.AUTH_FAILED
        session.identity = identity
        log.info("AUTH %s ok session=%s login=%s", mechanism, session.id, identity.login)
        return replies.AUTH_OK

    async def on_auth_malformed(self, session: Session, mechanism: str, reply: Reply) -> Reply:
        await self._session_event(session, "auth-failure", f"AUTH {mechanism}: {reply.text}")
        return reply

    # -- MAIL ----------------------------------------------------------------------------------
    async def on_mail(
        self, session: Session, address: str, options: list[str]
    ) -> tuple[Reply, Exchange | None]:
        txn = Transaction(session=session, mail_from=address)
        for opt in options:
            key, _, value = opt.partition("=")
            if key == "BODY":
                txn.body_8bitmime = value == "8BITMIME"
            elif key == "SMTPUTF8":
                txn.smtputf8 = True
            elif key == "SIZE" and value.isdigit():
                txn.declared_size = int(value)
        if session.identity is None:
            # Fixed gate, not a configurable check: relaying requires authentication.
            reply = replies.AUTH_REQUIRED
            self._fixed_verdict(txn, "auth-gate", Stage.MAIL, reply, "not authenticated")
            return await self._finish_rejected(txn, reply), None
        if not txn.smtputf8 and not address.isascii():
            reply = replies.RECIPIENT_NOT_ASCII
            self._fixed_verdict(txn, "smtp-protocol", Stage.MAIL, reply, "non-ASCII sender")
            return await self._finish_rejected(txn, reply), None
        verdict = await self.pipeline.run(Stage.MAIL, txn)
        if verdict.decisive and verdict.reply is not None:
            return await self._finish_rejected(txn, verdict.reply), None
        return replies.SENDER_OK, Exchange(txn)

    # -- RCPT ----------------------------------------------------------------------------------
    async def on_rcpt(self, exchange: Exchange, address: str) -> Reply:
        txn = exchange.txn
        rcpt = Recipient(address)
        txn.recipients.append(rcpt)
        if not txn.smtputf8 and not address.isascii():
            reply = replies.RECIPIENT_NOT_ASCII
            self._fixed_verdict(txn, "smtp-protocol", Stage.RCPT, reply, "non-ASCII", rcpt)
            return self._refuse(rcpt, reply)
        verdict = await self.pipeline.run(Stage.RCPT, txn, rcpt)
        if verdict.decisive and verdict.reply is not None:
            return self._refuse(rcpt, verdict.reply)
        if self.settings.verify_recipients:
            refusal = await self._upstream_rcpt(exchange, rcpt)
            if refusal is not None:
                return self._refuse(rcpt, refusal)
        rcpt.reply = replies.RECIPIENT_OK.line()
        return replies.RECIPIENT_OK

    @staticmethod
    def _refuse(rcpt: Recipient, reply: Reply) -> Reply:
        rcpt.status, rcpt.reply = RecipientStatus.REJECTED, reply.line()
        return reply

    async def _upstream_rcpt(self, exchange: Exchange, rcpt: Recipient) -> Reply | None:
        """Proxy RCPT upstream; None when accepted, else the reply for the client."""
        try:
            if exchange.upstream is None:
                refusal = await self._open_upstream(exchange)
                if refusal is not None:
                    return refusal
            assert exchange.upstream is not None
            answer = await exchange.upstream.rcpt(rcpt.address)
        except UpstreamError as exc:
            return self._upstream_failure(exchange, exc)
        if answer.ok:
            return None
        return self._map_upstream(answer)

    async def _open_upstream(self, exchange: Exchange) -> Reply | None:
        txn = exchange.txn
        answer, upstream = await self.relay.begin(
            txn.mail_from,
            smtputf8=txn.smtputf8,
            body_8bitmime=txn.body_8bitmime,
            size=txn.declared_size,
        )
        if upstream is None:
            txn.upstream_reply = str(answer)
            return self._map_upstream(answer)
        exchange.upstream, exchange.upstream_closed = upstream, False
        return None

    def _upstream_failure(self, exchange: Exchange, exc: UpstreamError) -> Reply:
        log.warning("upstream failure txn=%s: %s", exchange.txn.id, exc)
        exchange.upstream, exchange.upstream_closed = None, True
        exchange.txn.upstream_reply = exc.upstream_reply
        return exc.reply

    @staticmethod
    def _map_upstream(answer: UpstreamReply) -> Reply:
        if answer.temporary:
            return replies.UPSTREAM_TEMPFAIL.format(upstream=str(answer))
        return replies.upstream_permanent(answer.code, answer.status, answer.text)

    # -- DATA ----------------------------------------------------------------------------------
    async def on_data(self, exchange: Exchange, content: bytes) -> Reply:
        txn = exchange.txn
        if has_bare_newline_or_nul(content):
            if self.settings.bare_newline == "normalize":
                content = normalize_line_endings(content)
            else:
                reply = replies.BARE_NEWLINE
                self._fixed_verdict(txn, "bare-newline", Stage.DATA, reply, "bare CR/LF or NUL")
                return await self._end_without_relay(exchange, reply, RecipientStatus.FAILED)
        txn.content = content
        txn.size = len(content)
        txn.sha256 = sha256_hex(content)
        txn.headers = Headers(content)
        txn.message_id = txn.headers.message_id
        verdict = await self.pipeline.run(Stage.DATA, txn)
        delivered = False
        try:
            if verdict.decisive and verdict.reply is not None:
                status = (
                    RecipientStatus.DEFERRED
                    if verdict.reply.is_temporary
                    else RecipientStatus.FAILED
                )
                return await self._end_without_relay(exchange, verdict.reply, status)
            if verdict.action is Action.HOLD:
                held_by = next(v for v in reversed(txn.verdicts) if v.action is Action.HOLD)
                reply, _ = await self._audited(
                    exchange,
                    content,
                    lambda wire: self._hold(exchange, wire, held_by.check_id, held_by.reason),
                )
                return reply
            reply, outcome = await self._audited(
                exchange, content, lambda wire: self._relay(exchange, wire)
            )
            delivered = outcome == "delivered"
            return reply
        finally:
            # checks that charged something at end of data (rate-limit) keep it only when the
            # upstream accepted the message
            await self.pipeline.finish(txn, delivered)

    async def _audited(
        self,
        exchange: Exchange,
        content: bytes,
        deliver: Callable[[bytes], Awaitable[tuple[Reply, str]]],
    ) -> tuple[Reply, str]:
        """Commit the audit record, deliver (relay or hold), complete the record:
        (client reply, outcome)."""
        txn = exchange.txn
        trace = self._received_header(txn) if self.settings.add_received_header else b""
        wire = trace + b"".join(txn.prepend_headers) + content
        txn.final_reply = None
        try:
            audit_id = await self.audit.begin_message(txn)
        except AuditUnavailable as exc:
            log.error("audit unavailable, deferring txn=%s: %s", txn.id, exc)
            await self._close_upstream(exchange)
            reply = replies.AUDIT_UNAVAILABLE
            txn.set_pending(RecipientStatus.DEFERRED, reply.line())
            exchange.finished = True
            return reply, "deferred"
        reply, outcome = await deliver(wire)
        txn.final_reply = reply.line()
        exchange.finished = True
        try:
            await self.audit.finish_message(audit_id, txn, outcome)
        except AuditUnavailable as exc:
            # The upstream has decided already: the client must hear it (a 451 now would make the
            # client resend a message the upstream accepted). The record stays "relaying" with
            # everything but the outcome; the log carries the outcome.
            log.error(
                "audit finish failed txn=%s audit_id=%s outcome=%s reply=%r: %s",
                txn.id,
                audit_id,
                outcome,
                reply.line(),
                exc,
            )
        txn.content = txn.headers = None
        return reply, outcome

    async def _relay(self, exchange: Exchange, wire: bytes) -> tuple[Reply, str]:
        """Send the message upstream; the reply for the client and the audit outcome."""
        txn = exchange.txn
        try:
            if exchange.upstream is None and not self.settings.verify_recipients:
                refusal = await self._open_upstream(exchange)
                if refusal is None:
                    refusal = await self._late_recipients(exchange)
                if refusal is not None:
                    await self._close_upstream(exchange)
                    return self._fail_all(txn, refusal)
            if exchange.upstream is None:
                # The upstream transaction was lost after RCPT (e.g. it dropped): nothing was sent.
                return self._fail_all(txn, replies.UPSTREAM_DROPPED)
            answer = await exchange.upstream.data(wire)
        except UpstreamError as exc:
            return self._fail_all(txn, self._upstream_failure(exchange, exc))
        finally:
            exchange.upstream, exchange.upstream_closed = None, True
        txn.upstream_reply = str(answer)
        txn.queue_id = answer.queue_id
        if answer.ok:
            reply = replies.MESSAGE_ACCEPTED.format(queue_id=txn.queue_id or txn.id, txn=txn.id)
            txn.set_pending(RecipientStatus.DELIVERED, str(answer))
            return reply, "delivered"
        return self._fail_all(txn, self._map_upstream(answer))

    async def _hold(
        self, exchange: Exchange, wire: bytes, check_id: str, reason: str
    ) -> tuple[Reply, str]:
        """Quarantine instead of relaying: custody is the quarantine's committed row."""
        txn = exchange.txn
        await self._close_upstream(exchange)
        try:
            held_id = await self.quarantine.hold(txn, wire, check_id=check_id, reason=reason)
        except StoreUnavailable as exc:
            log.error("quarantine unavailable txn=%s: %s", txn.id, exc)
            return self._fail_all(txn, replies.QUARANTINE_UNAVAILABLE)
        txn.queue_id = f"Q{held_id}"
        reply = replies.HELD_FOR_REVIEW.format(id=held_id, txn=txn.id)
        txn.set_pending(RecipientStatus.HELD, reply.line())
        log.warning("txn=%s held for review as Q%d by %s", txn.id, held_id, check_id)
        return reply, "held"

    async def _late_recipients(self, exchange: Exchange) -> Reply | None:
        """verify_recipients = false: RCPT at the upstream now; any refusal refuses the message."""
        assert exchange.upstream is not None
        for rcpt in exchange.txn.accepted:
            answer = await exchange.upstream.rcpt(rcpt.address)
            if not answer.ok:
                return self._map_upstream(answer)
        return None

    @staticmethod
    def _fail_all(txn: Transaction, reply: Reply) -> tuple[Reply, str]:
        status = RecipientStatus.DEFERRED if reply.is_temporary else RecipientStatus.FAILED
        txn.set_pending(status, reply.line())
        return reply, "deferred" if reply.is_temporary else "failed"

    async def _end_without_relay(
        self, exchange: Exchange, reply: Reply, status: RecipientStatus
    ) -> Reply:
        await self._close_upstream(exchange)
        txn = exchange.txn
        txn.set_pending(status, reply.line())
        exchange.finished = True
        try:
            await self._record(txn, reply, "deferred" if reply.is_temporary else "rejected")
        except AuditUnavailable:
            return replies.AUDIT_UNAVAILABLE
        finally:
            txn.content = txn.headers = None
        return reply

    def _received_header(self, txn: Transaction) -> bytes:
        s = txn.session
        proto = "ESMTP"
        if s.tls_version:
            proto += "S"
        if s.login:
            proto += "A"
        helo = (s.helo or "unknown").encode("ascii", "replace").decode()[:64]
        tls = f"\r\n\t(using {s.tls_version} with cipher {s.tls_cipher})" if s.tls_version else ""
        rcpts = [r.address for r in txn.accepted]
        for_clause = f"\r\n\tfor <{rcpts[0]}>" if len(rcpts) == 1 and rcpts[0].isascii() else ""
        text = (
            f"Received: from {helo} ([{s.client_ip}])\r\n"
            f"\tby {self.settings.hostname} (Mailward) with {proto} id {txn.id}{tls}"
            f"{for_clause};\r\n\t{format_datetime(utcnow())}\r\n"
        )
        return text.encode("ascii", "replace")

    # -- protocol-level ends (SMTP layer limits) -----------------------------------------------
    async def on_protocol_reject(
        self, exchange: Exchange | None, check_id: str, stage: Stage, reply: Reply
    ) -> None:
        """The SMTP layer refused the transaction itself (e.g. DATA too big): audit it."""
        if exchange is None or exchange.finished:
            return
        self._fixed_verdict(exchange.txn, check_id, stage, reply, reply.text)
        await self._end_without_relay(exchange, reply, RecipientStatus.FAILED)

    # -- ends without DATA ---------------------------------------------------------------------
    async def abandon(self, exchange: Exchange, outcome: str = "aborted") -> None:
        """RSET, new EHLO, QUIT or a dropped connection before the end of data."""
        if exchange.finished:
            return
        exchange.finished = True
        await self._close_upstream(exchange)
        txn = exchange.txn
        txn.set_pending(RecipientStatus.ABORTED, "")
        try:
            await self._record(txn, None, outcome)
        except AuditUnavailable as exc:
            log.error("audit unavailable for abandoned txn=%s: %s", txn.id, exc)

    async def fail_internal(self, exchange: Exchange | None, incident: str) -> None:
        """An unexpected exception ended the transaction; record it (best effort)."""
        if exchange is None or exchange.finished:
            return
        exchange.txn.incident = incident
        reply = replies.INTERNAL_ERROR.format(incident=incident)
        exchange.txn.set_pending(RecipientStatus.DEFERRED, reply.line())
        exchange.finished = True
        await self._close_upstream(exchange)
        try:
            await self._record(exchange.txn, reply, "deferred")
        except Exception:  # the original incident is what matters; never raise from here
            log.exception("could not audit txn=%s after incident %s", exchange.txn.id, incident)

    async def _close_upstream(self, exchange: Exchange) -> None:
        upstream, exchange.upstream = exchange.upstream, None
        if upstream is not None and not exchange.upstream_closed:
            exchange.upstream_closed = True
            try:
                await upstream.abort()
            except UpstreamError as exc:
                log.info("upstream abort failed txn=%s: %s", exchange.txn.id, exc)

    # -- audit helpers -------------------------------------------------------------------------
    async def _finish_rejected(self, txn: Transaction, reply: Reply) -> Reply:
        """Audit a transaction refused before DATA; the reply to send (451 if unauditable)."""
        try:
            await self._record(txn, reply, "rejected" if reply.is_permanent else "deferred")
        except AuditUnavailable as exc:
            log.error("audit unavailable for rejected txn=%s: %s", txn.id, exc)
            return replies.AUDIT_UNAVAILABLE
        return reply

    async def _record(self, txn: Transaction, reply: Reply | None, outcome: str) -> None:
        txn.final_reply = reply.line() if reply else None
        await self.audit.record_transaction(txn, outcome)

    async def _session_event(
        self,
        session: Session,
        kind: str,
        detail: str,
        login: str | None = None,
        verdicts: Sequence[VerdictRecord] = (),
    ) -> None:
        try:
            await self.audit.record_session_event(session, kind, detail, login, verdicts)
        except AuditUnavailable as exc:
            log.error("audit unavailable for %s event session=%s: %s", kind, session.id, exc)

    @staticmethod
    def _fixed_verdict(
        txn: Transaction,
        check_id: str,
        stage: Stage,
        reply: Reply,
        reason: str,
        rcpt: Recipient | None = None,
    ) -> None:
        txn.verdicts.append(
            VerdictRecord(
                check_id=check_id,
                stage=stage,
                action=Action.DEFER if reply.is_temporary else Action.REJECT,
                mode=Mode.ENFORCE,
                reply=reply.line(),
                reason=reason,
                recipient=rcpt.address if rcpt else None,
            )
        )
