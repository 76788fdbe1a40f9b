"""The encryption key store: ``encryption_key`` and ``encryption_key_address``.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-08

Security notes: schema only; no data is read or logged. The rows hold public keys and
certificates (never secret material) and canonical recipient addresses. Downgrading drops the
tables: every stored key is lost (the gateway then finds no key for any recipient).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

KINDS = ("openpgp", "smime")
SOURCES = ("user", "operator")
VERIFICATIONS = ("unverified", "verified")


def _id() -> sa.types.TypeEngine[int]:
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _ts() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN (" + ", ".join(f"'{v}'" for v in values) + ")"


def upgrade() -> None:
    op.create_table(
        "encryption_key",
        sa.Column("id", _id(), autoincrement=True),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("algorithm", sa.String(64), nullable=False),
        sa.Column("user_ids", sa.JSON(), nullable=False),
        sa.Column("created_at", _ts(), nullable=False),
        sa.Column("expires_at", _ts(), nullable=True),
        sa.Column("encryption_expires_at", _ts(), nullable=True),
        sa.Column("revoked", sa.Boolean(), nullable=False),
        sa.Column("revoked_at", _ts(), nullable=True),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("verification", sa.String(16), nullable=False),
        sa.Column("imported_at", _ts(), nullable=False),
        sa.Column("imported_by", sa.String(255), nullable=False),
        sa.Column("updated_at", _ts(), nullable=False),
        sa.Column("last_used_at", _ts(), nullable=True),
        sa.Column("material", sa.LargeBinary(), nullable=False),
        sa.Column("material_sha256", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_encryption_key"),
        sa.UniqueConstraint("fingerprint", name="uq_encryption_key_fingerprint"),
        sa.CheckConstraint(_in("kind", KINDS), name="ck_encryption_key_kind"),
        sa.CheckConstraint(_in("source", SOURCES), name="ck_encryption_key_source"),
        sa.CheckConstraint(
            _in("verification", VERIFICATIONS), name="ck_encryption_key_verification"
        ),
    )
    op.create_table(
        "encryption_key_address",
        sa.Column("key_id", _id(), nullable=False),
        sa.Column("address", sa.String(320), nullable=False),
        sa.PrimaryKeyConstraint("key_id", "address", name="pk_encryption_key_address"),
        sa.ForeignKeyConstraint(
            ["key_id"],
            ["encryption_key.id"],
            name="fk_encryption_key_address_key_id_encryption_key",
            ondelete="CASCADE",
        ),
    )
    op.create_index("ix_encryption_key_address_address", "encryption_key_address", ["address"])


def downgrade() -> None:
    op.drop_index("ix_encryption_key_address_address", table_name="encryption_key_address")
    op.drop_table("encryption_key_address")
    op.drop_table("encryption_key")
