"""The queue runner: claim due copies, attempt them upstream, record per-recipient results, schedule.

What it does: :class:`QueueRunner` is an asyncio background task (Postfix's qmgr in small). Every
``runner_interval`` -- or at once when :meth:`~QueueRunner.wake` is called -- it claims up to
``runner_batch`` due copies (:meth:`QueueStore.claim`, a lease of ``claim_lease``), and for each:

1. reads its spool file, verified against its header and the row's size and SHA-256; a missing or
   bad file makes the copy ``corrupt`` (file moved to ``corrupt/``, logged), never sent;
2. delivers it through the :class:`~gateway.core.ports.Relay` port: MAIL FROM with the original
   envelope, RCPT TO for each *pending* recipient (one already delivered is never sent again),
   DATA with the exact spool bytes if any recipient was accepted;
3. classifies per recipient: accepted at DATA -> ``delivered``; 5xx at MAIL, RCPT or DATA ->
   permanent; 4xx, connection failure or timeout -> temporary (stays ``pending``, next attempt
   after an exponential backoff with ±``jitter``: ``retry_first``, x2 each time, capped at
   ``retry_max``, never later than the message's expiry). A temporary failure at or after the
   message's ``expires_at`` becomes permanent, status ``5.4.7`` (delivery time expired);
4. for permanent failures, builds a DSN (RFC 3464, through the injected :class:`Dsn`) to the
   envelope sender with the null reverse-path, unless the message is itself a DSN or may not be
   bounced (``Dsn.may_bounce``) or its sender is not one of the login's own addresses
   (``sender_owned``, no backscatter): those recipients end ``dropped``, logged. The DSN's spool
   file is written first and its row is committed in the same transaction as the attempt
   (:meth:`QueueStore.record_attempt`), so a recorded bounce always has its DSN and vice versa;
5. records the attempt (refused if the claim was lost: then nothing is recorded and the other
   worker's attempt counts) and removes the spool file of a finished copy.

When a copy reaches a final state (``done``: every recipient delivered, bounced or dropped; or
``corrupt``, during a delivery or found so by :meth:`~QueueRunner.recover` at start) the runner
calls its ``on_final`` hook with the copy as recorded (the composition root writes the audit
event); a failing hook is logged and changes nothing.

Once per message, after ``warn_after``, a warning DSN (``Action: delayed``) lists the recipients
still pending (:meth:`~QueueRunner.send_warnings`). :meth:`~QueueRunner.recover` (at start)
releases the claims its own worker id still holds (a stable id given by the composition root: the
process that held them is gone, so none of their attempts is in flight), checks the spool file of
every queued copy (a crash can only leave a whole file or none under its name; a bad one is
quarantined and its copy set ``corrupt``) and deletes orphan spool files (no row, older than
``orphan_grace``: never acknowledged to a client); the loop sweeps orphans again every
``orphan_grace``. :meth:`~QueueRunner.stop` lets deliveries in flight finish within a grace, then
cancels them: an interrupted attempt records nothing and its claim expires (no half state; the
upstream may have received a message whose DATA reply was lost, which is retried -- the classic
SMTP duplicate, never a loss).

Reads/writes: the queue store, the spool, the upstream (through the relay); the account store
through ``sender_owned``.

Security notes: message bytes and envelope addresses are never logged (the log names queue and
copy ids, counts and the upstream's reply class); the DSN carries only the original's header
section (``gateway.queue.dsn``). Worker ids are given by the caller (stable across restarts of one
gateway) or random per runner.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Literal, Protocol

from gateway.config.schema import QueueConfig
from gateway.core.errors import GatewayError, StoreUnavailable, UpstreamError
from gateway.core.message import Headers
from gateway.core.model import utcnow
from gateway.core.ports import Relay, UpstreamReply
from gateway.queue.model import (
    BOUNCED,
    CORRUPT,
    DELIVERED,
    DONE,
    DROPPED,
    PENDING,
    AttemptResult,
    ClaimLost,
    NewBounce,
    QueuedCopy,
    QueuedMessage,
    QueuedRecipient,
    QueueStore,
)
from gateway.queue.spool import Spool, SpoolCorrupt, SpoolError

log = logging.getLogger("mailward.queue")

#: status of a temporary failure that ran out of the message's lifetime (RFC 3463)
EXPIRED_STATUS = "5.4.7"
#: seconds a spool file without a row is kept before it is deleted as an orphan
ORPHAN_GRACE = 3600.0
#: seconds between retries of recording an attempt when the database fails
_RECORD_RETRY = 1.0
_RECORD_TRIES = 3

Kind = Literal["delivered", "temporary", "permanent"]


class Dsn(Protocol):
    """What the runner needs to write DSNs (``gateway.queue.dsn`` satisfies it as a module)."""

    def build_dsn(
        self,
        *,
        reporting_mta: str,
        original: QueuedMessage,
        failed: list[QueuedRecipient],
        original_bytes: bytes | None,
        warning: bool = False,
        arrival: datetime,
        now: datetime,
    ) -> bytes: ...

    def may_bounce(self, message: QueuedMessage, original_bytes: bytes | None = None) -> bool: ...

    def envelope_flags(self, dsn: bytes) -> tuple[bool, bool]: ...


#: ``sender_owned(login, address)``: whether ``address`` is one of ``login``'s own addresses (the
#: account store's ownership rule). Raises StoreUnavailable when it cannot tell.
SenderOwned = Callable[[str | None, str], Awaitable[bool]]

#: ``on_final(message, copy)``: ``copy`` (as recorded) reached a final state, ``done`` or
#: ``corrupt``; for the audit trail. Must not raise (errors are logged).
FinalHook = Callable[[QueuedMessage, QueuedCopy], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class RunnerSettings:
    """The runner's knobs in seconds (see ``[queue]`` in the configuration reference)."""

    reporting_mta: str
    interval: float = 10.0
    batch: int = 20
    lease: float = 1200.0
    retry_first: float = 300.0
    retry_max: float = 3600.0
    jitter: float = 0.2
    warn_after: float | None = 4 * 3600.0
    orphan_grace: float = ORPHAN_GRACE

    @classmethod
    def from_config(cls, config: QueueConfig, *, reporting_mta: str) -> RunnerSettings:
        return cls(
            reporting_mta=reporting_mta,
            interval=config.runner_interval_seconds,
            batch=config.runner_batch,
            lease=config.claim_lease_seconds,
            retry_first=config.retry_first_seconds,
            retry_max=config.retry_max_seconds,
            warn_after=config.warn_after_seconds,
        )


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one attempt did to one recipient, before bounce rules are applied."""

    kind: Kind
    reply: str
    status: str | None = None


@dataclass(frozen=True, slots=True)
class Recovery:
    """What :meth:`QueueRunner.recover` found: copies set corrupt, orphan files deleted."""

    corrupt: list[int] = field(default_factory=list)
    orphans_deleted: int = 0


class QueueRunner:
    """The queue's delivery loop (see the module docstring)."""

    def __init__(
        self,
        store: QueueStore,
        spool: Spool,
        relay: Relay,
        settings: RunnerSettings,
        dsn: Dsn,
        sender_owned: SenderOwned,
        *,
        clock: Callable[[], datetime] = utcnow,
        rng: random.Random | None = None,
        worker: str | None = None,
        on_final: FinalHook | None = None,
    ) -> None:
        self._store = store
        self._spool = spool
        self._relay = relay
        self.settings = settings
        self._dsn = dsn
        self._sender_owned = sender_owned
        self._clock = clock
        self._rng = rng or random.Random()  # jitter, not security
        self.worker = worker or f"{socket.gethostname()[:40]}:{secrets.token_hex(6)}"
        self._on_final = on_final
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._last_sweep: datetime | None = None

    # --- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the background loop (idempotent)."""
        if self._task is None or self._task.done():
            self._stopping = False
            self._task = asyncio.get_running_loop().create_task(
                self._loop(), name="mailward-queue-runner"
            )

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def wake(self) -> None:
        """Look for due copies now (e.g. a message was just queued)."""
        self._wakeup.set()

    async def stop(self, grace: float = 30.0) -> None:
        """Stop claiming; let deliveries in flight finish for up to ``grace`` seconds, then cancel
        them (their claims expire; nothing half-recorded)."""
        self._stopping = True
        self._wakeup.set()
        task, self._task = self._task, None
        if task is None:
            return
        done, _ = await asyncio.wait({task}, timeout=grace)
        if not done:
            log.warning("queue runner: deliveries still running after %gs; abandoned", grace)
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _loop(self) -> None:
        interval = self.settings.interval
        while not self._stopping:
            processed = 0
            try:
                processed = await self.run_once()
                if not self._stopping:
                    await self.send_warnings()
                    await self._maybe_sweep()
            except StoreUnavailable as exc:
                log.warning("queue runner: %s; trying again in %gs", exc, interval)
            except Exception:
                log.exception("queue runner: unexpected error; trying again in %gs", interval)
            if self._stopping:
                break
            if processed >= self.settings.batch:
                continue  # more may be due right now
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), interval)
            self._wakeup.clear()

    # --- one pass ---------------------------------------------------------------------------------

    async def run_once(self) -> int:
        """Claim one batch of due copies and attempt them (concurrently); how many were
        claimed. Raises StoreUnavailable when the claim fails."""
        if self._stopping:
            return 0
        messages = await self._store.claim(
            self.worker, limit=self.settings.batch, lease=self.settings.lease
        )
        jobs = [(message, copy) for message in messages for copy in message.copies]
        if jobs:
            outcomes = await asyncio.gather(
                *(self._process(message, copy) for message, copy in jobs), return_exceptions=True
            )
            for (message, copy), outcome in zip(jobs, outcomes, strict=True):
                if isinstance(outcome, asyncio.CancelledError):
                    raise outcome
                if isinstance(outcome, BaseException):
                    log.error(
                        "queue %d copy %d: attempt failed (%s); retried when its claim expires",
                        message.id,
                        copy.id,
                        outcome,
                        exc_info=outcome,
                    )
        return len(jobs)

    async def _process(self, message: QueuedMessage, copy: QueuedCopy) -> None:
        try:
            data = await self._spool.read_async(copy.spool_name, size=copy.size, sha256=copy.sha256)
        except SpoolCorrupt as exc:
            await self._corrupt(message, copy, str(exc))
            return
        except SpoolError as exc:
            log.error("queue %d copy %d: %s; retried later", message.id, copy.id, exc)
            outcomes = {r.address: Outcome("temporary", str(exc)) for r in copy.pending}
            await self._finish(message, copy, None, outcomes, str(exc))
            return
        try:
            outcomes, reply = await asyncio.wait_for(
                self._attempt(message, copy, data), self._attempt_bound()
            )
        except TimeoutError:
            reply = "delivery attempt took too long; abandoned"
            outcomes = {r.address: Outcome("temporary", reply) for r in copy.pending}
        except Exception:
            log.exception(
                "queue %d copy %d: unexpected error while delivering", message.id, copy.id
            )
            reply = "internal error during the delivery attempt"
            outcomes = {r.address: Outcome("temporary", reply) for r in copy.pending}
        await self._finish(message, copy, data, outcomes, reply)

    def _attempt_bound(self) -> float:
        """A delivery must end while the claim holds (the relay's own timeouts come first)."""
        lease = self.settings.lease
        return max(lease * 0.5, lease - 60.0)

    async def _attempt(
        self, message: QueuedMessage, copy: QueuedCopy, data: bytes
    ) -> tuple[dict[str, Outcome], str]:
        """One upstream transaction for the pending recipients of ``copy``: outcome per address
        and the reply describing the attempt as a whole."""
        pending = [r.address for r in copy.pending]
        try:
            answer, upstream = await self._relay.begin(
                message.mail_from,
                smtputf8=message.smtputf8,
                body_8bitmime=message.body_8bitmime,
                size=len(data),
            )
        except UpstreamError as exc:
            outcome = _error_outcome(exc)
            return {a: outcome for a in pending}, outcome.reply
        if upstream is None:
            outcome = _reply_outcome(answer)
            return {a: outcome for a in pending}, f"MAIL FROM: {answer}"
        outcomes: dict[str, Outcome] = {}
        accepted: list[str] = []
        try:
            for address in pending:
                answer = await upstream.rcpt(address)
                if answer.ok:
                    accepted.append(address)
                else:
                    outcomes[address] = _reply_outcome(answer)
        except UpstreamError as exc:  # the upstream transaction has ended
            failed = _error_outcome(exc)
            current = pending[len(accepted) + len(outcomes)]
            outcomes[current] = failed
            untried = Outcome("temporary", f"not attempted: {failed.reply}")
            for address in pending:
                outcomes.setdefault(address, untried if address != current else failed)
            return outcomes, f"RCPT TO: {failed.reply}"
        except BaseException:
            await upstream.abort()
            raise
        if not accepted:
            await upstream.abort()
            return outcomes, "every recipient refused"
        try:
            answer = await upstream.data(data)
        except UpstreamError as exc:
            log.warning(
                "queue %d copy %d: connection failed during DATA (%s); the upstream may or may "
                "not have the message: retried",
                message.id,
                copy.id,
                exc,
            )
            failed = _error_outcome(exc)
            for address in accepted:
                outcomes[address] = Outcome("temporary", failed.reply, failed.status)
            return outcomes, f"DATA: {failed.reply}"
        outcome = Outcome("delivered", str(answer)) if answer.ok else _reply_outcome(answer)
        for address in accepted:
            outcomes[address] = outcome
        return outcomes, str(answer)

    async def _finish(
        self,
        message: QueuedMessage,
        copy: QueuedCopy,
        data: bytes | None,
        outcomes: dict[str, Outcome],
        reply: str,
    ) -> None:
        """Apply lifetime and bounce rules to ``outcomes``, then record the attempt."""
        now = self._clock()
        expired = now >= message.expires_at
        results: dict[str, tuple[str, str, str | None]] = {}
        failed: list[QueuedRecipient] = []
        retry = ran_out = False
        for address, outcome in outcomes.items():
            if outcome.kind == "delivered":
                results[address] = (DELIVERED, outcome.reply, None)
            elif outcome.kind == "permanent":
                failed.append(QueuedRecipient(address, BOUNCED, outcome.reply, outcome.status, now))
            elif expired:
                failed.append(QueuedRecipient(address, BOUNCED, outcome.reply, EXPIRED_STATUS, now))
                ran_out = True
            else:
                results[address] = (PENDING, outcome.reply, outcome.status)
                retry = True
        if ran_out:
            reply = f"{EXPIRED_STATUS} delivery time expired; last reply: {reply}"
        bounce: NewBounce | None = None
        if failed:
            attempted = replace(copy, attempts=copy.attempts + 1, last_attempt=now)
            current = replace(
                message, copies=tuple(attempted if c.id == copy.id else c for c in message.copies)
            )
            final, bounce = await self._bounce(current, data, failed, now)
            for r in failed:
                results[r.address] = (final or PENDING, r.last_reply or "", r.status)
            retry = retry or final is None
        next_attempt = self._next_attempt(copy.attempts + 1, now, message.expires_at)
        recorded = await self._record(copy, results, reply, next_attempt if retry else None, bounce)
        if recorded is None:
            if bounce is not None:
                await self._discard_file(bounce.spool_name)
            return
        counts = {
            state: sum(1 for r in results.values() if r[0] == state)
            for state in (DELIVERED, PENDING, BOUNCED, DROPPED)
        }
        log.info(
            "queue %d copy %d attempt %d: %d delivered, %d deferred, %d bounced, %d dropped%s",
            message.id,
            copy.id,
            recorded.attempts,
            counts[DELIVERED],
            counts[PENDING],
            counts[BOUNCED],
            counts[DROPPED],
            f"; next attempt {recorded.next_attempt:%Y-%m-%d %H:%M:%S}Z"
            if recorded.state != DONE and recorded.next_attempt
            else "",
        )
        if recorded.state == DONE:
            await self._discard_file(copy.spool_name)
            await self._final(message, recorded)

    async def _record(
        self,
        copy: QueuedCopy,
        results: dict[str, tuple[str, str, str | None]],
        reply: str,
        next_attempt: datetime | None,
        bounce: NewBounce | None,
    ) -> QueuedCopy | None:
        result = AttemptResult(recipients=results, reply=reply)
        for attempt in range(1, _RECORD_TRIES + 1):
            try:
                return await self._store.record_attempt(
                    copy.id, self.worker, result, next_attempt=next_attempt, bounce=bounce
                )
            except ClaimLost as exc:
                log.warning("queue copy %d: %s; this attempt is not recorded", copy.id, exc)
                return None
            except StoreUnavailable as exc:
                if attempt == _RECORD_TRIES:
                    log.error(
                        "queue copy %d: the attempt could not be recorded (%s); it will be "
                        "attempted again when its claim expires",
                        copy.id,
                        exc,
                    )
                    return None
                await asyncio.sleep(_RECORD_RETRY * attempt)
        return None  # pragma: no cover

    def _next_attempt(self, attempts: int, now: datetime, expires_at: datetime) -> datetime:
        """``retry_first`` x 2^(attempts-1), capped at ``retry_max``, ± jitter; never after the
        message expires (its last attempt is then at expiry)."""
        settings = self.settings
        delay = min(settings.retry_max, settings.retry_first * 2.0 ** min(attempts - 1, 40))
        delay *= 1.0 + settings.jitter * (2.0 * self._rng.random() - 1.0)
        at = now + timedelta(seconds=max(1.0, delay))
        return min(at, expires_at) if expires_at > now else at

    # --- bounces ----------------------------------------------------------------------------------

    async def _bounce(
        self,
        message: QueuedMessage,
        data: bytes | None,
        failed: list[QueuedRecipient],
        now: datetime,
        *,
        warning: bool = False,
    ) -> tuple[str | None, NewBounce | None]:
        """(final recipient state, DSN to enqueue) for permanently ``failed`` recipients:
        (BOUNCED, dsn), (DROPPED, None) when no DSN may be sent, or (None, None) when that cannot
        be decided or written now (the recipients stay pending and are tried again)."""
        what = "warning" if warning else "bounce"
        if message.is_bounce:
            log.warning(
                "queue %d: a DSN could not be delivered; dropped (no bounce for a bounce)",
                message.id,
            )
            return DROPPED, None
        if not self._dsn.may_bounce(message, data):
            log.info("queue %d: no %s (null sender or automatic message)", message.id, what)
            return DROPPED, None
        try:
            owned = await self._sender_owned(message.login, message.mail_from)
        except GatewayError as exc:
            log.warning("queue %d: cannot check the sender for a %s (%s)", message.id, what, exc)
            return None, None
        if not owned:
            log.warning(
                "queue %d: envelope sender is not one of the login's own addresses; no %s "
                "(no backscatter)",
                message.id,
                what,
            )
            return DROPPED, None
        try:
            body = self._dsn.build_dsn(
                reporting_mta=self.settings.reporting_mta,
                original=message,
                failed=failed,
                original_bytes=data,
                warning=warning,
                arrival=message.created_at,
                now=now,
            )
            smtputf8, body_8bitmime = self._dsn.envelope_flags(body)
        except Exception:
            log.exception("queue %d: the %s could not be built; none is sent", message.id, what)
            return DROPPED, None
        try:
            spooled = await self._spool.write_async(body)
        except SpoolError as exc:
            log.error("queue %d: the %s could not be spooled (%s)", message.id, what, exc)
            return None, None
        return BOUNCED, NewBounce(
            recipient=message.mail_from,
            spool_name=spooled.name,
            size=spooled.size,
            sha256=spooled.sha256,
            txn_id=f"{message.txn_id}.{'warn' if warning else 'dsn'}"[:80],
            login=message.login,
            message_id_header=Headers(body).message_id,
            smtputf8=smtputf8,
            body_8bitmime=body_8bitmime,
        )

    async def send_warnings(self) -> int:
        """Send the one warning DSN of each message queued longer than ``warn_after``; how many
        were sent."""
        warn_after = self.settings.warn_after
        if warn_after is None or self._stopping:
            return 0
        now = self._clock()
        candidates = await self._store.warn_candidates(
            created_before=now - timedelta(seconds=warn_after), limit=self.settings.batch
        )
        sent = 0
        for message in candidates:
            data = await self._original_bytes(message)
            waiting = list(message.pending)
            final, bounce = await self._bounce(message, data, waiting, now, warning=True)
            if final is None:
                continue  # tried again next pass
            if await self._store.mark_warned(message.id, bounce=bounce):
                sent += bounce is not None
                if bounce is not None:
                    log.info("queue %d: warning DSN queued", message.id)
            elif bounce is not None:  # another runner warned first
                await self._discard_file(bounce.spool_name)
        if sent:
            self.wake()
        return sent

    async def _original_bytes(self, message: QueuedMessage) -> bytes | None:
        for copy in message.copies:
            try:
                return await self._spool.read_async(
                    copy.spool_name, size=copy.size, sha256=copy.sha256
                )
            except (SpoolCorrupt, SpoolError):
                continue
        return None

    # --- integrity and housekeeping ---------------------------------------------------------------

    async def _final(self, message: QueuedMessage, copy: QueuedCopy) -> None:
        if self._on_final is None:
            return
        try:
            await self._on_final(message, copy)
        except Exception:
            log.exception("queue %d copy %d: the final-state hook failed", message.id, copy.id)

    async def _final_of(self, copy_id: int) -> None:
        """Call the final-state hook for copy ``copy_id`` as recorded (found corrupt at start)."""
        if self._on_final is None:
            return
        try:
            found = await self._store.get_copy(copy_id)
        except StoreUnavailable as exc:
            log.error("queue copy %d: its final state is not audited (%s)", copy_id, exc)
            return
        if found is not None:
            await self._final(found, found.copies[0])

    async def _corrupt(self, message: QueuedMessage, copy: QueuedCopy, reason: str) -> None:
        log.error("queue copy %d: %s; set corrupt, never sent", copy.id, reason)
        try:
            marked = await self._store.mark_corrupt(copy.id, reason, worker=self.worker)
        except StoreUnavailable as exc:
            log.error("queue copy %d: could not be set corrupt (%s)", copy.id, exc)
            return
        if marked:
            await self._quarantine_file(copy.spool_name)
            await self._final(message, replace(copy, state=CORRUPT, last_reply=reason))

    async def _quarantine_file(self, name: str) -> None:
        try:
            moved = await self._spool.quarantine_async(name)
        except SpoolError as exc:
            log.error("spool file %s could not be quarantined: %s", name, exc)
            return
        if moved is not None:
            log.error("spool file %s moved to %s", name, moved)

    async def _discard_file(self, name: str) -> None:
        try:
            await self._spool.remove_async(name)
        except SpoolError as exc:  # an orphan now; swept later
            log.warning("%s", exc)

    async def recover(self, *, verify: bool = False) -> Recovery:
        """At start: release the claims this worker id still holds (its previous life's), check
        the spool file of every queued or held copy (header and length; with ``verify`` also the
        SHA-256) -- a bad one is quarantined and its copy set corrupt -- and delete orphan spool
        files older than ``orphan_grace``."""
        released = await self._store.release_claims(self.worker)
        if released:
            log.warning(
                "queue: %d claim(s) of %s released (left by this gateway's previous run)",
                released,
                self.worker,
            )
        names = await self._store.spool_names()
        corrupt: list[int] = []
        for name, copy_id in names.items():
            try:
                if verify:
                    await self._spool.read_async(name)
                else:
                    await asyncio.to_thread(self._spool.check, name)
            except SpoolCorrupt as exc:
                if await self._store.mark_corrupt(copy_id, str(exc)):
                    log.error("queue copy %d: %s; set corrupt, never sent", copy_id, exc)
                    await self._quarantine_file(name)
                    corrupt.append(copy_id)
                    await self._final_of(copy_id)
        deleted = await self._sweep(set(names))
        return Recovery(corrupt=corrupt, orphans_deleted=deleted)

    async def _sweep(self, known: set[str] | None = None) -> int:
        if known is None:
            known = set(await self._store.spool_names())
        deleted = await asyncio.to_thread(
            self._spool.delete_orphans, known, grace=self.settings.orphan_grace
        )
        if deleted:
            log.info("spool: %d orphan file(s) deleted (never acknowledged)", len(deleted))
        self._last_sweep = self._clock()
        return len(deleted)

    async def _maybe_sweep(self) -> None:
        now = self._clock()
        last = self._last_sweep
        if last is None or (now - last).total_seconds() >= self.settings.orphan_grace:
            try:
                await self._sweep()
            except SpoolError as exc:
                log.warning("spool sweep failed: %s", exc)


def _reply_outcome(reply: UpstreamReply) -> Outcome:
    """A non-positive upstream reply: 5xx is permanent, anything else temporary."""
    kind: Kind = "permanent" if reply.code >= 500 else "temporary"
    return Outcome(kind, str(reply), reply.status or None)


def _error_outcome(exc: UpstreamError) -> Outcome:
    """A relay failure: permanent only when its reply is (an extension or address the upstream
    cannot take); connection failures and timeouts are temporary."""
    kind: Kind = "permanent" if exc.reply.is_permanent else "temporary"
    text = exc.upstream_reply if exc.upstream_code is not None else str(exc)
    return Outcome(kind, text, exc.reply.status or None)
