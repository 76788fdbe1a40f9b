"""Delivery status notifications: structure, RFC 3464 fields, safety, and who may get one.

What it tests: :func:`gateway.queue.dsn.build_dsn` output parsed back with the stdlib ``email``
package (``policy=email.policy.default``) -- ``multipart/report; report-type=delivery-status``,
the three parts and their types, the per-message and per-recipient fields (also checked against
the RFC 3464 field grammar by :func:`check_rfc3464`), the original's headers present and its body
absent, CRLF-only line endings and line lengths, no header injection from a hostile address,
reply or Subject, the RFC 6533 ``utf-8`` address type and UTF-8 variants, the warning variant,
status normalisation, a missing original; and :func:`gateway.queue.dsn.may_bounce`.

Reads: nothing (pure functions).

Security notes: the injection cases put CR/LF, a MIME boundary and fake header lines into every
value that comes from outside.
"""

from __future__ import annotations

import base64
import email
import email.policy
import re
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage, Message
from email.utils import parsedate_to_datetime
from typing import Any

import pytest

from gateway.core.message import has_bare_newline_or_nul
from gateway.queue import dsn
from gateway.queue.dsn import (
    DELAYED_SUBJECT,
    FAILED_SUBJECT,
    build_dsn,
    envelope_flags,
    may_bounce,
    typed_address,
    xtext_address,
)
from gateway.queue.model import (
    BOUNCED,
    DONE,
    PENDING,
    QueuedCopy,
    QueuedMessage,
    QueuedRecipient,
)

NOW = datetime(2025, 3, 4, 5, 6, 7, tzinfo=UTC)
ARRIVAL = NOW - timedelta(days=5)
BODY_MARKER = b"BODY-MARKER-never-in-a-bounce"
ORIGINAL = (
    b"Received: from client.example.com by gw.example.com\r\n"
    b"From: Alice <alice@example.com>\r\n"
    b"To: Bob <bob@example.net>, carol@example.org\r\n"
    b"Subject: =?utf-8?q?Quarterly_r=C3=A9port?=\r\n"
    b"Message-ID: <orig-1@example.com>\r\n"
    b"Date: Tue, 25 Feb 2025 10:00:00 +0000\r\n"
    b"\r\n"
    b"Hello Bob,\r\n" + BODY_MARKER + b"\r\n"
)
REPLY_BOB = "550 5.1.1 <bob@example.net>: Recipient address rejected: User unknown in table"
REPLY_CAROL = "552 5.2.2 carol@example.org: mailbox full"


def recipient(
    address: str, reply: str | None, status: str | None, state: str = BOUNCED
) -> QueuedRecipient:
    return QueuedRecipient(address=address, state=state, last_reply=reply, status=status)


def message(
    *recipients: QueuedRecipient,
    mail_from: str = "alice@example.com",
    smtputf8: bool = False,
    is_bounce: bool = False,
    last_attempt: datetime | None = NOW - timedelta(minutes=3),
) -> QueuedMessage:
    copy = QueuedCopy(
        id=11,
        message_id=42,
        state=DONE,
        recipients=recipients,
        spool_name="42-11.eml",
        size=len(ORIGINAL),
        sha256="0" * 64,
        attempts=3,
        last_attempt=last_attempt,
    )
    return QueuedMessage(
        id=42,
        txn_id="sess.1",
        mail_from=mail_from,
        login="alice",
        created_at=ARRIVAL,
        expires_at=ARRIVAL + timedelta(days=5),
        smtputf8=smtputf8,
        is_bounce=is_bounce,
        copies=(copy,),
    )


BOB = recipient("bob@example.net", REPLY_BOB, "5.1.1")
CAROL = recipient("carol@example.org", REPLY_CAROL, "5.2.2")


def parse(data: bytes) -> EmailMessage:
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    assert not parsed.defects, parsed.defects
    return parsed


def parts(parsed: EmailMessage) -> list[EmailMessage]:
    return list(parsed.iter_parts())  # type: ignore[arg-type]


def status_blocks(parsed: EmailMessage) -> list[Message]:
    """The message/delivery-status part as the email package sees it: the per-message block
    first, then one block per recipient."""
    report = parts(parsed)[1]
    assert report.get_content_type() == "message/delivery-status"
    blocks = report.get_payload()
    assert isinstance(blocks, list)
    return blocks


