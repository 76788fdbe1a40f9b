"""Spam rules: named, scored symbols (rspamd/SpamAssassin style) and ONE score → action mapping.

What it does: re-exports the public API. Rules live in TOML (shipped ``policies/rules/*.toml``,
never edited, then the site's rule directories); :func:`load_rules` builds a :class:`RuleSet`,
:class:`RuleEngine` scans a message into a :class:`Result` (score, symbols, action) and decides
nothing else; :func:`fingerprint` hashes normalised content for identical-content fan-out limits;
:func:`evaluate` measures a rule set on a labelled corpus. The check that turns a Result into an SMTP
verdict lives in ``gateway/checks``.

Reads: see the modules (rule files, list files, the messages given).

Security notes: message content is never logged nor put in a result (see ``gateway.rules.model``).
"""

from gateway.rules.engine import (
    EVALS,
    MessageView,
    RuleEngine,
    fingerprint,
    fingerprint_view,
    format_result,
)
from gateway.rules.evaluate import Report, RuleStats, evaluate, format_report, holdout_half
from gateway.rules.loader import check_dir, default_rules_dir, load_rules
from gateway.rules.mime import MessageTooComplex, MimeLimits
from gateway.rules.model import Actions, Result, Rule, RuleSet, SpamAction, SymbolHit

__all__ = [
    "EVALS",
    "Actions",
    "MessageTooComplex",
    "MessageView",
    "MimeLimits",
    "Report",
    "Result",
    "Rule",
    "RuleEngine",
    "RuleSet",
    "RuleStats",
    "SpamAction",
    "SymbolHit",
    "check_dir",
    "default_rules_dir",
    "evaluate",
    "fingerprint",
    "fingerprint_view",
    "format_report",
    "format_result",
    "holdout_half",
    "load_rules",
]
