"""Releasing a held message encrypts it like live mail (issue 5: never silently sent in clear).

What it tests: the real gateway holds a message for review (a spam rule matching the body), then
``mailward quarantine release`` (the real CLI entry point, in-process) sends it to the real
capture upstream with the real key store (SQLite and PostgreSQL), real gpg and real
``cryptography``: each recipient is judged with the policy and keys at release time, recipients
are grouped as for live mail (an encrypted Bcc recipient's copy of its own, no other copy naming
its key), one upstream transaction per copy, and what the upstream got decrypts to the original
(PGP/MIME with gpg, S/MIME with ``cryptography``), the clear-text recipient getting the held
bytes. A ``required`` recipient without a usable key at release time (none stored, or revoked
since the hold) is not sent and is named in the report, the entry and its audit event; when the
policy refuses everyone the release fails, nothing is sent, and it succeeds once a key is
imported. The key store down and gpg failing fail the release with nothing sent (not even the
clear-text copy). A copy that fails temporarily after another was delivered goes to the durable
queue as encrypted bytes (no clear text in the spool) and is delivered once by the gateway's
queue runner; one refused for good is reported; a first copy failing sends nothing and the
release can be repeated. ``warn`` mode releases the held bytes as live mail would.

Reads: the test keys of ``tests/fixtures/keys.py``; temporary directories and databases.

Security notes: the assertions that no clear text of an encrypted recipient's copy reaches the
upstream or the spool are the point of this file.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

import gateway.cli
from gateway.audit.store import AuditRecord, SqlAuditStore
from gateway.core.model import utcnow
from gateway.db.engine import engine_for_url
from gateway.quarantine.models import HELD, RELEASE_FAILED, RELEASED
from gateway.queue import QUEUED
from gateway.smtp import capture
from tests.fixtures.db import run_async
from tests.fixtures.gateway import ALICE, RunningGateway
from tests.fixtures.keys import OpenPgpKeys, SmimeCerts
from tests.integration.test_encryption import (
    BOB,
    DANA,
    DAVE,
    ERIN,
    MARKER,
    ZED,
    build_message,
    check_inner,
    check_outer,
    cryptography_decrypt,
    encryption_key_id,
    import_key,
    packet_key_ids,
    parsed,
    pgp_decrypt,
    received_by,
    stored,
)

MakeGateway = Callable[..., RunningGateway]
Cli = Callable[..., tuple[int, str, str]]

#: a spam rule that holds every message of build_message() (its body carries MARKER)
HOLD_RULES = f"""
[[rule]]
id = "TEST_HOLD"
score = 12.0
description = "test: reaches hold"
body_regex = '''{MARKER.decode()}'''
"""


# --- the gateway that holds, the CLI that releases ------------------------------------------------


def hold_gateway(
    make_gateway: MakeGateway, tmp_path: Path, encryption: dict[str, Any] | None = None
) -> RunningGateway:
    """A gateway whose spam rule holds build_message() (encryption policy ``encryption``,
    default opportunistic), with the queue runner idle until drained."""
    rules = tmp_path / "hold-rules"
    rules.mkdir(exist_ok=True)
    (rules / "50-hold.toml").write_text(HOLD_RULES, encoding="utf-8")
    return make_gateway(
        {
            "checks": {
                "spam-score": {"rules_dirs": [str(rules)]},
                "encryption": encryption
                if encryption is not None
                else {"default": "opportunistic"},
            },
            "queue": {"runner_interval": "1h"},
        }
    )


def hold(gw: RunningGateway, recipients: list[str], data: bytes) -> int:
    """Send ``data`` through the gateway; the quarantine id of the held message."""
    with gw.smtp() as client:
        assert client.mail(ALICE, ["BODY=8BITMIME"])[0] == 250
        for rcpt in recipients:
            code, answer = client.rcpt(rcpt)
            assert code == 250, (rcpt, answer)
        code, answer = client.data(data)
    reply = answer.decode()
    assert code == 250 and "held for review as Q" in reply, reply
    assert gw.upstream.messages == []
    return int(reply.rsplit("Q", 1)[1].split()[0])


def _toml(prefix: str, table: dict[str, Any]) -> list[str]:
    lines = [f"[{prefix}]"]
    nested = []
    for key, value in table.items():
        if isinstance(value, dict):
            nested.append((f"{prefix}.{json.dumps(key)}", value))
        else:
            lines.append(f"{json.dumps(key)} = {json.dumps(value)}")
    for name, sub in nested:
        lines += _toml(name, sub)
    return lines


def release_config(
    gw: RunningGateway,
    path: Path,
    encryption: dict[str, Any],
    keys: dict[str, Any] | None = None,
    queue: dict[str, Any] | None = None,
) -> Path:
    """The operator's configuration: the gateway's database, state directory (GNUPGHOME, spool)
    and upstream, with the encryption policy ``encryption`` (as at release time)."""
    lines = [
        f"state_dir = {json.dumps(str(gw.config.state_dir))}",
        *_toml("database", {"url": gw.config.database_url, "timeout": 5.0}),
        *_toml("smtp", {"hostname": "gw.mailward.test"}),
        *_toml(
            "relay",
            {
                "host": "127.0.0.1",
                "port": gw.upstream.port,
                "tls": "none",
                "connect_timeout": 5.0,
                "command_timeout": 5.0,
                "data_timeout": 5.0,
            },
        ),
        *_toml("checks.encryption", encryption),
        *(_toml("keys", keys) if keys else []),
        *(_toml("queue", queue) if queue else []),
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Cli:
    """``mailward --config FILE ARGV...`` in-process: (exit code, stdout, stderr)."""

    def run(config: Path, *argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = gateway.cli.main(["--config", str(config), *argv])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def entry_of(gw: RunningGateway, entry_id: int) -> Any:
    assert gw.app.stores is not None
    entry = gw.run(gw.app.stores.quarantine.get(entry_id))
    assert entry is not None
    return entry


def decision_events(gw: RunningGateway, kind: str) -> list[AuditRecord]:
    async def go() -> list[AuditRecord]:
        engine = engine_for_url(gw.config.database_url, timeout=5.0)
        try:
            return await SqlAuditStore(engine, batch_size=1, timeout=5.0).list_records(
                kind=kind, limit=100
            )
        finally:
            await engine.dispose()

    return run_async(go())


def execute(gw: RunningGateway, statement: str) -> None:
    async def go() -> None:
        engine = engine_for_url(gw.config.database_url, timeout=5.0)
        try:
            async with engine.begin() as conn:
                await conn.execute(text(statement))
        finally:
            await engine.dispose()

    run_async(go())


def revoke(gw: RunningGateway, fingerprint: str) -> None:
    assert gw.app.stores is not None
    gw.run(gw.app.stores.keys.revoke(fingerprint, now=utcnow(), revoked_by="test"))


def rcpt_sets(gw: RunningGateway) -> list[tuple[str, ...]]:
    return sorted(m.rcpt_tos for m in gw.upstream.messages)


# --- round trip -----------------------------------------------------------------------------------


def test_a_released_message_is_encrypted_per_recipient_like_live_mail(
    make_gateway: MakeGateway,
    openpgp_keys: OpenPgpKeys,
    smime_certs: SmimeCerts,
    tmp_path: Path,
    cli: Cli,
) -> None:
    gw = hold_gateway(make_gateway, tmp_path)
    bob = import_key(gw, openpgp_keys.binary.data)
    dana = import_key(gw, openpgp_keys.certified.data)
    dave = import_key(gw, smime_certs.der.data)
    data = build_message(to=[BOB, DAVE, ERIN])  # DANA is Bcc: envelope only
    entry_id = hold(gw, [BOB, DANA, DAVE, ERIN], data)
    held = entry_of(gw, entry_id).message

    config = release_config(gw, tmp_path / "ops.toml", {"default": "opportunistic"})
    code, out, err = cli(config, "quarantine", "release", f"Q{entry_id}")

    assert code == 0, err
    # one upstream transaction per group, the envelope sender unchanged
    assert rcpt_sets(gw) == [(BOB,), (DANA,), (DAVE,), (ERIN,)]
    assert all(m.mail_from == ALICE for m in gw.upstream.messages)
    (named,) = received_by(gw, BOB)
    (bcc,) = received_by(gw, DANA)
    (smime,) = received_by(gw, DAVE)
    (clear,) = received_by(gw, ERIN)
    for copy in (named, bcc, smime):
        check_outer(copy.data)  # no clear text of an encrypted recipient's copy
    check_inner(pgp_decrypt(openpgp_keys, named.data))
    check_inner(pgp_decrypt(openpgp_keys, bcc.data))
    check_inner(cryptography_decrypt(smime.data, smime_certs.der))
    assert parsed(smime.data).get_content_type() == "application/pkcs7-mime"
    # the Bcc recipient's key is named in her own copy only
    assert packet_key_ids(named.data) == {encryption_key_id(openpgp_keys, bob.fingerprint)}
    assert packet_key_ids(bcc.data) == {encryption_key_id(openpgp_keys, dana.fingerprint)}
    assert clear.data == held  # clear text allowed (opportunistic, no key): the held bytes

    entry = entry_of(gw, entry_id)
    assert entry.status == RELEASED
    report = entry.upstream_reply
    assert report.startswith("delivered to 4 of 4 recipient(s) in 4 copies: ")
    assert f"<{BOB}> (openpgp): 250 " in report and f"<{DAVE}> (smime): 250 " in report
    assert f"<{DANA}> (openpgp): 250 " in report and f"<{ERIN}>: 250 " in report
    [event] = decision_events(gw, "quarantine-release")
    assert event.queue_id == f"Q{entry_id}" and event.upstream_reply == report
    assert out.startswith(f"quarantine {entry_id} released: delivered to 4 of 4")
    assert f"<{DANA}>" in out and "delivered (openpgp)" in out and "delivered (smime)" in out
    for key in (bob, dana, dave):
        assert stored(gw, key.fingerprint).last_used_at is not None  # keys checked and marked


# --- the policy and the keys at release time ------------------------------------------------------


def test_a_required_recipient_without_a_usable_key_now_is_not_sent(
    make_gateway: MakeGateway, openpgp_keys: OpenPgpKeys, tmp_path: Path, cli: Cli
) -> None:
    gw = hold_gateway(make_gateway, tmp_path)  # at hold time: opportunistic for everyone
    bob = import_key(gw, openpgp_keys.binary.data)
    dana = import_key(gw, openpgp_keys.certified.data)
    entry_id = hold(gw, [BOB, DANA, ZED, ERIN], build_message(to=[BOB, DANA, ZED, ERIN]))
    revoke(gw, dana.fingerprint)  # between the hold and the release

    policy = {
        "default": "opportunistic",
        "recipients": {DANA: {"policy": "required"}, ZED: {"policy": "required"}},
    }
    config = release_config(gw, tmp_path / "ops.toml", policy)
    code, out, err = cli(config, "quarantine", "release", str(entry_id))

    assert code == 1
    assert rcpt_sets(gw) == [(BOB,), (ERIN,)]  # neither DANA nor ZED, in no form
    check_inner(pgp_decrypt(openpgp_keys, received_by(gw, BOB)[0].data))
    assert packet_key_ids(received_by(gw, BOB)[0].data) == {
        encryption_key_id(openpgp_keys, bob.fingerprint)
    }
    assert MARKER in received_by(gw, ERIN)[0].data
    entry = entry_of(gw, entry_id)
    assert entry.status == RELEASED
    report = entry.upstream_reply
    assert report.startswith("delivered to 2 of 4 recipient(s) in 2 copies: ")
    assert (
        f"not sent (encryption policy): <{DANA}> 550 5.7.5 Encryption required for <{DANA}> "
        "but no usable key is known: stored key(s): 1 revoked; "
        f"<{ZED}> 550 5.7.5 Encryption required for <{ZED}> but no usable key is known: none "
        "is stored for this address"
    ) in report
    [event] = decision_events(gw, "quarantine-release")
    assert event.upstream_reply == report and "not sent (encryption policy)" in (event.detail or "")
    rows = {line.split()[0]: line for line in out.splitlines()[2:]}
    assert "not sent (encryption policy)" in rows[f"<{DANA}>"]
    assert "550 5.7.5" in rows[f"<{ZED}>"] and "delivered (openpgp)" in rows[f"<{BOB}>"]
    assert err.strip() == f"mailward: quarantine {entry_id}: 2 recipient(s) did not get the message"
    # released: a second release is refused, nothing more is sent
    code, _, err = cli(config, "quarantine", "release", str(entry_id))
    assert code == 1 and "already released" in err and len(gw.upstream.messages) == 2


def test_when_the_policy_refuses_everyone_nothing_is_sent_until_a_key_is_imported(
    make_gateway: MakeGateway, openpgp_keys: OpenPgpKeys, tmp_path: Path, cli: Cli
) -> None:
    gw = hold_gateway(make_gateway, tmp_path, {"default": "never"})
    entry_id = hold(gw, [DANA], build_message(to=[DANA]))
    config = release_config(
        gw, tmp_path / "ops.toml", {"recipients": {DANA: {"policy": "required"}}}
    )

    code, out, err = cli(config, "quarantine", "release", str(entry_id))
    assert code == 1 and out == ""
    assert err.startswith(f"mailward: quarantine {entry_id} release failed: no recipient may be")
    assert f"<{DANA}> 550 5.7.5" in err and "nothing was sent" in err
    assert gw.upstream.messages == []
    entry = entry_of(gw, entry_id)
    assert entry.status == RELEASE_FAILED and "none is stored" in entry.upstream_reply
    [failed] = decision_events(gw, "quarantine-release-failed")
    assert failed.upstream_reply == entry.upstream_reply

    dana = import_key(gw, openpgp_keys.certified.data)
    code, out, err = cli(config, "quarantine", "release", str(entry_id))
    assert code == 0, err
    (copy,) = gw.upstream.messages
    assert copy.rcpt_tos == (DANA,)
    check_outer(copy.data)
    check_inner(pgp_decrypt(openpgp_keys, copy.data))
    assert out.startswith(
        f"quarantine {entry_id} released: delivered to 1 of 1 recipient(s) in 1 copy: "
        f"<{DANA}> (openpgp): 250 "
    )
    assert stored(gw, dana.fingerprint).last_used_at is not None


# --- failures: nothing in clear -------------------------------------------------------------------


def test_key_store_down_at_release_fails_and_sends_nothing(
    make_gateway: MakeGateway, openpgp_keys: OpenPgpKeys, tmp_path: Path, cli: Cli
) -> None:
    gw = hold_gateway(make_gateway, tmp_path)
    import_key(gw, openpgp_keys.binary.data)
    entry_id = hold(gw, [BOB, ERIN], build_message(to=[BOB, ERIN]))
    config = release_config(gw, tmp_path / "ops.toml", {"default": "opportunistic"})

    execute(gw, "ALTER TABLE encryption_key RENAME TO encryption_key_away")
    try:
        code, out, err = cli(config, "quarantine", "release", str(entry_id))
    finally:
        execute(gw, "ALTER TABLE encryption_key_away RENAME TO encryption_key")
    assert code == 1 and out == ""
    assert "451 4.3.0 Encryption key store unavailable" in err and "nothing was sent" in err
    assert gw.upstream.messages == []  # not even ERIN's clear-text copy
    assert entry_of(gw, entry_id).status == RELEASE_FAILED
    assert len(decision_events(gw, "quarantine-release-failed")) == 1

    code, _, err = cli(config, "quarantine", "release", str(entry_id))
    assert code == 0, err
    assert rcpt_sets(gw) == [(BOB,), (ERIN,)]
    check_inner(pgp_decrypt(openpgp_keys, received_by(gw, BOB)[0].data))


def test_encryption_failure_fails_the_release_and_sends_nothing(
    make_gateway: MakeGateway, openpgp_keys: OpenPgpKeys, tmp_path: Path, cli: Cli
) -> None:
    gw = hold_gateway(make_gateway, tmp_path)
    import_key(gw, openpgp_keys.binary.data)
    entry_id = hold(gw, [BOB, ERIN], build_message(to=[BOB, ERIN]))
    config = release_config(
        gw, tmp_path / "ops.toml", {"default": "opportunistic"}, keys={"gpg": "/nonexistent/gpg"}
    )
    code, out, err = cli(config, "quarantine", "release", str(entry_id))
    assert code == 1 and out == ""
    assert "451 4.3.0 Encryption failed" in err and "nothing was sent" in err
    assert gw.upstream.messages == []
    entry = entry_of(gw, entry_id)
    assert entry.status == RELEASE_FAILED and "Encryption failed" in entry.upstream_reply


# --- several copies: partial results --------------------------------------------------------------


def test_a_copy_failing_after_another_was_delivered_is_queued_encrypted(
    make_gateway: MakeGateway,
    openpgp_keys: OpenPgpKeys,
    smime_certs: SmimeCerts,
    tmp_path: Path,
    cli: Cli,
) -> None:
    gw = hold_gateway(make_gateway, tmp_path)
    import_key(gw, openpgp_keys.binary.data)
    import_key(gw, smime_certs.der.data)
    entry_id = hold(gw, [BOB, DAVE], build_message(to=[BOB, DAVE]))
    gw.upstream.fail_rcpt = {DAVE: "451 4.2.0 Busy"}  # the second copy (S/MIME, DAVE)
    config = release_config(gw, tmp_path / "ops.toml", {"default": "opportunistic"})

    code, out, err = cli(config, "quarantine", "release", str(entry_id))

    assert code == 0, err
    assert rcpt_sets(gw) == [(BOB,)]
    (queued,) = gw.queued(QUEUED)
    (copy,) = queued.copies
    assert [r.address for r in copy.recipients] == [DAVE]
    assert queued.mail_from == ALICE and queued.txn_id == entry_of(gw, entry_id).transaction_id
    spool = Path(gw.config.queue.spool_path(gw.config.state_dir))
    files = [p for p in spool.rglob("*") if p.is_file()]
    assert files and all(MARKER not in p.read_bytes() for p in files)  # encrypted bytes only
    entry = entry_of(gw, entry_id)
    assert entry.status == RELEASED
    assert f"queued as {queued.id} (retried by the queue): <{DAVE}> 451 4.2.0 Busy" in (
        entry.upstream_reply
    )
    assert f"queued as {queued.id}" in out

    gw.upstream.fail_rcpt = {}
    gw.drain_queue()  # the gateway's runner delivers the encrypted remainder, once
    assert rcpt_sets(gw) == [(BOB,), (DAVE,)]
    check_inner(cryptography_decrypt(received_by(gw, DAVE)[0].data, smime_certs.der))


def test_a_remainder_the_queue_cannot_take_fails_the_release_never_a_loss(
    make_gateway: MakeGateway,
    openpgp_keys: OpenPgpKeys,
    smime_certs: SmimeCerts,
    tmp_path: Path,
    cli: Cli,
) -> None:
    gw = hold_gateway(make_gateway, tmp_path)
    import_key(gw, openpgp_keys.binary.data)
    import_key(gw, smime_certs.der.data)
    entry_id = hold(gw, [BOB, DAVE], build_message(to=[BOB, DAVE]))
    gw.upstream.fail_rcpt = {DAVE: "451 4.2.0 Busy"}
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"")  # a spool directory below a file cannot be created
    config = release_config(
        gw,
        tmp_path / "ops.toml",
        {"default": "opportunistic"},
        queue={"spool_dir": str(blocker / "spool")},
    )

    code, out, err = cli(config, "quarantine", "release", str(entry_id))

    assert code == 1 and out == ""
    assert rcpt_sets(gw) == [(BOB,)] and gw.queued() == []
    entry = entry_of(gw, entry_id)
    assert entry.status == RELEASE_FAILED  # may be released again: DAVE must not be lost
    assert entry.upstream_reply.startswith("delivered to 1 of 2 recipient(s) in 1 copy: ")
    assert "the rest could NOT be queued" in entry.upstream_reply
    assert f"<{DAVE}> did not get the message" in entry.upstream_reply
    assert "a duplicate for those who got it" in err

    gw.upstream.fail_rcpt = {}
    code, _, err = cli(config, "quarantine", "release", str(entry_id))
    assert code == 0, err
    assert rcpt_sets(gw) == [(BOB,), (BOB,), (DAVE,)]  # a duplicate for BOB, never a loss


def test_a_copy_refused_for_good_after_another_was_delivered_is_reported(
    make_gateway: MakeGateway,
    openpgp_keys: OpenPgpKeys,
    smime_certs: SmimeCerts,
    tmp_path: Path,
    cli: Cli,
) -> None:
    gw = hold_gateway(make_gateway, tmp_path)
    import_key(gw, openpgp_keys.binary.data)
    import_key(gw, smime_certs.der.data)
    entry_id = hold(gw, [BOB, DAVE], build_message(to=[BOB, DAVE]))
    gw.upstream.fail_rcpt = {DAVE: "550 5.1.1 No such user"}
    config = release_config(gw, tmp_path / "ops.toml", {"default": "opportunistic"})

    code, out, err = cli(config, "quarantine", "release", str(entry_id))

    assert code == 1
    assert rcpt_sets(gw) == [(BOB,)] and gw.queued() == []
    entry = entry_of(gw, entry_id)
    assert entry.status == RELEASED
    assert f"refused by the upstream, not delivered: <{DAVE}> 550 5.1.1 No such user" in (
        entry.upstream_reply
    )
    assert "refused by the upstream" in out and "1 recipient(s) did not get" in err


def test_the_first_copy_failing_sends_nothing_and_the_release_can_be_repeated(
    make_gateway: MakeGateway,
    openpgp_keys: OpenPgpKeys,
    smime_certs: SmimeCerts,
    tmp_path: Path,
    cli: Cli,
) -> None:
    gw = hold_gateway(make_gateway, tmp_path)
    import_key(gw, openpgp_keys.binary.data)
    import_key(gw, smime_certs.der.data)
    entry_id = hold(gw, [BOB, DAVE], build_message(to=[BOB, DAVE]))
    gw.upstream.inject("EOM", capture.reply("452 4.3.1 Insufficient storage"))  # BOB's copy
    config = release_config(gw, tmp_path / "ops.toml", {"default": "opportunistic"})

    code, out, err = cli(config, "quarantine", "release", str(entry_id))
    assert code == 1 and out == ""
    assert f"copy 1 of 2 (<{BOB}>): message refused: 452 4.3.1 Insufficient storage" in err
    assert "later copies not attempted" in err
    assert gw.upstream.messages == [] and gw.queued() == []
    assert entry_of(gw, entry_id).status == RELEASE_FAILED

    code, _, err = cli(config, "quarantine", "release", str(entry_id))
    assert code == 0, err
    assert rcpt_sets(gw) == [(BOB,), (DAVE,)]
    check_inner(pgp_decrypt(openpgp_keys, received_by(gw, BOB)[0].data))


def test_warn_mode_releases_the_held_bytes_as_live_mail_would(
    make_gateway: MakeGateway, openpgp_keys: OpenPgpKeys, tmp_path: Path, cli: Cli
) -> None:
    gw = hold_gateway(make_gateway, tmp_path)
    import_key(gw, openpgp_keys.binary.data)
    entry_id = hold(gw, [BOB, ZED], build_message(to=[BOB, ZED]))
    assert entry_of(gw, entry_id).status == HELD
    policy = {
        "mode": "warn",
        "default": "opportunistic",
        "recipients": {ZED: {"policy": "required"}},
    }
    config = release_config(gw, tmp_path / "ops.toml", policy)
    code, out, err = cli(config, "quarantine", "release", str(entry_id))
    assert code == 0, err
    (copy,) = gw.upstream.messages
    assert copy.rcpt_tos == (BOB, ZED) and copy.data == entry_of(gw, entry_id).message
    assert out.startswith(f"quarantine {entry_id} released: 250 2.0.0 Ok: queued as ")
