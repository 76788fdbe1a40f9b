"""Contract of the queue store: SqlQueueStore on every database backend.

Every test taking ``db_url`` runs on SQLite and, when MAILWARD_TEST_POSTGRES_URL is set, on
PostgreSQL (tests/fixtures/db.py). Time is a manual clock shared by the store and the test, so
schedules and leases are asserted exactly, without sleeping.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.core import replies
from gateway.core.errors import StoreUnavailable
from gateway.db.engine import engine_for_url
from gateway.queue import (
    BOUNCED,
    CORRUPT,
    DELETED,
    DELIVERED,
    DONE,
    DROPPED,
    HELD,
    PENDING,
    QUEUED,
    AttemptResult,
    ClaimLost,
    NewBounce,
    NewCopy,
    QueuedMessage,
    SqlQueueStore,
)
from gateway.queue.model import OperatorChange
from gateway.queue.store import UNCONFIRMED_REPLY
from tests.fixtures.db import unreachable_url

T0 = datetime(2026, 12, 6, 10, 0, tzinfo=UTC)
LEASE = 600.0


class Clock:
    """A manual clock: ``now`` moves only when the test says so."""

    def __init__(self, start: datetime = T0) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def name() -> str:
    return secrets.token_hex(16)


def copy(*recipients: str, delivered: tuple[str, ...] = ()) -> NewCopy:
    return NewCopy(tuple(recipients), name(), 123, "ab" * 32, delivered=delivered)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def store(db_url: str, clock: Clock) -> AsyncIterator[SqlQueueStore]:
    engine = engine_for_url(db_url, timeout=5.0)
    queue = SqlQueueStore(engine, timeout=5.0, lifetime=5 * 86400, clock=clock)
    try:
        yield queue
    finally:
        await queue.close()
        await engine.dispose()


async def enqueue(store: SqlQueueStore, *copies: NewCopy, **kwargs: object) -> int:
    params: dict[str, object] = {
        "txn_id": "s1.1",
        "mail_from": "alice@example.com",
        "login": "alice@example.com",
        "smtputf8": False,
        "body_8bitmime": False,
    }
    params.update(kwargs)
    return await store.enqueue(copies=list(copies), **params)  # type: ignore[arg-type]


def states(message: QueuedMessage) -> dict[str, str]:
    return {r.address: r.state for c in message.copies for r in c.recipients}


# --- custody --------------------------------------------------------------------------------------


async def test_enqueue_get_round_trip(store: SqlQueueStore) -> None:
    first = copy("bob@example.net", "carol@example.org", delivered=("carol@example.org",))
    second = copy("d\u00e9r\u00e9k@ex\u00e4mple.org")
    message_id = await enqueue(
        store,
        first,
        second,
        txn_id="s9.2",
        login="Alice@Example.COM",
        smtputf8=True,
        body_8bitmime=True,
        audit_id=77,
        message_id_header="<m1@example.com>",
    )
    message = await store.get(message_id)
    assert message is not None
    assert (message.id, message.txn_id, message.mail_from, message.login) == (
        message_id,
        "s9.2",
        "alice@example.com",
        "alice@example.com",
    )
    assert (message.smtputf8, message.body_8bitmime, message.is_bounce) == (True, True, False)
    assert (message.audit_id, message.message_id_header, message.warned_at) == (
        77,
        "<m1@example.com>",
        None,
    )
    assert message.created_at == T0
    assert message.expires_at == T0 + timedelta(days=5)
    a, b = message.copies
    assert (a.spool_name, a.size, a.sha256, a.state, a.attempts) == (
        first.spool_name,
        123,
        "ab" * 32,
        QUEUED,
        0,
    )
    assert a.next_attempt == T0 and a.claimed_by is None
    assert [(r.address, r.state) for r in a.recipients] == [
        ("bob@example.net", PENDING),
        ("carol@example.org", DELIVERED),
    ]
    assert [r.address for r in a.pending] == ["bob@example.net"]
    assert [(r.address, r.state) for r in b.recipients] == [
        ("d\u00e9r\u00e9k@ex\u00e4mple.org", PENDING)
    ]
    assert await store.get(message_id + 1000) is None


async def test_enqueue_options_and_refusals(store: SqlQueueStore, clock: Clock) -> None:
    later = T0 + timedelta(minutes=5)
    message_id = await enqueue(store, copy("x@example.net"), first_attempt=later, lifetime=3600)
    message = await store.get(message_id)
    assert message is not None
    assert message.expires_at == T0 + timedelta(hours=1)
    assert message.copies[0].next_attempt == later
    # a copy whose recipients were all delivered in the session is finished at once
    done_id = await enqueue(store, copy("y@example.net", delivered=("y@example.net",)))
    done = await store.get(done_id)
    assert done is not None and done.copies[0].state == DONE

    with pytest.raises(ValueError, match="no copy"):
        await enqueue(store)
    with pytest.raises(ValueError, match="at least one recipient"):
        await enqueue(store, NewCopy((), name(), 1, "00" * 32))
    with pytest.raises(ValueError, match="not a spool name"):
        await enqueue(store, NewCopy(("x@example.net",), "../etc/passwd", 1, "00" * 32))
    with pytest.raises(ValueError, match="delivered recipients"):
        await enqueue(store, copy("x@example.net", delivered=("other@example.net",)))


# --- claims ---------------------------------------------------------------------------------------


async def test_claim_takes_due_copies_once_until_the_lease_expires(
    store: SqlQueueStore, clock: Clock
) -> None:
    due = await enqueue(store, copy("a@example.net"))
    future = await enqueue(store, copy("b@example.net"), first_attempt=T0 + timedelta(hours=1))

    claimed = await store.claim("w1", limit=10, lease=LEASE)
    assert [m.id for m in claimed] == [due]
    (c,) = claimed[0].copies
    assert (c.claimed_by, c.claim_until) == ("w1", T0 + timedelta(seconds=LEASE))
    assert await store.claim("w2", limit=10, lease=LEASE) == []  # live claim: nobody else

    clock.advance(LEASE + 1)  # w1 crashed: its lease ran out
    again = await store.claim("w2", limit=10, lease=7200)
    assert sorted(m.id for m in again) == [due]
    clock.advance(3600)  # the future copy is due; w2 still holds its claim
    assert sorted(m.id for m in await store.claim("w3", limit=10, lease=LEASE)) == [future]


async def test_claim_respects_the_limit_and_the_schedule_order(
    store: SqlQueueStore, clock: Clock
) -> None:
    ids = [
        await enqueue(store, copy(f"r{i}@example.net"), first_attempt=T0 - timedelta(minutes=i))
        for i in range(5)
    ]
    first = await store.claim("w1", limit=2, lease=LEASE)
    assert [m.id for m in first] == [ids[4], ids[3]]  # the oldest schedule first
    second = await store.claim("w1", limit=10, lease=LEASE)
    assert [m.id for m in second] == [ids[2], ids[1], ids[0]]


async def test_a_message_returns_only_its_claimed_copies(store: SqlQueueStore) -> None:
    message_id = await enqueue(
        store, copy("a@example.net"), copy("b@example.net"), copy("c@example.net")
    )
    got = await store.claim("w1", limit=2, lease=LEASE)
    assert [m.id for m in got] == [message_id]
    assert len(got[0].copies) == 2
    rest = await store.claim("w2", limit=5, lease=LEASE)
    assert len(rest) == 1 and len(rest[0].copies) == 1
    assert {c.id for c in got[0].copies}.isdisjoint({c.id for c in rest[0].copies})


async def test_concurrent_claimers_on_separate_engines_never_share_a_copy(
    db_url: str, clock: Clock
) -> None:
    """Several gateway processes sharing one database: each has its engine and store. Every copy
    is claimed by exactly one of them (PostgreSQL: FOR UPDATE SKIP LOCKED)."""
    engines = [engine_for_url(db_url, timeout=10.0) for _ in range(4)]
    stores = [SqlQueueStore(e, timeout=10.0, clock=clock) for e in engines]
    try:
        total = 60
        for i in range(total):
            await enqueue(stores[0], copy(f"r{i}@example.net"))

        async def claimer(index: int) -> list[int]:
            got: list[int] = []
            while True:
                batch = await stores[index].claim(f"w{index}", limit=3, lease=LEASE)
                if not batch:
                    return got
                got.extend(c.id for m in batch for c in m.copies)

        results = await asyncio.gather(*(claimer(i) for i in range(len(stores))))
        claimed = [copy_id for got in results for copy_id in got]
        assert len(claimed) == total
        assert len(set(claimed)) == total  # nobody got a copy twice
        assert sum(1 for got in results if got) >= 1
    finally:
        for s in stores:
            await s.close()
        for e in engines:
            await e.dispose()


# --- attempts -------------------------------------------------------------------------------------


async def test_record_attempt_stores_results_and_schedules_the_rest(
    store: SqlQueueStore, clock: Clock
) -> None:
    message_id = await enqueue(
        store, copy("ok@example.net", "later@example.net", "bad@example.net")
    )
    (m,) = await store.claim("w1", limit=1, lease=LEASE)
    copy_id = m.copies[0].id
    clock.advance(5)
    retry_at = clock.now + timedelta(minutes=5)
    result = AttemptResult(
        recipients={
            "ok@example.net": (DELIVERED, "250 2.0.0 Ok: queued as X", None),
            "later@example.net": (PENDING, "451 4.3.0 busy", "4.3.0"),
            "bad@example.net": (BOUNCED, "550 5.1.1 no such user", "5.1.1"),
        },
        reply="250 2.0.0 Ok: queued as X",
    )
    recorded = await store.record_attempt(copy_id, "w1", result, next_attempt=retry_at)
    assert recorded.state == QUEUED and recorded.attempts == 1
    assert recorded.next_attempt == retry_at and recorded.last_attempt == clock.now
    assert (recorded.claimed_by, recorded.claim_until) == (None, None)
    assert recorded.last_reply == "250 2.0.0 Ok: queued as X"
    by_address = {r.address: r for r in recorded.recipients}
    assert by_address["ok@example.net"].state == DELIVERED
    assert (by_address["later@example.net"].state, by_address["later@example.net"].status) == (
        PENDING,
        "4.3.0",
    )
    assert by_address["later@example.net"].last_reply == "451 4.3.0 busy"
    assert (by_address["bad@example.net"].state, by_address["bad@example.net"].status) == (
        BOUNCED,
        "5.1.1",
    )
    assert await store.claim("w1", limit=5, lease=LEASE) == []  # not due before retry_at

    clock.now = retry_at
    (m2,) = await store.claim("w2", limit=5, lease=LEASE)
    assert [r.address for r in m2.copies[0].pending] == ["later@example.net"]
    # a final state is never changed, whatever a (buggy) result says
    final = await store.record_attempt(
        copy_id,
        "w2",
        AttemptResult(
            recipients={
                "later@example.net": (DELIVERED, "250 ok", None),
                "ok@example.net": (BOUNCED, "550 no", "5.0.0"),
            },
            reply="250 ok",
        ),
        next_attempt=None,
    )
    assert final.state == DONE and final.attempts == 2 and final.next_attempt is None
    message = await store.get(message_id)
    assert message is not None
    assert states(message) == {
        "ok@example.net": DELIVERED,
        "later@example.net": DELIVERED,
        "bad@example.net": BOUNCED,
    }


async def test_record_attempt_refuses_a_lost_claim(store: SqlQueueStore, clock: Clock) -> None:
    message_id = await enqueue(store, copy("a@example.net"))
    (m,) = await store.claim("w1", limit=1, lease=LEASE)
    copy_id = m.copies[0].id
    clock.advance(LEASE + 1)
    await store.claim("w2", limit=1, lease=LEASE)  # w1's lease expired; w2 took over
    bounce = NewBounce("alice@example.com", name(), 10, "cd" * 32, txn_id="s1.1.dsn")
    delivered = AttemptResult(recipients={"a@example.net": (DELIVERED, "250 ok", None)}, reply="")
    with pytest.raises(ClaimLost):
        await store.record_attempt(copy_id, "w1", delivered, next_attempt=None, bounce=bounce)
    with pytest.raises(ClaimLost):  # a worker that never claimed it
        await store.record_attempt(copy_id, "w9", delivered, next_attempt=None)
    message = await store.get(message_id)
    assert message is not None and states(message) == {"a@example.net": PENDING}
    assert message.copies[0].attempts == 0
    assert len(await store.list()) == 1  # the bounce was not enqueued
    # the new holder records normally
    done = await store.record_attempt(copy_id, "w2", delivered, next_attempt=None)
    assert done.state == DONE


async def test_an_expired_claim_not_taken_over_still_records(
    store: SqlQueueStore, clock: Clock
) -> None:
    """The worker was slow but nobody claimed the copy meanwhile: its result is the truth."""
    await enqueue(store, copy("a@example.net"))
    (m,) = await store.claim("w1", limit=1, lease=LEASE)
    clock.advance(LEASE * 2)
    result = AttemptResult(recipients={"a@example.net": (DELIVERED, "250 ok", None)}, reply="")
    done = await store.record_attempt(m.copies[0].id, "w1", result, next_attempt=None)
    assert done.state == DONE


async def test_pending_recipients_need_a_next_attempt(store: SqlQueueStore) -> None:
    await enqueue(store, copy("a@example.net"))
    (m,) = await store.claim("w1", limit=1, lease=LEASE)
    result = AttemptResult(recipients={"a@example.net": (PENDING, "451 x", None)}, reply="451 x")
    with pytest.raises(ValueError, match="no next attempt"):
        await store.record_attempt(m.copies[0].id, "w1", result, next_attempt=None)
    # nothing was recorded; the claim still holds
    again = await store.record_attempt(
        m.copies[0].id, "w1", result, next_attempt=T0 + timedelta(minutes=5)
    )
    assert again.attempts == 1


async def test_a_bounce_is_enqueued_with_the_attempt(store: SqlQueueStore, clock: Clock) -> None:
    original = await enqueue(store, copy("bad@example.net"), login="alice@example.com")
    (m,) = await store.claim("w1", limit=1, lease=LEASE)
    dsn = NewBounce(
        "alice@example.com",
        name(),
        999,
        "ef" * 32,
        txn_id="s1.1.dsn",
        login="alice@example.com",
        message_id_header="<dsn-1@gw>",
        smtputf8=True,
        body_8bitmime=True,
    )
    result = AttemptResult(
        recipients={"bad@example.net": (BOUNCED, "550 5.1.1 no", "5.1.1")}, reply="550 5.1.1 no"
    )
    await store.record_attempt(m.copies[0].id, "w1", result, next_attempt=None, bounce=dsn)
    listed = await store.list()
    assert [x.id for x in listed][1:] == [original]
    bounce = listed[0]
    assert (bounce.mail_from, bounce.is_bounce, bounce.txn_id) == ("", True, "s1.1.dsn")
    assert (bounce.login, bounce.message_id_header) == ("alice@example.com", "<dsn-1@gw>")
    assert (bounce.smtputf8, bounce.body_8bitmime) == (True, True)
    (c,) = bounce.copies
    assert (c.spool_name, c.size, c.sha256, c.state) == (dsn.spool_name, 999, "ef" * 32, QUEUED)
    assert [(r.address, r.state) for r in c.recipients] == [("alice@example.com", PENDING)]
    assert c.next_attempt == clock.now
    assert bounce.expires_at == clock.now + timedelta(days=5)


async def test_mark_corrupt(store: SqlQueueStore, clock: Clock) -> None:
    claimed_id = await enqueue(store, copy("a@example.net"))
    idle_id = await enqueue(store, copy("b@example.net"), first_attempt=T0 + timedelta(hours=1))
    (m,) = await store.claim("w1", limit=1, lease=LEASE)
    assert m.id == claimed_id
    copy_id = m.copies[0].id
    # at start-up (no worker) a copy another worker is delivering is left alone
    assert await store.mark_corrupt(copy_id, "spool file missing") is False
    assert await store.mark_corrupt(copy_id, "spool file missing", worker="w2") is False
    assert await store.mark_corrupt(copy_id, "spool file missing", worker="w1") is True
    idle = await store.get(idle_id)
    assert idle is not None
    assert await store.mark_corrupt(idle.copies[0].id, "truncated") is True
    for message_id in (claimed_id, idle_id):
        got = await store.get(message_id)
        assert got is not None and got.copies[0].state == CORRUPT
        assert got.copies[0].claimed_by is None
    assert (await store.get(claimed_id)).copies[0].last_reply == "spool file missing"  # type: ignore[union-attr]
    assert await store.spool_names() == {}
    clock.advance(7200)
    assert await store.claim("w1", limit=5, lease=LEASE) == []  # corrupt copies are never sent


# --- operator actions -----------------------------------------------------------------------------


async def test_hold_release_delete(store: SqlQueueStore, clock: Clock) -> None:
    message_id = await enqueue(
        store, copy("a@example.net", "b@example.net", delivered=("b@example.net",))
    )
    assert await store.set_state(message_id, HELD, origins=(QUEUED,)) == 1
    assert await store.set_state(message_id, HELD, origins=(QUEUED,)) == 0  # already held
    assert await store.claim("w1", limit=5, lease=LEASE) == []  # held: never attempted
    assert await store.retry_now(message_id) == 0

    clock.advance(600)
    assert await store.set_state(message_id, QUEUED, origins=(HELD,)) == 1
    released = await store.get(message_id)
    assert released is not None and released.copies[0].next_attempt == clock.now  # due now

    assert (
        await store.set_state(
            message_id, DELETED, origins=(QUEUED, HELD), reply="deleted by operator root"
        )
        == 1
    )
    deleted = await store.get(message_id)
    assert deleted is not None and deleted.copies[0].state == DELETED
    assert states(deleted) == {"a@example.net": DROPPED, "b@example.net": DELIVERED}
    assert deleted.copies[0].recipients[0].last_reply == "deleted by operator root"
    assert await store.set_state(message_id, QUEUED, origins=(HELD,)) == 0  # deleted is final
    with pytest.raises(ValueError):
        await store.set_state(message_id, DONE, origins=(QUEUED,))
    with pytest.raises(ValueError):
        await store.set_state(message_id, HELD, origins=("nope",))


async def test_delete_with_bounce_marks_pending_bounced(store: SqlQueueStore) -> None:
    message_id = await enqueue(store, copy("a@example.net"))
    changed = await store.set_state(
        message_id, DELETED, origins=(QUEUED, HELD), pending_state=BOUNCED, reply="deleted"
    )
    assert changed == 1
    got = await store.get(message_id)
    assert got is not None and states(got) == {"a@example.net": BOUNCED}


async def test_operator_actions_leave_a_copy_in_delivery_alone(
    store: SqlQueueStore, clock: Clock
) -> None:
    message_id = await enqueue(store, copy("a@example.net"))
    (m,) = await store.claim("w1", limit=1, lease=LEASE)
    assert await store.set_state(message_id, HELD, origins=(QUEUED,)) == 0
    assert await store.set_state(message_id, DELETED, origins=(QUEUED,)) == 0
    assert await store.retry_now(None) == 0
    result = AttemptResult(recipients={"a@example.net": (PENDING, "451 x", None)}, reply="451 x")
    await store.record_attempt(
        m.copies[0].id, "w1", result, next_attempt=clock.now + timedelta(hours=1)
    )
    assert await store.set_state(message_id, HELD, origins=(QUEUED,)) == 1
    # a claim abandoned by a crashed worker no longer protects the copy
    other = await enqueue(store, copy("b@example.net"))
    (m2,) = await store.claim("w2", limit=1, lease=LEASE)
    assert m2.id == other
    clock.advance(LEASE + 1)
    assert await store.set_state(other, HELD, origins=(QUEUED,)) == 1
    with pytest.raises(ClaimLost):
        await store.record_attempt(m2.copies[0].id, "w2", result, next_attempt=clock.now)


async def test_the_event_hook_runs_in_the_change_transaction(store: SqlQueueStore) -> None:
    """An operator change and what its hook writes commit together: a hook that fails rolls the
    change back (hold, release, retry, delete); a hook is called only when something changed."""
    held = await enqueue(store, copy("h@example.net"), first_attempt=T0 + timedelta(hours=1))
    await store.set_state(held, HELD, origins=(QUEUED,))
    queued = await enqueue(store, copy("a@example.net", "b@example.net"), first_attempt=T0)
    seen: list[OperatorChange] = []

    async def failing(conn: AsyncConnection, change: OperatorChange) -> None:
        seen.append(change)
        await conn.execute(text("UPDATE queue_copy SET attempts = 99"))  # rolled back too
        raise RuntimeError("audit insert failed")

    for action in (
        lambda: store.set_state(queued, HELD, origins=(QUEUED,), event=failing),
        lambda: store.set_state(held, QUEUED, origins=(HELD,), event=failing),
        lambda: store.retry_now(queued, event=failing),
        lambda: store.retry_now(None, event=failing),
        lambda: store.set_state(queued, DELETED, origins=(QUEUED, HELD), event=failing),
    ):
        with pytest.raises(RuntimeError, match="audit insert failed"):
            await action()
    assert len(seen) == 5
    assert seen[-1].ended == ("a@example.net", "b@example.net") and seen[-1].bounce_id is None
    after = {m.id: m for m in await store.list()}
    assert [c.state for c in after[queued].copies] == [QUEUED]
    assert states(after[queued]) == {"a@example.net": PENDING, "b@example.net": PENDING}
    assert [c.state for c in after[held].copies] == [HELD]
    assert all(c.attempts == 0 for m in after.values() for c in m.copies)

    async def never(conn: AsyncConnection, change: OperatorChange) -> None:
        raise AssertionError("called although nothing changed")

    assert await store.set_state(held, HELD, origins=(QUEUED,), event=never) == 0

    written: list[OperatorChange] = []

    async def writes(conn: AsyncConnection, change: OperatorChange) -> None:
        written.append(change)

    assert await store.set_state(queued, HELD, origins=(QUEUED,), event=writes) == 1
    [message] = [m for m in await store.list() if m.id == queued]
    assert written == [OperatorChange((message.copies[0].id,))]


async def test_a_delete_with_a_bounce_enqueues_its_dsn_in_the_same_transaction(
    store: SqlQueueStore, clock: Clock
) -> None:
    message_id = await enqueue(
        store, copy("a@example.net", "b@example.net", delivered=("b@example.net",))
    )
    dsn = NewBounce("alice@example.com", name(), 50, "cd" * 32, "s1.1.dsn", "alice@example.com")

    async def failing(conn: AsyncConnection, change: OperatorChange) -> None:
        assert change.bounce_id is not None  # inserted before the hook, in its transaction
        raise RuntimeError("audit insert failed")

    bounced = {"origins": (QUEUED, HELD), "pending_state": BOUNCED, "reply": "deleted"}
    with pytest.raises(RuntimeError):
        await store.set_state(message_id, DELETED, bounce=dsn, event=failing, **bounced)
    assert [m.id for m in await store.list()] == [message_id]  # no DSN without its failure
    got = await store.get(message_id)
    assert got is not None and states(got)["a@example.net"] == PENDING

    seen: list[OperatorChange] = []

    async def writes(conn: AsyncConnection, change: OperatorChange) -> None:
        seen.append(change)

    assert await store.set_state(message_id, DELETED, bounce=dsn, event=writes, **bounced) == 1
    [change] = seen
    assert change.ended == ("a@example.net",) and change.bounce_id is not None
    bounce = await store.get(change.bounce_id)
    assert bounce is not None and bounce.is_bounce and bounce.mail_from == ""
    assert bounce.txn_id == "s1.1.dsn" and bounce.created_at == clock.now
    assert [(c.spool_name, c.state) for c in bounce.copies] == [(dsn.spool_name, QUEUED)]
    assert [r.address for r in bounce.copies[0].recipients] == ["alice@example.com"]
    got = await store.get(message_id)
    assert got is not None
    assert states(got) == {"a@example.net": BOUNCED, "b@example.net": DELIVERED}

    # nothing pending: no DSN enqueued (its spool file is the caller's to remove)
    done = await enqueue(store, copy("c@example.net"))
    await store.set_state(done, HELD, origins=(QUEUED,))
    nothing = await enqueue(store, copy("d@example.net", delivered=("d@example.net",)))
    seen.clear()
    assert await store.set_state(nothing, DELETED, bounce=dsn, event=writes, **bounced) == 0
    assert seen == []
    with pytest.raises(ValueError, match="DSN"):
        await store.set_state(done, DELETED, origins=(HELD,), bounce=dsn)


async def test_get_copy_and_custody_of(store: SqlQueueStore) -> None:
    first = await enqueue(store, copy("a@example.net"), copy("b@example.net"), audit_id=11)
    by_txn = await enqueue(store, copy("c@example.net"), txn_id="s2.1")
    await enqueue(store, copy("alice@example.com"), txn_id="s3.1.dsn", mail_from="", is_bounce=True)
    message = await store.get(first)
    assert message is not None
    second_copy = message.copies[1]
    found = await store.get_copy(second_copy.id)
    assert found is not None and found.id == first and found.copies == (second_copy,)
    assert await store.get_copy(second_copy.id + 1000) is None

    assert await store.custody_of({}) == {}
    assert await store.custody_of(
        {11: "s1.1", 12: "s2.1", 13: "s3.1.dsn", 14: None, 15: "s9.9"}
    ) == {11: first, 12: by_txn}


async def test_retry_now(store: SqlQueueStore, clock: Clock) -> None:
    later = T0 + timedelta(hours=2)
    first = await enqueue(store, copy("a@example.net"), first_attempt=later)
    await enqueue(store, copy("b@example.net"), first_attempt=later)
    assert await store.claim("w1", limit=5, lease=LEASE) == []
    assert await store.retry_now(first) == 1
    assert [m.id for m in await store.claim("w1", limit=5, lease=LEASE)] == [first]
    assert await store.retry_now(None) == 1  # the other one; the claimed one is not counted
    assert len(await store.claim("w1", limit=5, lease=LEASE)) == 1


async def test_list_filters_and_pages(store: SqlQueueStore) -> None:
    ids = [await enqueue(store, copy(f"r{i}@example.net")) for i in range(5)]
    await store.set_state(ids[1], HELD, origins=(QUEUED,))
    await store.set_state(ids[3], HELD, origins=(QUEUED,))
    assert [m.id for m in await store.list()] == ids[::-1]
    assert [m.id for m in await store.list(state=HELD)] == [ids[3], ids[1]]
    page = await store.list(limit=2)
    assert [m.id for m in page] == [ids[4], ids[3]]
    assert [m.id for m in await store.list(limit=2, before_id=page[-1].id)] == [ids[2], ids[1]]
    assert await store.list(state=CORRUPT) == []
    with pytest.raises(ValueError):
        await store.list(state="nope")


# --- warnings and spool bookkeeping ---------------------------------------------------------------


async def test_warning_candidates_and_marking_once(store: SqlQueueStore, clock: Clock) -> None:
    waiting = await enqueue(store, copy("a@example.net"))
    never_tried = await enqueue(store, copy("b@example.net"), first_attempt=T0 + timedelta(days=1))
    bounce_id = await enqueue(store, copy("c@example.net"), mail_from="", is_bounce=True)
    fresh_after = T0 + timedelta(minutes=1)
    claimed = await store.claim("w1", limit=10, lease=LEASE)
    assert {m.id for m in claimed} == {waiting, bounce_id}
    for m in claimed:
        (c,) = m.copies
        address = c.recipients[0].address
        await store.record_attempt(
            c.id,
            "w1",
            AttemptResult(recipients={address: (PENDING, "451 busy", "4.3.0")}, reply="451"),
            next_attempt=clock.now + timedelta(hours=1),
        )
    clock.now = fresh_after
    await enqueue(store, copy("d@example.net"))  # too recent

    found = await store.warn_candidates(created_before=T0 + timedelta(seconds=30), limit=10)
    assert [m.id for m in found] == [waiting]  # not the untried one, nor the bounce
    assert [r.address for r in found[0].pending] == ["a@example.net"]
    assert never_tried not in {m.id for m in found}

    dsn = NewBounce("alice@example.com", name(), 5, "11" * 32, txn_id="s1.1.warn")
    assert await store.mark_warned(waiting, bounce=dsn) is True
    assert await store.mark_warned(waiting, bounce=dsn) is False  # once only
    got = await store.get(waiting)
    assert got is not None and got.warned_at == fresh_after
    bounces = [m for m in await store.list() if m.txn_id == "s1.1.warn"]
    assert len(bounces) == 1 and bounces[0].is_bounce
    assert await store.warn_candidates(created_before=clock.now, limit=10) == []


async def test_spool_names_are_those_of_live_copies(store: SqlQueueStore) -> None:
    queued, held, done = copy("a@example.net"), copy("b@example.net"), copy("c@example.net")
    await enqueue(store, queued)
    held_id = await enqueue(store, held)
    await store.set_state(held_id, HELD, origins=(QUEUED,))
    deleted_id = await enqueue(store, copy("d@example.net"))
    await store.set_state(deleted_id, DELETED, origins=(QUEUED,))
    await enqueue(
        store, NewCopy(("c@example.net",), done.spool_name, 1, "00" * 32, ("c@example.net",))
    )
    names = await store.spool_names()
    assert set(names) == {queued.spool_name, held.spool_name}
    held_message = await store.get(held_id)
    assert held_message is not None and names[held.spool_name] == held_message.copies[0].id


async def test_enqueue_committed_after_the_caller_gave_up_is_discarded(
    db_backend: str, db_url: str, clock: Clock
) -> None:
    """The caller stops waiting after ``timeout`` (and answers 4xx: the client sends the message
    again); the insert still commits once the lock is gone, and its copies are then deleted at
    once, so the queue never delivers a message the client also resends."""
    engine = engine_for_url(db_url, timeout=4.0)  # driver lock wait longer than the store's
    queue = SqlQueueStore(engine, timeout=0.5, clock=clock)
    blocker = engine_for_url(db_url, timeout=4.0)
    try:
        async with blocker.connect() as conn:
            trans = await conn.begin()
            if db_backend == "sqlite":
                await conn.execute(text("UPDATE queue_message SET login = login"))
            else:
                await conn.execute(text("LOCK TABLE queue_message IN ACCESS EXCLUSIVE MODE"))
            start = time.monotonic()
            with pytest.raises(StoreUnavailable, match="not committed within"):
                await enqueue(queue, copy("a@example.net"))
            assert time.monotonic() - start < 2
            await asyncio.sleep(0.5)
            await trans.rollback()
        await queue.close()  # waits for the detached insert and its compensation
        (message,) = await queue.list()
        assert message.copies[0].state == DELETED
        assert states(message) == {"a@example.net": DROPPED}
        assert message.copies[0].recipients[0].last_reply == UNCONFIRMED_REPLY
        assert await queue.claim("w1", limit=5, lease=LEASE) == []
        assert await queue.spool_names() == {}  # its spool file is an orphan: swept later
    finally:
        await queue.close()
        await blocker.dispose()
        await engine.dispose()


async def test_unreachable_database_is_store_unavailable(db_backend: str, tmp_path: Path) -> None:
    engine = engine_for_url(unreachable_url(db_backend, tmp_path), timeout=2.0)
    queue = SqlQueueStore(engine, timeout=2.0)
    try:
        with pytest.raises(StoreUnavailable) as info:
            await queue.claim("w1", limit=1, lease=LEASE)
        assert "secret-pw" not in str(info.value)
        assert info.value.reply is replies.QUEUE_UNAVAILABLE
        with pytest.raises(StoreUnavailable):
            await enqueue(queue, copy("a@example.net"))
        with pytest.raises(StoreUnavailable):
            await queue.list()
    finally:
        await queue.close()
        await engine.dispose()
