"""The rules engine: scan a message with a RuleSet, return scored symbols and the action.

What it does: :class:`RuleEngine` turns each enabled rule into a small test function once, at
construction. :meth:`RuleEngine.scan` parses the message once (``gateway.rules.mime``) into a
:class:`MessageView` whose derived views (decoded headers, body text, HTML text, URLs, attachments)
are computed lazily, the first time a rule needs them, and shared by every rule. Plain rules run
first, meta rules after them in dependency order. The enforced scores add up to the total and
:meth:`~gateway.rules.model.Actions.action_for` maps it to the action: the engine decides nothing
else and never touches the SMTP session. :func:`fingerprint` gives a content hash that ignores
tracking tokens (for identical-content fan-out limits); :func:`format_result` prints a result.

Bounds on regex input (Python's ``re`` has no timeout): a header value is cut at
``MAX_HEADER_VALUE`` (8 KiB), the body text, the HTML source and the raw message at ``MAX_SCAN``
(256 KiB) each. The loader refuses regexes that could backtrack badly within those bounds, and every
regex has a literal prefilter, so most rules cost a set lookup on a non-matching message: every body
and HTML rule's literals are found in one Aho-Corasick pass per text (:class:`LiteralIndex`,
``pyahocorasick``), not one substring search per literal and rule.

Reads: the message bytes, the envelope recipients and the login it is given.

Security notes: message content is never logged, and never put in a result: a symbol's detail names a
header, a count, or an entry of the rule's own list (see ``gateway.rules.model``). A message that
exceeds a MIME bound raises :class:`~gateway.rules.mime.MessageTooComplex` (the caller refuses it);
nothing else a message can contain makes the scan raise.
"""

from __future__ import annotations

import hashlib
import operator
import re
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from email.utils import getaddresses, parsedate_tz
from functools import cached_property

import ahocorasick

from gateway.rules.mime import (
    Decoded,
    MimeLimits,
    ParsedMessage,
    Part,
    decode_body,
    decode_header_value,
    decode_text,
    html_to_text,
    parse_message,
)
from gateway.rules.model import (
    AttachmentMatch,
    BytesPattern,
    EvalMatch,
    GtubeMatch,
    HeaderMatch,
    MetaMatch,
    Pattern,
    RawMatch,
    RecipientsMatch,
    Result,
    Rule,
    RuleSet,
    SymbolHit,
    TextMatch,
    UrlMatch,
)
from gateway.rules.urls import (
    Link,
    Url,
    host_in,
    html_links,
    parse_url,
    registrable_domain,
    text_host,
    text_urls,
)

MAX_HEADER_VALUE = 8 * 1024
MAX_SCAN = 256 * 1024
WINDOW_FROM = 8 * 1024  # texts longer than this are searched around the literals only
MAX_WINDOWS = 32  # beyond this many literal occurrences, one search of the whole text is cheaper
_RUN = re.compile(r"(.)\1*", re.DOTALL)  # a run of one character (group 1: the character)
_VALUE = operator.itemgetter(1)  # (end position, literal) -> literal
GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"

_IMG = re.compile(r"<img\b", re.IGNORECASE)
_ADDRESS_IN_TEXT = re.compile(r"[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9.-]{1,253}\.[A-Za-z]{2,24}")
_EXECUTABLE_MAGIC = (b"MZ", b"\x7fELF")
# RFC 5322 date-time (obsolete zone names allowed), four-digit year from 1970, offsets up to 14 hours.
_RFC5322_DATE = re.compile(
    r"^\s{0,5}(?:(?:mon|tue|wed|thu|fri|sat|sun)\s{0,3},\s{0,5})?"
    r"[0-9]{1,2}\s{1,5}(?:jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)\s{1,5}"
    r"(?:19[7-9][0-9]|2[0-9]{3})\s{1,5}[0-2][0-9]:[0-5][0-9](?::[0-6][0-9])?\s{1,5}"
    r"(?:[+-](?:0[0-9]|1[0-4])[0-5][0-9]|ut|gmt|[ecmp][sd]t|z)"
    r"(?:\s{0,5}\([^()]{0,64}\))?\s{0,5}$",
    re.IGNORECASE,
)
_WORD = re.compile(r"[\w.+-]{1,64}(?:@[\w.-]{1,253})?")

Test = Callable[["MessageView"], "str | None"]


