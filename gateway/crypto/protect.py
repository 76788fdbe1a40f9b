"""Header protection (RFC 9788) and the MIME byte surgery shared by PGP/MIME and S/MIME.

What it does: :func:`protect` cuts a received message into the two pieces both formats need, by
slicing bytes (nothing goes through the ``email`` package's serialiser, so parts, attachments,
charsets and transfer encodings stay exactly as received):

* the **inner entity** (the Cryptographic Payload that gets encrypted): the original ``Content-*``
  header fields, the first ``Content-Type`` marked ``hp="cipher"`` (RFC 9788) and
  ``protected-headers="v1"`` (the earlier "protected headers" draft that Enigmail and Thunderbird
  read, so their users see the real Subject too), then a copy of every other header field of the
  message (Subject, From, To, Cc, Date, Message-ID, Reply-To, References...), then one ``HP-Outer``
  field per header field left outside, then the original body bytes;
* the **outer header section**: the original header fields minus the ``Content-*`` and
  ``MIME-Version`` fields (the format adds its own), with the Header Confidentiality Policy applied:
  RFC 9788's ``hcp_baseline``, i.e. every ``Subject`` replaced by a placeholder (``"..."`` by
  default, the issue's choice; RFC 9788's examples use ``"[...]"``; configurable) and ``Keywords`` and
  ``Comments`` removed. From/To/Cc/Date/Message-ID stay outside (delivery, threading, the recipient's
  MUA needs them before decrypting); :class:`HeaderProtection` refuses to remove them.

Choices, documented here as the issue asks:

* HP-Outer: RFC 9788 asks an encrypting MUA to record the outer fields inside, so a recipient can
  tell which fields were confidential and detect tampering of the outer ones. We add one
  ``HP-Outer: Name: value`` per outer field that was considered by the policy (the placeholder
  Subject included; the removed Keywords/Comments are, by design, absent).
* No Legacy Display Element: RFC 9788 makes it optional; adding one means rewriting the first text
  part, which would break "the original body bytes as received" (and any signature inside). A
  legacy client that decrypts shows the placeholder Subject and the intact body.
* Not copied inside: trace fields (``Received``, ``Return-Path``), transport signatures and results
  (``DKIM-Signature``, ``ARC-*``, ``Authentication-Results``), any pre-existing ``HP-Outer``, and
  ``Bcc``/``Resent-Bcc`` (a Bcc field inside a ciphertext could not be removed by the upstream MSA
  the way it removes the outer one). These stay outside exactly as received.
* A message without ``Content-Type`` gets ``text/plain; charset=us-ascii`` (the RFC 2045 default)
  inside, so the ``hp`` parameter has a place.

:func:`is_encrypted` tells whether a message is already encrypted (top-level ``multipart/encrypted``,
or ``application/pkcs7-mime`` with ``smime-type`` enveloped-data / authEnveloped-data): such a
message passes unchanged.

Reads: the message bytes it is given. Writes nothing; logs nothing.

Security notes: lines are CRLF on input (the gateway has refused or normalised bare CR/LF before
any check runs; :func:`protect` normalises again if it finds any) and CRLF on output. The placeholder
is validated (printable, one line) and RFC 2047-encoded when not ASCII, so a policy value can never
inject a header line. An ``application/pkcs7-mime`` without ``smime-type`` is *not* treated as
encrypted (it may be signed-data, i.e. readable): when in doubt we encrypt again.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from email.header import Header
from email.message import Message

from gateway.core.message import has_bare_newline_or_nul, header_block, normalize_line_endings

CRLF = b"\r\n"
HP_PARAMETERS = b'hp="cipher"; protected-headers="v1"'
DEFAULT_PLACEHOLDER = "..."
HCP_BASELINE_REMOVED = frozenset({"keywords", "comments"})

# Fields that must stay visible outside: delivery, threading, display before decryption.
KEPT_OUTSIDE = frozenset({"from", "sender", "to", "cc", "date", "message-id", "subject"})
# Fields never copied into the protected header section (they stay outside as received).
NOT_COPIED = frozenset(
    {
        "received",
        "return-path",
        "bcc",
        "resent-bcc",
        "dkim-signature",
        "arc-seal",
        "arc-message-signature",
        "arc-authentication-results",
        "authentication-results",
        "hp-outer",
    }
)
ENCRYPTED_SMIME_TYPES = frozenset({"enveloped-data", "authenveloped-data"})
PKCS7_MIME_TYPES = frozenset({"application/pkcs7-mime", "application/x-pkcs7-mime"})

_FIELD_NAME = re.compile(r"[!-9;-~]+")  # RFC 5322 ftext: printable ASCII except colon
# A quoted string (kept as is) or an existing hp / protected-headers parameter (dropped).
_HP_PARAM = re.compile(
    rb'("(?:[^"\\]|\\.)*")|;\s*(?:hp|protected-headers)\s*=\s*(?:"(?:[^"\\]|\\.)*"|[^;\s"]*)',
    re.IGNORECASE,
)
_MAX_PLACEHOLDER = 200


def _is_structural(name: str) -> bool:
    return name.startswith("content-") or name == "mime-version"


@dataclass(frozen=True, slots=True)
class HeaderField:
    """One header field as received: ``name`` lower-cased ("" for a line that is not a field)."""

    name: str
    raw: bytes  # name, colon, value, continuation lines, final CRLF

    def value(self) -> str:
        """The unfolded value (after the colon), decoded with surrogateescape."""
        _, _, value = self.raw.partition(b":")
        text = value.decode("utf-8", "surrogateescape")
        return re.sub(r"\r\n(?=[ \t])", "", text).strip()


@dataclass(frozen=True, slots=True)
class HeaderProtection:
    """The Header Confidentiality Policy: the outer Subject placeholder and the fields removed outside.

    The default is RFC 9788's ``hcp_baseline`` with the issue's ``"..."`` placeholder."""

    placeholder_subject: str = DEFAULT_PLACEHOLDER
    removed: frozenset[str] = HCP_BASELINE_REMOVED
    _placeholder_field: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        text = self.placeholder_subject
        if not text.strip() or not text.isprintable() or len(text) > _MAX_PLACEHOLDER:
            raise ValueError("placeholder subject must be one printable line of 1-200 characters")
        for name in self.removed:
            if name != name.lower() or not _FIELD_NAME.fullmatch(name):
                raise ValueError(f"removed field {name!r} must be a lower-case field name")
            if name in KEPT_OUTSIDE or _is_structural(name):
                raise ValueError(f"field {name!r} cannot be removed from the outer header")
        if text.isascii():
            encoded = text.encode("ascii")
        else:
            encoded = Header(text, "utf-8").encode().replace("\n", "\r\n").encode("ascii")
        object.__setattr__(self, "_placeholder_field", b"Subject: " + encoded + CRLF)

    @property
    def placeholder_field(self) -> bytes:
        """The outer ``Subject:`` field (CRLF-terminated)."""
        return self._placeholder_field


DEFAULT_PROTECTION = HeaderProtection()


@dataclass(frozen=True, slots=True)
class Protected:
    """:func:`protect`'s result: the outer header fields (no blank line) and the inner entity."""

    outer_headers: bytes
    inner_entity: bytes


