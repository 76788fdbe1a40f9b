"""Account tables: logins with their password hashes, owned addresses/domains, send-as grants.

What it does: declares ``account`` (one row per SMTP AUTH login), ``account_address`` (the addresses
``user@domain`` and whole domains ``@domain`` a login owns; each pattern belongs to one account) and
``send_as_grant`` (further patterns a login may send as, without owning them). The schema is created
by the Alembic revision ``0001``; these classes are the query-side description of it.

Reads: nothing.

Security notes: ``password_hash`` holds an argon2id PHC string, never a password. Logins are stored
lower-case; patterns with a lower-case domain.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Boolean, ForeignKey, String, UniqueConstraint, false
from sqlalchemy.orm import Mapped, mapped_column

from gateway.db.base import Base, BigIntId, UtcDateTime

LOGIN_MAX = 255
PATTERN_MAX = 320


class Account(Base):
    __tablename__ = "account"

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    login: Mapped[str] = mapped_column(String(LOGIN_MAX), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    disabled: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)


class AccountAddress(Base):
    __tablename__ = "account_address"

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    account_id: Mapped[int] = mapped_column(
        BigIntId, ForeignKey("account.id", ondelete="CASCADE"), index=True
    )
    pattern: Mapped[str] = mapped_column(String(PATTERN_MAX), unique=True)


class SendAsGrant(Base):
    __tablename__ = "send_as_grant"
    __table_args__ = (UniqueConstraint("account_id", "pattern"),)

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    account_id: Mapped[int] = mapped_column(
        BigIntId, ForeignKey("account.id", ondelete="CASCADE"), index=True
    )
    pattern: Mapped[str] = mapped_column(String(PATTERN_MAX))
