"""Delivery status notifications (bounces and delay warnings), RFC 3464, and who may get one.

What it does: :func:`build_dsn` writes the complete DSN message (CRLF line endings) the queue runner
sends, with the null reverse-path, to the envelope sender of a message that failed permanently
(``Action: failed``) or is still being retried after the warning delay (``Action: delayed``).
Structure (RFC 6522 ``multipart/report; report-type=delivery-status``):

1. ``text/plain`` for people: what failed, for which recipients, and the upstream's reply;
2. ``message/delivery-status`` (RFC 3464): per-message fields (``Reporting-MTA: dns; host``,
   ``X-Mailward-Queue-ID`` when the message was queued, ``X-Mailward-Transaction-ID`` (the SMTP
   transaction's id, as in the log and the audit record), ``Arrival-Date``) and one block per
   recipient (``Final-Recipient``,
   ``Action``, ``Status``, ``Diagnostic-Code``, ``Last-Attempt-Date``, ``Will-Retry-Until`` for
   warnings). A non-ASCII (SMTPUTF8) address is typed ``utf-8`` in its 7-bit
   ``utf-8-addr-xtext`` form (RFC 6533 section 3), so this part is always 7-bit;
3. the original message's **header section only** -- never its body: the original may be large
   (a bounce must not double the damage of a huge message) or sensitive (the bounce may travel
   paths the original did not, and is kept in mailboxes and quarantines). ``text/rfc822-headers``
   when ASCII (quoted-printable if it carries raw 8-bit bytes), ``message/global-headers``
   (RFC 6533) for the UTF-8 headers of an SMTPUTF8 message. Left out when the original bytes are
   not available (a corrupt or missing spool file); part 1 says so.

The DSN is 7-bit unless the original was an SMTPUTF8 message with non-ASCII addresses or headers;
:func:`envelope_flags` tells the caller which SMTP parameters the DSN then needs.

:func:`may_bounce` is the pure part of the rule "who may get a bounce" (see its docstring); the
no-backscatter rule (the sender must be one of the login's own addresses) needs the account store
and is the runner's.

Reads: nothing (pure functions over what they are given).

Security notes: every header or field value derived from outside (envelope addresses, the
upstream's reply, the original Subject and Message-ID, the host name) is stripped of CR, LF and
every other control character before it is written, and bounded in length, so none can start a
header or a MIME part of its own; the ``smtp`` diagnostic is printable ASCII only. The original's
header section is copied as a part body (line endings normalised, a collision with the boundary
rules the boundary out). No message body is ever copied.
"""

from __future__ import annotations

import quopri
import re
import secrets
import textwrap
from collections.abc import Sequence
from datetime import UTC, datetime
from email.header import decode_header, make_header
from email.utils import format_datetime

from gateway.core.message import Headers, header_block, normalize_line_endings
from gateway.queue.model import QueuedMessage, QueuedRecipient

#: Subjects of the two kinds of DSN.
FAILED_SUBJECT = "Undelivered Mail Returned to Sender"
DELAYED_SUBJECT = "Delayed Mail (still being retried)"
#: Display name of the DSN's From: (``MAILER-DAEMON@<reporting MTA>``).
FROM_NAME = "Mail Delivery System"
#: Bound of any single value taken from outside (a field line stays far below 998 octets).
VALUE_LIMIT = 900
#: Bound of an envelope address copied into the DSN.
ADDRESS_LIMIT = 320
#: Bound of the copied header section; longer sections are cut at a line end.
HEADERS_LIMIT = 64 * 1024

_CRLF = "\r\n"
_CTE = "Content-Transfer-Encoding"
# C0 controls (tab included: a value is one line of words), DEL, C1, and the Unicode line and
# paragraph separators (str.splitlines breaks on them).
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_STATUS = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})$")
_SMTP_REPLY = re.compile(r"^([245]\d\d)[ -]((?:[245])\.\d{1,3}\.\d{1,3})?")
_HOST = re.compile(r"[^A-Za-z0-9.\-\[\]:]")
_NOT_PRINTABLE_ASCII = re.compile(r"[^\x20-\x7e]")
# RFC 6533 QCHAR: printable ASCII except SP, "\", "+" and "="
_QCHAR = re.compile(r"[\x21-\x2a\x2c-\x3c\x3e-\x5b\x5d-\x7e]")