def raw_part(data: bytes, index: int) -> bytes:
    """The body of part ``index`` exactly as written (no email-package decoding)."""
    boundary = re.search(rb'boundary="([^"]+)"', data)
    assert boundary is not None
    delimiter = b"\r\n--" + boundary.group(1)
    body = data.split(delimiter)[index + 1]
    return body.split(b"\r\n\r\n", 1)[1]


# --- RFC 3464 grammar ----------------------------------------------------------------------------

FIELD = re.compile(rb"^([\x21-\x39\x3b-\x7e]+):[ \t]*(.*)$")
STATUS = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")
TYPED = re.compile(r"^([A-Za-z0-9-]+);\s*(\S.*)$")
PER_MESSAGE = {"reporting-mta", "dsn-gateway", "received-from-mta", "arrival-date"}
PER_RECIPIENT = {
    "original-recipient",
    "final-recipient",
    "action",
    "status",
    "remote-mta",
    "diagnostic-code",
    "last-attempt-date",
    "final-log-id",
    "will-retry-until",
}


def check_rfc3464(body: bytes) -> list[dict[str, str]]:
    """Check a message/delivery-status body against RFC 3464 section 2 (fields unfolded; every
    field known or an X- extension, no duplicates; required fields present; typed values; dates
    parse; status and action valid); the blocks as dicts (lower-case names)."""
    assert body.isascii(), "message/delivery-status must be 7-bit"
    text = body.decode("ascii")
    assert "\n" not in text.replace("\r\n", ""), "bare LF"
    groups = [g for g in text.split("\r\n\r\n") if g.strip()]
    assert len(groups) >= 2, "a per-message group and at least one per-recipient group"
    blocks: list[dict[str, str]] = []
    for n, group in enumerate(groups):
        unfolded = re.sub(r"\r\n[ \t]+", " ", group.strip("\r\n"))
        fields: dict[str, str] = {}
        for line in unfolded.split("\r\n"):
            assert len(line) <= 998
            found = FIELD.match(line.encode())
            assert found, f"not a field: {line!r}"
            name = found.group(1).decode().lower()
            known = PER_MESSAGE if n == 0 else PER_RECIPIENT
            assert name in known or name.startswith("x-"), f"unknown field {name}"
            assert name not in fields, f"duplicate field {name}"
            fields[name] = found.group(2).decode().strip()
        blocks.append(fields)
    first, recipients = blocks[0], blocks[1:]
    assert TYPED.match(first["reporting-mta"]) and first["reporting-mta"].startswith("dns;")
    if "arrival-date" in first:
        parsedate_to_datetime(first["arrival-date"])
    for fields in recipients:
        for required in ("final-recipient", "action", "status"):
            assert required in fields, f"missing {required}"
        assert TYPED.match(fields["final-recipient"])
        assert fields["action"] in ("failed", "delayed", "delivered", "relayed", "expanded")
        assert STATUS.match(fields["status"]), fields["status"]
        if "diagnostic-code" in fields:
            assert TYPED.match(fields["diagnostic-code"])
        for date in ("last-attempt-date", "will-retry-until"):
            if date in fields:
                parsedate_to_datetime(fields[date])
    return blocks


def assert_wire_safe(data: bytes) -> None:
    assert not has_bare_newline_or_nul(data)
    assert data.endswith(b"\r\n")
    for line in data.split(b"\r\n"):
        assert len(line) <= 998


def bounce(*failed: QueuedRecipient, original: bytes | None = ORIGINAL, **kw: Any) -> bytes:
    return build_dsn(
        reporting_mta="gw.example.com",
        original=message(*failed, **kw),
        failed=list(failed),
        original_bytes=original,
        arrival=ARRIVAL,
        now=NOW,
    )


# --- structure -----------------------------------------------------------------------------------


def test_a_bounce_is_a_multipart_report_of_three_parts() -> None:
    data = bounce(BOB, CAROL)
    parsed = parse(data)
    assert parsed.get_content_type() == "multipart/report"
    assert parsed.get_param("report-type") == "delivery-status"
    assert [p.get_content_type() for p in parts(parsed)] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    assert parsed["MIME-Version"] == "1.0"