class MessageView:
    """One parsed message and everything rules look at, each computed at most once, on demand."""

    def __init__(
        self,
        data: bytes,
        parsed: ParsedMessage,
        limits: MimeLimits,
        recipients: Sequence[str] = (),
        login: str | None = None,
        indexes: LiteralIndexes | None = None,
    ) -> None:
        self.data = data
        self.parsed = parsed
        self.limits = limits
        self.recipients = tuple(recipients)
        self.login = login
        self.indexes = indexes
        self._headers: dict[tuple[str, str], list[str]] = {}

    @classmethod
    def of(
        cls,
        data: bytes,
        limits: MimeLimits | None = None,
        recipients: Sequence[str] = (),
        login: str | None = None,
        indexes: LiteralIndexes | None = None,
    ) -> MessageView:
        limits = limits or MimeLimits()
        return cls(data, parse_message(data, limits), limits, recipients, login, indexes)

    # headers ---------------------------------------------------------------------------------------

    def header(self, name: str, part: str = "value") -> list[str]:
        """Values of a top-level header: decoded (``value``), as written (``raw``), or the addresses
        (``addr``) or display names (``name``) it lists. Each value is cut at MAX_HEADER_VALUE."""
        key = (name.lower(), part)
        cached = self._headers.get(key)
        if cached is not None:
            return cached
        raw = [v[:MAX_HEADER_VALUE] for v in self.parsed.headers.get_all(name)]
        if part == "raw":
            values = raw
        elif part in ("addr", "name"):
            # one parse gives both parts: the other one is cached with it
            pairs = getaddresses([decode_header_value(v) for v in raw])
            for other, index in (("name", 0), ("addr", 1)):
                listed = [p[index].strip() for p in pairs]
                self._headers[(key[0], other)] = [v for v in listed if v]
            return self._headers[key]
        else:
            values = [decode_header_value(v) for v in raw]
        self._headers[key] = values
        return values

    # text ------------------------------------------------------------------------------------------

    @cached_property
    def decoded(self) -> Decoded:
        return decode_text(self.parsed, self.limits)

    @cached_property
    def plain_text(self) -> str:
        return "\n".join(self.decoded.plain)[:MAX_SCAN]

    @cached_property
    def html_source(self) -> str:
        return "\n".join(self.decoded.html)[:MAX_SCAN]

    @cached_property
    def html_text(self) -> str:
        return html_to_text(self.html_source) if self.html_source else ""

    @cached_property
    def body_text(self) -> str:
        """Decoded text of the inline text parts, HTML rendered as text (bounded)."""
        if not self.html_text:
            return self.plain_text
        if not self.plain_text:
            return self.html_text
        return (self.plain_text + "\n" + self.html_text)[:MAX_SCAN]

    def _haystack(self, text: str, original: Haystack | None = None) -> Haystack:
        indexes = self.indexes
        index = None if indexes is None else indexes[0 if original is None else 1]
        return Haystack(text, original, index)

    @cached_property
    def body(self) -> Haystack:
        return self._haystack(self.body_text)

    @cached_property
    def body_lower(self) -> Haystack:
        return self._haystack(self.body_text.lower(), self.body)

    @cached_property
    def html(self) -> Haystack:
        return self._haystack(self.html_source)

    @cached_property
    def html_lower(self) -> Haystack:
        return self._haystack(self.html_source.lower(), self.html)

    @cached_property
    def raw(self) -> bytes:
        return self.data[:MAX_SCAN]

    @cached_property
    def raw_lower(self) -> bytes:
        return self.raw.lower()

    # URLs and attachments --------------------------------------------------------------------------

    @cached_property
    def _links(self) -> tuple[list[Url], list[Link]]:
        urls = text_urls(self.plain_text) if self.plain_text else []
        links: list[Link] = []
        if self.html_source:
            found, links = html_links(self.html_source)
            urls.extend(found)
            urls.extend(text_urls(self.html_text))
        return urls, links

    @cached_property
    def urls(self) -> list[Url]:
        return self._links[0]

    @cached_property
    def links(self) -> list[Link]:
        return self._links[1]

    @cached_property
    def distinct_urls(self) -> int:
        return len({u.raw.lower() for u in self.urls})

    @cached_property
    def attachments(self) -> list[Part]:
        """Parts that are not inline text: named or ``attachment`` parts, and non-text parts."""
        return [
            p
            for p in self.parsed.parts
            if p.is_attachment or p.content_type not in ("text/plain", "text/html")
        ]


