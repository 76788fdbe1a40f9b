"""The protocol-independent Gateway: what happens at each SMTP stage, and the custody rule.

What it does: the SMTP adapter calls ``on_connect``, ``on_auth``, ``on_mail``, ``on_rcpt``,
``on_data``, ``abandon`` and ``on_disconnect``; each returns the catalog Reply to send. Relaying
requires an authenticated login or a trusted network — a fixed gate before any configurable check.
Then the pipeline runs per stage. Accepted recipients are proxied to the upstream at RCPT time
(``relay.verify_recipients``) so the upstream's refusals reach the client then. At end of data the
message is checked, its audit record is committed (or the client gets 451 and nothing is relayed),
and a **delivery plan** (:data:`one_copy_plan` by default; the composition root installs the
encrypting planner, :class:`gateway.crypto.plan.EncryptionPlanner`, which splits it) says
which final bytes go to which recipients, one upstream transaction per copy. The client gets 250
only when the upstream said 250 for every copy, or when Mailward took custody of what it did not
take: spool file fsynced and queue row committed (:class:`Custody`). A temporary failure of the whole
message is queued or answered 451 (``queue.on_upstream_tempfail``); the rest of a partial delivery
is always queued (never resent to the recipients already accepted, never lost); a recipient whose
copy the upstream refused for good while others were accepted gets a DSN; a message nobody got and
the upstream refused is refused in the session. Every transaction, rejected or accepted, ends in
exactly one audit record.

Reads: its collaborators (pipeline, account store, audit sink, relay, quarantine, custody, planner)
given at construction; ``Custody`` reads and writes the spool and the queue tables.

Security notes: passwords are passed to the account store and dropped; message bytes are held only in
memory for the transaction (and, when queued, in the mode-0600 spool) and never logged; logs carry
counts and ids, not addresses. Upstream reply text is sanitised into the catalog reply. In-session
bounces follow the runner's rules (no bounce for the null sender or automatic mail, no backscatter:
the sender must be one of the login's own addresses). Unexpected exceptions are the adapter's to
catch (451 4.3.0 + incident id); this module raises only GatewayError subclasses for expected
failures and handles those itself.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email.utils import format_datetime
from typing import Literal

from gateway.core import replies
from gateway.core.errors import (
    AuditUnavailable,
    CredentialStoreUnavailable,
    GatewayError,
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
    DeliveryCopy,
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
    DeliveryPlanner,
    Quarantine,
    Relay,
    UpstreamReply,
    UpstreamTransaction,
)
from gateway.core.replies import Reply
from gateway.pipeline.runner import Pipeline
from gateway.queue.model import (
    BOUNCED,
    DELETED,
    DROPPED,
    QUEUED,
    NewCopy,
    QueuedMessage,
    QueuedRecipient,
    QueueStore,
)
from gateway.queue.runner import Dsn, SenderOwned
from gateway.queue.spool import Spool, SpoolError, SpoolFile

log = logging.getLogger("mailward.gateway")

#: what the queue records on the recipients of a remainder it took but the client was not told
#: 250 for (a DSN that could not be queued after it): deleted, the client sends the message again
NOT_ACKNOWLEDGED = "not acknowledged: the client was told to retry"


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
    #: "queue": a temporary upstream failure of the whole message is queued (250); "defer": 451
    on_upstream_tempfail: str = "defer"


@dataclass
class Exchange:
    """One transaction in flight: the model object plus its open upstream transaction."""

    txn: Transaction
    upstream: UpstreamTransaction | None = None
    upstream_closed: bool = False
    finished: bool = False
    #: recipients the open ``upstream`` transaction accepted at RCPT time
    verified: set[str] = field(default_factory=set)
    #: queue mode: recipients accepted locally after a temporary upstream failure at MAIL/RCPT
    #: time (address -> what the upstream said); they are queued at end of data
    deferred: dict[str, str] = field(default_factory=dict)
    #: queue mode: the upstream failed temporarily for this transaction; not tried again in it
    upstream_down: str | None = None


@dataclass
class _Admission:
    total: int = 0
    per_ip: Counter[str] = field(default_factory=Counter)


async def one_copy_plan(txn: Transaction, wire: bytes) -> list[DeliveryCopy]:
    """The delivery plan without encryption: every accepted recipient gets the same bytes in one
    upstream transaction (a recipient given twice is sent once)."""
    return [DeliveryCopy(tuple(dict.fromkeys(r.address for r in txn.accepted)), wire)]


Kind = Literal["delivered", "temporary", "permanent"]


@dataclass(frozen=True, slots=True)
class _Result:
    """What the upstream did with one recipient's copy at end of data."""

    kind: Kind
    #: the upstream's reply, or what went wrong (audit, queue, DSN)
    upstream: str
    #: what the client hears if this result decides the whole message
    reply: Reply
    #: RFC 3463 status of a failure (for a DSN)
    status: str | None = None
    #: the upstream's queue id of a delivered copy
    queue_id: str | None = None


