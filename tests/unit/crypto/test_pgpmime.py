"""PGP/MIME (RFC 3156) with real gpg: structure, round trips, hidden recipients, refusals.

What it tests: :func:`encrypt_pgpmime` output parsed with the ``email`` package (multipart/encrypted,
``protocol`` parameter, the ``Version: 1`` part, the inline ``encrypted.asc`` part, placeholder
Subject outside, CRLF everywhere, no plaintext outside) and decrypted with the recipient's own gpg
secret key: the inner entity carries the original body bytes exactly (8bit UTF-8, quoted-printable
and base64 parts) and the real Subject with ``hp="cipher"``. Several recipients each decrypt the
same copy; ``gpg --list-packets`` shows the recipients' key ids, or 0000000000000000 for each PKESK
with ``hidden_recipients``; a Bcc recipient's copy (from :func:`group_recipients` and
:func:`encrypt_group`) names only its key and cannot be read by the others. Refusals: unknown,
expired and malformed keys, no key, a missing GNUPGHOME or gpg binary all raise
``EncryptionFailed``; an ``encrypt-to`` in the gateway home's gpg.conf adds no recipient.

Reads: the session's test keys (tests/unit/crypto/conftest.py); writes temporary GNUPGHOMEs.

Security notes: the gpg.conf and Bcc cases are the Bcc-leak failures of older gateways.
"""

from __future__ import annotations

import re
import shutil
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path

import pytest

from gateway.core import replies
from gateway.crypto import (
    Decision,
    EncryptionFailed,
    Format,
    GpgEngine,
    encrypt_group,
    encrypt_pgpmime,
    group_recipients,
    named_addresses,
    normalize_fingerprint,
)
from gateway.crypto.protect import HeaderProtection
from tests.unit.crypto.conftest import (
    MULTIPART,
    MULTIPART_BODY,
    REAL_SUBJECT,
    PgpKeys,
    body_of,
    gpg_run,
    has_only_crlf,
)

ARMOR = re.compile(rb"-----BEGIN PGP MESSAGE-----\r\n.*?-----END PGP MESSAGE-----\r\n", re.S)


@pytest.fixture(scope="module")
def engine(pgp: PgpKeys) -> GpgEngine:
    return GpgEngine(pgp.gateway_home)


def armored_part(message: bytes) -> bytes:
    found = ARMOR.search(message)
    assert found, "no armored ciphertext"
    return found.group(0)


def pkesk_keyids(armored: bytes, tmp_path: Path) -> list[str]:
    """The key ids of the PKESK packets, read by gpg in an empty home (no secret key, no agent)."""
    home = tmp_path / "listing"
    home.mkdir(mode=0o700, exist_ok=True)
    out = gpg_run(home, "--no-autostart", "--list-packets", data=armored, check=False).decode()
    return re.findall(r":pubkey enc packet: .*keyid ([0-9A-F]{16})", out)


def test_structure_is_rfc3156(pgp: PgpKeys, engine: GpgEngine) -> None:
    out = encrypt_pgpmime(MULTIPART, recipients_keys=[pgp["bob"].fingerprint], gnupg_home=engine)
    assert has_only_crlf(out)
    assert out.isascii()
    parsed = message_from_bytes(out, policy=policy.default)
    assert isinstance(parsed, EmailMessage)
    assert parsed.get_content_type() == "multipart/encrypted"
    assert parsed.get_param("protocol") == "application/pgp-encrypted"
    assert parsed["MIME-Version"] == "1.0"
    assert parsed["Subject"] == "..."
    assert parsed["From"] == "Alice <alice@example.com>"
    assert parsed["To"] == "Bob <bob@example.net>"
    assert parsed["Cc"] == "carol@example.org"
    assert parsed["Message-ID"] == "<m1@example.com>"
    assert parsed["Keywords"] is None
    assert len(parsed.get_all("Content-Type") or []) == 1
    version, payload = parsed.get_payload()
    assert version.get_content_type() == "application/pgp-encrypted"
    assert version.get_payload().strip() == "Version: 1"
    assert payload.get_content_type() == "application/octet-stream"
    assert payload.get_param("name") == "encrypted.asc"
    assert payload.get_content_disposition() == "inline"
    assert payload.get_payload().lstrip().startswith("-----BEGIN PGP MESSAGE-----")
    # Nothing of the original content is visible outside the ciphertext.
    for secret in (b"Quartalszahlen", b"K=F6ln", b"data.bin", b"==outer=="):
        assert secret not in out


