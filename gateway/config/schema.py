"""The configuration schema: every key Mailward reads, with its type, default and documentation.

What it does: frozen dataclasses, one per TOML table. Each field's ``doc`` is the single source of the
key's documentation; ``docs/configuration.md`` lists every key and a test fails when one is missing.
Per-check options (``[checks.<id>]``) are declared by each check next to its code (see
``gateway/checks``) and validated by the pipeline registry with the same typed binder.

Reads: nothing; :mod:`gateway.config.loader` fills it from files.

Security notes: ``relay.password`` is a secret: it may be written as ``"env:NAME"`` or ``"file:PATH"``
so that it does not sit in the config file, and it is never echoed in errors or logs.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from gateway.config.typed import doc_field
from gateway.core.errors import ConfigError


@dataclass(frozen=True)
class ListenerConfig:
    name: str = doc_field("submission", "Name of the listener, used in logs and audit records.")
    address: str = doc_field("0.0.0.0", "Address to bind (IPv4 or IPv6 literal).")  # noqa: S104
    port: int = doc_field(587, "TCP port (0 picks a free port, for tests).")
    tls: Literal["starttls", "implicit", "none"] = doc_field(
        "starttls",
        "`starttls`: plain connection upgraded with STARTTLS (RFC 3207/6409, port 587); "
        "`implicit`: TLS from the first byte (RFC 8314, port 465); `none`: no TLS at all "
        "(only useful for a loopback listener serving trusted networks, e.g. benchmarks).",
    )

    def validate(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError("", "port", f"{self.port} is not a TCP port")
        try:
            ipaddress.ip_address(self.address)
        except ValueError:
            raise ConfigError("", "address", f"{self.address!r} is not an IP address") from None


def _default_listeners() -> list[ListenerConfig]:
    return [
        ListenerConfig("submission", "0.0.0.0", 587, "starttls"),  # noqa: S104
        ListenerConfig("submissions", "0.0.0.0", 465, "implicit"),  # noqa: S104
    ]


@dataclass(frozen=True)
class SmtpConfig:
    hostname: str = doc_field(
        "", "Name in the banner, EHLO reply and Received: header; empty means the host's FQDN."
    )
    listeners: list[ListenerConfig] = field(
        default_factory=_default_listeners,
        metadata={"doc": "The listening sockets, as an array of tables `[[smtp.listeners]]`."},
    )
    max_message_size: int = doc_field(
        36_700_160,
        "Largest message accepted, in bytes: advertised as SIZE, refused with 552 5.3.4 when "
        "declared bigger at MAIL FROM or when DATA exceeds it (the data is discarded as it arrives).",
    )
    max_line_length: int = doc_field(
        998, "Longest line in DATA, excluding CRLF (RFC 5321: 998); longer → 500 5.5.6."
    )
    max_command_length: int = doc_field(
        512, "Longest command line (RFC 5321: 512, plus what extensions add); longer → 500 5.5.6."
    )
    idle_timeout: float = doc_field(
        300.0,
        "Seconds the client may take to send its next complete command line (slow command lines "
        "included). On expiry the gateway sends 421 4.4.2 and closes.",
    )
    data_timeout: float = doc_field(
        600.0,
        "Seconds the client may take to transfer the whole DATA content after the 354. On expiry "
        "the gateway sends 421 4.4.2 and closes; nothing is relayed.",
    )
    max_connections: int = doc_field(
        1000, "Concurrent client connections in total; beyond, new ones get 421 4.7.0."
    )
    max_connections_per_ip: int = doc_field(
        20, "Concurrent client connections from one IP address; beyond, new ones get 421 4.7.0."
    )
    max_bad_commands: int = doc_field(
        10, "Unrecognised or malformed commands before the gateway says 421 and closes."
    )
    trusted_networks: list[str] = doc_field(
        [],
        "CIDR networks allowed to relay WITHOUT authentication (e.g. a loopback benchmark "
        "listener or a Postfix that authenticated the client already). Default: none.",
    )
    bare_newline: Literal["reject", "normalize"] = doc_field(
        "reject",
        "What to do with a bare CR, bare LF or NUL in DATA (SMTP smuggling, cf. Postfix "
        "`smtpd_forbid_bare_newline`): `reject` answers 550 5.6.0; `normalize` turns bare CR/LF "
        "into CRLF and removes NUL. Either way such bytes are never relayed as received.",
    )
    smtputf8: bool = doc_field(True, "Offer SMTPUTF8 (RFC 6531) to clients.")
    shutdown_grace: str = doc_field(
        "10s",
        "On SIGTERM, how long transactions in flight (and queue deliveries) may take to finish "
        "while new connections get 421 4.3.2; what is still open then gets the 421 and is closed "
        "(its client never got 250 and sends the message again). A duration like `10s`, `1m`.",
    )

    @property
    def shutdown_grace_seconds(self) -> float:
        return parse_duration(self.shutdown_grace)

    def validate(self) -> None:
        try:
            self.shutdown_grace_seconds  # noqa: B018
        except ValueError as exc:
            raise ConfigError("", "shutdown_grace", str(exc)) from None
        for i, net in enumerate(self.trusted_networks):
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ConfigError(
                    "", f"trusted_networks[{i}]", f"{net!r} is not a network"
                ) from None
        names = [listener.name for listener in self.listeners]
        if len(set(names)) != len(names):
            raise ConfigError("", "listeners", "listener names must be unique")
        if self.max_message_size < 1024:
            raise ConfigError("", "max_message_size", "must be at least 1024 bytes")
        for key in ("idle_timeout", "data_timeout"):
            if getattr(self, key) <= 0:
                raise ConfigError("", key, "must be positive")


@dataclass(frozen=True)
class TlsConfig:
    cert_file: str = doc_field(
        "",
        "PEM certificate chain for the listeners. Empty: a self-signed certificate is generated "
        "on first start in `<state_dir>/tls/` (fine for tests and the demo, not for customers).",
    )
    key_file: str = doc_field("", "PEM private key matching `cert_file`.")
    min_version: Literal["TLSv1.2", "TLSv1.3"] = doc_field(
        "TLSv1.2", "Lowest TLS version offered to clients."
    )

    def validate(self) -> None:
        if bool(self.cert_file) != bool(self.key_file):
            raise ConfigError("", "key_file", "cert_file and key_file go together")


@dataclass(frozen=True)
class DatabaseConfig:
    url: str = doc_field(
        "sqlite+aiosqlite:///{state_dir}/mailward.db",
        "SQLAlchemy URL of the database holding accounts and the audit log. `{state_dir}` is "
        "replaced by `state_dir`. PostgreSQL: `postgresql+psycopg://user@host/db`.",
    )
    auto_migrate: bool = doc_field(
        False,
        "Run `db upgrade` automatically at start. Convenient on SQLite; on PostgreSQL prefer "
        "running `mailward db upgrade` as a deploy step.",
    )
    sqlite_synchronous: Literal["normal", "full"] = doc_field(
        "normal",
        "SQLite `PRAGMA synchronous` in WAL mode: `normal` survives a process crash, `full` also "
        "a power loss (slower: one fsync per commit).",
    )
    pool_size: int = doc_field(10, "Connections kept open to the database (PostgreSQL).")
    timeout: float = doc_field(
        10.0, "Seconds a database operation may take before the transaction is deferred (4xx)."
    )


@dataclass(frozen=True)
class RelayConfig:
    host: str = doc_field("127.0.0.1", "The upstream relay (the ISP's MTA).")
    port: int = doc_field(25, "Its port.")
    tls: Literal["none", "starttls", "implicit"] = doc_field(
        "starttls",
        "How to talk to the upstream: plain, STARTTLS (mandatory if set) or implicit TLS.",
    )
    verify_certificate: bool = doc_field(
        True, "Verify the upstream's certificate and host name (with `ca_file` or system CAs)."
    )
    ca_file: str = doc_field("", "PEM bundle of CAs trusted for the upstream; empty: system CAs.")
    username: str = doc_field("", "AUTH user for the upstream; empty: no AUTH.")
    password: str = doc_field(
        "",
        "AUTH password for the upstream: a literal, `env:NAME` (read from the environment) or "
        "`file:PATH` (first line of a file).",
        secret=True,
    )
    helo_name: str = doc_field("", "Name sent in EHLO to the upstream; empty: `smtp.hostname`.")
    connect_timeout: float = doc_field(30.0, "Seconds to connect and get the upstream's banner.")
    command_timeout: float = doc_field(
        300.0, "Seconds to wait for the upstream's reply to one command."
    )
    data_timeout: float = doc_field(
        600.0, "Seconds to wait for the upstream's reply after the end of DATA (RFC 5321: 10 min)."
    )
    pool_size: int = doc_field(
        50, "Upstream connections open at most; a session waits for one when all are busy."
    )
    pool_idle_seconds: float = doc_field(
        30.0, "An idle pooled upstream connection is closed (QUIT) after this many seconds."
    )
    max_messages_per_connection: int = doc_field(
        100, "Messages sent over one upstream connection before it is closed and renewed."
    )
    verify_recipients: bool = doc_field(
        True,
        "Proxy each RCPT to the upstream at RCPT time, so a recipient the upstream refuses is "
        "refused to the client then (no silent loss). If false, the upstream's RCPT refusals "
        "are only seen at end of data and the whole message is refused.",
    )
    add_received_header: bool = doc_field(
        True, "Prepend a Received: trace header (RFC 5321 4.4); nothing else is changed."
    )

    def validate(self) -> None:
        if not 0 < self.port <= 65535:
            raise ConfigError("", "port", f"{self.port} is not a TCP port")
        if self.password and not self.username:
            raise ConfigError("", "username", "a password is set but no username")
        if self.pool_size < 1:
            raise ConfigError("", "pool_size", "must be at least 1")


@dataclass(frozen=True)
class AuditConfig:
    batch_size: int = doc_field(
        256, "Most audit records written in one database transaction (group commit)."
    )
    batch_linger: float = doc_field(
        0.002,
        "Seconds the audit writer waits for more records before its next transaction when records "
        "arrived while it was writing (group commit delay under load, like PostgreSQL's "
        "`commit_delay`): fewer, larger transactions; each record waits at most this long more. "
        "A writer that was idle writes at once. 0: never wait; at most 1.",
    )

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ConfigError("", "batch_size", "must be at least 1")
        if not 0 <= self.batch_linger <= 1:
            raise ConfigError("", "batch_linger", "must be between 0 and 1 (seconds)")


@dataclass(frozen=True)
class CheckSettings:
    """Options common to every check; check-specific options sit beside them in the same table."""

    mode: Literal["enforce", "warn", "off"] = doc_field(
        "enforce",
        "`enforce`: the verdict applies; `warn`: the verdict is logged and audited as 'would have' "
        "but the transaction continues; `off`: the check does not run.",
    )
    timeout: float = doc_field(
        5.0, "Seconds the check may take; on expiry `on_error` applies (a timeout is an error)."
    )
    on_error: Literal["defer", "continue"] = doc_field(
        "defer",
        "When the check fails or times out: `defer` answers 451 4.3.0 (fail closed); `continue` "
        "records the error and goes on (only for non-critical checks).",
    )


@dataclass(frozen=True)
class PipelineConfig:
    soft_fail: bool = doc_field(
        False,
        "Turn every permanent (5xx) check verdict into its temporary twin (4xx), like Postfix "
        "`soft_bounce`, for safe roll-outs. Authentication and protocol errors are not affected.",
    )
    connect: list[str] = doc_field([], "Check ids run when a client connects, in order.")
    auth: list[str] = doc_field(
        [], "Check ids run at each AUTH attempt, before the password is verified, in order."
    )
    mail: list[str] = doc_field([], "Check ids run at MAIL FROM, in order.")
    rcpt: list[str] = doc_field([], "Check ids run at each RCPT TO, in order (per recipient).")
    data: list[str] = doc_field([], "Check ids run at end of data (whole message), in order.")


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """``"30s"``, ``"10m"``, ``"1h"``, ``"1d"`` → seconds (ValueError otherwise)."""
    text = text.strip()
    unit = _DURATION_UNITS.get(text[-1:])
    if unit is None or not text[:-1].replace(".", "", 1).isdigit():
        raise ValueError(f"bad duration {text!r} (use e.g. 30s, 10m, 1h, 1d)")
    value = float(text[:-1]) * unit
    if value <= 0:
        raise ValueError(f"duration {text!r} must be positive")
    return value


@dataclass(frozen=True)
class TierConfig:
    limit: int = doc_field(0, "Amount allowed per `period` (messages, recipients or bytes).")
    period: str = doc_field(
        "1m", "Window of the sustained rate: a duration like `30s`, `1m`, `1h`, `1d`."
    )
    burst: int = doc_field(
        0,
        "Most that may be used at once (GCRA burst); 0 means `limit` (the whole period's amount).",
    )

    @property
    def seconds(self) -> float:
        return parse_duration(self.period)

    def validate(self) -> None:
        if self.limit < 1:
            raise ConfigError("", "limit", "must be at least 1")
        if self.burst < 0:
            raise ConfigError("", "burst", "must not be negative")
        try:
            parse_duration(self.period)
        except ValueError as exc:
            raise ConfigError("", "period", str(exc)) from None


@dataclass(frozen=True)
class LimitRuleConfig:
    key: Literal["login", "client-ip", "sender-domain"] = doc_field(
        "login",
        "What is counted separately: each `login`, each client IP (IPv6 grouped by "
        "`limits.ipv6_prefix`), or each envelope sender domain.",
    )
    quantity: Literal["messages", "recipients", "bytes", "distinct-recipients"] = doc_field(
        "messages",
        "What is counted: accepted messages, accepted recipients, message bytes, or distinct "
        "recipient addresses (a sliding window of the first tier's period; its `limit` is the cap).",
    )
    tiers: list[TierConfig] = doc_field(
        [], "One or more tiers, all enforced and charged together (e.g. 30/min and 1000/day)."
    )
    fail_open: bool = doc_field(
        False,
        "When the limit store is unreachable: false defers the mail (451, fail closed); true lets "
        "it pass for this limit (logged and audited).",
    )
    description: str = doc_field("", "Free text shown by `mailward limit status`.")

    def validate(self) -> None:
        if not self.tiers:
            raise ConfigError("", "tiers", "at least one tier is required")


@dataclass(frozen=True)
class LimitsConfig:
    store: str = doc_field(
        "memory://",
        "Where counts live: `memory://` (in-process, the embedded default) or "
        "`redis://host:port/db` (shared by many gateway instances).",
    )
    store_timeout: float = doc_field(
        0.5, "Seconds one limit-store operation may take before it counts as unreachable."
    )
    ipv4_prefix: int = doc_field(32, "Client IPv4 addresses are grouped by this prefix length.")
    ipv6_prefix: int = doc_field(64, "Client IPv6 addresses are grouped by this prefix length.")
    rules: dict[str, LimitRuleConfig] = doc_field(
        {}, "The limits, by id: `[limits.rules.<id>]` (the id appears in replies, logs, audit)."
    )
    domains: dict[str, dict[str, list[TierConfig]]] = doc_field(
        {},
        'Per sender domain tier overrides: `[limits.domains."example.com"]` with '
        "`<limit id> = [{limit = .., period = ..}, ..]`.",
    )
    logins: dict[str, dict[str, list[TierConfig]]] = doc_field(
        {},
        "Per login tier overrides, like `domains` (time-boxed ones: `mailward limit override`).",
    )

    def validate(self) -> None:
        if not (self.store == "memory://" or self.store.startswith(("redis://", "rediss://"))):
            raise ConfigError("", "store", "must be memory:// or a redis:// URL")
        if not 8 <= self.ipv4_prefix <= 32:
            raise ConfigError("", "ipv4_prefix", "must be between 8 and 32")
        if not 16 <= self.ipv6_prefix <= 128:
            raise ConfigError("", "ipv6_prefix", "must be between 16 and 128")
        for where, table in (("domains", self.domains), ("logins", self.logins)):
            for name, overrides in table.items():
                for limit_id in overrides:
                    if limit_id not in self.rules:
                        raise ConfigError(
                            "", f"{where}.{name}.{limit_id}", "no such limit in limits.rules"
                        )


_SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def parse_size(text: str) -> int:
    """``"0"``, ``"4096"``, ``"512M"``, ``"2G"`` (binary units K, M, G, T) → bytes (ValueError
    otherwise)."""
    text = text.strip().upper().removesuffix("B")
    unit = text[-1:] if text[-1:] in _SIZE_UNITS else ""
    number = text[: len(text) - len(unit)]
    if not number.isdigit():
        raise ValueError(f"bad size {text!r} (use e.g. 0, 4096, 512M, 2G)")
    return int(number) * _SIZE_UNITS[unit]


@dataclass(frozen=True)
class QueueConfig:
    spool_dir: str = doc_field(
        "{state_dir}/spool",
        "Directory of the durable queue's spool files (one per queued copy, fsynced before the "
        "client gets 250). `{state_dir}` is replaced by `state_dir`. Every gateway process that "
        "shares one queue database must share this directory.",
    )
    on_upstream_tempfail: Literal["queue", "defer"] = doc_field(
        "queue",
        "When the upstream is unreachable or answers 4xx for the whole message: `queue` takes "
        "custody (250 to the client, retried from the queue, bounced if it never goes through); "
        "`defer` answers 451 and the client keeps the message. Recipients the upstream already "
        "accepted are never resent; the rest of a partial delivery is always queued.",
    )
    lifetime: str = doc_field(
        "5d",
        "How long a queued message is retried before it is bounced (`5.4.7 delivery time "
        "expired`); a duration like `30m`, `12h`, `5d` (RFC 5321 4.5.4.1: at least 4-5 days).",
    )
    retry_first: str = doc_field(
        "5m",
        "Delay before the first retry; each further retry waits twice as long (with ±20 % "
        "jitter), up to `retry_max`.",
    )
    retry_max: str = doc_field("1h", "Longest delay between two retries.")
    warn_after: str = doc_field(
        "4h",
        "Send the sender one warning DSN (`Action: delayed`) when a message is still queued this "
        "long after it arrived; empty or `0` turns warnings off.",
    )
    min_free_space: str = doc_field(
        "512M",
        "Refuse new mail (452 4.3.1) when writing it to the spool would leave less free space than "
        "this (`0`, bytes, or with a unit: `512M`, `2G`).",
    )
    runner_interval: str = doc_field(
        "10s",
        "How often the queue runner looks for copies due for delivery (it is also woken when a "
        "message is queued).",
    )
    runner_batch: int = doc_field(
        20, "Most queued copies one runner claims and delivers at once (concurrently)."
    )
    claim_lease: str = doc_field(
        "20m",
        "How long a runner's claim on a copy lasts: another gateway process may attempt it only "
        "after this, so it must exceed one whole upstream transaction (connect, commands and "
        "`relay.data_timeout`); a delivery still running then is abandoned and retried.",
    )

    def spool_path(self, state_dir: str) -> str:
        return self.spool_dir.replace("{state_dir}", state_dir)

    @property
    def lifetime_seconds(self) -> float:
        return parse_duration(self.lifetime)

    @property
    def retry_first_seconds(self) -> float:
        return parse_duration(self.retry_first)

    @property
    def retry_max_seconds(self) -> float:
        return parse_duration(self.retry_max)

    @property
    def warn_after_seconds(self) -> float | None:
        """None when warnings are off."""
        if self.warn_after.strip() in ("", "0"):
            return None
        return parse_duration(self.warn_after)

    @property
    def min_free_bytes(self) -> int:
        return parse_size(self.min_free_space)

    @property
    def runner_interval_seconds(self) -> float:
        return parse_duration(self.runner_interval)

    @property
    def claim_lease_seconds(self) -> float:
        return parse_duration(self.claim_lease)

    def validate(self) -> None:
        if not self.spool_dir.strip():
            raise ConfigError("", "spool_dir", "must not be empty")
        for key in ("lifetime", "retry_first", "retry_max", "runner_interval", "claim_lease"):
            try:
                parse_duration(getattr(self, key))
            except ValueError as exc:
                raise ConfigError("", key, str(exc)) from None
        try:
            self.warn_after_seconds  # noqa: B018
        except ValueError as exc:
            raise ConfigError("", "warn_after", str(exc)) from None
        try:
            parse_size(self.min_free_space)
        except ValueError as exc:
            raise ConfigError("", "min_free_space", str(exc)) from None
        if self.retry_max_seconds < self.retry_first_seconds:
            raise ConfigError("", "retry_max", "must not be shorter than retry_first")
        if self.claim_lease_seconds < 60:
            raise ConfigError("", "claim_lease", "must be at least 1m")
        if self.runner_batch < 1:
            raise ConfigError("", "runner_batch", "must be at least 1")


@dataclass(frozen=True)
class KeysConfig:
    gnupg_home: str = doc_field(
        "{state_dir}/gnupg",
        "The gateway-owned GNUPGHOME holding the key store's usable OpenPGP public keys (kept in "
        "sync automatically, rebuilt by `mailward key sync`; may be deleted at any time). "
        "`{state_dir}` is replaced by `state_dir`. The store in the database is the source of "
        "truth, never this directory.",
    )
    gpg: str = doc_field("gpg", "The gpg program (GnuPG 2.2 or later): a name on PATH or a path.")
    gpg_timeout: float = doc_field(
        10.0, "Seconds one gpg run (import, listing) may take before it is killed."
    )
    max_key_size: str = doc_field(
        "64K",
        "Largest key or certificate file `mailward key import` accepts (bytes, or with a unit: "
        "`64K`); larger files are refused before they are parsed.",
    )
    max_user_ids: int = doc_field(
        16,
        "Most user IDs an OpenPGP key (or email addresses a certificate) may have to be imported.",
    )
    gpg_workers: int | Literal["auto"] = doc_field(
        "auto",
        "Worker processes that run gpg (through python-gnupg) for OpenPGP copies, so its "
        "per-run threads and pipes stay off the gateway process; each encrypts one copy at a "
        "time. `auto`: one per CPU, at least 2. 0: run gpg from threads of the gateway process.",
    )
    lookup_refresh: float = doc_field(
        1.0,
        "Seconds a running gateway may answer per-recipient key lookups from its in-process cache "
        "before it checks the key store's change counter again: a key imported, revoked, removed "
        "or re-verified (on any instance) takes effect within this time; expiry is always exact. "
        "0: check on every lookup.",
    )
    lookup_cache_size: int = doc_field(
        100_000,
        "Most recipient addresses whose key lookup (including 'no key') is cached per process; "
        "the oldest goes first. 0: no cache, every lookup reads the database.",
    )
    last_used_resolution: float = doc_field(
        60.0,
        "A key's `last used` time is written at most once per this many seconds per process "
        "(it is exact to this resolution). 0: on every message.",
    )

    @property
    def gpg_worker_count(self) -> int:
        """``gpg_workers`` resolved: ``auto`` is one per CPU this process may use, at least 2."""
        if self.gpg_workers != "auto":
            return self.gpg_workers
        try:
            cpus = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):  # pragma: no cover - not Linux
            cpus = os.cpu_count() or 1
        return max(2, cpus)

    def gnupg_path(self, state_dir: str) -> str:
        return self.gnupg_home.replace("{state_dir}", state_dir)

    @property
    def max_key_bytes(self) -> int:
        return parse_size(self.max_key_size)

    def validate(self) -> None:
        if not self.gnupg_home.strip():
            raise ConfigError("", "gnupg_home", "must not be empty")
        if not self.gpg.strip():
            raise ConfigError("", "gpg", "must not be empty")
        if self.gpg_timeout <= 0:
            raise ConfigError("", "gpg_timeout", "must be positive")
        try:
            size = parse_size(self.max_key_size)
        except ValueError as exc:
            raise ConfigError("", "max_key_size", str(exc)) from None
        if size < 1024:
            raise ConfigError("", "max_key_size", "must be at least 1K")
        if self.max_user_ids < 1:
            raise ConfigError("", "max_user_ids", "must be at least 1")
        if self.gpg_workers != "auto" and not 0 <= self.gpg_workers <= 64:
            raise ConfigError("", "gpg_workers", 'must be "auto" or 0 to 64')
        for name in ("lookup_refresh", "lookup_cache_size", "last_used_resolution"):
            if getattr(self, name) < 0:
                raise ConfigError("", name, "must not be negative")


@dataclass(frozen=True)
class LogConfig:
    level: Literal["debug", "info", "warning", "error"] = doc_field("info", "Log level.")
    format: Literal["text", "json"] = doc_field("text", "`text` for humans, `json` one per line.")


@dataclass(frozen=True)
class Config:
    state_dir: str = doc_field(
        "/var/lib/mailward", "Directory for the SQLite database, generated TLS files and spool."
    )
    smtp: SmtpConfig = field(default_factory=SmtpConfig, metadata={"doc": ""})
    tls: TlsConfig = field(default_factory=TlsConfig, metadata={"doc": ""})
    database: DatabaseConfig = field(default_factory=DatabaseConfig, metadata={"doc": ""})
    relay: RelayConfig = field(default_factory=RelayConfig, metadata={"doc": ""})
    audit: AuditConfig = field(default_factory=AuditConfig, metadata={"doc": ""})
    pipeline: PipelineConfig = field(default_factory=PipelineConfig, metadata={"doc": ""})
    limits: LimitsConfig = field(default_factory=LimitsConfig, metadata={"doc": ""})
    queue: QueueConfig = field(default_factory=QueueConfig, metadata={"doc": ""})
    keys: KeysConfig = field(default_factory=KeysConfig, metadata={"doc": ""})
    log: LogConfig = field(default_factory=LogConfig, metadata={"doc": ""})
    checks: dict[str, dict[str, Any]] = doc_field(
        {},
        "Per-check tables `[checks.<id>]`: the common keys `mode`, `timeout`, `on_error` and the "
        "check's own options (see the per-check list below).",
    )

    @property
    def database_url(self) -> str:
        return self.database.url.replace("{state_dir}", self.state_dir)