# --- helpers -------------------------------------------------------------------------------------


def _unescape(text: str) -> str:
    """Raw 8-bit header bytes (parsed with ``surrogateescape``) back as UTF-8 where they are,
    U+FFFD where they are not: never a lone surrogate, which could not be encoded."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")


def clean(text: str, limit: int = VALUE_LIMIT) -> str:
    """``text`` as one safe header-value line: control characters (CR and LF first) become
    spaces, runs of spaces collapse, bounded to ``limit`` characters."""
    return " ".join(_CONTROLS.sub(" ", _unescape(text)).split())[:limit]


def _ascii(text: str, limit: int = VALUE_LIMIT) -> str:
    """:func:`clean` and printable ASCII only (others become ``?``)."""
    return _NOT_PRINTABLE_ASCII.sub("?", clean(text, limit))


def _address(address: str) -> str:
    """An envelope address for a field: no controls, bounded (an SMTP path is at most 256
    octets; a longer one is cut, never allowed to push a line past 998)."""
    return _CONTROLS.sub("", _unescape(address)).strip()[:ADDRESS_LIMIT]


def _host(name: str) -> str:
    host = _HOST.sub("", name)[:255]
    return host or "localhost"


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _date(moment: datetime) -> str:
    """An RFC 5322 date-time (in UTC)."""
    return format_datetime(_utc(moment))


def _human_date(moment: datetime) -> str:
    return _utc(moment).strftime("%Y-%m-%d %H:%M:%S UTC")


def xtext_address(address: str) -> str:
    """RFC 6533 ``utf-8-addr-xtext``: QCHARs as they are, everything else (non-ASCII, SP,
    ``\\``, ``+``, ``=``) as ``\\x{HEX}``; at most :data:`VALUE_LIMIT` characters, cut
    between characters (never inside an escape)."""
    out: list[str] = []
    size = 0
    for c in address:
        piece = c if _QCHAR.fullmatch(c) else f"\\x{{{ord(c):02X}}}"
        if size + len(piece) > VALUE_LIMIT:
            break
        out.append(piece)
        size += len(piece)
    return "".join(out)


def typed_address(address: str) -> str:
    """A DSN address field value: ``rfc822; addr`` when ASCII, else ``utf-8; <xtext>``."""
    address = _address(address)
    if address.isascii():
        return f"rfc822; {address}"
    return f"utf-8; {xtext_address(address)}"


def _fold(name: str, value: str) -> str:
    """``Name: value`` folded at spaces so that lines stay near 78 characters (never past 998:
    values are bounded and addresses are single words)."""
    words = value.split(" ")
    lines: list[str] = []
    line = f"{name}:"
    for word in words:
        if not word:
            continue
        if len(line) + 1 + len(word) > 78 and line.strip() not in (f"{name}:", ""):
            lines.append(line)
            line = " " + word
        else:
            line += " " + word
    lines.append(line)
    return _CRLF.join(lines)


def _status(recipient: QueuedRecipient, warning: bool) -> str:
    """The RFC 3463 status of a recipient, consistent with its action: class 4 for ``delayed``,
    class 5 for ``failed`` (a temporary failure that ran out of lifetime is ``5.4.7``, delivery
    time expired)."""
    candidates = [recipient.status or ""]
    found = _SMTP_REPLY.match(recipient.last_reply or "")
    if found and found.group(2):
        candidates.append(found.group(2))
    wanted = "4" if warning else "5"
    for candidate in candidates:
        parsed = _STATUS.match(candidate.strip())
        if parsed is None:
            continue
        if parsed.group(1) == wanted:
            return candidate.strip()
        if not warning and parsed.group(1) == "4":
            return "5.4.7"
    return f"{wanted}.0.0"


def _diagnostic(reply: str | None) -> str | None:
    """``Diagnostic-Code``: ``smtp; <reply>`` for an SMTP reply, ``X-Mailward; <text>`` for
    anything else (connection refused, deleted by an operator), None without a reply."""
    if not reply or not clean(reply):
        return None
    text = _ascii(reply)
    kind = "smtp" if _SMTP_REPLY.match(text) else "X-Mailward"
    return f"{kind}; {text}"


def _last_attempt(message: QueuedMessage, recipient: QueuedRecipient) -> datetime | None:
    """When the recipient was last attempted: its own ``updated_at`` (the runner sets it to the
    attempt that failed it, which its copy does not record yet), else its copy's last attempt;
    None if it never was."""
    if recipient.updated_at is not None:
        return recipient.updated_at
    times = [
        c.last_attempt
        for c in message.copies
        if c.last_attempt is not None and any(r.address == recipient.address for r in c.recipients)
    ]
    return max(times) if times else None


def _original_subject(headers: Headers | None) -> str | None:
    if headers is None:
        return None
    values = headers.values("Subject")
    if not values:
        return None
    try:
        text = str(make_header(decode_header(values[0])))
    except (LookupError, ValueError, UnicodeError):
        text = values[0]
    return clean(text, 200) or None


def _utf8_mode(message: QueuedMessage, failed: Sequence[QueuedRecipient]) -> bool:
    """Whether the DSN may carry UTF-8 (RFC 6532/6533): the original was an SMTPUTF8 message,
    or one of its addresses is not ASCII (which only an SMTPUTF8 session can have)."""
    return (
        message.smtputf8
        or not message.mail_from.isascii()
        or any(not r.address.isascii() for r in failed)
    )


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _quoted_printable(data: bytes) -> bytes:
    """``data`` (CRLF lines) quoted-printable encoded (7-bit, lines of at most 76), CRLF lines."""
    return quopri.encodestring(data.replace(b"\r\n", b"\n")).replace(b"\n", b"\r\n")


def _header_part(original: bytes, utf8: bool) -> tuple[list[str], bytes]:
    """(part headers, part body) of the original's header section."""
    block = normalize_line_endings(header_block(original))
    if len(block) > HEADERS_LIMIT:
        cut = block.rfind(b"\r\n", 0, HEADERS_LIMIT)
        block = block[: cut + 2] if cut > 0 else block[:HEADERS_LIMIT]
    if block and not block.endswith(b"\r\n"):
        block += b"\r\n"
    description = "Content-Description: Original message headers"
    if block.isascii():
        return ["Content-Type: text/rfc822-headers", description, f"{_CTE}: 7bit"], block
    if utf8 and _is_utf8(block):
        return ["Content-Type: message/global-headers", description, f"{_CTE}: 8bit"], block
    return (
        ["Content-Type: text/rfc822-headers", description, f"{_CTE}: quoted-printable"],
        _quoted_printable(block),
    )


