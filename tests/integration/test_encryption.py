"""Per-recipient encryption end to end: the real gateway, real clients, the real capture upstream,
the real key store (SQLite and PostgreSQL), real gpg and real ``cryptography`` / ``openssl``.

What it tests: messages with a multipart body, a binary attachment and non-ASCII text go through
the gateway to the upstream and are decrypted there -- PGP/MIME with the recipient's secret key
(gpg), S/MIME with ``openssl cms -decrypt`` and with ``cryptography`` -- and the inner entity
carries the original body bytes and the real Subject, while the outside shows the placeholder;
the envelope sender is unchanged. Mixes of recipients (key, no key, ``required`` without key,
Bcc): one copy per group, the Bcc recipient's copy separate and no other copy naming its key
(``gpg --list-packets``); expired, revoked and wrong-UID keys are never used (a ``required``
recipient is refused at RCPT with 550 5.7.5 saying why); secret keys are refused at import;
upper-case and IDN recipients find their key; address forms that could miss a key are refused
(553 5.1.3) unless the policy is ``never``; a key store that cannot be read means 451 and nothing
relayed, at RCPT and at end of data; a group deferred while another is delivered is queued (its
encrypted bytes, no clear text in the spool) and delivered once; an already encrypted message
passes unchanged; ``prefer``, per-login placeholders, ``warn`` mode; the audit records each
recipient's decision and ``mailward audit show`` prints it; keys used are marked.

Reads: the test keys of ``tests/fixtures/keys.py`` (generated per session; their gpg-agents are
stopped by the fixtures); temporary directories and databases.

Security notes: the assertions that no plaintext reaches the spool or another recipient's copy
are the point of several tests here.
"""

from __future__ import annotations

import base64
import contextlib
import email
import email.header
import email.policy
import io
import re
import smtplib
import subprocess
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding, pkcs7

from gateway.checks.encryption import Encryption
from gateway.cli import main as cli_main
from gateway.core.model import Stage, utcnow
from gateway.crypto.plan import EncryptionPlanner
from gateway.crypto.protect import split_message
from gateway.db.engine import engine_for_url
from gateway.keys.store import KeyRecord
from gateway.keys.validate import KeyRejected, validate_key
from gateway.queue import QUEUED
from gateway.smtp import capture
from tests.fixtures.db import unreachable_url
from tests.fixtures.gateway import ALICE, RunningGateway
from tests.fixtures.keys import GpgHome, OpenPgpKeys, SmimeCerts, TestCert

MakeGateway = Callable[..., RunningGateway]

BOB = "bob@example.com"  # openpgp_keys.binary
CAROL = "carol@example.com"  # openpgp_keys.two_uids (and smime_certs.valid)
DANA = "dana@example.com"  # openpgp_keys.certified
DAVE = "dave@example.com"  # smime_certs.der
ERIN = "erin@example.com"  # no key
ZED = "zed@example.com"  # no key, required
JOERG = "jörg@xn--bcher-kva.example"  # openpgp_keys.idn

ATTACHMENT = bytes(range(256)) * 16
UTF8_TEXT = "Grüße aus Köln — 日本語のテキスト, ελληνικά.\r\n".encode()
REAL_SUBJECT = "Quartalszahlen für Q3 (vertraulich)"
MARKER = b"Kennwort-7f3a9c"  # appears only inside the plaintext body