def test_top_headers_name_the_mailer_daemon_the_sender_and_auto_submitted() -> None:
    parsed = parse(bounce(BOB))
    assert parsed["From"].addresses[0].addr_spec == "MAILER-DAEMON@gw.example.com"
    assert parsed["From"].addresses[0].display_name == "Mail Delivery System"
    assert parsed["To"].addresses[0].addr_spec == "alice@example.com"
    assert parsed["Subject"] == FAILED_SUBJECT
    assert parsed["Auto-Submitted"] == "auto-replied"
    assert parsedate_to_datetime(parsed["Date"]) == NOW
    assert re.fullmatch(r"<[^<>@\s]+@gw\.example\.com>", parsed["Message-ID"])


def test_each_dsn_has_a_fresh_message_id() -> None:
    assert parse(bounce(BOB))["Message-ID"] != parse(bounce(BOB))["Message-ID"]


def test_crlf_only_and_no_line_beyond_998() -> None:
    data = bounce(BOB, CAROL)
    assert_wire_safe(data)
    assert data.isascii()
    assert envelope_flags(data) == (False, False)


# --- the human-readable part -----------------------------------------------------------------------


def test_the_text_part_names_each_recipient_with_the_upstream_reply() -> None:
    text = parts(parse(bounce(BOB, CAROL)))[0].get_content()
    assert "could not be delivered" in text
    assert "permanent" in text
    unwrapped = " ".join(text.split())
    assert f"<bob@example.net>: {REPLY_BOB}" in unwrapped
    assert f"<carol@example.org>: {REPLY_CAROL}" in unwrapped
    assert "Subject: Quarterly réport" in unwrapped
    assert "Message-ID: <orig-1@example.com>" in unwrapped
    assert "Queue ID: 42" in unwrapped
    assert "Transaction: sess.1" in unwrapped


def test_a_recipient_refused_at_relay_time_is_bounced_without_a_queue_id() -> None:
    """Gateway.bounce: refused for good while the others were relayed, nothing queued (id 0):
    no "Queue ID: 0", but the transaction's id (log and audit) in both parts."""
    data = build_dsn(
        reporting_mta="gw.example.com",
        original=replace(message(BOB), id=0, txn_id="3f2a9c1e7b4d5a60.2"),
        failed=[BOB],
        original_bytes=ORIGINAL,
        arrival=ARRIVAL,
        now=NOW,
    )
    text = " ".join(parts(parse(data))[0].get_content().split())
    assert "Queue ID" not in text
    assert "Transaction: 3f2a9c1e7b4d5a60.2" in text
    first = check_rfc3464(raw_part(data, 1))[0]
    assert "x-mailward-queue-id" not in first
    assert first["x-mailward-transaction-id"] == "3f2a9c1e7b4d5a60.2"


# --- the delivery-status part ----------------------------------------------------------------------


def test_per_message_and_per_recipient_fields() -> None:
    data = bounce(BOB, CAROL)
    blocks = check_rfc3464(raw_part(data, 1))
    assert blocks[0]["reporting-mta"] == "dns; gw.example.com"
    assert parsedate_to_datetime(blocks[0]["arrival-date"]) == ARRIVAL
    assert blocks[0]["x-mailward-queue-id"] == "42"
    assert blocks[0]["x-mailward-transaction-id"] == "sess.1"
    bob, carol = blocks[1:]
    assert bob["final-recipient"] == "rfc822; bob@example.net"
    assert bob["action"] == "failed"
    assert bob["status"] == "5.1.1"
    assert bob["diagnostic-code"] == f"smtp; {REPLY_BOB}"
    assert parsedate_to_datetime(bob["last-attempt-date"]) == NOW - timedelta(minutes=3)
    assert "will-retry-until" not in bob
    assert carol["final-recipient"] == "rfc822; carol@example.org"
    assert carol["status"] == "5.2.2"
    assert carol["diagnostic-code"] == f"smtp; {REPLY_CAROL}"


