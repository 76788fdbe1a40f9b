"""Import validation: decide whether a file holds one usable public key or certificate, and take it
apart into what the key store records.

What it does: :func:`validate_key` takes the bytes of a file and returns a :class:`ValidatedKey`
(kind, fingerprint, canonical addresses, user IDs, creation, expiry, encryption-subkey expiry, the
material to store) or raises :class:`KeyRejected` with one readable reason. Nothing is stored here;
the store writes only what this returns.

* **Detection.** An ASCII-armored ``-----BEGIN PGP`` block or binary OpenPGP packets are OpenPGP;
  a PEM ``CERTIFICATE`` or a DER certificate is S/MIME. Any armored or PEM block whose label
  contains ``PRIVATE KEY`` (``PGP PRIVATE KEY BLOCK``, ``PRIVATE KEY``, ``RSA PRIVATE KEY``,
  ``ENCRYPTED PRIVATE KEY``...), a DER private key, or an OpenPGP secret (sub)key packet refuses
  the whole file before anything else looks at it: secret material is never stored, not even
  partially (the certificate next to the key is not kept either).
* **Limits.** The file size (``keys.max_key_size``) is checked before any parsing; the number of
  user IDs (or certificate addresses) against ``keys.max_user_ids``. One key per file.
* **OpenPGP** (through gpg, in a temporary, empty GNUPGHOME: the operator's ``~/.gnupg`` is never
  used): ``--show-keys`` (``--import-options show-only``) with ``--with-colons`` lists the input
  without importing it (secret keys are refused here); then the key is imported with
  ``--import-options import-minimal`` and exported with ``--export-options export-minimal``: every
  third-party certification is dropped, only the latest self-signature of each user ID, the
  subkey bindings and revocations stay, and that minimal key is what is stored. The key must not
  be expired or revoked at ``now``, must have at least one usable encryption-capable (sub)key, and
  a valid user ID whose address (``Name <addr>`` or a bare ``addr``) canonicalises
  (:func:`gateway.keys.address.canonical_address`). ``encryption_expires_at`` is the latest
  expiry among the usable encryption subkeys (None when one never expires): the store checks it
  at use time together with the primary key's expiry.
* **S/MIME** (``cryptography``): one X.509 certificate, valid at ``now`` (notBefore <= now <
  notAfter), not a CA, an RSA key of at least 2048 bits (keyUsage, when present, must allow
  keyEncipherment); extendedKeyUsage, when present, must allow emailProtection. EC certificates
  are refused with a reason that says so: the S/MIME transform (``cryptography``'s CMS envelope
  builder) can encrypt to RSA recipients only, so an EC certificate could never be used and
  would make a ``required`` recipient look covered when it is not. Addresses come from
  subjectAltName rfc822Name entries and the subject's emailAddress. Chains and revocation lists
  are not checked: the certificate is a recipient's public key here, vouched for by the operator
  (``verification``), not a trust decision.
* **Addresses.** With ``address``, that (canonical) address must be one of the key's, and it is the
  only one recorded; without, every valid address of the key is recorded.
* **Revoked keys.** With ``allow_revoked`` a revoked OpenPGP key is returned with ``revoked=True``
  (its other checks skipped) so that the store can record the revocation of a key it already
  holds; the store refuses it when it does not.

Reads: the given bytes; runs gpg in a temporary directory it deletes.

Security notes: the input is untrusted (possibly uploaded by a user). It is never written to the
operator's keyring; gpg runs with a reduced environment and ``--no-autostart``; reasons quote
only bounded, escaped fragments of the input (user IDs and addresses may be hostile: the CLI
escapes them when printing).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.config.schema import KeysConfig
from gateway.core.errors import GatewayError
from gateway.keys.address import InvalidAddress, canonical_address
from gateway.keys.gpg import (
    LIST_OPTIONS,
    ColonKey,
    ColonSubkey,
    GpgProgram,
    parse_colons,
    run_gpg,
    short_diagnostic,
    temporary_home,
)
from gateway.keys.models import OPENPGP, SMIME

DEFAULT_MAX_SIZE = 64 * 1024
DEFAULT_MAX_USER_IDS = 16
MIN_RSA_BITS = 2048

_PRIVATE_BLOCK = re.compile(rb"-----BEGIN [A-Z0-9 ]*PRIVATE KEY[A-Z0-9 ]*-----")
_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----")
_ANGLE_ADDRESS = re.compile(r"<([^<>]*)>\s*$")
_HEX_FINGERPRINT = re.compile(r"^(?:[0-9A-F]{40}|[0-9A-F]{64})$")


class KeyRejected(GatewayError):
    """The file is not an acceptable public key or certificate; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class KeyLimits:
    """Import limits: file size in bytes and user IDs (or certificate addresses) per key."""

    max_size: int = DEFAULT_MAX_SIZE
    max_user_ids: int = DEFAULT_MAX_USER_IDS

    @classmethod
    def from_config(cls, keys: KeysConfig) -> KeyLimits:
        return cls(keys.max_key_bytes, keys.max_user_ids)


