"""A bounded MIME walker: headers, parts, decoded text, for the spam rules.

What it does: :func:`parse_message` splits a raw RFC 5322/MIME message into its top-level headers and
its leaf parts (walking ``multipart/*`` and ``message/rfc822`` entities) without the stdlib ``email``
package: every step is a byte search, so a hostile structure costs time linear in the message size.
:func:`decode_text` turns the inline text parts into ``str`` (transfer encoding, then charset) within a
byte budget, :func:`html_to_text` renders HTML as plain text with regexes that cannot backtrack, and
:func:`decode_header_value` decodes RFC 2047 encoded words. Nothing is re-serialised: the walker only
reads.

Bounds (:class:`MimeLimits`, configurable in the ``[limits]`` table of the rule files):

* ``max_depth``: nesting of multipart / message entities; deeper raises :class:`MessageTooComplex`.
* ``max_parts``: MIME entities in the whole message; more raises :class:`MessageTooComplex`.
* ``max_header_bytes``: a header section (of the message or of any part); larger raises.
* ``max_decoded_bytes``: decoded bytes of text produced for scanning. Text beyond it is not decoded
  (``Decoded.truncated`` is set). This one truncates instead of refusing: a long, legitimate body
  is not a reason to refuse mail, and the regexes only ever look at a bounded prefix anyway.

Malformed input never raises anything but :class:`MessageTooComplex`: a missing or unfound boundary,
bad base64, an unknown transfer encoding or charset become *defects* (strings in
``ParsedMessage.defects`` that rules can test) and the walker carries on as a mail client would.

Reads: only the bytes it is given.

Security notes: message content is never logged; the defect strings name the problem, never the
content. Only real character sets are used to decode (codec names such as ``punycode`` or
``unicode_escape`` are refused: they are slow or not text encodings), with ``errors="replace"``.
"""

from __future__ import annotations

import binascii
import codecs
import html
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from gateway.core.errors import ConfigError

# A leading mbox "From " line is not part of the message; the walker tolerates LF-only input too.
_HEADER_NAME = re.compile(rb"[!-9;-~]+")
_ENCODED_WORD = re.compile(r"=\?([^?\s]{1,64})\?([bBqQ])\?([^?\s]*)\?=")
_ENCODED_GAP = re.compile(r"(\?=)[ \t\r\n]+(=\?)")
_PARAM = re.compile(
    r"""\s*([^\s=;"]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"?|([^;]*))""",
    re.DOTALL,
)
_BASE64_JUNK = re.compile(rb"[^A-Za-z0-9+/]")
_BASE64_BAD = re.compile(rb"[^A-Za-z0-9+/=]")
_NOT_CHARSETS = frozenset(
    {"idna", "punycode", "raw_unicode_escape", "unicode_escape", "undefined", "mbcs", "oem"}
)

# HTML → text. Every pattern either starts with a literal and stops at the next "<" or ">", or is
# handled by a find() loop, so no input makes them quadratic.
_BLOCK_TAG = re.compile(
    r"<(?:/?(?:p|div|br|tr|td|th|li|ul|ol|h[1-6]|table|blockquote|hr|title|center|pre|dd|dt)\b)"
    r"[^<>]*>",
    re.IGNORECASE,
)
_ANY_TAG = re.compile(r"<[/!?a-zA-Z][^<>]*>")
_SPACES = re.compile(r"[ \t\r\f\v\xa0]+")
_NEWLINES = re.compile(r"\s*\n\s*")


