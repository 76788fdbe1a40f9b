"""KeyRing, the gateway-owned GNUPGHOME: keys from the store are imported on demand, encryption to
a fingerprint works with the documented options, the keyring can be rebuilt from the store, and
changes made by another process are noticed. Real gpg throughout; a gpg wrapper script that logs
its invocations shows when the keyring is (not) touched."""

from __future__ import annotations

import datetime as dt
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.keys import ENCRYPT_OPTIONS, GpgProgram, KeyRecord, KeyRing, validate_key
from gateway.keys.gpghome import GPG_CONF
from tests.fixtures.keys import GPG, OpenPgpKeys, SmimeCerts, kill_agent

MESSAGE = b"Subject: secret\r\n\r\nattack at dawn \xc3\xa9\r\n"


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


async def record(data: bytes) -> KeyRecord:
    key = await validate_key(data, now=now())
    t = now()
    return KeyRecord(
        id=0,
        fingerprint=key.fingerprint,
        kind=key.kind,
        algorithm=key.algorithm,
        addresses=key.addresses,
        user_ids=key.user_ids,
        created_at=key.created_at,
        expires_at=key.expires_at,
        encryption_expires_at=key.encryption_expires_at,
        revoked=False,
        revoked_at=None,
        source="operator",
        verification="unverified",
        imported_at=t,
        imported_by="test",
        updated_at=t,
        last_used_at=None,
        material_sha256=key.material_sha256,
        material=key.material,
    )


@pytest.fixture
def gpg_log(tmp_path: Path) -> Path:
    return tmp_path / "gpg.log"


@pytest.fixture
def logging_gpg(tmp_path: Path, gpg_log: Path) -> GpgProgram:
    """A real gpg behind a wrapper that appends its arguments to ``gpg_log``."""
    wrapper = tmp_path / "gpg-wrapper"
    wrapper.write_text(f'#!/bin/sh\necho "$*" >> "{gpg_log}"\nexec {GPG} "$@"\n')
    wrapper.chmod(0o755)
    return GpgProgram(str(wrapper), 30.0)


@pytest.fixture
def keyring(tmp_path: Path, logging_gpg: GpgProgram) -> Iterator[KeyRing]:
    ring = KeyRing(tmp_path / "gnupg", program=logging_gpg)
    try:
        yield ring
    finally:
        kill_agent(ring.path)


def runs(gpg_log: Path, verb: str) -> int:
    if not gpg_log.exists():
        return 0
    return sum(1 for line in gpg_log.read_text().splitlines() if verb in line.split())


def encrypt(
    ring: KeyRing, *fingerprints: str, hidden: bool = False
) -> subprocess.CompletedProcess[bytes]:
    flag = "--hidden-recipient" if hidden else "--recipient"
    recipients = [arg for f in fingerprints for arg in (flag, f)]
    return subprocess.run(
        [GPG, "--homedir", str(ring.path), "--batch", *ENCRYPT_OPTIONS, *recipients, "--encrypt"],
        input=MESSAGE,
        capture_output=True,
        env={"PATH": os.environ["PATH"]},
        check=False,
        timeout=30,
    )


async def test_ensure_imports_and_encryption_to_the_fingerprint_round_trips(
    keyring: KeyRing, openpgp_keys: OpenPgpKeys
) -> None:
    alice = await record(openpgp_keys.valid.data)
    rita = await record(openpgp_keys.rsa.data)
    assert encrypt(keyring, alice.fingerprint).returncode != 0  # not there yet
    await keyring.ensure([alice, rita])
    for rec in (alice, rita):
        result = encrypt(keyring, rec.fingerprint)
        assert result.returncode == 0, result.stderr
        assert openpgp_keys.home.decrypt(result.stdout) == MESSAGE
    both = encrypt(keyring, alice.fingerprint, rita.fingerprint, hidden=True)
    assert both.returncode == 0
    assert openpgp_keys.home.decrypt(both.stdout) == MESSAGE


async def test_the_directory_is_private_and_says_trust_model_always(
    keyring: KeyRing, openpgp_keys: OpenPgpKeys
) -> None:
    await keyring.ensure([await record(openpgp_keys.valid.data)])
    assert stat.S_IMODE(keyring.path.stat().st_mode) == 0o700
    conf = (keyring.path / "gpg.conf").read_text()
    assert conf == GPG_CONF
    assert "trust-model always" in conf and "no-auto-key-locate" in conf
    assert "--trust-model" in ENCRYPT_OPTIONS and "always" in ENCRYPT_OPTIONS
    # no secret key material ever lands here
    assert not any((keyring.path / "private-keys-v1.d").glob("*"))