def _text_part(text: str, utf8: bool) -> tuple[list[str], bytes]:
    raw = text.encode("utf-8")
    if raw.isascii():
        cte, body = "7bit", raw
    elif utf8:
        cte, body = "8bit", raw
    else:
        cte, body = "quoted-printable", _quoted_printable(raw)
    return [
        "Content-Type: text/plain; charset=utf-8",
        "Content-Description: Notification",
        f"{_CTE}: {cte}",
    ], body


def _wrap(paragraph: str, indent: str = "") -> list[str]:
    return textwrap.wrap(
        paragraph,
        width=72,
        initial_indent=indent,
        subsequent_indent=indent + "  " if indent else "",
        break_long_words=True,
        break_on_hyphens=False,
    ) or [indent]


def _human_text(
    *,
    host: str,
    original: QueuedMessage,
    failed: Sequence[QueuedRecipient],
    headers: Headers | None,
    warning: bool,
    arrival: datetime,
) -> str:
    lines: list[str] = [f"This is the mail system at host {host}.", ""]
    if warning:
        intro = (
            "Your message could not be delivered yet to the recipients below. "
            f"The mail system keeps trying until {_human_date(original.expires_at)}; "
            "you do not need to send it again. If it still cannot be delivered by then, "
            "you will get another notice."
        )
    else:
        intro = (
            "Your message could not be delivered to the recipients below. "
            "This is a permanent error: the mail system will not try again."
        )
    lines += _wrap(intro)
    lines.append("")
    lines.append(f"Accepted on:  {_human_date(arrival)}")
    subject = _original_subject(headers)
    if subject is not None:
        lines.append(f"Subject:      {subject}")
    message_id = headers.message_id if headers is not None else original.message_id_header
    if message_id:
        lines.append(f"Message-ID:   {clean(message_id, 200)}")
    if original.id:  # 0: refused at relay time while other recipients were accepted (not queued)
        lines.append(f"Queue ID:     {original.id}")
    lines.append(f"Transaction:  {_ascii(original.txn_id, 80)}")
    lines.append("")
    for recipient in failed:
        reason = clean(recipient.last_reply or "") or "no reply recorded"
        lines += _wrap(f"<{_address(recipient.address)}>: {reason}", indent="  ")
    lines.append("")
    if headers is None:
        lines += _wrap("The original message is no longer available; its headers are not attached.")
    else:
        lines += _wrap(
            "The headers of your message are attached below (not its content). "
            "A machine-readable report comes before them."
        )
    return _CRLF.join(lines) + _CRLF