def build_message(
    *,
    to: Sequence[str] = (BOB,),
    cc: Sequence[str] = (),
    subject: str = REAL_SUBJECT,
    message_id: str | None = None,
) -> bytes:
    """A multipart/mixed message: UTF-8 text (8bit), a binary attachment (base64)."""
    attachment = base64.encodebytes(ATTACHMENT).replace(b"\n", b"\r\n").rstrip(b"\r\n")
    headers = [
        f"From: Alice <{ALICE}>",
        f"To: {', '.join(to)}",
        *([f"Cc: {', '.join(cc)}"] if cc else []),
        "Subject: " + email.header.Header(subject, "utf-8").encode(),
        "Date: Tue, 02 Sep 2025 10:00:00 +0200",
        f"Message-ID: {message_id or f'<{uuid.uuid4().hex}@enc.test>'}",
        "MIME-Version: 1.0",
        'Content-Type: multipart/mixed; boundary="==b=="',
    ]
    body = (
        b"--==b==\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n"
        b"\r\n" + UTF8_TEXT + MARKER + b"\r\n"
        b"--==b==\r\n"
        b'Content-Type: application/octet-stream; name="data.bin"\r\n'
        b"Content-Transfer-Encoding: base64\r\n"
        b'Content-Disposition: attachment; filename="data.bin"\r\n'
        b"\r\n" + attachment + b"\r\n"
        b"--==b==--\r\n"
    )
    return "\r\n".join(headers).encode() + b"\r\n\r\n" + body


def body_of(entity: bytes) -> bytes:
    return entity.split(b"\r\n\r\n", 1)[1]


ORIGINAL_BODY = body_of(build_message())


# --- the gateway and its keys ---------------------------------------------------------------------


def enc_gateway(
    make_gateway: MakeGateway, checks: dict[str, Any] | None = None, **over: Any
) -> RunningGateway:
    overrides: dict[str, Any] = {
        "checks": {
            "encryption": {
                "default": "opportunistic",
                "recipients": {ZED: {"policy": "required"}},
                **(checks or {}),
            }
        },
        **over,
    }
    return make_gateway(overrides)


def import_key(
    gw: RunningGateway,
    data: bytes,
    *,
    now: datetime | None = None,
    allow_revoked: bool = False,
) -> KeyRecord:
    """Validate and store a key exactly as ``mailward key import`` does."""
    assert gw.app.stores is not None
    store = gw.app.stores.keys
    when = now or utcnow()

    async def go() -> KeyRecord:
        key = await validate_key(data, now=when, allow_revoked=allow_revoked)
        result = await store.import_key(key, now=when, source="operator", imported_by="test")
        return result.record

    return gw.run(go())


def encryption_check(gw: RunningGateway) -> Encryption:
    """The running pipeline's ``encryption`` check (to move its clock)."""
    assert gw.app.context is not None
    pipeline = gw.app.context.gateway.pipeline
    (configured,) = [c for c in pipeline.describe()[Stage.RCPT] if c.id == "encryption"]
    assert isinstance(configured.check, Encryption)
    return configured.check


def stored(gw: RunningGateway, fingerprint: str) -> KeyRecord:
    assert gw.app.stores is not None
    record = gw.run(gw.app.stores.keys.get(fingerprint))
    assert record is not None
    return record


def send(
    gw: RunningGateway,
    recipients: Sequence[str],
    data: bytes,
    *,
    smtputf8: bool = False,
) -> tuple[dict[str, tuple[int, str]], tuple[int, str] | None]:
    """MAIL FROM alice, RCPT each, DATA when one was accepted: (rcpt replies, data reply)."""
    replies: dict[str, tuple[int, str]] = {}
    with gw.smtp() as client:
        code, _ = client.mail(
            ALICE, ["SMTPUTF8", "BODY=8BITMIME"] if smtputf8 else ["BODY=8BITMIME"]
        )
        assert code == 250
        for rcpt in recipients:
            code, text = client.rcpt(rcpt)
            replies[rcpt] = (code, text.decode())
        if not any(code == 250 for code, _ in replies.values()):
            client.rset()
            return replies, None
        try:
            code, text = client.data(data)
        except smtplib.SMTPDataError as exc:
            error = exc.smtp_error
            return replies, (exc.smtp_code, error.decode() if isinstance(error, bytes) else error)
        return replies, (code, text.decode())


def received_by(gw: RunningGateway, rcpt: str) -> list[capture.Received]:
    return [m for m in gw.upstream.messages if rcpt in m.rcpt_tos]


def only_copy(gw: RunningGateway, rcpt: str) -> capture.Received:
    (copy,) = received_by(gw, rcpt)
    return copy


