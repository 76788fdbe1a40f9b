"""Helpers for the rules tests: write rule files, build messages, scan.

What it does: writes TOML rule directories into a temporary path (a minimal "shipped" directory
with actions and the given rules), builds small RFC 5322 messages with CRLF line endings, and scans
them with a fresh RuleEngine.

Reads: nothing but what the tests give it.

Security notes: none (synthetic data only).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from gateway.rules import RuleEngine, RuleSet, load_rules
from gateway.rules.model import Result

ACTIONS = """
[actions]
add_header = 5.0
hold = 10.0
tempfail = 12.0
reject = 15.0
"""


def write(directory: Path, name: str, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def ruleset(tmp_path: Path, rules: str, site: str | None = None) -> RuleSet:
    shipped = tmp_path / "shipped"
    write(shipped, "00-actions.toml", ACTIONS)
    write(shipped, "10-rules.toml", rules)
    sites = []
    if site is not None:
        write(tmp_path / "site", "50-site.toml", site)
        sites.append(tmp_path / "site")
    return load_rules(shipped, sites)


def message(
    body: str = "Hello,\n\nsee you tomorrow.\n",
    *,
    headers: dict[str, str | None] | None = None,
    content_type: str | None = None,
) -> bytes:
    fields: dict[str, str | None] = {
        "From": "Alice <alice@example.com>",
        "To": "bob@example.net",
        "Subject": "Lunch",
        "Date": "Mon, 16 Sep 2002 09:33:38 +0200",
        "Message-ID": "<1@example.com>",
    }
    if content_type:
        fields["MIME-Version"] = "1.0"
        fields["Content-Type"] = content_type
    fields.update(headers or {})
    head = "".join(f"{k}: {v}\r\n" for k, v in fields.items() if v is not None)
    return (head + "\r\n" + body.replace("\r\n", "\n").replace("\n", "\r\n")).encode("utf-8")


def scan(rs: RuleSet, data: bytes, recipients: tuple[str, ...] = ("bob@example.net",)) -> Result:
    return RuleEngine(rs).scan(data, recipients=recipients, login="alice")


def fired(rs: RuleSet, data: bytes, recipients: tuple[str, ...] = ("bob@example.net",)) -> set[str]:
    return set(scan(rs, data, recipients).symbol_ids)
