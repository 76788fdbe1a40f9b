"""Composition root: the one place that builds and wires Mailward's parts.

What it does: from a validated Config, builds the database engine and stores (the queue store
on the same engine), the relay, the pipeline, the durable queue's spool, custody and runner, and
the Gateway service, then the SMTP listeners; owns their start and orderly shutdown. The CLI calls
only what is here (and the stores' admin methods it returns).

Shutdown (SIGTERM, :meth:`GatewayApp.stop`): new connections are answered ``421 4.3.2`` while the
listeners stay open for the grace period (``smtp.shutdown_grace``); sessions with no transaction
in flight are closed with that 421 at once, the others after their transaction ends; whatever is
left at the end of the grace gets the 421 and is closed (its open transaction is abandoned and
audited: the client never got a 250 and sends it again). The queue runner stops at the same time
(deliveries in flight finish within the grace or are abandoned to their claim); the queue is kept.

The queue runner's worker id is stable: the host name and a hash of the spool directory and the
configured listeners, so a restarted gateway releases its own claims at start (nothing of them is
in flight: its listeners are bound, so no other live process has the same id) instead of waiting
for ``queue.claim_lease``. Each copy that reaches a final state is an audit event
(``queue-delivered``, ``queue-bounced``, ``queue-dropped``, ``queue-corrupt``), and so is a copy
found corrupt at start. Before listening, the audit records a crash left "relaying" (older than
any live transaction can be: :func:`relaying_bound`) are completed: "queued" when their message is
in the queue, else "interrupted".

Reads: the Config; through the parts it builds, the database, TLS files, the spool and the network.

Security notes: secrets (relay password) are resolved here, once, and handed to the part that needs
them; nothing here logs them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import logging
import signal
import socket
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.audit.store import SqlAuditStore
from gateway.auth.store import SqlAccountStore
from gateway.checks import SPECS
from gateway.checks.rate_limit import LimitAdmin
from gateway.config import Config, load_config, resolve_secret
from gateway.control import ControlServer, socket_path
from gateway.core.errors import ConfigError, GatewayError
from gateway.core.model import Session, utcnow
from gateway.crypto.plan import EncryptionPlanner
from gateway.db.engine import DB_ERRORS, create_engine, describe_db_error
from gateway.db.migrate import upgrade
from gateway.keys.directory import KeyDirectory
from gateway.keys.gpghome import KeyRing
from gateway.keys.store import SqlKeyStore
from gateway.pipeline.registry import build_pipeline
from gateway.pipeline.runner import Pipeline
from gateway.policystate.account_state import SqlAccountState
from gateway.policystate.store import SqlPolicyState
from gateway.quarantine.store import SqlQuarantine
from gateway.queue import dsn
from gateway.queue.model import BOUNCED, CORRUPT, DELIVERED, DROPPED, QueuedCopy, QueuedMessage
from gateway.queue.runner import QueueRunner, RunnerSettings
from gateway.queue.spool import Spool
from gateway.queue.store import SqlQueueStore
from gateway.ratelimit.memory import MemoryLimitStore
from gateway.ratelimit.redis_store import RedisLimitStore
from gateway.ratelimit.store import LimitStore
from gateway.relay.upstream import UpstreamRelay
from gateway.service import Custody, Gateway, GatewaySettings
from gateway.smtp.server import ListenerSettings, ServerContext, SmtpHandler, protocol_factory
from gateway.smtp.tls import ensure_self_signed, server_context

if TYPE_CHECKING:  # SQLAlchemy stays behind gateway/db, auth and audit
    from sqlalchemy.ext.asyncio import AsyncEngine

log = logging.getLogger("mailward.app")


@dataclass
class _PipelineDeps:
    """What checks may be built with (see each check's factory)."""

    config: Config
    limit_store: LimitStore
    policy_state: SqlPolicyState | None
    account_state: SqlAccountState | None = None
    key_store: KeyDirectory | None = None  # check encryption


def open_limit_store(config: Config) -> LimitStore:
    """The configured limit store: in-process memory or Redis (shared by many instances)."""
    url = config.limits.store
    if url == "memory://":
        return MemoryLimitStore()
    return RedisLimitStore(url, timeout=config.limits.store_timeout)


def make_pipeline(
    config: Config,
    source: str = "configuration",
    *,
    limit_store: LimitStore | None = None,
    policy_state: SqlPolicyState | None = None,
    account_state: SqlAccountState | None = None,
    key_store: KeyDirectory | None = None,
) -> Pipeline:
    store = limit_store if limit_store is not None else MemoryLimitStore()
    deps = _PipelineDeps(config, store, policy_state, account_state, key_store)
    return build_pipeline(config, SPECS, deps, source)


def validate_pipeline(config: Config, source: str) -> None:
    """Build the pipeline once to validate check ids, stages and options (raises ConfigError)."""
    make_pipeline(config, source)


@dataclass
class Stores:
    engine: AsyncEngine
    accounts: SqlAccountStore
    audit: SqlAuditStore
    policy: SqlPolicyState
    quarantine: SqlQuarantine
    account_state: SqlAccountState
    queue: SqlQueueStore
    keys: SqlKeyStore

    async def close(self) -> None:
        await self.audit.close()
        await self.accounts.close()
        await self.policy.close()
        await self.quarantine.close()
        await self.account_state.close()
        await self.queue.close()
        await self.keys.close()
        await self.engine.dispose()


async def open_stores(config: Config, *, migrate: bool | None = None) -> Stores:
    """Engine + account, audit (its group-commit writer started), policy, quarantine, account
    state and queue stores, all on that engine."""
    if migrate if migrate is not None else config.database.auto_migrate:
        await upgrade(config.database_url)
    engine = create_engine(config)
    accounts = SqlAccountStore(engine, timeout=config.database.timeout)
    audit = SqlAuditStore(
        engine,
        batch_size=config.audit.batch_size,
        timeout=config.database.timeout,
        linger=config.audit.batch_linger,
    )
    await audit.start()
    policy = SqlPolicyState(engine, timeout=config.database.timeout)
    quarantine = SqlQuarantine(engine, timeout=config.database.timeout)
    account_state = SqlAccountState(engine, timeout=config.database.timeout)
    queue = SqlQueueStore(
        engine, timeout=config.database.timeout, lifetime=config.queue.lifetime_seconds
    )
    keys = SqlKeyStore(engine, timeout=config.database.timeout)
    return Stores(engine, accounts, audit, policy, quarantine, account_state, queue, keys)


def key_directory(config: Config, store: SqlKeyStore) -> KeyDirectory:
    """The key store as the hot path reads it: cached lookups validated against the store's
    change counter, ``last_used_at`` written at a bounded rate (``[keys]`` settings)."""
    return KeyDirectory(
        store,
        refresh=config.keys.lookup_refresh,
        max_entries=config.keys.lookup_cache_size,
        last_used_resolution=config.keys.last_used_resolution,
    )


def encryption_planner(
    config: Config, keys: KeyDirectory, *, gpg_workers: int | None = None
) -> EncryptionPlanner:
    """The delivery planner that encrypts per recipient (check ``encryption``); ``gpg_workers``
    overrides ``keys.gpg_workers`` (a one-off command passes 0: no worker processes). Close it
    after use (:meth:`EncryptionPlanner.close`)."""
    return EncryptionPlanner(
        KeyRing.from_config(config),
        keys,
        gpg=config.keys.gpg,
        gpg_workers=config.keys.gpg_worker_count if gpg_workers is None else gpg_workers,
    )


def gateway_hostname(config: Config) -> str:
    return config.smtp.hostname or socket.getfqdn()


def queue_worker_id(config: Config) -> str:
    """The queue runner's stable worker id: ``<host>:<hash>`` of the spool directory and the
    configured listeners (two live processes cannot bind the same listeners)."""
    listeners = ",".join(f"{x.address}:{x.port}" for x in config.smtp.listeners)
    seed = f"{config.queue.spool_path(config.state_dir)}|{listeners}"
    digest = hashlib.sha256(seed.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return f"{socket.gethostname()[:40]}:{digest}"


#: final recipient states and the audit kind a copy's final event gets (first match wins)
_FINAL_KINDS = ((BOUNCED, "queue-bounced"), (DROPPED, "queue-dropped"))


def _final_detail(message: QueuedMessage, copy: QueuedCopy) -> tuple[str, str]:
    """(audit kind, detail) of a copy that reached a final state."""
    what = "DSN" if message.is_bounce else "message"
    if copy.state == CORRUPT:
        return "queue-corrupt", f"queue {message.id} copy {copy.id} ({what}) corrupt, never sent"
    states = {r.state for r in copy.recipients}
    kind = next((k for state, k in _FINAL_KINDS if state in states), "queue-delivered")
    groups = []
    for state in (DELIVERED, BOUNCED, DROPPED):
        addresses = [r.address for r in copy.recipients if r.state == state]
        if addresses:
            groups.append(f"{state}: {', '.join(addresses)}")
    detail = (
        f"queue {message.id} copy {copy.id} ({what}) done after {copy.attempts} attempt(s); "
        + "; ".join(groups)
    )
    return kind, detail


#: added to the longest a transaction can take (see relaying_bound)
_RELAYING_MARGIN = 3600.0


def relaying_bound(config: Config) -> float:
    """Seconds after its start (MAIL FROM) past which a message record still "relaying" cannot
    belong to a live transaction, of this gateway or of another one sharing the database: one
    command (``smtp.idle_timeout``), the DATA transfer, an upstream transaction (connect, two
    command replies, end of data), two database writes, plus an hour. A client that keeps a
    transaction open longer with many commands is possible; its record, marked interrupted,
    is then overwritten by its own finish."""
    smtp, relay = config.smtp, config.relay
    return (
        smtp.idle_timeout
        + smtp.data_timeout
        + relay.connect_timeout
        + 2 * relay.command_timeout
        + relay.data_timeout
        + 2 * config.database.timeout
        + _RELAYING_MARGIN
    )


async def finish_interrupted(stores: Stores, config: Config) -> None:
    """At start: complete the audit records a crash left "relaying" (older than
    :func:`relaying_bound`): "queued" when their message is in the queue, else "interrupted".
    A failure is logged (the records stay for the next start), never raised."""
    before = utcnow() - timedelta(seconds=relaying_bound(config))
    try:
        interrupted, queued = await stores.audit.finish_interrupted(
            started_before=before, custody_of=stores.queue.custody_of
        )
    except GatewayError as exc:
        log.error("audit records left relaying by a crash were not completed: %s", exc)
        return
    if interrupted or queued:
        log.warning(
            "audit: %d record(s) left relaying by a stopped gateway completed: %d interrupted, "
            "%d queued (their message is in the queue)",
            interrupted + queued,
            interrupted,
            queued,
        )


#: seconds to wait for closed sessions to go away at shutdown (TLS close included)
_CLOSE_WAIT = 5.0


async def _drained(ctx: ServerContext, seconds: float) -> None:
    """Wait (at most ``seconds``) until no session is left."""
    if ctx.connections:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ctx.drained.wait(), seconds)


async def _transactions_ended(ctx: ServerContext, seconds: float) -> None:
    """Wait (at most ``seconds``) until every session has been told 421 4.3.2 — each does as its
    transaction ends — or is gone. A session told already need not hold the grace: a TLS client
    that keeps its socket open after the 421 is closed after ``_CLOSE_WAIT`` instead."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while any(not conn.shutting_down for conn in ctx.connections):
        ctx.changed.clear()
        remaining = deadline - loop.time()
        if remaining <= 0:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ctx.changed.wait(), remaining)


class GatewayApp:
    """The running gateway: stores, relay, pipeline, service and listeners, started and stopped
    together. ``ports`` maps listener names to bound ports (useful with port 0)."""

    def __init__(
        self,
        config: Config,
        *,
        config_file: Path | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> None:
        self.config = config
        # where the configuration came from, to read it again on reload (SIGHUP)
        self._source = (config_file, overrides)
        self.hostname = gateway_hostname(config)
        self.ports: dict[str, int] = {}
        self.stores: Stores | None = None
        self.relay: UpstreamRelay | None = None
        self.limit_store: LimitStore | None = None
        self.keys: KeyDirectory | None = None
        self.planner: EncryptionPlanner | None = None
        self.control: ControlServer | None = None
        self.context: ServerContext | None = None
        self.spool: Spool | None = None
        self.runner: QueueRunner | None = None
        self._pipeline_closed = False
        self._background: set[asyncio.Task[None]] = set()
        self._servers: list[asyncio.Server] = []

    async def start(self) -> None:
        config = self.config
        make_pipeline(config)  # validate before opening anything
        password = resolve_secret(config.relay.password, "relay.password")
        cert, key = self._tls_files()
        tls = server_context(cert, key, config.tls.min_version)
        self.stores = await open_stores(config)
        await finish_interrupted(self.stores, config)  # before listening: none of ours is live
        self.limit_store = open_limit_store(config)
        self.keys = key_directory(config, self.stores.keys)
        self.planner = encryption_planner(config, self.keys)
        pipeline = make_pipeline(
            config,
            limit_store=self.limit_store,
            policy_state=self.stores.policy,
            account_state=self.stores.account_state,
            key_store=self.keys,
        )
        self.relay = UpstreamRelay(
            config.relay, helo_name=config.relay.helo_name or self.hostname, password=password
        )
        spool = self.spool = Spool(config.queue.spool_path(config.state_dir))
        spool.ensure()
        self.runner = QueueRunner(
            self.stores.queue,
            spool,
            self.relay,
            RunnerSettings.from_config(config.queue, reporting_mta=self.hostname),
            dsn,
            self.stores.accounts.sender_owned,
            worker=queue_worker_id(config),
            on_final=self._queue_event,
        )
        custody = Custody(
            spool,
            self.stores.queue,
            dsn=dsn,
            sender_owned=self.stores.accounts.sender_owned,
            reporting_mta=self.hostname,
            min_free_space=config.queue.min_free_bytes,
            retry_first=config.queue.retry_first_seconds,
            wake=self.runner.wake,
        )
        settings = GatewaySettings(
            hostname=self.hostname,
            trusted_networks=tuple(
                ipaddress.ip_network(n, strict=False) for n in config.smtp.trusted_networks
            ),
            max_connections=config.smtp.max_connections,
            max_connections_per_ip=config.smtp.max_connections_per_ip,
            bare_newline=config.smtp.bare_newline,
            verify_recipients=config.relay.verify_recipients,
            add_received_header=config.relay.add_received_header,
            on_upstream_tempfail=config.queue.on_upstream_tempfail,
        )
        gateway = Gateway(
            settings,
            pipeline=pipeline,
            accounts=self.stores.accounts,
            audit=self.stores.audit,
            relay=self.relay,
            quarantine=self.stores.quarantine,
            custody=custody,
            # per-recipient encryption (check `encryption`): one copy per group, encrypted here
            planner=self.planner,
        )
        self.context = ServerContext(gateway)
        admin = LimitAdmin(config.limits, self.limit_store, self.stores.policy)

        async def limit_status(args: Mapping[str, Any]) -> Any:
            return await admin.status(str(args["login"]))

        async def limit_reset(args: Mapping[str, Any]) -> Any:
            return await admin.reset(str(args["login"]))

        async def policy_reload(args: Mapping[str, Any]) -> Any:
            return await self.reload()

        self.control = ControlServer(
            socket_path(config.state_dir),
            {
                "limit-status": limit_status,
                "limit-reset": limit_reset,
                "policy-reload": policy_reload,
            },
        )
        await self.control.start()
        handler = SmtpHandler(self.context)
        loop = asyncio.get_running_loop()
        try:
            for listener in config.smtp.listeners:
                ls = ListenerSettings(
                    name=listener.name,
                    implicit_tls=listener.tls == "implicit",
                    starttls_context=tls if listener.tls == "starttls" else None,
                    hostname=self.hostname,
                    max_message_size=config.smtp.max_message_size,
                    max_line_length=config.smtp.max_line_length,
                    max_command_length=config.smtp.max_command_length,
                    idle_timeout=config.smtp.idle_timeout,
                    data_timeout=config.smtp.data_timeout,
                    max_bad_commands=config.smtp.max_bad_commands,
                    smtputf8=config.smtp.smtputf8,
                )
                server = await loop.create_server(
                    protocol_factory(handler, ls),
                    host=listener.address,
                    port=listener.port,
                    ssl=tls if listener.tls == "implicit" else None,
                    reuse_address=True,
                )
                self._servers.append(server)
                self.ports[listener.name] = server.sockets[0].getsockname()[1]
                log.info(
                    "listening: %s on %s port %d (%s)",
                    listener.name,
                    listener.address,
                    self.ports[listener.name],
                    listener.tls,
                )
        except OSError as exc:
            await self.stop()
            raise GatewayError(f"cannot listen: {exc}") from None
        # after the listeners are bound (no other live process has this worker id): release our
        # previous run's claims, check the spool, then deliver
        try:
            recovery = await self.runner.recover()
        except GatewayError:
            await self.stop()
            raise
        if recovery.corrupt:
            log.error(
                "queue: %d copy(ies) with a bad spool file set corrupt", len(recovery.corrupt)
            )
        self.runner.start()

    async def _queue_event(self, message: QueuedMessage, copy: QueuedCopy) -> None:
        """The runner's final-state hook: one audit event per finished copy (its own database
        transaction, after the attempt was recorded). A failure is logged, never raised."""
        if self.stores is None:
            return
        kind, detail = _final_detail(message, copy)
        session = Session(client_ip="-", client_port=0, listener="queue", id="queue-runner")
        try:
            async with asyncio.timeout(self.config.database.timeout):
                async with self.stores.engine.begin() as conn:
                    await SqlAuditStore.record_decision_in(
                        conn,
                        session,
                        kind,
                        detail,
                        login=message.login,
                        transaction_id=message.txn_id,
                        queue_id=str(message.id),
                        upstream_reply=copy.last_reply,
                    )
        except DB_ERRORS as error:
            log.error(
                "queue %d copy %d: audit event %s not written: %s",
                message.id,
                copy.id,
                kind,
                describe_db_error(error),
            )

    def _tls_files(self) -> tuple[Path, Path]:
        tls = self.config.tls
        if tls.cert_file:
            return Path(tls.cert_file), Path(tls.key_file)
        return ensure_self_signed(Path(self.config.state_dir) / "tls", self.hostname)

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting (new connections get ``421 4.3.2`` during the grace), let transactions
        in flight finish for up to ``grace`` seconds (default ``smtp.shutdown_grace``), stop the
        queue runner likewise, then close everything. The queue is kept. Idempotent."""
        if grace is None:
            grace = self.config.smtp.shutdown_grace_seconds
        if self.context is not None and not self.context.closing:
            log.info("stopping: new connections refused, %gs for transactions in flight", grace)
        runner, self.runner = self.runner, None
        stopping = (
            asyncio.get_running_loop().create_task(runner.stop(grace))
            if runner is not None
            else None
        )
        ctx = self.context
        if ctx is not None:
            ctx.closing = True
            for conn in list(ctx.connections):
                conn.close_if_idle()
            await _transactions_ended(ctx, grace)
        for server in self._servers:
            server.close()
        if ctx is not None:
            for conn in list(ctx.connections):
                conn.shut_down()
            await _drained(ctx, min(grace, _CLOSE_WAIT))
            for conn in list(ctx.connections):  # a TLS peer that never answers close_notify
                conn.force_close()
            await _drained(ctx, _CLOSE_WAIT)
            if ctx.tasks:  # disconnect handlers: they write audit records
                await asyncio.wait(list(ctx.tasks), timeout=grace)
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        if ctx is not None and not self._pipeline_closed:
            self._pipeline_closed = True
            await ctx.gateway.pipeline.close()  # e.g. spam-score's worker processes
        if self.planner is not None:
            await self.planner.close()  # the gpg worker processes
            self.planner = None
        if stopping is not None:
            await stopping
        if self.relay is not None:
            await self.relay.close()
            self.relay = None
        if self.control is not None:
            await self.control.stop()
            self.control = None
        if self.limit_store is not None:
            await self.limit_store.close()
            self.limit_store = None
        if self.stores is not None:
            await self.stores.close()
            self.stores = None

    async def reload(self) -> str:
        """Read the configuration and policy files again and swap in the new pipeline.

        A file that fails validation leaves the previous policy in force (ConfigError is logged
        and raised to the caller). Listeners, database, relay, queue and limit store settings need
        a restart; a change to them is reported, not applied."""
        assert self.context is not None and self.stores is not None
        path, overrides = self._source
        try:
            config = load_config(path, overrides)
            pipeline = make_pipeline(
                config,
                str(path) if path else "configuration",
                limit_store=self.limit_store,
                policy_state=self.stores.policy,
                account_state=self.stores.account_state,
                key_store=self.keys,
            )
        except ConfigError as exc:
            log.error("policy reload failed, the previous policy stays in force: %s", exc)
            raise
        fixed = [
            name
            for name in (
                "state_dir",
                "smtp",
                "tls",
                "database",
                "relay",
                "audit",
                "queue",
                "keys",
                "log",
            )
            if getattr(config, name) != getattr(self.config, name)
        ]
        if config.limits.store != self.config.limits.store:
            fixed.append("limits.store")
        retired, self.context.gateway.pipeline = self.context.gateway.pipeline, pipeline
        await retired.close()
        self.config = replace(
            self.config,
            pipeline=config.pipeline,
            checks=config.checks,
            limits=replace(config.limits, store=self.config.limits.store),
        )
        message = "policy reloaded"
        if fixed:
            message += f"; changes to {', '.join(fixed)} need a restart and were not applied"
        log.warning(message)
        return message

    def _reload_in_background(self) -> None:
        async def run() -> None:
            with contextlib.suppress(ConfigError):
                await self.reload()

        task = asyncio.get_running_loop().create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def serve_forever(self) -> None:
        """Run until SIGTERM/SIGINT, then stop gracefully; SIGHUP reloads the policy."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload_in_background)
        await self.start()
        try:
            await stop.wait()
        finally:
            log.info("shutting down")
            await self.stop()
