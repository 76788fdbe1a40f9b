"""Per-recipient encryption transforms: PGP/MIME, S/MIME, header protection, recipient grouping.

What it does: library code the ``encryption`` check calls (it holds no state and decides no
policy). :func:`~gateway.crypto.groups.group_recipients` splits the recipients into copies;
:func:`encrypt_group` produces the bytes of one copy: the message unchanged for a clear-text group,
:func:`~gateway.crypto.pgpmime.encrypt_pgpmime` (RFC 3156) or
:func:`~gateway.crypto.smime.encrypt_smime` (RFC 8551) otherwise, both with RFC 9788 header
protection (:mod:`gateway.crypto.protect`). :func:`~gateway.crypto.protect.is_encrypted` tells
the caller a message is already encrypted and passes unchanged (decide that before grouping).

Reads: the message, the keys and certificates it is given, and the GNUPGHOME of the
:class:`~gateway.crypto.pgpmime.GpgEngine`.

Security notes: every failure is :class:`~gateway.crypto.errors.EncryptionFailed` (``451 4.3.0``);
there is no fallback to clear text anywhere in this package. OpenPGP encryption runs gpg and
blocks for a few milliseconds: call :func:`encrypt_group` from a worker thread.
"""

from __future__ import annotations

import os

from gateway.crypto.errors import EncryptionFailed
from gateway.crypto.groups import (
    Decision,
    Format,
    Group,
    address_key,
    group_recipients,
    named_addresses,
)
from gateway.crypto.pgpmime import GpgEngine, encrypt_pgpmime, normalize_fingerprint
from gateway.crypto.protect import (
    DEFAULT_PROTECTION,
    HeaderProtection,
    Protected,
    is_encrypted,
    protect,
)
from gateway.crypto.smime import certificate_fingerprint, encrypt_smime

__all__ = [
    "DEFAULT_PROTECTION",
    "Decision",
    "EncryptionFailed",
    "Format",
    "GpgEngine",
    "Group",
    "HeaderProtection",
    "Protected",
    "address_key",
    "certificate_fingerprint",
    "encrypt_group",
    "encrypt_pgpmime",
    "encrypt_smime",
    "group_recipients",
    "is_encrypted",
    "named_addresses",
    "normalize_fingerprint",
    "protect",
]


def encrypt_group(
    message: bytes,
    group: Group,
    *,
    gnupg_home: GpgEngine | str | os.PathLike[str],
    protection: HeaderProtection = DEFAULT_PROTECTION,
) -> bytes:
    """The bytes to relay to ``group``'s recipients (``message`` itself for a clear-text group)."""
    if group.format is Format.CLEAR:
        return message
    if group.format is Format.OPENPGP:
        return encrypt_pgpmime(
            message,
            recipients_keys=group.fingerprints,
            gnupg_home=gnupg_home,
            hidden_recipients=group.hidden_recipients,
            protection=protection,
        )
    return encrypt_smime(message, certificates=group.certificates, protection=protection)
