"""The rule loader: validation errors with file and line, overlays, actions, regex safety.

What it tests: ``gateway.rules.loader.load_rules`` and ``check_dir``: a bad regex, an unknown key,
a duplicate id, an unknown referenced symbol and a meta-rule cycle are ConfigErrors naming the file,
the line of the ``[[rule]]`` table and the rule; site files change a shipped rule's score, mode or
enabled flag with ``[override.ID]``; thresholds must rise; patterns that could backtrack badly are
refused; the shipped rule set loads cleanly.

Reads: rule files written to a temporary directory, and the shipped ``policies/rules``.

Security notes: none.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.core.errors import ConfigError
from gateway.rules import SpamAction, check_dir, default_rules_dir, load_rules
from tests.unit.rules.helpers import fired, message, ruleset, write

GOOD = """
[[rule]]
id = "SUBJ_LUNCH"
score = 1.0
description = "Lunch in the subject"
header = "Subject"
regex = '(?i)lunch'
"""


def test_shipped_rules_load_cleanly() -> None:
    rs = load_rules(default_rules_dir())
    assert len(rs.enabled) > 40
    assert check_dir(default_rules_dir()) == []
    assert rs.actions.action_for(1000.0) is SpamAction.REJECT


def test_bad_regex_names_file_line_and_rule(tmp_path: Path) -> None:
    rules = (
        GOOD
        + """
[[rule]]
id = "BROKEN"
score = 1.0
description = "broken"
body_regex = 'free[money'
"""
    )
    with pytest.raises(ConfigError) as err:
        ruleset(tmp_path, rules)
    text = str(err.value)
    assert "10-rules.toml:9" in text  # the line of the second [[rule]] table
    assert "rule[BROKEN].body_regex" in text
    assert "invalid regex" in text


def test_unknown_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        ruleset(tmp_path, GOOD.replace("regex =", 'regexp = "x"\nregex ='))
    assert "rule[SUBJ_LUNCH].regexp" in str(err.value)
    assert "unknown key" in str(err.value)
    assert "10-rules.toml:2" in str(err.value)


def test_duplicate_id_across_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        ruleset(tmp_path, GOOD, site=GOOD)
    text = str(err.value)
    assert "50-site.toml:2" in text and "duplicate rule id" in text
    assert "[override.SUBJ_LUNCH]" in text


@pytest.mark.parametrize(
    ("rule", "problem"),
    [
        ('id = "lower_case"\nscore = 1.0\ndescription = "d"\ngtube = true', "UPPER_SNAKE"),
        ('id = "NO_SCORE"\ndescription = "d"\ngtube = true', "score: missing"),
        ('id = "NO_MATCHER"\nscore = 1.0\ndescription = "d"', "no matcher"),
        (
            'id = "TWO"\nscore = 1.0\ndescription = "d"\ngtube = true\nrecipients_min = 3',
            "more than one matcher kind",
        ),
        ('id = "ALONE"\nscore = 1.0\ndescription = "d"\nregex = "x"', "only valid together with"),
        ('id = "EV"\nscore = 1.0\ndescription = "d"\neval = "nope"', "unknown eval"),
        ('id = "EV2"\nscore = 1.0\ndescription = "d"\neval = "body_caps_ratio"', "give min"),
        ('id = "META"\nscore = 1.0\ndescription = "d"\nall_of = ["NOPE"]', "unknown symbol NOPE"),
        (
            'id = "ATT"\nscore = 1.0\ndescription = "d"\nattachment_types = ["exe"]',
            "MIME type (type/subtype) or an extension",
        ),
        (
            'id = "DOM"\nscore = 1.0\ndescription = "d"\nurl_domains = ["not a domain"]',
            "not a domain name",
        ),
        (
            'id = "LST"\nscore = 1.0\ndescription = "d"\nurl_domains_file = "missing.txt"',
            "cannot read",
        ),
    ],
)
def test_rule_problems(tmp_path: Path, rule: str, problem: str) -> None:
    with pytest.raises(ConfigError) as err:
        ruleset(tmp_path, f"[[rule]]\n{rule}\n")
    assert problem in str(err.value)
    assert "10-rules.toml:1" in str(err.value)


def test_meta_cycle_refused(tmp_path: Path) -> None:
    rules = """
[[rule]]
id = "A_META"
score = 1.0
description = "a"
all_of = ["B_META"]