# --- evals -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EvalSpec:
    numeric: bool
    doc: str
    fn: Callable[[MessageView], float | bool | None]


def _html_only(v: MessageView) -> bool:
    return bool(v.html_source.strip()) and not v.plain_text.strip()


def _base64_text(v: MessageView) -> bool:
    return any(p.is_text and p.transfer_encoding == "base64" for p in v.parsed.parts)


def _missing_boundary(v: MessageView) -> bool:
    return bool(v.parsed.defects & {"missing-boundary", "boundary-not-found"})


def _bad_base64(v: MessageView) -> bool:
    _ = v.decoded  # decoding records the defect
    return "bad-base64" in v.parsed.defects


def _invalid_date(v: MessageView) -> bool:
    return any(
        _RFC5322_DATE.match(d) is None or parsedate_tz(d.strip()) is None for d in v.header("Date")
    )


def _subject_greets_recipient(v: MessageView) -> bool:
    subjects = v.header("Subject")
    if not subjects or not v.recipients:
        return False
    subject = subjects[0].strip().lower()
    first = _WORD.match(subject)
    if first is None or subject[first.end() : first.end() + 1] not in (",", ":"):
        return False
    word = first[0]
    for rcpt in v.recipients:
        address = rcpt.strip("<>").lower()
        local = address.rpartition("@")[0]
        if word in (address, local) and len(local) >= 3:
            return True
    return False


def _from_name_has_address(v: MessageView) -> bool:
    addresses = {a.lower() for a in v.header("From", "addr")}
    for name in v.header("From", "name"):
        for found in _ADDRESS_IN_TEXT.findall(name):
            if found.lower() not in addresses:
                return True
    return False


def _from_multiple_addresses(v: MessageView) -> bool:
    return len(v.header("From", "addr")) > 1


_ASCII_UPPER = bytes(range(65, 91))
_ASCII_LETTERS = _ASCII_UPPER + bytes(range(97, 123))


def _caps_ratio(text: str, minimum: int) -> float | None:
    """Share of capitals among the ASCII letters (C-speed: bytes.translate counts them)."""
    raw = text.encode("ascii", "ignore")
    letters = len(raw) - len(raw.translate(None, _ASCII_LETTERS))
    if letters < minimum:
        return None
    return (len(raw) - len(raw.translate(None, _ASCII_UPPER))) / letters


def _body_caps_ratio(v: MessageView) -> float | None:
    return _caps_ratio(v.body_text[:65536], 200)


def _subject_caps_ratio(v: MessageView) -> float | None:
    subjects = v.header("Subject")
    return _caps_ratio(subjects[0], 10) if subjects else None


def _html_text_length(v: MessageView) -> float | None:
    return float(len(v.html_text)) if v.html_source.strip() else None


def _html_image_count(v: MessageView) -> float | None:
    return float(len(_IMG.findall(v.html_source))) if v.html_source.strip() else None


def _body_length(v: MessageView) -> float:
    return float(len(v.body_text.strip()))


def _executable_attachment(v: MessageView) -> bool:
    for part in v.attachments:
        head, _ = decode_body(part, 8)
        if head.startswith(_EXECUTABLE_MAGIC):
            return True
    return False


EVALS: Mapping[str, EvalSpec] = types.MappingProxyType(
    {
        "html_only": EvalSpec(False, "HTML text without a plain-text part", _html_only),
        "base64_text": EvalSpec(False, "an inline text part is base64-encoded", _base64_text),
        "mime_missing_boundary": EvalSpec(
            False, "a multipart without a usable boundary", _missing_boundary
        ),
        "mime_bad_base64": EvalSpec(False, "base64 content with invalid characters", _bad_base64),
        "invalid_date": EvalSpec(
            False,
            "a Date header that is not an RFC 5322 date-time (four-digit year, zone within 14h)",
            _invalid_date,
        ),
        "subject_greets_recipient": EvalSpec(
            False,
            "the Subject starts with a recipient's address or local part and a comma ('john,')",
            _subject_greets_recipient,
        ),
        "from_name_has_address": EvalSpec(
            False,
            "the From display name holds another address than the sender's",
            _from_name_has_address,
        ),
        "from_multiple_addresses": EvalSpec(
            False, "the From header lists more than one address", _from_multiple_addresses
        ),
        "executable_attachment": EvalSpec(
            False,
            "an attachment whose content is a Windows or ELF executable",
            _executable_attachment,
        ),
        "body_caps_ratio": EvalSpec(
            True,
            "share of capitals among the body's ASCII letters (200+ letters)",
            _body_caps_ratio,
        ),
        "subject_caps_ratio": EvalSpec(
            True, "share of capitals among the Subject's ASCII letters (10+)", _subject_caps_ratio
        ),
        "html_text_length": EvalSpec(
            True, "characters of visible text in the HTML parts (HTML only)", _html_text_length
        ),
        "html_image_count": EvalSpec(
            True, "number of <img> tags in the HTML parts (HTML only)", _html_image_count
        ),
        "body_length": EvalSpec(True, "characters of body text", _body_length),
    }
)


