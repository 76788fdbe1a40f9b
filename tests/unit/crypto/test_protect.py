"""Header protection (RFC 9788) and the byte surgery shared by both formats, without any crypto.

What it tests: :func:`split_message` slices header fields (folded ones included) and the body
exactly; :func:`protect` builds the inner entity (Content-* fields with ``hp="cipher"``, every
non-structural field copied, ``HP-Outer`` per outer field, original body bytes) and the outer
header section (placeholder Subject, Keywords/Comments removed, no Content-*/MIME-Version,
From/To/Cc/Date/Message-ID kept, trace fields and Bcc not copied inside); the ``hp`` parameter on
awkward Content-Type fields; :class:`HeaderProtection` validation and RFC 2047 placeholders;
:func:`is_encrypted` on the top-level types that must pass unchanged (and those that must not).

Reads: nothing.

Security notes: the placeholder cases are header-injection attempts; the pkcs7-mime without
smime-type case is the "when in doubt, encrypt" rule.
"""

from __future__ import annotations

from email import message_from_bytes, policy
from email.header import decode_header, make_header

import pytest

from gateway.crypto.protect import (
    DEFAULT_PROTECTION,
    HeaderProtection,
    assemble,
    is_encrypted,
    new_boundary,
    protect,
    split_message,
)
from tests.unit.crypto.conftest import (
    MULTIPART,
    MULTIPART_BODY,
    REAL_SUBJECT,
    UTF8_TEXT,
    body_of,
    has_only_crlf,
)


def headers_of(entity: bytes) -> bytes:
    return entity.split(b"\r\n\r\n", 1)[0] + b"\r\n"


def field_names(header_section: bytes) -> list[str]:
    fields, _ = split_message(header_section + b"\r\n")
    return [f.name for f in fields]


def test_split_message_keeps_folded_fields_and_the_body_bytes() -> None:
    fields, body = split_message(MULTIPART)
    assert body == MULTIPART_BODY
    names = [f.name for f in fields]
    assert names[:3] == ["received", "from", "to"]
    content_type = next(f for f in fields if f.name == "content-type")
    assert content_type.raw == b'Content-Type: multipart/mixed;\r\n boundary="==outer=="\r\n'
    assert content_type.value() == 'multipart/mixed; boundary="==outer=="'
    assert b"".join(f.raw for f in fields) + b"\r\n" + body == MULTIPART


@pytest.mark.parametrize(
    ("message", "names", "body"),
    [
        (b"Subject: x\r\n", ["subject"], b""),  # no blank line: all header
        (b"Subject: x", ["subject"], b""),
        (b"\r\nbody only\r\n", [], b"body only\r\n"),
        (b"Subject : spaced\r\nnot a field\r\n\r\nb", ["subject", ""], b"b"),
        (b"Subject: a\r\n\r\n\r\nbody\r\n\r\n", ["subject"], b"\r\nbody\r\n\r\n"),
    ],
)
def test_split_message_edge_cases(message: bytes, names: list[str], body: bytes) -> None:
    fields, rest = split_message(message)
    assert [f.name for f in fields] == names
    assert rest == body


def test_protect_moves_content_fields_and_copies_the_others_inside() -> None:
    parts = protect(MULTIPART)
    inner = parts.inner_entity
    assert body_of(inner) == MULTIPART_BODY
    assert has_only_crlf(inner) and has_only_crlf(parts.outer_headers)
    names = field_names(headers_of(inner))
    assert names[0] == "content-type"
    for name in ("from", "to", "cc", "subject", "date", "message-id", "keywords"):
        assert names.count(name) == 1, name
    assert "received" not in names and "mime-version" not in names
    parsed = message_from_bytes(inner, policy=policy.default)
    assert parsed.get_content_type() == "multipart/mixed"
    assert parsed.get_param("boundary") == "==outer=="
    assert parsed.get_param("hp") == "cipher"
    assert parsed.get_param("protected-headers") == "v1"
    assert str(parsed["Subject"]) == REAL_SUBJECT
    # The inner entity is still a well-formed multipart with its three parts intact.
    parts_inside = list(parsed.iter_parts())
    assert [p.get_content_type() for p in parts_inside] == [
        "text/plain",
        "text/html",
        "application/octet-stream",
    ]
    assert parts_inside[0].get_payload(decode=True) == UTF8_TEXT
    assert parts_inside[2].get_payload(decode=True) == bytes(range(256)) * 8


