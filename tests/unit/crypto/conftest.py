"""Test-time keys for the encryption transforms: real gpg keys and real S/MIME certificates.

What it does: session fixtures ``pgp`` (recipients Bob, Carol and Dave with ed25519/cv25519 keys,
Erin with RSA-2048 keys, and Olga whose key expired in 2020; each recipient has a GNUPGHOME of its
own holding its secret key, and ``pgp.gateway_home`` holds all their public keys only, as the
gateway's would) and ``smime`` (RSA-2048 self-signed certificates with an rfc822Name
subjectAltName for bob and carol, plus an EC certificate that cryptography cannot encrypt to), and
the message helpers every crypto test uses (:data:`MULTIPART`, :func:`body_of`, :func:`gpg_run`).

Reads/writes: pytest's temporary directories only (``gpg --homedir``). Every gpg-agent started for a
recipient home is stopped at teardown (``gpgconf --homedir H --kill gpg-agent``).

Security notes: test-only keys without passphrase, generated per session, never committed.
"""

from __future__ import annotations

import base64
import datetime as dt
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import gnupg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    CertificatePublicKeyTypes,
)
from cryptography.x509.oid import NameOID

GPG_ENV = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}


def gpg_run(home: Path, *args: str, data: bytes | None = None, check: bool = True) -> bytes:
    """Run gpg on ``home`` in batch mode; stdout (stderr is in the exception when ``check``)."""
    proc = subprocess.run(
        ["gpg", "--homedir", str(home), "--batch", "--no-tty", *args],
        input=data,
        capture_output=True,
        env=GPG_ENV,
        timeout=120,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"gpg {args} failed: {proc.stderr.decode(errors='replace')}")
    return proc.stdout


@dataclass(frozen=True)
class PgpPerson:
    address: str
    home: Path  # holds this person's secret key
    fingerprint: str  # primary key
    encryption_keyid: str  # the encryption subkey's 16-hex key id (what a PKESK names)

    def decrypt(self, data: bytes) -> bytes:
        """Decrypt with this person's secret key (python-gnupg); AssertionError when gpg cannot.

        Success is gpg's DECRYPTION_OKAY status, not its exit code: with hidden recipients gpg
        reports the failed trial decryptions and exits non-zero even when one key fits."""
        result = gnupg.GPG(gnupghome=str(self.home), env=GPG_ENV).decrypt(data)
        if not result.ok:
            raise AssertionError(f"gpg cannot decrypt for {self.address}: {result.status}")
        return bytes(result.data)


@dataclass
class PgpKeys:
    gateway_home: Path
    people: dict[str, PgpPerson] = field(default_factory=dict)

    def __getitem__(self, name: str) -> PgpPerson:
        return self.people[name]


def _make_home(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True)
    return path


def _new_key(
    home: Path, uid: str, primary: str, sub: str, expire: str = "never", *faketime: str
) -> tuple[str, str]:
    gpg_run(
        home, *faketime, "--passphrase", "", "--quick-gen-key", uid, primary, "sign,cert", expire
    )
    listing = gpg_run(home, "--with-colons", "--list-keys", uid).decode()
    fingerprint = next(line.split(":")[9] for line in listing.splitlines() if line[:4] == "fpr:")
    gpg_run(
        home, *faketime, "--passphrase", "", "--quick-add-key", fingerprint, sub, "encr", expire
    )
    listing = gpg_run(home, *faketime, "--with-colons", "--list-keys", fingerprint).decode()
    keyid = next(line.split(":")[4] for line in listing.splitlines() if line[:4] == "sub:")
    return fingerprint, keyid


