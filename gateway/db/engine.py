"""The async database engine (SQLAlchemy 2 + aiosqlite or psycopg 3) and DB error translation.

What it does: :func:`create_engine` builds the :class:`~sqlalchemy.ext.asyncio.AsyncEngine` for
``config.database_url``. On SQLite every new connection gets ``journal_mode=WAL``, the configured
``synchronous`` level, a ``busy_timeout`` and ``foreign_keys=ON``, and the database file's directory
is created. On PostgreSQL the pool size comes from the config, connections are pinged before use
and connecting is bounded by the database timeout. :func:`describe_db_error` turns a driver or
SQLAlchemy exception into one short line for logs and the CLI; :func:`is_data_error` tells a bad
row apart from an unreachable database. :class:`SqlStore` is the plumbing every SQL store shares
(bounded operations, errors translated into StoreUnavailable).

Reads: ``database.url``, ``database.sqlite_synchronous``, ``database.pool_size``,
``database.timeout`` and ``state_dir`` (through ``Config.database_url``). Creates the SQLite
database directory.

Security notes: URLs are only ever shown with the password masked (:func:`safe_url`). Error
descriptions use the driver's message, never SQLAlchemy's statement/parameter dump.
"""

from __future__ import annotations

import asyncio
import math
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal, TypeVar

import psycopg
from sqlalchemy import event, exc
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from gateway.config import Config
from gateway.core.errors import ConfigError, StoreUnavailable
from gateway.core.replies import Reply, sanitize_text

T = TypeVar("T")

SQLITE_DRIVER = "sqlite+aiosqlite"
POSTGRES_DRIVER = "postgresql+psycopg"
_SYNCHRONOUS = {"normal": "NORMAL", "full": "FULL"}


def parse_url(url: str) -> URL:
    """Parse and check a database URL (raises ConfigError naming ``database.url``)."""
    try:
        parsed = make_url(url)
    except exc.ArgumentError:
        raise ConfigError("configuration", "database.url", "not a valid database URL") from None
    driver = parsed.drivername
    if driver not in (SQLITE_DRIVER, POSTGRES_DRIVER):
        raise ConfigError(
            "configuration",
            "database.url",
            f"unsupported driver {driver!r}; use {SQLITE_DRIVER}:///PATH or "
            f"{POSTGRES_DRIVER}://user@host/db",
        )
    return parsed


def safe_url(url: str | URL) -> str:
    """The URL with its password masked, for messages."""
    try:
        parsed = make_url(url) if isinstance(url, str) else url
    except exc.ArgumentError:
        return "(invalid URL)"
    return parsed.render_as_string(hide_password=True)


def sqlite_path(url: URL) -> Path | None:
    """The database file of a SQLite URL (None for in-memory or URI-style databases)."""
    database = url.database or ""
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


def _ensure_sqlite_dir(url: URL) -> None:
    path = sqlite_path(url)
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise StoreUnavailable(
            f"cannot create the database directory {path.parent}: {error.strerror or error}"
        ) from None


