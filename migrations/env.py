"""Alembic environment for Mailward's schema (accounts, audit, policy state, quarantine).

What it does: runs the migration scripts on the connection handed over by
:mod:`gateway.db.migrate` (``config.attributes["connection"]``, a sync connection obtained through
``AsyncConnection.run_sync``). When Alembic is run some other way (its own CLI, for development:
``revision --autogenerate``), it opens an async engine for the URL in ``config.attributes["url"]``
or the ``sqlalchemy.url`` option and does the same through ``run_sync``.

Reads: the database; the model metadata (for autogenerate only; the scripts are explicit).

Security notes: the URL is never printed.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import Connection

import gateway.audit.models
import gateway.auth.models
import gateway.keys.models
import gateway.policystate.models
import gateway.quarantine.models
import gateway.queue.models  # noqa: F401  (register the tables on the metadata)
from gateway.db.base import Base
from gateway.db.engine import engine_for_url

config = context.config
target_metadata = Base.metadata


def run_on(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def run_with_url(url: str) -> None:
    engine = engine_for_url(url, pooled=False, statement_timeouts=False)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(run_on)
    finally:
        await engine.dispose()


def main() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        run_on(connection)
        return
    url = config.attributes.get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no database URL: use `mailward db upgrade` or set sqlalchemy.url")
    if context.is_offline_mode():
        context.configure(url=url, target_metadata=target_metadata, literal_binds=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    asyncio.run(run_with_url(url))


main()
