"""The gateway-owned GNUPGHOME: a keyring that mirrors the key store's usable OpenPGP keys.

What it does: :class:`KeyRing` keeps one gpg home directory (``keys.gnupg_home``, default
``{state_dir}/gnupg``) holding the public keys the gateway encrypts to, so that encrypting a message
is one gpg process with ``--recipient FINGERPRINT`` (or ``--hidden-recipient``) and no keyring
listing or key file per message.

Why a synced keyring rather than key files per message: gpg (and python-gnupg, which the PGP/MIME
transform uses) looks keys up by fingerprint in a home directory; writing and parsing a key file
per recipient per message costs a file write and a larger gpg start each time, while the keyring
is written only when a key is new or changed. The *store* stays the source of truth:

* **Which key** to encrypt to is decided by :meth:`gateway.keys.store.SqlKeyStore.usable_keys` at
  use time (expiry and revocation checked there), never by what the keyring contains; a key the
  store no longer returns is simply never named, even while it is still in the keyring.
* **Guarantee.** After ``await keyring.ensure(records)`` returns, every OpenPGP record in
  ``records`` is in :attr:`KeyRing.path` with (at least) the exact material the store holds: a key
  is imported when this KeyRing has not imported that material (same fingerprint, same
  ``material_sha256``) since the keyring file last changed. A change made by another process (a
  ``mailward key sync``, another gateway sharing the directory) is noticed by the keyring file's
  identity (inode, size, mtime) and the next ``ensure`` imports again, so nothing stale is
  trusted. Imports merge (gpg semantics): a newer self-signature or a revocation replaces the old
  state; :meth:`sync` with ``rebuild`` starts from an empty keyring.
* **Trust.** Keys here carry no owner trust and no certifications but their own: the store's
  validation and ``verification`` are the trust decision. Every gpg run on this home must
  therefore use ``--trust-model always`` (:data:`ENCRYPT_OPTIONS`; python-gnupg:
  ``always_trust=True``); the home's ``gpg.conf`` says so too, and turns off automatic key
  retrieval (``--auto-key-locate`` / keyservers): a recipient without a key in the store must
  never get one from the network.
* **Reproducible.** The directory holds nothing the store does not: it can be deleted at any time
  and is rebuilt by ``mailward key sync`` (:meth:`sync`: import every usable key, delete every
  other key) or lazily by :meth:`ensure`. Secret keys are never put here.

Reads/writes: the GNUPGHOME directory (created 0700, with ``gpg.conf``); runs gpg.

Security notes: the directory holds public keys only. gpg runs with a reduced environment and
``--no-autostart`` (:mod:`gateway.keys.gpg`); no agent is needed for public-key operations.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from gateway.config import Config
from gateway.keys.gpg import (
    LIST_OPTIONS,
    GpgError,
    GpgProgram,
    parse_colons,
    run_gpg,
    short_diagnostic,
)
from gateway.keys.models import OPENPGP
from gateway.keys.store import KeyRecord

#: Options every encryption with this keyring must use (after ``--homedir PATH``).
ENCRYPT_OPTIONS = (
    "--trust-model",
    "always",
    "--no-auto-key-locate",
    "--no-auto-key-retrieve",
    "--no-autostart",
)
GPG_CONF = """\
# Written by Mailward. This GNUPGHOME mirrors the key store (mailward key list); it is rebuilt by
# `mailward key sync` and may be deleted at any time. Do not add keys by hand: the store decides
# which key is used for which recipient.
trust-model always
no-auto-key-locate
no-auto-key-retrieve
"""
KEYRING_FILE = "pubring.kbx"


@dataclass(frozen=True, slots=True)
class SyncReport:
    """What :meth:`KeyRing.sync` did: keys imported (all given), fingerprints deleted."""

    imported: int
    removed: tuple[str, ...]


class KeyRing:
    """The gateway-owned GNUPGHOME (see the module docstring)."""

    def __init__(self, path: Path, *, program: GpgProgram | None = None) -> None:
        self._path = Path(path)
        self._program = program or GpgProgram()
        self._lock = asyncio.Lock()
        self._imported: dict[str, str] = {}  # fingerprint -> material_sha256, see ensure()
        self._signature: tuple[int, int, int] | None = None

    @classmethod
    def from_config(cls, config: Config) -> KeyRing:
        """The keyring at ``keys.gnupg_home`` running ``keys.gpg``."""
        return cls(
            Path(config.keys.gnupg_path(config.state_dir)),
            program=GpgProgram.from_config(config.keys),
        )

    @property
    def path(self) -> Path:
        """The GNUPGHOME to pass to gpg (``--homedir``) or python-gnupg (``gnupghome``)."""
        return self._path

    @property
    def program(self) -> GpgProgram:
        """The gpg program this keyring runs (``keys.gpg``, ``keys.gpg_timeout``)."""
        return self._program

    def prepare(self) -> None:
        """Create the directory (0700) and its ``gpg.conf`` if missing. Raises OSError."""
        self._path.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._path.chmod(0o700)
        conf = self._path / "gpg.conf"
        if not conf.exists() or conf.read_text(encoding="utf-8") != GPG_CONF:
            tmp = conf.with_suffix(".tmp")
            tmp.write_text(GPG_CONF, encoding="utf-8")
            os.replace(tmp, conf)

    def _keyring_signature(self) -> tuple[int, int, int] | None:
        try:
            st = (self._path / KEYRING_FILE).stat()
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    async def _import(self, records: list[KeyRecord]) -> None:
        material = b"".join(_material(r) for r in records)
        result = await run_gpg(
            self._path,
            ["--import", "--import-options", "import-minimal"],
            data=material,
            program=self._program,
        )
        ok = {line.split()[2].upper() for line in result.status if line.startswith("IMPORT_OK ")}
        missing = [r.fingerprint for r in records if r.fingerprint not in ok]
        if missing:
            raise GpgError(
                f"gpg did not import {', '.join(missing)} into {self._path}: "
                f"{short_diagnostic(result)}",
                status=result.status,
            )

    async def ensure(self, records: Iterable[KeyRecord]) -> None:
        """Make sure every OpenPGP record is in the keyring (see the module docstring); S/MIME
        records are ignored. Raises GpgError, GpgUnavailable, OSError."""
        wanted = [r for r in records if r.kind == OPENPGP]
        if not wanted:
            return
        async with self._lock:
            # one stat per message; the directory is prepared only when something is imported
            # (a deleted directory has no keyring file: everything is imported again)
            if self._keyring_signature() != self._signature:
                self._imported.clear()  # changed by someone else (or never seen): re-import
            todo = [r for r in wanted if self._imported.get(r.fingerprint) != r.material_sha256]
            if not todo:
                return
            await asyncio.to_thread(self.prepare)
            await self._import(todo)
            for record in todo:
                self._imported[record.fingerprint] = record.material_sha256
            self._signature = self._keyring_signature()

    async def fingerprints(self) -> set[str]:
        """The primary fingerprints the keyring holds now. Raises GpgError, GpgUnavailable."""
        await asyncio.to_thread(self.prepare)
        result = await run_gpg(self._path, ["--list-keys", *LIST_OPTIONS], program=self._program)
        if result.returncode:
            raise GpgError(f"gpg could not list {self._path}: {short_diagnostic(result)}")
        return {key.fingerprint for key in parse_colons(result.stdout)}

    async def sync(self, records: Iterable[KeyRecord], *, rebuild: bool = False) -> SyncReport:
        """Make the keyring hold exactly the OpenPGP ``records`` (every usable key of the store:
        :meth:`~gateway.keys.store.SqlKeyStore.all_usable_keys`): import them all, then delete
        every other key. ``rebuild`` first empties the keyring (exact material, no merged
        leftovers; encryptions running meanwhile may fail temporarily). Raises GpgError,
        GpgUnavailable, OSError."""
        wanted = [r for r in records if r.kind == OPENPGP]
        async with self._lock:
            await asyncio.to_thread(self.prepare)
            self._imported.clear()
            keep = {r.fingerprint for r in wanted}
            extra = sorted(await self.fingerprints() - keep)
            if rebuild:
                for name in (KEYRING_FILE, f"{KEYRING_FILE}~", "trustdb.gpg"):
                    with contextlib.suppress(FileNotFoundError):
                        (self._path / name).unlink()
            if wanted:
                await self._import(wanted)
            if extra and not rebuild:
                result = await run_gpg(
                    self._path,
                    ["--yes", "--delete-keys", *extra],
                    program=self._program,
                )
                if result.returncode:
                    raise GpgError(
                        f"gpg could not delete keys from {self._path}: {short_diagnostic(result)}"
                    )
            for record in wanted:
                self._imported[record.fingerprint] = record.material_sha256
            self._signature = self._keyring_signature()
            return SyncReport(imported=len(wanted), removed=tuple(extra))


def _material(record: KeyRecord) -> bytes:
    if record.material is None:
        raise ValueError(f"key {record.fingerprint}: material not loaded")
    return record.material
