"""``UpstreamReply.parse``: enhanced status split and queue id extraction from real-world replies.

What it tests: the split of an upstream's reply text into RFC 3463 status and text, white-space
folding of multi-line replies, the ok/temporary classes, ``str()``, and the queue id found in
typical end-of-data replies (Postfix, the aiosmtpd-based capture upstream, Exim) or not found (plain
"OK").

Reads: nothing.

Security notes: none (the text is sanitised where it is put on the wire, see test_replies.py).
"""

from __future__ import annotations

import pytest

from gateway.core.ports import UpstreamReply


@pytest.mark.parametrize(
    ("code", "message", "status", "text"),
    [
        (250, "2.0.0 Ok: queued as 4WdGqZ3Z5Tz9sWR", "2.0.0", "Ok: queued as 4WdGqZ3Z5Tz9sWR"),
        (250, "2.1.5 Ok", "2.1.5", "Ok"),
        (
            550,
            "5.7.1 <x@y.example>: Relay access denied",
            "5.7.1",
            "<x@y.example>: Relay access denied",
        ),
        (451, "4.3.0 Error: queue file write error", "4.3.0", "Error: queue file write error"),
        (554, "5.7.11 Encryption required", "5.7.11", "Encryption required"),
        (250, "2.0.0", "2.0.0", ""),
        (250, "OK", "", "OK"),  # aiosmtpd's default end-of-data reply
        (250, "Ok 2.0.0 later in the text", "", "Ok 2.0.0 later in the text"),
        (250, "2.0.0Ok", "", "2.0.0Ok"),  # not followed by a word boundary: not a status
        (250, "7.0.0 not a class", "", "7.0.0 not a class"),
        (250, "", "", ""),
    ],
)
def test_parse_splits_enhanced_status(code: int, message: str, status: str, text: str) -> None:
    reply = UpstreamReply.parse(code, message)
    assert (reply.code, reply.status, reply.text) == (code, status, text)


def test_parse_folds_multi_line_text() -> None:
    reply = UpstreamReply.parse(250, "2.0.0 Ok:\n  queued as\tABC123  \r\n")
    assert reply.status == "2.0.0"
    assert reply.text == "Ok: queued as ABC123"


@pytest.mark.parametrize(
    ("message", "queue_id"),
    [
        ("2.0.0 Ok: queued as 4WdGqZ3Z5Tz9sWR", "4WdGqZ3Z5Tz9sWR"),  # Postfix (long ids)
        ("2.0.0 Ok: queued as 3F2A61C0A4", "3F2A61C0A4"),  # Postfix (short ids)
        ("2.0.0 Ok: queued as A1B2C3D4E5F6", "A1B2C3D4E5F6"),  # gateway/smtp/capture.py (aiosmtpd)
        ("OK id=1rXyZq-000AbC-7h", "1rXyZq-000AbC-7h"),  # Exim
        ("OK", None),  # aiosmtpd default handler
        ("2.0.0 Message accepted for delivery", None),
        ("2.0.0 Ok: queued as", None),
    ],
)
def test_queue_id(message: str, queue_id: str | None) -> None:
    assert UpstreamReply.parse(250, message).queue_id == queue_id


@pytest.mark.parametrize(
    ("code", "ok", "temporary"),
    [
        (250, True, False),
        (354, True, False),
        (421, False, True),
        (452, False, True),
        (554, False, False),
    ],
)
def test_classes(code: int, ok: bool, temporary: bool) -> None:
    reply = UpstreamReply.parse(code, "text")
    assert (reply.ok, reply.temporary) == (ok, temporary)


def test_str_renders_the_parts_present() -> None:
    assert str(UpstreamReply.parse(250, "2.0.0 Ok: queued as X1")) == "250 2.0.0 Ok: queued as X1"
    assert str(UpstreamReply.parse(250, "OK")) == "250 OK"
    assert str(UpstreamReply.parse(250, "")) == "250"
