"""The spam rules model: rules and their matchers, the action thresholds, scan results.

What it does: plain, immutable data. A :class:`Rule` is a named symbol (UPPER_SNAKE, like rspamd and
SpamAssassin symbols) with a score, a mode and exactly one matcher; a :class:`RuleSet` is every rule of
the shipped and site files after overlays, with the :class:`Actions` thresholds and the MIME limits.
:meth:`Actions.action_for` is the ONE place where a total score becomes an action (accept, add_header,
hold, tempfail, reject); the engine returns a :class:`Result` (score, symbols, action) and decides
nothing else. Matchers hold compiled patterns; the loader builds them, the engine runs them.

Reads: nothing.

Security notes: :class:`SymbolHit.detail` never carries message content (no matched text, no header
values): only header names, counts, and entries of the rule's own lists (a listed domain, a listed
extension). Results can therefore be logged and audited.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Literal

from gateway.rules.mime import MimeLimits

RuleMode = Literal["enforce", "warn"]


class SpamAction(enum.StrEnum):
    """What the total score asks for, from the mildest to the most severe."""

    ACCEPT = "accept"
    ADD_HEADER = "add_header"
    HOLD = "hold"
    TEMPFAIL = "tempfail"
    REJECT = "reject"

    @property
    def severity(self) -> int:
        return _SEVERITY[self]


_SEVERITY = {a: i for i, a in enumerate(SpamAction)}
THRESHOLD_ACTIONS = (SpamAction.ADD_HEADER, SpamAction.HOLD, SpamAction.TEMPFAIL, SpamAction.REJECT)


@dataclass(frozen=True, slots=True)
class Actions:
    """Score thresholds; ``None`` disables an action. Enabled thresholds rise with severity."""

    add_header: float | None = None
    hold: float | None = None
    tempfail: float | None = None
    reject: float | None = None

    def action_for(self, score: float) -> SpamAction:
        """The most severe action whose threshold the score reaches; ACCEPT below them all."""
        for action in reversed(THRESHOLD_ACTIONS):
            threshold = getattr(self, action.value)
            if threshold is not None and score >= threshold:
                return action
        return SpamAction.ACCEPT


# --- matchers --------------------------------------------------------------------------------------


# A literal prefilter: the regex can only match when, for some alternative, every clause has one
# of its strings in the input. E.g. ``((("click",), ("here", "below")),)`` for click\s+(here|below).
Prefilter = tuple[tuple[tuple[str, ...], ...], ...]


@dataclass(frozen=True, slots=True)
class Pattern:
    """A compiled regex and what the engine needs to run it fast.

    ``regex`` is the pattern as written. ``lowered`` is set when the whole pattern is
    case-insensitive (``(?i)`` at the start, no scoped flags): the same pattern compiled for
    lower-cased input without IGNORECASE, which the engine runs on the lower-cased text (Python's
    ``re`` is two to three times faster so). ``prefilter`` (see ``Prefilter``) is looked up in the
    lower-cased input when ``literals_lower`` is set, else in the input as is; the engine skips the
    regex when it fails. ``width``: the longest span a match can inspect (None: unbounded); in a
    long text the engine then only searches around the occurrences of the literals.
    """

    regex: re.Pattern[str]
    lowered: re.Pattern[str] | None = None
    prefilter: Prefilter | None = None
    literals_lower: bool = True
    width: int | None = None


@dataclass(frozen=True, slots=True)
class BytesPattern:
    regex: re.Pattern[bytes]
    prefilter: tuple[tuple[tuple[bytes, ...], ...], ...] | None  # lower-cased (ASCII)


@dataclass(frozen=True, slots=True)
class HeaderMatch:
    """``header = "Name"`` (or ``Name:addr``, ``Name:name``, ``Name:raw``) with ``regex`` (any value
    matches) or ``exists`` (the header is present / absent)."""

    name: str
    part: Literal["value", "addr", "name", "raw"]
    pattern: Pattern | None
    exists: bool | None


@dataclass(frozen=True, slots=True)
class TextMatch:
    """A regex over a whole view of the message: ``body`` (decoded text of text parts, HTML as text)
    or ``html`` (the decoded HTML source)."""

    target: Literal["body", "html"]
    pattern: Pattern


@dataclass(frozen=True, slots=True)
class RawMatch:
    """A bytes regex over the raw message (headers and body as received, bounded)."""

    pattern: BytesPattern


@dataclass(frozen=True, slots=True)
class UrlMatch:
    """URL tests: a domain list, a minimum count, IP literals, ``user@`` prefixes, link text that
    names another site than the link goes to, or a regex over each URL."""

    kind: Literal["domains", "count", "ip", "userinfo", "mismatch", "regex"]
    domains: frozenset[str] = frozenset()
    count: int = 0
    pattern: Pattern | None = None


@dataclass(frozen=True, slots=True)
class AttachmentMatch:
    """Attachments by file name regex, or by MIME type / extension (``.exe``) lists."""

    pattern: Pattern | None
    types: frozenset[str]  # lower-case MIME types ("application/x-msdownload")
    extensions: frozenset[str]  # lower-case, with the dot (".exe")


@dataclass(frozen=True, slots=True)
class RecipientsMatch:
    minimum: int


@dataclass(frozen=True, slots=True)
class GtubeMatch:
    """Matches the GTUBE test string in the message (no parameters)."""


@dataclass(frozen=True, slots=True)
class EvalMatch:
    """A built-in test by name (see ``gateway.rules.engine.EVALS``); numeric tests fire when the value
    lies within [``minimum``, ``maximum``] (either bound may be open)."""

    name: str
    minimum: float | None
    maximum: float | None


@dataclass(frozen=True, slots=True)
class MetaMatch:
    """Combines other symbols: all of ``all_of``, at least ``any_min`` of ``any_of`` (when given),
    none of ``none_of``. A symbol counts as fired whatever its mode; a disabled one never fires."""

    all_of: tuple[str, ...]
    any_of: tuple[str, ...]
    any_min: int
    none_of: tuple[str, ...]

    @property
    def references(self) -> tuple[str, ...]:
        return self.all_of + self.any_of + self.none_of


Matcher = (
    HeaderMatch
    | TextMatch
    | RawMatch
    | UrlMatch
    | AttachmentMatch
    | RecipientsMatch
    | GtubeMatch
    | EvalMatch
    | MetaMatch
)


@dataclass(frozen=True, slots=True)
class Rule:
    id: str
    score: float
    description: str
    mode: RuleMode
    enabled: bool
    matcher: Matcher
    source: str  # "file:line" of the [[rule]] table
    overridden_by: tuple[str, ...] = ()  # "file:line" of each [override.ID] applied


@dataclass(frozen=True, slots=True)
class RuleSet:
    """Every rule (disabled ones included, for display), in load order, plus actions and limits."""

    rules: tuple[Rule, ...]
    actions: Actions
    limits: MimeLimits
    sources: tuple[str, ...]  # the files read, in order

    @property
    def enabled(self) -> tuple[Rule, ...]:
        return tuple(r for r in self.rules if r.enabled)

    def get(self, rule_id: str) -> Rule | None:
        for rule in self.rules:
            if rule.id == rule_id:
                return rule
        return None


# --- results ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SymbolHit:
    """A rule that fired. ``score`` is the rule's score; it counts in the total only in enforce mode
    (a warn-mode hit is a "would have fired")."""

    id: str
    score: float
    mode: RuleMode
    detail: str

    @property
    def counted(self) -> bool:
        return self.mode == "enforce"


@dataclass(frozen=True, slots=True)
class Result:
    """The scan of one message: total (enforced) score, every symbol that fired, the action.

    ``fingerprint`` is set when the scan was asked for it (see ``gateway.rules.engine.fingerprint``).
    """

    score: float
    symbols: tuple[SymbolHit, ...]
    action: SpamAction
    fingerprint: str | None = None

    @property
    def symbol_ids(self) -> frozenset[str]:
        return frozenset(s.id for s in self.symbols)

    @property
    def warn_score(self) -> float:
        """What the warn-mode symbols would add if they were enforced."""
        return round(sum(s.score for s in self.symbols if not s.counted), 3)
