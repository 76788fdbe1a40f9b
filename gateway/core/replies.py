"""The reply catalog: every SMTP reply Mailward can send, with its enhanced status code.

What it does: defines :class:`Reply` (basic code, RFC 3463 enhanced status code, text) and one named
constant per reply. Nothing else in the code base invents reply text; checks, the service and the SMTP
adapter pick a constant here (optionally filling ``{placeholders}``) and the adapter renders it.

Reads: nothing (pure data, stdlib only).

Security notes: reply texts never contain exception text, secrets or message content. Text that comes
from outside (an upstream's reply) is passed through :func:`sanitize_text` before it is put on the wire.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")


def sanitize_text(text: str, limit: int = 200) -> str:
    """Printable ASCII only, no CR/LF, bounded length: safe to embed in a reply line."""
    return _UNPRINTABLE.sub("?", text)[:limit].strip()


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply: ``code status text``, e.g. ``550 5.7.1 Sender address not owned``."""

    code: int
    status: str
    text: str

    def __post_init__(self) -> None:
        if not 200 <= self.code <= 599:
            raise ValueError(f"bad SMTP reply code {self.code}")
        if self.status and self.status[0] != str(self.code)[0]:
            raise ValueError(f"enhanced status {self.status} does not match {self.code}")

    @property
    def is_positive(self) -> bool:
        return self.code < 400

    @property
    def is_temporary(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    def format(self, **values: object) -> Reply:
        """Fill ``{name}`` placeholders; every value is sanitised for the wire."""
        clean = {k: sanitize_text(str(v)) for k, v in values.items()}
        return replace(self, text=self.text.format(**clean))

    def softened(self) -> Reply:
        """The temporary twin of a permanent reply, as Postfix's ``soft_bounce``: 5yz → 4yz."""
        if not self.is_permanent:
            return self
        status = "4" + self.status[1:] if self.status else ""
        return replace(self, code=self.code - 100, status=status)

    def line(self) -> str:
        """The reply as one line without CRLF (multi-line replies are not used)."""
        if self.status:
            return f"{self.code} {self.status} {self.text}"
        return f"{self.code} {self.text}"

    def __str__(self) -> str:
        return self.line()


# --- connection ------------------------------------------------------------------------------------
GREETING = Reply(220, "", "{hostname} ESMTP Mailward")
CLOSING = Reply(221, "2.0.0", "Bye")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections, try again later")
TOO_MANY_CONNECTIONS_FROM_IP = Reply(421, "4.7.0", "Too many connections from your address")
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, try again later")
TIMEOUT = Reply(421, "4.4.2", "Timeout, closing connection")
TOO_MANY_BAD_COMMANDS = Reply(421, "4.7.0", "Too many errors, closing connection")
COMMAND_FLOOD = Reply(421, "4.7.0", "{command} sent too many times")
TLS_REQUIRED_FIRST = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
TLS_NOT_OK = Reply(554, "5.7.0", "Command refused due to lack of security")
TLS_UNAVAILABLE = Reply(454, "4.7.0", "TLS not available")
TLS_READY = Reply(220, "2.0.0", "Ready to start TLS")

# --- generic protocol -----------------------------------------------------------------------------
OK = Reply(250, "2.0.0", "OK")
RESET_OK = Reply(250, "2.0.0", "Reset state")
NOOP_OK = Reply(250, "2.0.0", "OK")
HELO_REQUIRED = Reply(503, "5.5.1", "Send HELO or EHLO first")
BAD_SEQUENCE_MAIL_NESTED = Reply(503, "5.5.1", "Nested MAIL command")
BAD_SEQUENCE_NEED_MAIL = Reply(503, "5.5.1", "Need MAIL command")
BAD_SEQUENCE_NEED_RCPT = Reply(503, "5.5.1", "Need RCPT command")
SYNTAX_ERROR = Reply(500, "5.5.2", "Syntax error")
SYNTAX_ERROR_ARGS = Reply(501, "5.5.4", "Syntax error in parameters or arguments")
COMMAND_UNRECOGNIZED = Reply(500, "5.5.1", "Command not recognized")
COMMAND_NOT_IMPLEMENTED = Reply(502, "5.5.1", "Command not implemented")
COMMAND_LINE_TOO_LONG = Reply(500, "5.5.6", "Command line too long")
NON_ASCII_COMMAND = Reply(500, "5.5.2", "Non-ASCII command without SMTPUTF8")
PARAMETERS_NOT_RECOGNIZED = Reply(555, "5.5.4", "Parameters not recognized or not implemented")
BODY_PARAMETER_INVALID = Reply(501, "5.5.4", "BODY must be 7BIT or 8BITMIME")
SMTPUTF8_ARGUMENT = Reply(501, "5.5.4", "SMTPUTF8 takes no arguments")
SMTPUTF8_DISABLED = Reply(555, "5.5.4", "SMTPUTF8 is not enabled")
MALFORMED_ADDRESS = Reply(553, "5.1.3", "Malformed address")
VRFY_REFUSED = Reply(252, "2.5.0", "Cannot VRFY user; send some mail and we will try")
EXPN_REFUSED = Reply(502, "5.5.1", "EXPN not implemented")
HELP = Reply(214, "2.0.0", "See RFC 5321")
INTERNAL_ERROR = Reply(451, "4.3.0", "Internal error, try again later (incident {incident})")

# --- authentication -------------------------------------------------------------------------------
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
AUTH_TEMPFAIL = Reply(454, "4.7.0", "Temporary authentication failure, try again later")
AUTH_THROTTLED = Reply(454, "4.7.0", "Too many failed authentications, try again later")
AUTH_ENCRYPTION_REQUIRED = Reply(
    538, "5.7.11", "Encryption required for requested authentication mechanism"
)
AUTH_ALREADY = Reply(503, "5.5.1", "Already authenticated")
AUTH_MECHANISM_UNKNOWN = Reply(504, "5.5.4", "Unrecognized authentication type")
AUTH_ABORTED = Reply(501, "5.7.0", "Authentication aborted")
AUTH_BAD_BASE64 = Reply(501, "5.5.2", "Cannot decode base64")
AUTH_BAD_FORMAT = Reply(501, "5.5.2", "Malformed authentication data")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
AUTH_NOT_AVAILABLE = Reply(503, "5.5.1", "AUTH not available before EHLO")

# --- envelope -------------------------------------------------------------------------------------
SENDER_OK = Reply(250, "2.1.0", "Sender OK")
RECIPIENT_OK = Reply(250, "2.1.5", "Recipient OK")
SENDER_NOT_OWNED = Reply(553, "5.7.1", "Sender address <{address}> not owned by user {login}")
NULL_SENDER_REFUSED = Reply(553, "5.7.1", "Null reverse-path not allowed for submission")
FROM_HEADER_NOT_OWNED = Reply(550, "5.7.1", "From: header address not owned by user {login}")
FROM_HEADER_MISSING = Reply(550, "5.7.1", "Message has no usable From: header")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients (limit {limit})")
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
RECIPIENT_NOT_ASCII = Reply(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")

# --- data -----------------------------------------------------------------------------------------
START_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
DATA_LINE_TOO_LONG = Reply(500, "5.5.6", "Line too long (see RFC 5321 4.5.3.1.6)")
BARE_NEWLINE = Reply(550, "5.6.0", "Message contains bare CR, bare LF or NUL (RFC 5321 2.3.8)")
EIGHTBIT_WITHOUT_BODY = Reply(
    554, "5.6.0", "8-bit data without BODY=8BITMIME or SMTPUTF8 is not accepted"
)
MESSAGE_ACCEPTED = Reply(250, "2.0.0", "Ok: queued as {queue_id} (transaction {txn})")

# --- policy / pipeline ----------------------------------------------------------------------------
POLICY_TEMPFAIL = Reply(451, "4.3.0", "Temporary policy failure ({check}), try again later")
SPAM_REJECTED = Reply(550, "5.7.1", "Message refused as spam (score {score})")
SPAM_TEMPFAIL = Reply(451, "4.7.1", "Message deferred as suspected spam, try again later")
MESSAGE_TOO_COMPLEX = Reply(554, "5.6.0", "Message structure too complex to scan")
RATE_LIMITED = Reply(450, "4.7.1", "Rate limit {limit} exceeded, try again in {retry} s")
RATE_LIMITED_EOM = Reply(451, "4.7.1", "Rate limit {limit} exceeded, try again in {retry} s")
RATE_LIMIT_NEVER = Reply(552, "5.3.4", "Message exceeds the rate limit {limit} on its own")
ENCRYPTION_FAILED = Reply(451, "4.3.0", "Encryption failed, try again later")
ENCRYPTION_KEY_MISSING = Reply(
    550, "5.7.5", "Encryption required for <{address}> but no usable key is known: {why}"
)
ENCRYPTION_ADDRESS_REFUSED = Reply(
    553, "5.1.3", "Recipient <{address}> cannot be matched to an encryption key: {why}"
)
KEY_STORE_UNAVAILABLE = Reply(451, "4.3.0", "Encryption key store unavailable, try again later")
ACCOUNT_SUSPENDED = Reply(550, "5.7.1", "Account suspended, contact support")

# --- upstream / custody ---------------------------------------------------------------------------
UPSTREAM_UNAVAILABLE = Reply(451, "4.4.1", "Upstream relay unavailable, try again later")
UPSTREAM_TIMEOUT = Reply(451, "4.4.2", "Upstream relay timed out, try again later")
UPSTREAM_DROPPED = Reply(451, "4.4.2", "Upstream relay dropped the connection, try again later")
UPSTREAM_TEMPFAIL = Reply(451, "4.4.3", "Upstream relay deferred: {upstream}")
UPSTREAM_SMTPUTF8_UNSUPPORTED = Reply(553, "5.6.7", "Upstream relay does not support SMTPUTF8")
UPSTREAM_8BIT_UNSUPPORTED = Reply(554, "5.6.3", "Upstream relay does not support 8BITMIME")
AUDIT_UNAVAILABLE = Reply(451, "4.3.0", "Audit log unavailable, try again later")
QUARANTINE_UNAVAILABLE = Reply(451, "4.3.0", "Quarantine unavailable, try again later")
QUEUE_UNAVAILABLE = Reply(451, "4.3.0", "Queue unavailable, try again later")
INSUFFICIENT_STORAGE = Reply(452, "4.3.1", "Insufficient system storage, try again later")
HELD_FOR_REVIEW = Reply(250, "2.0.0", "Ok: held for review as Q{id} (transaction {txn})")
MESSAGE_QUEUED = Reply(
    250, "2.0.0", "Ok: queued as {queue_id} (transaction {txn}); delivery will be retried"
)


def catalog() -> dict[str, Reply]:
    """Every named reply constant, by name (for docs and the catalog test)."""
    return {name: value for name, value in globals().items() if isinstance(value, Reply)}


def upstream_permanent(code: int, status: str, text: str) -> Reply:
    """A permanent reply carrying the upstream's own code, enhanced status and (sanitised) text."""
    status = status if status and status[0] == "5" else "5.0.0"
    code = code if 500 <= code <= 599 else 550
    return Reply(code, status, "Upstream relay refused: " + sanitize_text(text))
