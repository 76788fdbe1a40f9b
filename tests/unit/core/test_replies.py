"""The reply catalog: every constant well-formed, ``softened()``, and wire-safe ``format()``.

What it tests: each named Reply in ``gateway.core.replies`` renders as ``code status text`` with an
RFC 3463 enhanced status whose class matches the code (only the 220 greeting and the 354 carry
none), printable one-line text whose placeholders can be filled; ``softened()`` maps 5yz/5.x.x to
4yz/4.x.x and leaves the rest alone; ``format()`` strips CR/LF and non-ASCII from filled values.

Reads: nothing.

Security notes: the ``format()`` cases are reply-injection attempts (CRLF followed by a fake reply).
"""

from __future__ import annotations

import re
import string

import pytest

from gateway.core import replies
from gateway.core.replies import Reply, sanitize_text, upstream_permanent

CATALOG = replies.catalog()
STATUS = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")


def placeholders(text: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(text) if name]


def test_catalog_holds_the_named_constants() -> None:
    assert len(CATALOG) >= 50
    assert CATALOG["POLICY_TEMPFAIL"] is replies.POLICY_TEMPFAIL
    assert CATALOG["GREETING"] is replies.GREETING
    assert all(name.isupper() for name in CATALOG)


@pytest.mark.parametrize("name", sorted(CATALOG))
def test_every_reply_renders_code_status_text(name: str) -> None:
    reply = CATALOG[name]
    assert 200 <= reply.code <= 599
    if reply.status:
        assert STATUS.match(reply.status), reply.status
        assert reply.status[0] == str(reply.code)[0]
        assert reply.line() == f"{reply.code} {reply.status} {reply.text}"
    else:
        assert reply.code in (220, 354), f"{name} lacks an enhanced status code"
        assert reply.line() == f"{reply.code} {reply.text}"
    assert str(reply) == reply.line()
    assert reply.text and reply.text == reply.text.strip()
    assert reply.text.isascii() and reply.text.isprintable()


def test_only_the_greeting_and_start_data_lack_a_status() -> None:
    bare = {name for name, reply in CATALOG.items() if not reply.status}
    assert bare == {"GREETING", "START_DATA"}


@pytest.mark.parametrize("name", sorted(n for n in CATALOG if placeholders(CATALOG[n].text)))
def test_placeholders_can_be_filled(name: str) -> None:
    reply = CATALOG[name]
    filled = reply.format(**{p: "X" for p in placeholders(reply.text)})
    assert "{" not in filled.text and "}" not in filled.text
    assert (filled.code, filled.status) == (reply.code, reply.status)


def test_reply_refuses_a_bad_code_or_a_mismatched_status() -> None:
    with pytest.raises(ValueError):
        Reply(199, "", "x")
    with pytest.raises(ValueError):
        Reply(600, "", "x")
    with pytest.raises(ValueError):
        Reply(550, "4.7.1", "x")
    with pytest.raises(ValueError):
        Reply(250, "5.0.0", "x")


def test_reply_classes() -> None:
    assert replies.OK.is_positive and not replies.OK.is_temporary and not replies.OK.is_permanent
    assert replies.POLICY_TEMPFAIL.is_temporary and not replies.POLICY_TEMPFAIL.is_positive
    assert replies.AUTH_FAILED.is_permanent and not replies.AUTH_FAILED.is_temporary


# --- softened() -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(n for n in CATALOG if CATALOG[n].is_permanent))
def test_softened_permanent_reply_is_its_temporary_twin(name: str) -> None:
    reply = CATALOG[name]
    soft = reply.softened()
    assert soft.code == reply.code - 100
    assert soft.is_temporary
    assert soft.status == "4" + reply.status[1:]
    assert soft.text == reply.text


def test_softened_examples() -> None:
    assert replies.SENDER_NOT_OWNED.softened().line().startswith("453 4.7.1 ")
    assert replies.AUTH_ENCRYPTION_REQUIRED.softened().status == "4.7.11"
    assert Reply(554, "", "no status").softened() == Reply(454, "", "no status")


@pytest.mark.parametrize(
    "reply", [replies.OK, replies.POLICY_TEMPFAIL, replies.TOO_MANY_RECIPIENTS]
)
def test_softened_leaves_non_permanent_replies_alone(reply: Reply) -> None:
    assert reply.softened() == reply


# --- format() and sanitize_text() -----------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "evil@example.com\r\n250 2.0.0 OK",
        "evil@example.com\n250 OK",
        "evil@example.com\r250 OK",
        "evil\x00@example.com",
        "évil@exämple.com",
        "evil@example.com\u2028250 OK",
        "\x1b[31mred",
    ],
)
def test_format_sanitises_every_filled_value(value: str) -> None:
    line = replies.SENDER_NOT_OWNED.format(address=value, login=value).line()
    assert "\r" not in line and "\n" not in line
    assert line.isascii() and line.isprintable()
    assert line.startswith("553 5.7.1 Sender address <")


def test_format_replaces_bad_characters_and_keeps_the_rest() -> None:
    filled = replies.FROM_HEADER_NOT_OWNED.format(login="bob\r\nRSET é")
    assert filled.text == "From: header address not owned by user bob??RSET ?"


def test_format_bounds_each_value() -> None:
    filled = replies.FROM_HEADER_NOT_OWNED.format(login="x" * 10_000)
    assert len(filled.line()) < 300


def test_format_does_not_interpret_braces_in_values() -> None:
    filled = replies.SENDER_NOT_OWNED.format(address="{login}", login="{0}")
    assert filled.text == "Sender address <{login}> not owned by user {0}"


def test_sanitize_text() -> None:
    assert sanitize_text("  a b  ") == "a b"
    assert sanitize_text("a\r\nb\tc") == "a??b?c"
    assert sanitize_text("y" * 500) == "y" * 200
    assert sanitize_text("y" * 500, limit=10) == "y" * 10


def test_upstream_permanent_keeps_a_5xx_code_and_status_and_sanitises_the_text() -> None:
    reply = upstream_permanent(554, "5.7.1", "Rejected\r\n250 OK")
    assert reply.line() == "554 5.7.1 Upstream relay refused: Rejected??250 OK"


@pytest.mark.parametrize(("code", "status"), [(450, "4.2.0"), (250, ""), (554, ""), (554, "4.7.1")])
def test_upstream_permanent_is_always_permanent(code: int, status: str) -> None:
    reply = upstream_permanent(code, status, "text")
    assert reply.is_permanent
    assert reply.status.startswith("5.")
