"""Time-boxed per-login rate-limit overrides (``mailward limit override``).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26

Security notes: schema only; no data is read or logged.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "limit_override",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True),
        sa.Column("login", sa.String(255), nullable=False),
        sa.Column("limit_id", sa.String(64), nullable=False),
        sa.Column("tiers", sa.JSON(), nullable=False),
        sa.Column("until", sa.DateTime(timezone=True), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False, server_default=""),
        sa.Column("created_by", sa.String(255), nullable=False, server_default=""),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_limit_override"),
    )
    op.create_index("ix_limit_override_login", "limit_override", ["login"])


def downgrade() -> None:
    op.drop_index("ix_limit_override_login", table_name="limit_override")
    op.drop_table("limit_override")