# --- compiling rules into tests --------------------------------------------------------------------


class LiteralIndex:
    """Every prefilter literal of a rule set in one Aho-Corasick automaton: one pass over a text
    says which of them occur in it (instead of one substring search per literal and rule).

    A pass costs one step per character plus one per occurrence found. A literal made of one
    repeated character (``xxx``, ``!!!``, ``$``) occurs at nearly every position of a long run of
    that character in the text (smtp-source's filler lines of capital x: 76 occurrences of ``xxx``
    in 78 characters), so such runs are cut first: every run of one of those characters longer than
    ``run_caps[c]`` (one more than the longest run of ``c`` inside any literal) is cut to that
    length. The cut text holds exactly the same literals (each run of ``c`` in a literal is shorter
    than the cap: where it lies at the edge of a run of the text, the cut run is still long enough;
    where it must equal a whole run of the text, that run is shorter than the cap and was not cut),
    and the pass costs at most a few steps per run instead of one per character of it. Texts without
    such runs (the usual case) cost one substring test per character concerned.

    Built once per RuleEngine; immutable after construction, safe to share between threads."""

    __slots__ = ("_automaton", "_cuts", "literals", "run_caps")

    def __init__(self, literals: Iterable[str]) -> None:
        self.literals = frozenset(lit for lit in literals if lit)
        automaton = ahocorasick.Automaton()
        for lit in self.literals:
            automaton.add_word(lit, lit)
        automaton.make_automaton()
        self._automaton = automaton
        longest: dict[str, int] = {}  # character -> its longest run inside any literal
        for lit in self.literals:
            for run in _RUN.finditer(lit):
                char, size = run.group(1), len(run.group())
                longest[char] = max(longest.get(char, 0), size)
        # the characters that whole literals are made of, and the length their runs are cut to
        self.run_caps = {
            lit[0]: longest[lit[0]] + 1 for lit in self.literals if lit == lit[0] * len(lit)
        }
        # per character: (the shortest run that is cut, the regex finding such runs, what they become)
        self._cuts = tuple(
            (
                c * (cap + 1),
                re.compile(f"{re.escape(c)}{{{cap + 1},}}"),
                (c * cap).replace("\\", r"\\"),
            )
            for c, cap in sorted(self.run_caps.items())
        )

    def present(self, text: str) -> frozenset[str]:
        """The indexed literals that occur in ``text``."""
        if not self.literals:
            return frozenset()
        for run, runs, cut in self._cuts:
            if run in text:
                text = runs.sub(cut, text)
        return frozenset(map(_VALUE, self._automaton.iter(text)))


#: (index of the as-is texts' literals, index of the lower-cased texts' literals)
LiteralIndexes = tuple[LiteralIndex, LiteralIndex]


