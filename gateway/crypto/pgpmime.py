"""PGP/MIME encryption (RFC 3156) of a received message, with header protection (RFC 9788).

What it does: :func:`encrypt_pgpmime` turns a message into

* the outer header section of :func:`gateway.crypto.protect.protect` (placeholder Subject, no
  ``Content-*``), then ``MIME-Version: 1.0`` and ``Content-Type: multipart/encrypted;
  protocol="application/pgp-encrypted"; boundary=...``;
* a first part ``application/pgp-encrypted`` whose body is ``Version: 1``;
* a second part ``application/octet-stream; name="encrypted.asc"`` (inline) holding the ASCII-armored
  ciphertext of the inner entity: the original ``Content-*`` fields and body bytes as received, plus
  the protected header fields.

All lines end in CRLF. :class:`GpgEngine` wraps one ``gnupg.GPG`` bound to a GNUPGHOME (the key
store keeps one in sync; tests make their own): building it runs gpg once (``--list-config``); each
:meth:`GpgEngine.encrypt` runs exactly one gpg process (about 4 ms for 2 KB here), with recipients
by fingerprint and ``--trust-model always`` (the key store, not gpg's web of trust, decides which key
is valid, including expiry and revocation at use time), and never lists the keyring. Build the
engine once (composition root) and reuse it; :func:`encrypt_pgpmime` also accepts a home directory
path for convenience, at the cost of one more gpg run. ``encrypt`` blocks: call it from a worker
thread (``asyncio.to_thread``), never on the event loop.

Hidden recipients: ``hidden_recipients=True`` adds ``--throw-keyids``, so every PKESK packet carries
key id 0000000000000000 (recipients then find their session key by trial decryption). The grouping
in :mod:`gateway.crypto.groups` decides when it is used.

Reads: the GNUPGHOME it is given (public keys only; gpg is run with ``--no-options``, so a
``gpg.conf`` there, e.g. with ``encrypt-to``, cannot add recipients or change behaviour).

Security notes: gpg's status output is reduced to status keywords in errors; the plaintext never
appears in logs or exceptions. ``--no-encrypt-to``, ``--disable-dirmngr`` and
``--no-auto-key-locate`` keep gpg from adding recipients or fetching keys over the network;
``--no-autostart`` from starting an agent (public-key encryption needs none); its environment is
reduced to ``PATH`` and the C locale, as in :mod:`gateway.keys.gpg`. python-gnupg has no timeout:
gpg in batch mode with public keys only has nothing to wait for. A
fingerprint is validated (40 or 64 hex digits) before it reaches the command line. Any gpg failure
(unknown, expired or revoked key, gpg missing) raises
:class:`~gateway.crypto.errors.EncryptionFailed`: nothing is ever sent in clear instead.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import gnupg

from gateway.crypto.errors import EncryptionFailed
from gateway.crypto.protect import (
    CRLF,
    DEFAULT_PROTECTION,
    HeaderProtection,
    assemble,
    new_boundary,
    protect,
)

_FINGERPRINT = re.compile(r"[0-9A-F]{40}|[0-9A-F]{64}")
_ARMOR_BEGIN = b"-----BEGIN PGP MESSAGE-----"
GPG_OPTIONS = (
    "--no-options",
    "--no-autostart",
    "--no-encrypt-to",
    "--disable-dirmngr",
    "--no-auto-key-locate",
    "--no-auto-key-retrieve",
)
PREAMBLE = b"This is an OpenPGP/MIME encrypted message (RFC 3156 and RFC 4880)." + CRLF


class HasFingerprint(Protocol):
    """Anything that names an OpenPGP key by fingerprint (e.g. the key store's key material)."""

    @property
    def fingerprint(self) -> str: ...


KeyRef = str | HasFingerprint


def normalize_fingerprint(key: KeyRef) -> str:
    """Upper-case hex without spaces; :class:`EncryptionFailed` unless it is a v4/v5 fingerprint."""
    text = key if isinstance(key, str) else key.fingerprint
    fingerprint = text.replace(" ", "").upper()
    if not _FINGERPRINT.fullmatch(fingerprint):
        raise EncryptionFailed("not an OpenPGP fingerprint (40 or 64 hex digits)")
    return fingerprint


class GpgEngine:
    """One gpg binary and GNUPGHOME; :meth:`encrypt` runs one gpg process per call (thread-safe)."""

    def __init__(self, home: str | os.PathLike[str], *, binary: str = "gpg") -> None:
        self.home = Path(home)
        try:
            self._gpg = gnupg.GPG(
                gpgbinary=binary,
                gnupghome=str(home),
                options=list(GPG_OPTIONS),
                env=_environment(),
            )
        except (OSError, ValueError) as exc:
            raise EncryptionFailed(
                f"cannot run gpg {binary!r} with GNUPGHOME {self.home}: {type(exc).__name__}"
            ) from exc

    def encrypt(
        self, data: bytes, fingerprints: Sequence[str], *, hidden_recipients: bool = False
    ) -> bytes:
        """The ASCII-armored ciphertext of ``data`` for the keys, with CRLF line endings."""
        if not fingerprints:
            raise EncryptionFailed("no OpenPGP recipient key")
        extra = ["--throw-keyids"] if hidden_recipients else []
        try:
            result = self._gpg.encrypt(
                data, list(fingerprints), armor=True, always_trust=True, extra_args=extra
            )
        except (OSError, ValueError) as exc:
            raise EncryptionFailed(f"gpg could not run: {type(exc).__name__}") from exc
        armored: bytes = result.data or b""
        if not result.ok or not armored.startswith(_ARMOR_BEGIN):
            raise EncryptionFailed(
                f"gpg refused to encrypt for {', '.join(fingerprints)}: "
                f"{result.status or 'no status'} [{_status_keywords(result.stderr)}]"
            )
        return armored.replace(b"\r\n", b"\n").replace(b"\n", CRLF)


def encrypt_pgpmime(
    message: bytes,
    *,
    recipients_keys: Sequence[KeyRef],
    gnupg_home: GpgEngine | str | os.PathLike[str],
    hidden_recipients: bool = False,
    protection: HeaderProtection = DEFAULT_PROTECTION,
) -> bytes:
    """``message`` as an RFC 3156 PGP/MIME message for ``recipients_keys`` (CRLF, 7-bit body)."""
    fingerprints = list(dict.fromkeys(normalize_fingerprint(key) for key in recipients_keys))
    engine = gnupg_home if isinstance(gnupg_home, GpgEngine) else GpgEngine(gnupg_home)
    parts = protect(message, protection)
    armored = engine.encrypt(parts.inner_entity, fingerprints, hidden_recipients=hidden_recipients)
    boundary = new_boundary().encode("ascii")
    delimiter = b"--" + boundary + CRLF
    body = b"".join(
        [
            PREAMBLE,
            CRLF,
            delimiter,
            b"Content-Type: application/pgp-encrypted\r\n",
            b"Content-Description: PGP/MIME version identification\r\n",
            CRLF,
            b"Version: 1\r\n",
            CRLF,
            delimiter,
            b'Content-Type: application/octet-stream; name="encrypted.asc"\r\n',
            b"Content-Description: OpenPGP encrypted message\r\n",
            b'Content-Disposition: inline; filename="encrypted.asc"\r\n',
            CRLF,
            armored,
            CRLF,
            b"--" + boundary + b"--" + CRLF,
        ]
    )
    content_type = (
        b'Content-Type: multipart/encrypted; protocol="application/pgp-encrypted";\r\n'
        b' boundary="' + boundary + b'"\r\n'
    )
    return assemble(parts.outer_headers, [content_type], body)


def _environment() -> dict[str, str]:
    """gpg's environment: PATH and the C locale only (no inherited GNUPGHOME or agent variables)."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "LANG": "C"}


def _status_keywords(stderr: object) -> str:
    """gpg's ``[GNUPG:]`` status keywords (e.g. ``INV_RECP 5 <fpr>``, ``KEYEXPIRED``), bounded."""
    if not isinstance(stderr, str):
        return ""
    words = []
    for line in stderr.splitlines():
        if line.startswith("[GNUPG:] "):
            status = line[9:].split()
            if status and status[0] in {
                "INV_RECP",
                "KEYEXPIRED",
                "KEYREVOKED",
                "NO_RECP",
                "FAILURE",
            }:
                words.append(" ".join(status[:3]))
    return "; ".join(words)[:300]
