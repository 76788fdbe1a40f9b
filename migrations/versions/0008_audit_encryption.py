"""Per-recipient encryption in the audit: five nullable columns on ``audit_recipient``.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-10

``encryption_policy`` (``never``, ``opportunistic``, ``required``), ``encryption_decision``
(``encrypted``, ``clear``, ``refused``, ``deferred``, ``pre-encrypted``), ``encryption_format``
(``openpgp``, ``smime``), ``encryption_key`` (the fingerprint of the key used) and
``encryption_reason``: what the ``encryption`` check decided for the recipient. NULL in rows
written before this revision, and for recipients the check did not judge.

SQLite: the columns are added with ``ALTER TABLE ... ADD COLUMN`` (``op.add_column``) and dropped
with ``ALTER TABLE ... DROP COLUMN`` (SQLite 3.35+), both in place. ``batch_alter_table`` is not
used: it copies the table and drops the original, and with ``foreign_keys=ON`` that would be
unsafe for audit tables (see revision 0005). PostgreSQL: the same statements.

Security notes: schema only; no data is read or logged. Downgrading drops the five columns: the
recorded encryption decisions are lost, the rest of every audit record stays.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = (
    ("encryption_policy", sa.String(16)),
    ("encryption_decision", sa.String(16)),
    ("encryption_format", sa.String(16)),
    ("encryption_key", sa.String(64)),
    ("encryption_reason", sa.Text()),
)


def upgrade() -> None:
    for name, type_ in COLUMNS:
        op.add_column("audit_recipient", sa.Column(name, type_, nullable=True))


def downgrade() -> None:
    for name, _ in reversed(COLUMNS):
        op.drop_column("audit_recipient", name)
