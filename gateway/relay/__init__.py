"""The upstream relay: Mailward's SMTP client to the ISP's MTA (the only user of aiosmtplib).

What it does: exports :class:`UpstreamRelay`, the :class:`~gateway.core.ports.Relay` implementation
(connection pool, TLS, AUTH, error translation); wire helpers live in :mod:`gateway.relay.wire`.

Reads: ``[relay]`` through the objects it exports.

Security notes: see :mod:`gateway.relay.upstream` (the relay password is never logged).
"""

from gateway.relay.upstream import UpstreamRelay, UpstreamTransaction

__all__ = ["UpstreamRelay", "UpstreamTransaction"]
