"""The spool: one durable file per queued copy, written and fsynced before custody is taken.

What it does: :class:`Spool` keeps the exact bytes of each queued copy in ``<spool_dir>/<name>``.
:meth:`Spool.write` writes ``tmp/<name>`` (exclusive create, mode 0600), fsyncs it, renames it into
the spool directory and fsyncs the directory -- all before it returns, so a file that exists
under its final name survives a crash or ``kill -9``; a crash earlier leaves at most a ``tmp/``
file or an orphan without a database row (the client never got a 250 for it; :meth:`orphans`
finds them). Each file starts with a 48-byte header -- magic ``MWSPOOL1``, the payload length
(8 bytes, big-endian) and the payload's SHA-256 -- so a truncated, half-written or altered file is
detected on :meth:`read` (:class:`SpoolCorrupt`) and never sent; :meth:`quarantine` moves such a
file to ``corrupt/``. :meth:`free_bytes` (``statvfs``) and the ``reserve`` argument of
:meth:`write` implement the disk-full refusal: a write that would leave less than ``reserve``
bytes free is refused (:class:`SpoolFull`) before anything is written, and a write that fails
midway (ENOSPC) removes its partial file.

The methods are synchronous (file system calls); async callers use the ``*_async`` wrappers,
which run them in a worker thread (``asyncio.to_thread``).

Reads/writes: the spool directory (``[queue] spool_dir``) and its ``tmp/`` and ``corrupt/``
subdirectories (created mode 0700).

Security notes: names are random (``secrets.token_hex``), never derived from client input, and
every name given to a method is checked against that form (no path traversal). Files hold message
bodies: they are mode 0600 and their content is never logged. OSErrors are translated here into
:class:`SpoolError` (a StoreUnavailable: temporary).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import os
import re
import secrets
import struct
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from gateway.core import replies
from gateway.core.errors import GatewayError, StoreUnavailable

log = logging.getLogger("mailward.queue")

MAGIC = b"MWSPOOL1"
_HEADER = struct.Struct(">8sQ32s")
HEADER_SIZE = _HEADER.size  # 48
_NAME = re.compile(r"^[0-9a-f]{32}$")
_TMP = "tmp"
_CORRUPT = "corrupt"


class SpoolError(StoreUnavailable):
    """The spool directory could not be written or read (temporary for the client)."""

    reply = replies.QUEUE_UNAVAILABLE


class SpoolFull(SpoolError):
    """Writing the message would leave less free space than the configured reserve (or the disk
    filled up during the write): ``452 4.3.1``."""

    reply = replies.INSUFFICIENT_STORAGE


class SpoolCorrupt(GatewayError):
    """A spool file is missing, truncated or does not match its header: it must not be sent."""


@dataclass(frozen=True, slots=True)
class SpoolFile:
    """A durable spool file: its name, and the size and SHA-256 (hex) of the payload."""

    name: str
    size: int
    sha256: str


def check_name(name: str) -> str:
    """``name`` if it has the form of a spool name (32 hex digits), else ValueError."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"not a spool name: {name!r:.80}")
    return name


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """The spool directory (see the module docstring)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self._tmp = self.directory / _TMP
        self._corrupt = self.directory / _CORRUPT

    def ensure(self) -> None:
        """Create the directory and its ``tmp/`` and ``corrupt/`` subdirectories (mode 0700)."""
        try:
            for path in (self.directory, self._tmp, self._corrupt):
                path.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as error:
            raise SpoolError(
                f"cannot create the spool directory {self.directory}: {_why(error)}"
            ) from None

    def path(self, name: str) -> Path:
        return self.directory / check_name(name)

    # --- writing ----------------------------------------------------------------------------------

    def write(self, data: bytes, *, reserve: int = 0) -> SpoolFile:
        """Store ``data`` durably under a new random name (see the module docstring).

        Raises SpoolFull when fewer than ``len(data) + reserve`` bytes (plus the header) are
        free, or when the disk fills up meanwhile; SpoolError for any other failure. Nothing is
        left behind under the final name unless the call succeeded.
        """
        data = bytes(data)
        digest = hashlib.sha256(data).digest()
        needed = len(data) + HEADER_SIZE + max(0, reserve)
        if reserve > 0 and self.free_bytes() < needed:
            raise SpoolFull(f"spool {self.directory}: less than {needed} bytes free")
        name = secrets.token_hex(16)
        tmp = self._tmp / name
        final = self.directory / name
        try:
            self.ensure()
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                with os.fdopen(fd, "wb", closefd=True) as out:
                    out.write(_HEADER.pack(MAGIC, len(data), digest))
                    out.write(data)
                    out.flush()
                    os.fsync(out.fileno())
                os.rename(tmp, final)
            except BaseException:
                _unlink_quietly(tmp)
                raise
            _fsync_dir(self.directory)
        except OSError as error:
            _unlink_quietly(final)
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                raise SpoolFull(f"spool {self.directory} is full") from None
            raise SpoolError(f"cannot write to the spool {self.directory}: {_why(error)}") from None
        return SpoolFile(name, len(data), digest.hex())

    # --- reading ----------------------------------------------------------------------------------

    def read(self, name: str, *, size: int | None = None, sha256: str | None = None) -> bytes:
        """The payload of spool file ``name``, verified against its header (and against ``size``
        and ``sha256`` when given, e.g. the database row's). Raises SpoolCorrupt when the file is
        missing, truncated or altered; SpoolError when it cannot be read."""
        path = self.path(name)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise SpoolCorrupt(f"spool file {name} is missing") from None
        except OSError as error:
            raise SpoolError(f"cannot read spool file {name}: {_why(error)}") from None
        length, digest = _parse_header(name, raw[:HEADER_SIZE], len(raw))
        payload = raw[HEADER_SIZE:]
        actual = hashlib.sha256(payload).digest()
        if actual != digest:
            raise SpoolCorrupt(f"spool file {name} does not match its SHA-256")
        if size is not None and size != length:
            raise SpoolCorrupt(f"spool file {name} holds {length} bytes, its row says {size}")
        if sha256 is not None and sha256.lower() != digest.hex():
            raise SpoolCorrupt(f"spool file {name} does not match the SHA-256 of its row")
        return payload

    def check(self, name: str) -> None:
        """Cheap structural check (header and length, no hashing): what a crash can break.
        Raises SpoolCorrupt or SpoolError like :meth:`read`."""
        path = self.path(name)
        try:
            with path.open("rb") as f:
                header = f.read(HEADER_SIZE)
                total = os.fstat(f.fileno()).st_size
        except FileNotFoundError:
            raise SpoolCorrupt(f"spool file {name} is missing") from None
        except OSError as error:
            raise SpoolError(f"cannot read spool file {name}: {_why(error)}") from None
        _parse_header(name, header, total)

    # --- housekeeping -----------------------------------------------------------------------------

    def remove(self, name: str) -> bool:
        """Delete spool file ``name`` (delivered or deleted copy); False if it was not there."""
        try:
            self.path(name).unlink()
        except FileNotFoundError:
            return False
        except OSError as error:
            raise SpoolError(f"cannot remove spool file {name}: {_why(error)}") from None
        return True

    def quarantine(self, name: str) -> Path | None:
        """Move a bad spool file to ``corrupt/`` (kept for inspection, never sent); its new path,
        or None if there was no file."""
        source = self.path(name)
        target = self._corrupt / name
        try:
            self._corrupt.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.rename(source, target)
            _fsync_dir(self.directory)
        except FileNotFoundError:
            return None
        except OSError as error:
            raise SpoolError(f"cannot quarantine spool file {name}: {_why(error)}") from None
        return target

    def orphans(self, known: Collection[str], *, grace: float) -> list[Path]:
        """Spool files older than ``grace`` seconds whose name is not in ``known`` (no database
        row needs them: a crash between the write and the commit, or a finished copy whose file
        was not removed), and ``tmp/`` files older than ``grace`` (an interrupted write). None
        of them was ever acknowledged to a client; they are safe to delete."""
        limit = time.time() - grace
        found: list[Path] = []
        for directory, skip_known in ((self.directory, True), (self._tmp, False)):
            try:
                entries = list(os.scandir(directory))
            except FileNotFoundError:
                continue
            except OSError as error:
                raise SpoolError(f"cannot list the spool {directory}: {_why(error)}") from None
            for entry in entries:
                if not entry.is_file(follow_symlinks=False):
                    continue
                if skip_known and entry.name in known:
                    continue
                try:
                    if entry.stat(follow_symlinks=False).st_mtime > limit:
                        continue
                except FileNotFoundError:
                    continue
                found.append(Path(entry.path))
        return found

    def delete_orphans(self, known: Collection[str], *, grace: float) -> list[Path]:
        """Delete what :meth:`orphans` finds; the paths deleted."""
        deleted: list[Path] = []
        for path in self.orphans(known, grace=grace):
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            except OSError as error:
                log.warning("cannot delete orphan spool file %s: %s", path, _why(error))
                continue
            deleted.append(path)
        return deleted

    def free_bytes(self) -> int:
        """Bytes available to this process on the spool's file system."""
        target = self.directory
        while not target.exists() and target != target.parent:
            target = target.parent
        try:
            stat = os.statvfs(target)
        except OSError as error:
            raise SpoolError(f"cannot stat the spool {self.directory}: {_why(error)}") from None
        return stat.f_bavail * stat.f_frsize

    # --- async wrappers ---------------------------------------------------------------------------

    async def write_async(self, data: bytes, *, reserve: int = 0) -> SpoolFile:
        return await asyncio.to_thread(self.write, data, reserve=reserve)

    async def read_async(
        self, name: str, *, size: int | None = None, sha256: str | None = None
    ) -> bytes:
        return await asyncio.to_thread(self.read, name, size=size, sha256=sha256)

    async def remove_async(self, name: str) -> bool:
        return await asyncio.to_thread(self.remove, name)

    async def quarantine_async(self, name: str) -> Path | None:
        return await asyncio.to_thread(self.quarantine, name)


def _parse_header(name: str, header: bytes, total: int) -> tuple[int, bytes]:
    if len(header) < HEADER_SIZE:
        raise SpoolCorrupt(f"spool file {name} is truncated (no complete header)")
    magic, length, digest = _HEADER.unpack(header)
    if magic != MAGIC:
        raise SpoolCorrupt(f"spool file {name} is not a Mailward spool file")
    if total - HEADER_SIZE != length:
        raise SpoolCorrupt(
            f"spool file {name} holds {total - HEADER_SIZE} bytes, its header says {length}"
        )
    return int(length), bytes(digest)


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def _why(error: OSError) -> str:
    return error.strerror or type(error).__name__