def record_of(gw: RunningGateway, message_id: str | None = None) -> Any:
    records = [r for r in gw.records(kind="message")]
    if message_id is not None:
        records = [r for r in records if r.message_id == message_id]
    return records[-1]


def notes(record: Any) -> dict[str, tuple[str | None, ...]]:
    return {
        r.address: (
            r.encryption_decision,
            r.encryption_policy,
            r.encryption_format,
            r.encryption_key,
        )
        for r in record.recipients
    }


# --- decrypting what the upstream got -------------------------------------------------------------


def parsed(data: bytes) -> EmailMessage:
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def armored_part(data: bytes) -> bytes:
    """The ASCII-armored ciphertext of a PGP/MIME message (RFC 3156: its second part)."""
    message = parsed(data)
    assert message.get_content_type() == "multipart/encrypted"
    assert message.get_param("protocol") == "application/pgp-encrypted"
    version, encrypted = list(message.iter_parts())
    assert version.get_content_type() == "application/pgp-encrypted"
    assert encrypted.get_content_type() == "application/octet-stream"
    payload = encrypted.get_payload(decode=True)
    assert isinstance(payload, bytes) and payload.startswith(b"-----BEGIN PGP MESSAGE-----")
    return payload


def pgp_decrypt(keys: OpenPgpKeys, data: bytes) -> bytes:
    return keys.home.decrypt(armored_part(data))


def packet_key_ids(data: bytes) -> set[str]:
    """The key ids the PKESK packets of a PGP/MIME copy name (``gpg --list-packets``, in an empty
    home that holds no secret key)."""
    home = GpgHome()
    try:
        out = home.run("--list-packets", input=armored_part(data), check=False).stdout.decode()
    finally:
        home.close()
    return {m.upper() for m in re.findall(r"pubkey enc packet: .*keyid ([0-9A-Fa-f]{16})", out)}


def encryption_key_id(keys: OpenPgpKeys, fingerprint: str) -> str:
    listing = keys.home.run("--with-colons", "--list-keys", fingerprint).stdout.decode()
    return next(line.split(":")[4] for line in listing.splitlines() if line.startswith("sub:"))


