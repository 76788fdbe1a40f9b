"""Wire-level helpers for the upstream client: SMTP paths, DATA transparency, TLS context.

What it does: :func:`smtp_path` turns an envelope address into the ``<...>`` path put on a MAIL/RCPT
command line, refusing anything that could smuggle parameters or commands; :func:`dot_stuff` turns
message bytes into the DATA payload (RFC 5321 4.5.2 transparency plus the ``.CRLF`` terminator);
:func:`client_tls_context` builds the client-side TLS context from ``[relay]``.

Reads: the CA bundle named by ``relay.ca_file`` (once, when the context is built).

Security notes: the DATA payload never contains a bare CR or bare LF (they would let a crafted
message end DATA early at an upstream that accepts bare LF: "SMTP smuggling"); the SMTP layer
guarantees CRLF content, and :func:`dot_stuff` normalises defensively if it ever is not.
Certificate verification is on unless ``verify_certificate = false``; TLS below 1.2 is never
negotiated.
"""

from __future__ import annotations

import re
import ssl

from gateway.config.schema import RelayConfig
from gateway.core.errors import ConfigError
from gateway.core.message import has_bare_newline_or_nul, normalize_line_endings

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_QUOTED_LOCAL_PART = re.compile(r'^"(?:[^"\\]|\\.)*"')
_UNSAFE_UNQUOTED = re.compile(r"[\s<>]")


class AddressError(ValueError):
    """An address that cannot go on a command line (``non_ascii``: only for lack of SMTPUTF8)."""

    def __init__(self, message: str, *, non_ascii: bool = False) -> None:
        super().__init__(message)
        self.non_ascii = non_ascii


def smtp_path(address: str, *, smtputf8: bool) -> bytes:
    """``<address>`` as bytes for MAIL FROM / RCPT TO; ``""`` gives the null path ``<>``.

    Raises :class:`AddressError` for control characters, whitespace or angle brackets outside a
    quoted local part, and for non-ASCII without SMTPUTF8.
    """
    if _CONTROL.search(address):
        raise AddressError("address contains control characters")
    if _UNSAFE_UNQUOTED.search(_QUOTED_LOCAL_PART.sub("", address, count=1)):
        raise AddressError("address contains whitespace or angle brackets")
    if not smtputf8 and not address.isascii():
        raise AddressError("non-ASCII address without SMTPUTF8", non_ascii=True)
    return b"<" + address.encode("utf-8") + b">"


def dot_stuff(content: bytes) -> bytes:
    """The DATA payload for ``content`` (CRLF lines, not yet dot-stuffed), terminator included.

    Every line starting with ``.`` gets one more ``.``; the payload ends with ``CRLF.CRLF``. A
    bare CR or LF (never produced by the SMTP layer) becomes CRLF so it cannot end DATA early; a
    missing final CRLF is added. For CRLF content the upstream, after un-stuffing, stores exactly
    ``content``.
    """
    if has_bare_newline_or_nul(content):
        content = normalize_line_endings(content)
    if content and not content.endswith(b"\r\n"):
        content += b"\r\n"
    # CRLF content: a line starts after each CRLF (and at the very start)
    stuffed = content.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    return stuffed + b".\r\n"


def client_tls_context(config: RelayConfig) -> ssl.SSLContext:
    """TLS client context per ``relay.verify_certificate`` / ``relay.ca_file`` (TLS 1.2 minimum).

    Raises ConfigError when the CA bundle cannot be loaded.
    """
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=config.ca_file or None)
    except (OSError, ssl.SSLError) as exc:
        problem = getattr(exc, "strerror", None) or str(exc)
        raise ConfigError("", "relay.ca_file", f"cannot load CA bundle: {problem}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if not config.verify_certificate:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