class Haystack:
    """A text that rules search, with a cache of which literals occur in it.

    In a long text, a literal without white space occurs iff it occurs in one of the text's
    white-space separated tokens, so it is looked up in the (much shorter) list of distinct tokens,
    built once (for the lower-cased twin: the original's, lower-cased); the answers are cached.
    """

    __slots__ = ("_index", "_original", "_present", "_seen", "_tokens", "text")

    def __init__(
        self, text: str, original: Haystack | None = None, index: LiteralIndex | None = None
    ) -> None:
        self.text = text
        self._original = original
        self._index = index
        self._present: frozenset[str] | None = None
        self._tokens: str | None = None
        self._seen: dict[str, bool] = {}

    def tokens(self) -> str:
        if self._tokens is None:
            if self._original is not None:
                self._tokens = self._original.tokens().lower()
            else:
                self._tokens = "\n".join(set(self.text.split()))
        return self._tokens

    def present(self) -> frozenset[str] | None:
        """The indexed literals that occur in the text, or None without an index. The engine
        indexes every literal of its own rules, so a rule tests its literals against this set."""
        index = self._index
        if index is None:
            return None
        if self._present is None:
            self._present = index.present(self.text)
        return self._present

    def has(self, literal: str) -> bool:
        index = self._index
        if index is not None and literal in index.literals:
            present = self.present()
            assert present is not None
            return literal in present
        text = self.text
        if len(text) <= WINDOW_FROM:
            return literal in text
        found = self._seen.get(literal)
        if found is None:
            if len(literal.split()) != 1 or literal.strip() != literal:
                found = literal in text
            else:
                found = literal in self.tokens()
            self._seen[literal] = found
        return found


def _first_literals(pattern: Pattern) -> tuple[str, ...]:
    """The strings of every alternative's first clause: when none occurs, nothing can match."""
    if pattern.prefilter is None:
        return ()
    return tuple(sorted({lit for alternative in pattern.prefilter for lit in alternative[0]}))


@dataclass(frozen=True, slots=True)
class _Literals:
    """A pattern's prefilter as sets: the first clauses' literals, and each alternative's clauses."""

    first: tuple[str, ...]
    first_set: frozenset[str]
    clauses: tuple[tuple[frozenset[str], ...], ...]

    @classmethod
    def of(cls, pattern: Pattern) -> _Literals:
        first = _first_literals(pattern)
        clauses = tuple(
            tuple(frozenset(clause) for clause in alternative)
            for alternative in pattern.prefilter or ()
        )
        return cls(first, frozenset(first), clauses)


def _search(pattern: Pattern, lits: _Literals, text: Haystack, lowered: Haystack) -> bool:
    """Whether the pattern matches ``text`` (``lowered`` is the same lower-cased), cheaply: the
    regex is skipped when its prefilter fails (``lits``: see _first_literals), and in a long text
    it only runs around the literals that occur."""
    if pattern.lowered is not None:
        regex, hay = pattern.lowered, lowered
    else:
        regex, hay = pattern.regex, text
    prefilter = pattern.prefilter
    if prefilter is None:
        return regex.search(hay.text) is not None
    lit_hay = lowered if pattern.literals_lower else text
    present = lit_hay.present()
    if present is not None and len(lit_hay.text) <= WINDOW_FROM:
        # set operations only: the index already found every literal of the engine's rules
        if lits.first_set.isdisjoint(present):
            return False
        for clause_sets in lits.clauses:
            if not any(clause.isdisjoint(present) for clause in clause_sets):
                return regex.search(hay.text) is not None
        return False
    first = lits.first
    has = lit_hay.has
    if not any(map(has, first)):
        return False
    if len(lit_hay.text) <= WINDOW_FROM:
        for alternative in prefilter:
            if all(any(map(has, clause)) for clause in alternative):
                return regex.search(hay.text) is not None
        return False
    anchors: list[str] = []
    for alternative in prefilter:
        if all(any(map(has, clause)) for clause in alternative):
            anchors.extend(filter(has, alternative[0]))
    if not anchors:
        return False
    if pattern.width is None or lit_hay is not hay:
        return regex.search(hay.text) is not None
    return _search_windows(regex, hay.text, anchors, pattern.width)


def _search_windows(regex: re.Pattern[str], hay: str, literals: Sequence[str], width: int) -> bool:
    """Search only the windows around each occurrence of a literal (a match, which is at most
    ``width`` long and contains one of them, lies inside one); the whole text if they are many."""
    starts: list[tuple[int, int]] = []
    for lit in literals:
        at = hay.find(lit)
        while at >= 0:
            starts.append((at, len(lit)))
            if len(starts) > MAX_WINDOWS:
                return regex.search(hay) is not None
            at = hay.find(lit, at + 1)
    if not starts:
        return False
    starts.sort()
    end_of_text = len(hay)
    window_start, window_end = -1, -1
    for at, size in starts:
        lo, hi = max(0, at - width), min(end_of_text, at + size + width + 1)
        if lo <= window_end:
            window_end = max(window_end, hi)
            continue
        if window_end > window_start and regex.search(hay, window_start, window_end):
            return True
        window_start, window_end = lo, hi
    return regex.search(hay, window_start, window_end) is not None


