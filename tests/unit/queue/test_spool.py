"""The spool: durable writes (fsync of the file, rename, fsync of the directory), integrity checks
that catch truncated or altered files, quarantine, orphans and the disk-full refusal."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.core.errors import StoreUnavailable
from gateway.queue.spool import (
    HEADER_SIZE,
    MAGIC,
    Spool,
    SpoolCorrupt,
    SpoolError,
    SpoolFull,
    check_name,
)

MESSAGE = b"From: a@example.com\r\nSubject: hi\r\n\r\nbody \xff 8-bit\r\n.\r\n"


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool")


def test_write_read_round_trip(spool: Spool) -> None:
    written = spool.write(MESSAGE)
    assert written.size == len(MESSAGE)
    assert written.sha256 == hashlib.sha256(MESSAGE).hexdigest()
    assert check_name(written.name) == written.name
    path = spool.directory / written.name
    raw = path.read_bytes()
    assert raw[:8] == MAGIC and len(raw) == HEADER_SIZE + len(MESSAGE)
    assert raw[HEADER_SIZE:] == MESSAGE
    assert spool.read(written.name) == MESSAGE
    assert spool.read(written.name, size=written.size, sha256=written.sha256) == MESSAGE
    spool.check(written.name)
    # private: the bytes are message bodies
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for directory in (spool.directory, spool.directory / "tmp", spool.directory / "corrupt"):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert list((spool.directory / "tmp").iterdir()) == []  # nothing left behind
    assert spool.write(b"").size == 0


def test_names_are_random_and_never_from_input(spool: Spool) -> None:
    names = {spool.write(MESSAGE).name for _ in range(20)}
    assert len(names) == 20
    for bad in ("../x", "a" * 31, "A" * 32, "tmp/" + "a" * 32, "", "/etc/passwd"):
        with pytest.raises(ValueError):
            spool.read(bad)
        with pytest.raises(ValueError):
            spool.remove(bad)


def test_write_is_durable_before_it_returns(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The file is fsynced, then renamed into place, then the directory is fsynced."""
    events: list[tuple[str, str]] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd: int) -> None:
        target = os.readlink(f"/proc/self/fd/{fd}")
        events.append(("fsync-dir" if os.path.isdir(target) else "fsync-file", target))
        real_fsync(fd)

    def rename(src: Any, dst: Any) -> None:
        events.append(("rename", str(dst)))
        real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    written = spool.write(MESSAGE)
    final = str((spool.directory / written.name).resolve())
    assert [kind for kind, _ in events] == ["fsync-file", "rename", "fsync-dir"]
    assert events[0][1].endswith(f"/tmp/{written.name}")
    assert events[1][1] == str(spool.directory / written.name)
    assert events[2][1] == str(spool.directory.resolve())
    assert Path(final).exists()


@pytest.mark.parametrize(
    ("damage", "check_catches"),
    [
        (lambda raw: raw[: HEADER_SIZE + 10], True),  # cut short (half-written)
        (lambda raw: raw[:20], True),  # not even a header
        (lambda raw: raw + b"extra", True),  # longer than its header says
        (lambda raw: b"XXXXXXXX" + raw[8:], True),  # not a spool file
        (lambda raw: raw[:-3] + b"?" + raw[-2:], False),  # one byte altered: only the hash sees it
        (lambda raw: b"", True),  # empty
    ],
)
def test_damaged_files_are_detected(spool: Spool, damage: Any, check_catches: bool) -> None:
    written = spool.write(MESSAGE)
    path = spool.directory / written.name
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(SpoolCorrupt):
        spool.read(written.name)
    if check_catches:
        with pytest.raises(SpoolCorrupt):
            spool.check(written.name)
    else:
        spool.check(written.name)


def test_a_file_not_matching_its_row_is_corrupt(spool: Spool) -> None:
    written = spool.write(MESSAGE)
    with pytest.raises(SpoolCorrupt, match="row"):
        spool.read(written.name, size=written.size + 1)
    with pytest.raises(SpoolCorrupt, match="row"):
        spool.read(written.name, sha256="00" * 32)


