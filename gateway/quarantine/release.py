"""Release a held message: plan it as live mail is planned, relay each copy, record the outcome.

What it does: :func:`release` sends one quarantine entry upstream with its original envelope
(MAIL FROM with the original SMTPUTF8 / 8BITMIME flags and SIZE). The held bytes are the message
as received, never encrypted; so before anything is sent the release makes a **delivery plan**
exactly as the service does at end of data (``planner``, a
:class:`~gateway.core.ports.DeliveryPlanner`; the CLI passes
:func:`gateway.checks.encryption.stored_message_planner` over the
:class:`~gateway.crypto.plan.EncryptionPlanner`): every recipient is judged *now* by the
``encryption`` check (policy from the configuration at release time, keys from the store at
release time, checked again at use), then grouped (a copy of its own for every encrypted Bcc
recipient) and encrypted. Without a ``planner`` the plan is one copy of the held bytes for every
recipient (the service's default too; operator interfaces always pass the configured one).

Failure rules, as for live mail -- never clear text for a recipient the policy says to encrypt:

* the plan cannot be made (key store unavailable, a key no longer usable, gpg or
  ``cryptography`` failing, the check timing out): the release fails (``stage`` "encryption"),
  nothing is sent to anyone;
* a recipient the policy refuses now (``required`` and no usable key, or an address that cannot
  be matched to a key) is **not sent** and named in the report; the others go on. When the
  policy refuses everyone, the release fails and nothing is sent (import a key, release again);
* each copy is its own upstream transaction, sent only when the upstream accepts every recipient
  of the copy (RCPT is tried for each, so a failure names every refused one, then RSET). While
  nothing has been delivered, the first copy that fails ends the release: nothing was sent, the
  entry can be released again (with one copy -- no encryption -- this is the all-or-nothing
  release it always was). Once a copy was delivered, the remaining copies are still sent; a copy
  that then fails temporarily (4xx, connection) goes to the **durable queue** (``custody``, the
  service's :class:`~gateway.service.Custody`: the encrypted bytes of that copy only, for its
  recipients that were not refused for good), retried and bounced there like any queued mail; a
  recipient the upstream refuses for good (5xx) is named in the report. If the queue cannot take
  the rest (or there is no ``custody``), the release fails after all: releasing again sends to
  every recipient -- a duplicate for those who got it, never a loss (the rule of live mail).

:func:`release_held` is the operator action (CLI, later a web UI): it claims the entry (status
``releasing``, atomically: a concurrent or repeated release fails before anything is sent), calls
:func:`release` and records ``released`` (with the report: what each copy's recipients got, what
was queued and what was not sent) or ``release-failed`` (with why), each with its audit event
(``quarantine-release`` / ``quarantine-release-failed``, written by
:meth:`~gateway.quarantine.store.SqlQuarantine.mark`). :func:`release_and_record` does the same
and also returns the :class:`ReleaseReport`.

Reads: the quarantine store; talks to the upstream through the relay it is given; the planner
reads the key store and the GNUPGHOME; ``custody`` writes the spool and the queue tables.

Security notes: the message bytes and the envelope addresses are never logged (the log says which
entry was released or failed, by whom, at which stage, and counts); the recorded
``upstream_reply`` and the error text name recipients, for the operator. The stored bytes are
checked against their recorded size and SHA-256 before anything is sent. An encrypted copy exists
only in memory and, for a queued remainder, in the spool: the clear text of an encrypted
recipient's copy is never sent nor queued.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from gateway.core.errors import GatewayError, StoreUnavailable, UpstreamError
from gateway.core.message import sha256_hex
from gateway.core.model import (
    DeliveryCopy,
    Identity,
    Recipient,
    RecipientStatus,
    Session,
    Transaction,
)
from gateway.core.ports import DeliveryPlanner, Relay, UpstreamReply, UpstreamTransaction
from gateway.crypto.plan import ENCRYPTED, one_copy
from gateway.quarantine.models import RELEASE_FAILED, RELEASED, RELEASING
from gateway.quarantine.store import QuarantineEntry, QuarantineNotFound, SqlQuarantine

log = logging.getLogger("mailward.quarantine")

#: the listener named by the transaction a release rebuilds (the policy reads no listener)
RELEASE_LISTENER = "quarantine-release"


@dataclass(frozen=True, slots=True)
class RefusedRecipient:
    address: str
    reply: UpstreamReply


class RemainderCustody(Protocol):
    """What a release needs of the durable queue (:class:`gateway.service.Custody`)."""

    async def take(
        self,
        txn: Transaction,
        audit_id: int | None,
        parts: Sequence[tuple[bytes, tuple[str, ...], tuple[str, ...]]],
        *,
        reserve: int,
    ) -> int: ...


class ReleaseFailed(GatewayError):
    """The release failed; unless ``stage`` is "queue", nothing was delivered to anyone.

    ``stage`` is where it failed ("integrity", "encryption", "plan", "MAIL", "RCPT", "DATA",
    "connection" when the upstream could not be used, or "queue" when copies were delivered but
    the rest could not be queued); ``reply`` is the upstream's decisive reply when there was one;
    ``refused`` lists every refused recipient (stage RCPT: by the upstream; stage encryption: by
    the policy). ``uncertain`` is true when the connection failed after the message was (perhaps)
    sent: the upstream may have it. ``str()`` is the one-line summary recorded as
    ``upstream_reply``."""

    def __init__(
        self,
        message: str,
        *,
        stage: str,
        reply: UpstreamReply | None = None,
        refused: tuple[RefusedRecipient, ...] = (),
        uncertain: bool = False,
    ) -> None:
        super().__init__(message)
        self.stage = stage
        self.upstream = reply
        self.refused = refused
        self.uncertain = uncertain


@dataclass(frozen=True, slots=True)
class SentCopy:
    """One copy the upstream accepted: its recipients, its format (``openpgp``, ``smime``; empty
    for the held bytes unchanged) and the upstream's reply."""

    recipients: tuple[str, ...]
    format: str
    reply: UpstreamReply


