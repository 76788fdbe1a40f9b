"""The ``quarantine`` table: messages held for review, with the exact bytes to relay on release.

What it does: declares the query-side description of the table created by Alembic revision
``0003``. One row per held message: who sent it (session, transaction, login, client IP), its
envelope (``mail_from``, ``recipients`` as a JSON list, the SMTPUTF8 / 8BITMIME flags), the
message itself (``message``: the bytes the gateway would have relayed, its own prepended headers
included; ``size`` and ``sha256`` are of those bytes), which check held it and why, and the
operator's decision (``status``, ``decided_at``, ``decided_by``, ``upstream_reply``).

Statuses: ``held`` (waiting for review), ``releasing`` (a release has claimed the row and is
talking to the upstream; a row left in it means that release was interrupted and its outcome is
unknown), ``released``, ``release-failed`` (may be released again or deleted) and ``deleted``.

Reads: nothing.

Security notes: ``message`` holds a message body; nothing here logs it. Deleting a held message
clears ``message`` (the metadata stays as the trail).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Index,
    LargeBinary,
    String,
    Text,
)
from sqlalchemy.orm import Mapped, mapped_column

from gateway.db.base import Base, BigIntId, UtcDateTime

HELD = "held"
RELEASING = "releasing"
RELEASED = "released"
RELEASE_FAILED = "release-failed"
DELETED = "deleted"

#: Every status a quarantine row can have.
STATUSES = (HELD, RELEASING, RELEASED, RELEASE_FAILED, DELETED)
#: Statuses from which a message may be released or deleted (an operator decision is pending).
UNDECIDED = (HELD, RELEASE_FAILED)

_STATUS_CHECK = "status IN (" + ", ".join(f"'{s}'" for s in STATUSES) + ")"


class QuarantineRow(Base):
    __tablename__ = "quarantine"

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    transaction_id: Mapped[str] = mapped_column(String(80))
    session_id: Mapped[str] = mapped_column(String(64))
    login: Mapped[str | None] = mapped_column(String(255), index=True)
    client_ip: Mapped[str | None] = mapped_column(String(64))
    mail_from: Mapped[str] = mapped_column(Text)
    recipients: Mapped[list[str]] = mapped_column(JSON)
    message_id: Mapped[str | None] = mapped_column(Text)
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    message: Mapped[bytes | None] = mapped_column(LargeBinary)
    smtputf8: Mapped[bool] = mapped_column(Boolean)
    body_8bitmime: Mapped[bool] = mapped_column(Boolean)
    check_id: Mapped[str] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))
    decided_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    decided_by: Mapped[str | None] = mapped_column(String(255))
    upstream_reply: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        Index("ix_quarantine_status_created_at", "status", "created_at"),
        CheckConstraint(_STATUS_CHECK, name="status"),
    )