def openssl_decrypt(data: bytes, cert: TestCert, tmp_path: Path) -> bytes:
    message, cert_file, key_file = (tmp_path / n for n in ("m.eml", "c.pem", "k.pem"))
    message.write_bytes(data)
    cert_file.write_bytes(cert.cert.public_bytes(Encoding.PEM))
    key_file.write_bytes(cert.key_pem())
    proc = subprocess.run(
        [
            "openssl",
            "cms",
            "-decrypt",
            "-binary",
            "-in",
            str(message),
            "-recip",
            str(cert_file),
            "-inkey",
            str(key_file),
        ],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return proc.stdout


def cryptography_decrypt(data: bytes, cert: TestCert) -> bytes:
    der = base64.b64decode(body_of(data))
    assert isinstance(cert.key, rsa.RSAPrivateKey)
    return pkcs7.pkcs7_decrypt_der(der, cert.cert, cert.key, [])


def check_inner(inner: bytes) -> None:
    """The decrypted inner entity: the original body bytes, the real Subject, hp="cipher"."""
    assert body_of(inner) == ORIGINAL_BODY
    headers = parsed(inner)
    assert headers["Subject"] == REAL_SUBJECT
    assert headers.get_content_type() == "multipart/mixed"
    assert headers.get_param("hp") == "cipher"
    part = next(p for p in headers.walk() if p.get_content_type() == "application/octet-stream")
    assert part.get_payload(decode=True) == ATTACHMENT
    text = next(p for p in headers.walk() if p.get_content_type() == "text/plain")
    assert text.get_content().startswith(UTF8_TEXT.decode().rstrip("\r\n"))


def check_outer(data: bytes, placeholder: str = "...") -> None:
    assert MARKER not in data and b"Quartalszahlen" not in data
    outer = parsed(data)
    assert outer["Subject"] == placeholder
    assert outer["From"] == f"Alice <{ALICE}>"
    assert data.count(b"\r\n") == data.count(b"\n")  # CRLF on the wire


# --- round trips ----------------------------------------------------------------------------------


def test_openpgp_round_trip(
    make_gateway: MakeGateway, openpgp_keys: OpenPgpKeys, tmp_path: Path, db_url: str
) -> None:
    gw = enc_gateway(make_gateway)
    key = import_key(gw, openpgp_keys.binary.data)
    message_id = f"<{uuid.uuid4().hex}@enc.test>"
    replies, final = send(gw, [BOB], build_message(message_id=message_id))
    assert replies[BOB][0] == 250 and final is not None and final[0] == 250, final
    copy = only_copy(gw, BOB)
    assert copy.mail_from == ALICE and copy.rcpt_tos == (BOB,)  # envelope sender unchanged
    check_outer(copy.data)
    check_inner(pgp_decrypt(openpgp_keys, copy.data))
    assert packet_key_ids(copy.data) == {encryption_key_id(openpgp_keys, key.fingerprint)}
    record = record_of(gw, message_id)
    assert record.outcome == "delivered"
    assert notes(record) == {BOB: ("encrypted", "opportunistic", "openpgp", key.fingerprint)}
    assert stored(gw, key.fingerprint).last_used_at is not None  # mark_used
    # `mailward audit show` prints the decision
    config = tmp_path / "cli.toml"
    config.write_text(f'state_dir = "{tmp_path / "cli"}"\n[database]\nurl = "{db_url}"\n')
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert cli_main(["--config", str(config), "audit", "show", str(record.id)]) == 0
    shown = buffer.getvalue()
    assert (
        f"encryption: encrypted  policy=opportunistic  format=openpgp  key={key.fingerprint}"
        in shown
    )
    assert "encryption reason: policy opportunistic (default); usable openpgp key" in shown


def test_smime_round_trip(
    make_gateway: MakeGateway, smime_certs: SmimeCerts, tmp_path: Path
) -> None:
    gw = enc_gateway(make_gateway)
    key = import_key(gw, smime_certs.der.data)
    _replies, final = send(gw, [DAVE], build_message(to=[DAVE]))
    assert final is not None and final[0] == 250, final
    copy = only_copy(gw, DAVE)
    check_outer(copy.data)
    outer = parsed(copy.data)
    assert outer.get_content_type() == "application/pkcs7-mime"
    assert outer.get_param("smime-type") == "enveloped-data"
    check_inner(openssl_decrypt(copy.data, smime_certs.der, tmp_path))
    check_inner(cryptography_decrypt(copy.data, smime_certs.der))
    assert notes(record_of(gw)) == {DAVE: ("encrypted", "opportunistic", "smime", key.fingerprint)}


# --- mixes, Bcc -----------------------------------------------------------------------------------


def test_mixed_recipients_and_a_bcc(make_gateway: MakeGateway, openpgp_keys: OpenPgpKeys) -> None:
    gw = enc_gateway(make_gateway)
    bob = import_key(gw, openpgp_keys.binary.data)
    carol = import_key(gw, openpgp_keys.two_uids.data)
    dana = import_key(gw, openpgp_keys.certified.data)
    data = build_message(to=[BOB, ERIN], cc=[CAROL])  # DANA is Bcc: envelope only
    replies, final = send(gw, [BOB, CAROL, DANA, ERIN, ZED], data)
    assert replies[ZED][0] == 550 and replies[ZED][1].startswith("5.7.5 Encryption required")
    assert "none is stored for this address" in replies[ZED][1]
    assert all(replies[r][0] == 250 for r in (BOB, CAROL, DANA, ERIN))
    assert final is not None and final[0] == 250, final
    assert received_by(gw, ZED) == []  # refused, never silently dropped nor sent in clear
    copies = sorted(m.rcpt_tos for m in gw.upstream.messages)
    assert copies == [(BOB, CAROL), (DANA,), (ERIN,)]  # one upstream transaction per group
    named, bcc, clear = only_copy(gw, BOB), only_copy(gw, DANA), only_copy(gw, ERIN)
    ids = {
        name: encryption_key_id(openpgp_keys, k.fingerprint)
        for name, k in (("bob", bob), ("carol", carol), ("dana", dana))
    }
    assert packet_key_ids(named.data) == {ids["bob"], ids["carol"]}
    assert packet_key_ids(bcc.data) == {ids["dana"]}  # her own copy names her key only
    check_inner(pgp_decrypt(openpgp_keys, named.data))
    check_inner(pgp_decrypt(openpgp_keys, bcc.data))
    assert MARKER in clear.data and body_of(clear.data) == ORIGINAL_BODY  # clear text allowed
    record = record_of(gw)
    assert notes(record) == {
        BOB: ("encrypted", "opportunistic", "openpgp", bob.fingerprint),
        CAROL: ("encrypted", "opportunistic", "openpgp", carol.fingerprint),
        DANA: ("encrypted", "opportunistic", "openpgp", dana.fingerprint),
        ERIN: ("clear", "opportunistic", None, None),
        ZED: ("refused", "required", None, None),
    }
    statuses = {r.address: r.status for r in record.recipients}
    assert statuses == {
        BOB: "delivered",
        CAROL: "delivered",
        DANA: "delivered",
        ERIN: "delivered",
        ZED: "rejected",
    }


@pytest.mark.parametrize(("prefer", "expected"), [("", "openpgp"), ("smime", "smime")])
def test_prefer_chooses_between_two_kinds_of_key(
    make_gateway: MakeGateway,
    openpgp_keys: OpenPgpKeys,
    smime_certs: SmimeCerts,
    tmp_path: Path,
    prefer: str,
    expected: str,
) -> None:
    rule = {"recipients": {"Carol@EXAMPLE.com": {"prefer": prefer}}} if prefer else {}
    gw = enc_gateway(make_gateway, rule)
    import_key(gw, openpgp_keys.two_uids.data)
    import_key(gw, smime_certs.valid.data)
    _, final = send(gw, [CAROL], build_message(to=[CAROL]))
    assert final is not None and final[0] == 250
    copy = only_copy(gw, CAROL)
    if expected == "smime":
        check_inner(openssl_decrypt(copy.data, smime_certs.valid, tmp_path))
    else:
        check_inner(pgp_decrypt(openpgp_keys, copy.data))
    assert notes(record_of(gw))[CAROL][2] == expected


# --- keys that must not be used -------------------------------------------------------------------


def test_expired_revoked_and_wrong_uid_keys_are_never_used(
    make_gateway: MakeGateway, openpgp_keys: OpenPgpKeys
) -> None:
    brief, soon = "brief@example.com", "soon@example.com"
    required = [brief, soon, "rev@example.com", "mallory@example.com"]
    gw = enc_gateway(make_gateway, {"recipients": {a: {"policy": "required"} for a in required}})
    # valid when imported; at use time (the check's clock three days on) the first has expired,
    # the second's only encryption subkey has
    expired = import_key(gw, openpgp_keys.expiring.data)
    expired_subkey = import_key(gw, openpgp_keys.expiring_subkey.data)
    encryption_check(gw).clock = lambda: utcnow() + timedelta(days=3)
    revoked = import_key(gw, openpgp_keys.revoked_before.data)
    import_key(gw, openpgp_keys.revoked.data, allow_revoked=True)  # the revocation arrives
    assert stored(gw, revoked.fingerprint).revoked
    import_key(gw, openpgp_keys.wrong_uid.data)  # recorded for mallory@evil.example only
    replies, final = send(gw, [*required, BOB], build_message(to=[BOB]))
    for address in (brief, soon):
        assert replies[address][0] == 550 and "stored key(s): 1 expired" in replies[address][1]
    assert replies["rev@example.com"][0] == 550 and "1 revoked" in replies["rev@example.com"][1]
    assert replies["mallory@example.com"][0] == 550
    assert "none is stored" in replies["mallory@example.com"][1]
    assert final is not None and final[0] == 250  # BOB (no key, opportunistic): clear text
    assert [m.rcpt_tos for m in gw.upstream.messages] == [(BOB,)]
    assert stored(gw, expired.fingerprint).last_used_at is None
    assert stored(gw, expired_subkey.fingerprint).last_used_at is None
    assert stored(gw, revoked.fingerprint).last_used_at is None
    # a key is never stored for an address its user IDs do not name, nor a secret key
    with pytest.raises(KeyRejected, match=r"not valid for mallory@example\.com"):
        gw.run(
            validate_key(openpgp_keys.wrong_uid.data, now=utcnow(), address="mallory@example.com")
        )
    with pytest.raises(KeyRejected, match="private key"):
        gw.run(validate_key(openpgp_keys.secret.data, now=utcnow()))


def test_key_expired_between_rcpt_and_end_of_data_is_not_used(
    make_gateway: MakeGateway, openpgp_keys: OpenPgpKeys
) -> None:
    """Expiry is checked again when the key is used: the planner's clock three days on (the key
    expires in two) finds it expired, and the message is deferred, not sent in clear."""
    brief = "brief@example.com"
    gw = enc_gateway(make_gateway)
    key = import_key(gw, openpgp_keys.expiring.data)
    assert gw.app.context is not None
    planner = gw.app.context.gateway.planner
    assert isinstance(planner, EncryptionPlanner)
    with gw.smtp() as client:
        client.mail(ALICE)
        assert client.rcpt(brief)[0] == 250  # usable now
        planner.clock = lambda: utcnow() + timedelta(days=3)
        answer = client.data(build_message(to=[brief]))
    assert answer == (451, b"4.3.0 Encryption failed, try again later")
    assert gw.upstream.messages == []
    (note,) = [r for r in record_of(gw).recipients]
    assert note.encryption_decision == "deferred" and "expired" in (note.encryption_reason or "")
    assert stored(gw, key.fingerprint).last_used_at is None


# --- addresses ------------------------------------------------------------------------------------


def test_upper_case_and_idn_recipients_find_their_key(
    make_gateway: MakeGateway, openpgp_keys: OpenPgpKeys
) -> None:
    gw = enc_gateway(make_gateway)
    bob = import_key(gw, openpgp_keys.binary.data)
    joerg = import_key(gw, openpgp_keys.idn.data)
    upper, idn = "BOB@EXAMPLE.COM", "jörg@Bücher.example"
    replies, final = send(gw, [upper, idn], build_message(to=[BOB]), smtputf8=True)
    assert final is not None and final[0] == 250, (replies, final)
    for rcpt in (upper, idn):
        check_inner(pgp_decrypt(openpgp_keys, only_copy(gw, rcpt).data))
    got = notes(record_of(gw))
    assert got[upper][3] == bob.fingerprint and got[idn][3] == joerg.fingerprint


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ('"bob smith"@example.com', "quoted local part"),
        ("bob%example.org@example.com", "percent-hack routing"),
        ("b!bob@example.com", "bang-path routing"),
        ("bob@[192.0.2.1]", "domain literal"),
        ("bob@Bu\u00dfe.example", "ambiguous under IDNA"),
        # a source route never reaches the check: the SMTP layer refuses it as malformed
        ("@relay.example:bob@example.com", "Error: malformed address"),
    ],
)
def test_address_forms_that_could_miss_a_key_are_refused(
    make_gateway: MakeGateway, address: str, why: str
) -> None:
    gw = enc_gateway(make_gateway)
    replies, final = send(gw, [address, ERIN], build_message(to=[ERIN]), smtputf8=True)
    code, text = replies[address]
    assert code == 553 and text.startswith("5.1.3 ") and why in text, replies
    assert final is not None and final[0] == 250
    assert [m.rcpt_tos for m in gw.upstream.messages] == [(ERIN,)]  # never sent in clear


