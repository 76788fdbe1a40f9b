"""``mailward key import|list|show|remove|revoke|verify|sync`` against real databases, with keys and
certificates generated at test time (tests/fixtures/keys.py) and the real gpg.

The tests call ``gateway.cli.main`` in-process (and in a subprocess for an unreachable database).
Every refused import is checked to name the file and the reason, exit 2, and leave the key tables
and the audit log untouched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

import gateway.cli
from gateway.cli.common import operator
from gateway.db.engine import engine_for_url
from gateway.keys import KeyRing, validate_key
from tests.fixtures.db import run_async, unreachable_url
from tests.fixtures.keys import GpgHome, OpenPgpKeys, SmimeCerts, TestCert, TestKey, kill_agent

REPO = Path(__file__).resolve().parents[2]
ENTRY = "import sys, gateway.cli as c; sys.exit(c.main(sys.argv[1:]))"

Cli = Callable[..., tuple[int, str, str]]


def write_config(path: Path, db_url: str, state_dir: Path, keys: str = "") -> Path:
    path.write_text(
        f"state_dir = {json.dumps(str(state_dir))}\n"
        f"[database]\nurl = {json.dumps(db_url)}\ntimeout = 5.0\n"
        f"[keys]\n{keys}",
        encoding="utf-8",
    )
    return path


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    state = tmp_path / "state"
    try:
        yield state
    finally:
        kill_agent(state / "gnupg")


@pytest.fixture
def config_file(db_url: str, tmp_path: Path, state_dir: Path) -> Path:
    return write_config(tmp_path / "mailward.toml", db_url, state_dir)


def make_cli(config_file: Path, capsys: pytest.CaptureFixture[str]) -> Cli:
    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = gateway.cli.main(["--config", str(config_file), *argv])
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def cli(config_file: Path, capsys: pytest.CaptureFixture[str]) -> Cli:
    """Run ``mailward --config FILE ARGV...`` in-process: (exit code, stdout, stderr)."""
    return make_cli(config_file, capsys)


def query(db_url: str, statement: str) -> list[tuple[object, ...]]:
    async def go() -> list[tuple[object, ...]]:
        engine = engine_for_url(db_url, timeout=5.0)
        try:
            async with engine.connect() as conn:
                return [tuple(r) for r in await conn.execute(text(statement))]
        finally:
            await engine.dispose()

    return run_async(go())


def stored(db_url: str) -> tuple[int, int, int]:
    """Rows in encryption_key, encryption_key_address and key audit events."""
    keys = query(db_url, "SELECT count(*) FROM encryption_key")[0][0]
    addresses = query(db_url, "SELECT count(*) FROM encryption_key_address")[0][0]
    events = query(db_url, "SELECT count(*) FROM audit_record WHERE kind LIKE 'key-%'")[0][0]
    return int(keys), int(addresses), int(events)  # type: ignore[call-overload]


def write(item: TestKey | TestCert, directory: Path, suffix: str = ".key") -> Path:
    return item.write(directory, suffix)


# --- import ---------------------------------------------------------------------------------------


def test_import_valid_key_then_list_show(
    cli: Cli, db_url: str, tmp_path: Path, openpgp_keys: OpenPgpKeys
) -> None:
    key = openpgp_keys.valid
    code, out, err = cli("key", "import", str(write(key, tmp_path)))
    assert (code, err) == (0, "")
    assert f"key {key.fingerprint} (openpgp ed25519/cv25519) imported for alice@example.com" in out
    assert "expires never; source operator, unverified" in out
    assert stored(db_url) == (1, 1, 1)
    kind, listener, detail = query(
        db_url, "SELECT kind, listener, detail FROM audit_record WHERE kind LIKE 'key-%'"
    )[0]
    assert (kind, listener) == ("key-import", "cli")
    assert key.fingerprint in str(detail) and operator() in str(detail)

    code, out, _ = cli("key", "list")
    assert code == 0
    header, row = out.splitlines()
    assert header.split()[:3] == ["FINGERPRINT", "KIND", "STATE"]
    assert row.split()[:3] == [key.fingerprint, "openpgp", "usable"]
    assert row.endswith("alice@example.com")

    spaced = " ".join(key.fingerprint[i : i + 4] for i in range(0, 40, 4)).lower()
    code, out, _ = cli("key", "show", spaced)
    assert code == 0
    assert out.startswith(f"key {key.fingerprint}\n")
    assert "  state:          usable" in out
    assert "  verification:   unverified" in out
    assert "    alice@example.com" in out
    assert "    Alice <alice@example.com>" in out
    assert "BEGIN PGP" not in out


@pytest.mark.parametrize(
    ("name", "kind", "suffix"),
    [("binary", "openpgp", ".gpg"), ("rsa", "openpgp", ".asc"), ("idn", "openpgp", ".asc")],
)
def test_import_openpgp_forms(
    cli: Cli,
    db_url: str,
    tmp_path: Path,
    openpgp_keys: OpenPgpKeys,
    name: str,
    kind: str,
    suffix: str,
) -> None:
    key: TestKey = getattr(openpgp_keys, name)
    code, out, err = cli("key", "import", str(write(key, tmp_path, suffix)))
    assert code == 0, err
    assert f"key {key.fingerprint} ({kind} " in out
    assert f"imported for {', '.join(key.addresses)};" in out


@pytest.mark.parametrize(("name", "suffix"), [("valid", ".pem"), ("der", ".der")])
def test_import_certificates(
    cli: Cli, db_url: str, tmp_path: Path, smime_certs: SmimeCerts, name: str, suffix: str
) -> None:
    cert: TestCert = getattr(smime_certs, name)
    code, out, err = cli("key", "import", str(write(cert, tmp_path, suffix)), "--verified")
    assert code == 0, err
    assert f"key {cert.fingerprint} (smime " in out
    assert f"imported for {cert.addresses[0]};" in out and "verified" in out
    code, out, _ = cli("key", "show", cert.fingerprint, "--json")
    data = json.loads(out)
    assert data["kind"] == "smime" and data["verification"] == "verified"
    assert data["addresses"] == list(cert.addresses)
    assert data["expires_at"] == cert.cert.not_valid_after_utc.isoformat()


OPENPGP_REFUSALS = [
    ("expired", "the key expired on 2020-12-31"),
    ("revoked", "the key is revoked"),
    ("signing_only", "no usable encryption subkey"),
    ("expired_subkey", "no usable encryption subkey"),
    ("secret", "contains a private key (PGP PRIVATE KEY BLOCK)"),
    ("secret_binary", "contains an OpenPGP secret key"),
    ("many_uids", "17 user IDs, more than the limit of 16 (keys.max_user_ids)"),
    ("two_keys", "holds 2 keys; import one key per file"),
    ("oversize", "more than the limit of 65536 bytes (keys.max_key_size)"),
    ("garbage", "not a valid OpenPGP public key"),
]
SMIME_REFUSALS = [
    ("expired", "the certificate expired on"),
    ("not_yet_valid", "the certificate is not valid before"),
    ("signing_only", "keyUsage does not allow encryption (keyEncipherment)"),
    ("server_eku", "extendedKeyUsage does not include emailProtection"),
    ("ca", "is a CA certificate"),
    ("with_private_key", "contains a private key (PRIVATE KEY)"),
    ("private_key_der", "the file is a private key"),
    # the S/MIME transform encrypts to RSA certificates only (cryptography's envelope builder)
    ("ec", "EC key (secp256r1): Mailward encrypts S/MIME to RSA certificates only"),
]


def assert_refused(cli: Cli, db_url: str, path: Path, reason: str, *options: str) -> None:
    code, out, err = cli("key", "import", str(path), *options)
    assert code == 2
    assert out == ""
    assert err.startswith(f"mailward: {path}: refused: ")
    assert reason in err
    assert len(err.strip().splitlines()) == 1
    assert stored(db_url) == (0, 0, 0)  # nothing stored, not even partially; nothing audited


@pytest.mark.parametrize(("name", "reason"), OPENPGP_REFUSALS)
def test_bad_openpgp_input_is_refused_and_nothing_stored(
    cli: Cli, db_url: str, tmp_path: Path, openpgp_keys: OpenPgpKeys, name: str, reason: str
) -> None:
    assert_refused(cli, db_url, write(getattr(openpgp_keys, name), tmp_path), reason)


@pytest.mark.parametrize(("name", "reason"), SMIME_REFUSALS)
def test_bad_certificate_input_is_refused_and_nothing_stored(
    cli: Cli, db_url: str, tmp_path: Path, smime_certs: SmimeCerts, name: str, reason: str
) -> None:
    assert_refused(cli, db_url, write(getattr(smime_certs, name), tmp_path), reason)


def test_wrong_address_is_refused(
    cli: Cli, db_url: str, tmp_path: Path, openpgp_keys: OpenPgpKeys, smime_certs: SmimeCerts
) -> None:
    assert_refused(
        cli,
        db_url,
        write(openpgp_keys.wrong_uid, tmp_path),
        "not valid for alice@example.com: it names mallory@evil.example",
        "--address",
        "alice@example.com",
    )
    assert_refused(
        cli,
        db_url,
        write(smime_certs.wrong_san, tmp_path),
        "not valid for carol@example.com: it names someone@other.example",
        "--address",
        "carol@example.com",
    )
    assert_refused(
        cli,
        db_url,
        write(openpgp_keys.valid, tmp_path),
        "percent-hack",
        "--address",
        "alice%relay@example.com",
    )


def test_unreadable_file(cli: Cli, db_url: str, tmp_path: Path) -> None:
    code, _, err = cli("key", "import", str(tmp_path / "missing.asc"))
    assert code == 2
    assert err == f"mailward: {tmp_path / 'missing.asc'}: cannot read: No such file or directory\n"
    code, _, err = cli("key", "import", str(tmp_path))
    assert code == 2 and "cannot read" in err


def test_limits_come_from_the_configuration(
    db_url: str,
    tmp_path: Path,
    state_dir: Path,
    openpgp_keys: OpenPgpKeys,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = write_config(
        tmp_path / "small.toml", db_url, state_dir, 'max_key_size = "1K"\nmax_user_ids = 1\n'
    )
    cli = make_cli(config, capsys)
    assert_refused(
        cli, db_url, write(openpgp_keys.rsa, tmp_path), "more than the limit of 1024 bytes"
    )
    assert_refused(
        cli, db_url, write(openpgp_keys.two_uids, tmp_path), "2 user IDs, more than the limit of 1"
    )


def test_address_option_and_reimport(
    cli: Cli, db_url: str, tmp_path: Path, openpgp_keys: OpenPgpKeys
) -> None:
    path = write(openpgp_keys.two_uids, tmp_path)
    code, out, _ = cli("key", "import", str(path), "--address", "Carol@Example.COM")
    assert code == 0 and "imported for carol@example.com;" in out
    code, out, _ = cli("key", "import", str(path), "--source", "user", "--verified")
    assert code == 0
    assert "updated for carol.work@example.org, carol@example.com;" in out
    assert "source user, verified" in out
    assert stored(db_url) == (1, 2, 2)


def test_revoked_version_of_a_stored_key_revokes_it(
    cli: Cli, db_url: str, tmp_path: Path, openpgp_keys: OpenPgpKeys
) -> None:
    fpr = openpgp_keys.revoked.fingerprint
    assert cli("key", "import", str(write(openpgp_keys.revoked_before, tmp_path)))[0] == 0
    code, out, _ = cli("key", "import", str(write(openpgp_keys.revoked, tmp_path)))
    assert code == 0
    assert out == f"key {fpr} (openpgp) revoked: it will not be used again\n"
    code, out, _ = cli("key", "list", "rev@example.com", "--json")
    assert json.loads(out)["state"] == "revoked"
    code, _, err = cli("key", "import", str(write(openpgp_keys.revoked_before, tmp_path)))
    assert code == 2 and "revoked in the store" in err


# --- list / show ----------------------------------------------------------------------------------


def test_list_by_address_and_json(
    cli: Cli, tmp_path: Path, openpgp_keys: OpenPgpKeys, smime_certs: SmimeCerts
) -> None:
    for item in (openpgp_keys.two_uids, openpgp_keys.valid, smime_certs.valid):
        assert cli("key", "import", str(write(item, tmp_path)))[0] == 0
    code, out, _ = cli("key", "list", "CAROL@example.com")
    assert code == 0
    rows = out.splitlines()[1:]
    assert {r.split()[0] for r in rows} == {
        openpgp_keys.two_uids.fingerprint,
        smime_certs.valid.fingerprint,
    }
    code, out, _ = cli("key", "list", "--kind", "smime", "--json")
    (line,) = out.splitlines()
    data = json.loads(line)
    assert data["fingerprint"] == smime_certs.valid.fingerprint
    assert data["state"] == "usable" and "material" not in data
    assert cli("key", "list", "nobody@example.com") == (0, "no matching keys\n", "")
    code, _, err = cli("key", "list", "@relay:carol@example.com")
    assert code == 2 and "source route" in err


def test_show_armor_is_importable_and_json(
    cli: Cli, tmp_path: Path, openpgp_keys: OpenPgpKeys
) -> None:
    key = openpgp_keys.certified
    assert cli("key", "import", str(write(key, tmp_path)))[0] == 0
    code, out, _ = cli("key", "show", key.fingerprint, "--armor")
    assert code == 0
    armored = out[out.index("-----BEGIN PGP PUBLIC KEY BLOCK-----") :]
    from datetime import UTC, datetime

    again = run_async(validate_key(armored.encode(), now=datetime.now(UTC)))
    assert again.fingerprint == key.fingerprint
    _, out, _ = cli("key", "show", key.fingerprint, "--json", "--armor")
    data = json.loads(out)
    assert data["armored"] == armored
    assert data["encryption_expires_at"] is None


def test_unknown_and_malformed_fingerprints(cli: Cli, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("key", "show", "A" * 40) == (1, "", f"mailward: no key {'A' * 40}\n")
    assert cli("key", "remove", "A" * 40)[0] == 1
    for bad in ("CA1EF57A52352201", "xyz"):
        with pytest.raises(SystemExit) as info:
            cli("key", "show", bad)
        assert info.value.code == 2
        assert "not a full fingerprint" in capsys.readouterr().err


def test_hostile_user_ids_are_printed_escaped(
    cli: Cli, tmp_path: Path, openpgp_keys: OpenPgpKeys
) -> None:
    home = GpgHome()
    try:
        fpr = home.generate("Eve \u202egnp.exe\u202c <eve@example.com>")
        path = tmp_path / "eve.asc"
        path.write_bytes(home.export(fpr))
    finally:
        home.close()
    assert cli("key", "import", str(path))[0] == 0
    code, out, _ = cli("key", "show", fpr)
    assert code == 0
    assert "Eve \\u202egnp.exe\\u202c <eve@example.com>" in out
    assert "\u202e" not in out
    _, out, _ = cli("key", "show", fpr, "--json")
    assert json.loads(out)["user_ids"] == ["Eve \u202egnp.exe\u202c <eve@example.com>"]


# --- remove / revoke / verify / sync --------------------------------------------------------------


def test_remove_revoke_verify(
    cli: Cli, db_url: str, tmp_path: Path, openpgp_keys: OpenPgpKeys, smime_certs: SmimeCerts
) -> None:
    pgp, cert = openpgp_keys.valid, smime_certs.valid
    cli("key", "import", str(write(pgp, tmp_path)))
    cli("key", "import", str(write(cert, tmp_path)))
    code, out, _ = cli("key", "verify", pgp.fingerprint)
    assert code == 0 and out.startswith(f"key {pgp.fingerprint} (openpgp) marked verified")
    code, out, _ = cli("key", "verify", pgp.fingerprint, "--unverified")
    assert code == 0 and "marked unverified" in out
    code, out, _ = cli("key", "revoke", cert.fingerprint)
    assert code == 0 and out.startswith(f"key {cert.fingerprint} (smime) revoked")
    code, out, _ = cli("key", "show", cert.fingerprint)
    assert "  state:          revoked" in out
    code, out, _ = cli("key", "remove", pgp.fingerprint)
    assert code == 0
    assert out == f"key {pgp.fingerprint} (openpgp) removed; addresses: alice@example.com\n"
    assert cli("key", "list", "alice@example.com") == (0, "no matching keys\n", "")
    kinds = [r[0] for r in query(db_url, "SELECT kind FROM audit_record ORDER BY id")]
    assert kinds == [
        "key-import",
        "key-import",
        "key-verify",
        "key-verify",
        "key-revoke",
        "key-remove",
    ]


def test_sync_rebuilds_the_gateway_keyring_from_the_store(
    cli: Cli, tmp_path: Path, state_dir: Path, openpgp_keys: OpenPgpKeys, smime_certs: SmimeCerts
) -> None:
    for item in (openpgp_keys.valid, openpgp_keys.binary, smime_certs.valid):
        assert cli("key", "import", str(write(item, tmp_path)))[0] == 0
    keyring = KeyRing(state_dir / "gnupg")
    code, out, err = cli("key", "sync")
    assert code == 0, err
    assert out == f"keyring {keyring.path}: 2 usable key(s) imported, 0 other key(s) removed\n"
    expected = {openpgp_keys.valid.fingerprint, openpgp_keys.binary.fingerprint}
    assert run_async(keyring.fingerprints()) == expected
    cli("key", "remove", openpgp_keys.binary.fingerprint)
    cli("key", "revoke", openpgp_keys.valid.fingerprint)
    code, out, _ = cli("key", "sync")
    assert out.endswith(": 0 usable key(s) imported, 2 other key(s) removed\n")
    assert run_async(keyring.fingerprints()) == set()
    cli("key", "import", str(write(openpgp_keys.rsa, tmp_path)))
    code, out, _ = cli("key", "sync", "--rebuild")
    assert code == 0
    assert run_async(keyring.fingerprints()) == {openpgp_keys.rsa.fingerprint}


# --- failures -------------------------------------------------------------------------------------


def run_subprocess(config: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MAILWARD_CONFIG", None)
    return subprocess.run(
        [sys.executable, "-c", ENTRY, "--config", str(config), *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("argv", [("list",), ("show", "A" * 40), ("remove", "A" * 40), ("import",)])
def test_unreachable_database_is_exit_1(
    db_backend: str, tmp_path: Path, openpgp_keys: OpenPgpKeys, argv: tuple[str, ...]
) -> None:
    config = write_config(tmp_path / "m.toml", unreachable_url(db_backend, tmp_path), tmp_path)
    if argv == ("import",):
        argv = ("import", str(write(openpgp_keys.valid, tmp_path)))
    result = run_subprocess(config, "key", *argv)
    assert result.returncode == 1, result.stderr
    assert "key store database" in result.stderr and "unavailable" in result.stderr
    assert "secret-pw" not in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
