"""The quarantine: messages held for review (``mailward quarantine``).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01

Security notes: schema only; no data is read or logged. ``quarantine.message`` will hold message
bodies (the bytes to relay on release); downgrading drops them with the table.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STATUSES = ("held", "releasing", "released", "release-failed", "deleted")


def upgrade() -> None:
    op.create_table(
        "quarantine",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("transaction_id", sa.String(80), nullable=False),
        sa.Column("session_id", sa.String(64), nullable=False),
        sa.Column("login", sa.String(255), nullable=True),
        sa.Column("client_ip", sa.String(64), nullable=True),
        sa.Column("mail_from", sa.Text(), nullable=False),
        sa.Column("recipients", sa.JSON(), nullable=False),
        sa.Column("message_id", sa.Text(), nullable=True),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("message", sa.LargeBinary(), nullable=True),
        sa.Column("smtputf8", sa.Boolean(), nullable=False),
        sa.Column("body_8bitmime", sa.Boolean(), nullable=False),
        sa.Column("check_id", sa.String(64), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("decided_by", sa.String(255), nullable=True),
        sa.Column("upstream_reply", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_quarantine"),
        sa.CheckConstraint(
            "status IN (" + ", ".join(f"'{s}'" for s in STATUSES) + ")",
            name="ck_quarantine_status",
        ),
    )
    op.create_index("ix_quarantine_status_created_at", "quarantine", ["status", "created_at"])
    op.create_index("ix_quarantine_login", "quarantine", ["login"])


def downgrade() -> None:
    op.drop_index("ix_quarantine_login", table_name="quarantine")
    op.drop_index("ix_quarantine_status_created_at", table_name="quarantine")
    op.drop_table("quarantine")
