"""Check ``rate-limit``: per-login, per-client-IP and per-sender-domain limits with GCRA tiers.

What it does: each limit in ``[limits.rules.<id>]`` counts one quantity (messages, recipients,
bytes, distinct recipients) for one key (login, client IP grouped by prefix, sender domain) under
one or more tiers (e.g. 30/min and 1000/day), all charged together and atomically by the limit store.
At MAIL and RCPT the check only *peeks* (would this message / this recipient still fit?), so a
client learns early and rejected recipients are never charged; at end of data it *charges* every
tier of every limit at once (all-or-nothing) for what is actually about to be relayed, and
``finish`` refunds the charge when the upstream did not accept the message — only accepted mail
stays counted. Each stage asks the limit store once (``admit``: the GCRA charges and the distinct
recipients together, one Lua script on Redis), and nothing at all when no limit counts what the
stage could change (RCPT with no recipient limit); a distinct-recipient refusal at end of data
therefore charges nothing either. The limits that apply to a login, client network and sender
domain are resolved once and reused for the next transactions until the login's time-boxed
overrides change. Over a limit: ``450 4.7.1`` at MAIL/RCPT and ``451 4.7.1`` at end of data, naming
the limit and the seconds until it admits the request; the verdict carries the measured value and
the limit for the audit. A request larger than a limit's whole capacity is refused ``552 5.3.4``
(it would never fit). Tiers come from, in order of precedence: a time-boxed override written by
``mailward limit override`` (database), ``[limits.logins.<login>]``, ``[limits.domains.<domain>]``,
then the limit's own tiers.

Reads: the session's login and client IP, the envelope, the limit store, the override table.

Security notes: if the limit store is unreachable the check raises (the runner defers: 451, fail
closed) unless every limit concerned is ``fail_open``; distinct-recipient members are stored hashed
by the store. Addresses are never logged here.
"""

from __future__ import annotations

import ipaddress
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol

from gateway.config.schema import LimitRuleConfig, LimitsConfig, TierConfig
from gateway.config.typed import build
from gateway.core import replies
from gateway.core.errors import StoreUnavailable
from gateway.core.model import CONTINUE, Recipient, Stage, Transaction, Verdict
from gateway.pipeline.registry import CheckSpec
from gateway.ratelimit.store import (
    SEPARATOR,
    Charge,
    Decision,
    DistinctCharge,
    LimitStore,
    Tier,
)

log = logging.getLogger("mailward.checks.rate_limit")

CHECK_ID = "rate-limit"


class OverrideSource(Protocol):
    async def active_overrides(self, login: str) -> dict[str, list[dict[str, Any]]]: ...


@dataclass(frozen=True)
class Options:
    """No options of its own: the limits are the ``[limits]`` table."""


@dataclass(frozen=True, slots=True)
class _Limit:
    id: str
    rule: LimitRuleConfig
    key: str
    tiers: tuple[Tier, ...]
    #: one unit against every tier (a message, a recipient), built once with the limit
    unit: tuple[Charge, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "unit", tuple(Charge(self.key, t, 1) for t in self.tiers))

    def charges(self, amount: int) -> tuple[Charge, ...]:
        """``amount`` units against every tier of this limit."""
        if amount == 1:
            return self.unit
        return tuple(Charge(self.key, t, amount) for t in self.tiers)


@dataclass(slots=True)
class _TxnState:
    """Per transaction (``txn.check_state["rate-limit"]``): the limits that apply, whether any
    of them counts recipients (else RCPT has nothing to ask), and what the end of data charged
    (refunded by ``finish`` when the upstream did not accept the message)."""

    limits: Sequence[_Limit]
    counts_recipients: bool
    charges: list[Charge] = field(default_factory=list)


#: "no time-boxed override" (immutable, so it can be shared)
_NO_OVERRIDES: Mapping[str, list[dict[str, Any]]] = MappingProxyType({})
#: quantities a RCPT can change (a messages or bytes limit asks nothing there)
_PER_RECIPIENT = frozenset({"recipients", "distinct-recipients"})
#: resolved limit lists kept per (login, client IP, sender domain), at most (then started afresh)
RESOLVED_CACHE_MAX = 10_000


