"""Check ``encryption``: per-recipient encryption policy, decided at RCPT time.

What it does: for each recipient, finds the policy that applies -- ``never`` (clear text, no key
lookup), ``opportunistic`` (encrypt when the key store has a usable key, else clear text) or
``required`` (encrypt, or refuse the recipient) -- and, unless ``never``, looks up the recipient's
usable keys (:meth:`gateway.keys.store.SqlKeyStore.usable_keys`: expiry and revocation checked
at that moment) and chooses one. The choice is kept in ``txn.check_state["encryption"]``
(:class:`gateway.crypto.plan.EncryptionState`) for the delivery planner
(:class:`gateway.crypto.plan.EncryptionPlanner`), which encrypts at end of data, and on the
recipient as its audit note (:class:`gateway.core.model.RecipientEncryption`).

Policy, from the most specific rule (``[checks.encryption]``):

1. The *recipient side*: ``recipients."<address>"``, else ``recipient_domains."<domain>"``.
2. The *sender side*: ``logins."<login>"`` (the authenticated login), else
   ``sender_domains."<domain>"`` (the envelope sender's domain).
3. ``required`` on either side wins (a requirement is never weakened by the other side's rule);
   otherwise the recipient side if it sets a policy, else the sender side, else ``default``.
   That is: recipient address > recipient domain > login > sender domain > default, with
   ``required`` winning over ``opportunistic`` and ``never`` whichever side says it.

``prefer`` (``openpgp`` or ``smime``), used when a recipient has usable keys of both kinds,
follows the plain order recipient address > recipient domain > login > sender domain > default.
``subject_placeholder`` (the outer Subject of an encrypted copy) is the sender's: login >
sender domain > default (one message, one placeholder for all its copies). Rule keys are
canonicalised like recipients (:func:`gateway.keys.address.canonical_address` /
:func:`~gateway.keys.address.canonical_domain`; a key that cannot be is a configuration error).

Answers at RCPT:

* ``553 5.1.3`` (:data:`~gateway.core.replies.ENCRYPTION_ADDRESS_REFUSED`): the recipient's
  policy is not ``never`` but its address cannot be canonicalised (percent hack, source route,
  quoted local part, an ambiguous IDN label, ...): it could miss its key, so it is neither
  looked up nor sent in clear.
* ``550 5.7.5`` (:data:`~gateway.core.replies.ENCRYPTION_KEY_MISSING`): ``required`` and no
  usable key; the reply says why (no key stored, or how many are expired, revoked, not yet
  valid, or certificates the gateway cannot encrypt to).
* ``451 4.3.0`` (:data:`~gateway.core.replies.KEY_STORE_UNAVAILABLE`): the key store could not
  be read; never a clear-text fallback.

When the default is ``never`` and no rule names another policy, the check returns at once: no
canonicalisation, no state, no lookup (the planner then makes the one-copy plan).

Modes: in ``warn`` mode the lookups run and the audit notes say what would have happened
("warn mode, not applied: ..."), but nothing is refused and nothing is encrypted. ``on_error =
"continue"`` is refused at configuration time: a failing check must never let a recipient pass
without a decision (the planner would defer it anyway).

Outside an SMTP session: a message taken in earlier and delivered now -- a held message being
released from the quarantine -- is judged by the same check at that moment.
:func:`rcpt_stage` builds this check alone as the configuration runs it at RCPT (listed or not,
mode, timeout, ``soft_fail``, options); :func:`decide_recipients` judges every accepted recipient
with it (a refused recipient becomes ``rejected`` with its reply, never sent; a temporary verdict
-- key store unavailable, the check failing or timing out -- raises
:class:`~gateway.core.errors.CheckFailed`: nothing may be sent); :func:`stored_message_planner`
makes that the first step of a delivery planner (the encrypting one), so the copies follow from
the policy and the keys *now*, exactly as for live mail.

Reads: the recipient, the envelope sender, the session's login, the key store.

Security notes: addresses appear in replies (sanitised by the catalog) and audit notes, never in
logs at INFO; key material stays in memory (the planner needs it for S/MIME and for the keyring).
"""

