"""Mailward's own error tree: every failure the core reasons about is one of these.

What it does: each :class:`GatewayError` carries the :class:`~gateway.core.replies.Reply` the client
should get and whether the failure is temporary. Third-party exceptions (SQLAlchemy, aiosmtplib, gpg...)
are translated into this tree at the one module that calls the library, like httpx does; anything that
is not a GatewayError is an internal error and becomes ``451 4.3.0`` with an incident id.

Reads: nothing.

Security notes: ``str(error)`` is for logs only and must not contain secrets or message content; it is
never put on the wire. The reply is.
"""

from __future__ import annotations

from gateway.core import replies
from gateway.core.replies import Reply


class GatewayError(Exception):
    """Base class: an expected failure with the reply the client gets."""

    reply: Reply = replies.INTERNAL_ERROR

    def __init__(self, message: str = "", *, reply: Reply | None = None) -> None:
        super().__init__(message or self.__class__.__name__)
        if reply is not None:
            self.reply = reply

    @property
    def temporary(self) -> bool:
        return self.reply.is_temporary


class ConfigError(GatewayError):
    """A configuration file or value is invalid. ``str()`` names the file, key and problem."""

    def __init__(self, source: str, key: str, problem: str) -> None:
        self.source, self.key, self.problem = source, key, problem
        where = f"{source}: {key}" if key else source
        super().__init__(f"{where}: {problem}")


class StoreUnavailable(GatewayError):
    """A database (accounts, audit) could not be reached or failed: always temporary."""

    reply = replies.POLICY_TEMPFAIL


class CredentialStoreUnavailable(StoreUnavailable):
    reply = replies.AUTH_TEMPFAIL


class AuditUnavailable(StoreUnavailable):
    reply = replies.AUDIT_UNAVAILABLE


class LimitStoreUnavailable(StoreUnavailable):
    """The limit store could not be reached, timed out or failed: always temporary."""


class UpstreamError(GatewayError):
    """The upstream relay failed. ``upstream_code``/``upstream_text`` keep what it said, if anything."""

    reply = replies.UPSTREAM_UNAVAILABLE

    def __init__(
        self,
        message: str = "",
        *,
        reply: Reply | None = None,
        upstream_code: int | None = None,
        upstream_text: str = "",
    ) -> None:
        super().__init__(message, reply=reply)
        self.upstream_code = upstream_code
        self.upstream_text = upstream_text

    @property
    def upstream_reply(self) -> str:
        if self.upstream_code is None:
            return str(self)
        return f"{self.upstream_code} {self.upstream_text}".strip()


class UpstreamUnreachable(UpstreamError):
    reply = replies.UPSTREAM_UNAVAILABLE


class UpstreamTimeout(UpstreamError):
    reply = replies.UPSTREAM_TIMEOUT


class UpstreamDropped(UpstreamError):
    reply = replies.UPSTREAM_DROPPED


class UpstreamRejected(UpstreamError):
    """The upstream answered 4xx/5xx; ``reply`` is what the client gets (mapped by the relay)."""


class CheckFailed(GatewayError):
    """A check raised or timed out; the runner applies the check's ``on_error``."""

    reply = replies.POLICY_TEMPFAIL
