"""Compromised-account state per login, and the login's own sending baseline from the audit log.

What it does: :class:`SqlAccountState` keeps one ``account_state`` row per login that ever left
``ok`` (no row means ``ok``). Stages, lowest first: ``ok`` → ``flagged`` → ``held`` →
``suspended`` (:data:`STAGES`).

* :meth:`~SqlAccountState.get` reads a login's state, cached per login for ``max_age`` seconds
  (the SMTP hot path asks at every MAIL and end of data; a release made on another host takes
  effect within that time; a change made through this instance updates its cache at once).
* :meth:`~SqlAccountState.escalate` moves a login *up* to a stage (never down: a login already at
  or above it is left alone) — used by the ``account-guard`` check.
* :meth:`~SqlAccountState.set_stage` sets any stage — used by the operator (``mailward account
  release|suspend``). A move back to ``ok`` (a release) bumps the row's ``epoch``: the check keys
  its counters by it, so a released login starts with clean counters on every gateway instance.
* Each transition and its audit event (kinds ``account-flagged``, ``account-held``,
  ``account-suspended``, ``account-released``, :data:`EVENT_KINDS`, with the evidence in
  ``detail`` and a verdict of check ``account-guard``) are written in ONE database transaction,
  so no transition exists without its audit event and no event claims a transition that did not
  happen. The row is locked while it is decided (``SELECT … FOR UPDATE`` on PostgreSQL; SQLite
  serialises writers), so two gateway instances escalating the same login at once produce one
  transition, not two.
* :meth:`~SqlAccountState.baseline` measures what is normal for a login: over a past period, the
  mean number of sent messages and of distinct sent-to recipients per *active* window (a window
  of the given length in which the login sent at least one message), from the ``audit_record`` /
  ``audit_recipient`` rows. "Sent" is delivered or accepted into the queue (:data:`SENT`), the
  same volume account-guard counts in the current window.

Reads/writes: the ``account_state`` table (revision ``0004``); writes ``audit_record`` /
``audit_verdict`` rows for transitions; reads ``audit_record`` / ``audit_recipient`` for baselines.

Security notes: ``evidence`` holds counts, thresholds and client addresses, never message content;
``updated_by`` and the operator's reason are free text for the trail. Database and driver
exceptions become :class:`~gateway.core.errors.StoreUnavailable` here, with a one-line description
(no SQL, no parameters, the URL's password masked): the check then defers (fail closed), so a
suspended login is never let through because the database could not be asked.
"""

from __future__ import annotations

import builtins
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar, cast

from sqlalchemy import Integer, RowMapping, Table, and_, extract, func, select, update
from sqlalchemy import cast as sql_cast
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql.elements import ColumnElement

from gateway.audit.models import AuditRecipientRow, AuditRecordRow
from gateway.audit.store import SqlAuditStore
from gateway.core.model import Session, VerdictRecord, utcnow
from gateway.db.engine import SqlStore
from gateway.policystate.models import ACCOUNT_STAGES, AccountStateRow

T = TypeVar("T")

STAGES = ACCOUNT_STAGES
OK, FLAGGED, HELD, SUSPENDED = STAGES
RANK = {stage: i for i, stage in enumerate(STAGES)}
#: The audit kind of the event written when a login moves TO a stage.
EVENT_KINDS = {
    FLAGGED: "account-flagged",
    HELD: "account-held",
    SUSPENDED: "account-suspended",
    OK: "account-released",
}

ACCOUNT_STATE = cast(Table, AccountStateRow.__table__)
RECORD = cast(Table, AuditRecordRow.__table__)
RECIPIENT = cast(Table, AuditRecipientRow.__table__)
CACHE_MAX = 10_000
#: audit outcomes (and recipient statuses) that count as sent volume in a baseline
SENT = ("delivered", "queued")
TEXT_LIMIT = 255


def normalize(login: str) -> str:
    """The stored form of a login: stripped, lower-case (as the account store keeps it)."""
    return login.strip().lower()


