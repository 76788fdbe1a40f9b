"""The encryption key store: recipients' OpenPGP public keys and S/MIME certificates.

What it does: exports the canonical address form shared by the store and the ``encryption`` check
(:mod:`.address`), the tables (:mod:`.models`), import validation (:mod:`.validate`), the store
:class:`SqlKeyStore` (:mod:`.store`) and the gateway-owned GNUPGHOME :class:`KeyRing`
(:mod:`.gpghome`). ``mailward key`` (``gateway.cli.key``) is the operator's interface.

Reads: through what it exports, the ``encryption_key`` tables and gpg.

Security notes: only public keys are ever stored; validation refuses any file holding secret
material before anything is written. Which key encrypts a recipient's copy is decided by the
store at use time (:meth:`SqlKeyStore.usable_keys`), never by a keyring's contents.
"""

from gateway.keys.address import InvalidAddress, canonical_address, canonical_domain
from gateway.keys.gpg import GpgError, GpgProgram, GpgUnavailable
from gateway.keys.gpghome import ENCRYPT_OPTIONS, KeyRing, SyncReport
from gateway.keys.models import (
    KINDS,
    OPENPGP,
    OPERATOR,
    SMIME,
    SOURCES,
    UNVERIFIED,
    USER,
    VERIFICATIONS,
    VERIFIED,
)
from gateway.keys.store import (
    AUDIT_KINDS,
    ImportResult,
    KeyNotFound,
    KeyRecord,
    SqlKeyStore,
    armor,
    normalize_fingerprint,
)
from gateway.keys.validate import KeyLimits, KeyRejected, ValidatedKey, validate_key

__all__ = [
    "AUDIT_KINDS",
    "ENCRYPT_OPTIONS",
    "KINDS",
    "OPENPGP",
    "OPERATOR",
    "SMIME",
    "SOURCES",
    "UNVERIFIED",
    "USER",
    "VERIFICATIONS",
    "VERIFIED",
    "GpgError",
    "GpgProgram",
    "GpgUnavailable",
    "ImportResult",
    "InvalidAddress",
    "KeyLimits",
    "KeyNotFound",
    "KeyRecord",
    "KeyRejected",
    "KeyRing",
    "SqlKeyStore",
    "SyncReport",
    "ValidatedKey",
    "armor",
    "canonical_address",
    "canonical_domain",
    "normalize_fingerprint",
    "validate_key",
]
