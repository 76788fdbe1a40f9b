"""Contract of the account-state store (``SqlAccountState``) on every database backend.

Stages move up only through ``escalate`` and in any direction through ``set_stage``; every change is
one ``account_state`` row update plus one audit event (kind ``account-*``, verdict ``account-guard``)
in the same database transaction; concurrent escalations make one transition; a release bumps the
epoch; the baseline is the login's mean delivered messages and distinct recipients per active
window, from the audit tables. Every test runs on SQLite and, when MAILWARD_TEST_POSTGRES_URL is
set, on PostgreSQL (tests/fixtures/db.py).
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from gateway.app import Stores
from gateway.audit.store import SqlAuditStore
from gateway.core.errors import StoreUnavailable
from gateway.core.model import (
    Action,
    Identity,
    Mode,
    Recipient,
    RecipientStatus,
    Session,
    Stage,
    Transaction,
    VerdictRecord,
)
from gateway.db.engine import engine_for_url
from gateway.policystate.account_state import (
    FLAGGED,
    HELD,
    OK,
    SUSPENDED,
    SqlAccountState,
)
from tests.fixtures.db import unreachable_url

LOGIN = "alice@example.com"


def session(login: str | None = LOGIN, ip: str = "192.0.2.7") -> Session:
    s = Session(client_ip=ip, client_port=40000, listener="submission")
    s.identity = Identity(login=login, account_id=1 if login else None)
    return s


def verdict(stage: Stage = Stage.DATA, action: Action = Action.CONTINUE) -> VerdictRecord:
    return VerdictRecord(
        "account-guard",
        stage,
        action,
        Mode.ENFORCE,
        reply="",
        reason="score 1: volume 3 vs 2",
        measured="1",
        limit="x",
    )


async def escalate(store: SqlAccountState, stage: str, login: str = LOGIN, **kw: Any) -> Any:
    return await store.escalate(
        login,
        stage,
        evidence=kw.pop("evidence", {"score": 1.0}),
        updated_by="account-guard",
        session=kw.pop("session", session(login)),
        detail=kw.pop("detail", "score 1: volume 3 vs 2"),
        verdict=kw.pop("verdict", verdict()),
    )


async def test_a_login_without_a_row_is_ok(stores: Stores) -> None:
    state = await stores.account_state.get("Nobody@Example.com")
    assert (state.login, state.stage, state.since, state.epoch) == (
        "nobody@example.com",
        OK,
        None,
        0,
    )
    assert await stores.account_state.list() == []


async def test_escalate_moves_up_and_audits_in_the_same_transaction(stores: Stores) -> None:
    store = stores.account_state
    result = await escalate(store, FLAGGED, login="Alice@Example.com", evidence={"score": 1.5})
    assert result.changed and result.audit_id is not None
    assert (result.before.stage, result.after.stage) == (OK, FLAGGED)
    state = await store.get(LOGIN)
    assert state.stage == FLAGGED and state.since is not None and state.since.tzinfo is not None
    assert state.evidence == {"score": 1.5, "from": OK}
    assert state.updated_by == "account-guard" and state.epoch == 0

    record = await stores.audit.get_record(result.audit_id)
    assert record is not None
    assert (record.kind, record.login, record.client_ip) == ("account-flagged", LOGIN, "192.0.2.7")
    assert record.detail == "ok -> flagged: score 1: volume 3 vs 2"
    (v,) = record.verdicts
    assert (v.check_id, v.stage, v.action, v.mode, v.applied) == (
        "account-guard",
        "data",
        "continue",
        "enforce",
        True,
    )
    assert (v.reason, v.measured, v.limit) == ("score 1: volume 3 vs 2", "1", "x")

    # already there, or lower: nothing changes and nothing is audited
    for stage in (FLAGGED, OK):
        again = await escalate(store, stage)
        assert not again.changed and again.after.stage == FLAGGED
    held = await escalate(store, HELD, verdict=verdict(action=Action.HOLD))
    assert (held.before.stage, held.after.stage) == (FLAGGED, HELD)
    kinds = [r.kind for r in await stores.audit.list_records(login=LOGIN)]
    assert kinds == ["account-held", "account-flagged"]


async def test_set_stage_goes_both_ways_and_a_release_bumps_the_epoch(stores: Stores) -> None:
    store = stores.account_state
    cli = Session(client_ip="-", client_port=0, listener="cli")
    suspended = await store.set_stage(
        LOGIN,
        SUSPENDED,
        evidence={"operator": "cli:ops", "reason": "phished"},
        updated_by="cli:ops",
        session=cli,
        detail="suspended by operator cli:ops: phished",
    )
    assert (suspended.before.stage, suspended.after.stage) == (OK, SUSPENDED)
    released = await store.set_stage(
        LOGIN,
        OK,
        evidence={"operator": "cli:ops", "reason": ""},
        updated_by="cli:ops",
        session=cli,
        detail="released",
    )
    assert (released.before.stage, released.after.stage, released.after.epoch) == (
        SUSPENDED,
        OK,
        1,
    )
    noop = await store.set_stage(
        LOGIN, OK, evidence={}, updated_by="cli:ops", session=cli, detail="again"
    )
    assert not noop.changed and noop.after.epoch == 1
    events = await stores.audit.list_records(login=LOGIN)
    assert [(r.kind, r.listener, r.client_ip) for r in events] == [
        ("account-released", "cli", "-"),
        ("account-suspended", "cli", "-"),
    ]
    assert events[0].detail == "suspended -> ok: released"
    assert events[0].verdicts == ()


async def test_list_shows_logins_that_are_not_ok(stores: Stores) -> None:
    store = stores.account_state
    await escalate(store, FLAGGED, login="b@example.com")
    await escalate(store, HELD, login="a@example.com")
    await escalate(store, FLAGGED, login="c@example.com")
    cli = Session(client_ip="-", client_port=0, listener="cli")
    await store.set_stage(
        "c@example.com", OK, evidence={}, updated_by="cli", session=cli, detail="ok"
    )
    assert [(s.login, s.stage) for s in await store.list()] == [
        ("a@example.com", HELD),
        ("b@example.com", FLAGGED),
    ]
    assert [s.login for s in await store.list(OK)] == ["c@example.com"]
    assert [s.login for s in await store.list(FLAGGED)] == ["b@example.com"]
    with pytest.raises(ValueError):
        await store.list("bogus")
    with pytest.raises(ValueError):
        await escalate(store, "bogus")


async def test_concurrent_escalations_make_one_transition(stores: Stores) -> None:
    store = stores.account_state
    results = await asyncio.gather(*(escalate(store, HELD) for _ in range(8)))
    assert sum(r.changed for r in results) == 1
    assert all(r.after.stage == HELD for r in results)
    assert [r.kind for r in await stores.audit.list_records(login=LOGIN)] == ["account-held"]


async def test_no_transition_without_its_audit_event(
    stores: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*args: Any, **kwargs: Any) -> int:
        raise RuntimeError("audit insert failed")

    monkeypatch.setattr(SqlAuditStore, "record_event_in", staticmethod(broken))
    with pytest.raises(RuntimeError):
        await escalate(stores.account_state, SUSPENDED)
    monkeypatch.undo()
    assert (await stores.account_state.get(LOGIN)).stage == OK  # rolled back with the event


async def test_get_caches_for_max_age_and_a_local_change_updates_the_cache(
    stores: Stores, db_config: Any
) -> None:
    store = stores.account_state
    assert (await store.get(LOGIN, max_age=60)).stage == OK
    # a change made elsewhere (another instance, the CLI) is seen only after max_age ...
    other_engine = engine_for_url(db_config.database_url, timeout=5.0)
    other = SqlAccountState(other_engine, timeout=5.0)
    try:
        await escalate(other, FLAGGED)
    finally:
        await other.close()
        await other_engine.dispose()
    assert (await store.get(LOGIN, max_age=60)).stage == OK
    assert (await store.get(LOGIN)).stage == FLAGGED  # max_age 0: read now
    # ... while a change made through this store is seen at once
    assert (await store.get(LOGIN, max_age=60)).stage == FLAGGED
    await escalate(store, HELD)
    assert (await store.get(LOGIN, max_age=60)).stage == HELD


def delivered(login: str, when: datetime, rcpts: tuple[str, ...], outcome: str) -> Transaction:
    txn = Transaction(session(login), login, started_at=when)
    status = {"delivered": RecipientStatus.DELIVERED, "queued": RecipientStatus.QUEUED}.get(
        outcome, RecipientStatus.FAILED
    )
    txn.recipients = [Recipient(a, status, "250 ok") for a in rcpts]
    return txn


async def test_baseline_is_the_mean_per_active_window(stores: Stores) -> None:
    hour = 3600
    now = datetime.now(UTC)
    start = datetime.fromtimestamp(int(now.timestamp()) // hour * hour, UTC) - timedelta(days=3)
    a, b = start + timedelta(minutes=5), start + timedelta(days=1, minutes=50)
    history = [
        # window A: 3 messages, 2 distinct recipients (case-insensitive)
        ("Alice@Example.com", a, ("r1@example.net",), "delivered"),
        (LOGIN, a + timedelta(minutes=10), ("R1@example.net", "r2@example.net"), "delivered"),
        (LOGIN, a + timedelta(minutes=40), ("r2@example.net",), "delivered"),
        # window B: 1 message, 3 distinct recipients; accepted into the queue (upstream busy) is
        # sent volume like delivered mail
        (LOGIN, b, ("r1@example.net", "r3@example.net", "r4@example.net"), "queued"),
        # not counted: refused, another login, outside the period
        (LOGIN, b, ("x@example.net",), "rejected"),
        ("bob@example.com", a, ("r9@example.net",), "delivered"),
        (LOGIN, start - timedelta(days=10), ("old@example.net",), "delivered"),
        (LOGIN, now, ("now@example.net",), "delivered"),
    ]
    for login, when, rcpts, outcome in history:
        await stores.audit.record_transaction(delivered(login, when, rcpts, outcome), outcome)
    baseline = await stores.account_state.baseline(
        LOGIN, since=now - timedelta(days=7), until=now - timedelta(hours=1), window=hour
    )
    assert (baseline.active_windows, baseline.messages_total) == (2, 4)
    assert baseline.messages == pytest.approx(2.0)
    assert baseline.recipients == pytest.approx(2.5)

    empty = await stores.account_state.baseline(
        "new@example.com", since=now - timedelta(days=7), until=now, window=hour
    )
    assert (empty.messages, empty.recipients, empty.active_windows) == (0.0, 0.0, 0)


async def test_unreachable_database_is_store_unavailable(db_backend: str, tmp_path: Path) -> None:
    engine = engine_for_url(unreachable_url(db_backend, tmp_path), timeout=2.0)
    store = SqlAccountState(engine, timeout=2.0)
    try:
        with pytest.raises(StoreUnavailable) as info:
            await store.get(LOGIN)
        assert "secret-pw" not in str(info.value)
        with pytest.raises(StoreUnavailable):
            await escalate(store, FLAGGED)
        with pytest.raises(StoreUnavailable):
            await store.baseline(LOGIN, since=datetime.now(UTC), until=datetime.now(UTC), window=60)
    finally:
        await store.close()
        await engine.dispose()