@dataclass(frozen=True, slots=True)
class ReleaseReport:
    """What a release did, per recipient (``str()``: the summary recorded as the entry's
    ``upstream_reply``).

    ``sent``: the copies the upstream accepted; ``queued``: recipients whose copy failed
    temporarily after another was delivered, now in the durable queue as ``queue_id`` (each with
    the failure); ``refused``: recipients the upstream refused for good after another copy was
    delivered; ``not_sent``: recipients the encryption policy refused at release time (never sent
    in clear). ``total``: the entry's distinct recipients."""

    total: int
    sent: tuple[SentCopy, ...]
    queued: tuple[RefusedRecipient, ...] = ()
    queue_id: int | None = None
    refused: tuple[RefusedRecipient, ...] = ()
    not_sent: tuple[RefusedRecipient, ...] = ()

    @property
    def delivered(self) -> int:
        return sum(len(copy.recipients) for copy in self.sent)

    @property
    def complete(self) -> bool:
        """Every recipient was delivered or queued."""
        return not self.refused and not self.not_sent

    def recipients(self) -> list[tuple[str, str, str]]:
        """(address, what happened, reply) per recipient, in the order of the report."""
        rows: list[tuple[str, str, str]] = []
        for copy in self.sent:
            what = f"delivered ({copy.format})" if copy.format else "delivered"
            rows.extend((address, what, str(copy.reply)) for address in copy.recipients)
        rows.extend((r.address, f"queued as {self.queue_id}", str(r.reply)) for r in self.queued)
        rows.extend((r.address, "refused by the upstream", str(r.reply)) for r in self.refused)
        rows.extend(
            (r.address, "not sent (encryption policy)", str(r.reply)) for r in self.not_sent
        )
        return rows

    def __str__(self) -> str:
        if len(self.sent) == 1 and self.complete and not self.queued and not self.sent[0].format:
            return str(self.sent[0].reply)  # the release as it always was: the upstream's reply
        copies = len(self.sent)
        parts = [
            f"delivered to {self.delivered} of {self.total} recipient(s) in {copies} "
            f"cop{'y' if copies == 1 else 'ies'}: "
            + "; ".join(
                f"{_addresses(copy.recipients)}{f' ({copy.format})' if copy.format else ''}: "
                f"{copy.reply}"
                for copy in self.sent
            )
        ]
        if self.queued:
            parts.append(
                f"queued as {self.queue_id} (retried by the queue): {_listed(self.queued)}"
            )
        if self.refused:
            parts.append(f"refused by the upstream, not delivered: {_listed(self.refused)}")
        if self.not_sent:
            parts.append(f"not sent (encryption policy): {_listed(self.not_sent)}")
        return "; ".join(parts)