def test_protect_obscures_the_outer_header_section() -> None:
    outer = protect(MULTIPART).outer_headers
    names = field_names(outer)
    assert names == ["received", "from", "to", "cc", "subject", "date", "message-id"]
    assert b"Subject: ...\r\n" in outer
    assert b"Quartalszahlen" not in outer and b"Keywords" not in outer
    assert b"From: Alice <alice@example.com>\r\n" in outer
    assert b"Message-ID: <m1@example.com>\r\n" in outer


def test_hp_outer_records_each_field_left_outside() -> None:
    inner_headers = headers_of(protect(MULTIPART).inner_entity)
    parsed = message_from_bytes(inner_headers + b"\r\n", policy=policy.compat32)
    hp_outer = parsed.get_all("HP-Outer")
    assert hp_outer == [
        "From: Alice <alice@example.com>",
        "To: Bob <bob@example.net>",
        "Cc: carol@example.org",
        "Subject: ...",
        "Date: Tue, 02 Sep 2025 10:00:00 +0200",
        "Message-ID: <m1@example.com>",
    ]


def test_bcc_and_trace_fields_stay_outside_and_are_not_copied() -> None:
    message = (
        b"Return-Path: <alice@example.com>\r\nFrom: a@example.com\r\nTo: b@example.net\r\n"
        b"Bcc: secret@example.org\r\nDKIM-Signature: v=1; d=example.com\r\nSubject: s\r\n"
        b"HP-Outer: Subject: forged\r\n\r\nbody\r\n"
    )
    parts = protect(message)
    inner_names = field_names(headers_of(parts.inner_entity))
    assert "bcc" not in inner_names and "return-path" not in inner_names
    assert "dkim-signature" not in inner_names
    assert b"forged" not in parts.inner_entity
    assert b"Bcc: secret@example.org\r\n" in parts.outer_headers
    assert b"DKIM-Signature: v=1; d=example.com\r\n" in parts.outer_headers


@pytest.mark.parametrize(
    ("content_type", "expected"),
    [
        (b"Content-Type: text/plain; charset=utf-8\r\n", {"charset": "utf-8"}),
        (b"Content-Type: text/plain;\r\n", {}),  # trailing semicolon
        (b'Content-Type: text/plain; hp="clear"\r\n', {}),  # an existing hp is replaced
        (
            b"Content-Type: text/plain; protected-headers=v1; format=flowed\r\n",
            {"format": "flowed"},
        ),
        (
            b'Content-Type: multipart/mixed; boundary="x;hp=y"\r\n',
            {"boundary": "x;hp=y"},  # a quoted boundary is never touched
        ),
    ],
)
def test_hp_parameter_on_awkward_content_types(
    content_type: bytes, expected: dict[str, str]
) -> None:
    inner = protect(b"Subject: s\r\n" + content_type + b"\r\nbody\r\n").inner_entity
    parsed = message_from_bytes(inner, policy=policy.compat32)
    params = dict(parsed.get_params()[1:])
    assert params.pop("hp") == "cipher"
    assert params.pop("protected-headers") == "v1"
    assert params == expected
    assert len(parsed.get_all("Content-Type")) == 1


def test_message_without_content_type_gets_the_mime_default_inside() -> None:
    inner = protect(b"From: a@example.com\r\nSubject: plain\r\n\r\nhello\r\n").inner_entity
    parsed = message_from_bytes(inner, policy=policy.compat32)
    assert parsed.get_content_type() == "text/plain"
    assert parsed.get_param("charset") == "us-ascii"
    assert parsed.get_param("hp") == "cipher"
    assert body_of(inner) == b"hello\r\n"


def test_raw_utf8_headers_and_bodies_pass_byte_for_byte() -> None:
    message = "From: Jörg <jörg@bücher.example>\r\nSubject: Grüße\r\n\r\nÄ\r\n".encode()
    parts = protect(message)
    assert "Subject: Grüße\r\n".encode() in parts.inner_entity
    assert "HP-Outer: From: Jörg <jörg@bücher.example>\r\n".encode() in parts.inner_entity
    assert body_of(parts.inner_entity) == "Ä\r\n".encode()


def test_bare_newlines_are_normalised_to_crlf() -> None:
    parts = protect(b"Subject: s\nContent-Type: text/plain\n\nline\nline\r\n")
    assert has_only_crlf(parts.inner_entity) and has_only_crlf(parts.outer_headers)
    assert body_of(parts.inner_entity) == b"line\r\nline\r\n"


