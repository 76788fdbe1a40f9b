"""Wider audit kinds: ``audit_record.kind`` VARCHAR(16) -> VARCHAR(32); account kinds renamed.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05

The compromised-account stage kinds were abbreviated to fit 16 characters; with room for operator
events (``quarantine-release-failed``) they get their full names in stored rows:
``acct-flagged`` -> ``account-flagged``, ``acct-held`` -> ``account-held``, ``acct-suspended`` ->
``account-suspended``, ``acct-released`` -> ``account-released``. Downgrade renames them back and
narrows the column again.

SQLite: the column is changed in place (the declared type in ``sqlite_schema``, SQLite's documented
procedure for changes that leave the stored data untouched: VARCHAR(16) and VARCHAR(32) both have
TEXT affinity and SQLite enforces no length). ``batch_alter_table`` is not used on purpose: it
copies the table and drops the original, and with ``foreign_keys=ON`` (as Mailward connects) that
DROP cascades to every ``audit_recipient`` and ``audit_verdict`` row; it would also lose the
``lower(...)`` expression indexes, which SQLite cannot reflect. PostgreSQL: ``ALTER COLUMN TYPE``.

Security notes: no data is read or logged beyond the kind column. Downgrading refuses (and changes
nothing) while audit rows hold kinds longer than 16 characters, which revision 0004 cannot store:
a migration never truncates or drops audit records.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from alembic.util import CommandError

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

RENAMED = {
    "acct-flagged": "account-flagged",
    "acct-held": "account-held",
    "acct-suspended": "account-suspended",
    "acct-released": "account-released",
}
_KIND_COLUMN = re.compile(r"(\bkind\s+)VARCHAR\((\d+)\)", re.IGNORECASE)


def _rename(mapping: dict[str, str]) -> None:
    for old, new in mapping.items():
        op.execute(
            sa.text("UPDATE audit_record SET kind = :new WHERE kind = :old").bindparams(
                old=old, new=new
            )
        )


def _sqlite_set_kind_length(old: int, new: int) -> None:
    bind = op.get_bind()
    sql = bind.execute(
        sa.text("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'audit_record'")
    ).scalar_one()
    matches = _KIND_COLUMN.findall(sql)
    if len(matches) != 1 or int(matches[0][1]) != old:
        raise CommandError(f"audit_record.kind is not declared VARCHAR({old}); schema not changed")
    new_sql = _KIND_COLUMN.sub(lambda m: f"{m.group(1)}VARCHAR({new})", sql)
    version = bind.execute(sa.text("PRAGMA schema_version")).scalar_one()
    bind.execute(sa.text("PRAGMA writable_schema = ON"))
    try:
        bind.execute(
            sa.text(
                "UPDATE sqlite_master SET sql = :sql WHERE type = 'table' AND name = 'audit_record'"
            ).bindparams(sql=new_sql)
        )
        # a new schema version makes every connection re-read the schema
        bind.execute(sa.text(f"PRAGMA schema_version = {int(version) + 1}"))
    finally:
        bind.execute(sa.text("PRAGMA writable_schema = OFF"))


def _set_kind_length(old: int, new: int) -> None:
    if op.get_bind().dialect.name == "sqlite":
        _sqlite_set_kind_length(old, new)
        return
    op.alter_column(
        "audit_record",
        "kind",
        existing_type=sa.String(old),
        type_=sa.String(new),
        existing_nullable=False,
    )


def upgrade() -> None:
    _set_kind_length(16, 32)
    _rename(RENAMED)


def downgrade() -> None:
    _rename({new: old for old, new in RENAMED.items()})
    too_long = op.get_bind().execute(
        sa.text("SELECT DISTINCT kind FROM audit_record WHERE length(kind) > 16 ORDER BY kind")
    )
    kinds = list(too_long.scalars())
    if kinds:  # CommandError: `mailward db downgrade` reports it as a refused migration
        raise CommandError(
            "cannot downgrade below 0005: audit_record holds kinds longer than 16 characters "
            f"({', '.join(kinds)}); revision 0004 cannot store them and audit records are "
            "never truncated or deleted by a migration"
        )
    _set_kind_length(32, 16)