class MessageTooComplex(ValueError):
    """The message exceeds a structural bound (nesting, parts, header size). ``reason`` names it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class MimeLimits:
    """Bounds on the MIME walk (see the module docstring)."""

    max_depth: int = 20
    max_parts: int = 500
    max_header_bytes: int = 256 * 1024
    max_decoded_bytes: int = 1024 * 1024

    def validate(self) -> None:
        for name in ("max_depth", "max_parts", "max_header_bytes", "max_decoded_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError("", name, "must be at least 1")


@dataclass(slots=True)
class Headers:
    """A header section: fields in order, unfolded, as ``str`` (RFC 2047 words not yet decoded)."""

    fields: list[tuple[str, str]]
    index: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, value in self.fields:
            self.index.setdefault(name.lower(), []).append(value)

    def get_all(self, name: str) -> list[str]:
        return self.index.get(name.lower(), [])

    def first(self, name: str) -> str | None:
        values = self.index.get(name.lower())
        return values[0] if values else None


@dataclass(slots=True)
class Part:
    """A leaf MIME entity. ``body`` is the still-encoded content (a slice of the message)."""

    headers: Headers
    content_type: str  # lower case "type/subtype"
    params: dict[str, str]
    transfer_encoding: str  # lower case, "7bit" when absent
    disposition: str  # "inline", "attachment" or "" (lower case)
    filename: str  # decoded, "" when none
    body: bytes
    depth: int

    @property
    def charset(self) -> str:
        return self.params.get("charset", "").strip().lower()

    @property
    def is_attachment(self) -> bool:
        return self.disposition == "attachment" or bool(self.filename)

    @property
    def is_text(self) -> bool:
        return self.content_type in ("text/plain", "text/html") and not self.is_attachment


@dataclass(slots=True)
class ParsedMessage:
    """The top-level headers, the leaf parts in order, and the defects found on the way."""

    headers: Headers
    content_type: str
    parts: list[Part]
    defects: set[str]
    entities: int  # every entity walked, containers included


@dataclass(frozen=True, slots=True)
class Decoded:
    """Inline text of the message, decoded: plain text and HTML source, each part separately."""

    plain: tuple[str, ...]
    html: tuple[str, ...]
    truncated: bool


# --- headers ---------------------------------------------------------------------------------------


def _to_str(raw: bytes) -> str:
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        pass
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _parse_headers(data: bytes, start: int, end: int, limits: MimeLimits) -> tuple[Headers, int]:
    """The header section at ``start`` (bounded) and the index where the body starts.

    The section ends at a blank line, or at the first line that is neither a field nor a
    continuation (a malformed message whose body starts without the blank line). A section that
    starts with a continuation line has no header fields: the body starts at once.
    """
    scan_end = min(end, start + limits.max_header_bytes)
    fields: list[tuple[str, str]] = []
    pos = start
    while pos < end:
        nl = data.find(b"\n", pos, scan_end)
        if nl < 0:
            if scan_end < end:
                raise MessageTooComplex(
                    f"header section larger than {limits.max_header_bytes} bytes"
                )
            nl = end - 1
        line_end = nl + 1
        line = data[pos:line_end].rstrip(b"\r\n")
        if not line:
            return Headers(fields), line_end
        if line[0] in (0x20, 0x09):
            if not fields:
                break
            name, value = fields[-1]
            fields[-1] = (name, value + _to_str(line))
        else:
            colon = line.find(b":")
            name_raw = line[:colon].rstrip() if colon > 0 else b""
            if not name_raw or not _HEADER_NAME.fullmatch(name_raw):
                break
            fields.append((_to_str(name_raw), _to_str(line[colon + 1 :].lstrip())))
        pos = line_end
    return Headers(fields), pos


def _decode_word(charset: str, encoding: str, text: str) -> str:
    charset = charset.partition("*")[0]  # RFC 2231 language suffix
    try:
        if encoding in "bB":
            raw = binascii.a2b_base64(text.encode("ascii", "replace") + b"==")
        else:
            raw = binascii.a2b_qp(text.encode("ascii", "replace"), header=True)
    except (binascii.Error, ValueError):
        return text
    return decode_bytes(raw, charset)


def decode_header_value(value: str) -> str:
    """RFC 2047 encoded words decoded (adjacent words joined); other text unchanged."""
    if "=?" not in value:
        return value
    value = _ENCODED_GAP.sub(r"\1\2", value)
    return _ENCODED_WORD.sub(lambda m: _decode_word(m[1], m[2], m[3]), value)


def parse_params(value: str) -> tuple[str, dict[str, str]]:
    """``type/subtype; a=b; c="d"`` → (``"type/subtype"`` lower case, params with lower-case names).

    RFC 2231 forms (``name*=charset''%xx``, ``name*0=...``) are joined and decoded.
    """
    main, _, rest = value.partition(";")
    params: dict[str, str] = {}
    pieces: dict[str, dict[int, tuple[str, bool]]] = {}
    for m in _PARAM.finditer(rest):
        name = m[1].lower()
        raw = m[2] if m[2] is not None else (m[3] or "").strip()
        if m[2] is not None:
            raw = raw.replace('\\"', '"').replace("\\\\", "\\")
        base, star, section = name.partition("*")
        if not star:
            params.setdefault(name, raw)
            continue
        encoded = section.endswith("*") or section == ""
        number = section.rstrip("*")
        index = int(number) if number.isdigit() and len(number) < 4 else 0
        pieces.setdefault(base, {})[index] = (raw, encoded)
    for base, sections in pieces.items():
        charset = ""
        joined = []
        for i in sorted(sections):
            raw, encoded = sections[i]
            if encoded and i == 0 and raw.count("'") >= 2:
                charset, _language, raw = raw.split("'", 2)
            if encoded:
                joined.append(_unquote_percent(raw, charset))
            else:
                joined.append(raw)
        params[base] = "".join(joined)
    return main.strip().lower(), params


def _unquote_percent(text: str, charset: str) -> str:
    raw = bytearray()
    i = 0
    data = text.encode("utf-8", "replace")
    while i < len(data):
        c = data[i]
        if c == 0x25 and _is_hex(data[i + 1 : i + 3]):
            raw.append(int(data[i + 1 : i + 3], 16))
            i += 3
        else:
            raw.append(c)
            i += 1
    return decode_bytes(bytes(raw), charset or "utf-8")


def _is_hex(pair: bytes) -> bool:
    return len(pair) == 2 and all(chr(b) in "0123456789abcdefABCDEF" for b in pair)


def decode_bytes(raw: bytes, charset: str) -> str:
    """Bytes in a declared charset → str; unknown or unsafe charsets fall back to UTF-8/Latin-1."""
    name = charset.strip().strip('"').lower()
    if name and name not in ("us-ascii", "ascii", "utf-8", "utf8"):
        try:
            info = codecs.lookup(name)
        except (LookupError, ValueError):
            info = None
        if info is not None and info.name not in _NOT_CHARSETS:
            try:
                return raw.decode(info.name, "replace")
            except (LookupError, ValueError, TypeError):
                pass
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


# --- structure -------------------------------------------------------------------------------------


def _delimiters(
    data: bytes, start: int, end: int, boundary: bytes
) -> Iterator[tuple[int, int, bool]]:
    """Boundary lines in ``data[start:end]``: (line start, index after the line, is closing)."""
    marker = b"--" + boundary
    pos = start
    while True:
        if pos == start and data.startswith(marker, start):
            at = start
        else:
            found = data.find(b"\n" + marker, pos, end)
            if found < 0:
                return
            at = found + 1
        after = at + len(marker)
        nl = data.find(b"\n", after, end)
        line_end = end if nl < 0 else nl + 1
        tail = data[after:line_end]
        closing = tail.startswith(b"--")
        rest = tail[2:] if closing else tail
        if not rest.strip(b" \t\r\n"):
            yield at, line_end, closing
            if closing:
                return
        pos = max(line_end - 1, at + 1)


def _strip_eol(data: bytes, start: int, end: int) -> int:
    """``end`` moved before the line break that precedes a boundary line (it belongs to it)."""
    if end > start and data[end - 1 : end] == b"\n":
        end -= 1
        if end > start and data[end - 1 : end] == b"\r":
            end -= 1
    return end


def parse_message(data: bytes, limits: MimeLimits | None = None) -> ParsedMessage:
    """Walk the message; raises :class:`MessageTooComplex` beyond a bound, never anything else."""
    limits = limits or MimeLimits()
    start = 0
    if data.startswith(b"From "):  # an mbox envelope line, as in archives and test corpora
        nl = data.find(b"\n")
        start = len(data) if nl < 0 else nl + 1
    defects: set[str] = set()
    parts: list[Part] = []
    top_headers, body = _parse_headers(data, start, len(data), limits)
    top_type = ""
    entities = 0
    # (headers, body start, body end, depth, default content type)
    stack: list[tuple[Headers, int, int, int, str]] = [
        (top_headers, body, len(data), 0, "text/plain")
    ]
    while stack:
        headers, b_start, b_end, depth, default_type = stack.pop()
        entities += 1
        if entities > limits.max_parts:
            raise MessageTooComplex(f"more than {limits.max_parts} MIME parts")
        ctype_raw = headers.first("Content-Type")
        if ctype_raw is not None:
            ctype, params = parse_params(decode_header_value(ctype_raw))
            if "/" not in ctype:
                defects.add("bad-content-type")
                ctype = "text/plain"
        else:
            ctype, params = default_type, {}
        if entities == 1:
            top_type = ctype
        if ctype.startswith("multipart/"):
            boundary = params.get("boundary", "")
            if not boundary:
                defects.add("missing-boundary")
            else:
                room = limits.max_parts - entities - len(stack)
                children = _split_multipart(data, b_start, b_end, boundary, defects, room)
                if children is not None:
                    if depth + 1 > limits.max_depth:
                        raise MessageTooComplex(f"MIME nesting deeper than {limits.max_depth}")
                    child_default = (
                        "message/rfc822" if ctype == "multipart/digest" else "text/plain"
                    )
                    pending = []
                    for c_start, c_end in children:
                        c_headers, c_body = _parse_headers(data, c_start, c_end, limits)
                        pending.append((c_headers, c_body, c_end, depth + 1, child_default))
                    stack.extend(reversed(pending))
                    continue
            ctype = "text/plain"  # an unusable multipart is read as text, like mail clients do
        elif ctype == "message/rfc822":
            if depth + 1 > limits.max_depth:
                raise MessageTooComplex(f"MIME nesting deeper than {limits.max_depth}")
            inner_headers, inner_body = _parse_headers(data, b_start, b_end, limits)
            stack.append((inner_headers, inner_body, b_end, depth + 1, "text/plain"))
            continue
        parts.append(_leaf(headers, ctype, params, data[b_start:b_end], depth, defects))
    return ParsedMessage(top_headers, top_type, parts, defects, entities)


def _split_multipart(
    data: bytes, start: int, end: int, boundary: str, defects: set[str], room: int
) -> list[tuple[int, int]] | None:
    """Child spans of a multipart body, or None when the boundary never occurs (a defect).

    Raises :class:`MessageTooComplex` as soon as there are more than ``room`` children.
    """
    try:
        marker = boundary.encode("ascii")
    except UnicodeEncodeError:
        marker = boundary.encode("utf-8", "replace")
    children: list[tuple[int, int]] = []
    prev: int | None = None
    closed = False
    for at, line_end, closing in _delimiters(data, start, end, marker):
        if prev is not None:
            children.append((prev, _strip_eol(data, prev, at)))
            if len(children) > room:
                raise MessageTooComplex("more than the allowed number of MIME parts")
        prev = line_end
        if closing:
            closed = True
            break
    if prev is None:
        defects.add("boundary-not-found")
        return None
    if not closed:
        defects.add("missing-closing-boundary")
        children.append((prev, end))
    return children


def _leaf(
    headers: Headers, ctype: str, params: dict[str, str], body: bytes, depth: int, defects: set[str]
) -> Part:
    cte = (headers.first("Content-Transfer-Encoding") or "7bit").strip().lower()
    if cte not in ("7bit", "8bit", "binary", "base64", "quoted-printable"):
        defects.add("unknown-transfer-encoding")
    disposition = ""
    filename = ""
    disp_raw = headers.first("Content-Disposition")
    if disp_raw is not None:
        disposition, disp_params = parse_params(disp_raw)
        filename = disp_params.get("filename", "")
    if not filename:
        filename = params.get("name", "")
    if filename:
        filename = decode_header_value(filename)[:1024]
    return Part(headers, ctype, params, cte, disposition, filename, body, depth)


# --- content ---------------------------------------------------------------------------------------


def decode_body(part: Part, limit: int, defects: set[str] | None = None) -> tuple[bytes, bool]:
    """The part's content with its transfer encoding undone, at most ``limit`` bytes.

    Returns (bytes, truncated). Bad base64 is decoded as far as possible and noted in ``defects``.
    """
    raw = part.body
    if part.transfer_encoding == "base64":
        cut = raw[: limit * 4 // 3 + limit // 38 + 8]  # allowing for line breaks
        clean = cut.translate(None, b" \t\r\n")
        if _BASE64_BAD.search(clean):
            if defects is not None:
                defects.add("bad-base64")
            clean = _BASE64_JUNK.sub(b"", clean)
        truncated = len(cut) < len(raw)
        try:
            out = binascii.a2b_base64(clean)
        except binascii.Error:  # wrong padding: a cut in the middle, or a broken encoder
            if defects is not None and not truncated:
                defects.add("bad-base64")
            clean = clean.rstrip(b"=")
            out = binascii.a2b_base64(clean[: len(clean) - len(clean) % 4])
        return out[:limit], truncated or len(out) > limit
    if part.transfer_encoding == "quoted-printable":
        out = binascii.a2b_qp(raw[: limit * 3])
        return out[:limit], len(raw) > limit * 3 or len(out) > limit
    return raw[:limit], len(raw) > limit


def decode_text(parsed: ParsedMessage, limits: MimeLimits) -> Decoded:
    """Inline text/plain and text/html parts as str (line breaks as ``\\n``), within
    ``limits.max_decoded_bytes`` in total."""
    budget = limits.max_decoded_bytes
    plain: list[str] = []
    htmls: list[str] = []
    truncated = False
    for part in parsed.parts:
        if not part.is_text:
            continue
        if budget <= 0:
            truncated = True
            break
        raw, cut = decode_body(part, budget, parsed.defects)
        truncated = truncated or cut
        budget -= len(raw)
        text = decode_bytes(raw, part.charset)
        if "\r" in text:
            text = text.replace("\r\n", "\n")
        (htmls if part.content_type == "text/html" else plain).append(text)
    return Decoded(tuple(plain), tuple(htmls), truncated)


def _remove_spans(text: str, opener: re.Pattern[str], closer: re.Pattern[str]) -> str:
    """Remove every ``opener ... closer`` span; an unclosed one runs to the end (linear time)."""
    first = opener.search(text)
    if first is None:
        return text
    out: list[str] = []
    pos = 0
    found: re.Match[str] | None = first
    while found is not None:
        out.append(text[pos : found.start()])
        end = closer.search(text, found.end())
        if end is None:
            return "".join(out)
        pos = end.end()
        found = opener.search(text, pos)
    out.append(text[pos:])
    return "".join(out)


_INVISIBLE = (
    (re.compile("<!--"), re.compile("-->")),
    (re.compile("<head\\b", re.IGNORECASE), re.compile("</head\\s*>", re.IGNORECASE)),
    (re.compile("<script\\b", re.IGNORECASE), re.compile("</script\\s*>", re.IGNORECASE)),
    (re.compile("<style\\b", re.IGNORECASE), re.compile("</style\\s*>", re.IGNORECASE)),
)


def strip_invisible_html(source: str) -> str:
    """HTML without comments and ``<head>``, ``<script>``, ``<style>`` content (linear time)."""
    for opener, closer in _INVISIBLE:
        source = _remove_spans(source, opener, closer)
    return source


def html_to_text(source: str) -> str:
    """Visible text of an HTML document: block tags → line breaks, other tags removed, entities
    decoded, white space collapsed. Comments, scripts and styles are dropped without a space, so
    ``V<!-- -->iagra`` reads ``Viagra``."""
    source = strip_invisible_html(source)
    source = _BLOCK_TAG.sub("\n", source)
    source = _ANY_TAG.sub("", source)
    if "&" in source:
        source = html.unescape(source)
    source = _SPACES.sub(" ", source)
    return _NEWLINES.sub("\n", source).strip()