@dataclass(frozen=True, slots=True)
class AccountState:
    """One login's state; ``since`` is None (and ``stage`` ``ok``) for a login never flagged."""

    login: str
    stage: str = OK
    since: datetime | None = None
    evidence: Mapping[str, Any] = field(default_factory=dict)
    updated_by: str = ""
    updated_at: datetime | None = None
    epoch: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (timestamps as ISO 8601 strings)."""
        return {
            "login": self.login,
            "stage": self.stage,
            "since": self.since.isoformat() if self.since else None,
            "evidence": dict(self.evidence),
            "updated_by": self.updated_by,
            "updated_at": self.updated_at.isoformat() if self.updated_at else None,
            "epoch": self.epoch,
        }


@dataclass(frozen=True, slots=True)
class Transition:
    """The outcome of :meth:`SqlAccountState.escalate` / :meth:`SqlAccountState.set_stage`:
    the state before and after, and the audit record id when the stage changed."""

    before: AccountState
    after: AccountState
    audit_id: int | None = None

    @property
    def changed(self) -> bool:
        return self.audit_id is not None


@dataclass(frozen=True, slots=True)
class Baseline:
    """A login's normal volume: means per active window over the measured period."""

    messages: float
    recipients: float
    active_windows: int
    messages_total: int


def _state(row: RowMapping) -> AccountState:
    return AccountState(
        login=row["login"],
        stage=row["stage"],
        since=row["since"],
        evidence=dict(row["evidence"] or {}),
        updated_by=row["updated_by"],
        updated_at=row["updated_at"],
        epoch=int(row["epoch"]),
    )


def _insert_if_absent(dialect: str, values: dict[str, Any]) -> Any:
    """INSERT of an ``ok`` row that does nothing when the login has a row already."""
    if dialect == "postgresql":
        return (
            postgresql.insert(ACCOUNT_STATE)
            .values(values)
            .on_conflict_do_nothing(index_elements=["login"])
        )
    return (
        sqlite.insert(ACCOUNT_STATE).values(values).on_conflict_do_nothing(index_elements=["login"])
    )


def _window_index(dialect: str, column: Any, seconds: int) -> ColumnElement[Any]:
    """Which window of ``seconds`` (counted from the Unix epoch) a timestamp column falls in."""
    if dialect == "postgresql":
        return func.floor(extract("epoch", column) / seconds)
    # SQLite stores UTC text; strftime('%s') is its Unix time; integer division floors (t >= 0)
    index: ColumnElement[Any] = sql_cast(func.strftime("%s", column), Integer) // seconds
    return index