def client_key(ip: str, v4_prefix: int, v6_prefix: int) -> str:
    """The client IP grouped by prefix: ``192.0.2.7`` or ``2001:db8:1:2::/64``."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    prefix = v4_prefix if addr.version == 4 else v6_prefix
    if prefix == addr.max_prefixlen:
        return f"{addr}/{prefix}"  # what the network below prints, without building it
    return str(ipaddress.ip_network(f"{addr}/{prefix}", strict=False).with_prefixlen)


def to_tiers(limit_id: str, tiers: Sequence[TierConfig]) -> tuple[Tier, ...]:
    return tuple(
        Tier(f"{limit_id}#{i}", t.limit, t.seconds, t.burst or None) for i, t in enumerate(tiers)
    )


def describe_tier(tier: Tier) -> str:
    return f"{tier.limit} per {tier.period:g}s"


@dataclass(frozen=True, slots=True)
class TierTable:
    """Every limit's tiers from the configuration, built once: per limit, and per domain and per
    login where ``[limits.domains]`` / ``[limits.logins]`` replace them."""

    rules: Mapping[str, tuple[Tier, ...]]
    domains: Mapping[str, Mapping[str, tuple[Tier, ...]]]
    logins: Mapping[str, Mapping[str, tuple[Tier, ...]]]

    @classmethod
    def of(cls, config: LimitsConfig) -> TierTable:
        def table(scoped: Mapping[str, Sequence[TierConfig]]) -> dict[str, tuple[Tier, ...]]:
            return {limit_id: to_tiers(limit_id, tiers) for limit_id, tiers in scoped.items()}

        return cls(
            {limit_id: to_tiers(limit_id, rule.tiers) for limit_id, rule in config.rules.items()},
            {domain: table(scoped) for domain, scoped in config.domains.items()},
            {login: table(scoped) for login, scoped in config.logins.items()},
        )


async def resolve_limits(
    config: LimitsConfig,
    overrides: OverrideSource | None,
    *,
    login: str | None,
    client_ip: str | None,
    domain: str,
    table: TierTable | None = None,
) -> list[_Limit]:
    """The limits that apply, each with its key and its effective tiers (overrides applied).
    ``table``: the configuration's tiers built in advance (else built here)."""
    login = login.lower() if login else None
    timeboxed: Mapping[str, list[dict[str, Any]]] = _NO_OVERRIDES
    if login and overrides is not None:
        timeboxed = await overrides.active_overrides(login)
    return applicable_limits(
        config,
        table if table is not None else TierTable.of(config),
        timeboxed,
        login=login,
        client_ip=client_ip,
        domain=domain,
    )


def applicable_limits(
    config: LimitsConfig,
    table: TierTable,
    timeboxed: Mapping[str, list[dict[str, Any]]],
    *,
    login: str | None,
    client_ip: str | None,
    domain: str,
) -> list[_Limit]:
    """:func:`resolve_limits` once the time-boxed overrides of ``login`` (lower-cased) are known."""
    limits = []
    for limit_id, rule in config.rules.items():
        if rule.key == "login":
            if not login:
                continue
            key = f"login:{login}"
        elif rule.key == "client-ip":
            if not client_ip:
                continue
            key = "ip:" + client_key(client_ip, config.ipv4_prefix, config.ipv6_prefix)
        else:
            if not domain:
                continue
            key = f"domain:{domain}"
        tiers = table.rules[limit_id]
        if domain and limit_id in table.domains.get(domain, {}):
            tiers = table.domains[domain][limit_id]
        if login and limit_id in table.logins.get(login, {}):
            tiers = table.logins[login][limit_id]
        if limit_id in timeboxed:
            tiers = to_tiers(
                limit_id,
                [
                    build(TierConfig, raw, "limit override", f"{limit_id}.tiers[{i}]")
                    for i, raw in enumerate(timeboxed[limit_id])
                ],
            )
        limits.append(_Limit(limit_id, rule, f"{limit_id}:{key}", tiers))
    return limits


