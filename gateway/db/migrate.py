"""Schema migrations (Alembic), driven programmatically with an async URL.

What it does: :func:`upgrade`, :func:`downgrade` and :func:`current` open a short-lived async engine
for the URL, and run Alembic's (synchronous) commands inside ``AsyncConnection.run_sync`` on one
connection and one transaction (PostgreSQL DDL is transactional: a failed upgrade leaves nothing
half-done). The Alembic configuration is built in code — there is no ``alembic.ini`` — with
``script_location`` pointing at the shipped ``migrations/`` directory (checkout or installed wheel,
see :func:`gateway.config.shipped_dir`); ``migrations/env.py`` picks up the shared connection from
``config.attributes["connection"]``.

Reads: the database named by the URL; the migration scripts in ``migrations/``.

Security notes: errors name the database with its password masked and carry the driver's one-line
message only. Database and Alembic exceptions are translated here into :class:`StoreUnavailable` /
:class:`MigrationError`.
"""

from __future__ import annotations

from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection

from gateway.config import shipped_dir
from gateway.core.errors import GatewayError, StoreUnavailable
from gateway.db.engine import DB_ERRORS, describe_db_error, engine_for_url, safe_url


class MigrationError(GatewayError):
    """Alembic refused the request (unknown revision, ambiguous heads...)."""


def alembic_config(url: str | None = None) -> AlembicConfig:
    """An Alembic configuration for the shipped migration scripts (no ini file)."""
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(shipped_dir("migrations")))
    if url is not None:
        # Kept out of the ini-style options: configparser would interpolate '%' in passwords.
        cfg.attributes["url"] = url
    return cfg


def head_revision() -> str | None:
    """The newest revision shipped with this version of Mailward."""
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def _run_command(connection: Connection, cfg: AlembicConfig, name: str, revision: str) -> None:
    cfg.attributes["connection"] = connection
    if name == "upgrade":
        command.upgrade(cfg, revision)
    else:
        command.downgrade(cfg, revision)


def _current(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


async def _with_connection(url: str, fn: Any, *args: Any) -> Any:
    engine = engine_for_url(url, pooled=False, statement_timeouts=False)
    try:
        async with engine.begin() as connection:
            return await connection.run_sync(fn, *args)
    except CommandError as error:
        raise MigrationError(f"migration refused: {error}") from None
    except DB_ERRORS as error:
        raise StoreUnavailable(
            f"database {safe_url(url)} unavailable: {describe_db_error(error)}"
        ) from None
    finally:
        await engine.dispose()


async def upgrade(url: str, revision: str = "head") -> None:
    """Bring the schema at ``url`` up to ``revision`` (default: the newest)."""
    await _with_connection(url, _run_command, alembic_config(url), "upgrade", revision)


async def downgrade(url: str, revision: str) -> None:
    """Take the schema at ``url`` down to ``revision`` (``base`` removes everything)."""
    await _with_connection(url, _run_command, alembic_config(url), "downgrade", revision)


async def current(url: str) -> str | None:
    """The revision the database at ``url`` is at (None: no Mailward schema)."""
    result: str | None = await _with_connection(url, _current)
    return result
