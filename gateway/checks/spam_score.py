"""Check ``spam-score``: the rules engine's symbols and score, mapped to one action.

What it does: at end of data scans the message with the rule set (``gateway.rules``: shipped
``policies/rules/*.toml`` overlaid by the site's rule directories), off the event loop. It adds one
symbol of its own, ``FANOUT_IDENTICAL_CONTENT``: the same normalised body sent by one login to
``fanout_recipients`` distinct recipients within ``fanout_window`` (content fingerprints and hashed
recipients live in the limit store, never bodies). The rule set's ``[actions]`` thresholds map the
total to one action: ``accept``; ``add_header`` (prepends ``X-Mailward-Spam: <score>, <symbols>``);
``hold`` (quarantine for review, the client gets 250); ``tempfail`` (``451 4.7.1``); ``reject``
(``550 5.7.1``). A message beyond the MIME bounds is refused ``554 5.6.0``. Rules in ``warn`` mode
are computed and reported ("would have fired") but do not count. The verdict's reason lists the
score and every symbol, for the audit.

Reads: the message bytes (in memory only), the recipients, the login, the limit store.

Security notes: symbols' details carry header names, counts and list entries, never message
content; nothing here logs the message. The scan runs in a worker thread with the check's timeout,
so a pathological message cannot stall other sessions; the regexes are bounded at load.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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

log = logging.getLogger("mailward.checks.spam_score")

CHECK_ID = "spam-score"
FANOUT_SYMBOL = "FANOUT_IDENTICAL_CONTENT"


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

    def validate(self) -> None:
        try:
            parse_duration(self.fanout_window)
        except ValueError as exc:
            raise ConfigError("", "fanout_window", str(exc)) from None
        if self.fanout_recipients < 0:
            raise ConfigError("", "fanout_recipients", "must not be negative")


def load_engine(options: Options) -> RuleEngine:
    """The engine for the shipped rules overlaid by ``rules_dirs`` (raises ConfigError)."""
    return RuleEngine(
        load_rules(shipped_dir("policies") / "rules", [Path(d) for d in options.rules_dirs])
    )


def spam_header(score: float, symbols: list[SymbolHit]) -> bytes:
    names = ", ".join(f"{s.id}({s.score:g})" for s in symbols if s.counted) or "none"
    line = f"X-Mailward-Spam: {score:g}, {names}"
    # fold long lists at commas so no header line exceeds 998 octets
    folded = line if len(line) <= 900 else line[:900].rsplit(",", 1)[0] + ", ..."
    return folded.encode("ascii", "replace") + b"\r\n"


class SpamScore:
    id = CHECK_ID
    stages = frozenset({Stage.DATA})

    def __init__(self, options: Options, engine: RuleEngine, store: LimitStore) -> None:
        self.options = options
        self.engine = engine
        self.store = store
        self.window = parse_duration(options.fanout_window)

    async def scan(self, txn: Transaction) -> tuple[Result, list[SymbolHit], float]:
        assert txn.content is not None
        recipients = [r.address for r in txn.accepted]
        result = await asyncio.to_thread(
            self.engine.scan,
            txn.content,
            recipients=recipients,
            login=txn.session.login,
            with_fingerprint=self.options.fanout_recipients > 0,
        )
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
            _, symbols, score = await self.scan(txn)
        except MessageTooComplex as exc:
            return Verdict.reject(replies.MESSAGE_TOO_COMPLEX, f"MIME bounds: {exc}")
        action = self.engine.ruleset.actions.action_for(score)
        listed = ", ".join(f"{s.id}({s.score:g}{'' if s.counted else ', warn'})" for s in symbols)
        reason = f"score {score:g}: {listed or 'no symbols'}"
        evidence = {"measured": f"{score:g}", "limit": self._threshold(action)}
        if action is SpamAction.ACCEPT:
            return CONTINUE
        header = (spam_header(score, symbols),)
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
