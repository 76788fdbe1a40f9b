"""Tables for operator-managed policy state: ``limit_override`` (time-boxed per-login limit tiers)
and ``account_state`` (compromised-account stage per login).

What it does: declares the query-side description of tables created by Alembic revisions ``0002``
and ``0004``. A ``limit_override`` row replaces the tiers of one limit (by id) for one login until
``until``; ``mailward limit override`` writes it, the ``rate-limit`` check reads it (cached briefly).
An ``account_state`` row holds one login's stage (``ok``, ``flagged``, ``held``, ``suspended``)
with the evidence of its last transition; the ``account-guard`` check raises it, ``mailward
account`` shows it and lets an operator release or suspend the login.

Reads: nothing.

Security notes: ``created_by``/``reason``/``updated_by`` are operator free text for the trail;
``evidence`` holds counts, thresholds and client addresses, never message content; no secrets.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, CheckConstraint, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from gateway.db.base import Base, BigIntId, UtcDateTime


class LimitOverride(Base):
    __tablename__ = "limit_override"

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    login: Mapped[str] = mapped_column(String(255), index=True)
    limit_id: Mapped[str] = mapped_column(String(64))
    tiers: Mapped[list[dict[str, object]]] = mapped_column(JSON)
    until: Mapped[datetime] = mapped_column(UtcDateTime)
    reason: Mapped[str] = mapped_column(Text, default="")
    created_by: Mapped[str] = mapped_column(String(255), default="")
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)


#: Stages of ``account_state`` (compromised-account detection, check ``account-guard``), lowest
#: first: the gateway only ever moves a login up this list; an operator moves it back to ``ok``.
ACCOUNT_STAGES = ("ok", "flagged", "held", "suspended")

_ACCOUNT_STAGE_CHECK = "stage IN (" + ", ".join(f"'{s}'" for s in ACCOUNT_STAGES) + ")"


class AccountStateRow(Base):
    """One login's compromised-account stage (revision ``0004``); no row means ``ok``.

    ``evidence`` is the JSON evidence of the last transition (signals, measured values,
    thresholds; or the operator's reason); ``epoch`` is bumped by each operator release so the
    check's counters start afresh (its limit-store keys include it)."""

    __tablename__ = "account_state"

    login: Mapped[str] = mapped_column(String(255), primary_key=True)
    stage: Mapped[str] = mapped_column(String(16), index=True)
    since: Mapped[datetime] = mapped_column(UtcDateTime)
    evidence: Mapped[dict[str, object]] = mapped_column(JSON)
    updated_by: Mapped[str] = mapped_column(String(255))
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)
    epoch: Mapped[int] = mapped_column(Integer, default=0)

    __table_args__ = (CheckConstraint(_ACCOUNT_STAGE_CHECK, name="stage"),)
