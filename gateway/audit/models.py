"""Audit tables: one record per message or session event, with its recipients and verdicts.

What it does: declares ``audit_record`` (what happened, to whom it was told, when, by which session
and login), ``audit_recipient`` (each RCPT with its final status and reply, in order, and -- since
revision ``0008`` -- the ``encryption`` check's decision for it: policy, decision, format, the
fingerprint of the key used and the reason) and ``audit_verdict`` (each non-continue check
verdict, applied or "would have", with its evidence).
The schema is created by the Alembic revision ``0001`` (``kind`` widened by ``0005``, recipients'
encryption columns added by ``0008``).

Design for what comes later: the integer ``id`` grows monotonically, so listing is keyset-paginated
on it (newest first) and a hash chain can later be added as extra columns computed over finished
records (``ended_at`` set) in ``id`` order, without changing what is here. Searches by login,
sender and recipient are case-insensitive and use expression indexes on ``lower(...)``.

Reads: nothing.

Security notes: no message content is stored anywhere — only its size, SHA-256 and Message-ID.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Boolean, ForeignKey, Index, Integer, String, Text, func
from sqlalchemy.orm import Mapped, mapped_column

from gateway.db.base import Base, BigIntId, UtcDateTime

#: Record kinds: a message transaction or a session-level event (at most 32 characters, the
#: width of ``audit_record.kind`` since revision ``0005``; append new kinds at the end).
KINDS = (
    "message",
    "auth-failure",
    "auth-tempfail",
    "auth-throttled",
    "dropped",
    "refused",
    "timeout",
    # compromised-account stage transitions (check account-guard, `mailward account`)
    "account-flagged",
    "account-held",
    "account-suspended",
    "account-released",
    # operator decisions on quarantined messages (`mailward quarantine release|delete`)
    "quarantine-release",
    "quarantine-release-failed",
    "quarantine-delete",
    # operator actions on the durable queue (`mailward queue retry|hold|release|delete`)
    "queue-retry",
    "queue-hold",
    "queue-release",
    "queue-delete",
    # the queue runner: a queued copy reached a final state (delivered, bounced, dropped, corrupt)
    "queue-delivered",
    "queue-bounced",
    "queue-dropped",
    "queue-corrupt",
    # operator changes to the encryption key store (`mailward key import|revoke|remove|verify`)
    "key-import",
    "key-revoke",
    "key-remove",
    "key-verify",
)
SESSION_EVENT_KINDS = KINDS[1:]
#: Outcomes of message records ("relaying" until finish_message completes the record).
OUTCOMES = (
    "relaying",
    "delivered",
    "held",
    "rejected",
    "deferred",
    "failed",
    "aborted",
    "dropped",
    # the client got 250 and the message (or the rest of it) is in the durable queue
    "queued",
    # found "relaying" at start, long after its transaction must have ended: the gateway stopped
    # (or could not complete the record) before the outcome was known; not in the queue
    "interrupted",
)


class AuditRecordRow(Base):
    __tablename__ = "audit_record"

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(32))
    outcome: Mapped[str | None] = mapped_column(String(16))
    started_at: Mapped[datetime] = mapped_column(UtcDateTime, index=True)
    ended_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    session_id: Mapped[str] = mapped_column(String(64), index=True)
    transaction_id: Mapped[str | None] = mapped_column(String(80))
    listener: Mapped[str | None] = mapped_column(Text)
    client_ip: Mapped[str | None] = mapped_column(String(64))
    client_port: Mapped[int | None] = mapped_column(Integer)
    tls_version: Mapped[str | None] = mapped_column(Text)
    tls_cipher: Mapped[str | None] = mapped_column(Text)
    helo: Mapped[str | None] = mapped_column(Text)
    login: Mapped[str | None] = mapped_column(Text)
    mail_from: Mapped[str | None] = mapped_column(Text)
    message_id: Mapped[str | None] = mapped_column(Text)
    size: Mapped[int | None] = mapped_column(BigInteger)
    sha256: Mapped[str | None] = mapped_column(String(64))
    final_reply: Mapped[str | None] = mapped_column(Text)
    upstream_reply: Mapped[str | None] = mapped_column(Text)
    queue_id: Mapped[str | None] = mapped_column(Text)
    detail: Mapped[str | None] = mapped_column(Text)
    incident: Mapped[str | None] = mapped_column(String(64))

    __table_args__ = (
        Index("ix_audit_record_lower_login", func.lower(login)),
        Index("ix_audit_record_lower_mail_from", func.lower(mail_from)),
    )


class AuditRecipientRow(Base):
    __tablename__ = "audit_recipient"

    record_id: Mapped[int] = mapped_column(
        BigIntId, ForeignKey("audit_record.id", ondelete="CASCADE"), primary_key=True
    )
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    address: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))
    reply: Mapped[str] = mapped_column(Text)
    # the `encryption` check's decision for this recipient (revision 0008; NULL: not judged)
    encryption_policy: Mapped[str | None] = mapped_column(String(16))
    encryption_decision: Mapped[str | None] = mapped_column(String(16))
    encryption_format: Mapped[str | None] = mapped_column(String(16))
    encryption_key: Mapped[str | None] = mapped_column(String(64))
    encryption_reason: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (Index("ix_audit_recipient_lower_address", func.lower(address)),)


class AuditVerdictRow(Base):
    __tablename__ = "audit_verdict"

    record_id: Mapped[int] = mapped_column(
        BigIntId, ForeignKey("audit_record.id", ondelete="CASCADE"), primary_key=True
    )
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    check_id: Mapped[str] = mapped_column(String(64), index=True)
    stage: Mapped[str] = mapped_column(String(16))
    action: Mapped[str] = mapped_column(String(16))
    mode: Mapped[str] = mapped_column(String(16))
    applied: Mapped[bool] = mapped_column(Boolean)
    recipient: Mapped[str | None] = mapped_column(Text)
    reply: Mapped[str] = mapped_column(Text)
    reason: Mapped[str] = mapped_column(Text)
    measured: Mapped[str | None] = mapped_column(Text)
    limit: Mapped[str | None] = mapped_column(Text)
