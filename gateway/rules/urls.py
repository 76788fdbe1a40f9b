"""URL and domain extraction from decoded text and HTML, with host normalisation.

What it does: :func:`text_urls` finds ``http(s)://``, ``ftp://`` and ``www.`` URLs in plain text;
:func:`html_links` finds the targets of ``<a href>``, ``<area href>``, ``<form action>``,
``<img src>``, ``<iframe src>`` and ``<frame src>`` in HTML, keeping an anchor's visible text so a rule
can compare what the reader sees with where the link goes. Hosts are normalised the way browsers read
them, which undoes the usual obfuscations: HTML entities in attributes, percent-encoded host names,
``user@`` prefixes (``http://www.bank.example@evil.example/``), backslashes, trailing dots, upper case,
and IPv4 literals written in decimal, hexadecimal or octal (``http://3232235777/``, ``0x7f.1``).
:func:`registrable_domain` approximates the registrable domain (eTLD+1) without a public suffix list.

Reads: only the text given. Work is bounded: at most ``MAX_URLS`` URLs per call, each at most
``MAX_URL_LENGTH`` characters; every pattern is linear (no nested quantifiers, classes stop at ``<``).

Security notes: nothing here resolves, fetches or logs a URL.
"""

from __future__ import annotations

import html
import ipaddress
import re
import socket
from dataclasses import dataclass
from urllib.parse import unquote

MAX_URLS = 1000
MAX_URL_LENGTH = 2048

# Matched on the lower-cased text without IGNORECASE and without a leading \b (which would stop
# re from skipping quickly to the next "h", "f" or "w"); the word boundary is checked afterwards.
_TEXT_URL = re.compile(
    r"(?:https?://|ftp://|www[0-9]{0,3}\.)[^\s<>\"'`{}|\\^\x00-\x1f\x7f]{1,2048}"
)
_WORD_CHAR = re.compile(r"\w")
_TRAILING = ".,;:!?)]}>'\"*"
_LINK_ATTR = re.compile(
    r"<(a|area|form|img|iframe|frame|link|base)\b[^<>]*?\b(href|action|src)\s*=\s*"
    r"(?:\"([^\"<>]{0,2048})\"?|'([^'<>]{0,2048})'?|([^\s<>]{1,2048}))",
    re.IGNORECASE,
)
_ANCHOR_END = re.compile(r"</a\s*>|<a\b", re.IGNORECASE)
_TAG = re.compile(r"<[/!?a-zA-Z][^<>]*>")
_SPACE = re.compile(r"\s+")
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]{0,20}):")
_NUMERIC_HOST = re.compile(r"^(?:0x[0-9a-f]+|[0-9]+)(?:\.(?:0x[0-9a-f]+|[0-9]+)){0,3}$")
_DOMAINISH = re.compile(
    r"^(?:(?:https?|ftp)://)?(?:www\d{0,3}\.)?[^\s/@]+\.[a-z]{2,24}(?:[/:?#]|$)"
)
_SECOND_LEVEL = frozenset({"co", "com", "net", "org", "gov", "ac", "edu", "ne", "or", "go", "ltd"})


@dataclass(frozen=True, slots=True)
class Url:
    """One URL as found (``raw``, bounded) with its normalised host ("" when it has none)."""

    raw: str
    scheme: str  # lower case; "http" for a "www." URL without a scheme
    host: str  # lower case, no trailing dot, percent-decoded; IPv4 in dotted quad
    is_ip: bool
    has_userinfo: bool


@dataclass(frozen=True, slots=True)
class Link:
    """An HTML anchor: where it goes and the text the reader sees (entities decoded, trimmed)."""

    url: Url
    text: str


def parse_url(raw: str, default_scheme: str = "http") -> Url:
    """Normalise one URL string (already HTML-unescaped) into a :class:`Url`."""
    raw = raw.strip()[:MAX_URL_LENGTH]
    text = raw.replace("\\", "/")
    m = _SCHEME.match(text)
    if m is not None:
        scheme = m[1].lower()
        rest = text[m.end() :]
        if not rest.startswith("//"):  # mailto:, javascript:, data:, cid: ... have no host
            return Url(raw, scheme, "", False, False)
        rest = rest.lstrip("/")
    elif text.startswith("//"):
        scheme, rest = default_scheme, text.lstrip("/")
    elif text.lower().startswith("www"):
        scheme, rest = default_scheme, text
    else:  # a relative link
        return Url(raw, "", "", False, False)
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    _userinfo, at, hostport = authority.rpartition("@")
    host = _strip_port(hostport)
    host = unquote(host).strip().rstrip(".").lower()
    is_ip = False
    if host.startswith("[") and host.endswith("]"):
        is_ip = _is_ip(host[1:-1])
        host = host[1:-1]
    elif _NUMERIC_HOST.match(host):
        dotted = _legacy_ipv4(host)
        if dotted is not None:
            host, is_ip = dotted, True
    return Url(raw, scheme, host, is_ip, bool(at))