def _addresses(addresses: Sequence[str]) -> str:
    return ", ".join(f"<{a}>" for a in addresses)


def _listed(refused: Sequence[RefusedRecipient]) -> str:
    return "; ".join(f"<{r.address}> {r.reply}" for r in refused)


def _reply_of(line: str) -> UpstreamReply:
    """A reply line as recorded on a recipient (``550 5.7.5 ...``)."""
    code = int(line[:3]) if line[:3].isdigit() else 550
    return UpstreamReply.parse(code, line[4:])


def held_transaction(entry: QuarantineEntry) -> Transaction:
    """The envelope of ``entry`` as a transaction whose recipients are all accepted (each address
    once), for the planner (which reads the login, the envelope sender and the recipients) and
    the queue (which records the transaction id, login, flags and Message-ID)."""
    session = Session(
        client_ip=entry.client_ip or "-",
        client_port=0,
        listener=RELEASE_LISTENER,
        id=entry.session_id,
        identity=Identity(login=entry.login, account_id=None) if entry.login else None,
    )
    txn = Transaction(
        session,
        entry.mail_from,
        id=entry.transaction_id,
        started_at=entry.created_at,
        body_8bitmime=entry.body_8bitmime,
        smtputf8=entry.smtputf8,
    )
    txn.recipients = [Recipient(address) for address in dict.fromkeys(entry.recipients)]
    txn.message_id = entry.message_id
    txn.size, txn.sha256 = entry.size, entry.sha256
    return txn


def _checked_message(entry: QuarantineEntry) -> bytes:
    message = entry.message
    if message is None:
        raise ReleaseFailed(
            f"quarantine {entry.id} has no stored message (deleted?)", stage="integrity"
        )
    if len(message) != entry.size or sha256_hex(message) != entry.sha256:
        raise ReleaseFailed(
            f"quarantine {entry.id}: the stored message does not match its recorded size and "
            "SHA-256; not sent",
            stage="integrity",
        )
    if not entry.recipients:
        raise ReleaseFailed(f"quarantine {entry.id} has no recipient", stage="integrity")
    return message


async def _plan(
    entry: QuarantineEntry, txn: Transaction, message: bytes, planner: DeliveryPlanner | None
) -> list[DeliveryCopy]:
    """The copies to send (nothing sent yet); raises ReleaseFailed when there is none."""
    try:
        plan = list(await (planner or _as_held)(txn, message))
    except GatewayError as exc:
        raise ReleaseFailed(
            f"not encrypted: {exc.reply.line()} ({exc}); nothing was sent", stage="encryption"
        ) from None
    except Exception:  # a bug: the entry must not stay 'releasing', and nothing was sent
        log.exception("quarantine %d: the delivery plan could not be made", entry.id)
        raise ReleaseFailed(
            "the delivery plan could not be made (internal error, see the log); nothing was sent",
            stage="plan",
        ) from None
    planned = [a for copy in plan for a in copy.recipients]
    accepted = {r.address for r in txn.accepted}
    if any(not copy.recipients for copy in plan) or (
        len(planned) != len(set(planned)) or set(planned) != accepted
    ):
        log.error("quarantine %d: the delivery plan does not cover each recipient once", entry.id)
        raise ReleaseFailed(
            "the delivery plan does not cover each recipient once (internal error); nothing was "
            "sent",
            stage="plan",
        )
    if not plan:
        refused = _policy_refused(txn)
        raise ReleaseFailed(
            f"no recipient may be sent now: {_listed(refused)}; nothing was sent",
            stage="encryption",
            reply=refused[0].reply if refused else None,
            refused=refused,
        )
    return plan


