"""Alembic migrations up, down and up again on every backend; engine settings on SQLite."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, String, inspect, text
from sqlalchemy.exc import IntegrityError

import gateway.audit.models
import gateway.auth.models
import gateway.keys.models
import gateway.policystate.models
import gateway.quarantine.models
import gateway.queue.models  # noqa: F401  (registers the tables)
from gateway.config import Config
from gateway.core.errors import StoreUnavailable
from gateway.db.base import Base
from gateway.db.engine import create_engine, engine_for_url
from gateway.db.migrate import MigrationError, current, downgrade, head_revision, upgrade
from tests.fixtures.db import make_db_config, unreachable_url

REPO = Path(__file__).resolve().parents[2]
TABLES_0001 = {
    "account",
    "account_address",
    "send_as_grant",
    "audit_record",
    "audit_recipient",
    "audit_verdict",
}
# each revision and the tables the schema has once it is applied
REVISIONS = [
    ("0001", TABLES_0001),
    ("0002", TABLES_0001 | {"limit_override"}),
    ("0003", TABLES_0001 | {"limit_override", "quarantine"}),
    ("0004", TABLES_0001 | {"limit_override", "quarantine", "account_state"}),
    ("0005", TABLES_0001 | {"limit_override", "quarantine", "account_state"}),
    (
        "0006",
        TABLES_0001
        | {"limit_override", "quarantine", "account_state"}
        | {"queue_message", "queue_copy", "queue_recipient"},
    ),
    (
        "0007",
        TABLES_0001
        | {"limit_override", "quarantine", "account_state"}
        | {"queue_message", "queue_copy", "queue_recipient"}
        | {"encryption_key", "encryption_key_address"},
    ),
    (
        "0008",
        TABLES_0001
        | {"limit_override", "quarantine", "account_state"}
        | {"queue_message", "queue_copy", "queue_recipient"}
        | {"encryption_key", "encryption_key_address"},
    ),
    (
        "0009",
        TABLES_0001
        | {"limit_override", "quarantine", "account_state"}
        | {"queue_message", "queue_copy", "queue_recipient"}
        | {"encryption_key", "encryption_key_address", "encryption_key_generation"},
    ),
]
TABLES = REVISIONS[-1][1]
HEAD = REVISIONS[-1][0]


async def _tables(url: str) -> set[str]:
    engine = engine_for_url(url, pooled=False)
    try:
        async with engine.connect() as conn:
            names: list[str] = await conn.run_sync(lambda c: inspect(c).get_table_names())
    finally:
        await engine.dispose()
    return set(names) - {"alembic_version"}


async def test_upgrade_downgrade_upgrade(empty_db_url: str) -> None:
    assert await current(empty_db_url) is None
    assert await _tables(empty_db_url) == set()

    await upgrade(empty_db_url)
    assert await current(empty_db_url) == head_revision() == HEAD
    assert await _tables(empty_db_url) == TABLES

    await downgrade(empty_db_url, "base")
    assert await current(empty_db_url) is None
    assert await _tables(empty_db_url) == set()

    await upgrade(empty_db_url, "0001")
    assert await current(empty_db_url) == "0001"
    assert await _tables(empty_db_url) == TABLES_0001
    await upgrade(empty_db_url)
    await upgrade(empty_db_url)  # already at head: nothing to do, no error
    assert await current(empty_db_url) == HEAD


async def test_every_revision_steps_down_and_up(empty_db_url: str) -> None:
    """Walk the chain one revision at a time, down to base and back, checking the tables."""
    for revision, tables in REVISIONS:
        await upgrade(empty_db_url, revision)
        assert await current(empty_db_url) == revision
        assert await _tables(empty_db_url) == tables
    for i in range(len(REVISIONS) - 1, -1, -1):
        previous = REVISIONS[i - 1][0] if i else "base"
        await downgrade(empty_db_url, previous)
        expected = REVISIONS[i - 1][1] if i else set()
        assert await _tables(empty_db_url) == expected


async def _execute(url: str, statement: str, **params: Any) -> list[Any]:
    engine = engine_for_url(url, pooled=False)
    try:
        async with engine.begin() as conn:
            result = await conn.execute(text(statement), params)
            return list(result.all()) if result.returns_rows else []
    finally:
        await engine.dispose()


async def _kind_width(url: str) -> int | None:
    engine = engine_for_url(url, pooled=False)
    try:
        async with engine.connect() as conn:
            columns = await conn.run_sync(lambda c: inspect(c).get_columns("audit_record"))
    finally:
        await engine.dispose()
    kind = next(c for c in columns if c["name"] == "kind")
    assert isinstance(kind["type"], String)
    return kind["type"].length


async def _audit_row(url: str, record_id: int, kind: str) -> None:
    """An audit record of ``kind`` with one recipient and one verdict (children that must
    survive a change of the parent table)."""
    await _execute(
        url,
        "INSERT INTO audit_record (id, kind, started_at, session_id, login) "
        "VALUES (:id, :kind, :at, :session, 'alice')",
        id=record_id,
        kind=kind,
        at=datetime(2026, 12, 1, tzinfo=UTC),
        session=f"s{record_id}",
    )
    await _execute(
        url,
        "INSERT INTO audit_recipient (record_id, position, address, status, reply) "
        "VALUES (:id, 0, 'bob@example.org', 'accepted', '250 2.1.5 Ok')",
        id=record_id,
    )
    await _execute(
        url,
        "INSERT INTO audit_verdict (record_id, position, check_id, stage, action, mode, applied, "
        "reply, reason) VALUES (:id, 0, 'account-guard', 'mail', 'continue', 'enforce', :t, '', "
        "'why')",
        id=record_id,
        t=True,
    )


async def _audit_state(url: str) -> tuple[list[Any], int, int]:
    kinds = await _execute(url, "SELECT id, kind FROM audit_record ORDER BY id")
    recipients = await _execute(url, "SELECT count(*) FROM audit_recipient")
    verdicts = await _execute(url, "SELECT count(*) FROM audit_verdict")
    return [tuple(r) for r in kinds], recipients[0][0], verdicts[0][0]


async def test_0005_widens_the_kind_and_renames_account_kinds(empty_db_url: str) -> None:
    """0005 renames the stored acct-* kinds to account-* and back, widens kind to 32 characters
    and back, and keeps every record with its recipients and verdicts (on SQLite, a table copy
    would cascade-delete them)."""
    await upgrade(empty_db_url, "0004")
    old = ["acct-flagged", "acct-held", "acct-suspended", "acct-released", "message"]
    for i, kind in enumerate(old, 1):
        await _audit_row(empty_db_url, i, kind)
    assert await _kind_width(empty_db_url) == 16

    await upgrade(empty_db_url, "0005")
    new = ["account-flagged", "account-held", "account-suspended", "account-released", "message"]
    assert await _audit_state(empty_db_url) == (list(enumerate(new, 1)), 5, 5)
    assert await _kind_width(empty_db_url) == 32
    # the wider column takes the longest kind (PostgreSQL enforces the width)
    await _audit_row(empty_db_url, 6, "quarantine-release-failed")
    with pytest.raises(MigrationError, match="quarantine-release-failed"):
        await downgrade(empty_db_url, "0004")
    assert await current(empty_db_url) == "0005"  # refused: nothing changed
    assert await _audit_state(empty_db_url) == (
        [*enumerate(new, 1), (6, "quarantine-release-failed")],
        6,
        6,
    )

    await _execute(empty_db_url, "DELETE FROM audit_record WHERE id = 6")
    await downgrade(empty_db_url, "0004")
    assert await _audit_state(empty_db_url) == (list(enumerate(old, 1)), 5, 5)
    assert await _kind_width(empty_db_url) == 16
    await upgrade(empty_db_url)
    assert await _audit_state(empty_db_url) == (list(enumerate(new, 1)), 5, 5)


async def test_0005_keeps_the_audit_indexes(empty_db_url: str, db_backend: str) -> None:
    await upgrade(empty_db_url)
    await downgrade(empty_db_url, "0004")
    await upgrade(empty_db_url)
    query = (
        "SELECT name FROM sqlite_master WHERE type = 'index'"
        if db_backend == "sqlite"
        else "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema()"
    )
    names = {r[0] for r in await _execute(empty_db_url, query)}
    assert {
        "ix_audit_record_started_at",
        "ix_audit_record_session_id",
        "ix_audit_record_lower_login",
        "ix_audit_record_lower_mail_from",
    } <= names
    if db_backend == "sqlite":
        assert await _execute(empty_db_url, "PRAGMA integrity_check") == [("ok",)]
        assert await _execute(empty_db_url, "PRAGMA foreign_key_check") == []


async def test_models_match_the_migrated_schema(db_url: str) -> None:
    """The ORM description and the head revision agree (autogenerate finds nothing to change)."""
    engine = engine_for_url(db_url, pooled=False)

    def diff(conn: Connection) -> list[Any]:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(context, Base.metadata))

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SQLite cannot reflect expression indexes
            async with engine.connect() as conn:
                differences = await conn.run_sync(diff)
    finally:
        await engine.dispose()
    assert differences == []


async def test_expression_indexes_exist(db_url: str, db_backend: str) -> None:
    engine = engine_for_url(db_url, pooled=False)
    query = (
        "SELECT name FROM sqlite_master WHERE type = 'index'"
        if db_backend == "sqlite"
        else "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema()"
    )
    try:
        async with engine.connect() as conn:
            names = set((await conn.execute(text(query))).scalars())
    finally:
        await engine.dispose()
    assert {
        "ix_audit_record_started_at",
        "ix_audit_record_lower_login",
        "ix_audit_record_lower_mail_from",
        "ix_audit_recipient_lower_address",
        "ix_audit_verdict_check_id",
    } <= names


async def test_unknown_revision_is_a_migration_error(db_url: str) -> None:
    with pytest.raises(MigrationError, match="nope"):
        await upgrade(db_url, "nope")
    assert await current(db_url) == HEAD


async def test_unreachable_database_is_store_unavailable(db_backend: str, tmp_path: Path) -> None:
    url = unreachable_url(db_backend, tmp_path)
    with pytest.raises(StoreUnavailable) as info:
        await upgrade(url)
    assert "secret-pw" not in str(info.value)
    with pytest.raises(StoreUnavailable):
        await current(url)


async def test_sqlite_engine_settings(tmp_path: Path) -> None:
    """WAL, the configured synchronous level, busy_timeout, foreign keys; the directory is made."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'deep' / 'dir' / 'm.db'}"
    for synchronous, expected in (("normal", 1), ("full", 2)):
        config: Config = make_db_config(url, tmp_path, sqlite_synchronous=synchronous, timeout=3.0)
        engine = create_engine(config)
        try:
            async with engine.connect() as conn:
                mode = (await conn.execute(text("PRAGMA journal_mode"))).scalar()
                sync = (await conn.execute(text("PRAGMA synchronous"))).scalar()
                busy = (await conn.execute(text("PRAGMA busy_timeout"))).scalar()
                fks = (await conn.execute(text("PRAGMA foreign_keys"))).scalar()
        finally:
            await engine.dispose()
        assert (mode, sync, busy, fks) == ("wal", expected, 3000, 1)
    assert (tmp_path / "deep" / "dir" / "m.db").exists()