def test_address_forms_pass_when_the_policy_is_never(make_gateway: MakeGateway) -> None:
    gw = enc_gateway(make_gateway, {"default": "never", "recipients": {}})
    address = "bob%example.org@example.com"
    replies, final = send(gw, [address], build_message(to=[address]))
    assert replies[address][0] == 250 and final is not None and final[0] == 250


# --- failures -------------------------------------------------------------------------------------


def break_key_store(gw: RunningGateway, db_backend: str, tmp_path: Path) -> None:
    """Point the running gateway's key store at a database that fails at once."""
    assert gw.app.stores is not None
    gw.app.stores.keys._engine = engine_for_url(unreachable_url(db_backend, tmp_path), pooled=False)


def test_key_store_down_at_rcpt_is_451_and_nothing_relayed(
    make_gateway: MakeGateway, openpgp_keys: OpenPgpKeys, db_backend: str, tmp_path: Path
) -> None:
    gw = enc_gateway(make_gateway)
    import_key(gw, openpgp_keys.binary.data)
    break_key_store(gw, db_backend, tmp_path)
    replies, final = send(gw, [BOB, ERIN], build_message(to=[BOB, ERIN]))
    assert replies[BOB] == (451, "4.3.0 Encryption key store unavailable, try again later")
    assert replies[ERIN][0] == 451
    assert final is None and gw.upstream.messages == []
    assert notes(record_of(gw))[BOB][0] == "deferred"