class LimitAdmin:
    """``mailward limit status|reset``: a login's usage per tier, and clearing it."""

    def __init__(
        self, config: LimitsConfig, store: LimitStore, overrides: OverrideSource | None
    ) -> None:
        self.config, self.store, self.overrides = config, store, overrides

    async def status(self, login: str) -> list[dict[str, Any]]:
        limits = await resolve_limits(
            self.config, self.overrides, login=login, client_ip=None, domain=""
        )
        rows: list[dict[str, Any]] = []
        for lim in limits:
            if lim.rule.quantity == "distinct-recipients":
                tier = lim.tiers[0]
                count = await self.store.distinct(
                    lim.key, [], tier.period, limit=tier.limit, dry_run=True
                )
                rows.append(
                    {
                        "limit": lim.id,
                        "tier": describe_tier(tier),
                        "quantity": lim.rule.quantity,
                        "used": count.count_after,
                        "remaining": max(0, tier.limit - count.count_after),
                        "reset_after": None,
                    }
                )
                continue
            for tier, usage in zip(
                lim.tiers, await self.store.usage(lim.key, lim.tiers), strict=True
            ):
                rows.append(
                    {
                        "limit": lim.id,
                        "tier": describe_tier(tier),
                        "quantity": lim.rule.quantity,
                        "used": usage.used,
                        "remaining": usage.remaining,
                        "reset_after": usage.reset_after,
                    }
                )
        return rows

    async def reset(self, login: str) -> int:
        cleared = 0
        for limit_id, rule in self.config.rules.items():
            if rule.key == "login":
                # the separator ends the key: alice@example.co must not clear alice@example.com
                key = f"{limit_id}:login:{login.lower()}"
                cleared += await self.store.reset(key + SEPARATOR)
        return cleared


