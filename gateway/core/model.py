"""Protocol-independent types: Session, Transaction, Recipient, Stage, Verdict.

What it does: the objects the pipeline, the checks, the relay and the audit share. A :class:`Session`
is one client connection; a :class:`Transaction` is one MAIL..DATA exchange inside it; checks return a
:class:`Verdict`; every non-continue verdict is kept as a :class:`VerdictRecord` on the transaction and
ends up in the audit record.

Reads: nothing (stdlib only). The SMTP adapter fills these from the wire; nothing here does I/O.

Security notes: ``Transaction.content`` holds the message bytes in memory only; it is never logged and
never stored by the audit (only its size and SHA-256 are).
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from gateway.core.message import Headers
from gateway.core.replies import Reply


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    """A short, unique, log-friendly id (sessions, transactions, incidents)."""
    return uuid.uuid4().hex[:16]


class Stage(enum.StrEnum):
    """SMTP stages at which checks run, in protocol order."""

    CONNECT = "connect"
    AUTH = "auth"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"  # end of data: the whole message is known


class Action(enum.StrEnum):
    CONTINUE = "continue"
    DEFER = "defer"
    REJECT = "reject"
    HOLD = "hold"  # end of data only: take custody (250) but quarantine for review


class Mode(enum.StrEnum):
    ENFORCE = "enforce"
    WARN = "warn"
    OFF = "off"


class OnError(enum.StrEnum):
    DEFER = "defer"
    CONTINUE = "continue"


@dataclass(frozen=True, slots=True)
class Verdict:
    """What a check says. ``measured``/``limit`` are optional evidence for the audit."""

    action: Action
    reply: Reply | None = None
    reason: str = ""
    measured: str | None = None
    limit: str | None = None
    # header lines to prepend when the message is relayed or held (applied in enforce mode only)
    headers: tuple[bytes, ...] = ()

    @property
    def decisive(self) -> bool:
        return self.action is not Action.CONTINUE

    @classmethod
    def cont(cls) -> Verdict:
        return CONTINUE

    @classmethod
    def defer(cls, reply: Reply, reason: str, **evidence: Any) -> Verdict:
        if not reply.is_temporary:
            raise ValueError(f"defer needs a 4xx reply, got {reply.code}")
        return cls(Action.DEFER, reply, reason, **evidence)

    @classmethod
    def hold(cls, reason: str, **evidence: Any) -> Verdict:
        """Quarantine the message (end of data): the service stores it and answers 250."""
        return cls(Action.HOLD, None, reason, **evidence)

    @classmethod
    def reject(cls, reply: Reply, reason: str, **evidence: Any) -> Verdict:
        if reply.is_positive:
            raise ValueError("reject needs a 4xx/5xx reply")
        return cls(Action.REJECT, reply, reason, **evidence)


CONTINUE = Verdict(Action.CONTINUE)


@dataclass(frozen=True, slots=True)
class VerdictRecord:
    """A non-continue verdict as audited: which check, where, what it did (or would have done)."""

    check_id: str
    stage: Stage
    action: Action
    mode: Mode
    reply: str
    reason: str
    recipient: str | None = None
    measured: str | None = None
    limit: str | None = None
    applied: bool = True  # False for warn mode ("would have ...") and for error-continue


class RecipientStatus(enum.StrEnum):
    ACCEPTED = "accepted"  # accepted at RCPT, waiting for DATA
    REJECTED = "rejected"  # refused at RCPT (by a check or by the upstream)
    DELIVERED = "delivered"  # upstream accepted the message for it
    DEFERRED = "deferred"  # temporary failure after RCPT; the client was told 4xx
    HELD = "held"  # in quarantine for review; the client was told 250
    QUEUED = "queued"  # in the durable queue (the client was told 250); delivered or bounced later
    BOUNCED = "bounced"  # failed for good after the client was told 250: a DSN goes to the sender
    FAILED = "failed"  # permanent failure after RCPT; the client was told 5xx
    ABORTED = "aborted"  # the transaction ended (RSET/QUIT/drop) before delivery


@dataclass(frozen=True, slots=True)
class DeliveryCopy:
    """One upstream transaction of a delivery plan: ``recipients`` get exactly ``data``.

    A delivery plan (``gateway.core.ports.DeliveryPlanner``) splits the accepted recipients of a
    message into copies: one copy for all of them without encryption; per-recipient encryption
    makes several.
    ``data`` are the final bytes (trace header included, encrypted where the plan says so): what
    goes upstream and, if it cannot go now, into the queue."""

    recipients: tuple[str, ...]
    data: bytes


@dataclass(frozen=True, slots=True)
class RecipientEncryption:
    """What the ``encryption`` check decided for one recipient, as audited.

    ``policy``: ``never``, ``opportunistic`` or ``required`` (the policy that applied);
    ``decision``: ``encrypted``, ``clear`` (clear text allowed), ``refused`` (at RCPT),
    ``deferred`` (4xx: key store unavailable, encryption failed) or ``pre-encrypted`` (the
    message arrived encrypted and passed unchanged); ``format``: ``openpgp`` or ``smime`` (empty
    when nothing was encrypted for the recipient); ``fingerprint``: the key actually used (or
    chosen); ``reason``: why, in words."""

    policy: str
    decision: str
    format: str = ""
    fingerprint: str = ""
    reason: str = ""


@dataclass(slots=True)
class Recipient:
    address: str
    status: RecipientStatus = RecipientStatus.ACCEPTED
    reply: str = ""
    #: the ``encryption`` check's decision (None: the check did not judge this recipient)
    encryption: RecipientEncryption | None = None


@dataclass(frozen=True, slots=True)
class Identity:
    """The authenticated principal of a session (or a trusted-network client with no login)."""

    login: str | None
    account_id: int | None
    owned: tuple[str, ...] = ()  # addresses ("a@b") and domains ("@b") the login owns
    send_as: tuple[str, ...] = ()  # extra addresses/domains granted explicitly
    trusted_network: bool = False

    def may_send_as(self, address: str) -> bool:
        """Ownership or a send-as grant covers ``address`` (exact address or whole domain)."""
        return address_matches(address, self.owned) or address_matches(address, self.send_as)

    def owns(self, address: str) -> bool:
        return address_matches(address, self.owned)


def normalize_address(address: str) -> str:
    """Lower-case the domain; keep the local part as given (RFC 5321: it may be case-sensitive)."""
    local, at, domain = address.rpartition("@")
    if not at:
        return address
    return f"{local}@{domain.lower().rstrip('.')}"


def address_matches(address: str, patterns: Iterable[str]) -> bool:
    """``patterns`` hold exact addresses (local part case-insensitive) or ``@domain`` entries."""
    addr = normalize_address(address)
    local, _, domain = addr.rpartition("@")
    if not local:
        return False
    full = f"{local.lower()}@{domain}"
    for pattern in patterns:
        p = pattern.lower()
        if p.startswith("@"):
            if domain == p[1:]:
                return True
        elif full == p:
            return True
    return False


@dataclass(slots=True)
class Session:
    """One client connection."""

    client_ip: str
    client_port: int
    listener: str
    id: str = field(default_factory=new_id)
    started_at: datetime = field(default_factory=utcnow)
    tls_version: str | None = None
    tls_cipher: str | None = None
    helo: str | None = None
    identity: Identity | None = None
    transactions: int = 0

    @property
    def login(self) -> str | None:
        return self.identity.login if self.identity else None


@dataclass(slots=True)
class Transaction:
    """One MAIL FROM .. end-of-data exchange (or its abandonment)."""

    session: Session
    mail_from: str
    id: str = ""
    started_at: datetime = field(default_factory=utcnow)
    body_8bitmime: bool = False
    smtputf8: bool = False
    declared_size: int | None = None
    recipients: list[Recipient] = field(default_factory=list)
    verdicts: list[VerdictRecord] = field(default_factory=list)
    content: bytes | None = None
    # the parsed header section of ``content`` (set once at end of data, shared by every check)
    headers: Headers | None = None
    message_id: str | None = None
    size: int | None = None
    sha256: str | None = None
    upstream_reply: str | None = None
    queue_id: str | None = None
    final_reply: str | None = None
    incident: str | None = None
    # at the AUTH stage the "transaction" is the authentication attempt: the login tried
    auth_login: str | None = None
    # header lines (CRLF-terminated bytes) checks ask the gateway to prepend when relaying
    prepend_headers: list[bytes] = field(default_factory=list)
    # per-check scratch space, keyed by check id (e.g. the rate-limit charge to refund)
    check_state: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.id:
            self.session.transactions += 1
            self.id = f"{self.session.id}.{self.session.transactions}"

    @property
    def accepted(self) -> list[Recipient]:
        return [r for r in self.recipients if r.status is RecipientStatus.ACCEPTED]

    def set_pending(self, status: RecipientStatus, reply: str) -> None:
        """Give every still-accepted recipient its final status and reply."""
        for rcpt in self.recipients:
            if rcpt.status is RecipientStatus.ACCEPTED:
                rcpt.status, rcpt.reply = status, reply
