"""Initial schema: accounts (logins, owned addresses, send-as grants) and the audit log.

Revision ID: 0001
Revises:
Create Date: 2024-06-01

Security notes: migrations change the schema only; they never read or log account secrets or audit
content. ``account.password_hash`` holds argon2id hashes; the audit tables never hold message bodies.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _id() -> sa.types.TypeEngine[int]:
    """BIGINT, but INTEGER on SQLite so that the primary key is the autoincrementing rowid."""
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _ts() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "account",
        sa.Column("id", _id(), primary_key=True, autoincrement=True),
        sa.Column("login", sa.String(255), nullable=False),
        sa.Column("password_hash", sa.String(255), nullable=False),
        sa.Column("disabled", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("created_at", _ts(), nullable=False),
        sa.Column("updated_at", _ts(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_account"),
        sa.UniqueConstraint("login", name="uq_account_login"),
    )
    op.create_table(
        "account_address",
        sa.Column("id", _id(), primary_key=True, autoincrement=True),
        sa.Column("account_id", _id(), nullable=False),
        sa.Column("pattern", sa.String(320), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_account_address"),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["account.id"],
            name="fk_account_address_account_id_account",
            ondelete="CASCADE",
        ),
        sa.UniqueConstraint("pattern", name="uq_account_address_pattern"),
    )
    op.create_index("ix_account_address_account_id", "account_address", ["account_id"])
    op.create_table(
        "send_as_grant",
        sa.Column("id", _id(), primary_key=True, autoincrement=True),
        sa.Column("account_id", _id(), nullable=False),
        sa.Column("pattern", sa.String(320), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_send_as_grant"),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["account.id"],
            name="fk_send_as_grant_account_id_account",
            ondelete="CASCADE",
        ),
        sa.UniqueConstraint("account_id", "pattern", name="uq_send_as_grant_account_id_pattern"),
    )
    op.create_index("ix_send_as_grant_account_id", "send_as_grant", ["account_id"])

    op.create_table(
        "audit_record",
        sa.Column("id", _id(), primary_key=True, autoincrement=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=True),
        sa.Column("started_at", _ts(), nullable=False),
        sa.Column("ended_at", _ts(), nullable=True),
        sa.Column("session_id", sa.String(64), nullable=False),
        sa.Column("transaction_id", sa.String(80), nullable=True),
        sa.Column("listener", sa.Text(), nullable=True),
        sa.Column("client_ip", sa.String(64), nullable=True),
        sa.Column("client_port", sa.Integer(), nullable=True),
        sa.Column("tls_version", sa.Text(), nullable=True),
        sa.Column("tls_cipher", sa.Text(), nullable=True),
        sa.Column("helo", sa.Text(), nullable=True),
        sa.Column("login", sa.Text(), nullable=True),
        sa.Column("mail_from", sa.Text(), nullable=True),
        sa.Column("message_id", sa.Text(), nullable=True),
        sa.Column("size", sa.BigInteger(), nullable=True),
        sa.Column("sha256", sa.String(64), nullable=True),
        sa.Column("final_reply", sa.Text(), nullable=True),
        sa.Column("upstream_reply", sa.Text(), nullable=True),
        sa.Column("queue_id", sa.Text(), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("incident", sa.String(64), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_audit_record"),
    )
    op.create_index("ix_audit_record_started_at", "audit_record", ["started_at"])
    op.create_index("ix_audit_record_session_id", "audit_record", ["session_id"])
    op.create_index("ix_audit_record_lower_login", "audit_record", [sa.text("lower(login)")])
    op.create_index(
        "ix_audit_record_lower_mail_from", "audit_record", [sa.text("lower(mail_from)")]
    )

    op.create_table(
        "audit_recipient",
        sa.Column("record_id", _id(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("address", sa.Text(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reply", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("record_id", "position", name="pk_audit_recipient"),
        sa.ForeignKeyConstraint(
            ["record_id"],
            ["audit_record.id"],
            name="fk_audit_recipient_record_id_audit_record",
            ondelete="CASCADE",
        ),
    )
    op.create_index(
        "ix_audit_recipient_lower_address", "audit_recipient", [sa.text("lower(address)")]
    )

    op.create_table(
        "audit_verdict",
        sa.Column("record_id", _id(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("check_id", sa.String(64), nullable=False),
        sa.Column("stage", sa.String(16), nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("mode", sa.String(16), nullable=False),
        sa.Column("applied", sa.Boolean(), nullable=False),
        sa.Column("recipient", sa.Text(), nullable=True),
        sa.Column("reply", sa.Text(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("measured", sa.Text(), nullable=True),
        sa.Column("limit", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("record_id", "position", name="pk_audit_verdict"),
        sa.ForeignKeyConstraint(
            ["record_id"],
            ["audit_record.id"],
            name="fk_audit_verdict_record_id_audit_record",
            ondelete="CASCADE",
        ),
    )
    op.create_index("ix_audit_verdict_check_id", "audit_verdict", ["check_id"])


def downgrade() -> None:
    op.drop_index("ix_audit_verdict_check_id", table_name="audit_verdict")
    op.drop_table("audit_verdict")
    op.drop_index("ix_audit_recipient_lower_address", table_name="audit_recipient")
    op.drop_table("audit_recipient")
    op.drop_index("ix_audit_record_lower_mail_from", table_name="audit_record")
    op.drop_index("ix_audit_record_lower_login", table_name="audit_record")
    op.drop_index("ix_audit_record_session_id", table_name="audit_record")
    op.drop_index("ix_audit_record_started_at", table_name="audit_record")
    op.drop_table("audit_record")
    op.drop_index("ix_send_as_grant_account_id", table_name="send_as_grant")
    op.drop_table("send_as_grant")
    op.drop_index("ix_account_address_account_id", table_name="account_address")
    op.drop_table("account_address")
    op.drop_table("account")