class RateLimit:
    id = CHECK_ID
    stages = frozenset({Stage.MAIL, Stage.RCPT, Stage.DATA})

    def __init__(
        self, config: LimitsConfig, store: LimitStore, overrides: OverrideSource | None
    ) -> None:
        self.config = config
        self.store = store
        self.overrides = overrides
        self.table = TierTable.of(config)
        # (login, client IP, domain) -> (the time-boxed overrides they were resolved with, limits)
        self._resolved: dict[
            tuple[str | None, str | None, str],
            tuple[Mapping[str, list[dict[str, Any]]], tuple[_Limit, ...]],
        ] = {}

    # -- which limits apply ------------------------------------------------------------------------
    async def _state(self, txn: Transaction) -> _TxnState:
        """The transaction's limits, resolved once (at its first stage) and kept for the others:
        login, client and sender are fixed for a transaction, and the override lookup is a
        database query (cached by the policy state). The resolved list is also kept for the next
        transactions of the same login, client and sender domain, as long as the override lookup
        answers with the same (cached) overrides."""
        state = txn.check_state.get(CHECK_ID)
        if isinstance(state, _TxnState):
            return state
        login = txn.session.login
        login = login.lower() if login else None
        client_ip = txn.session.client_ip
        domain = txn.mail_from.rpartition("@")[2].lower() if "@" in txn.mail_from else ""
        timeboxed: Mapping[str, list[dict[str, Any]]] = _NO_OVERRIDES
        if login and self.overrides is not None:
            timeboxed = await self.overrides.active_overrides(login)
        key = (login, client_ip, domain)
        cached = self._resolved.get(key)
        if cached is not None and cached[0] is timeboxed:
            limits = cached[1]
        else:
            limits = tuple(
                applicable_limits(
                    self.config,
                    self.table,
                    timeboxed,
                    login=login,
                    client_ip=client_ip,
                    domain=domain,
                )
            )
            if len(self._resolved) >= RESOLVED_CACHE_MAX:
                self._resolved.clear()
            self._resolved[key] = (timeboxed, limits)
        counts_recipients = any(lim.rule.quantity in _PER_RECIPIENT for lim in limits)
        state = txn.check_state[CHECK_ID] = _TxnState(limits, counts_recipients)
        return state

    # -- the check ---------------------------------------------------------------------------------
    async def evaluate(self, stage: Stage, txn: Transaction, rcpt: Recipient | None) -> Verdict:
        state = await self._state(txn)
        limits = state.limits
        if not limits or (stage is Stage.RCPT and not state.counts_recipients):
            return CONTINUE  # nothing applies (at RCPT: only recipient counts are asked)
        try:
            return await self._evaluate(stage, txn, rcpt, state)
        except StoreUnavailable as exc:
            if all(lim.rule.fail_open for lim in limits):
                log.warning("limit store unavailable, failing open txn=%s: %s", txn.id, exc)
                return CONTINUE
            raise

    async def _evaluate(
        self, stage: Stage, txn: Transaction, rcpt: Recipient | None, state: _TxnState
    ) -> Verdict:
        limits = state.limits
        charge = stage is Stage.DATA
        accepted: list[str] = []  # no recipient yet at MAIL
        members: tuple[str, ...] = ()
        if stage is not Stage.MAIL:  # distinct recipients: those accepted, and this one
            accepted = [r.address for r in txn.accepted if r is not rcpt]
            members = tuple(m.lower() for m in accepted)
            if rcpt is not None:
                members += (rcpt.address.lower(),)
        charges: list[Charge] = []
        distinct: list[DistinctCharge] = []
        counted: list[_Limit] = []  # the limit of each distinct charge
        for lim in limits:
            quantity = lim.rule.quantity
            if quantity == "distinct-recipients":
                if members:
                    tier = lim.tiers[0]
                    distinct.append(DistinctCharge(lim.key, members, tier.period, tier.limit))
                    counted.append(lim)
                continue
            if stage is Stage.MAIL:
                if quantity == "messages":
                    amount = 1
                else:
                    amount = txn.declared_size or 0 if quantity == "bytes" else 0
            elif stage is Stage.RCPT:
                amount = len(accepted) + 1 if quantity == "recipients" else 0
            elif quantity == "messages":
                amount = 1
            elif quantity == "recipients":
                amount = len(accepted)
            else:
                amount = txn.size or 0
            if amount:
                charges.extend(lim.charges(amount))
        if not charges and not distinct:
            return CONTINUE
        # one store call per stage: the charges and the distinct counts, all or nothing
        admission = await self.store.admit(charges, distinct, dry_run=not charge)
        if not admission.decision.allowed:
            return self._over(stage, admission.decision, limits)
        refused = admission.refused
        if refused >= 0:
            lim = counted[refused]
            tier = lim.tiers[0]
            count = admission.distinct[refused].count_after
            return self._verdict(stage, lim.id, tier, count, tier.period, never=False)
        if charge and charges:
            state.charges = charges
        return CONTINUE

    def _over(self, stage: Stage, decision: Decision, limits: Sequence[_Limit]) -> Verdict:
        limit_id = decision.tier_id.split("#", 1)[0]
        tier = next(t for lim in limits for t in lim.tiers if t.id == decision.tier_id)
        return self._verdict(
            stage, limit_id, tier, decision.measured, decision.retry_after, never=decision.never
        )

    def _verdict(
        self, stage: Stage, limit_id: str, tier: Tier, measured: float, retry: float, *, never: bool
    ) -> Verdict:
        evidence = {"measured": f"{measured:g}", "limit": describe_tier(tier)}
        if never:
            return Verdict.reject(
                replies.RATE_LIMIT_NEVER.format(limit=limit_id),
                f"{limit_id}: request larger than the limit's capacity",
                **evidence,
            )
        seconds = max(1, math.ceil(retry)) if math.isfinite(retry) else int(tier.period)
        reply = replies.RATE_LIMITED_EOM if stage is Stage.DATA else replies.RATE_LIMITED
        return Verdict.defer(
            reply.format(limit=limit_id, retry=seconds),
            f"{limit_id} exceeded ({evidence['measured']} > {evidence['limit']}); "
            f"admits again in {seconds}s",
            **evidence,
        )

    async def finish(self, txn: Transaction, delivered: bool) -> None:
        """After the relay: give the end-of-data charge back if the mail was not accepted."""
        state = txn.check_state.pop(CHECK_ID, None)
        charges = state.charges if isinstance(state, _TxnState) else None
        if charges and not delivered:
            try:
                await self.store.refund(charges)
            except StoreUnavailable as exc:
                log.warning("could not refund rate-limit charge txn=%s: %s", txn.id, exc)


def _factory(options: Any, deps: Any) -> RateLimit:
    return RateLimit(deps.config.limits, deps.limit_store, deps.policy_state)


SPEC = CheckSpec(
    id=CHECK_ID,
    stages=RateLimit.stages,
    options=Options,
    factory=_factory,
    doc="Rate limits per login, client IP and sender domain (see [limits]).",
)