def test_the_email_package_reads_the_same_fields() -> None:
    blocks = status_blocks(parse(bounce(BOB, CAROL)))
    assert len(blocks) == 3
    assert blocks[0]["Reporting-MTA"] == "dns; gw.example.com"
    assert [b["Final-Recipient"] for b in blocks[1:]] == [
        "rfc822; bob@example.net",
        "rfc822; carol@example.org",
    ]
    assert [b["Action"] for b in blocks[1:]] == ["failed", "failed"]


@pytest.mark.parametrize(
    ("status", "reply", "expected"),
    [
        ("5.1.1", "550 5.1.1 no such user", "5.1.1"),
        (None, "554 5.7.1 relay denied", "5.7.1"),  # taken from the reply
        (None, "550 no enhanced code", "5.0.0"),
        ("4.4.1", "451 4.4.1 connection lost", "5.4.7"),  # lifetime ran out on a 4xx
        (None, "connect to upstream: Connection refused", "5.0.0"),
        ("bogus", None, "5.0.0"),
    ],
)
def test_a_failed_recipient_always_gets_a_class_5_status(
    status: str | None, reply: str | None, expected: str
) -> None:
    blocks = check_rfc3464(raw_part(bounce(recipient("bob@example.net", reply, status)), 1))
    assert blocks[1]["status"] == expected


def test_a_reply_that_is_not_smtp_is_an_extension_diagnostic() -> None:
    failed = recipient("bob@example.net", "connect to upstream: Connection refused", None)
    blocks = check_rfc3464(raw_part(bounce(failed), 1))
    assert blocks[1]["diagnostic-code"] == "X-Mailward; connect to upstream: Connection refused"


def test_the_failing_attempt_of_a_recipient_dates_it() -> None:
    failed = replace(BOB, updated_at=NOW - timedelta(seconds=1))
    blocks = check_rfc3464(raw_part(bounce(failed), 1))
    assert parsedate_to_datetime(blocks[1]["last-attempt-date"]) == NOW - timedelta(seconds=1)


def test_no_reply_no_diagnostic_and_no_attempt_no_date() -> None:
    failed = recipient("bob@example.net", None, "5.0.0")
    blocks = check_rfc3464(raw_part(bounce(failed, last_attempt=None), 1))
    assert "diagnostic-code" not in blocks[1]
    assert "last-attempt-date" not in blocks[1]


def test_a_long_reply_is_folded_and_unfolds_to_the_original() -> None:
    reply = "550 5.7.1 " + " ".join(f"word{i}" for i in range(60))
    data = bounce(recipient("bob@example.net", reply, "5.7.1"))
    assert_wire_safe(data)
    assert max(len(line) for line in raw_part(data, 1).split(b"\r\n")) <= 78
    assert check_rfc3464(raw_part(data, 1))[1]["diagnostic-code"] == f"smtp; {reply}"


# --- the original's headers ------------------------------------------------------------------------


def test_the_original_headers_are_attached_and_the_body_is_not() -> None:
    data = bounce(BOB)
    attached = parts(parse(data))[2]
    headers = attached.get_content()
    assert "Message-ID: <orig-1@example.com>" in headers
    assert "Subject: =?utf-8?q?Quarterly_r=C3=A9port?=" in headers
    assert "Received: from client.example.com" in headers
    assert BODY_MARKER not in data
    assert b"Hello Bob" not in data


def test_without_the_original_bytes_the_report_has_two_parts() -> None:
    data = bounce(BOB, original=None)
    parsed = parse(data)
    assert [p.get_content_type() for p in parts(parsed)] == [
        "text/plain",
        "message/delivery-status",
    ]
    assert "no longer available" in parts(parsed)[0].get_content()
    check_rfc3464(raw_part(data, 1))


def test_8bit_headers_of_a_7bit_message_are_quoted_printable() -> None:
    original = b"From: a@example.com\r\nSubject: caf\xe9 latin-1\r\n\r\nbody\r\n"
    data = bounce(BOB, original=original)
    assert data.isascii()
    attached = parts(parse(data))[2]
    assert attached.get_content_type() == "text/rfc822-headers"
    assert attached["Content-Transfer-Encoding"] == "quoted-printable"
    assert (
        attached.get_payload(decode=True) == b"From: a@example.com\r\nSubject: caf\xe9 latin-1\r\n"
    )