from __future__ import annotations

import builtins
import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, Protocol

from gateway.config.schema import Config
from gateway.config.typed import doc_field
from gateway.core import replies
from gateway.core.errors import CheckFailed, ConfigError, StoreUnavailable
from gateway.core.model import (
    CONTINUE,
    DeliveryCopy,
    Recipient,
    RecipientEncryption,
    RecipientStatus,
    Stage,
    Transaction,
    Verdict,
    utcnow,
)
from gateway.core.ports import DeliveryPlanner
from gateway.crypto.plan import (
    CLEAR,
    DEFERRED,
    ENCRYPTED,
    NEVER,
    OPPORTUNISTIC,
    REFUSED,
    REQUIRED,
    STATE_KEY,
    Choice,
    EncryptionState,
    smime_capable,
)
from gateway.crypto.protect import DEFAULT_PLACEHOLDER, HeaderProtection
from gateway.keys.address import InvalidAddress, canonical_address, canonical_domain
from gateway.keys.models import OPENPGP, SMIME
from gateway.keys.store import KeyRecord
from gateway.pipeline.registry import CheckSpec, split_settings
from gateway.pipeline.runner import ConfiguredCheck, Pipeline

log = logging.getLogger("mailward.checks.encryption")

CHECK_ID = STATE_KEY

PolicyName = Literal["never", "opportunistic", "required"]
RulePolicy = Literal["", "never", "opportunistic", "required"]
FormatName = Literal["openpgp", "smime"]
RuleFormat = Literal["", "openpgp", "smime"]


class KeyLookup(Protocol):
    """What the check needs of the key store (:class:`gateway.keys.store.SqlKeyStore`)."""

    async def usable_keys(
        self, address: str, *, now: datetime, kind: str | None = None
    ) -> builtins.list[KeyRecord]: ...

    async def list(
        self, address: str | None = None, *, kind: str | None = None
    ) -> builtins.list[KeyRecord]: ...


class _NoKeyStore:
    """Stands in when the pipeline is built only to validate the configuration."""

    async def usable_keys(
        self, address: str, *, now: datetime, kind: str | None = None
    ) -> builtins.list[KeyRecord]:
        raise StoreUnavailable("no key store configured")

    async def list(
        self, address: str | None = None, *, kind: str | None = None
    ) -> builtins.list[KeyRecord]:
        raise StoreUnavailable("no key store configured")


@dataclass(frozen=True)
class RecipientRule:
    policy: RulePolicy = doc_field(
        "", "Policy for this recipient or domain; empty: not set here (the next rule decides)."
    )
    prefer: RuleFormat = doc_field(
        "", "Format when both kinds of key exist; empty: not set here (the next rule decides)."
    )


@dataclass(frozen=True)
class SenderRule:
    policy: RulePolicy = doc_field(
        "", "Policy for mail from this login or sender domain; empty: not set here."
    )
    prefer: RuleFormat = doc_field(
        "", "Format when both kinds of key exist; empty: not set here (the next rule decides)."
    )
    subject_placeholder: str = doc_field(
        "", "Outer Subject of encrypted copies of this sender's mail; empty: not set here."
    )