[[rule]]
id = "B_META"
score = 1.0
description = "b"
any_of = ["A_META"]
"""
    with pytest.raises(ConfigError, match="cycle"):
        ruleset(tmp_path, rules)


@pytest.mark.parametrize(
    ("regex", "problem"),
    [
        (r"\w+@", "unbounded repeat"),
        (r"(a+)+b", "exponential"),
        (r"(?:\w{1,9}\s?){1,5}x", "exponential"),
        (r"a.{0,200}b.{0,200}c", "too much backtracking"),
        (r"x{20000}", "above 10000"),
    ],
)
def test_dangerous_patterns_refused(tmp_path: Path, regex: str, problem: str) -> None:
    rule = f'[[rule]]\nid = "SLOW"\nscore = 1.0\ndescription = "d"\nbody_regex = \'{regex}\'\n'
    with pytest.raises(ConfigError) as err:
        ruleset(tmp_path, rule)
    assert "regex refused" in str(err.value) and problem in str(err.value)


@pytest.mark.parametrize(
    "regex",
    [r"^\s*$", r"\bclick\s{1,3}here\b", r"\w{1,64}@", r"(?:\w{1,9}+\s){1,5}x", r"foo.*"],
)
def test_safe_patterns_accepted(tmp_path: Path, regex: str) -> None:
    rule = f'[[rule]]\nid = "OK"\nscore = 1.0\ndescription = "d"\nbody_regex = \'{regex}\'\n'
    assert ruleset(tmp_path, rule).get("OK") is not None


def test_override_score_mode_and_disable(tmp_path: Path) -> None:
    rules = (
        GOOD
        + """
[[rule]]
id = "SUBJ_TOMORROW"
score = 2.0
description = "d"
body_regex = 'tomorrow'
"""
    )
    site = """
[override.SUBJ_LUNCH]
score = 7.5
mode = "warn"

[override.SUBJ_TOMORROW]
enabled = false
"""
    rs = ruleset(tmp_path, rules, site=site)
    lunch = rs.get("SUBJ_LUNCH")
    assert lunch is not None and lunch.score == 7.5 and lunch.mode == "warn"
    assert lunch.overridden_by and "50-site.toml:2" in lunch.overridden_by[0]
    assert [r.id for r in rs.enabled] == ["SUBJ_LUNCH"]
    assert fired(rs, message()) == {"SUBJ_LUNCH"}


def test_override_unknown_rule(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        ruleset(tmp_path, GOOD, site="[override.NOPE]\nscore = 1.0\n")
    assert "50-site.toml:1" in str(err.value) and "unknown rule id" in str(err.value)


def test_override_unknown_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown key"):
        ruleset(tmp_path, GOOD, site="[override.SUBJ_LUNCH]\nregex = 'x'\n")


def test_site_actions_overlay_key_by_key(tmp_path: Path) -> None:
    rs = ruleset(tmp_path, GOOD, site="[actions]\ntempfail = false\nreject = 20.0\n")
    assert rs.actions.add_header == 5.0 and rs.actions.tempfail is None
    assert rs.actions.reject == 20.0


def test_thresholds_must_rise(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        ruleset(tmp_path, GOOD, site="[actions]\nhold = 3.0\n")
    assert "actions.hold" in str(err.value) and "rise" in str(err.value)


def test_limits_validated(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"limits\.max_parts"):
        ruleset(tmp_path, GOOD, site="[limits]\nmax_parts = 0\n")


def test_unknown_table(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown table"):
        ruleset(tmp_path, GOOD, site="[rules]\nx = 1\n")


def test_check_dir_collects_every_problem(tmp_path: Path) -> None:
    site = tmp_path / "site"
    write(
        site,
        "a.toml",
        '[[rule]]\nid = "A_BAD"\nscore = 1.0\ndescription = "d"\nbody_regex = \'(\'\n',
    )
    write(site, "b.toml", "[override.NOPE]\nscore = 1.0\n")
    problems = check_dir(site)
    assert len(problems) == 2
    assert "a.toml:1" in str(problems[0]) and "b.toml:1" in str(problems[1])
    assert check_dir(tmp_path / "missing")[0].problem == "not a directory"


def test_domain_list_file(tmp_path: Path) -> None:
    write(tmp_path / "shipped" / "lists", "bad.txt", "# comment\nevil.example  # trailing\n\n")
    rs = ruleset(
        tmp_path,
        '[[rule]]\nid = "BAD_DOMAIN"\nscore = 1.0\ndescription = "d"\n'
        'url_domains_file = "bad.txt"\n',
    )
    body = "see http://www.evil.example/x and http://good.example/\n"
    assert fired(rs, message(body)) == {"BAD_DOMAIN"}


def test_domain_list_file_bad_entry(tmp_path: Path) -> None:
    write(tmp_path / "shipped" / "lists", "bad.txt", "ok.example\nnot a domain\n")
    with pytest.raises(ConfigError) as err:
        ruleset(
            tmp_path,
            '[[rule]]\nid = "BAD_DOMAIN"\nscore = 1.0\ndescription = "d"\n'
            'url_domains_file = "bad.txt"\n',
        )
    assert "bad.txt:2" in str(err.value)
