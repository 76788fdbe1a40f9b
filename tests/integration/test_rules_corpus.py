"""The shipped spam rules on the development corpus: goals, GTUBE, ham regressions, holdout.

What it tests: ``gateway.rules.evaluate.evaluate`` with the shipped rule set on the labelled corpus
in ``tests/data/corpus`` (a copy of the workplace's ``shared/corpus``, so a clean clone has it; or
``$MAILWARD_CORPUS_DIR``): at least 70 % of the spam is flagged (action
add_header or above) and at most 1 % of the ham is held or refused, on the whole corpus and on each
half of the holdout split; GTUBE is refused; a few hard ham messages (newsletters, HTML, marketing
wording) stay below the hold threshold; the report table renders.

Reads: the corpus files (SpamAssassin public corpus sample, see its README) and the shipped rules.

Security notes: none (the corpus is public test data; nothing is logged).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gateway.rules import (
    RuleEngine,
    RuleSet,
    SpamAction,
    default_rules_dir,
    evaluate,
    format_report,
    holdout_half,
    load_rules,
)
from gateway.rules.evaluate import header_recipients, read_message

REPO = Path(__file__).resolve().parents[2]


def corpus_dir() -> Path:
    configured = os.environ.get("MAILWARD_CORPUS_DIR")
    path = Path(configured) if configured else REPO / "tests" / "data" / "corpus"
    if not (path / "spam").is_dir() or not (path / "ham").is_dir():
        pytest.fail(f"spam corpus not found at {path} (set MAILWARD_CORPUS_DIR)")
    return path


@pytest.fixture(scope="module")
def rules() -> RuleSet:
    return load_rules(default_rules_dir())


def test_goals_on_the_whole_corpus(rules: RuleSet) -> None:
    report = evaluate(rules, corpus_dir())
    assert report.spam_total >= 100 and report.ham_total >= 100
    assert report.spam_rate >= 0.70, format_report(report, rules)
    assert report.ham_rate <= 0.01, format_report(report, rules)
    assert report.too_complex == []


@pytest.mark.parametrize("half", [0, 1])
def test_goals_on_each_holdout_half(rules: RuleSet, half: int) -> None:
    report = evaluate(rules, corpus_dir(), select=lambda name: holdout_half(name) == half)
    assert report.spam_rate >= 0.70, format_report(report, rules)
    assert report.ham_rate <= 0.01, format_report(report, rules)


def test_gtube_is_refused(rules: RuleSet) -> None:
    message = read_message(corpus_dir() / "spam" / "gtube.eml")
    result = RuleEngine(rules).scan(message, recipients=["a@example.net"], login="alice")
    assert result.action is SpamAction.REJECT
    assert "GTUBE" in result.symbol_ids


@pytest.mark.parametrize(
    "prefix",
    [
        "hard_ham-00051",  # software-deals newsletter: free, guarantee, click here, HTML forms
        "hard_ham-00100",  # investor newsletter, HTML only, many links
        "hard_ham-00204",  # newsletter via a forwarding service: address in the display name
        "hard_ham-00177",  # insurance marketing from a customer list
        "easy_ham-01421",  # long technical discussion mentioning spam vocabulary
    ],
)
def test_hard_ham_is_not_held(rules: RuleSet, prefix: str) -> None:
    (path,) = (corpus_dir() / "ham").glob(prefix + ".*.eml")
    message = read_message(path)
    result = RuleEngine(rules).scan(message, recipients=header_recipients(message), login=None)
    assert result.action.severity < SpamAction.HOLD.severity, result


def test_report_table_renders(rules: RuleSet) -> None:
    report = evaluate(rules, corpus_dir(), select=lambda name: name.startswith("spam-000"))
    table = format_report(report, rules)
    assert table.splitlines()[0].split()[:3] == ["rule", "score", "mode"]
    assert "spam flagged (action >= add_header)" in table
    assert "ham held or refused (action >= hold)" in table
