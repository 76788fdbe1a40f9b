"""Release a held message: relay its stored bytes with its original envelope, record the outcome.

What it does: :func:`release` sends one quarantine entry through a
:class:`~gateway.core.ports.Relay` exactly as it was held: MAIL FROM with the original SMTPUTF8 /
8BITMIME flags (and SIZE), RCPT TO for every recipient, then DATA with the stored bytes. It is all
or nothing: when the upstream refuses any recipient, RCPT is still tried for every one (so the
failure names each refused recipient with the upstream's reply) and the transaction is aborted
before DATA, so nothing is delivered to anyone; the entry can be released again later.
:func:`release_held` is the operator action (CLI, later a web UI): it claims the entry (status
``releasing``, atomically: a concurrent or repeated release fails before anything is sent), calls
:func:`release` and records ``released`` or ``release-failed`` with the upstream's reply.

Reads: the quarantine store; talks to the upstream through the relay it is given.

Security notes: the message bytes and the envelope addresses are never logged (the log says which
entry was released or failed, by whom and at which stage); the recorded ``upstream_reply`` and the
error text name the refused recipients, for the operator. The stored bytes are checked against
their recorded size and SHA-256 before anything is sent.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from gateway.core.errors import GatewayError, StoreUnavailable, UpstreamError
from gateway.core.message import sha256_hex
from gateway.core.ports import Relay, UpstreamReply, UpstreamTransaction
from gateway.quarantine.models import RELEASE_FAILED, RELEASED, RELEASING
from gateway.quarantine.store import QuarantineEntry, QuarantineNotFound, SqlQuarantine

log = logging.getLogger("mailward.quarantine")


@dataclass(frozen=True, slots=True)
class RefusedRecipient:
    address: str
    reply: UpstreamReply


class ReleaseFailed(GatewayError):
    """The message was not delivered. ``stage`` is where it failed ("integrity", "MAIL", "RCPT",
    "DATA", or "connection" when the upstream could not be used); ``reply`` is the upstream's
    decisive reply when there was one; ``refused`` lists every refused recipient (stage RCPT).
    ``uncertain`` is true when the connection failed after the message was (perhaps) sent: the
    upstream may have it. ``str()`` is the one-line summary recorded as ``upstream_reply``."""

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


async def release(entry: QuarantineEntry, relay: Relay) -> UpstreamReply:
    """Relay the held bytes of ``entry`` with its envelope; the upstream's reply to the message.

    Every recipient must be accepted, else nothing is sent. Raises :class:`ReleaseFailed` for any
    failure (refusal, unreachable upstream, bytes missing or not matching their SHA-256).
    """
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
    try:
        answer, upstream = await relay.begin(
            entry.mail_from,
            smtputf8=entry.smtputf8,
            body_8bitmime=entry.body_8bitmime,
            size=len(message),
        )
    except UpstreamError as exc:
        raise ReleaseFailed(f"upstream not usable: {exc}", stage="connection") from None
    if upstream is None:
        raise ReleaseFailed(
            f"MAIL FROM refused: {answer}; nothing was sent", stage="MAIL", reply=answer
        )
    return await _recipients_then_data(entry, message, upstream)


async def _recipients_then_data(
    entry: QuarantineEntry, message: bytes, upstream: UpstreamTransaction
) -> UpstreamReply:
    refused: list[RefusedRecipient] = []
    try:
        for address in entry.recipients:
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
            f"upstream refused {len(refused)} of {len(entry.recipients)} recipient(s): "
            f"{detail}; nothing was sent to anyone",
            stage="RCPT",
            reply=refused[0].reply,
            refused=tuple(refused),
        )
    try:
        reply = await upstream.data(message)
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
    store: SqlQuarantine, entry_id: int, relay: Relay, *, decided_by: str, force: bool = False
) -> QuarantineEntry:
    """Claim entry ``entry_id``, release it, record the outcome; the entry as recorded.

    The returned entry's ``status`` is ``released`` or ``release-failed`` (``upstream_reply``
    says why). Raises QuarantineNotFound / QuarantineStateError before anything is sent (unknown
    id; already released, deleted or being released -- ``force`` re-releases an entry whose
    earlier release was interrupted), StoreUnavailable. If the outcome cannot be recorded the
    entry stays ``releasing`` (its true state: possibly delivered) and StoreUnavailable is raised.
    """
    await store.mark(entry_id, RELEASING, decided_by=decided_by, force=force)
    try:
        entry = await store.get(entry_id)
        if entry is None:
            raise QuarantineNotFound(f"no quarantine entry {entry_id}")
        reply = await release(entry, relay)
    except ReleaseFailed as exc:
        log.warning(
            "quarantine %d release failed (by %s) at %s%s",
            entry_id,
            decided_by,
            exc.stage,
            f": {len(exc.refused)} recipient(s) refused" if exc.refused else "",
        )
        try:
            return await store.mark(
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
    except GatewayError as exc:  # e.g. the database failed before anything was sent
        await _record_failure(store, entry_id, decided_by, f"not sent: {exc}")
        raise
    try:
        recorded = await store.mark(
            entry_id, RELEASED, decided_by=decided_by, upstream_reply=str(reply), force=force
        )
    except GatewayError as exc:
        log.error(
            "quarantine %d was released (upstream: %s) but the outcome could not be recorded; "
            "it stays 'releasing'",
            entry_id,
            reply,
        )
        raise StoreUnavailable(
            f"quarantine {entry_id} WAS released (upstream: {reply}) but the outcome could not "
            f"be recorded, so it stays 'releasing' -- do not release it again: {exc}"
        ) from None
    log.warning("quarantine %d released by %s", entry_id, decided_by)
    return recorded


async def _record_failure(store: SqlQuarantine, entry_id: int, by: str, detail: str) -> None:
    try:
        await store.mark(entry_id, RELEASE_FAILED, decided_by=by, upstream_reply=detail)
    except GatewayError as exc:
        log.error("quarantine %d stays 'releasing': %s", entry_id, exc)
