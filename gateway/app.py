"""Composition root: the one place that builds and wires Mailward's parts.

What it does: from a validated Config, builds the database engine and stores, the relay, the
pipeline and the Gateway service, then the SMTP listeners; owns their start and orderly shutdown.
The CLI calls only what is here (and the stores' admin methods it returns).

Reads: the Config; through the parts it builds, the database, TLS files and the network.

Security notes: secrets (relay password) are resolved here, once, and handed to the part that needs
them; nothing here logs them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
import socket
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.audit.store import SqlAuditStore
from gateway.auth.store import SqlAccountStore
from gateway.checks import SPECS
from gateway.checks.rate_limit import LimitAdmin
from gateway.config import Config, load_config, resolve_secret
from gateway.control import ControlServer, socket_path
from gateway.core.errors import ConfigError, GatewayError
from gateway.db.engine import create_engine
from gateway.db.migrate import upgrade
from gateway.pipeline.registry import build_pipeline
from gateway.pipeline.runner import Pipeline
from gateway.policystate.account_state import SqlAccountState
from gateway.policystate.store import SqlPolicyState
from gateway.quarantine.store import SqlQuarantine
from gateway.ratelimit.memory import MemoryLimitStore
from gateway.ratelimit.redis_store import RedisLimitStore
from gateway.ratelimit.store import LimitStore
from gateway.relay.upstream import UpstreamRelay
from gateway.service import Gateway, GatewaySettings
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
) -> Pipeline:
    store = limit_store if limit_store is not None else MemoryLimitStore()
    deps = _PipelineDeps(config, store, policy_state, account_state)
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

    async def close(self) -> None:
        await self.audit.close()
        await self.accounts.close()
        await self.policy.close()
        await self.quarantine.close()
        await self.account_state.close()
        await self.engine.dispose()


async def open_stores(config: Config, *, migrate: bool | None = None) -> Stores:
    """Engine + account store + audit store (its group-commit writer started)."""
    if migrate if migrate is not None else config.database.auto_migrate:
        await upgrade(config.database_url)
    engine = create_engine(config)
    accounts = SqlAccountStore(engine, timeout=config.database.timeout)
    audit = SqlAuditStore(
        engine, batch_size=config.audit.batch_size, timeout=config.database.timeout
    )
    await audit.start()
    policy = SqlPolicyState(engine, timeout=config.database.timeout)
    quarantine = SqlQuarantine(engine, timeout=config.database.timeout)
    account_state = SqlAccountState(engine, timeout=config.database.timeout)
    return Stores(engine, accounts, audit, policy, quarantine, account_state)


def gateway_hostname(config: Config) -> str:
    return config.smtp.hostname or socket.getfqdn()


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
        self.control: ControlServer | None = None
        self.context: ServerContext | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._servers: list[asyncio.Server] = []

    async def start(self) -> None:
        config = self.config
        make_pipeline(config)  # validate before opening anything
        password = resolve_secret(config.relay.password, "relay.password")
        cert, key = self._tls_files()
        tls = server_context(cert, key, config.tls.min_version)
        self.stores = await open_stores(config)
        self.limit_store = open_limit_store(config)
        pipeline = make_pipeline(
            config,
            limit_store=self.limit_store,
            policy_state=self.stores.policy,
            account_state=self.stores.account_state,
        )
        self.relay = UpstreamRelay(
            config.relay, helo_name=config.relay.helo_name or self.hostname, password=password
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
        )
        gateway = Gateway(
            settings,
            pipeline=pipeline,
            accounts=self.stores.accounts,
            audit=self.stores.audit,
            relay=self.relay,
            quarantine=self.stores.quarantine,
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

    def _tls_files(self) -> tuple[Path, Path]:
        tls = self.config.tls
        if tls.cert_file:
            return Path(tls.cert_file), Path(tls.key_file)
        return ensure_self_signed(Path(self.config.state_dir) / "tls", self.hostname)

    async def stop(self, grace: float = 10.0) -> None:
        """Stop listening, let sessions finish for up to ``grace`` seconds, then close all."""
        for server in self._servers:
            server.close()
        ctx = self.context
        if ctx is not None:
            ctx.closing = True
            if ctx.connections:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ctx.drained.wait(), grace)
            for conn in list(ctx.connections):
                if conn.mw is not None:
                    conn.mw.end_reason = "shutdown"
                if conn.transport is not None:
                    conn.transport.close()
            await asyncio.sleep(0)
            if ctx.tasks:
                await asyncio.wait(list(ctx.tasks), timeout=grace)
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
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
        and raised to the caller). Listeners, database, relay and limit store settings need a
        restart; a change to them is reported, not applied."""
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
            )
        except ConfigError as exc:
            log.error("policy reload failed, the previous policy stays in force: %s", exc)
            raise
        fixed = [
            name
            for name in ("state_dir", "smtp", "tls", "database", "relay", "audit", "log")
            if getattr(config, name) != getattr(self.config, name)
        ]
        if config.limits.store != self.config.limits.store:
            fixed.append("limits.store")
        self.context.gateway.pipeline = pipeline
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
