"""Running gpg: one subprocess per call, always with an explicit home, never the user's keyring.

What it does: :func:`run_gpg` runs the gpg program with ``--homedir HOME --batch --no-tty
--no-options --no-autostart --status-fd 2`` (the machine-readable status lines are returned) and
the caller's arguments, feeding ``data`` on standard input and bounding the run by a timeout.
:func:`temporary_home` is a fresh, private (0700) GNUPGHOME removed afterwards, for parsing
untrusted input. :func:`parse_colons` reads ``--with-colons --fixed-list-mode`` listings into
:class:`ColonKey` records (the documented format of GnuPG's ``doc/DETAILS``).

Reads/writes: the given GNUPGHOME only. The environment passed to gpg is reduced to ``PATH`` and
``LC_ALL=C`` (no ``GNUPGHOME``, no agent variables inherited), so the operator's ``~/.gnupg`` is
never read or written, and ``--no-autostart`` keeps gpg from starting an agent (public keys never
need one).

Security notes: gpg's diagnostics may quote input (user IDs): a :class:`GpgError` message carries
one bounded line of them (:func:`short_diagnostic`), its ``status`` the raw status lines (never
logged here). A gpg that cannot be started, or runs past the timeout (it
is killed), raises :class:`GpgUnavailable` -- a temporary failure, never a reason to skip
encryption.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from gateway.config.schema import KeysConfig
from gateway.core.errors import GatewayError

#: Base options of every run (after ``--homedir``).
BASE_OPTIONS = ("--batch", "--no-tty", "--no-options", "--no-autostart", "--status-fd", "2")
#: Options of every listing we parse.
LIST_OPTIONS = ("--with-colons", "--fixed-list-mode", "--with-subkey-fingerprint")
DEFAULT_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class GpgProgram:
    """Which gpg to run (``keys.gpg``) and how long one run may take (``keys.gpg_timeout``)."""

    path: str = "gpg"
    timeout: float = DEFAULT_TIMEOUT

    @classmethod
    def from_config(cls, keys: KeysConfig) -> GpgProgram:
        return cls(keys.gpg, keys.gpg_timeout)


class GpgUnavailable(GatewayError):
    """gpg could not be run, or did not finish in time: a temporary failure."""


class GpgError(GatewayError):
    """gpg ran and failed. ``status`` holds its status keywords (``IMPORT_PROBLEM`` ...)."""

    def __init__(self, message: str, *, status: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.status = tuple(status)


@dataclass(frozen=True, slots=True)
class GpgResult:
    returncode: int
    stdout: bytes
    status: tuple[str, ...]  # "[GNUPG:] " lines, without the prefix
    diagnostics: tuple[str, ...]  # other stderr lines


def _environment() -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "LANG": "C"}


async def run_gpg(
    home: Path,
    args: Sequence[str],
    *,
    data: bytes | None = None,
    program: GpgProgram | None = None,
) -> GpgResult:
    """Run ``gpg --homedir HOME <base options> ARGS`` (see the module docstring)."""
    program = program or GpgProgram()
    gpg, timeout = program.path, program.timeout
    argv = [gpg, "--homedir", str(home), *BASE_OPTIONS, *args]
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE if data is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=_environment(),
        )
    except OSError as error:
        raise GpgUnavailable(f"cannot run {gpg}: {error.strerror or error}") from None
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(data), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        raise GpgUnavailable(f"{gpg} did not finish within {timeout:g}s") from None
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        raise
    status: list[str] = []
    diagnostics: list[str] = []
    for raw in stderr.decode("utf-8", "replace").splitlines():
        if raw.startswith("[GNUPG:] "):
            status.append(raw[9:])
        elif raw.strip():
            diagnostics.append(raw)
    returncode = process.returncode if process.returncode is not None else -1
    return GpgResult(returncode, stdout, tuple(status), tuple(diagnostics))


def short_diagnostic(result: GpgResult, limit: int = 200) -> str:
    """One bounded line of gpg's own words (for operators), or its exit status."""
    for line in result.diagnostics:
        text = line.removeprefix("gpg: ").strip()
        if text and "WARNING: unsafe" not in text and not text.startswith("keybox '"):
            return text[:limit]
    return f"gpg exited with status {result.returncode}"


@contextlib.contextmanager
def temporary_home(parent: str | None = None) -> Iterator[Path]:
    """A fresh, empty GNUPGHOME (mode 0700), deleted with everything in it on exit.

    The directory name is short (``/tmp/mailward-gpg-XXXXXXXX``) so that gpg's socket paths fit,
    should a gpg ever want one.
    """
    path = Path(tempfile.mkdtemp(prefix="mailward-gpg-", dir=parent))
    try:
        path.chmod(0o700)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# --- colon listings -------------------------------------------------------------------------------