def test_a_boundary_that_occurs_in_the_content_is_never_used(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tokens = iter(["a" * 24, "b" * 24])
    monkeypatch.setattr(dsn.secrets, "token_hex", lambda n=None: next(tokens, "c" * 24))
    original = b"Subject: x\r\nX-Trap: --=_mailward_dsn_" + b"a" * 24 + b"\r\n\r\nbody\r\n"
    data = bounce(BOB, original=original)
    assert b'boundary="=_mailward_dsn_' + b"a" * 24 not in data
    assert len(parts(parse(data))) == 3


# --- header injection ------------------------------------------------------------------------------

HOSTILE_REPLY = (
    "550 5.1.1 no\r\nX-Injected: reply\r\n\r\nFinal-Recipient: rfc822; fake@evil.test\r\n"
    "--=_mailward_dsn_x\n\x00\x1b[31m"
)


def test_a_hostile_reply_cannot_add_fields_or_recipients() -> None:
    data = bounce(recipient("bob@example.net", HOSTILE_REPLY, "5.1.1"))
    assert_wire_safe(data)
    blocks = check_rfc3464(raw_part(data, 1))
    assert len(blocks) == 2
    assert set(blocks[1]) == {
        "final-recipient",
        "action",
        "status",
        "diagnostic-code",
        "last-attempt-date",
    }
    assert blocks[1]["final-recipient"] == "rfc822; bob@example.net"
    assert "\x1b" not in data.decode()
    assert len(status_blocks(parse(data))) == 2


def test_a_hostile_sender_or_recipient_cannot_add_headers() -> None:
    hostile_rcpt = recipient("bob@example.net\r\nBcc: victim@example.org", REPLY_BOB, "5.1.1")
    data = bounce(hostile_rcpt, mail_from="alice@example.com\r\nBcc: victim@example.org")
    assert_wire_safe(data)
    parsed = parse(data)
    assert parsed["Bcc"] is None
    assert len(parsed.get_all("To") or []) == 1
    blocks = check_rfc3464(raw_part(data, 1))
    assert len(blocks) == 2
    assert "bcc" not in blocks[1]
    assert not any(line.startswith(b"Bcc:") for line in data.split(b"\r\n"))


def test_a_hostile_subject_cannot_break_the_text_part() -> None:
    original = (
        b"Subject: =?utf-8?b?"
        + base64.b64encode(b"hi\r\n--=_mailward_dsn_x\r\nContent-Type: text/html")
        + b"?=\r\n\r\nbody\r\n"
    )
    data = bounce(BOB, original=original)
    assert_wire_safe(data)
    text = parts(parse(data))[0].get_content()
    assert "\nContent-Type: text/html" not in text
    assert len(parts(parse(data))) == 3


# --- SMTPUTF8 --------------------------------------------------------------------------------------


def test_xtext_form_of_an_address() -> None:
    expected = "j\\x{F6}e\\x{2B}tag\\x{3D}x@b\\x{FC}cher.example"
    assert xtext_address("jöe+tag=x@bücher.example") == expected
    assert typed_address("bob@example.net") == "rfc822; bob@example.net"
    assert typed_address("δοκιμή@παράδειγμα.δοκιμή").startswith("utf-8; \\x{3B4}")


def decode_xtext(value: str) -> str:
    return re.sub(r"\\x\{([0-9A-F]+)\}", lambda m: chr(int(m.group(1), 16)), value)


def test_a_non_ascii_recipient_gets_the_utf8_type_in_a_7bit_report() -> None:
    address = "jörg@bücher.example"
    data = bounce(recipient(address, REPLY_BOB, "5.1.1"), smtputf8=True)
    report = raw_part(data, 1)
    blocks = check_rfc3464(report)
    kind, value = blocks[1]["final-recipient"].split("; ", 1)
    assert kind == "utf-8"
    assert value.isascii()
    assert decode_xtext(value) == address
    assert address in parts(parse(data))[0].get_content()


def test_a_non_ascii_sender_gets_a_utf8_dsn_with_global_headers() -> None:
    sender = "ålice@exämple.com"
    original = f"From: {sender}\r\nSubject: grüße\r\n\r\nbody\r\n".encode()
    data = bounce(BOB, mail_from=sender, smtputf8=True, original=original)
    assert_wire_safe(data)
    assert envelope_flags(data) == (True, True)
    parsed = parse(data)
    # RFC 6532 header in raw UTF-8: the bytes parser keeps it surrogate-escaped, the text parser
    # reads it as it is
    as_text = email.message_from_string(data.decode("utf-8"), policy=email.policy.default)
    assert as_text["To"].addresses[0].addr_spec == sender
    attached = parts(parsed)[2]
    assert attached.get_content_type() == "message/global-headers"
    assert attached["Content-Transfer-Encoding"] == "8bit"
    assert raw_part(data, 2) == f"From: {sender}\r\nSubject: grüße\r\n".encode()
    assert raw_part(data, 1).isascii()


def test_a_huge_non_ascii_address_stays_within_line_limits() -> None:
    data = bounce(recipient("ü" * 2000 + "@example.net", REPLY_BOB, "5.1.1"), smtputf8=True)
    assert_wire_safe(data)
    check_rfc3464(raw_part(data, 1))


# --- warning ---------------------------------------------------------------------------------------


def test_the_warning_variant_says_delayed_and_until_when() -> None:
    waiting = recipient("bob@example.net", "451 4.2.2 mailbox busy", "4.2.2", state=PENDING)
    original = message(waiting)
    data = build_dsn(
        reporting_mta="gw.example.com",
        original=original,
        failed=[waiting],
        original_bytes=ORIGINAL,
        warning=True,
        arrival=ARRIVAL,
        now=NOW,
    )
    assert_wire_safe(data)
    parsed = parse(data)
    assert parsed["Subject"] == DELAYED_SUBJECT
    assert parsed["Auto-Submitted"] == "auto-replied"
    blocks = check_rfc3464(raw_part(data, 1))
    assert blocks[1]["action"] == "delayed"
    assert blocks[1]["status"] == "4.2.2"
    assert parsedate_to_datetime(blocks[1]["will-retry-until"]) == original.expires_at
    text = " ".join(parts(parsed)[0].get_content().split())
    assert "keeps trying" in text
    assert "do not need to send it again" in text


def test_a_warning_never_carries_a_permanent_status() -> None:
    waiting = recipient("bob@example.net", "550 5.1.1 odd", "5.1.1", state=PENDING)
    data = build_dsn(
        reporting_mta="gw.example.com",
        original=message(waiting),
        failed=[waiting],
        original_bytes=None,
        warning=True,
        arrival=ARRIVAL,
        now=NOW,
    )
    assert check_rfc3464(raw_part(data, 1))[1]["status"] == "4.0.0"


# --- refusals ---------------------------------------------------------------------------------------


def test_no_dsn_to_the_null_sender_or_without_recipients() -> None:
    with pytest.raises(ValueError, match="envelope sender"):
        bounce(BOB, mail_from="")
    with pytest.raises(ValueError, match="recipient"):
        build_dsn(
            reporting_mta="gw.example.com",
            original=message(BOB),
            failed=[],
            original_bytes=None,
            arrival=ARRIVAL,
            now=NOW,
        )


def test_may_bounce_an_ordinary_message() -> None:
    assert may_bounce(message(BOB))
    assert may_bounce(message(BOB), ORIGINAL)
    assert may_bounce(message(BOB), b"Auto-Submitted: no\r\n\r\nbody\r\n")
    assert may_bounce(message(BOB), b"Auto-Submitted: No (a person wrote this)\r\n\r\nx\r\n")


def test_never_a_bounce_for_a_bounce_or_the_null_sender() -> None:
    assert not may_bounce(message(BOB, is_bounce=True))
    assert not may_bounce(replace(message(BOB), mail_from=""))
    assert not may_bounce(replace(message(BOB), mail_from="<>"))


@pytest.mark.parametrize(
    "value", ["auto-replied", "auto-generated", "Auto-Generated; owner-email=x@y", "auto-notified"]
)
def test_never_a_bounce_for_auto_submitted_mail(value: str) -> None:
    original = f"Auto-Submitted: {value}\r\nSubject: x\r\n\r\nbody\r\n".encode()
    assert not may_bounce(message(BOB), original)