def test_missing_file_is_corrupt(spool: Spool) -> None:
    spool.ensure()
    name = "0" * 32
    with pytest.raises(SpoolCorrupt, match="missing"):
        spool.read(name)
    with pytest.raises(SpoolCorrupt, match="missing"):
        spool.check(name)
    assert isinstance(SpoolCorrupt("x"), Exception) and not isinstance(
        SpoolCorrupt("x"), StoreUnavailable
    )


def test_quarantine_and_remove(spool: Spool) -> None:
    bad = spool.write(MESSAGE)
    moved = spool.quarantine(bad.name)
    assert moved == spool.directory / "corrupt" / bad.name
    assert moved.read_bytes()[HEADER_SIZE:] == MESSAGE and not (spool.directory / bad.name).exists()
    assert spool.quarantine(bad.name) is None  # already gone

    done = spool.write(MESSAGE)
    assert spool.remove(done.name) is True
    assert spool.remove(done.name) is False


def test_orphans_are_old_unknown_files_and_stale_tmp_files(spool: Spool) -> None:
    known = spool.write(MESSAGE)
    orphan = spool.write(MESSAGE)
    fresh = spool.write(MESSAGE)
    stale_tmp = spool.directory / "tmp" / ("a" * 32)
    stale_tmp.write_bytes(b"half")
    fresh_tmp = spool.directory / "tmp" / ("b" * 32)
    fresh_tmp.write_bytes(b"half")
    old = time.time() - 7200
    for path in (spool.directory / known.name, spool.directory / orphan.name, stale_tmp):
        os.utime(path, (old, old))
    names = {known.name}
    found = spool.orphans(names, grace=3600)
    assert sorted(found) == sorted([spool.directory / orphan.name, stale_tmp])
    assert sorted(spool.delete_orphans(names, grace=3600)) == sorted(found)
    assert not (spool.directory / orphan.name).exists() and not stale_tmp.exists()
    for kept in (spool.directory / known.name, spool.directory / fresh.name, fresh_tmp):
        assert kept.exists()
    assert spool.orphans(names, grace=3600) == []
    assert Spool(spool.directory / "never-made").orphans(set(), grace=0) == []


def test_disk_full_refusal_writes_nothing(spool: Spool) -> None:
    spool.ensure()
    free = spool.free_bytes()
    assert free > 0
    with pytest.raises(SpoolFull) as info:
        spool.write(MESSAGE, reserve=free)  # would leave less than the reserve
    assert (info.value.reply.code, info.value.reply.status) == (452, "4.3.1")
    assert info.value.temporary
    assert list(spool.directory.glob("*/*")) == [] and _files(spool) == []
    assert spool.write(MESSAGE, reserve=1).size == len(MESSAGE)
    assert issubclass(SpoolFull, SpoolError) and issubclass(SpoolError, StoreUnavailable)


def test_a_full_disk_midway_leaves_no_partial_file(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC at fsync (where delayed allocation reports it): refused, nothing left behind."""

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    spool.ensure()
    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(SpoolFull):
        spool.write(MESSAGE)
    monkeypatch.undo()
    assert _files(spool) == [] and list((spool.directory / "tmp").iterdir()) == []


def test_unwritable_spool_is_a_spool_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    spool = Spool(blocker / "spool")
    with pytest.raises(SpoolError):
        spool.write(MESSAGE)


async def test_async_wrappers(spool: Spool) -> None:
    written = await spool.write_async(MESSAGE)
    assert await spool.read_async(written.name, size=written.size) == MESSAGE
    assert await spool.quarantine_async(written.name) is not None
    other = await spool.write_async(MESSAGE)
    assert await spool.remove_async(other.name) is True


def _files(spool: Spool) -> list[Path]:
    return [p for p in spool.directory.iterdir() if p.is_file()]
