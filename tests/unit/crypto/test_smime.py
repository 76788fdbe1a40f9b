"""S/MIME enveloped data (RFC 8551) with real cryptography and the real openssl command.

What it tests: :func:`encrypt_smime` output parsed with the ``email`` package (application/pkcs7-mime,
smime-type=enveloped-data, name smime.p7m, base64 in CRLF lines of at most 76 characters,
placeholder Subject outside, no plaintext outside); decrypted with ``openssl cms -decrypt`` and
with ``cryptography``'s ``pkcs7_decrypt_der`` / ``pkcs7_decrypt_smime``: the inner entity carries the
original body bytes exactly and the real Subject with ``hp="cipher"``; the content cipher is
AES-256-CBC (``openssl cms -cmsout -print``); each of several recipients decrypts, an outsider
cannot; a Bcc copy from :func:`encrypt_group` is readable by its recipient only; an EC certificate
or no certificate raises ``EncryptionFailed``.

Reads: the session's test certificates (tests/unit/crypto/conftest.py); writes temp files for openssl.

Security notes: the outsider and Bcc cases check that a copy names only the intended recipients.
"""

from __future__ import annotations

import base64
import subprocess
from email import message_from_bytes, policy
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import pkcs7

from gateway.core import replies
from gateway.crypto import (
    Decision,
    EncryptionFailed,
    certificate_fingerprint,
    encrypt_group,
    encrypt_smime,
    group_recipients,
    is_encrypted,
    named_addresses,
)
from tests.unit.crypto.conftest import (
    MULTIPART,
    MULTIPART_BODY,
    REAL_SUBJECT,
    SmimePerson,
    body_of,
    has_only_crlf,
)


def openssl_decrypt(message: bytes, person: SmimePerson, tmp_path: Path) -> bytes:
    path = tmp_path / "message.eml"
    path.write_bytes(message)
    proc = subprocess.run(
        [
            "openssl",
            "cms",
            "-decrypt",
            "-binary",
            "-in",
            str(path),
            "-recip",
            str(person.cert_file),
            "-inkey",
            str(person.key_file),
        ],
        capture_output=True,
        timeout=60,
    )
    if proc.returncode != 0:
        raise AssertionError(f"openssl cms -decrypt failed: {proc.stderr.decode(errors='replace')}")
    return proc.stdout


def der_of(message: bytes) -> bytes:
    return base64.b64decode(body_of(message))


def test_structure_is_rfc8551(smime: dict[str, SmimePerson]) -> None:
    out = encrypt_smime(MULTIPART, certificates=[smime["bob"].certificate])
    assert has_only_crlf(out) and out.isascii()
    parsed = message_from_bytes(out, policy=policy.default)
    assert parsed.get_content_type() == "application/pkcs7-mime"
    assert parsed.get_param("smime-type") == "enveloped-data"
    assert parsed.get_param("name") == "smime.p7m"
    assert parsed["Content-Transfer-Encoding"] == "base64"
    assert parsed.get_filename() == "smime.p7m"
    assert parsed["Subject"] == "..."
    assert parsed["To"] == "Bob <bob@example.net>"
    assert parsed["Message-ID"] == "<m1@example.com>"
    assert parsed["Keywords"] is None
    lines = body_of(out).split(b"\r\n")
    assert lines[-1] == b""
    assert all(0 < len(line) <= 76 for line in lines[:-1])
    assert all(len(line) == 76 for line in lines[:-2])
    assert b"Quartalszahlen" not in out and b"==outer==" not in out
    assert is_encrypted(out)


def test_openssl_decrypts_to_the_original_body(
    smime: dict[str, SmimePerson], tmp_path: Path
) -> None:
    out = encrypt_smime(MULTIPART, certificates=[smime["bob"].certificate])
    inner = openssl_decrypt(out, smime["bob"], tmp_path)
    assert body_of(inner) == MULTIPART_BODY
    assert has_only_crlf(inner)
    parsed = message_from_bytes(inner, policy=policy.default)
    assert parsed["Subject"] == REAL_SUBJECT
    assert parsed.get_param("hp") == "cipher"
    assert [p.get_content_type() for p in parsed.iter_parts()] == [
        "text/plain",
        "text/html",
        "application/octet-stream",
    ]