def test_key_store_down_at_end_of_data_is_451_and_nothing_relayed(
    make_gateway: MakeGateway, openpgp_keys: OpenPgpKeys, db_backend: str, tmp_path: Path
) -> None:
    gw = enc_gateway(make_gateway)
    import_key(gw, openpgp_keys.binary.data)
    with gw.smtp() as client:
        client.mail(ALICE)
        assert client.rcpt(BOB)[0] == 250
        break_key_store(gw, db_backend, tmp_path)
        answer = client.data(build_message())
    assert answer == (451, b"4.3.0 Encryption key store unavailable, try again later")
    assert gw.upstream.messages == [] and gw.queued() == []
    record = record_of(gw)
    assert record.outcome == "deferred"
    assert notes(record)[BOB][0] == "deferred"


def test_never_for_everyone_does_not_look_up_keys(
    make_gateway: MakeGateway, db_backend: str, tmp_path: Path
) -> None:
    gw = make_gateway()  # the shipped policy: encryption never
    break_key_store(gw, db_backend, tmp_path)  # a lookup would fail: none happens
    _replies, final = send(gw, [BOB, ZED], build_message(to=[BOB, ZED]))
    assert final is not None and final[0] == 250
    assert [m.rcpt_tos for m in gw.upstream.messages] == [(BOB, ZED)]
    assert notes(record_of(gw)) == {BOB: (None, None, None, None), ZED: (None, None, None, None)}


