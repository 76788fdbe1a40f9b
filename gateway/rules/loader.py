"""Load the spam rules: shipped ``policies/rules/*.toml``, then the site's rule directories.

What it does: reads every ``*.toml`` file of the shipped rules directory and then of each site
directory (each in name order), and builds a :class:`~gateway.rules.model.RuleSet`. A file may hold:

* ``[[rule]]`` tables: ``id`` (UPPER_SNAKE symbol name, unique across all files), ``score``,
  ``description``, ``mode`` (``"enforce"`` or ``"warn"``), ``enabled`` and exactly one matcher kind
  (see ``RuleSpec`` below);
* ``[override.RULE_ID]`` tables changing a rule defined in any file: ``score``, ``mode``, ``enabled``
  (this is how a site changes a shipped rule without editing the shipped file);
* an ``[actions]`` table: the score thresholds ``add_header``, ``hold``, ``tempfail``, ``reject``
  (``false`` disables one); later files override key by key;
* a ``[limits]`` table: the MIME walk bounds (``gateway.rules.mime.MimeLimits``), key by key.

Every problem is a :class:`~gateway.core.errors.ConfigError` whose source is ``file:line`` (the line
of the ``[[rule]]`` / ``[override.X]`` / ``[actions]`` table) and whose key names the rule and field.
:func:`check_dir` collects every problem instead of stopping at the first.

Regexes are Python ``re`` patterns, compiled here. ``re`` has no timeout, so the engine bounds the
input of every regex (``gateway.rules.engine``: header values 8 KiB, body/HTML/raw 256 KiB) and this
module refuses, at load, patterns whose backtracking could blow up on a hostile message:

* an unbounded repeat (``*``, ``+``, ``{n,}``) followed by more pattern (``\\w+@`` is quadratic),
  unless the pattern is anchored at its start (``^`` without ``(?m)``, or ``\\A``) and has no other
  unbounded repeat; write a bound instead (``\\w{1,64}@``);
* a repeat of something that itself varies in length (``(a+)+``, ``(\\w{1,9}\\s?){1,5}``:
  exponential), unless the inner part is possessive or atomic (``\\w{1,9}+``, ``(?>...)``);
* repeat bounds above 10000, or a product of the ranges of the variable repeats above 5000 (10^6 for
  a start-anchored pattern).

The same analysis derives, for each regex, literal strings one of which must occur for a match; the
engine skips the regex when none occurs in the (case-folded) input, which keeps a scan fast.

Reads: the rule files, and the domain list files they name (``url_domains_file``, resolved under
``lists/`` next to the rule file).

Security notes: list file names are resolved under the rule file's ``lists/`` directory unless
absolute; nothing from a message is involved here.
"""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from gateway.config.loader import read_toml, shipped_dir
from gateway.config.typed import build, doc_field
from gateway.core.errors import ConfigError
from gateway.rules.engine import EVALS
from gateway.rules.mime import MimeLimits
from gateway.rules.model import (
    Actions,
    AttachmentMatch,
    BytesPattern,
    EvalMatch,
    GtubeMatch,
    HeaderMatch,
    Matcher,
    MetaMatch,
    Pattern,
    RawMatch,
    RecipientsMatch,
    Rule,
    RuleSet,
    TextMatch,
    UrlMatch,
)

_SRE: Any = importlib.import_module("re._parser")
_SRE_COMPILER: Any = importlib.import_module("re._compiler")
_SRE_CONSTANTS: Any = importlib.import_module("re._constants")

RULE_ID = re.compile(r"^[A-Z][A-Z0-9_]{1,62}$")
_DOMAIN = re.compile(r"^(?=.{1,253}$)[a-z0-9_](?:[a-z0-9_-]{0,62}\.?)*[a-z0-9]$")
_RULE_TABLE = re.compile(r"^[ \t]*\[\[[ \t]*rule[ \t]*\]\]", re.MULTILINE)
_OVERRIDE_TABLE = re.compile(
    r"""^[ \t]*\[[ \t]*override[ \t]*\.[ \t]*["']?([A-Za-z0-9_]+)["']?[ \t]*\]""", re.MULTILINE
)
_HEADER_PARTS = ("addr", "name", "raw")
MAX_REPEAT_BOUND = 10_000
MAX_BACKTRACK = 5_000
MAX_BACKTRACK_ANCHORED = 1_000_000
MIN_LITERAL = 3  # shorter required literals are not worth a prefilter


