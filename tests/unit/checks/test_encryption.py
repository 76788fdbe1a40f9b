"""Check ``encryption``: policy precedence, preferred format, placeholders, options validation.

What it tests: :meth:`Encryption.resolve` over every combination of rules (recipient address >
recipient domain > login > sender domain > default, ``required`` on either side winning, ``prefer``
in plain order), rule keys canonicalised like recipients (case, IDN), the sender's subject
placeholder, the idle check (``never`` everywhere: no state, no key lookup -- the key store here
fails every call), the decision for an address that cannot be canonicalised, the warn-mode
notes, and configuration errors (bad placeholder, a rule key that cannot be canonicalised, a
duplicate after canonicalisation, ``on_error = "continue"``).

Reads: nothing (the key lookups that do happen are answered by a store that is down, as a real
one would be: :class:`StoreUnavailable`; round trips with the real store are in
``tests/integration/test_encryption.py``).

Security notes: the cases where a recipient must not get clear text are asserted explicitly.
"""

from __future__ import annotations

import builtins
from datetime import datetime
from typing import Any

import pytest

from gateway.app import make_pipeline
from gateway.checks.encryption import CHECK_ID, Encryption, Options
from gateway.config import load_config
from gateway.config.typed import build
from gateway.core.errors import ConfigError, StoreUnavailable
from gateway.core.model import Action, Identity, Recipient, Session, Stage, Transaction
from gateway.crypto.plan import STATE_KEY, EncryptionState
from gateway.keys.address import canonical_address
from gateway.keys.store import KeyRecord


class DownStore:
    """A key store that cannot be read (what SqlKeyStore raises when its database is down);
    counts the calls so a test can tell no lookup happened."""

    def __init__(self) -> None:
        self.calls = 0

    async def usable_keys(
        self, address: str, *, now: datetime, kind: str | None = None
    ) -> builtins.list[KeyRecord]:
        self.calls += 1
        raise StoreUnavailable("down")

    async def list(
        self, address: str | None = None, *, kind: str | None = None
    ) -> builtins.list[KeyRecord]:
        self.calls += 1
        raise StoreUnavailable("down")


def options(**data: Any) -> Options:
    return build(Options, data, "test", "checks.encryption")


def txn(
    login: str | None = "alice@example.com", mail_from: str = "alice@example.com"
) -> Transaction:
    identity = Identity(login=login, account_id=1 if login else None, trusted_network=not login)
    session = Session(client_ip="192.0.2.1", client_port=1, listener="test", identity=identity)
    return Transaction(session=session, mail_from=mail_from)


RULES: dict[str, Any] = {
    "recipients": {"Bob@Example.ORG": {"policy": "never", "prefer": "smime"}},
    "recipient_domains": {"example.org": {"policy": "opportunistic"}},
    "logins": {"Alice@Example.com": {"policy": "required", "prefer": "openpgp"}},
    "sender_domains": {"example.com": {"policy": "opportunistic", "prefer": "smime"}},
}


@pytest.mark.parametrize(
    ("rules", "recipient", "login", "expected"),
    [
        # nothing set: the default
        ({}, "bob@example.org", "alice@example.com", ("never", "openpgp", "default")),
        # recipient address beats recipient domain
        (
            {k: RULES[k] for k in ("recipients", "recipient_domains")},
            "bob@example.org",
            None,
            ("never", "smime", "recipient bob@example.org"),
        ),
        # the domain rule for another address of the domain
        (
            {k: RULES[k] for k in ("recipients", "recipient_domains")},
            "carol@example.org",
            None,
            ("opportunistic", "openpgp", "recipient domain example.org"),
        ),
        # required on the sender side wins over the recipient side's never
        (
            RULES,
            "bob@example.org",
            "alice@example.com",
            ("required", "smime", "login alice@example.com"),
        ),
        # login beats sender domain
        (
            {k: RULES[k] for k in ("logins", "sender_domains")},
            "carol@other.example",
            "alice@example.com",
            ("required", "openpgp", "login alice@example.com"),
        ),
        # no login (trusted network): the sender domain
        (
            {k: RULES[k] for k in ("logins", "sender_domains")},
            "carol@other.example",
            None,
            ("opportunistic", "smime", "sender domain example.com"),
        ),
        # recipient side beats sender side when neither says required
        (
            {
                "recipient_domains": {"example.org": {"policy": "never"}},
                "sender_domains": {"example.com": {"policy": "opportunistic"}},
            },
            "carol@example.org",
            None,
            ("never", "openpgp", "recipient domain example.org"),
        ),
        # required on the recipient side wins over the sender's never
        (
            {
                "recipient_domains": {"example.org": {"policy": "required"}},
                "logins": {"alice@example.com": {"policy": "never"}},
            },
            "carol@EXAMPLE.org",
            "alice@example.com",
            ("required", "openpgp", "recipient domain example.org"),
        ),
        # a rule with only `prefer` leaves the policy to the next rule
        (
            {"recipients": {"carol@example.org": {"prefer": "smime"}}, "default": "opportunistic"},
            "Carol@Example.org",
            None,
            ("opportunistic", "smime", "default"),
        ),
    ],
)
def test_policy_precedence(
    rules: dict[str, Any], recipient: str, login: str | None, expected: tuple[str, str, str]
) -> None:
    check = Encryption(options(**rules), DownStore())
    t = txn(login)
    canonical = canonical_address(recipient)
    got = check.resolve(t, canonical, canonical.rpartition("@")[2])
    assert (got.policy, got.prefer, got.source) == expected


def test_idn_rule_keys_match_either_form() -> None:
    check = Encryption(
        options(recipient_domains={"Bücher.example": {"policy": "required"}}), DownStore()
    )
    got = check.resolve(txn(), "jörg@xn--bcher-kva.example", "xn--bcher-kva.example")
    assert got.policy == "required"