async def test_ensure_does_not_run_gpg_for_keys_already_imported(
    keyring: KeyRing, openpgp_keys: OpenPgpKeys, gpg_log: Path
) -> None:
    alice = await record(openpgp_keys.valid.data)
    bob = await record(openpgp_keys.binary.data)
    await keyring.ensure([alice])
    assert runs(gpg_log, "--import") == 1
    for _ in range(5):
        await keyring.ensure([alice])
    assert runs(gpg_log, "--import") == 1  # per message: no gpg run, no keyring listing
    assert runs(gpg_log, "--list-keys") == 0
    await keyring.ensure([alice, bob])
    assert runs(gpg_log, "--import") == 2  # only bob is new
    assert "--import" in gpg_log.read_text().splitlines()[-1].split()


async def test_changed_material_is_imported_again(
    keyring: KeyRing, openpgp_keys: OpenPgpKeys, gpg_log: Path
) -> None:
    before = await record(openpgp_keys.revoked_before.data)
    await keyring.ensure([before])
    revoked = await validate_key(openpgp_keys.revoked.data, now=now(), allow_revoked=True)
    from dataclasses import replace

    changed = replace(before, material=revoked.material, material_sha256=revoked.material_sha256)
    await keyring.ensure([changed])
    assert runs(gpg_log, "--import") == 2
    result = encrypt(keyring, before.fingerprint)
    assert result.returncode != 0  # the merged revocation makes gpg refuse the key, too


async def test_s_mime_records_are_ignored(
    keyring: KeyRing, smime_certs: SmimeCerts, gpg_log: Path
) -> None:
    cert = await record(smime_certs.valid.data)
    await keyring.ensure([cert])
    assert runs(gpg_log, "--import") == 0


async def test_sync_holds_exactly_the_given_keys(
    keyring: KeyRing, openpgp_keys: OpenPgpKeys
) -> None:
    alice = await record(openpgp_keys.valid.data)
    bob = await record(openpgp_keys.binary.data)
    carol = await record(openpgp_keys.two_uids.data)
    await keyring.ensure([alice, bob])
    report = await keyring.sync([bob, carol])
    assert report.imported == 2
    assert report.removed == (alice.fingerprint,)
    assert await keyring.fingerprints() == {bob.fingerprint, carol.fingerprint}
    report = await keyring.sync([], rebuild=True)
    assert report.removed == tuple(sorted([bob.fingerprint, carol.fingerprint]))
    assert await keyring.fingerprints() == set()


async def test_a_deleted_keyring_is_rebuilt(keyring: KeyRing, openpgp_keys: OpenPgpKeys) -> None:
    alice = await record(openpgp_keys.valid.data)
    await keyring.ensure([alice])
    import shutil

    shutil.rmtree(keyring.path)
    await keyring.ensure([alice])  # the keyring file is gone: noticed, imported again
    result = encrypt(keyring, alice.fingerprint)
    assert result.returncode == 0
    await keyring.sync([alice], rebuild=True)
    assert await keyring.fingerprints() == {alice.fingerprint}


async def test_a_change_by_another_process_is_noticed(
    keyring: KeyRing, openpgp_keys: OpenPgpKeys
) -> None:
    alice = await record(openpgp_keys.valid.data)
    bob = await record(openpgp_keys.binary.data)
    await keyring.ensure([alice, bob])
    other = KeyRing(keyring.path)  # e.g. `mailward key sync` while the gateway runs
    await other.sync([bob])  # alice is removed behind our back
    assert await keyring.fingerprints() == {bob.fingerprint}
    await keyring.ensure([alice])
    assert await keyring.fingerprints() == {alice.fingerprint, bob.fingerprint}
    assert encrypt(keyring, alice.fingerprint).returncode == 0


async def test_record_without_material_is_an_error(
    keyring: KeyRing, openpgp_keys: OpenPgpKeys
) -> None:
    from dataclasses import replace

    alice = replace(await record(openpgp_keys.valid.data), material=None)
    with pytest.raises(ValueError, match="material not loaded"):
        await keyring.ensure([alice])