async def _as_held(txn: Transaction, wire: bytes) -> list[DeliveryCopy]:
    return one_copy(txn, wire)


def _policy_refused(txn: Transaction) -> tuple[RefusedRecipient, ...]:
    return tuple(
        RefusedRecipient(r.address, _reply_of(r.reply))
        for r in txn.recipients
        if r.status is RecipientStatus.REJECTED
    )


def _copy_format(txn: Transaction, copy: DeliveryCopy) -> str:
    """``openpgp`` / ``smime`` when the planner encrypted ``copy``, else empty."""
    notes = {r.address: r.encryption for r in txn.recipients}
    note = notes.get(copy.recipients[0])
    return note.format if note is not None and note.decision == ENCRYPTED else ""


async def release(
    entry: QuarantineEntry,
    relay: Relay,
    *,
    planner: DeliveryPlanner | None = None,
    custody: RemainderCustody | None = None,
) -> ReleaseReport:
    """Plan the held message of ``entry`` (see the module docstring), send each copy in its own
    upstream transaction, queue what fails after a delivery; the report per recipient.

    Raises :class:`ReleaseFailed` when nothing was delivered (nothing sent: refusal, unreachable
    upstream, no plan, bytes missing or not matching their SHA-256; or ``uncertain``), and with
    stage "queue" when copies were delivered but the rest could not be queued.
    """
    message = _checked_message(entry)
    txn = held_transaction(entry)
    plan = await _plan(entry, txn, message, planner)
    not_sent = _policy_refused(txn)
    sent: list[SentCopy] = []
    refused: list[RefusedRecipient] = []
    queued: list[RefusedRecipient] = []
    parts: list[tuple[bytes, tuple[str, ...], tuple[str, ...]]] = []
    for number, copy in enumerate(plan, 1):
        try:
            reply = await _send_copy(txn, copy, relay)
        except ReleaseFailed as exc:
            if not sent:  # nothing delivered yet: the release fails, nothing was sent
                raise _first_failure(exc, number, plan, copy, not_sent) from None
            permanent, temporary = _classify(exc, copy)
            refused.extend(permanent)
            queued.extend(temporary)
            if temporary:
                parts.append((copy.data, tuple(r.address for r in temporary), ()))
            continue
        sent.append(SentCopy(copy.recipients, _copy_format(txn, copy), reply))
    report = ReleaseReport(
        total=len(txn.recipients),
        sent=tuple(sent),
        queued=tuple(queued),
        refused=tuple(refused),
        not_sent=not_sent,
    )
    if not parts:
        return report
    try:
        if custody is None:
            raise StoreUnavailable("no queue to take the rest")
        queue_id = await custody.take(txn, None, parts, reserve=0)
    except GatewayError as exc:
        log.error(
            "quarantine %d: %d recipient(s) got the message, the queue cannot take the rest (%s)",
            entry.id,
            report.delivered,
            exc,
        )
        raise ReleaseFailed(
            f"{report}; the rest could NOT be queued ({exc}): "
            f"{_addresses([r.address for r in queued])} did not get the message; releasing "
            "again sends it to every recipient, a duplicate for those who got it",
            stage="queue",
        ) from None
    return ReleaseReport(
        total=report.total,
        sent=report.sent,
        queued=report.queued,
        queue_id=queue_id,
        refused=report.refused,
        not_sent=report.not_sent,
    )