def engine_for_url(
    url: str,
    *,
    sqlite_synchronous: Literal["normal", "full"] = "normal",
    timeout: float = 10.0,
    pool_size: int = 10,
    pooled: bool = True,
    statement_timeouts: bool = True,
) -> AsyncEngine:
    """An engine for ``url`` with Mailward's connection settings (see module docstring).

    ``timeout`` bounds lock waits (SQLite ``busy_timeout``; PostgreSQL ``lock_timeout``),
    statements (PostgreSQL ``statement_timeout``, unless ``statement_timeouts`` is false, as for
    migrations) and connecting. ``pooled=False`` uses a NullPool (one-shot tools: migrations).
    """
    parsed = parse_url(url)
    kwargs: dict[str, Any] = {}
    if not pooled:
        from sqlalchemy.pool import NullPool

        kwargs["poolclass"] = NullPool
    if parsed.drivername == SQLITE_DRIVER:
        _ensure_sqlite_dir(parsed)
        engine = create_async_engine(parsed, **kwargs)
        _install_sqlite_pragmas(engine, _SYNCHRONOUS[sqlite_synchronous], timeout)
        return engine
    if pooled:
        kwargs.update(pool_size=pool_size, max_overflow=max(2, pool_size // 2))
    seconds = max(1, math.ceil(timeout))
    connect_args: dict[str, Any] = {
        "connect_timeout": seconds,
        # A peer that vanished is noticed within about `timeout` seconds, not the TCP default.
        "keepalives": 1,
        "keepalives_idle": seconds,
        "keepalives_interval": max(1, seconds // 3),
        "keepalives_count": 3,
    }
    if statement_timeouts:
        ms = max(1, int(timeout * 1000))
        connect_args["options"] = f"-c statement_timeout={ms} -c lock_timeout={ms}"
    return create_async_engine(parsed, pool_pre_ping=True, connect_args=connect_args, **kwargs)


def create_engine(config: Config) -> AsyncEngine:
    """The engine for ``config.database_url`` (SQLite: WAL, synchronous, busy_timeout, FKs)."""
    db = config.database
    return engine_for_url(
        config.database_url,
        sqlite_synchronous=db.sqlite_synchronous,
        timeout=db.timeout,
        pool_size=db.pool_size,
    )


def _install_sqlite_pragmas(engine: AsyncEngine, synchronous: str, timeout: float) -> None:
    busy_ms = max(0, int(timeout * 1000))
    statements = (
        "PRAGMA journal_mode=WAL",
        f"PRAGMA synchronous={synchronous}",
        f"PRAGMA busy_timeout={busy_ms}",
        "PRAGMA foreign_keys=ON",
    )

    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        try:
            for statement in statements:
                cursor.execute(statement)
        finally:
            cursor.close()

    def probe(_dialect: Any, _record: Any, cargs: Any, cparams: Any) -> None:
        # aiosqlite bug: when opening the file fails, its worker thread later posts to the event
        # loop, which may be closed by then (a CLI run ends) and a traceback is printed. Opening
        # the file first with sqlite3 (microseconds, only for new pooled connections) makes such
        # failures raise here, before aiosqlite starts a thread.
        database = cargs[0] if cargs else cparams.get("database", "")
        if database and database != ":memory:":
            sqlite3.connect(database, uri=bool(cparams.get("uri")), timeout=0).close()

    event.listen(engine.sync_engine, "do_connect", probe)
    event.listen(engine.sync_engine, "connect", on_connect)


# --- error translation ----------------------------------------------------------------------------

_MISSING_SCHEMA = ("no such table", "undefinedtable", "does not exist")


def describe_db_error(error: BaseException) -> str:
    """One short, printable line describing a database failure (no SQL, no parameters)."""
    if isinstance(error, TimeoutError):
        return "timed out"
    source: BaseException = error
    if isinstance(error, exc.DBAPIError) and error.orig is not None:
        source = error.orig
    if isinstance(source, OSError) and source.strerror:
        text = source.strerror
    else:
        lines = str(source).strip().splitlines()
        text = lines[0] if lines else type(source).__name__
    text = text.split(" (Background on this error")[0]
    lowered = f"{type(source).__name__} {text}".lower()
    if any(marker in lowered for marker in _MISSING_SCHEMA) and "database" not in text.lower():
        text += " (is the schema installed? run: mailward db upgrade)"
    return sanitize_text(text, 300)


def is_data_error(error: BaseException) -> bool:
    """True when the statement was refused for its data (a bad row), not for connectivity."""
    return isinstance(error, exc.IntegrityError | exc.DataError) or (
        isinstance(error, exc.StatementError) and not isinstance(error, exc.DBAPIError)
    )


#: Exceptions the stores translate at their boundary (everything the driver stack may raise).
DB_ERRORS: tuple[type[BaseException], ...] = (
    exc.SQLAlchemyError,
    sqlite3.Error,
    psycopg.Error,
    OSError,
    TimeoutError,
)


@asynccontextmanager
async def open_engine(config: Config) -> AsyncIterator[AsyncEngine]:
    """An engine for the duration of a block (one-shot tools: the CLI), disposed afterwards."""
    engine = create_engine(config)
    try:
        yield engine
    finally:
        await engine.dispose()


class DetachedTimeouts:
    """Bound how long a caller waits for a database operation WITHOUT cancelling the operation.

    Cancelling a driver call midway (what ``asyncio.timeout`` does) can leave its connection
    inside a transaction, holding locks: on SQLite one abandoned INSERT then blocks every other
    writer. Instead, :meth:`run` stops *waiting* at the deadline (raising TimeoutError) and lets
    the operation finish or fail in the background, where its connection is cleaned up normally;
    the driver-level timeouts (busy_timeout, statement_timeout, connect_timeout) bound it.
    """

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds
        self._detached: set[asyncio.Task[Any]] = set()

    async def run(self, operation: Coroutine[Any, Any, T]) -> T:
        """The operation's result; TimeoutError after ``seconds`` (the operation goes on)."""
        task = asyncio.ensure_future(operation)
        try:
            return await asyncio.wait_for(asyncio.shield(task), self._seconds)
        finally:
            if not task.done():
                self._detached.add(task)
                task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[Any]) -> None:
        self._detached.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: it was reported to the caller as a timeout already

    async def drain(self) -> None:
        """Wait for every detached operation to end (at shutdown, before disposing the engine)."""
        if self._detached:
            await asyncio.gather(*self._detached, return_exceptions=True)


class SqlStore:
    """Plumbing shared by the SQL stores (policy state, account state, quarantine, queue...): every
    operation runs in its own connection (``write``: in a transaction), bounded by ``timeout``
    without being cancelled (:class:`DetachedTimeouts`), and database errors become
    :class:`~gateway.core.errors.StoreUnavailable` with ``what`` in the message and the store's
    ``reply``. Tasks a store leaves running on purpose (a write whose caller gave up, its
    compensation) are kept with :meth:`_detach` and awaited by :meth:`close`."""

    #: names the store in error messages ("queue database ... unavailable: ...")
    what = "database"
    #: the reply a caller gets when this store is unavailable (None: StoreUnavailable's own)
    unavailable_reply: Reply | None = None

    def __init__(self, engine: AsyncEngine, timeout: float) -> None:
        self._engine = engine
        self._timeout = timeout
        self._operations = DetachedTimeouts(timeout)
        self._detached: set[asyncio.Task[Any]] = set()

    async def close(self) -> None:
        """Wait for detached operations (writes whose callers gave up, compensations) to end."""
        while self._detached:
            await asyncio.gather(*self._detached, return_exceptions=True)
        await self._operations.drain()

    def _unavailable(self, error: BaseException) -> StoreUnavailable:
        return StoreUnavailable(
            f"{self.what} {safe_url(self._engine.url)} unavailable: {describe_db_error(error)}",
            reply=self.unavailable_reply,
        )

    async def _guarded(self, operation: Coroutine[Any, Any, T]) -> T:
        try:
            return await self._operations.run(operation)
        except DB_ERRORS as error:
            raise self._unavailable(error) from None

    async def _run(self, fn: Callable[[AsyncConnection], Awaitable[T]], *, write: bool) -> T:
        async def operation() -> T:
            ctx = self._engine.begin() if write else self._engine.connect()
            async with ctx as conn:
                return await fn(conn)

        return await self._guarded(operation())

    async def _custody_write(
        self,
        write: Callable[[AsyncConnection], Awaitable[int]],
        discard: Callable[[int], Awaitable[None]],
        *,
        what: str,
        reply: Reply | None = None,
    ) -> int:
        """Commit ``write`` (it returns the new row's id) for a caller that will answer a client
        ``250`` only if this returns: the write must be durable when it does, and must not stay
        when it does not.

        * Committed within ``timeout``: the id.
        * Not committed within ``timeout``: StoreUnavailable (``"<what> not committed within
          ..."``, ``reply``); the client retries. The write keeps running detached; if it commits
          late anyway, ``discard(id)`` undoes it (the client was told to retry, so keeping it would
          duplicate the message). A commit that lands just as the wait ends is kept and returned.
        * A database error: StoreUnavailable.
        * The caller cancelled (client gone): re-raised; a committed write is discarded, a
          pending one is discarded when it commits.

        ``discard`` must log what it could not undo (it runs detached; nobody awaits its
        result)."""
        abandoned = False

        async def operation() -> int:
            async with self._engine.begin() as conn:
                row_id = await write(conn)
            if abandoned:  # the caller gave up before the commit: the client retries
                await discard(row_id)
            return row_id

        task = asyncio.ensure_future(operation())
        try:
            return await asyncio.wait_for(asyncio.shield(task), self._timeout)
        except TimeoutError:
            if task.done() and not task.cancelled() and task.exception() is None:
                return task.result()  # committed just as the wait ended: durable, keep it
            abandoned = True
            self._detach(task)
            raise StoreUnavailable(
                f"{what} not committed within {self._timeout:g}s", reply=reply
            ) from None
        except DB_ERRORS as error:
            raise self._unavailable(error) from None
        except BaseException:  # cancelled: nobody will tell the client 250 for this write
            if task.done() and not task.cancelled() and task.exception() is None:
                self._detach(asyncio.ensure_future(discard(task.result())))
            else:
                abandoned = True
                self._detach(task)  # a failed task's exception is retrieved there
            raise

    def _detach(self, task: asyncio.Task[Any]) -> None:
        if task.done():
            self._retrieve(task)
            return
        self._detached.add(task)
        task.add_done_callback(self._retrieve)

    def _retrieve(self, task: asyncio.Task[Any]) -> None:
        self._detached.discard(task)
        if not task.cancelled():
            task.exception()  # reported to the caller already (or logged by the compensation)