def _search_bytes(pattern: BytesPattern, data: bytes, lowered: bytes) -> bool:
    if pattern.prefilter is not None and not any(
        all(any(lit in lowered for lit in clause) for clause in alternative)
        for alternative in pattern.prefilter
    ):
        return False
    return pattern.regex.search(data) is not None


def _header_test(m: HeaderMatch) -> Test:
    label = m.name if m.part == "value" else f"{m.name}:{m.part}"
    if m.exists is not None:
        wanted = m.exists

        def exists(v: MessageView) -> str | None:
            present = bool(v.header(m.name, m.part))
            return (
                (f"{label} present" if present else f"{label} absent")
                if present == wanted
                else None
            )

        return exists
    pattern = m.pattern
    assert pattern is not None

    def matches(v: MessageView) -> str | None:
        for value in v.header(m.name, m.part):
            if pattern.regex.search(value) is not None:
                return label
        return None

    return matches


def _text_test(m: TextMatch) -> Test:
    pattern = m.pattern
    lits = _Literals.of(pattern)
    if m.target == "body":
        return lambda v: "body" if _search(pattern, lits, v.body, v.body_lower) else None
    return lambda v: "html" if _search(pattern, lits, v.html, v.html_lower) else None


def _url_test(m: UrlMatch) -> Test:
    if m.kind == "domains":
        domains = m.domains

        def listed(v: MessageView) -> str | None:
            for url in v.urls:
                found = host_in(url.host, domains)
                if found:
                    return f"domain {found}"
            return None

        return listed
    if m.kind == "count":
        count = m.count
        return lambda v: f"{v.distinct_urls} URLs" if v.distinct_urls >= count else None
    if m.kind == "ip":
        return lambda v: "IP address URL" if any(u.is_ip for u in v.urls) else None
    if m.kind == "userinfo":
        return lambda v: "URL with user@ prefix" if any(u.has_userinfo for u in v.urls) else None
    if m.kind == "mismatch":
        return _mismatch
    pattern = m.pattern
    assert pattern is not None
    return lambda v: "URL" if any(pattern.regex.search(u.raw) for u in v.urls) else None


def _mismatch(v: MessageView) -> str | None:
    for link in v.links:
        shown = text_host(link.text)
        if shown and registrable_domain(shown) != registrable_domain(link.url.host):
            return "link text names another domain than its target"
    return None


def _attachment_test(m: AttachmentMatch) -> Test:
    pattern = m.pattern
    if pattern is not None:

        def named(v: MessageView) -> str | None:
            for part in v.attachments:
                if part.filename and pattern.regex.search(part.filename):
                    return "attachment name"
            return None

        return named
    types_, extensions = m.types, m.extensions

    def typed(v: MessageView) -> str | None:
        for part in v.attachments:
            if part.content_type in types_:
                return f"type {part.content_type}"
            name = part.filename.rstrip(" .").lower()
            dot = name.rfind(".")
            if dot >= 0 and name[dot:] in extensions:
                return f"extension {name[dot:]}"
        return None

    return typed


def _eval_test(m: EvalMatch) -> Test:
    spec = EVALS[m.name]
    if not spec.numeric:
        return lambda v: m.name if spec.fn(v) else None
    low, high = m.minimum, m.maximum

    def numeric(v: MessageView) -> str | None:
        value = spec.fn(v)
        if value is None or isinstance(value, bool):
            return None
        if (low is not None and value < low) or (high is not None and value > high):
            return None
        return f"{m.name} = {value:.3g}"

    return numeric


def _test(rule: Rule) -> Test:
    m = rule.matcher
    if isinstance(m, HeaderMatch):
        return _header_test(m)
    if isinstance(m, TextMatch):
        return _text_test(m)
    if isinstance(m, RawMatch):
        pattern = m.pattern
        return lambda v: "raw" if _search_bytes(pattern, v.raw, v.raw_lower) else None
    if isinstance(m, UrlMatch):
        return _url_test(m)
    if isinstance(m, AttachmentMatch):
        return _attachment_test(m)
    if isinstance(m, RecipientsMatch):
        minimum = m.minimum
        n = len
        return lambda v: f"{n(v.recipients)} recipients" if n(v.recipients) >= minimum else None
    if isinstance(m, GtubeMatch):
        return lambda v: "GTUBE test string" if GTUBE in v.body_text else None
    if isinstance(m, EvalMatch):
        return _eval_test(m)
    raise TypeError(f"not a plain matcher: {m!r}")  # pragma: no cover