@dataclass(frozen=True, slots=True)
class ValidatedKey:
    """A key that passed validation: what the store records (see :mod:`gateway.keys.models`)."""

    kind: str
    fingerprint: str
    algorithm: str
    material: bytes
    addresses: tuple[str, ...]  # canonical addresses to record for this import
    key_addresses: tuple[str, ...]  # every valid canonical address the key names
    user_ids: tuple[str, ...]
    created_at: datetime
    expires_at: datetime | None
    encryption_expires_at: datetime | None
    revoked: bool = False

    @property
    def material_sha256(self) -> str:
        return hashlib.sha256(self.material).hexdigest()


def _earliest(*values: datetime | None) -> datetime | None:
    present = [v for v in values if v is not None]
    return min(present) if present else None


def usable_until(
    expires_at: datetime | None, encryption_expires_at: datetime | None
) -> datetime | None:
    """When a key stops being usable for encryption (None: never, unless revoked)."""
    return _earliest(expires_at, encryption_expires_at)


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def uid_address(uid: str) -> str | None:
    """The address of an OpenPGP user ID: ``Name <addr>`` or a bare ``addr`` (else None)."""
    match = _ANGLE_ADDRESS.search(uid)
    if match:
        return match.group(1).strip() or None
    text = uid.strip()
    if "@" in text and not any(c.isspace() for c in text):
        return text
    return None


def _select_addresses(
    key_addresses: list[str], address: str | None, described: str
) -> tuple[str, ...]:
    if not key_addresses:
        raise KeyRejected(f"the {described} names no usable email address")
    if address is None:
        return tuple(key_addresses)
    try:
        wanted = canonical_address(address)
    except InvalidAddress as error:
        raise KeyRejected(f"--address {address!r} is not usable: {error.reason}") from None
    if wanted not in key_addresses:
        listed = ", ".join(_short(a, 60) for a in key_addresses[:5])
        more = f" and {len(key_addresses) - 5} more" if len(key_addresses) > 5 else ""
        raise KeyRejected(f"the {described} is not valid for {wanted}: it names {listed}{more}")
    return (wanted,)


def _canonical_unique(candidates: list[str]) -> list[str]:
    out: list[str] = []
    for candidate in candidates:
        try:
            canonical = canonical_address(candidate)
        except InvalidAddress:
            continue
        if canonical not in out:
            out.append(canonical)
    return sorted(out)


