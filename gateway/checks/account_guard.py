"""Check ``account-guard``: compromised-account detection with a staged response.

What it does: watches each login for the signs of stolen credentials and answers in stages.

**Signals** (per login; counts live in the limit store, so every gateway instance sees the same):

* ``volume`` — messages taken into custody (relayed, queued or held) in the current ``window``
  (sliding), compared with the login's own baseline: the mean number of delivered messages per
  *active* window (one in which it sent anything) over ``baseline_period``, read from the audit
  log, ending where the current window starts (so a burst cannot raise its own baseline), cached
  per login for ``baseline_cache``, never below ``min_messages``. It fires above
  ``volume_factor`` * baseline. The mean is over active windows rather than over every hour of
  the period: the current window is active by construction, so comparing it with a mean diluted
  by nights and weekends would flag every office worker on a Monday morning.
* ``recipients`` — distinct recipient addresses in the current window, against the mean distinct
  recipients per active window (floor ``min_recipients``), above ``recipients_factor`` * baseline.
* ``ips`` — distinct client addresses (grouped by ``limits.ipv4_prefix`` / ``ipv6_prefix``, like
  the rate limits) that authenticated as the login within ``ip_window``: fires at ``max_ips``.
* ``auth-burst`` — a successful AUTH after ``auth_failures_before_success`` or more failures for
  the login within ``auth_failure_window`` (the check keeps its own failure counter; the success
  that reveals a burst consumes it); each burst keeps counting towards the score for
  ``signal_memory``.

**Score.** Each signal has a *level*: 0 when quiet; ``k`` when the measurement exceeds ``k`` times
its threshold (volume, recipients), reaches ``k`` * ``max_ips`` (ips), or after ``k`` bursts
(auth-burst). So a burst that goes on keeps raising its level. The score is the sum of
``weight`` * level over the signals (a weight of 0 switches a signal off).

**Stages** (``account_state`` table, one row per login; see gateway.policystate.account_state):
at ``flag_at`` the login is ``flagged`` (audit event + a WARNING log line ``ALERT account-guard …``;
mail flows); at ``hold_at`` ``held`` (each further message is quarantined for review at end of
data: the client gets 250 "held for review"); at ``suspend_at`` ``suspended`` (MAIL FROM is
refused ``550 5.7.1 Account suspended, contact support``, and a message whose end of data made the
decision is refused with it). ``max_stage`` caps what the check does by itself. The stage never
goes down by itself: only an operator's ``mailward account release`` does, which also starts the
login's counters afresh (the counters' keys carry the row's ``epoch``, bumped by each release).
Every transition is an audit event (kinds ``account-flagged``, ``account-held``,
``account-suspended``, ``account-released``) written in the same database transaction as the new
stage, with the evidence (each signal's measured value, threshold, baseline and level; the score
and stage thresholds) in ``detail`` and in a verdict of check ``account-guard``; the row keeps the
evidence as JSON.

**Stages of the SMTP dialogue.** ``auth``: only ``record_auth`` (failure counting, client
addresses, bursts; a transition can happen here); ``mail``: refuses a suspended login; ``data``:
assesses the signals with this message included, applies the stage; ``finish`` counts the message
when it was relayed, queued or held (its recipients delivered, queued or held). Trusted-network
clients without a login are not judged.

**warn mode** (read from ``[checks.account-guard] mode``): the signals are measured and counted
exactly as in enforce mode, but no stage is stored and no event is audited; the verdicts the
stage would have produced are recorded as "would have" on the messages, and the log says what the
check would have done.

Reads: the session's login and client address, the accepted recipients, the limit store, the
``account_state`` table (cached for ``state_cache``) and the audit log (for baselines).

Security notes: counts are keyed by login; recipient addresses and client networks are stored
hashed by the limit store; no message content is read. If the limit store or the database cannot
answer, the check raises and the runner applies ``on_error`` (shipped: defer, so a suspended login
is never let through unchecked); only with ``fail_open`` does a limit-store failure at end of data
let the message through, judged by the login's stored stage alone. The sliding volume window is
estimated from two fixed windows: the current one plus the previous one weighted by the part of it
still inside the sliding window (instances should keep their clocks in sync, as for any shared
counter). Redis or memory: the same keys, ``ag:<epoch>:<login>:…`` (failures: ``ag:<login>:…``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal, Protocol

from gateway.config.schema import parse_duration
from gateway.config.typed import doc_field
from gateway.core import replies
from gateway.core.errors import ConfigError, LimitStoreUnavailable, StoreUnavailable
from gateway.core.model import (
    CONTINUE,
    Action,
    Mode,
    Recipient,
    RecipientStatus,
    Session,
    Stage,
    Transaction,
    Verdict,
    VerdictRecord,
    utcnow,
)
from gateway.pipeline import eager
from gateway.pipeline.registry import CheckSpec
from gateway.policystate.account_state import (
    FLAGGED,
    HELD,
    OK,
    RANK,
    SUSPENDED,
    AccountState,
    Baseline,
    Transition,
    normalize,
)
from gateway.ratelimit.store import LimitStore

log = logging.getLogger("mailward.checks.account_guard")

CHECK_ID = "account-guard"
#: Most distinct members (recipients, client networks) counted per login and window: bounds the
#: store's memory; a count at the cap is far beyond any sane threshold anyway.
DISTINCT_CAP = 50_000
CACHE_MAX = 10_000
MAX_STAGE = {"flag": FLAGGED, "hold": HELD, "suspend": SUSPENDED}
#: recipient statuses that count as sent volume: delivered in the session, taken into the durable
#: queue (the client got 250; delivered or bounced later) or held for review
_SENT = frozenset({RecipientStatus.DELIVERED, RecipientStatus.QUEUED, RecipientStatus.HELD})
_ACTIONS = {FLAGGED: Action.CONTINUE, HELD: Action.HOLD, SUSPENDED: Action.REJECT}


@dataclass(frozen=True)
class Options:
    window: str = doc_field(
        "1h",
        "The current window (sliding) in which a login's messages and distinct recipients are "
        "measured against its baseline (duration).",
    )
    baseline_period: str = doc_field(
        "7d",
        "History the baseline is computed from: the login's delivered messages in the audit log "
        "over this period, up to the start of the current window (duration).",
    )
    baseline_cache: str = doc_field(
        "10m", "How long a login's baseline is reused before it is computed again (duration)."
    )
    volume_factor: float = doc_field(
        5.0,
        "Signal `volume`: messages in the current window above this many times the baseline "
        "(the login's mean messages per active window).",
    )
    min_messages: float = doc_field(
        20.0,
        "Floor of the message baseline, so a new or quiet login is judged against a sane minimum.",
    )
    recipients_factor: float = doc_field(
        5.0,
        "Signal `recipients`: distinct recipients in the current window above this many times "
        "the baseline (mean distinct recipients per active window).",
    )
    min_recipients: float = doc_field(40.0, "Floor of the distinct-recipient baseline.")
    ip_window: str = doc_field(
        "1h", "Window of the `ips` signal: client addresses seen per login (duration)."
    )
    max_ips: int = doc_field(
        5,
        "Signal `ips`: this many distinct client addresses (grouped like the rate limits) "
        "authenticated as one login within `ip_window`.",
    )
    auth_failure_window: str = doc_field(
        "15m", "Window in which failed AUTHs are counted per login (duration)."
    )
    auth_failures_before_success: int = doc_field(
        10,
        "Signal `auth-burst`: a successful AUTH after at least this many failures for the login "
        "within `auth_failure_window`.",
    )
    signal_memory: str = doc_field(
        "24h", "How long an `auth-burst` keeps counting towards the score (duration)."
    )
    volume_weight: float = doc_field(1.0, "Weight of the `volume` signal (0 switches it off).")
    recipients_weight: float = doc_field(
        1.0, "Weight of the `recipients` signal (0 switches it off)."
    )
    ips_weight: float = doc_field(1.0, "Weight of the `ips` signal (0 switches it off).")
    auth_burst_weight: float = doc_field(
        1.0, "Weight of the `auth-burst` signal (0 switches it off)."
    )
    flag_at: float = doc_field(
        1.0, "Score at which a login is flagged: audit event and ALERT log line; mail flows."
    )
    hold_at: float = doc_field(
        2.0, "Score at which a login is held: its messages are quarantined for review."
    )
    suspend_at: float = doc_field(
        3.0,
        "Score at which a login is suspended: MAIL FROM is refused 550 5.7.1 until an operator "
        "runs `mailward account release`.",
    )
    max_stage: Literal["flag", "hold", "suspend"] = doc_field(
        "suspend",
        "The highest stage the check applies by itself (`flag`: alert only; `hold`: never "
        "suspend). An operator can still suspend with `mailward account suspend`.",
    )
    fail_open: bool = doc_field(
        False,
        "When the limit store cannot answer at end of data: `false` fails the check (`on_error` "
        "applies: 451 4.3.0 by default); `true` still applies the login's stored stage (held "
        "and suspended logins stay so) but measures and counts nothing until the store is back.",
    )
    state_cache: str = doc_field(
        "5s",
        "How long each gateway instance reuses a login's stage; a release or suspension made "
        "elsewhere (CLI, another instance) takes effect within this time (duration).",
    )

    def validate(self) -> None:
        durations = (
            "window",
            "baseline_period",
            "baseline_cache",
            "ip_window",
            "auth_failure_window",
            "signal_memory",
            "state_cache",
        )
        for key in durations:
            try:
                parse_duration(getattr(self, key))
            except ValueError as exc:
                raise ConfigError("", key, str(exc)) from None
        if parse_duration(self.baseline_period) <= parse_duration(self.window):
            raise ConfigError("", "baseline_period", "must be longer than `window`")
        for key in ("volume_factor", "min_messages", "recipients_factor", "min_recipients"):
            if not getattr(self, key) > 0:
                raise ConfigError("", key, "must be positive")
        for key in ("max_ips", "auth_failures_before_success"):
            if getattr(self, key) < 1:
                raise ConfigError("", key, "must be at least 1")
        for key in ("volume_weight", "recipients_weight", "ips_weight", "auth_burst_weight"):
            if getattr(self, key) < 0:
                raise ConfigError("", key, "must not be negative")
        if not 0 < self.flag_at <= self.hold_at <= self.suspend_at:
            raise ConfigError(
                "", "flag_at", "need 0 < flag_at <= hold_at <= suspend_at (scores of the stages)"
            )


class AccountStates(Protocol):
    """What the check needs of the account-state store (SqlAccountState)."""

    async def get(self, login: str, *, max_age: float = 0.0) -> AccountState: ...

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
    ) -> Transition: ...

    async def baseline(
        self, login: str, *, since: datetime, until: datetime, window: float
    ) -> Baseline: ...


@dataclass(frozen=True, slots=True)
class Signal:
    """One signal as measured: its level and the evidence behind it."""

    name: str
    measured: float
    threshold: float
    level: int
    weight: float
    basis: str  # how the threshold was obtained, for humans

    @property
    def points(self) -> float:
        return self.weight * self.level

    def describe(self) -> str:
        return (
            f"{self.name} {self.measured:.4g} vs {self.threshold:.4g} ({self.basis}) "
            f"level {self.level} x{self.weight:g}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "measured": round(self.measured, 3),
            "threshold": round(self.threshold, 3),
            "level": self.level,
            "weight": self.weight,
            "basis": self.basis,
        }


@dataclass(frozen=True, slots=True)
class Assessment:
    """All signals of one login now, their score and the stage the score calls for."""

    signals: tuple[Signal, ...]
    score: float
    target: str

    @property
    def fired(self) -> tuple[Signal, ...]:
        return tuple(s for s in self.signals if s.level > 0 and s.weight > 0)

    def summary(self) -> str:
        fired = "; ".join(s.describe() for s in self.fired) or "no signal"
        return f"score {self.score:g}: {fired}"


def level_over(measured: float, threshold: float) -> int:
    """``k`` when ``measured`` exceeds ``k`` * ``threshold`` (0 when it does not exceed it)."""
    if measured <= threshold:
        return 0
    return max(1, math.ceil(measured / threshold) - 1)


class AccountGuard:
    id = CHECK_ID
    stages = frozenset({Stage.AUTH, Stage.MAIL, Stage.DATA})

    def __init__(
        self,
        options: Options,
        limits: LimitStore,
        states: AccountStates | None,
        ip_key: Callable[[str], str],
        *,
        enforce: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.o = options
        self.limits = limits
        self.states = states
        self.ip_key = ip_key
        self.enforce = enforce
        self.clock = clock
        self.window = parse_duration(options.window)
        self.baseline_period = parse_duration(options.baseline_period)
        self.baseline_cache = parse_duration(options.baseline_cache)
        self.ip_window = parse_duration(options.ip_window)
        self.auth_failure_window = parse_duration(options.auth_failure_window)
        self.signal_memory = parse_duration(options.signal_memory)
        self.state_cache = parse_duration(options.state_cache)
        self.max_stage = MAX_STAGE[options.max_stage]
        self._baselines: dict[str, tuple[float, Baseline]] = {}

    # -- keys (the epoch starts a released login's counters afresh) ---------------------------------
    @staticmethod
    def _key(login: str, epoch: int, what: str) -> str:
        return f"ag:{epoch}:{login}:{what}"

    async def _failures_key(self, login: str) -> str:
        """The login's failed-AUTH counter of the current generation. A counted burst starts a
        new generation, so its failures are not counted again (cheaper than deleting a key,
        which on Redis is a keyspace scan). No epoch here: no database read per failure."""
        generation = await self.limits.get(f"ag:{login}:auth-gen")
        return f"ag:{login}:auth-fail:{generation}"

    def _store(self) -> AccountStates:
        if self.states is None:
            raise StoreUnavailable("account-guard has no account-state store")
        return self.states

    # -- the check ---------------------------------------------------------------------------------
    async def evaluate(self, stage: Stage, txn: Transaction, rcpt: Recipient | None) -> Verdict:
        login = normalize(txn.session.login or "")
        if stage is Stage.AUTH or not login:
            return CONTINUE  # AUTH: everything happens in record_auth, once the result is known
        state = await self._store().get(login, max_age=self.state_cache)
        if state.stage == SUSPENDED:
            return self._suspended(state)
        if stage is not Stage.DATA:
            return CONTINUE
        recipients = [r.address.lower() for r in txn.accepted]
        try:
            assessment = await self._assess(login, state.epoch, message=True, recipients=recipients)
        except LimitStoreUnavailable as exc:
            if not self.o.fail_open:
                raise
            log.warning(
                "account-guard: limit store unavailable, %s judged by its stored stage (%s) "
                "only txn=%s: %s",
                login,
                state.stage,
                txn.id,
                exc,
            )
            return self._apply(state, state.stage, None)
        txn.check_state[CHECK_ID] = (login, state.epoch)
        state = await self._escalate(login, state, assessment, Stage.DATA, txn.session, txn.id)
        effective = state.stage
        if not self.enforce and RANK[assessment.target] > RANK[effective]:
            effective = assessment.target  # warn mode: what the stage would have been
        return self._apply(state, effective, assessment)

    async def record_auth(self, attempt: Transaction, success: bool) -> None:
        """Count failures; on a success, note the client address and a failure burst, and
        assess the login (a transition may happen here)."""
        login = normalize(attempt.auth_login or "")
        if not login or len(login) > 255 or not login.isprintable() or " " in login:
            return
        failures_key = await self._failures_key(login)
        if not success:
            await self.limits.incr(failures_key, 1, self.auth_failure_window)
            return
        state = await self._store().get(login, max_age=self.state_cache)
        epoch = state.epoch
        network = self.ip_key(attempt.session.client_ip)
        await self.limits.distinct(
            self._key(login, epoch, "ips"), [network], self.ip_window, limit=DISTINCT_CAP
        )
        failures = await self.limits.get(failures_key)
        if failures >= self.o.auth_failures_before_success:
            await self.limits.incr(self._key(login, epoch, "bursts"), 1, self.signal_memory)
            # this burst is counted once: later failures go to a new generation's counter (the
            # generation lives much longer than a failure counter: when it lapses back to 0,
            # the old generations' counters have expired, bar one written just before)
            generation_life = max(self.signal_memory, 2 * self.auth_failure_window)
            await self.limits.incr(f"ag:{login}:auth-gen", 1, generation_life)
            log.info("account-guard: AUTH success for %s after %d failures", login, failures)
        ips, bursts = await self._ips_and_bursts(login, epoch)
        if ips.level == 0 and bursts.level == 0:
            return  # nothing that AUTH can change fired: the message signals are judged at DATA
        assessment = await self._assess(login, epoch, message=False, recipients=[])
        await self._escalate(login, state, assessment, Stage.AUTH, attempt.session, None)

    async def finish(self, txn: Transaction, delivered: bool) -> None:
        """After the relay: count the message if it was taken into custody (relayed, queued or
        held): its recipients delivered in the session, accepted into the durable queue or held
        for review are all mail the login sent."""
        noted = txn.check_state.pop(CHECK_ID, None)
        if not isinstance(noted, tuple):
            return
        login, epoch = noted
        taken = [r.address.lower() for r in txn.recipients if r.status in _SENT]
        if not taken:
            return
        index = int(self.clock() // self.window)
        try:
            await eager.gather(
                self.limits.incr(self._key(login, epoch, f"msgs:{index}"), 1, 2 * self.window),
                self.limits.distinct(
                    self._key(login, epoch, "rcpts"), taken, self.window, limit=DISTINCT_CAP
                ),
            )
        except StoreUnavailable as exc:
            log.warning("account-guard could not count txn=%s: %s", txn.id, exc)

    # -- signals -----------------------------------------------------------------------------------
    async def _ips_and_bursts(self, login: str, epoch: int) -> tuple[Signal, Signal]:
        seen, bursts = await eager.gather(
            self.limits.distinct(self._key(login, epoch, "ips"), [], self.ip_window, dry_run=True),
            self.limits.get(self._key(login, epoch, "bursts")),
        )
        ips = Signal(
            "ips",
            seen.count_after,
            self.o.max_ips,
            seen.count_after // self.o.max_ips,
            self.o.ips_weight,
            f"client addresses in {self.o.ip_window}",
        )
        burst = Signal(
            "auth-burst",
            bursts,
            1,
            bursts,
            self.o.auth_burst_weight,
            f"AUTH successes after >= {self.o.auth_failures_before_success} failures "
            f"in {self.o.signal_memory}",
        )
        return ips, burst

    async def _assess(
        self, login: str, epoch: int, *, message: bool, recipients: list[str]
    ) -> Assessment:
        now = self.clock()
        index = int(now // self.window)
        elapsed = (now % self.window) / self.window
        baseline, current, previous, seen, (ips, bursts) = await eager.gather(
            self._baseline(login),
            self.limits.get(self._key(login, epoch, f"msgs:{index}")),
            self.limits.get(self._key(login, epoch, f"msgs:{index - 1}")),
            self.limits.distinct(
                self._key(login, epoch, "rcpts"),
                recipients,
                self.window,
                limit=DISTINCT_CAP,
                dry_run=True,
            ),
            self._ips_and_bursts(login, epoch),
        )
        # the sliding window: this fixed window's count plus the part of the previous one still
        # inside it (rounded: an estimate, shown in the evidence)
        volume = round(current + previous * (1.0 - elapsed), 1) + (1 if message else 0)
        signals = (
            self._over(
                "volume",
                volume,
                baseline.messages,
                self.o.min_messages,
                self.o.volume_factor,
                self.o.volume_weight,
                baseline,
            ),
            self._over(
                "recipients",
                seen.count_after,
                baseline.recipients,
                self.o.min_recipients,
                self.o.recipients_factor,
                self.o.recipients_weight,
                baseline,
            ),
            ips,
            bursts,
        )
        score = round(sum(s.points for s in signals), 3)
        return Assessment(signals, score, self._stage_for(score))

    def _over(
        self,
        name: str,
        measured: float,
        history: float,
        floor: float,
        factor: float,
        weight: float,
        baseline: Baseline,
    ) -> Signal:
        base = max(history, floor)
        source = "floor" if history < floor else f"{baseline.active_windows} active windows"
        threshold = factor * base
        basis = f"baseline {base:.4g} per {self.o.window} ({source}) x{factor:g}"
        return Signal(name, measured, threshold, level_over(measured, threshold), weight, basis)

    def _stage_for(self, score: float) -> str:
        stage = OK
        for candidate, at in (
            (FLAGGED, self.o.flag_at),
            (HELD, self.o.hold_at),
            (SUSPENDED, self.o.suspend_at),
        ):
            if score >= at and RANK[candidate] <= RANK[self.max_stage]:
                stage = candidate
        return stage

    async def _baseline(self, login: str) -> Baseline:
        now = time.monotonic()
        cached = self._baselines.get(login)
        if cached is not None and cached[0] > now:
            return cached[1]
        until = utcnow() - timedelta(seconds=self.window)
        baseline = await self._store().baseline(
            login,
            since=until - timedelta(seconds=self.baseline_period - self.window),
            until=until,
            window=self.window,
        )
        if len(self._baselines) >= CACHE_MAX:
            self._baselines.clear()
        self._baselines[login] = (now + self.baseline_cache, baseline)
        return baseline

    # -- stages ------------------------------------------------------------------------------------
    async def _escalate(
        self,
        login: str,
        state: AccountState,
        assessment: Assessment,
        stage: Stage,
        session: Session,
        txn_id: str | None,
    ) -> AccountState:
        """Store the stage the assessment calls for, if higher; the login's state after."""
        target = assessment.target
        if RANK[target] <= RANK[state.stage]:
            return state
        if not self.enforce:
            log.info(
                "account-guard (warn mode) would move %s from %s to %s: %s",
                login,
                state.stage,
                target,
                assessment.summary(),
            )
            return state
        where = f"at {stage.value}" + (f" (transaction {txn_id})" if txn_id else "")
        evidence = {
            "score": assessment.score,
            "stage": target,
            "where": stage.value,
            "transaction": txn_id,
            "client_ip": session.client_ip,
            "signals": {s.name: s.to_dict() for s in assessment.signals},
            "thresholds": {
                "flag_at": self.o.flag_at,
                "hold_at": self.o.hold_at,
                "suspend_at": self.o.suspend_at,
                "max_stage": self.o.max_stage,
            },
        }
        reply = replies.ACCOUNT_SUSPENDED.line() if target == SUSPENDED else ""
        verdict = VerdictRecord(
            check_id=CHECK_ID,
            stage=stage,
            action=_ACTIONS[target],
            mode=Mode.ENFORCE,
            reply=reply,
            reason=assessment.summary(),
            measured=f"{assessment.score:g}",
            limit=self._limit(target),
        )
        result = await self._store().escalate(
            login,
            target,
            evidence=evidence,
            updated_by=CHECK_ID,
            session=session,
            detail=f"{where}: {assessment.summary()}; {self._thresholds()}",
            verdict=verdict,
        )
        if result.changed:
            log.warning(
                "ALERT account-guard login=%s %s -> %s %s audit=%s: %s",
                login,
                result.before.stage,
                result.after.stage,
                where,
                result.audit_id,
                assessment.summary(),
            )
        return result.after

    def _apply(self, state: AccountState, stage: str, assessment: Assessment | None) -> Verdict:
        """The end-of-data verdict of ``stage`` (``assessment``: what was measured now, None
        when nothing could be). A stored suspension never gets here (refused before)."""
        now = assessment.summary() if assessment is not None else "not measured (store down)"
        score = f"{assessment.score:g}" if assessment is not None else None
        if stage == SUSPENDED:
            return Verdict.reject(
                replies.ACCOUNT_SUSPENDED,
                f"account suspended: {now}",
                measured=score,
                limit=self._limit(SUSPENDED),
            )
        if stage == HELD:
            since = f" since {self._since(state)}" if state.stage == HELD else ""
            return Verdict.hold(
                f"account held for review{since}; now {now}",
                measured=score,
                limit=self._limit(HELD),
            )
        return CONTINUE

    def _suspended(self, state: AccountState) -> Verdict:
        return Verdict.reject(
            replies.ACCOUNT_SUSPENDED,
            f"account suspended since {self._since(state)} by {state.updated_by or '-'}",
            measured=str(state.evidence.get("score", "-")),
            limit=self._limit(SUSPENDED),
        )

    def _limit(self, stage: str) -> str | None:
        at = {FLAGGED: self.o.flag_at, HELD: self.o.hold_at, SUSPENDED: self.o.suspend_at}
        return f"{stage} at score {at[stage]:g}" if stage in at else None

    def _thresholds(self) -> str:
        return (
            f"flag at {self.o.flag_at:g}, hold at {self.o.hold_at:g}, suspend at "
            f"{self.o.suspend_at:g}, max stage {self.o.max_stage}"
        )

    @staticmethod
    def _since(state: AccountState) -> str:
        return state.since.strftime("%Y-%m-%d %H:%M:%SZ") if state.since else "-"


def _factory(options: Any, deps: Any) -> AccountGuard:
    from gateway.checks.rate_limit import client_key

    limits = deps.config.limits

    def ip_key(ip: str) -> str:
        return client_key(ip, limits.ipv4_prefix, limits.ipv6_prefix)

    # warn mode must not store stages (see the module docstring); the mode is validated by the
    # registry, and a check is rebuilt whenever the configuration is
    mode = deps.config.checks.get(CHECK_ID, {}).get("mode", Mode.ENFORCE.value)
    return AccountGuard(
        options,
        deps.limit_store,
        getattr(deps, "account_state", None),
        ip_key,
        enforce=mode == Mode.ENFORCE.value,
    )


SPEC = CheckSpec(
    id=CHECK_ID,
    stages=AccountGuard.stages,
    options=Options,
    factory=_factory,
    doc="Compromised-account detection: per-login baselines, many addresses, AUTH failure "
    "bursts; staged flag, hold, suspend (see docs/policies.md).",
)