def _meta_order(metas: Sequence[Rule]) -> list[Rule]:
    """Meta rules so that each comes after the metas it references (the loader refused cycles)."""
    by_id = {r.id: r for r in metas}
    done: set[str] = set()
    order: list[Rule] = []

    def visit(rule: Rule) -> None:
        if rule.id in done:
            return
        done.add(rule.id)
        assert isinstance(rule.matcher, MetaMatch)
        for ref in rule.matcher.references:
            if ref in by_id:
                visit(by_id[ref])
        order.append(rule)

    for rule in metas:
        visit(rule)
    return order


def _literal_indexes(matchers: Iterable[object]) -> LiteralIndexes:
    """The prefilter literals of the body/html rules: (as-is text's, lower-cased text's)."""
    as_is: set[str] = set()
    lower: set[str] = set()
    for m in matchers:
        if isinstance(m, TextMatch) and m.pattern.prefilter is not None:
            into = lower if m.pattern.literals_lower else as_is
            into.update(
                lit for alternative in m.pattern.prefilter for c in alternative for lit in c
            )
    return LiteralIndex(as_is), LiteralIndex(lower)


#: per text (target, lower-cased?): literal -> positions of the rules that have it as a first literal
Gate = tuple[str, bool, dict[str, tuple[int, ...]]]


def _gates(plain: Sequence[tuple[Rule, Test]]) -> tuple[tuple[int, ...], tuple[Gate, ...]]:
    """Which plain rules always run (positions), and an inverted index of the others: the body and
    HTML rules with a literal prefilter, which can only match when one of the first literals of
    their prefilter (see :func:`_first_literals`) occurs in their text. One pass of the literal
    index over each text then names the few rules worth running, instead of every rule testing
    its own literals against it."""
    ungated: list[int] = []
    index: dict[tuple[str, bool], dict[str, list[int]]] = {}
    for i, (rule, _) in enumerate(plain):
        m = rule.matcher
        if not isinstance(m, TextMatch) or m.pattern.prefilter is None:
            ungated.append(i)
            continue
        by_literal = index.setdefault((m.target, m.pattern.literals_lower), {})
        for lit in _first_literals(m.pattern):
            by_literal.setdefault(lit, []).append(i)
    gates = tuple(
        (target, lower, {lit: tuple(at) for lit, at in by_literal.items()})
        for (target, lower), by_literal in sorted(index.items())
    )
    return tuple(ungated), gates


class RuleEngine:
    """Scans messages with one RuleSet. Immutable after construction; safe to share."""

    def __init__(self, ruleset: RuleSet) -> None:
        self.ruleset = ruleset
        enabled = ruleset.enabled
        self._plain = tuple((r, _test(r)) for r in enabled if not isinstance(r.matcher, MetaMatch))
        self._meta = tuple(_meta_order([r for r in enabled if isinstance(r.matcher, MetaMatch)]))
        self._indexes = _literal_indexes(r.matcher for r in enabled)
        self._ungated, self._gates = _gates(self._plain)

    def view(
        self, message: bytes, *, recipients: Sequence[str] = (), login: str | None = None
    ) -> MessageView:
        return MessageView.of(message, self.ruleset.limits, recipients, login, self._indexes)

    def scan(
        self,
        message: bytes,
        *,
        recipients: Sequence[str],
        login: str | None,
        with_fingerprint: bool = False,
    ) -> Result:
        """Score the message. Raises MessageTooComplex beyond a MIME bound, nothing else."""
        view = self.view(message, recipients=recipients, login=login)
        hits: dict[str, SymbolHit] = {}
        plain = self._plain
        for i in self._to_run(view):
            rule, test = plain[i]
            detail = test(view)
            if detail is not None:
                hits[rule.id] = SymbolHit(rule.id, rule.score, rule.mode, detail)
        for rule in self._meta:
            m = rule.matcher
            assert isinstance(m, MetaMatch)
            if not all(r in hits for r in m.all_of):
                continue
            if m.any_of and sum(1 for r in m.any_of if r in hits) < m.any_min:
                continue
            if any(r in hits for r in m.none_of):
                continue
            shown = [r for r in m.all_of + m.any_of if r in hits]
            detail = " + ".join(shown) if shown else "none of " + ", ".join(m.none_of)
            hits[rule.id] = SymbolHit(rule.id, rule.score, rule.mode, detail)
        score = round(sum(h.score for h in hits.values() if h.counted), 3)
        symbols = tuple(sorted(hits.values(), key=lambda h: (-h.score, h.id)))
        fp = fingerprint_view(view) if with_fingerprint else None
        return Result(score, symbols, self.ruleset.actions.action_for(score), fp)

    def _to_run(self, view: MessageView) -> list[int]:
        """The positions in ``_plain`` of the rules that may match: every rule but the body/html
        rules none of whose first literals occur in their text (their ``_search`` would answer
        no at once); in rule order."""
        run = list(self._ungated)
        for target, lower, by_literal in self._gates:
            if target == "body":
                hay = view.body_lower if lower else view.body
            else:
                hay = view.html_lower if lower else view.html
            present = hay.present()
            assert present is not None  # the engine's views always carry its indexes
            for lit in present:
                run.extend(by_literal.get(lit, ()))
        return sorted(set(run))