async def validate_key(
    data: bytes,
    *,
    now: datetime,
    address: str | None = None,
    limits: KeyLimits | None = None,
    program: GpgProgram | None = None,
    allow_revoked: bool = False,
) -> ValidatedKey:
    """Validate the content of one key file (see the module docstring).

    Raises KeyRejected (the reason, for the operator), GpgUnavailable (gpg could not run: a
    temporary failure, not a verdict on the key).
    """
    limits = limits or KeyLimits()
    if not data.strip():
        raise KeyRejected("the file is empty")
    if len(data) > limits.max_size:
        raise KeyRejected(
            f"the file is {len(data)} bytes, more than the limit of {limits.max_size} bytes "
            "(keys.max_key_size)"
        )
    private = _PRIVATE_BLOCK.search(data)
    if private:
        label = private.group(0).decode("ascii").strip("-").removeprefix("BEGIN ")
        raise KeyRejected(
            f"the file contains a private key ({label}); only public keys and certificates "
            "are accepted, and nothing of this file was stored"
        )
    if b"-----BEGIN PGP " in data:
        return await _openpgp(data, now, address, limits, program or GpgProgram(), allow_revoked)
    if b"-----BEGIN " in data:
        return _smime_pem(data, now, address, limits)
    first = data[0]
    if first == 0x30:  # an ASN.1 SEQUENCE: a DER certificate (or a DER private key)
        return _smime_der(data, now, address, limits)
    if first & 0x80:  # an OpenPGP packet header
        return await _openpgp(data, now, address, limits, program or GpgProgram(), allow_revoked)
    raise KeyRejected("not an OpenPGP key or an X.509 certificate (unrecognised format)")


# --- OpenPGP --------------------------------------------------------------------------------------


async def _openpgp(
    data: bytes,
    now: datetime,
    address: str | None,
    limits: KeyLimits,
    program: GpgProgram,
    allow_revoked: bool,
) -> ValidatedKey:
    with temporary_home() as home:
        shown = await run_gpg(home, ["--show-keys", *LIST_OPTIONS], data=data, program=program)
        keys = parse_colons(shown.stdout)
        if any(key.has_secret for key in keys):
            raise KeyRejected(
                "the file contains an OpenPGP secret key; only public keys are accepted, and "
                "nothing of this file was stored"
            )
        if not keys:
            raise KeyRejected(
                f"not a valid OpenPGP public key ({short_diagnostic(shown)})"
                if shown.returncode
                else "no OpenPGP key found in the file"
            )
        if len(keys) > 1:
            raise KeyRejected(f"the file holds {len(keys)} keys; import one key per file")
        uid_count = len(keys[0].uids)
        if uid_count > limits.max_user_ids:
            raise KeyRejected(
                f"the key has {uid_count} user IDs, more than the limit of "
                f"{limits.max_user_ids} (keys.max_user_ids)"
            )
        imported = await run_gpg(
            home,
            ["--import", "--import-options", "import-minimal"],
            data=data,
            program=program,
        )
        secret_read = _import_result(imported.status, 9)
        if secret_read:
            raise KeyRejected("the file contains an OpenPGP secret key; nothing was stored")
        fingerprint = keys[0].fingerprint
        if not _HEX_FINGERPRINT.match(fingerprint):
            raise KeyRejected("the key has no usable fingerprint")
        if not any(s.startswith("IMPORT_OK ") for s in imported.status):
            raise KeyRejected(f"gpg did not accept the key ({short_diagnostic(imported)})")
        exported = await run_gpg(
            home,
            ["--export", "--export-options", "export-minimal", fingerprint],
            program=program,
        )
        material = exported.stdout
        if exported.returncode or not material:
            raise KeyRejected(f"gpg could not export the key ({short_diagnostic(exported)})")
        listed = await run_gpg(home, ["--show-keys", *LIST_OPTIONS], data=material, program=program)
        minimal = parse_colons(listed.stdout)
    if len(minimal) != 1 or minimal[0].fingerprint != fingerprint or minimal[0].has_secret:
        raise KeyRejected("gpg returned an unexpected listing of the key")
    return _openpgp_record(minimal[0], material, now, address, allow_revoked)


def _import_result(status: tuple[str, ...], index: int) -> int:
    """Field ``index`` (0-based, after the keyword) of gpg's ``IMPORT_RES`` status line."""
    for line in status:
        if line.startswith("IMPORT_RES "):
            fields = line.split()[1:]
            if index < len(fields) and fields[index].isdigit():
                return int(fields[index])
    return 0