def _first_failure(
    exc: ReleaseFailed,
    number: int,
    plan: Sequence[DeliveryCopy],
    copy: DeliveryCopy,
    not_sent: tuple[RefusedRecipient, ...],
) -> ReleaseFailed:
    """The failure of the first copy that failed while nothing was delivered, with context."""
    text = str(exc)
    if len(plan) > 1:
        text = f"copy {number} of {len(plan)} ({_addresses(copy.recipients)}): {text}"
        if number < len(plan):
            text += "; later copies not attempted"
    if not_sent:
        text += f"; not sent (encryption policy): {_listed(not_sent)}"
    return ReleaseFailed(
        text, stage=exc.stage, reply=exc.upstream, refused=exc.refused, uncertain=exc.uncertain
    )


def _classify(
    exc: ReleaseFailed, copy: DeliveryCopy
) -> tuple[list[RefusedRecipient], list[RefusedRecipient]]:
    """(refused for good, to queue) for the recipients of a copy that failed after another copy
    was delivered. A copy aborted at RCPT: the 5xx-refused recipients are refused for good, the
    others (4xx, or accepted but not sent with the copy) are queued. A failed MAIL or DATA: the
    whole copy, by the reply's class; a connection failure is temporary (the upstream may have
    the copy when it dropped during DATA: a duplicate then, never a loss, as for live mail)."""
    refused_by = {r.address: r.reply for r in exc.refused}
    if exc.upstream is not None and exc.stage != "RCPT":
        failure = exc.upstream
    else:
        failure = UpstreamReply(451, "4.4.1", f"not sent: {exc}")
    permanent: list[RefusedRecipient] = []
    temporary: list[RefusedRecipient] = []
    for address in copy.recipients:
        reply = refused_by.get(address)
        if reply is None and exc.stage == "RCPT":
            reply = UpstreamReply(
                451, "4.4.0", "not sent: another recipient of the copy was refused"
            )
        elif reply is None:
            reply = failure
        target = permanent if reply.code >= 500 else temporary
        target.append(RefusedRecipient(address, reply))
    return permanent, temporary


async def _send_copy(txn: Transaction, copy: DeliveryCopy, relay: Relay) -> UpstreamReply:
    """One upstream transaction for ``copy``; the upstream's reply to its data. Every recipient
    must be accepted, else nothing of the copy is sent (ReleaseFailed)."""
    try:
        answer, upstream = await relay.begin(
            txn.mail_from,
            smtputf8=txn.smtputf8,
            body_8bitmime=txn.body_8bitmime,
            size=len(copy.data),
        )
    except UpstreamError as exc:
        raise ReleaseFailed(f"upstream not usable: {exc}", stage="connection") from None
    if upstream is None:
        raise ReleaseFailed(
            f"MAIL FROM refused: {answer}; nothing was sent", stage="MAIL", reply=answer
        )
    return await _recipients_then_data(copy, upstream)


async def _recipients_then_data(copy: DeliveryCopy, upstream: UpstreamTransaction) -> UpstreamReply:
    refused: list[RefusedRecipient] = []
    try:
        for address in copy.recipients:
            answer = await upstream.rcpt(address)
            if not answer.ok:
                refused.append(RefusedRecipient(address, answer))
    except UpstreamError as exc:  # the transaction has ended (connection released or discarded)
        raise ReleaseFailed(
            f"connection failed during RCPT: {exc}; nothing was sent", stage="connection"
        ) from None
    except BaseException:
        await upstream.abort()  # raises nothing but cancellation
        raise
    if refused:
        await upstream.abort()
        detail = "; ".join(f"<{r.address}> {r.reply}" for r in refused)
        raise ReleaseFailed(
            f"upstream refused {len(refused)} of {len(copy.recipients)} recipient(s): "
            f"{detail}; nothing was sent to anyone",
            stage="RCPT",
            reply=refused[0].reply,
            refused=tuple(refused),
        )
    try:
        reply = await upstream.data(copy.data)
    except UpstreamError as exc:
        raise ReleaseFailed(
            f"connection failed during DATA: {exc}; the upstream may or may not have accepted "
            "the message: check before releasing it again",
            stage="DATA",
            uncertain=True,
        ) from None
    if not reply.ok:
        raise ReleaseFailed(
            f"message refused: {reply}; nothing was sent", stage="DATA", reply=reply
        )
    return reply