# --- fingerprint -----------------------------------------------------------------------------------

_FP_URL = re.compile(r"(?:\b(?:https?|ftp)://|\bwww\d{0,3}\.)[^\s<>\"']{1,2048}", re.IGNORECASE)
# A token starts where a letter run starts, never inside one (the lookbehinds; the possessive run
# cannot backtrack), so a word costs one try instead of one per letter. The text replaced is the
# same as when every position is tried (checked on the corpus); a letter run longer than 64 before
# a digit is caught whole by the second branch.
_FP_TOKEN = re.compile(r"(?<![^\W\d_])[^\W\d_]{0,64}+\d[\w-]{0,256}|(?<!\w)\w{24,256}")
_FP_SPACE = re.compile(r"\s+")


def _fp_url(m: re.Match[str]) -> str:
    return " <" + parse_url(m[0].rstrip(".,;:!?)]}>'\"*")).host + "> "


def fingerprint_view(view: MessageView) -> str:
    """SHA-256 (hex) of the normalised content: the plain text (or the HTML's text when there is
    none) case-folded, each URL replaced by its host (query strings and paths hold tracking tokens),
    every token containing a digit and every very long token replaced by ``#``, white space
    collapsed; plus, for each attachment, its type and a hash of its encoded content."""
    text = view.plain_text if view.plain_text.strip() else view.html_text
    text = _FP_URL.sub(_fp_url, text.casefold())
    text = _FP_TOKEN.sub("#", text)
    text = _FP_SPACE.sub(" ", text).strip()
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass"))
    for part in view.attachments:
        digest.update(b"\x00" + part.content_type.encode("ascii", "replace") + b"\x00")
        digest.update(hashlib.sha256(part.body.translate(None, b" \t\r\n")).digest())
    return digest.hexdigest()


def fingerprint(message: bytes, limits: MimeLimits | None = None) -> str:
    """The content fingerprint of a message (see :func:`fingerprint_view`)."""
    return fingerprint_view(MessageView.of(message, limits))


# --- presentation ----------------------------------------------------------------------------------


def format_result(result: Result, ruleset: RuleSet | None = None) -> str:
    """Every symbol with its score and mode, the total and the action, for people."""
    lines = [f"action: {result.action.value}   score: {result.score:g}"]
    if ruleset is not None:
        a = ruleset.actions
        shown = ", ".join(
            f"{name} >= {getattr(a, name):g}"
            for name in ("add_header", "hold", "tempfail", "reject")
            if getattr(a, name) is not None
        )
        lines.append(f"thresholds: {shown or 'none'}")
    if not result.symbols:
        lines.append("no symbols")
    for hit in result.symbols:
        note = "" if hit.counted else "  (warn: would have counted)"
        rule = ruleset.get(hit.id) if ruleset is not None else None
        about = f" - {rule.description}" if rule is not None else ""
        lines.append(f"  {hit.score:>+8.2f}  {hit.id:<28} [{hit.detail}]{about}{note}")
    if result.warn_score:
        lines.append(f"warn-mode symbols would add {result.warn_score:g}")
    if result.fingerprint:
        lines.append(f"fingerprint: {result.fingerprint}")
    return "\n".join(lines)