@dataclass(frozen=True)
class RuleSpec:
    """One ``[[rule]]`` table as written. Exactly one matcher kind per rule."""

    id: str = doc_field("", "Symbol name, UPPER_SNAKE (as rspamd/SpamAssassin), unique.")
    score: float | None = doc_field(None, "Score added when the rule fires (may be negative).")
    description: str = doc_field("", "What the rule detects, for people.")
    mode: Literal["enforce", "warn"] = doc_field(
        "enforce", 'Whether the score counts ("warn": reported as "would have fired" only).'
    )
    enabled: bool = doc_field(True, "A disabled rule is never evaluated.")
    header: str | None = doc_field(
        None, "Header name; `Name:addr`, `Name:name` or `Name:raw` pick a part. With regex/exists."
    )
    regex: str | None = doc_field(None, "With header: fires if a value matches.")
    exists: bool | None = doc_field(None, "With header: fires if the header is (not) present.")
    body_regex: str | None = doc_field(None, "Regex over the decoded text (HTML as text).")
    html_regex: str | None = doc_field(None, "Regex over the decoded HTML source.")
    raw_regex: str | None = doc_field(None, "Regex over the raw message bytes (bounded).")
    url_domains: list[str] | None = doc_field(
        None, "Fires if a URL host is (under) a listed domain."
    )
    url_domains_file: str | None = doc_field(
        None, "A domain list file (one per line, # comments) under `lists/`."
    )
    url_count_min: int | None = doc_field(None, "Fires when the message has at least N URLs.")
    url_ip_literal: bool | None = doc_field(None, "Fires on a URL whose host is an IP address.")
    url_userinfo: bool | None = doc_field(None, "Fires on a URL with a `user@` prefix.")
    url_link_mismatch: bool | None = doc_field(
        None, "Fires when HTML link text names another domain than the link's target."
    )
    url_regex: str | None = doc_field(None, "Regex over each URL as written.")
    attachment_name_regex: str | None = doc_field(None, "Regex over attachment file names.")
    attachment_types: list[str] | None = doc_field(
        None, "MIME types (`application/x-msdownload`) or extensions (`.exe`) of attachments."
    )
    recipients_min: int | None = doc_field(None, "Fires at N or more envelope recipients.")
    gtube: bool | None = doc_field(None, "Fires on the GTUBE test string.")
    eval: str | None = doc_field(None, "A built-in test by name (see gateway.rules.engine.EVALS).")
    min: float | None = doc_field(None, "With a numeric eval: lowest value that fires.")
    max: float | None = doc_field(None, "With a numeric eval: highest value that fires.")
    all_of: list[str] | None = doc_field(None, "Meta rule: every one of these symbols fired.")
    any_of: list[str] | None = doc_field(None, "Meta rule: at least any_min of these fired.")
    any_min: int | None = doc_field(None, "With any_of: how many must fire (default 1).")
    none_of: list[str] | None = doc_field(None, "Meta rule: none of these symbols fired.")


@dataclass(frozen=True)
class OverrideSpec:
    """An ``[override.RULE_ID]`` table."""

    score: float | None = doc_field(None, "New score.")
    mode: Literal["enforce", "warn"] | None = doc_field(None, "New mode.")
    enabled: bool | None = doc_field(None, "false disables the rule, true enables it again.")


@dataclass(frozen=True)
class ActionsSpec:
    """The ``[actions]`` table: score thresholds, ``false`` to disable an action."""

    add_header: float | bool | None = doc_field(None, "Score from which a spam header is added.")
    hold: float | bool | None = doc_field(None, "Score from which the message is held.")
    tempfail: float | bool | None = doc_field(None, "Score from which the message gets a 4xx.")
    reject: float | bool | None = doc_field(None, "Score from which the message is refused.")


# Keys of each matcher kind; the first key of a kind is the one that selects it.
_KINDS: dict[str, tuple[str, ...]] = {
    "header": ("header", "regex", "exists"),
    "body_regex": ("body_regex",),
    "html_regex": ("html_regex",),
    "raw_regex": ("raw_regex",),
    "url_domains": ("url_domains", "url_domains_file"),
    "url_count_min": ("url_count_min",),
    "url_ip_literal": ("url_ip_literal",),
    "url_userinfo": ("url_userinfo",),
    "url_link_mismatch": ("url_link_mismatch",),
    "url_regex": ("url_regex",),
    "attachment_name_regex": ("attachment_name_regex",),
    "attachment_types": ("attachment_types",),
    "recipients_min": ("recipients_min",),
    "gtube": ("gtube",),
    "eval": ("eval", "min", "max"),
    "meta": ("all_of", "any_of", "none_of", "any_min"),
}
_SELECTORS = {
    "header": "header",
    "url_domains": "url_domains",
    "eval": "eval",
    "meta": "all_of",
}
_COMMON_KEYS = {"id", "score", "description", "mode", "enabled"}


def default_rules_dir() -> Path:
    """The shipped rules: ``policies/rules`` in the checkout or the installed wheel."""
    return shipped_dir("policies") / "rules"


def load_rules(shipped_dir: Path, site_dirs: Sequence[Path] = ()) -> RuleSet:
    """Shipped rules, then each site directory's; raises the first ConfigError (file:line, key)."""
    loader = _Loader(shipped_dir, site_dirs)
    if loader.problems:
        raise loader.problems[0]
    return loader.ruleset()


def check_dir(path: Path, shipped: Path | None = None) -> list[ConfigError]:
    """Every problem of a rules directory (loaded on top of the shipped rules); empty when valid.

    ``path`` may be the shipped directory itself, which is then checked alone.
    """
    shipped = shipped or default_rules_dir()
    site: list[Path] = []
    if not path.is_dir():
        return [ConfigError(str(path), "", "not a directory")]
    if path.resolve() != shipped.resolve():
        site.append(path)
    return _Loader(shipped, site).problems


# --- the loader ------------------------------------------------------------------------------------


@dataclass
class _Defined:
    spec: RuleSpec
    source: str
    path: Path
    matcher: Matcher | None  # None when the matcher had a problem (already reported)