class SqlAccountState(SqlStore):
    """Account states in the SQL database (see the module docstring)."""

    what = "account-state database"

    def __init__(self, engine: AsyncEngine, timeout: float) -> None:
        super().__init__(engine, timeout)
        self._cache: dict[str, tuple[float, AccountState]] = {}  # login -> (read at, state)

    # --- plumbing ---------------------------------------------------------------------------------

    def _remember(self, state: AccountState) -> None:
        if len(self._cache) >= CACHE_MAX:
            self._cache.clear()
        self._cache[state.login] = (time.monotonic(), state)

    # --- reads ------------------------------------------------------------------------------------

    async def get(self, login: str, *, max_age: float = 0.0) -> AccountState:
        """The login's state (``ok`` without a row); a cached answer up to ``max_age`` s old."""
        login = normalize(login)
        cached = self._cache.get(login)
        if cached is not None and time.monotonic() - cached[0] < max_age:
            return cached[1]

        async def fn(conn: AsyncConnection) -> AccountState:
            stmt = select(ACCOUNT_STATE).where(ACCOUNT_STATE.c.login == login)
            row = (await conn.execute(stmt)).mappings().first()
            return _state(row) if row is not None else AccountState(login)

        state = await self._run(fn, write=False)
        self._remember(state)
        return state

    async def list(self, stage: str | None = None) -> builtins.list[AccountState]:
        """Logins at ``stage``, or every login that is not ``ok``; by login."""
        if stage is not None and stage not in STAGES:
            raise ValueError(f"unknown account stage {stage!r}")
        stmt = select(ACCOUNT_STATE).order_by(ACCOUNT_STATE.c.login)
        if stage is None:
            stmt = stmt.where(ACCOUNT_STATE.c.stage != OK)
        else:
            stmt = stmt.where(ACCOUNT_STATE.c.stage == stage)

        async def fn(conn: AsyncConnection) -> builtins.list[AccountState]:
            return [_state(r) for r in (await conn.execute(stmt)).mappings()]

        return await self._run(fn, write=False)

    # --- transitions ------------------------------------------------------------------------------

    async def escalate(
        self,
        login: str,
        stage: str,
        *,
        evidence: Mapping[str, Any],
        updated_by: str,
        session: Session,
        detail: str,
        verdict: VerdictRecord | None = None,
    ) -> Transition:
        """Move ``login`` up to ``stage`` and audit it; nothing changes (``changed`` false) when
        the login is at that stage or above already. The audit event's detail is
        ``"<from> -> <to>: <detail>"``; the stored evidence gets ``"from"``. Raises
        StoreUnavailable."""
        return await self._transition(
            login, stage, True, evidence, updated_by, session, detail, verdict
        )

    async def set_stage(
        self,
        login: str,
        stage: str,
        *,
        evidence: Mapping[str, Any],
        updated_by: str,
        session: Session,
        detail: str,
        verdict: VerdictRecord | None = None,
    ) -> Transition:
        """Set ``login`` to ``stage`` in either direction and audit it (the operator's release or
        suspension); a release to ``ok`` bumps the epoch. Raises StoreUnavailable."""
        return await self._transition(
            login, stage, False, evidence, updated_by, session, detail, verdict
        )

    async def _transition(
        self,
        login: str,
        stage: str,
        only_up: bool,
        evidence: Mapping[str, Any],
        updated_by: str,
        session: Session,
        detail: str,
        verdict: VerdictRecord | None,
    ) -> Transition:
        if stage not in STAGES:
            raise ValueError(f"unknown account stage {stage!r}")
        login = normalize(login)
        if not login:
            raise ValueError("empty login")
        by = updated_by[:TEXT_LIMIT]

        async def fn(conn: AsyncConnection) -> Transition:
            now = utcnow()
            # the INSERT takes SQLite's write lock before anything is read; on PostgreSQL the
            # row lock below serialises deciders
            await conn.execute(
                _insert_if_absent(
                    conn.dialect.name,
                    {
                        "login": login,
                        "stage": OK,
                        "since": now,
                        "evidence": {},
                        "updated_by": "",
                        "updated_at": now,
                        "epoch": 0,
                    },
                )
            )
            stmt = select(ACCOUNT_STATE).where(ACCOUNT_STATE.c.login == login).with_for_update()
            before = _state((await conn.execute(stmt)).mappings().one())
            if stage == before.stage or (only_up and RANK[stage] < RANK[before.stage]):
                return Transition(before, before)
            after = AccountState(
                login=login,
                stage=stage,
                since=now,
                evidence={**evidence, "from": before.stage},
                updated_by=by,
                updated_at=now,
                epoch=before.epoch + 1 if stage == OK else before.epoch,
            )
            await conn.execute(
                update(ACCOUNT_STATE)
                .where(ACCOUNT_STATE.c.login == login)
                .values(
                    stage=after.stage,
                    since=after.since,
                    evidence=dict(after.evidence),
                    updated_by=after.updated_by,
                    updated_at=after.updated_at,
                    epoch=after.epoch,
                )
            )
            audit_id = await SqlAuditStore.record_event_in(
                conn,
                session,
                EVENT_KINDS[stage],
                f"{before.stage} -> {stage}: {detail}",
                login,
                [verdict] if verdict is not None else [],
            )
            return Transition(before, after, audit_id)

        result = await self._run(fn, write=True)
        self._remember(result.after)  # what the database holds now
        return result

    # --- baseline ---------------------------------------------------------------------------------

    async def baseline(
        self, login: str, *, since: datetime, until: datetime, window: float
    ) -> Baseline:
        """Mean sent messages and distinct sent-to recipients per active window of
        ``window`` seconds, for messages of ``login`` started in [since, until).
        Raises StoreUnavailable."""
        login = normalize(login)
        seconds = max(1, round(window))

        async def fn(conn: AsyncConnection) -> Baseline:
            bucket = _window_index(conn.dialect.name, RECORD.c.started_at, seconds)
            mine = and_(
                func.lower(RECORD.c.login) == login,
                RECORD.c.kind == "message",
                RECORD.c.outcome.in_(SENT),
                RECORD.c.started_at >= since,
                RECORD.c.started_at < until,
            )
            total, active = (
                await conn.execute(select(func.count(), func.count(bucket.distinct())).where(mine))
            ).one()
            pairs = (
                select(bucket.label("w"), func.lower(RECIPIENT.c.address).label("a"))
                .select_from(RECIPIENT.join(RECORD, RECORD.c.id == RECIPIENT.c.record_id))
                .where(mine, RECIPIENT.c.status.in_(SENT))
                .distinct()
                .subquery()
            )
            recipients = (await conn.execute(select(func.count()).select_from(pairs))).scalar_one()
            active = int(active or 0)
            return Baseline(
                messages=int(total or 0) / active if active else 0.0,
                recipients=int(recipients or 0) / active if active else 0.0,
                active_windows=active,
                messages_total=int(total or 0),
            )

        return await self._run(fn, write=False)