@dataclass(frozen=True)
class Options:
    default: PolicyName = doc_field(
        "never",
        "Policy when no rule applies: `never` (clear text, no key lookup), `opportunistic` "
        "(encrypt when a usable key exists, else clear text) or `required` (no usable key: the "
        "recipient is refused at RCPT with 550 5.7.5).",
    )
    prefer: FormatName = doc_field(
        "openpgp", "Format used when a recipient has usable keys of both kinds."
    )
    subject_placeholder: str = doc_field(
        DEFAULT_PLACEHOLDER,
        "Outer Subject of an encrypted copy (RFC 9788 header protection; the real Subject is "
        "inside). One printable line of at most 200 characters.",
    )
    hide_key_ids: bool = doc_field(
        False,
        "Hide the key IDs of To/Cc recipients in OpenPGP copies too (`--throw-keyids`). Bcc "
        "recipients always get a copy of their own, whatever this says.",
    )
    recipients: dict[str, RecipientRule] = doc_field(
        {},
        'Rules per recipient address: `[checks.encryption.recipients."bob@example.org"]` with '
        "`policy` and/or `prefer`. Addresses are canonicalised (domain case, IDN).",
    )
    recipient_domains: dict[str, RecipientRule] = doc_field(
        {}, 'Rules per recipient domain: `[checks.encryption.recipient_domains."example.org"]`.'
    )
    logins: dict[str, SenderRule] = doc_field(
        {},
        'Rules per authenticated login: `[checks.encryption.logins."alice@example.com"]` with '
        "`policy`, `prefer` and/or `subject_placeholder`.",
    )
    sender_domains: dict[str, SenderRule] = doc_field(
        {},
        'Rules per envelope sender domain: `[checks.encryption.sender_domains."example.com"]`.',
    )

    def validate(self) -> None:
        placeholders = [("subject_placeholder", self.subject_placeholder)]
        for where, table in (("logins", self.logins), ("sender_domains", self.sender_domains)):
            placeholders += [
                (f"{where}.{name}.subject_placeholder", rule.subject_placeholder)
                for name, rule in table.items()
                if rule.subject_placeholder
            ]
        for key, text in placeholders:
            try:
                HeaderProtection(placeholder_subject=text)
            except ValueError as exc:
                raise ConfigError("", key, str(exc)) from None
        _canonical_keys(self.recipients, canonical_address, "recipients")
        _canonical_keys(self.recipient_domains, canonical_domain, "recipient_domains")
        _canonical_keys(self.sender_domains, canonical_domain, "sender_domains")
        lowered = [name.lower() for name in self.logins]
        if len(set(lowered)) != len(lowered):
            raise ConfigError("", "logins", "a login is listed twice (logins ignore case)")