def _status_part(
    *,
    host: str,
    original: QueuedMessage,
    failed: Sequence[QueuedRecipient],
    warning: bool,
    arrival: datetime,
) -> bytes:
    fields = [f"Reporting-MTA: dns; {host}"]
    if original.id:
        fields.append(f"X-Mailward-Queue-ID: {original.id}")
    fields.append(f"X-Mailward-Transaction-ID: {_ascii(original.txn_id, 80)}")
    fields.append(f"Arrival-Date: {_date(arrival)}")
    for recipient in failed:
        fields.append("")
        fields.append(f"Final-Recipient: {typed_address(recipient.address)}")
        fields.append(f"Action: {'delayed' if warning else 'failed'}")
        fields.append(f"Status: {_status(recipient, warning)}")
        diagnostic = _diagnostic(recipient.last_reply)
        if diagnostic is not None:
            fields.append(_fold("Diagnostic-Code", diagnostic))
        attempted = _last_attempt(original, recipient)
        if attempted is not None:
            fields.append(f"Last-Attempt-Date: {_date(attempted)}")
        if warning:
            fields.append(f"Will-Retry-Until: {_date(original.expires_at)}")
    return (_CRLF.join(fields) + _CRLF).encode("ascii")


def _boundary(parts: Sequence[bytes]) -> str:
    while True:
        boundary = f"=_mailward_dsn_{secrets.token_hex(12)}"
        if not any(boundary.encode() in part for part in parts):
            return boundary


# --- the interface -------------------------------------------------------------------------------


