"""The bounded MIME walker: structure, decoding, and hostile input.

What it tests: ``gateway.rules.mime``: parts and filenames of a normal multipart message; bounds on
nesting depth, part count and header size raise MessageTooComplex quickly; malformed input (bad
base64, unknown charsets, missing or unclosed boundaries, no blank line, LF-only line endings) never
raises anything else and never stalls; decoded text stops at ``max_decoded_bytes``.

Reads: synthetic messages built here.

Security notes: the hostile cases are the point: each must finish well under a second.
"""

from __future__ import annotations

import base64
import time

import pytest

from gateway.rules import MessageTooComplex, MimeLimits, RuleEngine, default_rules_dir, load_rules
from gateway.rules.mime import (
    decode_header_value,
    decode_text,
    html_to_text,
    parse_message,
    parse_params,
)


def crlf(text: str) -> bytes:
    return text.replace("\n", "\r\n").encode("utf-8")


MULTI = crlf(
    "From: a@example.com\nSubject: =?iso-8859-1?q?R=E9sum=E9?=\nMIME-Version: 1.0\n"
    'Content-Type: multipart/mixed; boundary="outer"\n\npreamble\n--outer\n'
    'Content-Type: multipart/alternative; boundary="inner"\n\n--inner\n'
    "Content-Type: text/plain; charset=iso-8859-1\nContent-Transfer-Encoding: quoted-printable\n\n"
    "Caf=E9 ol=E9\n--inner\nContent-Type: text/html\n\n<p>Caf&eacute;</p>\n--inner--\n--outer\n"
    "Content-Type: application/pdf\nContent-Transfer-Encoding: base64\n"
    "Content-Disposition: attachment; filename*=utf-8''r%C3%A9sum%C3%A9.pdf\n\n"
    + base64.b64encode(b"%PDF-1.4 test").decode()
    + "\n--outer--\nepilogue\n"
)


def test_walk_normal_multipart() -> None:
    parsed = parse_message(MULTI)
    assert [p.content_type for p in parsed.parts] == ["text/plain", "text/html", "application/pdf"]
    assert parsed.parts[2].filename == "résumé.pdf" and parsed.parts[2].is_attachment
    assert parsed.content_type == "multipart/mixed" and parsed.defects == set()
    decoded = decode_text(parsed, MimeLimits())
    assert decoded.plain == ("Café olé",)
    assert "Caf&eacute;" in decoded.html[0]
    assert decode_header_value(parsed.headers.first("Subject") or "") == "Résumé"


def test_params_and_headers() -> None:
    assert parse_params('text/plain; charset="utf-8"; format=flowed') == (
        "text/plain",
        {"charset": "utf-8", "format": "flowed"},
    )
    _, params = parse_params("attachment; filename*0*=utf-8''a%20; filename*1=b.txt")
    assert params["filename"] == "a b.txt"
    assert decode_header_value("=?utf-8?b?SGVsbG8=?= =?utf-8?q?_World?=") == "Hello World"
    assert decode_header_value("=?x-unknown?q?abc?=") == "abc"
    assert decode_header_value("=?utf-8?b?!!!notbase64?=")  # no exception


def test_lf_only_and_mbox_line() -> None:
    parsed = parse_message(b"From x@y Mon Sep 16 2002\nSubject: hi\n\nbody\n")
    assert parsed.headers.first("Subject") == "hi"
    assert decode_text(parsed, MimeLimits()).plain == ("body\n",)


def test_deep_nesting_refused_quickly() -> None:
    depth = 1000
    head = "Content-Type: multipart/mixed; boundary=b{i}\n\n--b{i}\n"
    text = "Subject: deep\n" + "".join(head.format(i=i) for i in range(depth)) + "x\n"
    data = crlf(text)
    start = time.perf_counter()
    with pytest.raises(MessageTooComplex, match="nesting deeper than 20"):
        parse_message(data)
    assert time.perf_counter() - start < 1.0


