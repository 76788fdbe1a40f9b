"""The encryption transforms' error: what gpg and ``cryptography`` failures become.

What it does: :class:`EncryptionFailed` is the one :class:`~gateway.core.errors.GatewayError` the
transforms raise (``451 4.3.0``, temporary): gpg missing or failing, a key gpg refuses (expired,
revoked, no encryption subkey, not in the GNUPGHOME), a certificate ``cryptography`` cannot encrypt
to (not RSA), a malformed fingerprint. A message that cannot be encrypted is never relayed in clear
text: the caller defers it and the client keeps custody.

Reads: nothing.

Security notes: ``str(error)`` names the step, the fingerprint(s) and gpg's status keywords only; it
never carries message content, and gpg's free-text stderr is cut to status lines (no plaintext goes
to stderr, but bounded anyway).
"""

from __future__ import annotations

from gateway.core import replies
from gateway.core.errors import GatewayError


class EncryptionFailed(GatewayError):
    """A message could not be encrypted for a group; the client gets ``451 4.3.0``."""

    reply = replies.ENCRYPTION_FAILED