def _encryption_keys(key: ColonKey, now: datetime) -> list[ColonSubkey]:
    """The (sub)keys gpg could encrypt to at ``now``: encryption-capable, not expired, revoked
    or invalid, created no later than ``now``."""
    candidates = [key.primary, *key.subkeys]
    usable: list[ColonSubkey] = []
    for sub in candidates:
        own_caps = "".join(c for c in sub.capabilities if c.islower())
        if "e" not in own_caps or not sub.usable:
            continue
        if sub.expires is not None and sub.expires <= now:
            continue
        if sub.created is not None and sub.created > now:
            continue
        usable.append(sub)
    return usable


def _openpgp_record(
    key: ColonKey, material: bytes, now: datetime, address: str | None, allow_revoked: bool
) -> ValidatedKey:
    primary = key.primary
    user_ids = tuple(u.text for u in key.uids if not u.attribute and u.usable)
    key_addresses = _canonical_unique([a for a in map(uid_address, user_ids) if a])
    created = primary.created or now
    revoked = "r" in primary.validity
    if revoked:
        if not allow_revoked:
            raise KeyRejected("the key is revoked")
        return ValidatedKey(
            kind=OPENPGP,
            fingerprint=key.fingerprint,
            algorithm=primary.algorithm_name(),
            material=material,
            addresses=(),
            key_addresses=tuple(key_addresses),
            user_ids=user_ids,
            created_at=created,
            expires_at=primary.expires,
            encryption_expires_at=None,
            revoked=True,
        )
    if "e" in primary.validity or (primary.expires is not None and primary.expires <= now):
        when = primary.expires.isoformat() if primary.expires else "an unknown date"
        raise KeyRejected(f"the key expired on {when}")
    if set(primary.validity) & set("id"):
        raise KeyRejected("gpg considers the key invalid (no valid self-signature)")
    if primary.created is not None and primary.created > now:
        raise KeyRejected(f"the key was created in the future ({primary.created.isoformat()})")
    encryption = _encryption_keys(key, now)
    if not encryption or "E" not in primary.capabilities:
        raise KeyRejected(
            "the key has no usable encryption subkey (signing-only, or every encryption subkey "
            "is expired or revoked)"
        )
    expiries = [sub.expires for sub in encryption]
    encryption_expires = None if any(e is None for e in expiries) else max(e for e in expiries if e)
    newest = max(encryption, key=lambda s: s.created or created)
    algorithm = primary.algorithm_name()
    if newest is not primary:
        algorithm += f"/{newest.algorithm_name()}"
    return ValidatedKey(
        kind=OPENPGP,
        fingerprint=key.fingerprint,
        algorithm=algorithm,
        material=material,
        addresses=_select_addresses(key_addresses, address, "key"),
        key_addresses=tuple(key_addresses),
        user_ids=user_ids,
        created_at=created,
        expires_at=primary.expires,
        encryption_expires_at=encryption_expires,
    )


# --- S/MIME ---------------------------------------------------------------------------------------


def _smime_pem(data: bytes, now: datetime, address: str | None, limits: KeyLimits) -> ValidatedKey:
    labels = [m.group(1).decode("ascii") for m in _PEM_BLOCK.finditer(data)]
    others = sorted({label for label in labels if label != "CERTIFICATE"})
    if others:
        raise KeyRejected(
            f"unexpected PEM block(s) {', '.join(others)}; only one CERTIFICATE is accepted"
        )
    if len(labels) != 1:
        raise KeyRejected(f"the file holds {len(labels)} certificates; import one per file")
    try:
        cert = x509.load_pem_x509_certificate(data)
    except ValueError as error:
        raise KeyRejected(f"not a valid PEM certificate ({_short(str(error))})") from None
    return _smime_record(cert, now, address, limits)


def _smime_der(data: bytes, now: datetime, address: str | None, limits: KeyLimits) -> ValidatedKey:
    try:
        cert = x509.load_der_x509_certificate(data)
    except ValueError:
        cert = None
    if cert is None:
        if _is_der_private_key(data):
            raise KeyRejected(
                "the file is a private key; only public keys and certificates are accepted, "
                "and nothing of this file was stored"
            )
        raise KeyRejected("not a valid DER certificate")
    return _smime_record(cert, now, address, limits)