def test_a_deferred_group_is_queued_encrypted_and_delivered_once(
    make_gateway: MakeGateway, openpgp_keys: OpenPgpKeys, smime_certs: SmimeCerts, tmp_path: Path
) -> None:
    gw = enc_gateway(make_gateway, queue={"runner_interval": "1h"})
    import_key(gw, openpgp_keys.binary.data)
    import_key(gw, smime_certs.der.data)
    gw.upstream.inject("EOM", capture.reply("451 4.3.0 Try again"))  # the first copy: BOB's
    _replies, final = send(gw, [BOB, DAVE], build_message(to=[BOB, DAVE]))
    assert final is not None and final[0] == 250 and "queued as" in final[1], final
    record = record_of(gw)
    assert {r.address: r.status for r in record.recipients} == {BOB: "queued", DAVE: "delivered"}
    (queued,) = gw.queued(QUEUED)
    (copy,) = queued.copies
    assert [r.address for r in copy.recipients] == [BOB]
    spool = Path(gw.config.queue.spool_path(gw.config.state_dir))
    for path in spool.rglob("*"):
        if path.is_file():
            assert MARKER not in path.read_bytes()  # no clear text of an encrypted copy
    gw.drain_queue()
    assert len(received_by(gw, BOB)) == 1 and len(received_by(gw, DAVE)) == 1
    check_inner(pgp_decrypt(openpgp_keys, only_copy(gw, BOB).data))
    check_inner(openssl_decrypt(only_copy(gw, DAVE).data, smime_certs.der, tmp_path))


