"""Byte-level message helpers: bare CR/LF/NUL, normalisation, header bounds, Message-ID, From:.

What it tests: :func:`has_bare_newline_or_nul` on clean and smuggling-shaped input (``\\n.\\r\\n``,
``\\r\\n.\\r``...), :func:`normalize_line_endings` (result is clean, CRLF kept, idempotent),
:func:`header_block` and the ``MAX_HEADER_BYTES`` bound, :class:`Headers` (Message-ID extraction,
From: addresses, never raising on garbage).

Reads: nothing.

Security notes: the bare-newline cases are the SMTP smuggling shapes; see also the From: spoofing
cases in tests/unit/checks/test_sender_identity.py.
"""

from __future__ import annotations

import hashlib

import pytest

from gateway.core.message import (
    MAX_HEADER_BYTES,
    Headers,
    has_bare_newline_or_nul,
    header_block,
    normalize_line_endings,
    sha256_hex,
)

CLEAN = [
    b"",
    b"Subject: x\r\n\r\nbody\r\n",
    b"a\r\n.\r\nb\r\n",  # a dot line inside content (already unstuffed) is not bare anything
    b"\r\n\r\n\r\n",
    "Subject: é\r\n\r\nü\r\n".encode(),
]
DIRTY = [
    b"Subject: x\n\r\nbody\r\n",  # bare LF
    b"Subject: x\r\n\rbody\r\n",  # bare CR
    b"a\n.\r\nb",  # smuggling: <LF>.<CR><LF>
    b"a\r\n.\nb",  # <CR><LF>.<LF>
    b"a\n.\nb",  # <LF>.<LF>
    b"a\r.\rb",  # <CR>.<CR>
    b"a\r\n.\rb",
    b"a\r\r\nb",  # CR then CRLF
    b"a\rb\r\n",
    b"trailing CR\r",
    b"\nleading LF",
    b"nul\x00byte\r\n",
    b"\x00",
]


@pytest.mark.parametrize("data", CLEAN)
def test_clean_data_has_no_bare_newline(data: bytes) -> None:
    assert has_bare_newline_or_nul(data) is False


@pytest.mark.parametrize("data", DIRTY)
def test_bare_cr_lf_and_nul_are_detected(data: bytes) -> None:
    assert has_bare_newline_or_nul(data) is True


@pytest.mark.parametrize("data", DIRTY + CLEAN)
def test_normalized_data_is_clean_and_stable(data: bytes) -> None:
    out = normalize_line_endings(data)
    assert has_bare_newline_or_nul(out) is False
    assert normalize_line_endings(out) == out


@pytest.mark.parametrize("data", CLEAN)
def test_normalization_keeps_clean_data_byte_for_byte(data: bytes) -> None:
    assert normalize_line_endings(data) == data


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"a\nb", b"a\r\nb"),
        (b"a\rb", b"a\r\nb"),
        (b"a\n.\r\nb", b"a\r\n.\r\nb"),
        (b"a\r\r\nb", b"a\r\n\r\nb"),
        (b"a\n\rb", b"a\r\n\r\nb"),
        (b"n\x00u\x00l\r\n", b"nul\r\n"),
        (b"a\r\x00\nb", b"a\r\nb"),  # NUL removed first, CR LF then meet
    ],
)
def test_normalization_examples(data: bytes, expected: bytes) -> None:
    assert normalize_line_endings(data) == expected


# --- header section -------------------------------------------------------------------------------


def test_header_block_ends_after_the_last_header_line() -> None:
    data = b"From: a@b.example\r\nSubject: s\r\n\r\nBody: not a header\r\n"
    assert header_block(data) == b"From: a@b.example\r\nSubject: s\r\n"


def test_header_block_without_a_body_is_the_whole_message() -> None:
    data = b"From: a@b.example\r\nSubject: s\r\n"
    assert header_block(data) == data


def test_header_block_is_bounded() -> None:
    data = b"X-Long: " + b"a" * (2 * MAX_HEADER_BYTES)
    assert len(header_block(data)) == MAX_HEADER_BYTES
    far = b"X-Pad: " + b"a" * MAX_HEADER_BYTES + b"\r\n\r\nbody"
    assert len(header_block(far)) == MAX_HEADER_BYTES


def test_headers_beyond_the_bound_are_not_parsed() -> None:
    padding = b"".join(b"X-Pad: %s\r\n" % (b"a" * 100) for _ in range(MAX_HEADER_BYTES // 100))
    data = b"Subject: early\r\n" + padding + b"X-Late: late\r\n\r\nbody"
    headers = Headers(data)
    assert headers.values("Subject") == ["early"]
    assert headers.values("X-Late") == []


def test_body_lines_are_not_headers() -> None:
    headers = Headers(b"Subject: s\r\n\r\nMessage-ID: <body@x>\r\nFrom: a@b.example\r\n")
    assert headers.message_id is None
    assert headers.from_addresses() is None


# --- Message-ID -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"Message-ID: <abc@host.example>\r\n\r\n", "<abc@host.example>"),
        (b"message-id:    <abc@host.example>   \r\n\r\n", "<abc@host.example>"),
        (b"MESSAGE-ID: <abc@host.example>\r\n\r\n", "<abc@host.example>"),
        (b"Message-ID:\r\n <folded@host.example>\r\n\r\n", "<folded@host.example>"),
        (b"Message-ID: <first@x>\r\nMessage-ID: <second@x>\r\n\r\n", "<first@x>"),
        (b"Subject: none\r\n\r\n", None),
        (b"Message-ID:\r\n\r\n", None),
        (b"Message-ID:    \r\n\r\n", None),
    ],
)
def test_message_id(data: bytes, expected: str | None) -> None:
    assert Headers(data).message_id == expected


def test_message_id_is_bounded() -> None:
    value = "<" + "x" * 5000 + "@host.example>"
    assert Headers(f"Message-ID: {value}\r\n\r\n".encode()).message_id == value[:998]


# --- From: and robustness -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("a@b.example", ["a@b.example"]),
        ("Name <a@b.example>", ["a@b.example"]),
        ('"a@c.example" <a@b.example>', ["a@b.example"]),
        ("a@b.example, c@d.example", ["a@b.example", "c@d.example"]),
        ("no address", None),
        ("", None),
        ("a@b.example@c.example", None),
    ],
)
def test_from_addresses(value: str, expected: list[str] | None) -> None:
    assert Headers(f"From: {value}\r\n\r\n".encode()).from_addresses() == expected


def test_repeated_from_is_none() -> None:
    assert Headers(b"From: a@b.example\r\nFrom: a@b.example\r\n\r\n").from_addresses() is None


@pytest.mark.parametrize(
    "data",
    [
        b"\xff\xfe\xfd\r\n\r\n",
        b"From: \xff@\xfe\r\n\r\n",
        b": no name\r\n\r\n",
        b"From\r\n\r\n",
        b"\x00\x00\x00",
        b"Message-ID: <\xc3(@x>\r\nFrom: =?bogus?x?y?= <a@b.example>\r\n\r\n",
        b" continuation first\r\nFrom: a@b.example\r\n\r\n",
    ],
)
def test_malformed_headers_never_raise(data: bytes) -> None:
    headers = Headers(data)
    headers.from_addresses()
    _ = headers.message_id
    headers.values("Subject")


def test_sha256_hex() -> None:
    assert sha256_hex(b"abc") == hashlib.sha256(b"abc").hexdigest()