class _Loader:
    def __init__(self, shipped: Path, site_dirs: Sequence[Path]) -> None:
        self.problems: list[ConfigError] = []
        self.sources: list[str] = []
        self.rules: dict[str, _Defined] = {}
        self.overrides: list[tuple[str, str, OverrideSpec]] = []  # (id, source, spec)
        self.actions: dict[str, Any] = {}
        self.actions_source = "rules"
        self.limits: dict[str, Any] = {}
        self.limits_source = "rules"
        for directory in (shipped, *site_dirs):
            if not directory.is_dir():
                self.problems.append(ConfigError(str(directory), "", "not a directory"))
                continue
            for path in sorted(directory.glob("*.toml")):
                self._file(path)
        self._finish()

    def _problem(self, source: str, key: str, problem: str) -> None:
        self.problems.append(ConfigError(source, key, problem))

    # one file ------------------------------------------------------------------------------------

    def _file(self, path: Path) -> None:
        self.sources.append(str(path))
        try:
            data = read_toml(path)
            text = path.read_text(encoding="utf-8", errors="replace")
        except ConfigError as exc:
            self.problems.append(exc)
            return
        for key in data:
            if key not in ("rule", "override", "actions", "limits"):
                self._problem(
                    str(path), key, "unknown table (known: rule, override, actions, limits)"
                )
        rules = data.get("rule", [])
        if not isinstance(rules, list) or not all(isinstance(r, Mapping) for r in rules):
            self._problem(str(path), "rule", "expected [[rule]] tables")
            rules = []
        rule_lines = _lines_of(_RULE_TABLE, text)
        for i, raw in enumerate(rules):
            line = rule_lines[i] if len(rule_lines) == len(rules) else _line_of_id(text, raw)
            self._rule(path, _where(path, line), raw)
        overrides = data.get("override", {})
        if not isinstance(overrides, Mapping):
            self._problem(str(path), "override", "expected [override.RULE_ID] tables")
            overrides = {}
        override_lines = {m[1]: _line_at(text, m.start()) for m in _OVERRIDE_TABLE.finditer(text)}
        for rule_id, raw in overrides.items():
            source = _where(path, override_lines.get(rule_id))
            if not isinstance(raw, Mapping):
                self._problem(source, f"override.{rule_id}", "expected a table")
                continue
            try:
                spec = build(OverrideSpec, raw, source, f"override.{rule_id}")
            except ConfigError as exc:
                self.problems.append(exc)
                continue
            self.overrides.append((rule_id, source, spec))
        for table, target in (("actions", self.actions), ("limits", self.limits)):
            raw_table = data.get(table)
            if raw_table is None:
                continue
            source = _where(path, _line_of_table(text, table))
            if not isinstance(raw_table, Mapping):
                self._problem(source, table, "expected a table")
                continue
            target.update(raw_table)
            if table == "actions":
                self.actions_source = source
            else:
                self.limits_source = source

    def _rule(self, path: Path, source: str, raw: Mapping[str, Any]) -> None:
        rule_id = raw.get("id")
        label = f"rule[{rule_id}]" if isinstance(rule_id, str) and rule_id else "rule"
        try:
            spec = build(RuleSpec, raw, source, label)
        except ConfigError as exc:
            self.problems.append(exc)
            if isinstance(rule_id, str) and rule_id and rule_id not in self.rules:
                self.rules[rule_id] = _Defined(RuleSpec(id=rule_id), source, path, None)
            return
        if not RULE_ID.match(spec.id):
            self._problem(
                source, f"{label}.id", "expected an UPPER_SNAKE symbol name, e.g. SUBJ_ALL_CAPS"
            )
            return
        if spec.id in self.rules:
            first = self.rules[spec.id].source
            self._problem(
                source,
                f"{label}.id",
                f"duplicate rule id (first defined at {first}); "
                f"change a rule with [override.{spec.id}]",
            )
            return
        if spec.score is None:
            self._problem(source, f"{label}.score", "missing (a number, may be negative)")
        if not spec.description.strip():
            self._problem(source, f"{label}.description", "missing (say what the rule detects)")
        matcher = None
        try:
            matcher = self._matcher(spec, path, source, label)
        except ConfigError as exc:
            self.problems.append(exc)
        self.rules[spec.id] = _Defined(spec, source, path, matcher)

    def _matcher(self, spec: RuleSpec, path: Path, source: str, label: str) -> Matcher:
        given = {f.name for f in dataclasses.fields(spec) if getattr(spec, f.name) is not None}
        given -= _COMMON_KEYS
        kinds = [k for k, keys in _KINDS.items() if given & set(keys)]
        if not kinds:
            names = ", ".join(_SELECTORS.get(k, k) for k in _KINDS)
            raise ConfigError(source, label, f"no matcher (give exactly one of: {names})")
        if len(kinds) > 1:
            shown = ", ".join(sorted(given))
            raise ConfigError(source, label, f"more than one matcher kind ({shown}); one per rule")
        kind = kinds[0]
        selector = _SELECTORS.get(kind, kind)
        if kind == "url_domains":
            pass
        elif kind == "meta":
            if not (spec.all_of or spec.any_of or spec.none_of):
                raise ConfigError(source, f"{label}.all_of", "a meta rule needs all_of/any_of")
        elif getattr(spec, selector) is None:
            extra = ", ".join(sorted(given))
            raise ConfigError(source, f"{label}.{extra}", f"only valid together with {selector}")

        def key(name: str) -> str:
            return f"{label}.{name}"

        def true_flag(name: str) -> None:
            if getattr(spec, name) is not True:
                raise ConfigError(source, key(name), "set it to true or leave it out")

        if kind == "header":
            return _header_matcher(spec, source, key)
        if kind in ("body_regex", "html_regex"):
            pattern = _text_pattern(getattr(spec, kind), source, key(kind))
            return TextMatch("body" if kind == "body_regex" else "html", pattern)
        if kind == "raw_regex":
            return RawMatch(_bytes_pattern(spec.raw_regex or "", source, key(kind)))
        if kind == "url_domains":
            domains = set(_domains(spec.url_domains or [], source, key("url_domains")))
            if spec.url_domains_file is not None:
                domains |= _domain_file(path, spec.url_domains_file, source, key(kind + "_file"))
            if not domains:
                raise ConfigError(source, key(kind), "no domains given")
            return UrlMatch("domains", domains=frozenset(domains))
        if kind == "url_count_min":
            count = spec.url_count_min or 0
            if count < 1:
                raise ConfigError(source, key(kind), "must be at least 1")
            return UrlMatch("count", count=count)
        if kind in ("url_ip_literal", "url_userinfo", "url_link_mismatch"):
            true_flag(kind)
            short = {"url_ip_literal": "ip", "url_userinfo": "userinfo"}.get(kind, "mismatch")
            return UrlMatch(short)  # type: ignore[arg-type]
        if kind == "url_regex":
            return UrlMatch("regex", pattern=_text_pattern(spec.url_regex or "", source, key(kind)))
        if kind == "attachment_name_regex":
            pattern = _text_pattern(spec.attachment_name_regex or "", source, key(kind))
            return AttachmentMatch(pattern, frozenset(), frozenset())
        if kind == "attachment_types":
            return _attachment_types(spec.attachment_types or [], source, key(kind))
        if kind == "recipients_min":
            if (spec.recipients_min or 0) < 1:
                raise ConfigError(source, key(kind), "must be at least 1")
            return RecipientsMatch(spec.recipients_min or 0)
        if kind == "gtube":
            true_flag(kind)
            return GtubeMatch()
        if kind == "eval":
            return _eval_matcher(spec, source, key)
        return MetaMatch(
            tuple(spec.all_of or ()),
            tuple(spec.any_of or ()),
            spec.any_min if spec.any_min is not None else 1,
            tuple(spec.none_of or ()),
        )

    # after all files ------------------------------------------------------------------------------

    def _finish(self) -> None:
        for rule_id, source, _spec in self.overrides:
            if rule_id not in self.rules:
                self._problem(source, f"override.{rule_id}", "unknown rule id")
        for rule_id, defined in self.rules.items():
            matcher = defined.matcher
            if not isinstance(matcher, MetaMatch):
                continue
            key = f"rule[{rule_id}]"
            for ref in matcher.references:
                if ref not in self.rules:
                    self._problem(defined.source, key, f"unknown symbol {ref} referenced")
                elif ref == rule_id:
                    self._problem(defined.source, key, "a meta rule cannot reference itself")
            if matcher.any_of and not 1 <= matcher.any_min <= len(matcher.any_of):
                self._problem(defined.source, f"{key}.any_min", "must be between 1 and len(any_of)")
            if not matcher.any_of and defined.spec.any_min is not None:
                self._problem(defined.source, f"{key}.any_min", "only valid together with any_of")
        cycle = _find_cycle(
            {
                rid: d.matcher.references
                for rid, d in self.rules.items()
                if isinstance(d.matcher, MetaMatch)
            }
        )
        if cycle:
            first = self.rules[cycle[0]]
            self._problem(
                first.source, f"rule[{cycle[0]}]", "meta rules form a cycle: " + " -> ".join(cycle)
            )
        self._actions = self._build_actions()
        try:
            self._limits = build(MimeLimits, self.limits, self.limits_source, "limits")
        except ConfigError as exc:
            self.problems.append(exc)
            self._limits = MimeLimits()

    def _build_actions(self) -> Actions:
        try:
            spec = build(ActionsSpec, self.actions, self.actions_source, "actions")
        except ConfigError as exc:
            self.problems.append(exc)
            return Actions()
        values: dict[str, float | None] = {}
        for name in ("add_header", "hold", "tempfail", "reject"):
            value = getattr(spec, name)
            if value is True:
                self._problem(
                    self.actions_source, f"actions.{name}", "a score, or false to disable"
                )
                value = None
            values[name] = None if value is None or value is False else float(value)
        enabled = [(n, v) for n, v in values.items() if v is not None]
        for (low_name, low), (high_name, high) in itertools.pairwise(enabled):
            if high <= low:
                self._problem(
                    self.actions_source,
                    f"actions.{high_name}",
                    f"must be above {low_name} ({low:g}): thresholds rise with severity",
                )
        return Actions(**values)

    def ruleset(self) -> RuleSet:
        rules: list[Rule] = []
        overrides: dict[str, list[tuple[str, OverrideSpec]]] = {}
        for rule_id, source, override in self.overrides:
            overrides.setdefault(rule_id, []).append((source, override))
        for rule_id, defined in self.rules.items():
            spec = defined.spec
            assert defined.matcher is not None and spec.score is not None  # no problems left
            score, mode, enabled = spec.score, spec.mode, spec.enabled
            applied: list[str] = []
            for source, o in overrides.get(rule_id, []):
                score = o.score if o.score is not None else score
                mode = o.mode if o.mode is not None else mode
                enabled = o.enabled if o.enabled is not None else enabled
                applied.append(source)
            rules.append(
                Rule(
                    id=rule_id,
                    score=score,
                    description=spec.description.strip(),
                    mode=mode,
                    enabled=enabled,
                    matcher=defined.matcher,
                    source=defined.source,
                    overridden_by=tuple(applied),
                )
            )
        return RuleSet(tuple(rules), self._actions, self._limits, tuple(self.sources))