def test_migrations_run_from_any_directory(tmp_path: Path) -> None:
    """No alembic.ini and no dependence on the working directory: the scripts are found through
    gateway.config.shipped_dir (checkout here, gateway/_shipped in a wheel)."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'm.db'}"
    code = (
        "import asyncio, sys\n"
        "from gateway.db.migrate import upgrade, current\n"
        "asyncio.run(upgrade(sys.argv[1]))\n"
        "print(asyncio.run(current(sys.argv[1])))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", code, url],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == HEAD


async def test_0008_adds_and_drops_the_recipient_encryption_columns(
    empty_db_url: str, db_backend: str
) -> None:
    """0008 adds the five nullable encryption columns to audit_recipient and drops them again,
    in place: every audit record keeps its recipients and verdicts (no table copy, which on
    SQLite with foreign keys on would cascade-delete them)."""
    await upgrade(empty_db_url, "0007")
    await _audit_row(empty_db_url, 1, "message")
    await upgrade(empty_db_url, "0008")
    assert await _audit_state(empty_db_url) == ([(1, "message")], 1, 1)
    rows = await _execute(
        empty_db_url, "SELECT encryption_policy, encryption_decision FROM audit_recipient"
    )
    assert [tuple(r) for r in rows] == [(None, None)]
    await _audit_row(empty_db_url, 2, "message")
    await _execute(
        empty_db_url,
        "UPDATE audit_recipient SET encryption_policy = 'required', encryption_decision = "
        "'encrypted', encryption_format = 'openpgp', encryption_key = :fpr, encryption_reason "
        "= 'usable key' WHERE record_id = 2",
        fpr="A" * 40,
    )
    await downgrade(empty_db_url, "0007")
    assert await _audit_state(empty_db_url) == ([(1, "message"), (2, "message")], 2, 2)
    engine = engine_for_url(empty_db_url, pooled=False)
    try:
        async with engine.connect() as conn:
            columns = await conn.run_sync(lambda c: inspect(c).get_columns("audit_recipient"))
    finally:
        await engine.dispose()
    assert not [c["name"] for c in columns if c["name"].startswith("encryption_")]
    if db_backend == "sqlite":
        assert await _execute(empty_db_url, "PRAGMA foreign_key_check") == []
        assert await _execute(empty_db_url, "PRAGMA integrity_check") == [("ok",)]
    await upgrade(empty_db_url)
    assert await _audit_state(empty_db_url) == ([(1, "message"), (2, "message")], 2, 2)


async def test_0009_creates_the_key_generation_row_and_drops_it(empty_db_url: str) -> None:
    """0009 creates the key store's change counter with its one row at 0; only one row may exist;
    downgrading drops it."""
    await upgrade(empty_db_url, "0009")
    rows = await _execute(empty_db_url, "SELECT id, generation FROM encryption_key_generation")
    assert [tuple(r) for r in rows] == [(1, 0)]
    with pytest.raises(IntegrityError):
        await _execute(
            empty_db_url, "INSERT INTO encryption_key_generation (id, generation) VALUES (2, 0)"
        )
    await downgrade(empty_db_url, "0008")
    assert "encryption_key_generation" not in await _tables(empty_db_url)