def test_a_message_without_subject_gets_no_placeholder() -> None:
    parts = protect(b"From: a@example.com\r\n\r\nx\r\n")
    assert b"Subject" not in parts.outer_headers
    assert b"HP-Outer: From: a@example.com\r\n" in parts.inner_entity


def test_custom_placeholder_and_removed_fields() -> None:
    protection = HeaderProtection(placeholder_subject="[...]", removed=frozenset({"x-secret"}))
    message = b"Subject: s\r\nX-Secret: 1\r\nKeywords: k\r\n\r\nb"
    parts = protect(message, protection)
    assert parts.outer_headers == b"Subject: [...]\r\nKeywords: k\r\n"
    assert b"X-Secret: 1\r\n" in parts.inner_entity


def test_non_ascii_placeholder_is_rfc2047_encoded() -> None:
    protection = HeaderProtection(placeholder_subject="(verschlüsselt)")
    outer = protect(b"Subject: s\r\n\r\nb", protection).outer_headers
    assert outer.isascii()
    value = outer.decode().split(":", 1)[1].strip()
    assert str(make_header(decode_header(value))) == "(verschlüsselt)"


@pytest.mark.parametrize(
    "placeholder", ["", "   ", "x\r\nBcc: eve@example.net", "tab\tinside", "x" * 201]
)
def test_placeholder_must_be_one_printable_line(placeholder: str) -> None:
    with pytest.raises(ValueError, match="placeholder"):
        HeaderProtection(placeholder_subject=placeholder)


@pytest.mark.parametrize(
    "name", ["from", "to", "cc", "date", "message-id", "subject", "content-type"]
)
def test_delivery_fields_cannot_be_removed(name: str) -> None:
    with pytest.raises(ValueError, match="cannot be removed"):
        HeaderProtection(removed=frozenset({name}))


@pytest.mark.parametrize("name", ["X-Upper", "bad name", ""])
def test_removed_names_must_be_lower_case_field_names(name: str) -> None:
    with pytest.raises(ValueError, match="lower-case field name"):
        HeaderProtection(removed=frozenset({name}))


def test_default_protection_is_hcp_baseline_with_the_issue_placeholder() -> None:
    assert DEFAULT_PROTECTION.placeholder_subject == "..."
    assert frozenset({"keywords", "comments"}) == DEFAULT_PROTECTION.removed
    assert DEFAULT_PROTECTION.placeholder_field == b"Subject: ...\r\n"


def test_assemble_and_boundary() -> None:
    out = assemble(b"From: a\r\n", [b"Content-Type: x/y\r\n"], b"body")
    assert out == b"From: a\r\nMIME-Version: 1.0\r\nContent-Type: x/y\r\n\r\nbody"
    first, second = new_boundary(), new_boundary()
    assert first != second and "=_" in first and len(first) < 70


@pytest.mark.parametrize(
    ("content_type", "encrypted"),
    [
        (b'multipart/encrypted; protocol="application/pgp-encrypted"; boundary=x', True),
        (b'Multipart/Encrypted;\r\n protocol="application/pgp-encrypted"', True),
        (b"application/pkcs7-mime; smime-type=enveloped-data; name=smime.p7m", True),
        (b'application/x-pkcs7-mime; smime-type="enveloped-data"', True),
        (b"application/pkcs7-mime; smime-type=authEnveloped-data", True),
        (b"application/pkcs7-mime; smime-type=signed-data", False),  # readable by anyone
        (b"application/pkcs7-mime; name=smime.p7m", False),  # unknown: encrypt (again)
        (b'multipart/signed; protocol="application/pgp-signature"', False),
        (b"text/plain; charset=utf-8", False),
        (b"multipart/mixed; boundary=x", False),
    ],
)
def test_is_encrypted(content_type: bytes, encrypted: bool) -> None:
    message = b"From: a@example.com\r\nContent-Type: " + content_type + b"\r\n\r\nbody\r\n"
    assert is_encrypted(message) is encrypted


def test_is_encrypted_needs_exactly_one_top_level_content_type() -> None:
    assert not is_encrypted(b"Subject: none\r\n\r\nbody")
    twice = b"Content-Type: multipart/encrypted\r\nContent-Type: text/plain\r\n\r\nx"
    assert not is_encrypted(twice)
    # A Content-Type inside the body is not the message's.
    assert not is_encrypted(b"Subject: s\r\n\r\nContent-Type: multipart/encrypted\r\n")