# --- matcher builders ------------------------------------------------------------------------------


def _header_matcher(spec: RuleSpec, source: str, key: Any) -> HeaderMatch:
    name, _, part = (spec.header or "").partition(":")
    name = name.strip()
    if not name or not re.fullmatch(r"[!-9;-~]+", name):
        raise ConfigError(source, key("header"), "expected a header field name, e.g. Subject")
    if part and part not in _HEADER_PARTS:
        raise ConfigError(
            source, key("header"), f"unknown part :{part} (known: :addr, :name, :raw)"
        )
    if (spec.regex is None) == (spec.exists is None):
        raise ConfigError(source, key("header"), "give exactly one of regex or exists")
    pattern = None
    if spec.regex is not None:
        pattern = _text_pattern(spec.regex, source, key("regex"))
    return HeaderMatch(name, part or "value", pattern, spec.exists)  # type: ignore[arg-type]


def _eval_matcher(spec: RuleSpec, source: str, key: Any) -> EvalMatch:
    name = spec.eval or ""
    known = EVALS.get(name)
    if known is None:
        raise ConfigError(source, key("eval"), f"unknown eval (known: {', '.join(sorted(EVALS))})")
    bounded = spec.min is not None or spec.max is not None
    if known.numeric and not bounded:
        raise ConfigError(source, key("eval"), f"{name} is numeric: give min and/or max")
    if not known.numeric and bounded:
        raise ConfigError(source, key("eval"), f"{name} is true/false: min and max do not apply")
    if spec.min is not None and spec.max is not None and spec.min > spec.max:
        raise ConfigError(source, key("min"), "greater than max")
    return EvalMatch(name, spec.min, spec.max)