@pytest.fixture(scope="session")
def pgp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PgpKeys]:
    root = tmp_path_factory.mktemp("pgp")
    keys = PgpKeys(_make_home(root / "gw"))
    specs = {
        "bob": ("Bob <bob@example.net>", "ed25519", "cv25519", "never", ()),
        "carol": ("Carol <carol@example.org>", "ed25519", "cv25519", "never", ()),
        "dave": ("Dave <dave@example.com>", "ed25519", "cv25519", "never", ()),
        "erin": ("Erin <erin@example.org>", "rsa2048", "rsa2048", "never", ()),
        "olga": (
            "Olga <olga@example.net>",
            "ed25519",
            "cv25519",
            "2020-06-01",
            ("--faked-system-time", "20200101T000000"),
        ),
    }
    try:
        for name, (uid, primary, sub, expire, faketime) in specs.items():
            home = _make_home(root / name)
            fingerprint, keyid = _new_key(home, uid, primary, sub, expire, *faketime)
            public = gpg_run(home, "--export", fingerprint)
            gpg_run(keys.gateway_home, "--import", data=public)
            address = uid.split("<")[1].rstrip(">")
            keys.people[name] = PgpPerson(address, home, fingerprint, keyid.upper())
        yield keys
    finally:
        for home in [keys.gateway_home, *(root / name for name in specs)]:
            subprocess.run(
                ["gpgconf", "--homedir", str(home), "--kill", "gpg-agent"],
                capture_output=True,
                env=GPG_ENV,
                timeout=30,
            )


@dataclass(frozen=True)
class SmimePerson:
    address: str
    certificate: x509.Certificate
    key: rsa.RSAPrivateKey
    cert_file: Path
    key_file: Path


def _certificate(
    address: str, public_key: CertificatePublicKeyTypes, signer: CertificateIssuerPrivateKeyTypes
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, address)])
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([x509.RFC822Name(address)]), critical=False)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(signer, hashes.SHA256())
    )


@pytest.fixture(scope="session")
def smime(tmp_path_factory: pytest.TempPathFactory) -> dict[str, SmimePerson]:
    root = tmp_path_factory.mktemp("smime")
    people = {}
    for name, address in (("bob", "bob@example.net"), ("carol", "carol@example.org")):
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        cert = _certificate(address, key.public_key(), key)
        cert_file, key_file = root / f"{name}.crt", root / f"{name}.key"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        people[name] = SmimePerson(address, cert, key, cert_file, key_file)
    return people


@pytest.fixture(scope="session")
def ec_certificate() -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    return _certificate("ec@example.net", key.public_key(), key)


# --- messages -------------------------------------------------------------------------------------

ATTACHMENT = bytes(range(256)) * 8
ATTACHMENT_B64 = base64.encodebytes(ATTACHMENT).replace(b"\n", b"\r\n").rstrip(b"\r\n")
UTF8_TEXT = "Grüße aus Köln — 日本語のテキスト, ελληνικά.\r\nZweite Zeile.\r\n".encode()

MULTIPART_HEADERS = (
    b"Received: from client.example (client.example [192.0.2.1]) by mua\r\n"
    b"From: Alice <alice@example.com>\r\n"
    b"To: Bob <bob@example.net>\r\n"
    b"Cc: carol@example.org\r\n"
    b"Subject: =?utf-8?q?Quartalszahlen_f=C3=BCr_Q3?= (confidential)\r\n"
    b"Date: Tue, 02 Sep 2025 10:00:00 +0200\r\n"
    b"Message-ID: <m1@example.com>\r\n"
    b"Keywords: finance, q3\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed;\r\n boundary="==outer=="\r\n'
)
MULTIPART_BODY = (
    b"This is a multi-part message in MIME format.\r\n"
    b"\r\n"
    b"--==outer==\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n" + UTF8_TEXT + b"\r\n"
    b"--==outer==\r\n"
    b"Content-Type: text/html; charset=iso-8859-1\r\n"
    b"Content-Transfer-Encoding: quoted-printable\r\n"
    b"\r\n"
    b"<p>Gr=FC=DFe =\r\naus K=F6ln</p>\r\n"
    b"--==outer==\r\n"
    b'Content-Type: application/octet-stream; name="data.bin"\r\n'
    b"Content-Transfer-Encoding: base64\r\n"
    b'Content-Disposition: attachment; filename="data.bin"\r\n'
    b"\r\n" + ATTACHMENT_B64 + b"\r\n"
    b"--==outer==--\r\n"
)
MULTIPART = MULTIPART_HEADERS + b"\r\n" + MULTIPART_BODY
REAL_SUBJECT = "Quartalszahlen für Q3 (confidential)"


def body_of(entity: bytes) -> bytes:
    """The bytes after the first blank line of a MIME entity."""
    return entity.split(b"\r\n\r\n", 1)[1]


def has_only_crlf(data: bytes) -> bool:
    return data.count(b"\r") == data.count(b"\n") == data.count(b"\r\n")