def test_placeholder_is_the_senders() -> None:
    check = Encryption(
        options(
            subject_placeholder="[encrypted]",
            logins={"alice@example.com": {"subject_placeholder": "Verschlüsselt"}},
            sender_domains={"example.com": {"subject_placeholder": "(domain)"}},
        ),
        DownStore(),
    )
    assert check.protection(txn()).placeholder_subject == "Verschlüsselt"
    assert check.protection(txn(login=None)).placeholder_subject == "(domain)"
    assert check.protection(txn(None, "x@other.example")).placeholder_subject == "[encrypted]"


async def test_never_everywhere_is_idle_and_looks_nothing_up() -> None:
    store = DownStore()
    check = Encryption(options(recipients={"bob@example.org": {"prefer": "smime"}}), store)
    assert check.idle
    t = txn()
    rcpt = Recipient("bob@example.org")
    assert (await check.evaluate(Stage.RCPT, t, rcpt)).action is Action.CONTINUE
    assert store.calls == 0 and STATE_KEY not in t.check_state and rcpt.encryption is None


async def test_never_for_this_recipient_records_clear_without_lookup() -> None:
    store = DownStore()
    check = Encryption(
        options(default="required", recipient_domains={"list.example": {"policy": "never"}}), store
    )
    t = txn(login=None)
    rcpt = Recipient("Team@LIST.example")
    assert (await check.evaluate(Stage.RCPT, t, rcpt)).action is Action.CONTINUE
    assert store.calls == 0
    assert rcpt.encryption is not None and rcpt.encryption.decision == "clear"
    state = t.check_state[STATE_KEY]
    assert isinstance(state, EncryptionState)
    assert state.choices["Team@LIST.example"].key is None


async def test_store_down_defers_never_clear() -> None:
    check = Encryption(options(default="opportunistic"), DownStore())
    t, rcpt = txn(), Recipient("bob@example.org")
    verdict = await check.evaluate(Stage.RCPT, t, rcpt)
    assert verdict.action is Action.DEFER and verdict.reply is not None
    assert verdict.reply.line() == "451 4.3.0 Encryption key store unavailable, try again later"
    assert rcpt.encryption is not None and rcpt.encryption.decision == "deferred"
    state = t.check_state[STATE_KEY]
    assert isinstance(state, EncryptionState) and "bob@example.org" not in state.choices


@pytest.mark.parametrize("policy", ["opportunistic", "required"])
async def test_unusable_address_form_is_refused_unless_never(policy: str) -> None:
    store = DownStore()
    check = Encryption(options(default=policy), store)
    rcpt = Recipient("bob%example.net@example.org")
    verdict = await check.evaluate(Stage.RCPT, txn(), rcpt)
    assert verdict.action is Action.REJECT and verdict.reply is not None
    assert verdict.reply.line().startswith("553 5.1.3 Recipient <bob%example.net@example.org>")
    assert "percent-hack" in verdict.reply.text
    assert store.calls == 0 and rcpt.encryption is not None
    assert rcpt.encryption.decision == "refused"


async def test_warn_mode_refuses_nobody_and_sends_clear() -> None:
    check = Encryption(options(default="required"), DownStore(), enforced=False)
    t, rcpt = txn(), Recipient("bob@example.org")
    verdict = await check.evaluate(Stage.RCPT, t, rcpt)
    assert verdict.action is Action.DEFER  # recorded as "would have" by the runner
    assert rcpt.encryption is not None and rcpt.encryption.decision == "clear"
    assert rcpt.encryption.reason.startswith("warn mode, not applied: would have been deferred")
    state = t.check_state[STATE_KEY]
    assert isinstance(state, EncryptionState) and not state.enforced
    assert state.choices["bob@example.org"].key is None


@pytest.mark.parametrize(
    ("data", "key", "problem"),
    [
        ({"subject_placeholder": "a\r\nBcc: x"}, "checks.encryption.subject_placeholder", "one"),
        (
            {"logins": {"a@example.com": {"subject_placeholder": "x" * 300}}},
            "checks.encryption.logins.a@example.com.subject_placeholder",
            "200",
        ),
        (
            {"recipients": {"a%b@example.com": {"policy": "required"}}},
            "checks.encryption.recipients.a%b@example.com",
            "percent-hack",
        ),
        (
            {"recipients": {"Bob@Example.com": {}, "bob@example.COM": {}}},
            "checks.encryption.recipients.bob@example.COM",
            "same as another entry",
        ),
        (
            {"recipient_domains": {"Buße.example": {"policy": "never"}}},
            "checks.encryption.recipient_domains.Buße.example",
            "ambiguous",
        ),
        ({"logins": {"A": {}, "a": {}}}, "checks.encryption.logins", "listed twice"),
        ({"default": "sometimes"}, "checks.encryption.default", "one of"),
    ],
)
def test_bad_options_are_configuration_errors(data: dict[str, Any], key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        options(**data)
    assert info.value.key == key and problem in info.value.problem


def test_on_error_continue_is_refused() -> None:
    config = load_config(None, {"checks": {CHECK_ID: {"on_error": "continue"}}})
    with pytest.raises(ConfigError, match="without an encryption decision"):
        make_pipeline(config)


def test_shipped_policy_lists_the_check_at_rcpt_and_is_idle() -> None:
    config = load_config(None)
    assert config.pipeline.rcpt[-1] == CHECK_ID
    pipeline = make_pipeline(config)
    (configured,) = [c for c in pipeline.describe()[Stage.RCPT] if c.id == CHECK_ID]
    assert isinstance(configured.check, Encryption) and configured.check.idle