def _map_upstream(answer: UpstreamReply) -> Reply:
    if answer.temporary:
        return replies.UPSTREAM_TEMPFAIL.format(upstream=str(answer))
    return replies.upstream_permanent(answer.code, answer.status, answer.text)


def _from_reply(answer: UpstreamReply) -> _Result:
    """A non-positive upstream reply: 5xx permanent, anything else temporary."""
    kind: Kind = "permanent" if answer.code >= 500 else "temporary"
    return _Result(kind, str(answer), _map_upstream(answer), answer.status or None)


def _from_error(exc: UpstreamError) -> _Result:
    """A relay failure: temporary (connection, timeout) unless its reply is permanent."""
    kind: Kind = "temporary" if exc.reply.is_temporary else "permanent"
    return _Result(kind, exc.upstream_reply, exc.reply, exc.reply.status or None)


def _temporary(why: str) -> _Result:
    return _Result("temporary", why, replies.UPSTREAM_TEMPFAIL.format(upstream=why))


class Custody:
    """The service's side of the durable queue: refuse new mail when the spool's disk is nearly
    full, take custody of (the rest of) a message — spool files written and fsynced, then the
    queue row committed, before the caller may answer 250 — and queue the DSN of recipients the
    upstream refused for good after others were accepted (the runner's rules and DSN writer)."""

    def __init__(
        self,
        spool: Spool,
        store: QueueStore,
        *,
        dsn: Dsn,
        sender_owned: SenderOwned,
        reporting_mta: str,
        min_free_space: int,
        retry_first: float,
        wake: Callable[[], None] = lambda: None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.spool = spool
        self.store = store
        self.dsn = dsn
        self.sender_owned = sender_owned
        self.reporting_mta = reporting_mta
        self.min_free_space = max(0, min_free_space)
        self.retry_first = retry_first
        self.wake = wake
        self.clock = clock

    def space_refusal(self) -> Reply | None:
        """``452 4.3.1`` when the spool's file system has less than ``min_free_space`` free
        (``451`` when that cannot be told); None when new mail may come."""
        if self.min_free_space <= 0:
            return None
        try:
            free = self.spool.free_bytes()
        except SpoolError as exc:
            log.error("cannot tell the spool's free space: %s", exc)
            return replies.QUEUE_UNAVAILABLE
        if free < self.min_free_space:
            log.warning(
                "spool %s: %d bytes free, below queue.min_free_space (%d): new mail refused",
                self.spool.directory,
                free,
                self.min_free_space,
            )
            return replies.INSUFFICIENT_STORAGE
        return None

    async def take(
        self,
        txn: Transaction,
        audit_id: int | None,
        parts: Sequence[tuple[bytes, tuple[str, ...], tuple[str, ...]]],
        *,
        reserve: int,
    ) -> int:
        """Take custody of ``parts`` — (bytes, recipients, recipients already delivered) per copy
        — as one queued message; its queue id once the row is committed. The first attempt is
        ``retry_first`` from now (the upstream has just failed). Raises SpoolFull (452), SpoolError
        or StoreUnavailable (451); nothing is left behind then."""
        written: list[SpoolFile] = []
        try:
            copies: list[NewCopy] = []
            for data, recipients, delivered in parts:
                spooled = await self.spool.write_async(data, reserve=reserve)
                written.append(spooled)
                copies.append(
                    NewCopy(recipients, spooled.name, spooled.size, spooled.sha256, delivered)
                )
            queue_id = await self.store.enqueue(
                txn_id=txn.id,
                mail_from=txn.mail_from,
                login=txn.session.login,
                copies=copies,
                smtputf8=txn.smtputf8,
                body_8bitmime=txn.body_8bitmime,
                audit_id=audit_id,
                message_id_header=txn.message_id,
                first_attempt=self.clock() + timedelta(seconds=self.retry_first),
            )
        except BaseException:
            for spooled in written:
                self._remove(spooled.name)
            raise
        self.wake()
        return queue_id

    async def bounce(
        self,
        txn: Transaction,
        failed: Sequence[tuple[str, str, str | None]],
        original: bytes,
        queue_id: int | None,
    ) -> bool:
        """Queue one DSN to the envelope sender for ``failed`` — (address, upstream reply, RFC
        3463 status) — refused for good while other recipients were accepted; ``queue_id`` is the
        queue id of the message's remainder (0 in the DSN when nothing was queued). False when
        no DSN may be sent (null sender, automatic mail, a sender the login does not own: logged).
        Raises SpoolError or StoreUnavailable (also when ownership cannot be checked)."""
        now = self.clock()
        message = QueuedMessage(
            id=queue_id or 0,
            txn_id=txn.id,
            mail_from=txn.mail_from,
            login=txn.session.login,
            created_at=txn.started_at,
            expires_at=now,
            smtputf8=txn.smtputf8,
            body_8bitmime=txn.body_8bitmime,
            message_id_header=txn.message_id,
        )
        if not self.dsn.may_bounce(message, original):
            log.info("txn=%s: no bounce (null sender or automatic message)", txn.id)
            return False
        if not await self.sender_owned(message.login, message.mail_from):
            log.warning(
                "txn=%s: envelope sender is not one of the login's own addresses; no bounce "
                "(no backscatter)",
                txn.id,
            )
            return False
        recipients = [
            QueuedRecipient(a, BOUNCED, reply, status, now) for a, reply, status in failed
        ]
        try:
            body = self.dsn.build_dsn(
                reporting_mta=self.reporting_mta,
                original=message,
                failed=recipients,
                original_bytes=original,
                arrival=txn.started_at,
                now=now,
            )
            smtputf8, body_8bitmime = self.dsn.envelope_flags(body)
        except Exception:
            log.exception("txn=%s: the bounce could not be built; none is sent", txn.id)
            return False
        spooled = await self.spool.write_async(body)
        try:
            bounce_id = await self.store.enqueue(
                txn_id=f"{txn.id}.dsn"[:80],
                mail_from="",
                login=message.login,
                copies=[NewCopy((txn.mail_from,), spooled.name, spooled.size, spooled.sha256)],
                smtputf8=smtputf8,
                body_8bitmime=body_8bitmime,
                is_bounce=True,
                message_id_header=Headers(body).message_id,
            )
        except BaseException:
            self._remove(spooled.name)
            raise
        log.info("txn=%s: bounce queued as %d for %d recipient(s)", txn.id, bounce_id, len(failed))
        self.wake()
        return True

    async def discard(self, queue_id: int) -> None:
        """Take back a queued message whose client is told to retry after all (best effort)."""
        try:
            await self.store.set_state(
                queue_id,
                DELETED,
                origins=(QUEUED,),
                pending_state=DROPPED,
                reply=NOT_ACKNOWLEDGED,
            )
        except GatewayError as exc:
            log.error(
                "queue %d: the client was told to retry but the queued message could not be "
                "taken back (%s): it may be delivered twice (mailward queue delete %d --silently)",
                queue_id,
                exc,
                queue_id,
            )

    def _remove(self, name: str) -> None:
        with contextlib.suppress(SpoolError, ValueError):
            self.spool.remove(name)


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
        custody: Custody | None = None,
        planner: DeliveryPlanner = one_copy_plan,
    ) -> None:
        self.settings = settings
        self.pipeline = pipeline
        self.accounts = accounts
        self.audit = audit
        self.relay = relay
        self.quarantine = quarantine
        self.custody = custody
        #: the delivery plan (per-recipient encryption: gateway.crypto.plan.EncryptionPlanner)
        self.planner = planner
        self._admission = _Admission()

    @property
    def _queue_mode(self) -> bool:
        """A temporary upstream failure of the whole message is queued (else: 451)."""
        return self.custody is not None and self.settings.on_upstream_tempfail == "queue"

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
        if self.custody is not None:
            # before anything is accepted: the spool must be able to take custody
            refusal = self.custody.space_refusal()
            if refusal is not None:
                self._fixed_verdict(txn, "spool-space", Stage.MAIL, refusal, "spool disk full")
                return await self._finish_rejected(txn, refusal), None
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
        """Proxy RCPT upstream; None when the recipient is accepted (by the upstream, or in queue
        mode locally after a temporary upstream failure: queued at end of data), else the reply
        for the client."""
        txn = exchange.txn
        address = rcpt.address
        if exchange.upstream_down is not None:
            return self._accept_locally(exchange, address, exchange.upstream_down)
        try:
            if exchange.upstream is None:
                answer, upstream = await self.relay.begin(
                    txn.mail_from,
                    smtputf8=txn.smtputf8,
                    body_8bitmime=txn.body_8bitmime,
                    size=txn.declared_size,
                )
                if upstream is None:
                    txn.upstream_reply = str(answer)
                    if answer.temporary and self._queue_mode:
                        exchange.upstream_down = str(answer)
                        return self._accept_locally(exchange, address, str(answer))
                    return _map_upstream(answer)
                exchange.upstream, exchange.upstream_closed = upstream, False
                exchange.verified = set()
            answer = await exchange.upstream.rcpt(address)
        except UpstreamError as exc:
            reply = self._upstream_failure(exchange, exc)
            if reply.is_temporary and self._queue_mode:
                exchange.upstream_down = exc.upstream_reply
                return self._accept_locally(exchange, address, exc.upstream_reply)
            return reply
        if answer.ok:
            exchange.verified.add(address)
            return None
        if answer.temporary and self._queue_mode:
            return self._accept_locally(exchange, address, str(answer))
        return _map_upstream(answer)

    @staticmethod
    def _accept_locally(exchange: Exchange, address: str, why: str) -> None:
        """Queue mode: accept a recipient the upstream could not take now; queued at end of data."""
        exchange.deferred[address] = why
        log.info(
            "txn=%s: upstream deferred a recipient (%s); it will be queued", exchange.txn.id, why
        )

    def _upstream_failure(self, exchange: Exchange, exc: UpstreamError) -> Reply:
        log.warning("upstream failure txn=%s: %s", exchange.txn.id, exc)
        exchange.upstream, exchange.upstream_closed = None, True
        exchange.verified = set()
        exchange.txn.upstream_reply = exc.upstream_reply
        return exc.reply

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
        taken = False
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
                    lambda wire, _audit_id: self._hold(
                        exchange, wire, held_by.check_id, held_by.reason
                    ),
                )
                return reply
            reply, outcome = await self._audited(exchange, content, self._deliverer(exchange))
            taken = outcome in ("delivered", "queued")
            return reply
        finally:
            # checks that charged something at end of data (rate-limit) keep it only when the
            # message was taken (relayed or queued)
            await self.pipeline.finish(txn, taken)

    async def _audited(
        self,
        exchange: Exchange,
        content: bytes,
        deliver: Callable[[bytes, int], Awaitable[tuple[Reply, str]]],
    ) -> tuple[Reply, str]:
        """Commit the audit record, deliver (relay, queue or hold), complete the record:
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
        reply, outcome = await deliver(wire, audit_id)
        txn.final_reply = reply.line()
        exchange.finished = True
        try:
            await self.audit.finish_message(audit_id, txn, outcome)
        except AuditUnavailable as exc:
            # The upstream (or the queue) has decided already: the client must hear it (a 451 now
            # would make the client resend a message already taken). The record stays "relaying"
            # with everything but the outcome; the log carries the outcome.
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

    def _deliverer(
        self, exchange: Exchange
    ) -> Callable[[bytes, int], Awaitable[tuple[Reply, str]]]:
        return lambda wire, audit_id: self._deliver(exchange, wire, audit_id)

    async def _deliver(self, exchange: Exchange, wire: bytes, audit_id: int) -> tuple[Reply, str]:
        """Make the delivery plan, send each copy upstream, then decide (see :meth:`_conclude`):
        the reply for the client and the audit outcome."""
        txn = exchange.txn
        try:
            plan = _checked_plan(txn, await self.planner(txn, wire))
        except GatewayError as exc:
            log.error("no delivery plan for txn=%s: %s", txn.id, exc)
            await self._close_upstream(exchange)
            return self._fail_all(txn, exc.reply)
        single = len(plan) == 1
        if not single:
            # each copy goes in its own upstream transaction; the one opened at RCPT time holds
            # every recipient, so it cannot carry any copy
            await self._close_upstream(exchange)
        results: dict[str, _Result] = {}
        for copy in plan:
            results.update(await self._send_copy(exchange, copy, whole=single))
        # a transaction opened at RCPT time that carried nothing (every recipient queued) ends here
        await self._close_upstream(exchange)
        return await self._conclude(exchange, plan, results, audit_id)

    async def _send_copy(
        self, exchange: Exchange, copy: DeliveryCopy, *, whole: bool
    ) -> dict[str, _Result]:
        """One upstream transaction for ``copy``: the result per recipient address.

        Recipients accepted locally at RCPT time (queue mode) are not tried again now. The
        transaction opened at RCPT time is used when there is one; recipients it did not accept
        yet (``verify_recipients = false``, or a transaction lost and reopened) get their RCPT
        now. With ``whole`` (a one-copy plan) a refusal at this late RCPT refuses the whole
        message, as it always did — a 5xx, and with ``on_upstream_tempfail = "defer"`` also a 4xx;
        in queue mode a 4xx recipient is queued and the others go on."""
        txn = exchange.txn
        results: dict[str, _Result] = {}
        for address in copy.recipients:
            why = exchange.deferred.get(address)
            if why is not None:
                results[address] = _temporary(why)
        todo = [a for a in copy.recipients if a not in results]
        if not todo:
            return results
        if exchange.upstream_down is not None:
            down = _temporary(exchange.upstream_down)
            return results | {a: down for a in todo}
        if exchange.upstream is None:
            try:
                answer, upstream = await self.relay.begin(
                    txn.mail_from,
                    smtputf8=txn.smtputf8,
                    body_8bitmime=txn.body_8bitmime,
                    size=len(copy.data),
                )
            except UpstreamError as exc:
                log.warning("upstream failure txn=%s (MAIL FROM): %s", txn.id, exc)
                failed = _from_error(exc)
                if failed.kind == "temporary":
                    exchange.upstream_down = failed.upstream
                return results | {a: failed for a in todo}
            if upstream is None:
                failed = _from_reply(answer)
                return results | {a: failed for a in todo}
            exchange.upstream, exchange.upstream_closed = upstream, False
            exchange.verified = set()
        upstream = exchange.upstream
        accepted = [a for a in todo if a in exchange.verified]
        current: str | None = None
        try:
            for address in todo:
                if address in exchange.verified:
                    continue
                current = address
                answer = await upstream.rcpt(address)
                if answer.ok:
                    accepted.append(address)
                    continue
                failed = _from_reply(answer)
                if whole and (failed.kind == "permanent" or not self._queue_mode):
                    await self._close_upstream(exchange)
                    return results | {a: failed for a in todo}
                results[address] = failed
            current = None
            if not accepted:
                await self._close_upstream(exchange)
                return results
            answer = await upstream.data(copy.data)
        except UpstreamError as exc:
            # the upstream transaction has ended; nothing of this copy is known to be delivered
            log.warning("upstream failure txn=%s: %s", txn.id, exc)
            failed = _from_error(exc)
            if failed.kind == "permanent" and current is not None and not whole:
                results[current] = failed  # an address this upstream cannot take
                failed = _temporary(f"not attempted: {failed.upstream}")
            return results | {a: failed for a in todo if a not in results}
        finally:  # however it went, this upstream transaction is over
            exchange.upstream, exchange.upstream_closed = None, True
            exchange.verified = set()
        if answer.ok:
            done = _Result("delivered", str(answer), replies.OK, queue_id=answer.queue_id)
        else:
            done = _from_reply(answer)
        return results | {a: done for a in accepted}

    async def _conclude(
        self,
        exchange: Exchange,
        plan: Sequence[DeliveryCopy],
        results: dict[str, _Result],
        audit_id: int,
    ) -> tuple[Reply, str]:
        """The custody rule over every copy's results:

        * every recipient delivered → 250;
        * nobody got it and the upstream refused some recipient for good → that 5xx, in session;
        * nobody got it, only temporary failures → 451 (``defer``) or queued and 250 (``queue``);
        * somebody got it → 250 after the rest is queued (temporary failures) and a DSN is
          queued for the recipients refused for good — if that fails, a 4xx: the client sends
          again, a duplicate for those who got it, never a loss."""
        txn = exchange.txn
        order = [a for copy in plan for a in copy.recipients]
        delivered = [a for a in order if results[a].kind == "delivered"]
        failures = [results[a] for a in order if results[a].kind != "delivered"]
        if delivered:
            txn.upstream_reply = results[delivered[0]].upstream
            txn.queue_id = results[delivered[0]].queue_id
        if failures:
            txn.upstream_reply = failures[0].upstream
        if not failures:
            self._mark(txn, results)
            reply = replies.MESSAGE_ACCEPTED.format(queue_id=txn.queue_id or txn.id, txn=txn.id)
            return reply, "delivered"
        if not delivered:
            permanent = next((r for r in failures if r.kind == "permanent"), None)
            if permanent is not None:
                return self._fail_all(txn, permanent.reply)
            if not self._queue_mode:
                return self._fail_all(txn, failures[0].reply)
            assert self.custody is not None
            return await self._take_custody(
                exchange, plan, results, audit_id, reserve=self.custody.min_free_space
            )
        return await self._take_custody(exchange, plan, results, audit_id, reserve=0)

    async def _take_custody(
        self,
        exchange: Exchange,
        plan: Sequence[DeliveryCopy],
        results: dict[str, _Result],
        audit_id: int,
        *,
        reserve: int,
    ) -> tuple[Reply, str]:
        """Queue what the upstream did not take now (and the DSN of what it refused for good);
        250 naming the queue id, or the 4xx of a queue that cannot take custody."""
        txn = exchange.txn
        parts: list[tuple[bytes, tuple[str, ...], tuple[str, ...]]] = []
        for copy in plan:
            if any(results[a].kind == "temporary" for a in copy.recipients):
                parts.append(
                    (
                        copy.data,
                        tuple(a for a in copy.recipients if results[a].kind != "permanent"),
                        tuple(a for a in copy.recipients if results[a].kind == "delivered"),
                    )
                )
        refused = [a for copy in plan for a in copy.recipients if results[a].kind == "permanent"]
        delivered = sum(1 for r in results.values() if r.kind == "delivered")
        queue_id: int | None = None
        try:
            if self.custody is None:
                raise StoreUnavailable("no queue configured", reply=replies.QUEUE_UNAVAILABLE)
            if parts:
                queue_id = await self.custody.take(txn, audit_id, parts, reserve=reserve)
            if refused:
                original = next(c.data for c in plan if refused[0] in c.recipients)
                failed = [(a, results[a].upstream, results[a].status) for a in refused]
                await self.custody.bounce(txn, failed, original, queue_id)
        except GatewayError as exc:
            if queue_id is not None and self.custody is not None:
                await self.custody.discard(queue_id)
            reply = exc.reply if exc.reply.is_temporary else replies.QUEUE_UNAVAILABLE
            if delivered:
                log.error(
                    "txn=%s: %d recipient(s) got the message, the queue cannot take the rest "
                    "(%s): the client is told %s and will send it again -- a duplicate for them",
                    txn.id,
                    delivered,
                    exc,
                    reply.code,
                )
            else:
                log.error("txn=%s: the queue cannot take custody: %s", txn.id, exc)
            for rcpt in txn.recipients:
                result = results.get(rcpt.address)
                if rcpt.status is RecipientStatus.ACCEPTED and result is not None:
                    if result.kind == "delivered":
                        rcpt.status, rcpt.reply = RecipientStatus.DELIVERED, result.upstream
                    else:
                        rcpt.status, rcpt.reply = RecipientStatus.DEFERRED, reply.line()
            return reply, "deferred"
        self._mark(txn, results)
        if queue_id is None:  # delivered and bounced: nothing left to queue
            reply = replies.MESSAGE_ACCEPTED.format(queue_id=txn.queue_id or txn.id, txn=txn.id)
            return reply, "delivered"
        txn.queue_id = str(queue_id)
        log.warning(
            "txn=%s queued as %d: %d delivered, %d queued, %d refused by the upstream",
            txn.id,
            queue_id,
            delivered,
            sum(1 for r in results.values() if r.kind == "temporary"),
            len(refused),
        )
        return replies.MESSAGE_QUEUED.format(queue_id=queue_id, txn=txn.id), "queued"

    @staticmethod
    def _mark(txn: Transaction, results: dict[str, _Result]) -> None:
        """Give each accepted recipient its status after a decision that took the message."""
        status = {
            "delivered": RecipientStatus.DELIVERED,
            "temporary": RecipientStatus.QUEUED,
            "permanent": RecipientStatus.BOUNCED,
        }
        for rcpt in txn.recipients:
            result = results.get(rcpt.address)
            if rcpt.status is RecipientStatus.ACCEPTED and result is not None:
                rcpt.status, rcpt.reply = status[result.kind], result.upstream

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


def _checked_plan(txn: Transaction, plan: Sequence[DeliveryCopy]) -> list[DeliveryCopy]:
    """``plan`` if every accepted recipient is in exactly one non-empty copy (else ValueError: a
    planner bug, never a silently lost recipient)."""
    copies = list(plan)
    seen: list[str] = [a for copy in copies for a in copy.recipients]
    if not copies or any(not copy.recipients for copy in copies):
        raise ValueError(f"delivery plan of txn={txn.id} has no copy or an empty one")
    if len(seen) != len(set(seen)) or set(seen) != {r.address for r in txn.accepted}:
        raise ValueError(f"delivery plan of txn={txn.id} does not cover each recipient once")
    return copies