def test_round_trip_gives_the_original_body_bytes(pgp: PgpKeys, engine: GpgEngine) -> None:
    out = encrypt_pgpmime(MULTIPART, recipients_keys=[pgp["bob"].fingerprint], gnupg_home=engine)
    inner = pgp["bob"].decrypt(armored_part(out))
    assert body_of(inner) == MULTIPART_BODY
    assert has_only_crlf(inner)
    parsed = message_from_bytes(inner, policy=policy.default)
    assert parsed["Subject"] == REAL_SUBJECT
    assert parsed.get_param("hp") == "cipher"
    assert parsed.get_param("boundary") == "==outer=="
    assert "Subject: ..." in (parsed.get_all("HP-Outer") or [])


def test_several_recipients_each_decrypt_one_copy(
    pgp: PgpKeys, engine: GpgEngine, tmp_path: Path
) -> None:
    names = ["bob", "carol", "erin"]  # erin's keys are RSA
    out = encrypt_pgpmime(
        MULTIPART, recipients_keys=[pgp[n].fingerprint for n in names], gnupg_home=engine
    )
    armored = armored_part(out)
    for name in names:
        assert body_of(pgp[name].decrypt(armored)) == MULTIPART_BODY
    assert sorted(pkesk_keyids(armored, tmp_path)) == sorted(pgp[n].encryption_keyid for n in names)
    with pytest.raises(AssertionError):
        pgp["dave"].decrypt(armored)


def test_hidden_recipients_show_key_id_zero(
    pgp: PgpKeys, engine: GpgEngine, tmp_path: Path
) -> None:
    out = encrypt_pgpmime(
        MULTIPART,
        recipients_keys=[pgp["bob"].fingerprint, pgp["carol"].fingerprint],
        gnupg_home=engine,
        hidden_recipients=True,
    )
    armored = armored_part(out)
    assert pkesk_keyids(armored, tmp_path) == ["0000000000000000", "0000000000000000"]
    for name in ("bob", "carol"):
        assert body_of(pgp[name].decrypt(armored)) == MULTIPART_BODY


def test_bcc_recipient_copy_names_only_its_own_key(
    pgp: PgpKeys, engine: GpgEngine, tmp_path: Path
) -> None:
    # To: bob, Cc: carol (both named), dave only in the envelope: a Bcc.
    envelope = [pgp["bob"].address, pgp["dave"].address, pgp["carol"].address]
    decisions = {
        pgp[n].address: Decision.openpgp(pgp[n].fingerprint) for n in ("bob", "carol", "dave")
    }
    groups = group_recipients(envelope, named_addresses(MULTIPART), decisions)
    assert [(g.recipients, g.bcc) for g in groups] == [
        ((pgp["bob"].address, pgp["carol"].address), False),
        ((pgp["dave"].address,), True),
    ]
    named_copy, bcc_copy = (
        armored_part(encrypt_group(MULTIPART, g, gnupg_home=engine)) for g in groups
    )
    assert pkesk_keyids(bcc_copy, tmp_path) == [pgp["dave"].encryption_keyid]
    assert pgp["dave"].encryption_keyid not in pkesk_keyids(named_copy, tmp_path)
    assert body_of(pgp["dave"].decrypt(bcc_copy)) == MULTIPART_BODY
    for name in ("bob", "carol"):
        with pytest.raises(AssertionError):
            pgp[name].decrypt(bcc_copy)
    with pytest.raises(AssertionError):
        pgp["dave"].decrypt(named_copy)


def test_custom_placeholder(pgp: PgpKeys, engine: GpgEngine) -> None:
    out = encrypt_pgpmime(
        MULTIPART,
        recipients_keys=[pgp["bob"].fingerprint],
        gnupg_home=engine,
        protection=HeaderProtection(placeholder_subject="Encrypted message"),
    )
    assert message_from_bytes(out, policy=policy.default)["Subject"] == "Encrypted message"