def split_message(message: bytes) -> tuple[list[HeaderField], bytes]:
    """The header fields and the body bytes (after the blank line), sliced, never re-serialised.

    A message without a blank line is all header (its body is empty)."""
    if message.startswith(CRLF):
        return [], message[2:]
    end = message.find(b"\r\n\r\n")
    if end < 0:
        head = message if message.endswith(CRLF) else message + CRLF
        body = b""
    else:
        head, body = message[: end + 2], message[end + 4 :]
    fields: list[HeaderField] = []
    for line in head[:-2].split(CRLF):
        raw = line + CRLF
        if line[:1] in (b" ", b"\t") and fields:
            previous = fields[-1]
            fields[-1] = HeaderField(previous.name, previous.raw + raw)
            continue
        name_bytes, colon, _ = line.partition(b":")
        name = name_bytes.rstrip(b" \t").decode("ascii", "replace").lower() if colon else ""
        fields.append(HeaderField(name if _FIELD_NAME.fullmatch(name) else "", raw))
    return fields, body


def protect(message: bytes, protection: HeaderProtection = DEFAULT_PROTECTION) -> Protected:
    """Split ``message`` into the protected inner entity and the obscured outer header fields."""
    if has_bare_newline_or_nul(message):
        message = normalize_line_endings(message)
    fields, body = split_message(message)
    outer: list[bytes] = []
    content: list[HeaderField] = []
    copied: list[bytes] = []
    hp_outer: list[bytes] = []
    for hfield in fields:
        name = hfield.name
        if not name or name in NOT_COPIED:
            outer.append(hfield.raw)
            continue
        if _is_structural(name):
            if name != "mime-version":
                content.append(hfield)
            continue
        copied.append(hfield.raw)
        if name in protection.removed:
            continue
        shown = protection.placeholder_field if name == "subject" else hfield.raw
        outer.append(shown)
        hp_outer.append(b"HP-Outer: " + shown)
    inner_headers = _mark_content_type(content) + copied + hp_outer
    return Protected(b"".join(outer), b"".join(inner_headers) + CRLF + body)


def assemble(outer_headers: bytes, mime_fields: Sequence[bytes], body: bytes) -> bytes:
    """The outgoing message: outer fields, ``MIME-Version``, the format's own fields, body."""
    return outer_headers + b"MIME-Version: 1.0\r\n" + b"".join(mime_fields) + CRLF + body


def new_boundary() -> str:
    """A multipart boundary that cannot occur in base64 or ASCII armor (it contains ``=_``)."""
    return "=_mailward_" + secrets.token_hex(16)


def is_encrypted(message: bytes) -> bool:
    """True for a top-level ``multipart/encrypted`` or an enveloped ``application/pkcs7-mime``."""
    fields, _ = split_message(header_block(message))
    types = [f for f in fields if f.name == "content-type"]
    if len(types) != 1:
        return False
    parsed = Message()
    parsed["Content-Type"] = types[0].value()
    content_type = parsed.get_content_type()
    if content_type == "multipart/encrypted":
        return True
    if content_type in PKCS7_MIME_TYPES:
        smime_type = parsed.get_param("smime-type")
        return isinstance(smime_type, str) and smime_type.lower() in ENCRYPTED_SMIME_TYPES
    return False


def _mark_content_type(content: list[HeaderField]) -> list[bytes]:
    """The Content-* fields with ``hp="cipher"`` on the first Content-Type (one is added if none)."""
    raws = [hfield.raw for hfield in content]
    for index, hfield in enumerate(content):
        if hfield.name == "content-type":
            value = _HP_PARAM.sub(_keep_quoted, hfield.raw).rstrip(b"\r\n \t")
            if value.endswith(b";"):
                value = value[:-1]
            raws[index] = value + b";\r\n " + HP_PARAMETERS + CRLF
            return raws
    return [b"Content-Type: text/plain; charset=us-ascii;\r\n " + HP_PARAMETERS + CRLF, *raws]


def _keep_quoted(match: re.Match[bytes]) -> bytes:
    return match.group(1) or b""
