"""``gateway.cli.common``'s terminal-safe printing: what is escaped, what is left alone."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from gateway.cli.common import format_fields, print_table, printable

BIDI = [*range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x061C, 0x200E, 0x200F]
UNSAFE = [*range(0x00, 0x09), *range(0x0A, 0x20), 0x7F, *range(0x80, 0xA0), 0x2028, 0x2029, *BIDI]


@pytest.mark.parametrize("code", UNSAFE)
def test_control_and_bidi_characters_are_escaped_visibly(code: int) -> None:
    escaped = f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
    assert printable(f"a{chr(code)}b") == f"a{escaped}b"


def test_ordinary_text_is_unchanged_and_escaping_is_idempotent() -> None:
    text = "Grüße, 東京 <ali.ce+tag@exämple.com> 250 2.0.0 Ok \\ back\\slash 😀"
    assert printable(text) == text
    once = printable("x\x1b[2J\r\u202ey")
    assert once == "x\\x1b[2J\\x0d\\u202ey"
    assert printable(once) == once


def test_tabs_are_escaped_unless_kept() -> None:
    assert printable("a\tb") == "a\\x09b"
    assert printable("a\tb\x1b", keep_tabs=True) == "a\tb\\x1b"


def test_fields_and_table_cells_are_escaped(capsys: pytest.CaptureFixture[str]) -> None:
    at = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)
    pairs = [("helo", "h\x1b]0;pwned\x07"), ("none", None), ("yes", True), ("at", at)]
    assert format_fields(pairs) == [
        "  helo:           h\\x1b]0;pwned\\x07",
        "  none:           -",
        "  yes:            yes",
        "  at:             2026-12-01T10:00:00+00:00",
    ]
    print_table([("A", "B"), ("x\u202e", "y\r")])
    out = capsys.readouterr().out
    assert out == "A        B\nx\\u202e  y\\x0d\n"