def _canonical_keys(
    table: Mapping[str, Any], canonical: Callable[[str], str], where: str
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, rule in table.items():
        try:
            key = canonical(name)
        except InvalidAddress as exc:
            raise ConfigError(
                "", f"{where}.{name}", f"cannot be canonicalised: {exc.reason}"
            ) from None
        if key in out:
            raise ConfigError("", f"{where}.{name}", f"the same as another entry ({key})")
        out[key] = rule
    return out


@dataclass(frozen=True, slots=True)
class _Resolved:
    policy: str
    prefer: str
    source: str  # which rule decided the policy, for the audit reason


def _sender_domain(mail_from: str) -> str | None:
    _, at, domain = mail_from.rpartition("@")
    if not at:
        return None
    try:
        return canonical_domain(domain)
    except InvalidAddress:
        return None


class Encryption:
    id = CHECK_ID
    stages = frozenset({Stage.RCPT})

    def __init__(
        self,
        options: Options,
        keys: KeyLookup,
        *,
        enforced: bool = True,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.options = options
        self.keys = keys
        self.enforced = enforced
        self.clock = clock
        self.recipients: dict[str, RecipientRule] = _canonical_keys(
            options.recipients, canonical_address, "recipients"
        )
        self.recipient_domains: dict[str, RecipientRule] = _canonical_keys(
            options.recipient_domains, canonical_domain, "recipient_domains"
        )
        self.logins: dict[str, SenderRule] = {k.lower(): v for k, v in options.logins.items()}
        self.sender_domains: dict[str, SenderRule] = _canonical_keys(
            options.sender_domains, canonical_domain, "sender_domains"
        )
        rules: list[RecipientRule | SenderRule] = [
            *self.recipients.values(),
            *self.recipient_domains.values(),
            *self.logins.values(),
            *self.sender_domains.values(),
        ]
        #: nothing but ``never`` anywhere: the check does nothing at all
        self.idle = options.default == NEVER and all(r.policy in ("", NEVER) for r in rules)
        self._protections: dict[str, HeaderProtection] = {}

    # --- policy ------------------------------------------------------------------------------

    def _sender_rules(self, txn: Transaction) -> list[tuple[str, SenderRule]]:
        found: list[tuple[str, SenderRule]] = []
        login = txn.session.login
        if login and login.lower() in self.logins:
            found.append((f"login {login.lower()}", self.logins[login.lower()]))
        domain = _sender_domain(txn.mail_from)
        if domain is not None and domain in self.sender_domains:
            found.append((f"sender domain {domain}", self.sender_domains[domain]))
        return found

    def resolve(self, txn: Transaction, canonical: str | None, domain: str | None) -> _Resolved:
        """The policy and preferred format for one recipient (see the module docstring)."""
        recipient_side: list[tuple[str, RecipientRule | SenderRule]] = []
        if canonical is not None and canonical in self.recipients:
            recipient_side.append((f"recipient {canonical}", self.recipients[canonical]))
        if domain is not None and domain in self.recipient_domains:
            recipient_side.append((f"recipient domain {domain}", self.recipient_domains[domain]))
        sender_side: list[tuple[str, RecipientRule | SenderRule]] = list(self._sender_rules(txn))

        def first(side: list[tuple[str, RecipientRule | SenderRule]]) -> tuple[str, str] | None:
            return next(((r.policy, src) for src, r in side if r.policy), None)

        by_recipient, by_sender = first(recipient_side), first(sender_side)
        if by_recipient is not None and by_recipient[0] == REQUIRED:
            policy, source = by_recipient
        elif by_sender is not None and by_sender[0] == REQUIRED:
            policy, source = by_sender
        elif by_recipient is not None:
            policy, source = by_recipient
        elif by_sender is not None:
            policy, source = by_sender
        else:
            policy, source = self.options.default, "default"
        prefer = next(
            (r.prefer for _, r in (*recipient_side, *sender_side) if r.prefer),
            self.options.prefer,
        )
        return _Resolved(policy, prefer, source)

    def protection(self, txn: Transaction) -> HeaderProtection:
        """The header confidentiality policy of this transaction's sender."""
        text = next(
            (r.subject_placeholder for _, r in self._sender_rules(txn) if r.subject_placeholder),
            self.options.subject_placeholder,
        )
        found = self._protections.get(text)
        if found is None:
            found = self._protections[text] = HeaderProtection(placeholder_subject=text)
        return found

    # --- the check ---------------------------------------------------------------------------

    def _state(self, txn: Transaction) -> EncryptionState:
        state = txn.check_state.get(STATE_KEY)
        if not isinstance(state, EncryptionState):
            state = EncryptionState(
                enforced=self.enforced,
                protection=self.protection(txn),
                hide_key_ids=self.options.hide_key_ids,
            )
            txn.check_state[STATE_KEY] = state
        return state

    async def evaluate(self, stage: Stage, txn: Transaction, rcpt: Recipient | None) -> Verdict:
        if self.idle or rcpt is None:
            return CONTINUE
        state = self._state(txn)
        address = rcpt.address
        canonical: str | None
        invalid: str | None = None
        try:
            canonical = canonical_address(address)
            domain: str | None = canonical.rpartition("@")[2]
        except InvalidAddress as exc:
            canonical, invalid = None, exc.reason
            _, _, raw_domain = address.rpartition("@")
            try:
                domain = canonical_domain(raw_domain)
            except InvalidAddress:
                domain = None
        resolved = self.resolve(txn, canonical, domain)
        policy, why = resolved.policy, f"policy {resolved.policy} ({resolved.source})"
        if policy == NEVER:
            return self._clear(state, rcpt, policy, why)
        if canonical is None:
            reason = f"{why}; the address cannot be canonicalised: {invalid}"
            return self._refuse(
                state,
                rcpt,
                policy,
                reason,
                Verdict.reject(
                    replies.ENCRYPTION_ADDRESS_REFUSED.format(address=address, why=invalid),
                    reason,
                    measured=address,
                ),
            )
        try:
            found = await self.keys.usable_keys(canonical, now=self.clock())
        except StoreUnavailable as exc:
            log.error("key store unavailable at RCPT txn=%s: %s", txn.id, exc)
            reason = f"{why}; key store unavailable"
            note = RecipientEncryption(policy, DEFERRED, reason=reason)
            verdict = Verdict.defer(replies.KEY_STORE_UNAVAILABLE, reason)
            return self._decided(state, rcpt, policy, note, verdict)
        key = self._choose([r for r in found if smime_capable(r)], resolved.prefer)
        if key is not None:
            reason = f"{why}; usable {key.kind} key ({key.verification})"
            note = RecipientEncryption(policy, ENCRYPTED, key.kind, key.fingerprint, reason)
            if not self.enforced:
                note = RecipientEncryption(
                    policy,
                    CLEAR,
                    reason=f"warn mode, not applied: would have encrypted ({key.kind} "
                    f"{key.fingerprint})",
                )
                key = None
            rcpt.encryption = note
            state.choices[address] = Choice(policy, key)
            return CONTINUE
        if policy == OPPORTUNISTIC:
            return self._clear(state, rcpt, policy, f"{why}; no usable key")
        missing = await self._missing(canonical, found)
        reason = f"{why}; no usable key: {missing}"
        return self._refuse(
            state,
            rcpt,
            policy,
            reason,
            Verdict.reject(
                replies.ENCRYPTION_KEY_MISSING.format(address=address, why=missing),
                reason,
                measured=missing,
            ),
        )

    @staticmethod
    def _choose(records: list[KeyRecord], prefer: str) -> KeyRecord | None:
        """The store returns the preferred key of each kind first (verified, newest)."""
        by_kind = {
            kind: next((r for r in records if r.kind == kind), None) for kind in (OPENPGP, SMIME)
        }
        other = SMIME if prefer == OPENPGP else OPENPGP
        return by_kind.get(prefer) or by_kind.get(other)

    async def _missing(self, canonical: str, usable: list[KeyRecord]) -> str:
        """Why a recipient has no usable key, in words (for the 5.7.5 reply and the audit)."""
        now = self.clock()
        try:
            stored = await self.keys.list(canonical)
        except StoreUnavailable:
            return "none usable"
        if not stored:
            return "none is stored for this address"
        states = Counter(r.state(now) for r in stored)
        unusable = sum(1 for r in usable if not smime_capable(r))
        if unusable:
            states["usable"] -= unusable
            states["not encryptable (EC certificate)"] += unusable
        parts = [f"{n} {state}" for state, n in sorted(states.items()) if n > 0]
        return "stored key(s): " + ", ".join(parts)

    def _clear(self, state: EncryptionState, rcpt: Recipient, policy: str, reason: str) -> Verdict:
        rcpt.encryption = RecipientEncryption(policy, CLEAR, reason=reason)
        state.choices[rcpt.address] = Choice(policy, None)
        return CONTINUE

    def _refuse(
        self, state: EncryptionState, rcpt: Recipient, policy: str, reason: str, verdict: Verdict
    ) -> Verdict:
        return self._decided(
            state, rcpt, policy, RecipientEncryption(policy, REFUSED, reason=reason), verdict
        )

    def _decided(
        self,
        state: EncryptionState,
        rcpt: Recipient,
        policy: str,
        note: RecipientEncryption,
        verdict: Verdict,
    ) -> Verdict:
        """A refusal (or deferral) of the recipient; in warn mode it passes in clear text."""
        if self.enforced:
            rcpt.encryption = note
            state.choices.pop(rcpt.address, None)
            return verdict
        self._clear(
            state,
            rcpt,
            policy,
            f"warn mode, not applied: would have been {note.decision}: {note.reason}",
        )
        return verdict


def _factory(options: Any, deps: Any) -> Encryption:
    config = getattr(deps, "config", None)
    raw: Mapping[str, Any] = config.checks.get(CHECK_ID, {}) if config is not None else {}
    if raw.get("on_error", raw.get("on-error")) == "continue":
        raise ConfigError(
            "configuration",
            f"checks.{CHECK_ID}.on_error",
            '"continue" would let a recipient through without an encryption decision; use "defer"',
        )
    keys = getattr(deps, "key_store", None)
    return Encryption(
        options,
        keys if keys is not None else _NoKeyStore(),
        enforced=raw.get("mode", "enforce") != "warn",
    )


SPEC = CheckSpec(
    id=Encryption.id,
    stages=Encryption.stages,
    options=Options,
    factory=_factory,
    doc="Per-recipient encryption policy (never, opportunistic, required) and key choice at "
    "RCPT; the delivery planner encrypts at end of data (OpenPGP PGP/MIME or S/MIME).",
)


# --- a message that is not in an SMTP session now (a held message being released) ---------------


@dataclass(frozen=True, slots=True)
class _Deps:
    """What :func:`_factory` reads: the configuration and the key store."""

    config: Config
    key_store: KeyLookup


def rcpt_stage(config: Config, keys: KeyLookup) -> Pipeline:
    """This check alone, as ``config`` runs it at RCPT: its mode, timeout, ``on_error`` and
    options, and ``pipeline.soft_fail``. Without the check in ``pipeline.rcpt`` the stage is empty
    and judges nobody (live mail is then not encrypted either). Raises ConfigError."""
    stages: dict[Stage, list[ConfiguredCheck]] = {}
    if CHECK_ID in config.pipeline.rcpt:
        settings, options = split_settings(
            CHECK_ID, config.checks.get(CHECK_ID, {}), SPEC, "configuration"
        )
        check = _factory(options, _Deps(config, keys))
        stages[Stage.RCPT] = [ConfiguredCheck.from_settings(check, settings)]
    return Pipeline(stages, soft_fail=config.pipeline.soft_fail)


async def decide_recipients(stage: Pipeline, txn: Transaction) -> None:
    """Judge every accepted recipient of ``txn`` now, as at RCPT (``stage`` from
    :func:`rcpt_stage`): the decisions go to the check's state and the recipients' audit notes;
    a refused recipient (``550 5.7.5``, ``553 5.1.3``) becomes ``rejected`` with its reply.

    Raises CheckFailed (the verdict's reply: key store unavailable, the check failed or timed
    out) when a recipient cannot be decided now: then nothing of the message may be sent."""
    for rcpt in txn.accepted:
        verdict = await stage.run(Stage.RCPT, txn, rcpt)
        if not verdict.decisive or verdict.reply is None:
            continue
        if verdict.reply.is_temporary:
            raise CheckFailed(
                f"recipient <{rcpt.address}> cannot be decided now: {verdict.reason}",
                reply=verdict.reply,
            )
        rcpt.status, rcpt.reply = RecipientStatus.REJECTED, verdict.reply.line()


def stored_message_planner(stage: Pipeline, planner: DeliveryPlanner) -> DeliveryPlanner:
    """The delivery planner of a message that did not come through RCPT now (a held message
    being released): :func:`decide_recipients`, then ``planner`` (the
    :class:`~gateway.crypto.plan.EncryptionPlanner`) over the recipients still accepted. An
    empty plan when every recipient was refused. Raises CheckFailed and what ``planner`` raises."""

    async def plan(txn: Transaction, wire: bytes) -> Sequence[DeliveryCopy]:
        await decide_recipients(stage, txn)
        if not txn.accepted:
            return []
        return await planner(txn, wire)

    return plan
