"""OpenPGP copies encrypted in worker processes, so gpg's plumbing stays off the gateway process.

What it does: :class:`GpgPool` runs :func:`gateway.crypto.encrypt_group` for OpenPGP copies in a
small pool of worker processes (``concurrent.futures.ProcessPoolExecutor``, ``spawn`` context: a
fresh interpreter, never a fork of the running gateway). Each call sends the message, the group,
the :class:`~gateway.crypto.pgpmime.GpgEngine` (a few hundred bytes: the gpg program, the GNUPGHOME
and python-gnupg's settings, so the worker starts no ``gpg --version`` of its own) and the header
protection; the worker's python-gnupg runs the one gpg process of the copy and returns the PGP/MIME
bytes.

Why: python-gnupg drives each gpg run with three threads of the calling process (stdin writer,
stdout and stderr readers). In the gateway those threads contend with the busy event loop for the
GIL, and the thread starts, hand-offs and pipe traffic cost the gateway process several times the
CPU of the encryption itself (docs/performance.md, "Encryption"). In a worker they run in a
process that does nothing else; the gateway pays one pickle and one pipe round trip per copy.

Workers start lazily, at the first OpenPGP copy (a gateway that never encrypts with OpenPGP starts
none), and ignore SIGINT and SIGTERM: their lifetime is the gateway's, which drains its sessions
before :meth:`GpgPool.close`. A worker that dies breaks the pool: the copies in flight fail with
:class:`~gateway.crypto.errors.EncryptionFailed` (``451 4.3.0``: the client keeps the message and
retries; nothing is sent in clear) and the next copy starts a new pool.

Entry scripts: ``spawn`` imports the parent's ``__main__`` module in each worker, so a script that
runs the gateway must guard its top-level code with ``if __name__ == "__main__":`` (the
``mailward`` console script does; the spam-scan workers need the same).

Reads: the messages and groups it is given. Writes: nothing but the log (a broken pool).

Security notes: message bytes cross only the pipes to the worker processes this object spawned
(same user). Failures are reported by exception type and the transform's own message (fingerprints
and gpg status keywords), never message content.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import multiprocessing
import signal
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from gateway.crypto import encrypt_group
from gateway.crypto.errors import EncryptionFailed
from gateway.crypto.groups import Group
from gateway.crypto.pgpmime import GpgEngine
from gateway.crypto.protect import HeaderProtection

log = logging.getLogger("mailward.crypto.gpgpool")


def _ignore_stop_signals() -> None:
    """Worker initializer: a stop signal sent to the whole service leaves the draining to the
    gateway (it closes the pool when its sessions are done)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class GpgPool:
    """``processes`` worker processes that encrypt OpenPGP copies (see the module docstring)."""

    def __init__(self, processes: int) -> None:
        if processes < 1:
            raise ValueError("a gpg pool needs at least one process")
        self.processes = processes
        self._pool: ProcessPoolExecutor | None = None
        self._closed = False

    def _executor(self) -> ProcessPoolExecutor:
        if self._closed:
            raise EncryptionFailed("the gateway is stopping")
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=self.processes,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_ignore_stop_signals,
            )
        return self._pool

    async def encrypt(
        self, wire: bytes, group: Group, engine: GpgEngine, protection: HeaderProtection
    ) -> bytes:
        """:func:`~gateway.crypto.encrypt_group` of ``group`` in a worker. Raises
        EncryptionFailed (the transform's own, or a worker that died)."""
        pool = self._executor()
        call = functools.partial(
            encrypt_group, wire, group, gnupg_home=engine, protection=protection
        )
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, call)
        except BrokenProcessPool:
            if self._pool is pool:
                self._pool = None
                pool.shutdown(wait=False, cancel_futures=True)
                log.error("a gpg worker process died; starting a new pool for the next copy")
            raise EncryptionFailed("the gpg worker process died") from None

    async def close(self) -> None:
        """Stop the workers (copies in flight finish first). Idempotent."""
        self._closed = True
        pool, self._pool = self._pool, None
        if pool is not None:
            await asyncio.to_thread(pool.shutdown, wait=True, cancel_futures=True)


__all__ = ["GpgPool"]