def _attachment_types(values: list[str], source: str, key: str) -> AttachmentMatch:
    types: set[str] = set()
    extensions: set[str] = set()
    for i, value in enumerate(values):
        v = value.strip().lower()
        if re.fullmatch(r"\.[a-z0-9_+-]{1,20}", v):
            extensions.add(v)
        elif re.fullmatch(r"[a-z0-9!#$&^_.+-]{1,64}/[a-z0-9!#$&^_.+-]{1,64}", v):
            types.add(v)
        else:
            raise ConfigError(
                source, f"{key}[{i}]", "expected a MIME type (type/subtype) or an extension (.exe)"
            )
    if not values:
        raise ConfigError(source, key, "empty list")
    return AttachmentMatch(None, frozenset(types), frozenset(extensions))


def _domains(values: Iterable[str], source: str, key: str) -> list[str]:
    out = []
    for i, value in enumerate(values):
        domain = value.strip().lower().rstrip(".")
        if not _DOMAIN.match(domain) or "." not in domain:
            raise ConfigError(source, f"{key}[{i}]", f"not a domain name: {value!r}")
        out.append(domain)
    return out


def _domain_file(rule_file: Path, name: str, source: str, key: str) -> set[str]:
    path = Path(name)
    if not path.is_absolute():
        path = rule_file.parent / "lists" / path
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(source, key, f"cannot read {path}: {exc.__class__.__name__}") from None
    domains: set[str] = set()
    for number, line in enumerate(text.splitlines(), 1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        try:
            domains.update(_domains([entry], f"{path}:{number}", "domain"))
        except ConfigError as exc:
            raise ConfigError(source, key, str(exc)) from None
    return domains


# --- regex analysis --------------------------------------------------------------------------------


def _compile(pattern: str, source: str, key: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ConfigError(source, key, f"invalid regex: {exc.msg} at position {exc.pos}") from None


def _text_pattern(pattern: str, source: str, key: str) -> Pattern:
    compiled = _compile(pattern, source, key)
    tree = _SRE.parse(pattern, 0)
    problem = _lint(tree)
    if problem:
        raise ConfigError(source, key, f"regex refused: {problem}")
    global_ci = bool(tree.state.flags & re.IGNORECASE)
    scoped = _has_scoped_flags(list(tree))
    prefilter = None if scoped and not global_ci else _prefilter(tree)
    lowered = _compile_lowered(pattern) if global_ci and not scoped else None
    if prefilter is not None and global_ci:
        prefilter = tuple(
            tuple(tuple(sorted({lit.lower() for lit in clause})) for clause in alternative)
            for alternative in prefilter
        )
    return Pattern(
        compiled,
        lowered=lowered,
        prefilter=prefilter,
        literals_lower=global_ci,
        width=_match_width(tree),
    )


def _has_scoped_flags(items: list[Any]) -> bool:
    """Whether a group changes flags, e.g. ``(?i:...)`` (the literals' case is then unknown)."""
    for op, av in items:
        name = _name(op)
        if name == "SUBPATTERN" and (av[1] or av[2] or _has_scoped_flags(list(av[3]))):
            return True
        for sub in _children(name, av):
            if _has_scoped_flags(list(sub)):
                return True
    return False


def _children(name: str, av: Any) -> list[Any]:
    if name == "BRANCH":
        return list(av[1])
    if name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
        return [av[2]]
    if name == "ATOMIC_GROUP":
        return [av]
    if name in ("ASSERT", "ASSERT_NOT"):
        return [av[1]]
    if name == "GROUPREF_EXISTS":
        return [b for b in (av[1], av[2]) if b is not None]
    return []


def _match_width(tree: Any) -> int | None:
    """The longest span a match can look at: its maximum width plus its lookaheads' (or None)."""
    total = tree.getwidth()[1]
    extra = _lookahead_width(list(tree))
    if extra is None or total >= MAX_REPEAT_BOUND * 10:
        return None
    return int(total + extra)


def _lookahead_width(items: list[Any]) -> int | None:
    width = 0
    for op, av in items:
        name = _name(op)
        if name == "ASSERT" and av[0] == 1:  # a lookahead can read past the end of the match
            high = av[1].getwidth()[1]
            if high >= MAX_REPEAT_BOUND * 10:
                return None
            width += high
        subs = [av[3]] if name == "SUBPATTERN" else _children(name, av)
        for sub in subs:
            inner = _lookahead_width(list(sub))
            if inner is None:
                return None
            width += inner
    return width


class _NotLowerable(Exception):
    pass


def _compile_lowered(pattern: str) -> re.Pattern[str] | None:
    """The pattern rewritten for lower-cased input: literals and classes lower-cased, IGNORECASE
    dropped. None when a character lower-cases to several (the plain regex is then used)."""
    tree = _SRE.parse(pattern, 0)
    try:
        data = _lower_items(tree.data)
    except _NotLowerable:
        return None
    tree.data = data
    tree.state.flags &= ~re.IGNORECASE
    compiled: re.Pattern[str] = _SRE_COMPILER.compile(tree, tree.state.flags)
    return compiled


def _lower_char(code: int) -> int:
    lowered = chr(code).lower()
    if len(lowered) != 1:
        raise _NotLowerable
    return ord(lowered)


def _lower_items(items: list[Any]) -> list[Any]:
    out: list[Any] = []
    sub_pattern = _SRE.SubPattern
    for op, av in items:
        name = _name(op)
        if name in ("LITERAL", "NOT_LITERAL"):
            out.append((op, _lower_char(av)))
        elif name == "IN":
            out.append((op, _lower_class(av)))
        elif name == "BRANCH":
            out.append((op, (av[0], [_lower_sub(b, sub_pattern) for b in av[1]])))
        elif name == "SUBPATTERN":
            out.append((op, (av[0], av[1], av[2], _lower_sub(av[3], sub_pattern))))
        elif name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
            out.append((op, (av[0], av[1], _lower_sub(av[2], sub_pattern))))
        elif name == "ATOMIC_GROUP":
            out.append((op, _lower_sub(av, sub_pattern)))
        elif name in ("ASSERT", "ASSERT_NOT"):
            out.append((op, (av[0], _lower_sub(av[1], sub_pattern))))
        elif name == "GROUPREF_EXISTS":
            yes = _lower_sub(av[1], sub_pattern)
            no = _lower_sub(av[2], sub_pattern) if av[2] is not None else None
            out.append((op, (av[0], yes, no)))
        else:
            out.append((op, av))
    return out


def _lower_sub(sub: Any, sub_pattern: Any) -> Any:
    return sub_pattern(sub.state, _lower_items(list(sub.data)))


def _lower_class(items: list[Any]) -> list[Any]:
    """A character class for lower-cased input: every member plus its lower-case form."""
    out = list(items)
    literal = _SRE_CONSTANTS.LITERAL
    for op, av in items:
        name = _name(op)
        if name == "LITERAL":
            low = _lower_char(av)
            if low != av:
                out.append((literal, low))
        elif name == "RANGE":
            low_end, high_end = av
            if high_end - low_end > 0x3000:
                raise _NotLowerable
            extra = {_lower_char(c) for c in range(low_end, high_end + 1)}
            out.extend((literal, c) for c in sorted(extra) if not low_end <= c <= high_end)
    return out


def _bytes_pattern(pattern: str, source: str, key: str) -> BytesPattern:
    _compile(pattern, source, key)  # a readable error first
    try:
        raw = pattern.encode("utf-8")
        compiled = re.compile(raw)
    except re.error as exc:
        raise ConfigError(source, key, f"invalid regex: {exc.msg} at position {exc.pos}") from None
    tree = _SRE.parse(raw, 0)
    problem = _lint(tree)
    if problem:
        raise ConfigError(source, key, f"regex refused: {problem}")
    prefilter = _prefilter(tree)
    as_bytes = None
    if prefilter is not None:
        as_bytes = tuple(
            tuple(
                tuple(lit.encode("latin-1", "replace").lower() for lit in clause) for clause in alt
            )
            for alt in prefilter
        )
    return BytesPattern(compiled, as_bytes)


def _name(op: Any) -> str:
    return str(getattr(op, "name", op))


_UNBOUNDED = "an unbounded repeat (*, + or {n,}) followed by more pattern can take quadratic time"
_CharSet = frozenset[str]
# Character classes are compared on a probe alphabet (Latin-1 and Latin Extended-A): enough to tell
# whether a repeated class can also match what follows it, which is all the cost estimate needs.
_PROBE: _CharSet = frozenset(chr(i) for i in range(0x180))
_CATEGORIES: Mapping[str, _CharSet] = {
    name: frozenset(c for c in _PROBE if re.fullmatch(pattern, c))
    for name, pattern in (
        ("CATEGORY_DIGIT", r"\d"),
        ("CATEGORY_NOT_DIGIT", r"\D"),
        ("CATEGORY_SPACE", r"\s"),
        ("CATEGORY_NOT_SPACE", r"\S"),
        ("CATEGORY_WORD", r"\w"),
        ("CATEGORY_NOT_WORD", r"\W"),
    )
}


def _lint(tree: Any) -> str | None:
    """Why the pattern is refused (see the module docstring), or None."""
    items = list(tree)
    flags = int(tree.state.flags)
    first = (_name(items[0][0]), _name(items[0][1])) if items else ("", "")
    anchored = first == ("AT", "AT_BEGINNING_STRING") or (
        first == ("AT", "AT_BEGINNING") and not flags & re.MULTILINE
    )
    state = {"unbounded": 0, "followed_unbounded": 0}
    try:
        product = _walk_cost(items, frozenset(), False, flags, state)
    except _Refused as exc:
        return str(exc)
    if state["followed_unbounded"] and not (anchored and state["unbounded"] == 1):
        return _UNBOUNDED + "; give it a bound, e.g. \\w{1,64}@ instead of \\w+@"
    limit = MAX_BACKTRACK_ANCHORED if anchored else MAX_BACKTRACK
    if product > limit:
        return (
            f"the repeats allow too much backtracking ({product} combinations > {limit}); "
            "tighten their bounds, or make a repeat possessive (\\s{1,9}+)"
        )
    return None


class _Refused(Exception):
    pass


def _variable(items: Any) -> bool:
    """Whether a sub-pattern can match strings of different lengths (outside atomic parts)."""
    for op, av in items:
        name = _name(op)
        if name in ("MAX_REPEAT", "MIN_REPEAT") and (av[0] != av[1] or _variable(av[2])):
            return True
        if name == "BRANCH":
            widths = {tuple(b.getwidth()) for b in av[1]}
            if len(widths) > 1 or any(_variable(b) for b in av[1]):
                return True
        if name == "SUBPATTERN" and _variable(av[3]):
            return True
        if name in ("ASSERT", "ASSERT_NOT") and _variable(av[1]):
            return True
        if name == "GROUPREF_EXISTS":
            return True
    return False


def _charset(name: str, av: Any, flags: int) -> _CharSet | None:
    """The characters a one-character item matches (on the probe alphabet), or None."""
    if name == "LITERAL":
        chars = {chr(av)}
    elif name == "NOT_LITERAL":
        return _PROBE - _folded({chr(av)}, flags)
    elif name == "ANY":
        return _PROBE if flags & re.DOTALL else _PROBE - {"\n"}
    elif name == "IN":
        chars = set()
        negate = False
        for op, value in av:
            kind = _name(op)
            if kind == "NEGATE":
                negate = True
            elif kind == "LITERAL":
                chars.add(chr(value))
            elif kind == "RANGE":
                chars.update(c for c in _PROBE if value[0] <= ord(c) <= value[1])
            elif kind == "CATEGORY":
                chars.update(_CATEGORIES.get(_name(value), _PROBE))
            else:
                return None
        if negate:
            return _PROBE - _folded(chars, flags)
    else:
        return None
    return _folded(chars, flags)


def _folded(chars: set[str] | _CharSet, flags: int) -> _CharSet:
    if not flags & re.IGNORECASE:
        return frozenset(chars)
    return frozenset({c.lower() for c in chars} | {c.upper() for c in chars} | set(chars))


def _first_of(name: str, av: Any, flags: int) -> tuple[_CharSet | None, bool]:
    """(first characters of what the item matches or None if unknown, whether it can be empty)."""
    single = _charset(name, av, flags)
    if single is not None:
        return single, False
    if name in ("AT", "ASSERT", "ASSERT_NOT"):
        return frozenset(), True
    if name == "SUBPATTERN":
        return _first_seq(av[3], frozenset(), flags), av[3].getwidth()[0] == 0
    if name == "ATOMIC_GROUP":
        return _first_seq(av, frozenset(), flags), av.getwidth()[0] == 0
    if name == "BRANCH":
        firsts = [_first_seq(b, frozenset(), flags) for b in av[1]]
        if any(f is None for f in firsts):
            return None, True
        return frozenset().union(*(f for f in firsts if f is not None)), any(
            b.getwidth()[0] == 0 for b in av[1]
        )
    if name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
        return _first_seq(av[2], frozenset(), flags), av[0] == 0 or av[2].getwidth()[0] == 0
    return None, True


def _first_seq(items: Any, tail: _CharSet | None, flags: int) -> _CharSet | None:
    """First characters of a sequence followed by ``tail`` (None: unknown, i.e. anything)."""
    acc: set[str] = set()
    for op, av in items:
        first, nullable = _first_of(_name(op), av, flags)
        if first is None:
            return None
        acc |= first
        if not nullable:
            return frozenset(acc)
    return None if tail is None else frozenset(acc | tail)


def _walk_cost(
    items: Any, tail: _CharSet | None, followed: bool, flags: int, state: dict[str, int]
) -> int:
    """Product of the ranges of the repeats that can backtrack; raises _Refused for nested ones.

    A repeat of one character class that cannot match the first character of what follows it
    (``\\s{1,3}here``) costs its range once, not as a factor: it does not multiply.
    """
    product = 1
    items = list(items)
    for i, (op, av) in enumerate(items):
        after = followed or i < len(items) - 1
        follow = _first_seq(items[i + 1 :], tail, flags)
        name = _name(op)
        if name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
            low, high, sub = av
            unbounded = high == _SRE.MAXREPEAT
            if low > MAX_REPEAT_BOUND or (not unbounded and high > MAX_REPEAT_BOUND):
                raise _Refused(f"a repeat bound above {MAX_REPEAT_BOUND}")
            possessive = name == "POSSESSIVE_REPEAT"
            if (unbounded or high > 1) and not possessive and _variable(sub):
                raise _Refused(
                    "a repeated group that itself varies in length (like (a+)+) can take "
                    "exponential time; make the inner part possessive (\\w{1,9}+) or atomic (?>...)"
                )
            sub_first = _first_seq(sub, frozenset(), flags)
            inner_tail = None if sub_first is None or follow is None else sub_first | follow
            inner = _walk_cost(sub, inner_tail, True if high > 1 else after, flags, state)
            if unbounded:
                state["unbounded"] += 1
                if after:
                    state["followed_unbounded"] += 1
                product *= inner
                continue
            single = _charset(_name(sub[0][0]), sub[0][1], flags) if len(sub) == 1 else None
            separated = single is not None and follow is not None and single.isdisjoint(follow)
            if not (possessive or separated):
                product *= high - low + 1
            product *= inner
        elif name == "BRANCH":
            product *= max(_walk_cost(b, follow, after, flags, state) for b in av[1])
        elif name == "SUBPATTERN":
            sub_flags = (flags | av[1]) & ~av[2]
            product *= _walk_cost(av[3], follow, after, sub_flags, state)
        elif name == "ATOMIC_GROUP":
            _walk_cost(av, follow, after, flags, state)
        elif name in ("ASSERT", "ASSERT_NOT"):
            product *= _walk_cost(av[1], None, False, flags, state)
        elif name == "GROUPREF_EXISTS":
            product *= max(
                _walk_cost(b, follow, after, flags, state) for b in (av[1], av[2]) if b is not None
            )
    return product


_MAX_SET = 64
_MAX_CLAUSES = 3

Clause = frozenset[str]  # one of these strings occurs in every match
Prefilter = tuple[tuple[tuple[str, ...], ...], ...]  # any alternative whose clauses all hold


_RARE_CHARS = frozenset("$!<>&@#%*=|~^{}[]\\/+?")


def _weight(text: str) -> int:
    """How selective a literal is: its length, plus two when it holds a character that is rare in
    text (``$``, ``!!!`` or ``<font`` are rarer than words of the same length)."""
    return len(text) + (2 if any(c in _RARE_CHARS for c in text) else 0)


def _clause_weight(clause: Clause) -> int:
    return min(_weight(s) for s in clause) if clause else 0


def _prefilter(tree: Any) -> Prefilter | None:
    """Literal requirements of a pattern: for each top-level alternative, up to three clauses that
    must all hold (each: one of its strings occurs). None when some alternative has no usable
    clause, i.e. when the regex must always run."""
    items = [item for item in tree if _name(item[0]) != "AT"]
    while len(items) == 1 and _name(items[0][0]) == "SUBPATTERN" and not items[0][1][1]:
        items = [item for item in items[0][1][3] if _name(item[0]) != "AT"]
    if len(items) == 1 and _name(items[0][0]) == "BRANCH":
        alternatives = [list(b) for b in items[0][1][1]]
    else:
        alternatives = [list(tree)]
    out = []
    for alternative in alternatives:
        exact, clauses = _info(alternative)
        if exact is not None:
            clauses = [exact]
        usable = sorted(
            (c for c in clauses if _clause_weight(c) >= MIN_LITERAL),
            key=lambda c: (-_clause_weight(c), len(c)),
        )[:_MAX_CLAUSES]
        if not usable:
            return None
        out.append(tuple(tuple(sorted(c)) for c in usable))
    return tuple(out)


def _best(clauses: list[Clause]) -> Clause | None:
    usable = [c for c in clauses if c and _clause_weight(c) > 0]
    if not usable:
        return None
    return max(usable, key=lambda c: (_clause_weight(c), -len(c)))


def _product(a: Clause, b: Clause) -> Clause | None:
    if len(a) * len(b) > _MAX_SET:
        return None
    return frozenset(x + y for x in a for y in b)


def _info(items: list[Any]) -> tuple[Clause | None, list[Clause]]:
    """(exact, clauses) for a sequence: the finite set of strings it matches, if small, and
    clauses that every match satisfies (each: one of its strings occurs in the match)."""
    current: Clause | None = frozenset({""})
    exact_all = True
    clauses: list[Clause] = []
    for op, av in items:
        exact, required = _node(_name(op), av)
        if exact is not None and current is not None:
            joined = _product(current, exact)
            if joined is not None:
                current = joined
                continue
        exact_all = False  # the run of exact pieces ends here
        if current is not None and _clause_weight(current) > 0:
            clauses.append(current)
        clauses.extend(required)
        current = exact if exact is not None else frozenset({""})
    if current is not None and _clause_weight(current) > 0:
        clauses.append(current)
    return (current if exact_all else None), clauses


def _node(name: str, av: Any) -> tuple[Clause | None, list[Clause]]:
    if name == "LITERAL":
        return frozenset({chr(av)}), []
    if name in ("AT", "ASSERT", "ASSERT_NOT"):
        return frozenset({""}), []
    if name == "IN":
        if len(av) <= 16 and all(_name(o) == "LITERAL" for o, _ in av):
            return frozenset(chr(v) for _, v in av), []
        return None, []
    if name == "SUBPATTERN":
        return _info(list(av[3]))
    if name == "ATOMIC_GROUP":
        return _info(list(av))
    if name == "BRANCH":
        infos = [_info(list(b)) for b in av[1]]
        exact: Clause | None = None
        if all(e is not None for e, _ in infos):
            union = frozenset().union(*(e for e, _ in infos if e is not None))
            exact = union if len(union) <= _MAX_SET else None
        # inside a sequence a branch is one clause: the union of each alternative's best one
        bests = [_best(([e] if e is not None else []) + c) for e, c in infos]
        if all(b is not None for b in bests):
            union = frozenset().union(*(b for b in bests if b is not None))
            if len(union) <= _MAX_SET:
                return exact, [union]
        return exact, []
    if name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
        low, high, sub = av
        inner_exact, inner_clauses = _info(list(sub))
        if low == 0:
            return None, []
        repeated: Clause | None = None
        if inner_exact is not None and low <= 8:
            repeated = frozenset({""})
            for _ in range(low):
                repeated = _product(repeated, inner_exact) if repeated is not None else None
        if low == high and repeated is not None:
            return repeated, []
        clauses = list(inner_clauses)
        if repeated is not None:
            clauses.append(repeated)
        elif inner_exact is not None:
            clauses.append(inner_exact)
        return None, clauses
    return None, []


# --- helpers ---------------------------------------------------------------------------------------


def _line_at(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _lines_of(pattern: re.Pattern[str], text: str) -> list[int]:
    return [_line_at(text, m.start()) for m in pattern.finditer(text)]


def _line_of_id(text: str, raw: Mapping[str, Any]) -> int | None:
    rule_id = raw.get("id")
    if not isinstance(rule_id, str):
        return None
    m = re.search(
        r"""^[ \t]*id[ \t]*=[ \t]*["']""" + re.escape(rule_id) + "[\"']", text, re.MULTILINE
    )
    return _line_at(text, m.start()) if m else None


def _line_of_table(text: str, table: str) -> int | None:
    m = re.search(r"^[ \t]*\[[ \t]*" + re.escape(table) + r"[ \t]*\]", text, re.MULTILINE)
    return _line_at(text, m.start()) if m else None


def _where(path: Path, line: int | None) -> str:
    return f"{path}:{line}" if line else str(path)


def _find_cycle(graph: Mapping[str, Sequence[str]]) -> list[str] | None:
    """A cycle among meta rules (as a path that returns to its start), or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            if nxt not in graph:
                continue
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt] if nxt in path else [node, nxt]
            if state.get(nxt) is None:
                found = visit(nxt, [*path, nxt])
                if found:
                    return found
        state[node] = 2
        return None

    for start in graph:
        if state.get(start) is None:
            found = visit(start, [start])
            if found:
                return found
    return None
