"""Check ``auth-throttle``: failed-AUTH defence without locking honest customers out.

What it does: runs at each AUTH attempt (stage ``auth``), before the password is verified, and is
told the result afterwards (``record_auth``). Failures are counted in the limit store per client IP
(grouped like the rate limits), per login and per (IP, login) pair, in a sliding count window:

* **Tarpit.** After ``delay_after`` failures from an IP (or for a pair), each further failure is
  answered only after an exponentially growing delay (1 s, 2 s, 4 s … up to ``max_delay``).
* **IP block.** At ``block_after`` failures from an IP, or when one IP has failed with
  ``spray_logins`` distinct logins (password spraying), the IP is refused ``454 4.7.0`` for
  ``block_time`` — before any password is checked.
* **Login under attack.** At ``login_throttle_after`` failures for one login (from anywhere), AUTH for
  that login is refused ``454 4.7.0`` from addresses that are strangers to it.
* **No lockout as denial of service.** An address from which the login authenticated successfully in
  the last ``known_good_for`` is never refused for that login, by either rule: the customer keeps
  working while strangers are throttled.

Every refusal is a verdict (id ``auth-throttle``, stage ``auth``) audited with the AUTH event, with the
measured count and the threshold. The counters live in the same store as the rate limits (memory or
Redis), so several instances share them.

Reads: the session's client IP, the login tried, the limit store.

Security notes: counts are kept by login name and IP only (no passwords); if the store is
unreachable the check raises and the runner applies ``on_error`` (default: defer, so AUTH answers
454 — fail closed). The delay is spent after the password check, so it slows guessing without
holding any lock or database connection.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from gateway.config.schema import parse_duration
from gateway.config.typed import doc_field
from gateway.core import replies
from gateway.core.errors import ConfigError
from gateway.core.model import CONTINUE, Recipient, Stage, Transaction, Verdict
from gateway.pipeline.registry import CheckSpec
from gateway.ratelimit.store import LimitStore

log = logging.getLogger("mailward.checks.auth_throttle")

CHECK_ID = "auth-throttle"


@dataclass(frozen=True)
class Options:
    window: str = doc_field("15m", "Failures are counted over this window (duration).")
    delay_after: int = doc_field(
        3, "Failures (per IP or per IP+login) before failures are delayed."
    )
    max_delay: float = doc_field(8.0, "Longest delay, in seconds, before a failure is answered.")
    block_after: int = doc_field(20, "Failures from one IP that block it for `block_time`.")
    spray_logins: int = doc_field(
        8, "Distinct logins failing from one IP within `window` that block it (password spraying)."
    )
    block_time: str = doc_field("15m", "How long a blocked IP is refused 454 (duration).")
    login_throttle_after: int = doc_field(
        10, "Failures for one login within `window` after which strangers are refused for it."
    )
    known_good_for: str = doc_field(
        "30d", "How long an address stays trusted for a login after a successful AUTH from it."
    )

    def validate(self) -> None:
        for key in ("window", "block_time", "known_good_for"):
            try:
                parse_duration(getattr(self, key))
            except ValueError as exc:
                raise ConfigError("", key, str(exc)) from None
        for key in ("delay_after", "block_after", "spray_logins", "login_throttle_after"):
            if getattr(self, key) < 1:
                raise ConfigError("", key, "must be at least 1")
        if self.max_delay < 0:
            raise ConfigError("", "max_delay", "must not be negative")


class AuthThrottle:
    id = CHECK_ID
    stages = frozenset({Stage.AUTH})

    def __init__(self, options: Options, store: LimitStore, ip_key: Any) -> None:
        self.o = options
        self.store = store
        self.ip_key = ip_key  # client IP → grouping key (same prefixes as the rate limits)
        self.window = parse_duration(options.window)
        self.block_time = parse_duration(options.block_time)
        self.known_good_for = parse_duration(options.known_good_for)

    def _keys(self, attempt: Transaction) -> tuple[str, str, str]:
        ip = self.ip_key(attempt.session.client_ip)
        login = (attempt.auth_login or "").lower()
        return f"at:ip:{ip}", f"at:login:{login}", f"at:pair:{ip}:{login}"

    async def evaluate(self, stage: Stage, txn: Transaction, rcpt: Recipient | None) -> Verdict:
        ip_key, login_key, pair_key = self._keys(txn)
        if await self.store.get_flag(pair_key + ":good") is not None:
            return CONTINUE  # this address is known to this login: never refused
        blocked = await self.store.get_flag(ip_key + ":block")
        if blocked is not None:
            return Verdict.defer(
                replies.AUTH_THROTTLED,
                f"client address blocked after repeated failures ({blocked:.0f}s left)",
                measured=str(await self.store.get(ip_key + ":fail")),
                limit=f"{self.o.block_after} failures or {self.o.spray_logins} logins",
            )
        failures = await self.store.get(login_key + ":fail")
        if failures >= self.o.login_throttle_after:
            return Verdict.defer(
                replies.AUTH_THROTTLED,
                "login under attack: refused from addresses it never authenticated from",
                measured=str(failures),
                limit=str(self.o.login_throttle_after),
            )
        return CONTINUE

    async def record_auth(self, attempt: Transaction, success: bool) -> None:
        ip_key, login_key, pair_key = self._keys(attempt)
        if success:
            await self.store.set_flag(pair_key + ":good", self.known_good_for)
            return
        ip_fails = await self.store.incr(ip_key + ":fail", 1, self.window)
        await self.store.incr(login_key + ":fail", 1, self.window)
        pair_fails = await self.store.incr(pair_key + ":fail", 1, self.window)
        sprayed = await self.store.distinct(
            ip_key + ":logins", [(attempt.auth_login or "").lower()], self.window
        )
        if ip_fails >= self.o.block_after or sprayed.count_after >= self.o.spray_logins:
            await self.store.set_flag(ip_key + ":block", self.block_time)
            log.warning(
                "auth-throttle: blocking %s for %.0fs (%d failures, %d logins)",
                attempt.session.client_ip,
                self.block_time,
                ip_fails,
                sprayed.count_after,
            )
        excess = max(ip_fails, pair_fails) - self.o.delay_after
        if excess > 0 and self.o.max_delay > 0:
            await asyncio.sleep(min(self.o.max_delay, 2.0 ** (excess - 1)))


def _factory(options: Any, deps: Any) -> AuthThrottle:
    from gateway.checks.rate_limit import client_key

    limits = deps.config.limits

    def ip_key(ip: str) -> str:
        return client_key(ip, limits.ipv4_prefix, limits.ipv6_prefix)

    return AuthThrottle(options, deps.limit_store, ip_key)


SPEC = CheckSpec(
    id=CHECK_ID,
    stages=AuthThrottle.stages,
    options=Options,
    factory=_factory,
    doc="Failed-AUTH defence: tarpit, IP blocks, password spraying, no lockout of known addresses.",
)
