"""The durable queue: ``queue_message``, ``queue_copy``, ``queue_recipient``.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06

Security notes: schema only; no data is read or logged. The rows hold envelope addresses and
upstream replies; the message bytes live in the spool directory, which this migration does not
touch. Downgrading drops the tables: messages still queued are then no longer delivered (their
spool files stay until removed by hand).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COPY_STATES = ("queued", "held", "done", "corrupt", "deleted")
RECIPIENT_STATES = ("pending", "delivered", "bounced", "dropped")


def _id() -> sa.types.TypeEngine[int]:
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _ts() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def _check(states: tuple[str, ...]) -> str:
    return "state IN (" + ", ".join(f"'{s}'" for s in states) + ")"


def upgrade() -> None:
    op.create_table(
        "queue_message",
        sa.Column("id", _id(), autoincrement=True),
        sa.Column("txn_id", sa.String(80), nullable=False),
        sa.Column("mail_from", sa.Text(), nullable=False),
        sa.Column("login", sa.String(255), nullable=True),
        sa.Column("created_at", _ts(), nullable=False),
        sa.Column("expires_at", _ts(), nullable=False),
        sa.Column("smtputf8", sa.Boolean(), nullable=False),
        sa.Column("body_8bitmime", sa.Boolean(), nullable=False),
        sa.Column("is_bounce", sa.Boolean(), nullable=False),
        sa.Column("audit_id", sa.BigInteger(), nullable=True),
        sa.Column("message_id_header", sa.Text(), nullable=True),
        sa.Column("warned_at", _ts(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_queue_message"),
    )
    op.create_index("ix_queue_message_created_at", "queue_message", ["created_at"])
    op.create_table(
        "queue_copy",
        sa.Column("id", _id(), autoincrement=True),
        sa.Column("message_id", _id(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("spool_name", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt", _ts(), nullable=True),
        sa.Column("last_attempt", _ts(), nullable=True),
        sa.Column("last_reply", sa.Text(), nullable=True),
        sa.Column("claimed_by", sa.String(64), nullable=True),
        sa.Column("claim_until", _ts(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_queue_copy"),
        sa.ForeignKeyConstraint(
            ["message_id"],
            ["queue_message.id"],
            name="fk_queue_copy_message_id_queue_message",
            ondelete="CASCADE",
        ),
        sa.UniqueConstraint("spool_name", name="uq_queue_copy_spool_name"),
        sa.CheckConstraint(_check(COPY_STATES), name="ck_queue_copy_state"),
    )
    op.create_index("ix_queue_copy_message_id", "queue_copy", ["message_id"])
    op.create_index("ix_queue_copy_state_next_attempt", "queue_copy", ["state", "next_attempt"])
    op.create_table(
        "queue_recipient",
        sa.Column("copy_id", _id(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("address", sa.Text(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("last_reply", sa.Text(), nullable=True),
        sa.Column("status", sa.String(16), nullable=True),
        sa.Column("updated_at", _ts(), nullable=True),
        sa.PrimaryKeyConstraint("copy_id", "position", name="pk_queue_recipient"),
        sa.ForeignKeyConstraint(
            ["copy_id"],
            ["queue_copy.id"],
            name="fk_queue_recipient_copy_id_queue_copy",
            ondelete="CASCADE",
        ),
        sa.CheckConstraint(_check(RECIPIENT_STATES), name="ck_queue_recipient_state"),
    )


def downgrade() -> None:
    op.drop_table("queue_recipient")
    op.drop_index("ix_queue_copy_state_next_attempt", table_name="queue_copy")
    op.drop_index("ix_queue_copy_message_id", table_name="queue_copy")
    op.drop_table("queue_copy")
    op.drop_index("ix_queue_message_created_at", table_name="queue_message")
    op.drop_table("queue_message")