def test_accepts_key_objects_and_a_home_path(pgp: PgpKeys) -> None:
    class Key:
        def __init__(self, fingerprint: str) -> None:
            self.fingerprint = fingerprint

    fpr = pgp["bob"].fingerprint
    spaced = " ".join(fpr[i : i + 4] for i in range(0, 40, 4)).lower()
    out = encrypt_pgpmime(
        b"Subject: hi\r\n\r\nhello\r\n",
        recipients_keys=[Key(fpr), spaced],  # the same key twice: one PKESK
        gnupg_home=pgp.gateway_home,
    )
    inner = pgp["bob"].decrypt(armored_part(out))
    assert body_of(inner) == b"hello\r\n"


def test_expired_key_is_refused_by_gpg(pgp: PgpKeys, engine: GpgEngine) -> None:
    with pytest.raises(EncryptionFailed) as caught:
        encrypt_pgpmime(MULTIPART, recipients_keys=[pgp["olga"].fingerprint], gnupg_home=engine)
    assert pgp["olga"].fingerprint in str(caught.value)
    assert "INV_RECP" in str(caught.value)
    assert caught.value.reply is replies.ENCRYPTION_FAILED
    assert caught.value.temporary


def test_one_unusable_key_fails_the_whole_copy(pgp: PgpKeys, engine: GpgEngine) -> None:
    with pytest.raises(EncryptionFailed):
        encrypt_pgpmime(
            MULTIPART,
            recipients_keys=[pgp["bob"].fingerprint, pgp["olga"].fingerprint],
            gnupg_home=engine,
        )


def test_unknown_key_is_refused(engine: GpgEngine) -> None:
    with pytest.raises(EncryptionFailed, match="INV_RECP"):
        encrypt_pgpmime(MULTIPART, recipients_keys=["AB" * 20], gnupg_home=engine)


@pytest.mark.parametrize("bad", ["", "bob@example.net", "--hidden-recipient", "AB" * 19, "G" * 40])
def test_malformed_fingerprints_never_reach_gpg(engine: GpgEngine, bad: str) -> None:
    with pytest.raises(EncryptionFailed, match="fingerprint"):
        encrypt_pgpmime(MULTIPART, recipients_keys=[bad], gnupg_home=engine)
    with pytest.raises(EncryptionFailed):
        normalize_fingerprint(bad)


def test_no_key_is_refused(engine: GpgEngine) -> None:
    with pytest.raises(EncryptionFailed, match="no OpenPGP recipient"):
        encrypt_pgpmime(MULTIPART, recipients_keys=[], gnupg_home=engine)


def test_missing_home_or_binary_is_encryption_failed(tmp_path: Path) -> None:
    with pytest.raises(EncryptionFailed, match="cannot run gpg"):
        GpgEngine(tmp_path / "missing")
    with pytest.raises(EncryptionFailed, match="cannot run gpg"):
        GpgEngine(tmp_path, binary=str(tmp_path / "no-such-gpg"))


def test_gpg_conf_in_the_home_cannot_add_recipients(pgp: PgpKeys, tmp_path: Path) -> None:
    home = tmp_path / "gw"
    shutil.copytree(pgp.gateway_home, home, ignore=shutil.ignore_patterns("S.*"))
    home.chmod(0o700)
    (home / "gpg.conf").write_text(
        f"encrypt-to {pgp['carol'].fingerprint}\nhidden-encrypt-to {pgp['dave'].fingerprint}\n"
    )
    out = encrypt_pgpmime(
        MULTIPART, recipients_keys=[pgp["bob"].fingerprint], gnupg_home=GpgEngine(home)
    )
    armored = armored_part(out)
    assert pkesk_keyids(armored, tmp_path) == [pgp["bob"].encryption_keyid]
    for name in ("carol", "dave"):
        with pytest.raises(AssertionError):
            pgp[name].decrypt(armored)


def test_encrypt_group_leaves_clear_copies_alone(engine: GpgEngine) -> None:
    groups = group_recipients(["x@example.com"], [], {"x@example.com": Decision.clear()})
    assert groups[0].format is Format.CLEAR
    assert encrypt_group(MULTIPART, groups[0], gnupg_home=engine) is MULTIPART
