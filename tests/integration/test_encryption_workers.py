"""OpenPGP copies encrypted by the gpg worker processes (``keys.gpg_workers``), end to end: the real
gateway, real gpg and the real capture upstream.

What it tests: with worker processes the copies are the same RFC 3156 PGP/MIME (decrypted with the
recipient's secret key to the original body and Subject), To recipients share one copy and a Bcc
recipient gets its own; the gateway's own process runs no gpg (every gpg is a child of a worker);
a worker killed with SIGKILL makes the copies it breaks 451 4.3.0 with nothing relayed, and the next
message starts a new pool and is encrypted; stopping the gateway stops the workers.

Reads: the test keys of ``tests/fixtures/keys.py``; temporary directories and databases.

Security notes: as in test_encryption.py, the plaintext must never reach the upstream.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.crypto.gpgpool import GpgPool
from tests.fixtures.gateway import ALICE, RunningGateway
from tests.fixtures.keys import OpenPgpKeys
from tests.integration.test_encryption import (
    BOB,
    CAROL,
    MARKER,
    build_message,
    check_inner,
    check_outer,
    import_key,
    notes,
    packet_key_ids,
    pgp_decrypt,
    record_of,
    send,
)

MakeGateway = Callable[..., RunningGateway]


def workers_gateway(make_gateway: MakeGateway, processes: int = 2) -> RunningGateway:
    return make_gateway(
        {
            "checks": {"encryption": {"default": "opportunistic"}},
            "keys": {"gpg_workers": processes},
        }
    )


def encrypted_once(make_gateway: MakeGateway, openpgp_keys: OpenPgpKeys) -> RunningGateway:
    """A gateway with worker processes that has encrypted one message for BOB (pool started)."""
    gw = workers_gateway(make_gateway)
    import_key(gw, openpgp_keys.binary.data)
    _replies, final = send(gw, [BOB], build_message())
    assert final is not None and final[0] == 250
    return gw


def pool_of(gw: RunningGateway) -> GpgPool:
    planner = gw.app.planner
    assert planner is not None and planner._pool is not None
    return planner._pool


def parent_of(pid: int) -> int:
    """The parent pid from /proc (field 4 of stat, after the parenthesised command name)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rpartition(")")[2].split()[1])


def children_named(name: str) -> list[int]:
    """Live processes called ``name`` whose parent is this (the test's, the gateway's) process."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            comm = Path(f"/proc/{entry}/comm").read_text().strip()
            if comm == name and parent_of(int(entry)) == os.getpid():
                found.append(int(entry))
        except (OSError, ValueError):
            continue  # gone meanwhile
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def worker_pids(gw: RunningGateway) -> list[int]:
    executor: Any = pool_of(gw)._pool
    assert executor is not None, "the pool has not started"
    return [p.pid for p in executor._processes.values()]


def test_round_trip_through_worker_processes(
    make_gateway: MakeGateway, openpgp_keys: OpenPgpKeys
) -> None:
    gw = workers_gateway(make_gateway)
    bob = import_key(gw, openpgp_keys.binary.data)
    carol = import_key(gw, openpgp_keys.two_uids.data)
    replies, final = send(gw, [BOB, CAROL], build_message(to=[BOB, CAROL]))
    assert final is not None and final[0] == 250, (replies, final)
    (copy,) = gw.upstream.messages
    assert copy.mail_from == ALICE and set(copy.rcpt_tos) == {BOB, CAROL}
    check_outer(copy.data)
    check_inner(pgp_decrypt(openpgp_keys, copy.data))
    assert MARKER not in copy.data
    assert len(packet_key_ids(copy.data)) == 2  # one recipient packet per key, one copy
    assert notes(record_of(gw)) == {
        BOB: ("encrypted", "opportunistic", "openpgp", bob.fingerprint),
        CAROL: ("encrypted", "opportunistic", "openpgp", carol.fingerprint),
    }
    workers = worker_pids(gw)
    assert len(workers) >= 1
    assert all(parent_of(pid) == os.getpid() for pid in workers)  # the gateway's own children
    # the gateway process itself drives no gpg: every gpg run is a worker's child
    assert children_named("gpg") == []


def test_a_bcc_recipient_gets_its_own_copy(
    make_gateway: MakeGateway, openpgp_keys: OpenPgpKeys
) -> None:
    gw = workers_gateway(make_gateway)
    import_key(gw, openpgp_keys.binary.data)
    import_key(gw, openpgp_keys.two_uids.data)
    _replies, final = send(gw, [BOB, CAROL], build_message(to=[BOB]))  # CAROL is Bcc
    assert final is not None and final[0] == 250
    copies = {m.rcpt_tos: m for m in gw.upstream.messages}
    assert set(copies) == {(BOB,), (CAROL,)}
    for copy in copies.values():
        check_inner(pgp_decrypt(openpgp_keys, copy.data))
        assert len(packet_key_ids(copy.data)) == 1


def wait_until(done: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout} s: {what}")
        time.sleep(0.05)


def test_a_killed_worker_is_451_then_a_new_pool_encrypts(
    make_gateway: MakeGateway, openpgp_keys: OpenPgpKeys
) -> None:
    gw = encrypted_once(make_gateway, openpgp_keys)
    executor: Any = pool_of(gw)._pool
    for pid in worker_pids(gw):
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: bool(executor._broken), "the pool notices its dead worker")
    _replies, final = send(gw, [BOB], build_message())
    assert final is not None and final[0] == 451 and final[1].startswith("4.3.0"), final
    assert len(gw.upstream.messages) == 1  # nothing relayed for the broken copy, not in clear
    assert notes(record_of(gw))[BOB][0] == "deferred"
    _replies, final = send(gw, [BOB], build_message())
    assert final is not None and final[0] == 250, final
    assert len(gw.upstream.messages) == 2
    check_inner(pgp_decrypt(openpgp_keys, gw.upstream.messages[-1].data))
    assert pool_of(gw)._pool is not executor  # a new pool


def test_stopping_the_gateway_stops_the_workers(
    make_gateway: MakeGateway, openpgp_keys: OpenPgpKeys
) -> None:
    gw = encrypted_once(make_gateway, openpgp_keys)
    workers = worker_pids(gw)
    assert workers and all(alive(pid) for pid in workers)
    gw.run(gw.app.stop(grace=2.0), timeout=30)
    wait_until(lambda: not any(alive(pid) for pid in workers), "the workers exit")