def build_dsn(
    *,
    reporting_mta: str,
    original: QueuedMessage,
    failed: list[QueuedRecipient],
    original_bytes: bytes | None,
    warning: bool = False,
    arrival: datetime,
    now: datetime,
) -> bytes:
    """The DSN (complete message, CRLF line endings) telling ``original``'s envelope sender that
    ``failed`` were not delivered (``warning=False``: ``Action: failed``) or not yet
    (``warning=True``: ``Action: delayed``, with ``Will-Retry-Until`` = the message's expiry).
    ``original_bytes`` are the original message (only its header section is used) or None when
    unavailable. Raises ValueError for a null envelope sender or no recipients (callers ask
    :func:`may_bounce` first)."""
    sender = _address(original.mail_from)
    if not sender or sender == "<>":
        raise ValueError("a DSN goes to the envelope sender; this message has none")
    if not failed:
        raise ValueError("a DSN needs at least one recipient")
    host = _host(reporting_mta)
    utf8 = _utf8_mode(original, failed)
    headers = Headers(original_bytes) if original_bytes is not None else None

    text_headers, text_body = _text_part(
        _human_text(
            host=host,
            original=original,
            failed=failed,
            headers=headers,
            warning=warning,
            arrival=arrival,
        ),
        utf8,
    )
    parts: list[tuple[list[str], bytes]] = [
        (text_headers, text_body),
        (
            [
                "Content-Type: message/delivery-status",
                "Content-Description: Delivery report",
                f"{_CTE}: 7bit",
            ],
            _status_part(
                host=host, original=original, failed=failed, warning=warning, arrival=arrival
            ),
        ),
    ]
    if original_bytes is not None:
        parts.append(_header_part(original_bytes, utf8))
    boundary = _boundary([body for _, body in parts])
    eight_bit = any(not body.isascii() for _, body in parts)

    top = [
        f"From: {FROM_NAME} <MAILER-DAEMON@{host}>",
        f"To: <{sender}>",
        f"Subject: {DELAYED_SUBJECT if warning else FAILED_SUBJECT}",
        f"Date: {_date(now)}",
        f"Message-ID: <{_utc(now):%Y%m%d%H%M%S}.{secrets.token_hex(8)}@{host}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f' boundary="{boundary}"',
        f"{_CTE}: {'8bit' if eight_bit else '7bit'}",
    ]
    out = bytearray(_CRLF.join(top).encode("utf-8") + b"\r\n\r\n")
    out += b"This is a MIME-encapsulated delivery status notification.\r\n"
    for part_headers, body in parts:
        out += f"\r\n--{boundary}\r\n".encode()
        out += (_CRLF.join(part_headers) + _CRLF + _CRLF).encode("ascii")
        out += body
        if body and not body.endswith(b"\r\n"):
            out += b"\r\n"
    out += f"\r\n--{boundary}--\r\n".encode()
    return bytes(out)


def envelope_flags(dsn: bytes) -> tuple[bool, bool]:
    """(``smtputf8``, ``body_8bitmime``) to send ``dsn`` with: both when it carries any 8-bit
    octet (which :func:`build_dsn` writes only for an SMTPUTF8 original), else neither."""
    eight_bit = not dsn.isascii()
    return eight_bit, eight_bit


def auto_submitted(original_bytes: bytes) -> bool:
    """Whether the message says it was sent by an automatic process (RFC 3834 ``Auto-Submitted``
    with any value but ``no``, in any of its Auto-Submitted headers)."""
    for value in Headers(original_bytes).values("Auto-Submitted"):
        keyword = re.split(r"[\s;(]", value.strip(), maxsplit=1)[0].lower()
        if keyword != "no":
            return True
    return False


def may_bounce(message: QueuedMessage, original_bytes: bytes | None = None) -> bool:
    """Whether a failure of ``message`` may produce a DSN, judged only on what is given:

    * never for a DSN (``is_bounce``): no bounce of a bounce (RFC 3464 section 2, RFC 5321
      section 4.5.5);
    * never for the null reverse-path (``mail_from`` empty): there is nobody to tell;
    * never for a message marked ``Auto-Submitted`` with a value other than ``no`` (RFC 3834), when
      ``original_bytes`` are given: automatic mail does not get an automatic answer, which keeps two
      robots from mailing each other forever. Without the bytes (a missing spool file) this rule
      cannot be judged and does not refuse.

    The no-backscatter rule (the sender must be one of the login's own addresses) needs the
    account store and is checked by the queue runner."""
    if message.is_bounce:
        return False
    if message.mail_from.strip() in ("", "<>"):
        return False
    return not (original_bytes is not None and auto_submitted(original_bytes))
