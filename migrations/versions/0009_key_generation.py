"""The key store's change counter: one row in ``encryption_key_generation``.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-27

``generation`` is incremented in the same database transaction as every change to the key store
(import, update, revocation, removal, verification; :class:`gateway.keys.store.SqlKeyStore`), never
by recording use. A gateway that caches key lookups (:class:`gateway.keys.directory.KeyDirectory`)
reads this one row to learn whether anything changed since it filled its cache, instead of
re-reading the keys per recipient. The table holds exactly one row (``id = 1``), inserted here.

Security notes: schema only; no key material. Downgrading drops the counter; gateways of the
previous revision do not read it.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    table = op.create_table(
        "encryption_key_generation",
        sa.Column("id", sa.Integer(), nullable=False, autoincrement=False),
        sa.Column("generation", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_encryption_key_generation"),
        sa.CheckConstraint("id = 1", name="ck_encryption_key_generation_single_row"),
    )
    op.bulk_insert(table, [{"id": 1, "generation": 0}])


def downgrade() -> None:
    op.drop_table("encryption_key_generation")
