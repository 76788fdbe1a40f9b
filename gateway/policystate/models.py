"""Tables for operator-managed policy state: ``limit_override`` (time-boxed per-login limit tiers).

What it does: declares the query-side description of tables created by Alembic revision ``0002``.
A ``limit_override`` row replaces the tiers of one limit (by id) for one login until ``until``;
``mailward limit override`` writes it, the ``rate-limit`` check reads it (cached briefly).

Reads: nothing.

Security notes: ``created_by``/``reason`` are operator free text for the trail; no secrets.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, String, Text
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
