"""Operator-managed policy state in the database: time-boxed per-login limit overrides.

What it does: :class:`SqlPolicyState` writes and reads ``limit_override`` rows. The ``rate-limit``
check asks :meth:`SqlPolicyState.active_overrides` for a login's overrides; answers are cached for a
few seconds per login so the SMTP hot path does not query the database per transaction (an override
written by ``mailward limit override`` on any host takes effect within ``cache_seconds``).

Reads: the ``limit_override`` table.

Security notes: database exceptions are translated to StoreUnavailable here (the check then defers,
never fails open); nothing secret is stored.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import delete, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from gateway.core.errors import GatewayError
from gateway.core.model import utcnow
from gateway.db.engine import SqlStore
from gateway.policystate.models import LimitOverride

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class OverrideInfo:
    id: int
    login: str
    limit_id: str
    tiers: tuple[dict[str, Any], ...]
    until: datetime
    reason: str
    created_by: str
    created_at: datetime


class OverrideNotFound(GatewayError):
    """No limit override with that id."""


class SqlPolicyState(SqlStore):
    what = "policy database"

    def __init__(self, engine: AsyncEngine, timeout: float, *, cache_seconds: float = 5.0) -> None:
        super().__init__(engine, timeout)
        self._cache_seconds = cache_seconds
        self._cache: dict[str, tuple[float, dict[str, list[dict[str, Any]]]]] = {}

    # --- limit overrides --------------------------------------------------------------------------
    async def add_limit_override(
        self,
        login: str,
        limit_id: str,
        tiers: list[dict[str, Any]],
        until: datetime,
        *,
        reason: str = "",
        created_by: str = "",
    ) -> int:
        login = login.strip().lower()

        async def fn(conn: AsyncConnection) -> int:
            result = await conn.execute(
                insert(LimitOverride)
                .values(
                    login=login,
                    limit_id=limit_id,
                    tiers=tiers,
                    until=until,
                    reason=reason,
                    created_by=created_by,
                    created_at=utcnow(),
                )
                .returning(LimitOverride.id)
            )
            return int(result.scalar_one())

        new_id = await self._run(fn, write=True)
        self._cache.pop(login, None)
        return new_id

    async def remove_limit_override(self, override_id: int) -> None:
        async def fn(conn: AsyncConnection) -> int:
            result = await conn.execute(
                delete(LimitOverride).where(LimitOverride.id == override_id)
            )
            return int(result.rowcount or 0)

        if await self._run(fn, write=True) == 0:
            raise OverrideNotFound(f"no limit override with id {override_id}")
        self._cache.clear()

    async def list_limit_overrides(
        self, login: str | None = None, *, include_expired: bool = False
    ) -> list[OverrideInfo]:
        stmt = select(LimitOverride).order_by(LimitOverride.id)
        if login is not None:
            stmt = stmt.where(LimitOverride.login == login.strip().lower())
        if not include_expired:
            stmt = stmt.where(LimitOverride.until > utcnow())

        async def fn(conn: AsyncConnection) -> list[OverrideInfo]:
            rows = (await conn.execute(stmt)).mappings().all()
            return [
                OverrideInfo(
                    r["id"],
                    r["login"],
                    r["limit_id"],
                    tuple(r["tiers"]),
                    r["until"],
                    r["reason"],
                    r["created_by"],
                    r["created_at"],
                )
                for r in rows
            ]

        return await self._run(fn, write=False)

    async def active_overrides(self, login: str) -> dict[str, list[dict[str, Any]]]:
        """limit id → tiers (raw tables) of the newest unexpired override, for ``login``."""
        login = login.lower()
        now = time.monotonic()
        cached = self._cache.get(login)
        if cached is not None and cached[0] > now:
            return cached[1]
        overrides = await self.list_limit_overrides(login)
        active: dict[str, list[dict[str, Any]]] = {}
        for o in overrides:  # oldest first: a newer override for the same limit wins
            active[o.limit_id] = list(o.tiers)
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[login] = (now + self._cache_seconds, active)
        return active
