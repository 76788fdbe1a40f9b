"""Compromised-account stage per login (check ``account-guard``, ``mailward account``).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03

Security notes: schema only; no data is read or logged. ``account_state.evidence`` will hold
counts, thresholds and client addresses (never message content); downgrading drops the table,
which releases every flagged, held or suspended login.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STAGES = ("ok", "flagged", "held", "suspended")


def upgrade() -> None:
    op.create_table(
        "account_state",
        sa.Column("login", sa.String(255), nullable=False),
        sa.Column("stage", sa.String(16), nullable=False),
        sa.Column("since", sa.DateTime(timezone=True), nullable=False),
        sa.Column("evidence", sa.JSON(), nullable=False),
        sa.Column("updated_by", sa.String(255), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=False, server_default="0"),
        sa.PrimaryKeyConstraint("login", name="pk_account_state"),
        sa.CheckConstraint(
            "stage IN (" + ", ".join(f"'{s}'" for s in STAGES) + ")",
            name="ck_account_state_stage",
        ),
    )
    op.create_index("ix_account_state_stage", "account_state", ["stage"])


def downgrade() -> None:
    op.drop_index("ix_account_state_stage", table_name="account_state")
    op.drop_table("account_state")