def test_deep_message_rfc822_nesting_refused() -> None:
    data = crlf("Subject: a\n" + "Content-Type: message/rfc822\n\n" * 100 + "body\n")
    with pytest.raises(MessageTooComplex, match="nesting"):
        parse_message(data)


def test_many_parts_refused_quickly() -> None:
    parts = "".join("--b\nContent-Type: text/plain\n\nx\n" for _ in range(100_000))
    data = crlf(
        'Subject: many\nContent-Type: multipart/mixed; boundary="b"\n\n' + parts + "--b--\n"
    )
    start = time.perf_counter()
    with pytest.raises(MessageTooComplex, match="MIME parts"):
        parse_message(data)
    assert time.perf_counter() - start < 1.0
    assert len(parse_message(data, MimeLimits(max_parts=200_000)).parts) == 100_000


def test_huge_header_section_refused() -> None:
    data = crlf("Subject: x\n" + "X-Pad: " + "a" * 300_000 + "\n\nbody\n")
    with pytest.raises(MessageTooComplex, match="header section"):
        parse_message(data)
    folded = crlf("Subject: x\n" + "X-Pad: a\n" + " a\n" * 100_000 + "\nbody\n")
    with pytest.raises(MessageTooComplex, match="header section"):
        parse_message(folded)


@pytest.mark.parametrize(
    "text",
    [
        # bad base64, unknown charset
        "Content-Type: text/plain; charset=x-no-such\nContent-Transfer-Encoding: base64\n\n"
        "!!!@@@ SGVsbG8g d29ybGQ=== ***\n",
        # a charset name that is a codec but not a text encoding
        "Content-Type: text/plain; charset=punycode\n\nabc\xe9\n",
        # multipart without boundary parameter
        "Content-Type: multipart/mixed\n\n--x\nbody\n",
        # boundary never found
        'Content-Type: multipart/mixed; boundary="zz"\n\n--yy\nbody\n',
        # closing boundary missing
        'Content-Type: multipart/mixed; boundary="zz"\n\n--zz\nContent-Type: text/plain\n\nhi\n',
        # garbage header line instead of a blank line
        "Subject: x\nthis is not a header\nbody\n",
        # unknown transfer encoding, NUL and 8-bit bytes
        "Content-Transfer-Encoding: x-uuencode\n\n\x00\xff\xfe text\n",
        # empty message, header only
        "",
        "Subject: only a header",
    ],
)
def test_malformed_input_never_raises(text: str) -> None:
    data = ("From: a@example.com\n" + text).replace("\n", "\r\n").encode("latin-1")
    rs = load_rules(default_rules_dir())
    start = time.perf_counter()
    result = RuleEngine(rs).scan(data, recipients=["b@example.net"], login=None)
    assert time.perf_counter() - start < 1.0
    assert result.score == result.score  # a number, not NaN


def test_defects_are_recorded() -> None:
    assert "missing-boundary" in parse_message(crlf("Content-Type: multipart/mixed\n\nx\n")).defects
    parsed = parse_message(
        crlf("Content-Type: text/plain\nContent-Transfer-Encoding: base64\n\n!!SGk=\n")
    )
    decode_text(parsed, MimeLimits())
    assert "bad-base64" in parsed.defects


def test_decoded_bytes_are_bounded() -> None:
    data = crlf("Subject: big\n\n" + ("word " * 100_000))
    decoded = decode_text(parse_message(data), MimeLimits(max_decoded_bytes=1000))
    assert decoded.truncated and len(decoded.plain[0]) == 1000


def test_html_to_text_is_linear_on_hostile_html() -> None:
    hostile = "<" * 200_000 + "<!--" * 50_000 + "<script" * 30_000
    start = time.perf_counter()
    html_to_text(hostile)
    assert time.perf_counter() - start < 1.0
    assert html_to_text("<p>a</p><script>x</script>b &amp; c<!-- d -->e") == "a\nb & ce"


def test_limits_validate() -> None:
    from gateway.core.errors import ConfigError

    with pytest.raises(ConfigError):
        MimeLimits(max_depth=0).validate()