async def release_held(
    store: SqlQuarantine,
    entry_id: int,
    relay: Relay,
    *,
    decided_by: str,
    force: bool = False,
    planner: DeliveryPlanner | None = None,
    custody: RemainderCustody | None = None,
) -> QuarantineEntry:
    """Claim entry ``entry_id``, release it, record the outcome; the entry as recorded (see
    :func:`release_and_record`)."""
    entry, _ = await release_and_record(
        store,
        entry_id,
        relay,
        decided_by=decided_by,
        force=force,
        planner=planner,
        custody=custody,
    )
    return entry


async def release_and_record(
    store: SqlQuarantine,
    entry_id: int,
    relay: Relay,
    *,
    decided_by: str,
    force: bool = False,
    planner: DeliveryPlanner | None = None,
    custody: RemainderCustody | None = None,
) -> tuple[QuarantineEntry, ReleaseReport | None]:
    """Claim entry ``entry_id``, release it (:func:`release` with ``planner`` and ``custody``),
    record the outcome: (the entry as recorded, the report -- None when the release failed).

    The returned entry's ``status`` is ``released`` (``upstream_reply``: the report, which names
    every recipient not delivered) or ``release-failed`` (``upstream_reply`` says why). Raises
    QuarantineNotFound / QuarantineStateError before anything is sent (unknown id; already
    released, deleted or being released -- ``force`` re-releases an entry whose earlier release
    was interrupted), StoreUnavailable. If the outcome cannot be recorded the entry stays
    ``releasing`` (its true state: possibly delivered) and StoreUnavailable is raised.
    """
    await store.mark(entry_id, RELEASING, decided_by=decided_by, force=force)
    try:
        entry = await store.get(entry_id)
        if entry is None:
            raise QuarantineNotFound(f"no quarantine entry {entry_id}")
        report = await release(entry, relay, planner=planner, custody=custody)
    except ReleaseFailed as exc:
        log.warning(
            "quarantine %d release failed (by %s) at %s%s",
            entry_id,
            decided_by,
            exc.stage,
            f": {len(exc.refused)} recipient(s) refused" if exc.refused else "",
        )
        try:
            recorded = await store.mark(
                entry_id,
                RELEASE_FAILED,
                decided_by=decided_by,
                upstream_reply=str(exc),
                force=force,  # recorded in the audit event
            )
        except GatewayError as store_error:
            raise StoreUnavailable(
                f"quarantine {entry_id} release failed ({exc}) and the outcome could not be "
                f"recorded, so it stays 'releasing': {store_error}"
            ) from None
        return recorded, None
    except GatewayError as exc:  # e.g. the database failed before anything was sent
        await _record_failure(store, entry_id, decided_by, f"not sent: {exc}")
        raise
    try:
        recorded = await store.mark(
            entry_id, RELEASED, decided_by=decided_by, upstream_reply=str(report), force=force
        )
    except GatewayError as exc:
        log.error(
            "quarantine %d was released (%d recipient(s) delivered) but the outcome could not be "
            "recorded; it stays 'releasing'",
            entry_id,
            report.delivered,
        )
        raise StoreUnavailable(
            f"quarantine {entry_id} WAS released ({report}) but the outcome could not "
            f"be recorded, so it stays 'releasing' -- do not release it again: {exc}"
        ) from None
    if report.complete and not report.queued:
        log.warning("quarantine %d released by %s", entry_id, decided_by)
    else:
        log.warning(
            "quarantine %d released by %s: %d of %d recipient(s) delivered, %d queued, "
            "%d refused by the upstream, %d not sent (encryption policy)",
            entry_id,
            decided_by,
            report.delivered,
            report.total,
            len(report.queued),
            len(report.refused),
            len(report.not_sent),
        )
    return recorded, report


async def _record_failure(store: SqlQuarantine, entry_id: int, by: str, detail: str) -> None:
    try:
        await store.mark(entry_id, RELEASE_FAILED, decided_by=by, upstream_reply=detail)
    except GatewayError as exc:
        log.error("quarantine %d stays 'releasing': %s", entry_id, exc)
