"""Check ``spam-score``: the rules engine's symbols and score, mapped to one action.

What it does: at end of data scans the message with the rule set (``gateway.rules``: shipped
``policies/rules/*.toml`` overlaid by the site's rule directories; where: see below). It adds one
symbol of its own, ``FANOUT_IDENTICAL_CONTENT``: the same normalised body sent by one login to
``fanout_recipients`` distinct recipients within ``fanout_window`` (content fingerprints and hashed
recipients live in the limit store, never bodies). The rule set's ``[actions]`` thresholds map the
total to one action: ``accept``; ``add_header`` (prepends ``X-Mailward-Spam: <score>, <symbols>``);
``hold`` (quarantine for review, the client gets 250); ``tempfail`` (``451 4.7.1``); ``reject``
(``550 5.7.1``). A message beyond the MIME bounds is refused ``554 5.6.0``. Rules in ``warn`` mode
are computed and reported ("would have fired") but do not count. The verdict's reason lists the
score and every symbol, for the audit.

With ``rspamd_url`` set, the message is also sent to rspamd (``gateway.rules.rspamd``), at the same
time as our own scan runs. rspamd's total times ``rspamd_weight`` (floored at 0) is
added as ONE counted symbol, ``RSPAMD_SCORE``; rspamd's own symbols are listed as
``RSPAMD_<NAME>(score, info)`` and never counted (they are inside ``RSPAMD_SCORE``). When rspamd
fails (refused, ``rspamd_timeout``, bad answer): ``rspamd_on_error = "skip"`` adds the zero-score
``RSPAMD_UNAVAILABLE`` and our rules decide alone (a warning is logged); ``"defer"`` raises, so
the check's ``on_error`` applies (451 4.3.0 by default).

Where our scan runs (``workers``): by default in worker processes (``gateway.rules.workers``,
like rspamd's and spamd's scanner children), one per CPU but one, every message whatever its size:
the event loop only hands the message over and reads the result, and the other cores scan. With
``workers = 0`` the scan runs in the gateway process: messages up to ``inline_max_bytes`` on the
event loop (the hand-off to a thread costs more than scanning a small message), larger ones in a
thread (the GIL: no parallelism). A worker that dies or is killed fails the scans it had (the
check's ``on_error``: 451 by default, never fail open) and is replaced; a scan beyond the check's
``timeout`` fails with the timeout and its worker is killed and replaced shortly after.
:meth:`SpamScore.close` stops the workers (the pipeline's ``close()`` calls it); a scan that
still comes after it (a transaction that began on a pipeline a reload retired) runs in a thread.

Reads: the message bytes (in memory only), the recipients, the login, the limit store; with
``rspamd_url``, rspamd's answer.

Security notes: symbols' details carry header names, counts and list entries, never message
content; nothing here logs the message. A worker process, or with ``workers = 0`` a thread for a
message beyond ``inline_max_bytes``, scans under the check's timeout, so a large or pathological
message cannot stall other sessions (a small one scanned on the loop is bounded too: the regexes
are linted for backtracking at load and the MIME walk is bounded). Message bytes go to the worker
processes over private socketpairs only. With ``rspamd_url`` the message and envelope go to that
rspamd (a local service the operator configured); only rspamd's symbol names and scores come back
into results and logs.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from gateway.config.loader import shipped_dir
from gateway.config.schema import parse_duration
from gateway.config.typed import doc_field
from gateway.core import replies
from gateway.core.errors import ConfigError
from gateway.core.model import CONTINUE, Action, Recipient, Stage, Transaction, Verdict
from gateway.pipeline.registry import CheckSpec
from gateway.ratelimit.store import LimitStore
from gateway.rules import MessageTooComplex, RuleEngine, load_rules
from gateway.rules.model import Result, SpamAction, SymbolHit
from gateway.rules.rspamd import RspamdClient, RspamdUnavailable, parse_url, unavailable_hit
from gateway.rules.workers import ScanWorkers, default_count

log = logging.getLogger("mailward.checks.spam_score")

CHECK_ID = "spam-score"
FANOUT_SYMBOL = "FANOUT_IDENTICAL_CONTENT"
MAX_WORKERS = 256


@dataclass(frozen=True)
class Options:
    rules_dirs: list[str] = doc_field(
        [],
        "Site rule directories (`*.toml`), overlaid in order on the shipped `policies/rules/`: "
        "add rules, or change a shipped rule's `score`/`mode`/`enabled` with `[override.ID]`.",
    )
    fanout_recipients: int = doc_field(
        50,
        "Distinct recipients one login may send the same content to within `fanout_window` "
        "before the symbol FANOUT_IDENTICAL_CONTENT fires; 0 disables it.",
    )
    fanout_window: str = doc_field("1h", "Window for the identical-content fan-out (duration).")
    fanout_score: float = doc_field(6.0, "Score of FANOUT_IDENTICAL_CONTENT.")
    workers: int | Literal["auto"] = doc_field(
        "auto",
        "Worker processes that run the rule scan, off the event loop and on the other cores: "
        "`auto` is one per CPU minus one (at least 1); every message is scanned there. A worker "
        "that dies or exceeds `timeout` is replaced (its scans get `on_error`). 0: scan in the "
        "gateway process (see `inline_max_bytes`).",
    )
    inline_max_bytes: int = doc_field(
        32768,
        "Only with `workers = 0`: messages up to this size are scanned on the event loop; larger "
        "ones in a thread (bounded by the check's `timeout`, other sessions keep running). A "
        "thread hand-off costs more than scanning a small message; 0 sends every scan to a thread.",
    )
    rspamd_url: str = doc_field(
        "",
        "An rspamd normal worker also asked about every message (`POST /checkv2`), e.g. "
        "`http://127.0.0.1:11333`; empty: rspamd is not used. Its total times `rspamd_weight` is "
        "added as the symbol RSPAMD_SCORE (see docs/policies.md).",
    )
    rspamd_timeout: float = doc_field(
        2.0,
        "Seconds rspamd may take per message, connect included; keep it below the check's "
        "`timeout`.",
    )
    rspamd_weight: float = doc_field(
        1.0,
        "Factor on rspamd's total (counted only when positive) before it is added as "
        "RSPAMD_SCORE; 0 lists rspamd's symbols without counting them.",
    )
    rspamd_on_error: Literal["skip", "defer"] = doc_field(
        "skip",
        "When rspamd is unreachable, too slow or answers badly: `skip` adds RSPAMD_UNAVAILABLE "
        "(score 0) and our own rules decide; `defer` fails the check, so its `on_error` applies "
        "(451 4.3.0 by default).",
    )

    def validate(self) -> None:
        try:
            parse_duration(self.fanout_window)
        except ValueError as exc:
            raise ConfigError("", "fanout_window", str(exc)) from None
        if self.fanout_recipients < 0:
            raise ConfigError("", "fanout_recipients", "must not be negative")
        if self.workers != "auto" and not 0 <= self.workers <= MAX_WORKERS:
            raise ConfigError("", "workers", f'must be "auto" or 0 to {MAX_WORKERS}')
        if self.inline_max_bytes < 0:
            raise ConfigError("", "inline_max_bytes", "must not be negative")
        if self.rspamd_url:
            try:
                parse_url(self.rspamd_url)
            except ValueError as exc:
                raise ConfigError("", "rspamd_url", str(exc)) from None
        if not (math.isfinite(self.rspamd_timeout) and self.rspamd_timeout > 0):
            raise ConfigError("", "rspamd_timeout", "must be a positive number of seconds")
        if not (math.isfinite(self.rspamd_weight) and self.rspamd_weight >= 0):
            raise ConfigError("", "rspamd_weight", "must be a number >= 0")


def worker_count(options: Options) -> int:
    """How many scan worker processes ``options`` ask for (0: scan in this process)."""
    return default_count() if options.workers == "auto" else options.workers


def load_engine(options: Options) -> RuleEngine:
    """The engine for the shipped rules overlaid by ``rules_dirs`` (raises ConfigError)."""
    return RuleEngine(
        load_rules(shipped_dir("policies") / "rules", [Path(d) for d in options.rules_dirs])
    )


@dataclass(frozen=True, slots=True)
class SpamScan:
    """One message's scan: our engine's result, the symbols that make up ``score`` (ours, the
    fan-out symbol, ``RSPAMD_SCORE`` or ``RSPAMD_UNAVAILABLE``) and, listed apart, rspamd's own
    symbols (``info``: never counted, they are inside ``RSPAMD_SCORE``)."""

    result: Result
    symbols: tuple[SymbolHit, ...]
    info: tuple[SymbolHit, ...]
    score: float


def spam_header(
    score: float, symbols: tuple[SymbolHit, ...] | list[SymbolHit], info: tuple[SymbolHit, ...] = ()
) -> bytes:
    names = [f"{s.id}({s.score:g})" for s in symbols if s.counted]
    names += [f"{s.id}({s.score:g}, info)" for s in info]
    line = f"X-Mailward-Spam: {score:g}, {', '.join(names) or 'none'}"
    # cut long lists between two symbols so the header line stays below 998 octets
    folded = line if len(line) <= 900 else line[:900].rsplit("), ", 1)[0] + "), ..."
    return folded.encode("ascii", "replace") + b"\r\n"


def _listing(scan: SpamScan) -> str:
    """Every symbol for the audit: ``ID(score)``, ``ID(score, warn)``, ``RSPAMD_X(score, info)``."""
    listed = [f"{s.id}({s.score:g}{'' if s.counted else ', warn'})" for s in scan.symbols]
    listed += [f"{s.id}({s.score:g}, info)" for s in scan.info]
    return ", ".join(listed) or "no symbols"


def _forget(task: asyncio.Task[Any]) -> None:
    """Cancel a task nobody will await; its outcome, if any, is retrieved (no warning)."""
    task.cancel()
    task.add_done_callback(lambda t: t.cancelled() or t.exception())


class SpamScore:
    id = CHECK_ID
    stages = frozenset({Stage.DATA})

    def __init__(self, options: Options, engine: RuleEngine, store: LimitStore) -> None:
        self.options = options
        self.engine = engine
        self.store = store
        self.window = parse_duration(options.fanout_window)
        self.rspamd = (
            RspamdClient(options.rspamd_url, options.rspamd_timeout) if options.rspamd_url else None
        )
        count = worker_count(options)
        # the processes start at the first scan: a pipeline built to validate starts none
        self.workers = ScanWorkers(engine.ruleset, count) if count else None

    async def close(self) -> None:
        """Stop the worker processes (in-flight scans may finish first); idempotent."""
        if self.workers is not None:
            await self.workers.close()

    async def scan(self, txn: Transaction) -> SpamScan:
        """Our rules (in a worker) and rspamd (when configured), at the same time."""
        asked = asyncio.create_task(self._ask_rspamd(txn)) if self.rspamd else None
        try:
            result, symbols, score = await self._scan_own(txn)
            info: tuple[SymbolHit, ...] = ()
            if asked is not None:
                counted, info = await asked
                symbols.append(counted)
                score = round(score + counted.score, 3)
        except BaseException:
            if asked is not None:
                _forget(asked)  # e.g. our scan refused the message: rspamd's answer is moot
            raise
        return SpamScan(result, tuple(symbols), info, score)

    async def _ask_rspamd(self, txn: Transaction) -> tuple[SymbolHit, tuple[SymbolHit, ...]]:
        """``(RSPAMD_SCORE, rspamd's symbols)``, or ``RSPAMD_UNAVAILABLE`` when skipping."""
        assert self.rspamd is not None and txn.content is not None
        try:
            answer = await self.rspamd.check(
                txn.content,
                sender=txn.mail_from,
                recipients=[r.address for r in txn.accepted],
                ip=txn.session.client_ip,
                login=txn.session.login,
                helo=txn.session.helo,
                queue_id=txn.id,
            )
        except RspamdUnavailable as exc:
            if self.options.rspamd_on_error == "defer":
                raise
            log.warning("txn=%s rspamd skipped, own rules decide: %s", txn.id, exc)
            return unavailable_hit(exc), ()
        return answer.hits(self.options.rspamd_weight)

    async def _scan_own(self, txn: Transaction) -> tuple[Result, list[SymbolHit], float]:
        assert txn.content is not None
        recipients = [r.address for r in txn.accepted]
        # the fan-out is counted per login: no login, no fingerprint to compare
        with_fingerprint = (
            self.options.fanout_recipients > 0 and bool(txn.session.login) and bool(recipients)
        )
        if self.workers is not None and not self.workers.closed:
            result = await self.workers.scan(
                txn.content,
                recipients=recipients,
                login=txn.session.login,
                with_fingerprint=with_fingerprint,
            )
        else:
            scan = functools.partial(
                self.engine.scan,
                txn.content,
                recipients=recipients,
                login=txn.session.login,
                with_fingerprint=with_fingerprint,
            )
            # also after close(): a transaction that began on a pipeline a reload has retired
            # may reach end of data after the old pipeline was closed; it is scanned here
            if self.workers is None and len(txn.content) <= self.options.inline_max_bytes:
                result = scan()
            else:
                result = await asyncio.to_thread(scan)
        symbols = list(result.symbols)
        score = result.score
        login = txn.session.login
        if self.options.fanout_recipients and login and result.fingerprint and recipients:
            seen = await self.store.distinct(
                f"fanout:{login.lower()}:{result.fingerprint}",
                [r.lower() for r in recipients],
                self.window,
            )
            if seen.count_after >= self.options.fanout_recipients:
                hit = SymbolHit(
                    FANOUT_SYMBOL,
                    self.options.fanout_score,
                    "enforce",
                    f"{seen.count_after} distinct recipients in {self.options.fanout_window}",
                )
                symbols.append(hit)
                score = round(score + hit.score, 3)
        return result, symbols, score

    async def evaluate(self, stage: Stage, txn: Transaction, rcpt: Recipient | None) -> Verdict:
        try:
            scan = await self.scan(txn)
        except MessageTooComplex as exc:
            return Verdict.reject(replies.MESSAGE_TOO_COMPLEX, f"MIME bounds: {exc}")
        score = scan.score
        result = scan.result
        # the engine mapped its own score already (same rule set): reuse it unless a symbol of ours
        # or rspamd's changed the total
        if score == result.score:
            action = result.action
        else:
            action = self.engine.ruleset.actions.action_for(score)
        if action is SpamAction.ACCEPT:
            return CONTINUE  # (the common case: no reason or evidence to build)
        reason = f"score {score:g}: {_listing(scan)}"
        evidence = {"measured": f"{score:g}", "limit": self._threshold(action)}
        header = (spam_header(score, scan.symbols, scan.info),)
        if action is SpamAction.ADD_HEADER:
            log.info("txn=%s spam %s", txn.id, reason)
            return Verdict(
                Action.CONTINUE,
                reason=reason,
                measured=evidence["measured"],
                limit=evidence["limit"],
                headers=header,
            )
        if action is SpamAction.HOLD:
            return Verdict.hold(reason, headers=header, **evidence)
        if action is SpamAction.TEMPFAIL:
            return Verdict.defer(replies.SPAM_TEMPFAIL, reason, **evidence)
        return Verdict.reject(replies.SPAM_REJECTED.format(score=f"{score:g}"), reason, **evidence)

    def _threshold(self, action: SpamAction) -> str | None:
        value = getattr(self.engine.ruleset.actions, action.value, None)
        return None if value is None else f"{action.value} at {value:g}"


def _factory(options: Any, deps: Any) -> SpamScore:
    return SpamScore(options, load_engine(options), deps.limit_store)


SPEC = CheckSpec(
    id=CHECK_ID,
    stages=SpamScore.stages,
    options=Options,
    factory=_factory,
    doc="Spam rules: scored symbols, one action per total score (see docs/policies.md).",
)
