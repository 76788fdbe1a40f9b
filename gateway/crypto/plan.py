"""The encrypting delivery plan: which bytes go to which recipients once the ``encryption`` check
has decided, one upstream transaction per copy.

What it does: :class:`EncryptionPlanner` is the :class:`~gateway.core.ports.DeliveryPlanner` the
composition root gives the service. At RCPT time the ``encryption`` check
(:mod:`gateway.checks.encryption`) records one :class:`Choice` per accepted recipient in an
:class:`EncryptionState` (``txn.check_state["encryption"]``): the policy that applied and the key
to use (None: clear text). At end of data the planner turns those choices into copies:

* **No state** (the check is ``off``, not listed, or ``never`` for everyone: it records nothing),
  or the check in ``warn`` mode, or every choice clear text: one copy, the message as received --
  exactly what the service's one-copy plan does; no gpg, no key store.
* **Already encrypted** (:func:`~gateway.crypto.protect.is_encrypted`: top-level
  ``multipart/encrypted`` or enveloped ``application/pkcs7-mime``): one copy, unchanged; every
  recipient's audit note says ``pre-encrypted`` (a ``required`` recipient is satisfied by the
  sender's own encryption; it passed RCPT with a usable key all the same).
* **Otherwise**: each chosen key is checked again *now* (an expired key is never used, even if
  it expired between RCPT and the end of data); the OpenPGP keys are put in the gateway-owned
  GNUPGHOME (:meth:`gateway.keys.gpghome.KeyRing.ensure`: an import only when the store's
  material changed, no keyring listing per message); the recipients are grouped
  (:func:`~gateway.crypto.groups.group_recipients`: every encrypted Bcc recipient -- an envelope
  recipient not named in To/Cc -- gets a copy of its own, To/Cc recipients of one format share
  one, clear-text recipients share one); each group is encrypted in a worker thread
  (:func:`~gateway.crypto.encrypt_group`, one gpg process per OpenPGP copy, driven from a gpg
  worker process (:class:`~gateway.crypto.gpgpool.GpgPool`, ``keys.gpg_workers``) or with
  ``gpg_workers = 0`` from a worker thread; an S/MIME copy of at most
  :data:`INLINE_SMIME_BYTES` on the loop itself, cheaper than any hand-off); finally the keys
  used are marked (:meth:`gateway.keys.directory.KeyDirectory.mark_used`: a write at most once
  per ``keys.last_used_resolution`` per key). The copies are returned
  to the service, which sends each in its own upstream transaction and queues only these bytes
  (encryption happens before anything is queued: no clear text of an encrypted recipient's copy
  is ever written to the spool).

Failures never fall back to clear text: a key that is no longer usable, gpg or ``cryptography``
failing (:class:`~gateway.crypto.errors.EncryptionFailed`, ``451 4.3.0``) or the key store not
answering ``mark_used`` (``451 4.3.0`` key store unavailable) make the whole message deferred;
the client keeps it and tries again. The recipients' audit notes then say ``deferred`` and why.

Reads: the transaction's recipients and the check's state, the message bytes; the key material
carried by the choices; writes the GNUPGHOME (through the KeyRing) and ``last_used_at`` in the key
store.

Security notes: the message is held in memory only; neither it nor any key material reaches a
log or an exception (errors name fingerprints and steps). The envelope sender is never changed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Protocol

from cryptography import x509

from gateway.core import replies
from gateway.core.errors import GatewayError, StoreUnavailable
from gateway.core.model import (
    DeliveryCopy,
    Recipient,
    RecipientEncryption,
    Transaction,
    utcnow,
)
from gateway.crypto import encrypt_group
from gateway.crypto.errors import EncryptionFailed
from gateway.crypto.gpgpool import GpgPool
from gateway.crypto.groups import Decision, Format, Group, group_recipients, named_addresses
from gateway.crypto.pgpmime import GpgEngine
from gateway.crypto.protect import DEFAULT_PROTECTION, HeaderProtection, is_encrypted
from gateway.keys.gpg import GpgError, GpgUnavailable
from gateway.keys.gpghome import KeyRing
from gateway.keys.models import OPENPGP, SMIME
from gateway.keys.store import KeyRecord

log = logging.getLogger("mailward.crypto")
_DECISIONS_KEPT = 4096
#: S/MIME copies of messages up to this size are encrypted on the event loop (~80 µs for 2 KB
#: here, ~0.3 ms at the limit): cheaper than a worker-thread hand-off. Larger ones, and every
#: OpenPGP copy (a gpg process), go to a worker thread.
INLINE_SMIME_BYTES = 32 * 1024

#: the key of the check's state in ``Transaction.check_state`` (the check id)
STATE_KEY = "encryption"

NEVER = "never"
OPPORTUNISTIC = "opportunistic"
REQUIRED = "required"
#: The policies, weakest first.
POLICIES = (NEVER, OPPORTUNISTIC, REQUIRED)

ENCRYPTED = "encrypted"
CLEAR = "clear"
REFUSED = "refused"
DEFERRED = "deferred"
PRE_ENCRYPTED = "pre-encrypted"
#: The decisions an audit note records (see :class:`gateway.core.model.RecipientEncryption`).
DECISIONS = (ENCRYPTED, CLEAR, REFUSED, DEFERRED, PRE_ENCRYPTED)


@dataclass(frozen=True, slots=True)
class Choice:
    """The check's decision at RCPT for one accepted recipient: the ``policy`` that applied and
    the ``key`` to encrypt to (None: the recipient gets the message in clear text)."""

    policy: str
    key: KeyRecord | None = None

    @property
    def format(self) -> str:
        return self.key.kind if self.key is not None else ""


@dataclass(slots=True)
class EncryptionState:
    """The check's per-transaction state, read by :class:`EncryptionPlanner` at end of data.

    ``enforced`` is false in ``warn`` mode (nothing is encrypted, the notes say what would have
    been); ``protection`` is the header confidentiality policy (the Subject placeholder) that
    applies to the message's sender; ``choices`` maps each recipient address (as given at RCPT)
    to its :class:`Choice`."""

    enforced: bool = True
    protection: HeaderProtection = DEFAULT_PROTECTION
    hide_key_ids: bool = False
    choices: dict[str, Choice] = field(default_factory=dict)


class KeyUse(Protocol):
    """What the planner needs of the key store: record that a key was used
    (:meth:`gateway.keys.directory.KeyDirectory.mark_used`)."""

    async def mark_used(self, record: KeyRecord, now: datetime) -> None: ...


def smime_capable(record: KeyRecord) -> bool:
    """Whether the transform can encrypt to ``record``: every OpenPGP key the store returns, and
    RSA certificates only (``cryptography``'s CMS envelope builder has no EC key agreement)."""
    return record.kind == OPENPGP or (record.kind == SMIME and record.algorithm.startswith("rsa"))


def one_copy(txn: Transaction, wire: bytes) -> list[DeliveryCopy]:
    """Every accepted recipient (each once), the same bytes: the plan without encryption."""
    return [DeliveryCopy(tuple(dict.fromkeys(r.address for r in txn.accepted)), wire)]


def _note(rcpt: Recipient, decision: str, reason: str) -> None:
    """Replace the decision and reason of ``rcpt``'s audit note (policy, format, key kept)."""
    current = rcpt.encryption or RecipientEncryption(policy="", decision=decision)
    rcpt.encryption = dataclasses.replace(current, decision=decision, reason=reason)


class EncryptionPlanner:
    """The delivery planner that encrypts (see the module docstring). ``gpg`` is the program the
    :class:`~gateway.crypto.pgpmime.GpgEngine` runs; the engine is built on the first OpenPGP
    copy (so a gateway without gpg starts, and only OpenPGP recipients need it)."""

    def __init__(
        self,
        keyring: KeyRing,
        keys: KeyUse,
        *,
        gpg: str = "gpg",
        gpg_workers: int = 0,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.keyring = keyring
        self.keys = keys
        self.gpg = gpg
        self.clock = clock
        # OpenPGP copies in worker processes (gateway.crypto.gpgpool), or 0: worker threads here
        self._pool = GpgPool(gpg_workers) if gpg_workers > 0 else None
        self._engine: GpgEngine | None = None
        self._engine_lock = asyncio.Lock()
        # parsed certificates per (fingerprint, material digest): parsing is per key, not per copy
        self._decisions: dict[tuple[str, str], Decision] = {}

    async def __call__(self, txn: Transaction, wire: bytes) -> Sequence[DeliveryCopy]:
        state = txn.check_state.get(STATE_KEY)
        if not isinstance(state, EncryptionState) or not state.enforced:
            return one_copy(txn, wire)
        accepted = txn.accepted
        choices: dict[str, Choice] = {}
        for rcpt in accepted:
            choice = state.choices.get(rcpt.address)
            if choice is None:  # never silently clear: a recipient the check did not judge
                self._fail_notes(accepted, "no encryption decision was made for a recipient")
                raise EncryptionFailed("no encryption decision for an accepted recipient")
            choices[rcpt.address] = choice
        if all(choice.key is None for choice in choices.values()):
            return one_copy(txn, wire)
        if is_encrypted(wire):
            for rcpt in accepted:
                _note(rcpt, PRE_ENCRYPTED, "the message arrived encrypted; passed unchanged")
            return one_copy(txn, wire)
        try:
            return await self._encrypt(txn, wire, state, choices)
        except GatewayError as exc:
            self._fail_notes(accepted, str(exc))
            raise

    @staticmethod
    def _fail_notes(accepted: Sequence[Recipient], why: str) -> None:
        for rcpt in accepted:
            if rcpt.encryption is not None and rcpt.encryption.decision == ENCRYPTED:
                _note(rcpt, DEFERRED, f"encryption failed: {why}")

    async def _encrypt(
        self, txn: Transaction, wire: bytes, state: EncryptionState, choices: dict[str, Choice]
    ) -> list[DeliveryCopy]:
        now = self.clock()
        decisions: dict[str, Decision] = {}
        used: dict[str, KeyRecord] = {}
        for address, choice in choices.items():
            key = choice.key
            if key is None:
                decisions[address] = Decision.clear()
                continue
            if not key.is_usable(now):
                raise EncryptionFailed(
                    f"key {key.fingerprint} is {key.state(now)} now (chosen at RCPT time)"
                )
            decisions[address] = self._decision_for(key)
            used[key.fingerprint] = key
        openpgp = [key for key in used.values() if key.kind == OPENPGP]
        engine: GpgEngine | None = None
        if openpgp:
            try:
                await self.keyring.ensure(openpgp)
            except (GpgError, GpgUnavailable, OSError) as exc:
                raise EncryptionFailed(
                    f"the gateway keyring could not be updated: {type(exc).__name__}"
                ) from exc
            engine = await self._gpg_engine()
        envelope = list(dict.fromkeys(r.address for r in txn.accepted))
        # the header section the service parsed at end of data (the same To/Cc as ``wire``)
        named = named_addresses(txn.headers if txn.headers is not None else wire)
        groups = group_recipients(envelope, named, decisions, hide_key_ids=state.hide_key_ids)
        home: GpgEngine | Path = engine if engine is not None else self.keyring.path
        datas = await asyncio.gather(
            *(self._encrypted(wire, group, home, state.protection) for group in groups)
        )
        await self._mark_used(list(used.values()), now)
        log.info(
            "txn=%s: %d cop%s (%d encrypted) for %d recipient(s)",
            txn.id,
            len(groups),
            "y" if len(groups) == 1 else "ies",
            sum(1 for g in groups if g.format is not Format.CLEAR),
            len(envelope),
        )
        return [
            DeliveryCopy(group.recipients, data) for group, data in zip(groups, datas, strict=True)
        ]

    async def close(self) -> None:
        """Stop the gpg worker processes, if any (after the sessions have drained)."""
        if self._pool is not None:
            await self._pool.close()

    async def _encrypted(
        self, wire: bytes, group: Group, home: GpgEngine | Path, protection: HeaderProtection
    ) -> bytes:
        """One group's bytes: OpenPGP in a gpg worker process (or a worker thread when there
        are none), a small S/MIME copy on the loop (cheaper than any hand-off), a large one in a
        worker thread."""
        if group.format is Format.CLEAR:
            return wire
        if group.format is Format.SMIME and len(wire) <= INLINE_SMIME_BYTES:
            return encrypt_group(wire, group, gnupg_home=home, protection=protection)
        if group.format is Format.OPENPGP and self._pool is not None:
            assert isinstance(home, GpgEngine)
            return await self._pool.encrypt(wire, group, home, protection)
        return await asyncio.to_thread(
            encrypt_group, wire, group, gnupg_home=home, protection=protection
        )

    def _decision_for(self, key: KeyRecord) -> Decision:
        """:meth:`_decision`, remembered per key material (a parsed certificate is reused)."""
        cache_key = (key.fingerprint, key.material_sha256)
        decision = self._decisions.get(cache_key)
        if decision is None:
            decision = self._decision(key)
            if len(self._decisions) >= _DECISIONS_KEPT:
                del self._decisions[next(iter(self._decisions))]
            self._decisions[cache_key] = decision
        return decision

    @staticmethod
    def _decision(key: KeyRecord) -> Decision:
        if key.kind == OPENPGP:
            return Decision.openpgp(key.fingerprint)
        if key.material is None or not smime_capable(key):
            raise EncryptionFailed(f"certificate {key.fingerprint} cannot be encrypted to")
        try:
            certificate = x509.load_der_x509_certificate(key.material)
        except ValueError as exc:
            raise EncryptionFailed(f"certificate {key.fingerprint} is unreadable") from exc
        return Decision.smime(certificate)

    async def _gpg_engine(self) -> GpgEngine:
        async with self._engine_lock:
            if self._engine is None:
                self._engine = await asyncio.to_thread(
                    GpgEngine, self.keyring.path, binary=self.gpg
                )
            return self._engine

    async def _mark_used(self, records: list[KeyRecord], now: datetime) -> None:
        try:
            await asyncio.gather(*(self.keys.mark_used(record, now) for record in records))
        except StoreUnavailable as exc:
            log.error("key store unavailable when marking keys used: %s", exc)
            raise StoreUnavailable(
                f"key store unavailable: {exc}", reply=replies.KEY_STORE_UNAVAILABLE
            ) from None


__all__ = [
    "CLEAR",
    "DECISIONS",
    "DEFERRED",
    "ENCRYPTED",
    "NEVER",
    "OPPORTUNISTIC",
    "POLICIES",
    "PRE_ENCRYPTED",
    "REFUSED",
    "REQUIRED",
    "STATE_KEY",
    "Choice",
    "EncryptionPlanner",
    "EncryptionState",
    "KeyUse",
    "one_copy",
    "smime_capable",
]