def test_cryptography_decrypts_to_the_original_body(smime: dict[str, SmimePerson]) -> None:
    bob = smime["bob"]
    out = encrypt_smime(MULTIPART, certificates=[bob.certificate])
    from_der = pkcs7.pkcs7_decrypt_der(der_of(out), bob.certificate, bob.key, [])
    from_smime = pkcs7.pkcs7_decrypt_smime(out, bob.certificate, bob.key, [])
    assert from_der == from_smime
    assert body_of(from_der) == MULTIPART_BODY


def test_content_cipher_is_aes_256(smime: dict[str, SmimePerson], tmp_path: Path) -> None:
    path = tmp_path / "m.eml"
    path.write_bytes(encrypt_smime(MULTIPART, certificates=[smime["bob"].certificate]))
    proc = subprocess.run(
        ["openssl", "cms", "-cmsout", "-print", "-in", str(path)],
        capture_output=True,
        check=True,
        timeout=60,
    )
    assert b"aes-256-cbc" in proc.stdout
    assert b"aes-128" not in proc.stdout


def test_each_recipient_decrypts_an_outsider_cannot(
    smime: dict[str, SmimePerson], tmp_path: Path
) -> None:
    bob, carol = smime["bob"], smime["carol"]
    out = encrypt_smime(MULTIPART, certificates=[bob.certificate, carol.certificate])
    for person in (bob, carol):
        assert body_of(openssl_decrypt(out, person, tmp_path)) == MULTIPART_BODY
    only_bob = encrypt_smime(MULTIPART, certificates=[bob.certificate, bob.certificate])
    with pytest.raises(AssertionError):
        openssl_decrypt(only_bob, carol, tmp_path)
    with pytest.raises(ValueError):
        pkcs7.pkcs7_decrypt_der(der_of(only_bob), carol.certificate, carol.key, [])


def test_bcc_copy_is_for_its_recipient_only(smime: dict[str, SmimePerson], tmp_path: Path) -> None:
    bob, carol = smime["bob"], smime["carol"]
    message = MULTIPART.replace(b"Cc: carol@example.org\r\n", b"")  # carol becomes a Bcc
    decisions = {p.address: Decision.smime(p.certificate) for p in (bob, carol)}
    groups = group_recipients([bob.address, carol.address], named_addresses(message), decisions)
    assert [(g.recipients, g.bcc) for g in groups] == [
        ((bob.address,), False),
        ((carol.address,), True),
    ]
    named_copy, bcc_copy = (encrypt_group(message, g, gnupg_home="/nonexistent") for g in groups)
    assert body_of(openssl_decrypt(bcc_copy, carol, tmp_path)) == body_of(message)
    with pytest.raises(AssertionError):
        openssl_decrypt(bcc_copy, bob, tmp_path)
    with pytest.raises(AssertionError):
        openssl_decrypt(named_copy, carol, tmp_path)


def test_ec_certificate_is_refused(
    smime: dict[str, SmimePerson], ec_certificate: x509.Certificate
) -> None:
    with pytest.raises(EncryptionFailed, match="RSA only") as caught:
        encrypt_smime(MULTIPART, certificates=[smime["bob"].certificate, ec_certificate])
    assert certificate_fingerprint(ec_certificate) in str(caught.value)
    assert caught.value.reply is replies.ENCRYPTION_FAILED


def test_no_certificate_is_refused() -> None:
    with pytest.raises(EncryptionFailed, match="no S/MIME recipient"):
        encrypt_smime(MULTIPART, certificates=[])


def test_certificate_fingerprint_is_sha256_upper_hex(smime: dict[str, SmimePerson]) -> None:
    fingerprint = certificate_fingerprint(smime["bob"].certificate)
    assert len(fingerprint) == 64 and fingerprint == fingerprint.upper()
    assert Decision.smime(smime["bob"].certificate).fingerprint == fingerprint
