"""Wire helpers of the relay: DATA transparency, SMTP paths, the client TLS context."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from gateway.config.schema import RelayConfig
from gateway.core.errors import ConfigError
from gateway.relay.wire import AddressError, client_tls_context, dot_stuff, smtp_path


@pytest.mark.parametrize(
    ("content", "payload"),
    [
        (b"a\r\n", b"a\r\n.\r\n"),
        (b".a\r\n.\r\n..\r\nb.c\r\n", b"..a\r\n..\r\n...\r\nb.c\r\n.\r\n"),
        (b"", b".\r\n"),
        (b"no final newline", b"no final newline\r\n.\r\n"),
    ],
)
def test_dot_stuff(content: bytes, payload: bytes) -> None:
    assert dot_stuff(content) == payload


def test_dot_stuff_never_lets_a_bare_lf_end_data_early() -> None:
    payload = dot_stuff(b"a\n.\nsmuggled\r\n")

    assert payload == b"a\r\n..\r\nsmuggled\r\n.\r\n"
    assert payload.count(b"\r\n.\r\n") == 1
    assert payload.endswith(b"\r\n.\r\n")


@pytest.mark.parametrize(
    ("address", "smtputf8", "wire"),
    [
        ("a@b.test", False, b"<a@b.test>"),
        ("", False, b"<>"),
        ('"john doe"@b.test', False, b'<"john doe"@b.test>'),
        ("jörg@exämple.de", True, "<jörg@exämple.de>".encode()),
    ],
)
def test_smtp_path(address: str, smtputf8: bool, wire: bytes) -> None:
    assert smtp_path(address, smtputf8=smtputf8) == wire


@pytest.mark.parametrize(
    ("address", "non_ascii"),
    [
        ("a@b.test> SIZE=1", False),
        ("a b@c.test", False),
        ("a@b.test\r\nRSET", False),
        ("a\x00@b.test", False),
        ("jörg@b.test", True),
    ],
)
def test_smtp_path_refuses_unsafe_addresses(address: str, non_ascii: bool) -> None:
    with pytest.raises(AddressError) as info:
        smtp_path(address, smtputf8=False)

    assert info.value.non_ascii is non_ascii


def test_tls_context_verifies_by_default() -> None:
    ctx = client_tls_context(RelayConfig())

    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.check_hostname
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2


def test_tls_context_without_verification() -> None:
    ctx = client_tls_context(RelayConfig(verify_certificate=False))

    assert ctx.verify_mode == ssl.CERT_NONE
    assert not ctx.check_hostname


def test_missing_ca_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        client_tls_context(RelayConfig(ca_file=str(tmp_path / "missing.pem")))

    assert info.value.key == "relay.ca_file"
