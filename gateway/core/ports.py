"""Ports: the protocols the protocol-independent Gateway needs from stores and the relay.

What it does: declares what the service calls — :class:`AccountStore` (credentials and ownership),
:class:`AuditSink` (the mandatory audit record), :class:`Relay` / :class:`UpstreamTransaction` (the
upstream MTA) and :class:`DeliveryPlanner` (which bytes go to which recipients, one upstream
transaction per copy). Implementations live in ``gateway.auth``, ``gateway.audit``, ``gateway.relay``
and ``gateway.service`` (the one-copy plan); the composition root (``gateway.app``) wires them.

Reads: nothing.

Security notes: implementations translate their library's exceptions into the GatewayError tree at
their boundary; callers here only ever see GatewayError subclasses (or a bug).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from gateway.core.model import DeliveryCopy, Identity, Session, Transaction, VerdictRecord

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\b\s*")
_QUEUE_ID = re.compile(r"(?:queued as|id=|queue id:?)\s*<?([A-Za-z0-9._-]+)", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class UpstreamReply:
    """What the upstream said: code, enhanced status (may be empty) and text."""

    code: int
    status: str
    text: str

    @classmethod
    def parse(cls, code: int, message: str) -> UpstreamReply:
        message = " ".join(message.split())
        m = _ENHANCED.match(message)
        if m:
            return cls(code, m.group(0).strip(), message[m.end() :])
        return cls(code, "", message)

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 400

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500

    @property
    def queue_id(self) -> str | None:
        m = _QUEUE_ID.search(self.text)
        return m.group(1) if m else None

    def __str__(self) -> str:
        return " ".join(p for p in (str(self.code), self.status, self.text) if p)


class AccountStore(Protocol):
    async def authenticate(self, login: str, password: str) -> Identity | None:
        """The identity for valid credentials, None for invalid ones (unknown login, wrong password,
        disabled account). Raises CredentialStoreUnavailable when the store cannot answer."""
        ...


class AuditSink(Protocol):
    async def begin_message(self, txn: Transaction) -> int:
        """Write the record of an accepted-so-far message BEFORE it is relayed (outcome
        "relaying"); returns its audit id. Raises AuditUnavailable: the caller defers (451)."""
        ...

    async def finish_message(self, audit_id: int, txn: Transaction, outcome: str) -> None:
        """Complete the record written by begin_message with the final outcome, the upstream
        reply, queue id and per-recipient results. Raises AuditUnavailable."""
        ...

    async def record_transaction(self, txn: Transaction, outcome: str) -> None:
        """Write a finished transaction that never reached the relay (rejected, aborted,
        dropped). Raises AuditUnavailable."""
        ...

    async def record_session_event(
        self,
        session: Session,
        kind: str,
        detail: str,
        login: str | None = None,
        verdicts: Sequence[VerdictRecord] = (),
    ) -> None:
        """A session-level event with no transaction: kind is "auth-failure", "auth-tempfail",
        "auth-throttled", "dropped", "refused", "timeout"; ``verdicts`` explain it.
        Raises AuditUnavailable."""
        ...


class Quarantine(Protocol):
    async def hold(self, txn: Transaction, message: bytes, *, check_id: str, reason: str) -> int:
        """Store the message durably for review (committed before it returns); its id.
        Raises StoreUnavailable."""
        ...


class UpstreamTransaction(Protocol):
    async def rcpt(self, address: str) -> UpstreamReply:
        """RCPT TO at the upstream. Raises UpstreamError on connection failure."""
        ...

    async def data(self, content: bytes) -> UpstreamReply:
        """Send the message (CRLF lines, not dot-stuffed; the transport stuffs). Raises
        UpstreamError on connection failure or timeout; a 4xx/5xx reply is returned."""
        ...

    async def abort(self) -> None:
        """Give up this transaction (RSET); the connection returns to the pool if healthy."""
        ...


class Relay(Protocol):
    async def begin(
        self, mail_from: str, *, smtputf8: bool, body_8bitmime: bool, size: int | None
    ) -> tuple[UpstreamReply, UpstreamTransaction | None]:
        """Open an upstream transaction (MAIL FROM) on a pooled connection. Returns the
        upstream's MAIL reply and, if it was positive, the transaction. Raises UpstreamError
        when the upstream cannot be reached or lacks a required extension."""
        ...

    async def close(self) -> None: ...


class DeliveryPlanner(Protocol):
    async def __call__(self, txn: Transaction, wire: bytes) -> Sequence[DeliveryCopy]:
        """Split the accepted recipients of ``txn`` into copies, each sent in its own upstream
        transaction with its own final bytes (``wire`` is the message as relayed: trace header
        and check headers prepended). Every accepted recipient address is in exactly one copy.
        Called once per message, before anything is sent or queued, so a copy that must be
        transformed (encrypted) is never queued untransformed. Raises GatewayError (its reply
        goes to the client) when no plan can be made."""
        ...
