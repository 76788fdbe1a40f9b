"""The queue's tables: ``queue_message``, ``queue_copy`` and ``queue_recipient``.

What it does: declares the query-side description of the tables created by Alembic revision
``0006`` (the vocabulary is in :mod:`gateway.queue.model`). One ``queue_message`` row per message in
custody (envelope sender, login, arrival and expiry, flags, whether it is a DSN, when its warning
DSN went out); one ``queue_copy`` row per upstream transaction it needs (state, spool file name,
size and SHA-256 of the bytes, attempts, next attempt, last reply, and the runner's claim:
``claimed_by`` / ``claim_until``); one ``queue_recipient`` row per recipient of a copy (state, last
reply, RFC 3463 status). The runner's due query (``state = 'queued' AND next_attempt <= now``,
oldest first) is served by ``ix_queue_copy_state_next_attempt``.

Reads: nothing.

Security notes: rows hold envelope addresses and upstream replies, never message bytes (those are
in the spool files).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
)
from sqlalchemy.orm import Mapped, mapped_column

from gateway.db.base import Base, BigIntId, UtcDateTime
from gateway.queue.model import COPY_STATES, RECIPIENT_STATES


def _check(states: tuple[str, ...]) -> str:
    return "state IN (" + ", ".join(f"'{s}'" for s in states) + ")"


class QueueMessageRow(Base):
    __tablename__ = "queue_message"

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    txn_id: Mapped[str] = mapped_column(String(80))
    mail_from: Mapped[str] = mapped_column(Text)
    login: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, index=True)
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime)
    smtputf8: Mapped[bool] = mapped_column(Boolean)
    body_8bitmime: Mapped[bool] = mapped_column(Boolean)
    is_bounce: Mapped[bool] = mapped_column(Boolean)
    audit_id: Mapped[int | None] = mapped_column(BigInteger)
    message_id_header: Mapped[str | None] = mapped_column(Text)
    warned_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


class QueueCopyRow(Base):
    __tablename__ = "queue_copy"

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    message_id: Mapped[int] = mapped_column(
        BigIntId, ForeignKey("queue_message.id", ondelete="CASCADE"), index=True
    )
    state: Mapped[str] = mapped_column(String(16))
    spool_name: Mapped[str] = mapped_column(String(64), unique=True)
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    attempts: Mapped[int] = mapped_column(Integer)
    next_attempt: Mapped[datetime | None] = mapped_column(UtcDateTime)
    last_attempt: Mapped[datetime | None] = mapped_column(UtcDateTime)
    last_reply: Mapped[str | None] = mapped_column(Text)
    claimed_by: Mapped[str | None] = mapped_column(String(64))
    claim_until: Mapped[datetime | None] = mapped_column(UtcDateTime)

    __table_args__ = (
        Index("ix_queue_copy_state_next_attempt", "state", "next_attempt"),
        CheckConstraint(_check(COPY_STATES), name="state"),
    )


class QueueRecipientRow(Base):
    __tablename__ = "queue_recipient"

    copy_id: Mapped[int] = mapped_column(
        BigIntId, ForeignKey("queue_copy.id", ondelete="CASCADE"), primary_key=True
    )
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    address: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16))
    last_reply: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str | None] = mapped_column(String(16))
    updated_at: Mapped[datetime | None] = mapped_column(UtcDateTime)

    __table_args__ = (CheckConstraint(_check(RECIPIENT_STATES), name="state"),)