def _is_der_private_key(data: bytes) -> bool:
    try:
        serialization.load_der_private_key(data, password=None)
    except TypeError:  # an encrypted private key: a password would be needed
        return True
    except (ValueError, UnsupportedAlgorithm):
        return False
    return True


def _smime_addresses(cert: x509.Certificate) -> list[str]:
    found: list[str] = []
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        found.extend(san.get_values_for_type(x509.RFC822Name))
    except x509.ExtensionNotFound:
        pass
    for attribute in cert.subject.get_attributes_for_oid(NameOID.EMAIL_ADDRESS):
        value = attribute.value
        found.append(value if isinstance(value, str) else value.decode("utf-8", "replace"))
    return found


def _extension(cert: x509.Certificate, cls: type[x509.ExtensionType]) -> x509.ExtensionType | None:
    try:
        return cert.extensions.get_extension_for_class(cls).value
    except x509.ExtensionNotFound:
        return None


def _smime_record(
    cert: x509.Certificate, now: datetime, address: str | None, limits: KeyLimits
) -> ValidatedKey:
    try:
        extensions = cert.extensions
    except ValueError as error:
        raise KeyRejected(
            f"the certificate has malformed extensions ({_short(str(error))})"
        ) from None
    del extensions
    not_before, not_after = cert.not_valid_before_utc, cert.not_valid_after_utc
    if not_after <= now:
        raise KeyRejected(f"the certificate expired on {not_after.isoformat()}")
    if not_before > now:
        raise KeyRejected(f"the certificate is not valid before {not_before.isoformat()}")
    constraints = _extension(cert, x509.BasicConstraints)
    if isinstance(constraints, x509.BasicConstraints) and constraints.ca:
        raise KeyRejected("the certificate is a CA certificate, not a recipient's")
    try:
        public_key = cert.public_key()
    except (ValueError, UnsupportedAlgorithm):
        raise KeyRejected("the certificate's public key is not supported") from None
    usage = _extension(cert, x509.KeyUsage)
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < MIN_RSA_BITS:
            raise KeyRejected(
                f"the certificate's RSA key has {public_key.key_size} bits (at least "
                f"{MIN_RSA_BITS} are required)"
            )
        algorithm = f"rsa{public_key.key_size}"
        if isinstance(usage, x509.KeyUsage) and not usage.key_encipherment:
            raise KeyRejected(
                "the certificate's keyUsage does not allow encryption (keyEncipherment)"
            )
    elif isinstance(public_key, ec.EllipticCurvePublicKey):
        raise KeyRejected(
            f"the certificate has an EC key ({public_key.curve.name}): Mailward encrypts S/MIME "
            "to RSA certificates only (its CMS envelope builder has no EC key agreement); "
            "import an RSA certificate for this address"
        )
    else:
        raise KeyRejected("the certificate's key is neither RSA nor EC")
    eku = _extension(cert, x509.ExtendedKeyUsage)
    if isinstance(eku, x509.ExtendedKeyUsage) and not (
        ExtendedKeyUsageOID.EMAIL_PROTECTION in eku
        or ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE in eku
    ):
        raise KeyRejected("the certificate's extendedKeyUsage does not include emailProtection")
    raw_addresses = _smime_addresses(cert)
    if len(raw_addresses) > limits.max_user_ids:
        raise KeyRejected(
            f"the certificate names {len(raw_addresses)} addresses, more than the limit of "
            f"{limits.max_user_ids} (keys.max_user_ids)"
        )
    key_addresses = _canonical_unique(raw_addresses)
    der = cert.public_bytes(serialization.Encoding.DER)
    return ValidatedKey(
        kind=SMIME,
        fingerprint=hashlib.sha256(der).hexdigest().upper(),
        algorithm=algorithm,
        material=der,
        addresses=_select_addresses(key_addresses, address, "certificate"),
        key_addresses=tuple(key_addresses),
        user_ids=(cert.subject.rfc4514_string(),),
        created_at=not_before,
        expires_at=not_after,
        encryption_expires_at=None,
    )