def _strip_port(hostport: str) -> str:
    if hostport.startswith("["):
        end = hostport.find("]")
        return hostport[: end + 1] if end > 0 else hostport
    return hostport.partition(":")[0]


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _legacy_ipv4(host: str) -> str | None:
    """``3232235777``, ``0xc0.0xa8.1.1``, ``0300.0250.1.1``, ``127.1`` → dotted quad (as browsers)."""
    try:
        return socket.inet_ntoa(socket.inet_aton(host))
    except (OSError, ValueError):
        return None


def text_urls(text: str) -> list[Url]:
    """URLs written in plain text (``scheme://`` or ``www.``), in order, at most ``MAX_URLS``."""
    out: list[Url] = []
    lowered = text.lower()
    if len(lowered) != len(text):  # a character that lower-cases to two: keep offsets right
        lowered = "".join(c if len(c.lower()) != 1 else c.lower() for c in text)
    pos = 0
    while len(out) < MAX_URLS:
        m = _TEXT_URL.search(lowered, pos)
        if m is None:
            break
        start = m.start()
        if start > 0 and _WORD_CHAR.match(lowered, start - 1):  # not at a word start
            pos = start + 1
            continue
        pos = m.end()
        url = parse_url(text[start : m.end()].rstrip(_TRAILING))
        if url.host:
            out.append(url)
    return out


def html_links(source: str) -> tuple[list[Url], list[Link]]:
    """Targets of link-like attributes in HTML, and the anchors among them with their text.

    Entity-encoded attribute values (``&#104;ttp://``) are decoded first. Anchor text runs to the
    next ``</a>`` or ``<a``; its tags are removed and its white space collapsed.
    """
    urls: list[Url] = []
    links: list[Link] = []
    for m in _LINK_ATTR.finditer(source):
        value = m[3] if m[3] is not None else m[4] if m[4] is not None else m[5]
        if "&" in value:
            value = html.unescape(value)
        url = parse_url(value)
        if not url.host:
            continue
        urls.append(url)
        if m[1].lower() == "a":
            tag_end = source.find(">", m.end())
            if tag_end >= 0:
                end = _ANCHOR_END.search(source, tag_end + 1, tag_end + 1 + MAX_URL_LENGTH)
                stop = end.start() if end is not None else tag_end + 1 + MAX_URL_LENGTH
                inner = _TAG.sub("", source[tag_end + 1 : stop])
                if "&" in inner:
                    inner = html.unescape(inner)
                links.append(Link(url, _SPACE.sub(" ", inner).strip()))
        if len(urls) >= MAX_URLS:
            break
    return urls, links


def registrable_domain(host: str) -> str:
    """The last two labels, or three under a two-letter country code with a common second level
    (``example.co.uk``); an IP address is returned whole. An approximation of eTLD+1."""
    if not host or _is_ip(host):
        return host
    labels = host.split(".")
    if len(labels) >= 3 and len(labels[-1]) == 2 and labels[-2] in _SECOND_LEVEL:
        return ".".join(labels[-3:])
    return ".".join(labels[-2:])


def text_host(text: str) -> str | None:
    """The host a link text shows when it reads like a URL or a ``www.`` name, else None."""
    candidate = text.strip().lower()
    if not candidate or len(candidate) > MAX_URL_LENGTH or " " in candidate:
        return None
    if not (candidate.startswith(("http://", "https://", "ftp://", "www."))):
        return None
    if not _DOMAINISH.match(candidate):
        return None
    url = parse_url(candidate)
    return url.host or None


def host_in(host: str, domains: frozenset[str]) -> str | None:
    """The entry of ``domains`` that ``host`` is, or is a subdomain of; None if none."""
    if not host:
        return None
    if host in domains:
        return host
    dot = host.find(".")
    while dot >= 0:
        parent = host[dot + 1 :]
        if parent in domains:
            return parent
        dot = host.find(".", dot + 1)
    return None
