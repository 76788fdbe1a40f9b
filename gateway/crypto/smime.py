"""S/MIME enveloped data (RFC 8551) of a received message, with header protection (RFC 9788).

What it does: :func:`encrypt_smime` turns a message into the outer header section of
:func:`gateway.crypto.protect.protect` (placeholder Subject, no ``Content-*``), then
``MIME-Version: 1.0``, ``Content-Type: application/pkcs7-mime; smime-type=enveloped-data;
name="smime.p7m"``, ``Content-Transfer-Encoding: base64`` and the base64 (76-character CRLF lines)
DER of a CMS EnvelopedData built by ``cryptography``'s ``PKCS7EnvelopeBuilder``: AES-256-CBC content
encryption, one RSA (PKCS #1 v1.5 key transport) RecipientInfo per certificate. The encrypted
content is the inner entity of :func:`~gateway.crypto.protect.protect`: the original ``Content-*``
fields and body bytes as received (``PKCS7Options.Binary``: no line-ending conversion; they are CRLF
already) plus the protected header fields. Pure computation, well under a millisecond for 2 KB.

Needs ``cryptography`` >= 45 (AES-256 content encryption). ``cryptography`` can only encrypt to
RSA certificates: an EC certificate raises :class:`~gateway.crypto.errors.EncryptionFailed` (the key
store should refuse such certificates at import).

Reads: the certificates it is given (public material only).

Security notes: a RecipientInfo names its certificate (issuer and serial number) in clear: there is
no hidden-recipient mode in CMS, which is why :mod:`gateway.crypto.groups` gives every Bcc
recipient a copy of its own. Errors name certificate fingerprints, never message content.
"""

from __future__ import annotations

import binascii
from collections.abc import Sequence

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import algorithms
from cryptography.hazmat.primitives.serialization import Encoding, pkcs7

from gateway.crypto.errors import EncryptionFailed
from gateway.crypto.protect import CRLF, DEFAULT_PROTECTION, HeaderProtection, assemble, protect

MIME_FIELDS = (
    b'Content-Type: application/pkcs7-mime; smime-type=enveloped-data;\r\n name="smime.p7m"\r\n',
    b"Content-Transfer-Encoding: base64\r\n",
    b'Content-Disposition: attachment; filename="smime.p7m"\r\n',
    b"Content-Description: S/MIME Encrypted Message\r\n",
)
_BASE64_CHUNK = 57  # 57 bytes → one 76-character line


def certificate_fingerprint(certificate: x509.Certificate) -> str:
    """The certificate's SHA-256 fingerprint, upper-case hex (how audit and the key store name it)."""
    return certificate.fingerprint(hashes.SHA256()).hex().upper()


def envelope(data: bytes, certificates: Sequence[x509.Certificate]) -> bytes:
    """The DER CMS EnvelopedData (AES-256) of ``data`` for each distinct certificate."""
    unique = list({certificate_fingerprint(cert): cert for cert in certificates}.items())
    if not unique:
        raise EncryptionFailed("no S/MIME recipient certificate")
    try:
        builder = (
            pkcs7.PKCS7EnvelopeBuilder()
            .set_data(data)
            .set_content_encryption_algorithm(algorithms.AES256)
        )
        for fingerprint, certificate in unique:
            try:
                builder = builder.add_recipient(certificate)
            except TypeError as exc:
                raise EncryptionFailed(
                    f"certificate {fingerprint} cannot be encrypted to (RSA only)"
                ) from exc
        return builder.encrypt(Encoding.DER, [pkcs7.PKCS7Options.Binary])
    except (TypeError, ValueError, UnsupportedAlgorithm) as exc:
        names = ", ".join(fingerprint for fingerprint, _ in unique)
        raise EncryptionFailed(
            f"S/MIME encryption failed for {names}: {type(exc).__name__}"
        ) from exc


def base64_lines(data: bytes) -> bytes:
    """RFC 2045 base64: 76-character lines, each ending in CRLF."""
    return b"".join(
        binascii.b2a_base64(data[i : i + _BASE64_CHUNK], newline=False) + CRLF
        for i in range(0, len(data), _BASE64_CHUNK)
    )


def encrypt_smime(
    message: bytes,
    *,
    certificates: Sequence[x509.Certificate],
    protection: HeaderProtection = DEFAULT_PROTECTION,
) -> bytes:
    """``message`` as an RFC 8551 ``application/pkcs7-mime`` enveloped-data message (CRLF)."""
    parts = protect(message, protection)
    return assemble(
        parts.outer_headers, MIME_FIELDS, base64_lines(envelope(parts.inner_entity, certificates))
    )
