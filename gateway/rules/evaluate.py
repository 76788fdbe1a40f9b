"""Evaluate a RuleSet on a labelled corpus: how much spam it flags, how much ham it would stop.

What it does: :func:`evaluate` scans every ``spam/*.eml`` and ``ham/*.eml`` of a corpus directory and
returns a :class:`Report`: in total and per rule, how many spam messages end flagged (action at least
``add_header``) and how many ham messages end held or refused (action at least ``hold``), plus each
rule's raw hit counts on spam and ham. A message that exceeds a MIME bound counts as refused (that is
what the gateway would do). :func:`holdout_half` splits a corpus into two stable halves by file name
(tune on one, measure on the other). :func:`format_report` prints the report as a table.

Corpus files may start with an mbox ``From `` line and use LF line endings (as the SpamAssassin public
corpus does): :func:`read_message` drops the former and converts to CRLF, as the gateway receives mail.
The envelope recipients are taken from the To/Cc headers, since a corpus has no envelope.

Reads: the corpus directory.

Security notes: only file names, counts and rule ids are reported, never message content.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.utils import getaddresses
from pathlib import Path

from gateway.core.message import Headers, normalize_line_endings
from gateway.rules.engine import RuleEngine
from gateway.rules.mime import MessageTooComplex
from gateway.rules.model import RuleSet, SpamAction

FLAGGED = SpamAction.ADD_HEADER
STOPPED = SpamAction.HOLD


@dataclass
class RuleStats:
    spam_hits: int = 0
    ham_hits: int = 0
    spam_flagged: int = 0  # spam messages it fired on that ended flagged
    ham_stopped: int = 0  # ham messages it fired on that ended held or refused


@dataclass
class Report:
    spam_total: int = 0
    spam_flagged: int = 0
    ham_total: int = 0
    ham_stopped: int = 0
    rules: dict[str, RuleStats] = field(default_factory=dict)
    missed_spam: list[str] = field(default_factory=list)  # file names
    stopped_ham: list[str] = field(default_factory=list)
    too_complex: list[str] = field(default_factory=list)

    @property
    def spam_rate(self) -> float:
        return self.spam_flagged / self.spam_total if self.spam_total else 0.0

    @property
    def ham_rate(self) -> float:
        return self.ham_stopped / self.ham_total if self.ham_total else 0.0


def read_message(path: Path) -> bytes:
    """A corpus file as the gateway would receive it: no mbox ``From `` line, CRLF line endings."""
    data = path.read_bytes()
    if data.startswith(b"From "):
        nl = data.find(b"\n")
        data = b"" if nl < 0 else data[nl + 1 :]
    return normalize_line_endings(data)


def header_recipients(message: bytes) -> list[str]:
    """Addresses in To and Cc: the stand-in for the envelope of a corpus message."""
    headers = Headers(message)
    pairs = getaddresses(headers.values("To") + headers.values("Cc"))
    return [addr for _, addr in pairs if "@" in addr]


def holdout_half(name: str) -> int:
    """0 or 1, stable for a file name: splits a corpus into two halves for a holdout check."""
    return hashlib.sha256(name.encode("utf-8")).digest()[0] & 1


def corpus_files(corpus_dir: Path) -> Iterator[tuple[str, Path]]:
    """(label, path) for every ``spam/*.eml`` and ``ham/*.eml``, in name order."""
    for label in ("spam", "ham"):
        for path in sorted((corpus_dir / label).glob("*.eml")):
            yield label, path


def evaluate(
    ruleset: RuleSet, corpus_dir: Path, *, select: Callable[[str], bool] | None = None
) -> Report:
    """Scan the corpus (the files whose name ``select`` accepts) and count."""
    if not (corpus_dir / "spam").is_dir() or not (corpus_dir / "ham").is_dir():
        raise FileNotFoundError(f"{corpus_dir} needs spam/ and ham/ subdirectories")
    engine = RuleEngine(ruleset)
    report = Report(rules={r.id: RuleStats() for r in ruleset.enabled})
    for label, path in corpus_files(corpus_dir):
        if select is not None and not select(path.name):
            continue
        message = read_message(path)
        try:
            result = engine.scan(message, recipients=header_recipients(message), login=None)
        except MessageTooComplex:
            report.too_complex.append(path.name)
            action, ids = SpamAction.REJECT, frozenset[str]()
        else:
            action, ids = result.action, result.symbol_ids
        flagged = action.severity >= FLAGGED.severity
        stopped = action.severity >= STOPPED.severity
        if label == "spam":
            report.spam_total += 1
            report.spam_flagged += flagged
            if not flagged:
                report.missed_spam.append(path.name)
        else:
            report.ham_total += 1
            report.ham_stopped += stopped
            if stopped:
                report.stopped_ham.append(path.name)
        for rule_id in ids:
            stats = report.rules[rule_id]
            if label == "spam":
                stats.spam_hits += 1
                stats.spam_flagged += flagged
            else:
                stats.ham_hits += 1
                stats.ham_stopped += stopped
    return report


def format_report(report: Report, ruleset: RuleSet | None = None) -> str:
    """A table: one row per rule (score, hits on spam and ham, how many of those ended flagged /
    stopped), then the totals and the lists of missed spam and stopped ham."""
    scores = {r.id: r for r in ruleset.enabled} if ruleset is not None else {}
    header = f"{'rule':<30} {'score':>7} {'mode':<7} {'spam':>5} {'flag':>5} {'ham':>5} {'stop':>5}"
    lines = [header, "-" * len(header)]
    rows = sorted(report.rules.items(), key=lambda kv: (-kv[1].spam_hits, kv[1].ham_hits, kv[0]))
    for rule_id, s in rows:
        rule = scores.get(rule_id)
        score = f"{rule.score:>7.2f}" if rule else f"{'':>7}"
        mode = rule.mode if rule else ""
        lines.append(
            f"{rule_id:<30} {score} {mode:<7} {s.spam_hits:>5} {s.spam_flagged:>5} "
            f"{s.ham_hits:>5} {s.ham_stopped:>5}"
        )
    lines.append("-" * len(header))
    lines.append(
        f"spam flagged (action >= {FLAGGED.value}): {report.spam_flagged}/{report.spam_total}"
        f" = {report.spam_rate:.1%}"
    )
    lines.append(
        f"ham held or refused (action >= {STOPPED.value}): {report.ham_stopped}/{report.ham_total}"
        f" = {report.ham_rate:.1%}"
    )
    if report.too_complex:
        lines.append("too complex (counted as refused): " + ", ".join(report.too_complex))
    if report.stopped_ham:
        lines.append("ham held or refused: " + ", ".join(report.stopped_ham))
    if report.missed_spam:
        lines.append("spam not flagged: " + ", ".join(report.missed_spam))
    return "\n".join(lines)