def test_encryption_failure_is_451_and_nothing_relayed(
    make_gateway: MakeGateway, openpgp_keys: OpenPgpKeys
) -> None:
    gw = enc_gateway(make_gateway, keys={"gpg": "/nonexistent/gpg"})
    import_key(gw, openpgp_keys.binary.data)
    _replies, final = send(gw, [BOB, ERIN], build_message(to=[BOB, ERIN]))
    assert final is not None and final[0] == 451, final
    assert gw.upstream.messages == []
    assert notes(record_of(gw))[BOB][0] == "deferred"


# --- already encrypted, warn mode, placeholder ----------------------------------------------------


def test_already_encrypted_message_passes_unchanged(
    make_gateway: MakeGateway, openpgp_keys: OpenPgpKeys
) -> None:
    gw = enc_gateway(make_gateway, {"recipients": {BOB: {"policy": "required"}}})
    import_key(gw, openpgp_keys.binary.data)
    # a message the client encrypted itself (PGP/MIME)
    encrypted = (
        f"From: {ALICE}\r\nTo: {BOB}\r\nSubject: mine\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/encrypted; protocol="application/pgp-encrypted";'
        ' boundary="x"\r\n\r\n--x\r\nContent-Type: application/pgp-encrypted\r\n\r\n'
        "Version: 1\r\n--x\r\nContent-Type: application/octet-stream\r\n\r\n"
        "-----BEGIN PGP MESSAGE-----\r\n\r\nhQEMA...\r\n-----END PGP MESSAGE-----\r\n--x--\r\n"
    ).encode()
    _, final = send(gw, [BOB], encrypted)
    assert final is not None and final[0] == 250
    copy = only_copy(gw, BOB)
    fields, _ = split_message(copy.data)
    assert fields[0].name == "received"
    assert copy.data.endswith(encrypted)  # the trace header prepended, nothing else changed
    assert notes(record_of(gw))[BOB][0] == "pre-encrypted"


def test_warn_mode_encrypts_nothing_and_refuses_nobody(
    make_gateway: MakeGateway, openpgp_keys: OpenPgpKeys
) -> None:
    gw = enc_gateway(make_gateway, {"mode": "warn"})
    import_key(gw, openpgp_keys.binary.data)
    replies, final = send(gw, [BOB, ZED], build_message(to=[BOB, ZED]))
    assert replies[ZED][0] == 250 and final is not None and final[0] == 250
    (copy,) = gw.upstream.messages
    assert MARKER in copy.data  # clear text: warn mode changes nothing
    record = record_of(gw)
    reasons = {r.address: r.encryption_reason for r in record.recipients}
    assert reasons[BOB].startswith("warn mode, not applied: would have encrypted")
    assert reasons[ZED].startswith("warn mode, not applied: would have been refused")
    verdict = next(v for v in record.verdicts if v.check_id == "encryption")
    assert not verdict.applied and verdict.reply.startswith("550 5.7.5")


def test_subject_placeholder_per_login(
    make_gateway: MakeGateway, openpgp_keys: OpenPgpKeys
) -> None:
    gw = enc_gateway(
        make_gateway, {"logins": {ALICE.upper(): {"subject_placeholder": "Verschlüsselt"}}}
    )
    import_key(gw, openpgp_keys.binary.data)
    _, final = send(gw, [BOB], build_message())
    assert final is not None and final[0] == 250
    check_outer(only_copy(gw, BOB).data, placeholder="Verschlüsselt")