#: Record types that start a (sub)key in a listing.
KEY_RECORDS = ("pub", "sub", "sec", "ssb")
#: Validity letters meaning "not usable": expired, revoked, invalid, disabled.
UNUSABLE_VALIDITY = frozenset("erid")
_PK_ALGORITHMS = {
    1: "rsa",
    2: "rsa",
    3: "rsa",
    16: "elg",
    17: "dsa",
    18: "ecdh",
    19: "ecdsa",
    20: "elg",
    22: "eddsa",
}


@dataclass(slots=True)
class ColonSubkey:
    """A ``pub``/``sub`` (or ``sec``/``ssb``) record and its ``fpr``."""

    record: str
    validity: str
    length: int
    algorithm: int
    keyid: str
    created: datetime | None
    expires: datetime | None
    capabilities: str
    curve: str
    fingerprint: str = ""

    @property
    def is_secret(self) -> bool:
        return self.record in ("sec", "ssb")

    @property
    def usable(self) -> bool:
        return not (set(self.validity) & UNUSABLE_VALIDITY)

    def algorithm_name(self) -> str:
        if self.curve:
            return {"ed25519": "ed25519", "cv25519": "cv25519"}.get(self.curve, self.curve)
        return f"{_PK_ALGORITHMS.get(self.algorithm, f'algo{self.algorithm}')}{self.length}"


@dataclass(frozen=True, slots=True)
class ColonUid:
    validity: str
    text: str
    attribute: bool  # a "uat" (photo ID) rather than a text user ID

    @property
    def usable(self) -> bool:
        return not (set(self.validity) & UNUSABLE_VALIDITY)


@dataclass(slots=True)
class ColonKey:
    """One primary key with its user IDs and subkeys, as a listing shows it."""

    primary: ColonSubkey
    uids: list[ColonUid] = field(default_factory=list)
    subkeys: list[ColonSubkey] = field(default_factory=list)

    @property
    def fingerprint(self) -> str:
        return self.primary.fingerprint

    @property
    def has_secret(self) -> bool:
        return self.primary.is_secret or any(s.is_secret for s in self.subkeys)


def _timestamp(value: str) -> datetime | None:
    if not value:
        return None
    if value.isdigit():
        seconds = int(value)
        return datetime.fromtimestamp(seconds, UTC) if seconds else None
    try:  # ISO 8601 "19700101T000000" form
        return datetime.strptime(value, "%Y%m%dT%H%M%S").replace(tzinfo=UTC)
    except ValueError:
        return None


def unescape_colon_field(value: str) -> str:
    """Undo gpg's C-style escaping of a colon-listing field (``\\x3a`` for ``:``) and decode
    the UTF-8 it stands for (invalid bytes replaced)."""
    if "\\" not in value:
        return value
    out = bytearray()
    i = 0
    raw = value.encode("utf-8", "surrogateescape")
    while i < len(raw):
        if raw[i : i + 2] == b"\\x" and i + 4 <= len(raw):
            try:
                out.append(int(raw[i + 2 : i + 4], 16))
                i += 4
                continue
            except ValueError:
                pass
        out.append(raw[i])
        i += 1
    return out.decode("utf-8", "replace")


def _int(value: str) -> int:
    return int(value) if value.isdigit() else 0


def parse_colons(listing: bytes) -> list[ColonKey]:
    """The keys of a ``--with-colons --fixed-list-mode`` listing, in order."""
    keys: list[ColonKey] = []
    current: ColonSubkey | None = None
    for raw in listing.decode("utf-8", "replace").splitlines():
        fields = raw.split(":")
        kind = fields[0]
        fields += [""] * (21 - len(fields))
        if kind in KEY_RECORDS:
            current = ColonSubkey(
                record=kind,
                validity=fields[1],
                length=_int(fields[2]),
                algorithm=_int(fields[3]),
                keyid=fields[4],
                created=_timestamp(fields[5]),
                expires=_timestamp(fields[6]),
                capabilities=fields[11],
                curve=fields[16],
            )
            if kind in ("pub", "sec"):
                keys.append(ColonKey(current))
            elif keys:
                keys[-1].subkeys.append(current)
            else:
                current = None
        elif kind == "fpr":
            if current is not None and not current.fingerprint:
                current.fingerprint = fields[9].upper()
        elif kind in ("uid", "uat") and keys:
            keys[-1].uids.append(
                ColonUid(fields[1], unescape_colon_field(fields[9]), attribute=kind == "uat")
            )
            current = None
    return keys
