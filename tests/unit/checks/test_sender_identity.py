"""Check ``sender-identity``: envelope sender at MAIL and the From: header at end of data.

What it tests: ownership of exact addresses and of whole domains (``@domain``), send-as grants, case
handling, the null reverse-path option, trusted-network clients, and the From: header (missing,
repeated, unparsable, not owned, owned; display names and comments ignored). Builds real
Session/Transaction/Identity objects from ``gateway.core.model``.

Reads: nothing.

Security notes: several cases are spoofing attempts (look-alike domains, an owned address in the
display name or a comment, a second From: hidden behind a long header section) that must be refused.
"""

from __future__ import annotations

import pytest

from gateway.checks import SPECS
from gateway.checks.sender_identity import Options, SenderIdentity
from gateway.core import replies
from gateway.core.message import MAX_HEADER_BYTES
from gateway.core.model import CONTINUE, Action, Identity, Session, Stage, Transaction, Verdict

ALICE = Identity(
    login="alice",
    account_id=1,
    owned=("alice@example.com", "@alice.example"),
    send_as=("team@example.com", "@shared.example"),
)
TRUSTED = Identity(login=None, account_id=None, trusted_network=True)


def txn(
    identity: Identity | None = ALICE,
    mail_from: str = "alice@example.com",
    content: bytes | None = None,
) -> Transaction:
    session = Session("192.0.2.20", 50000, "submission", identity=identity)
    t = Transaction(session=session, mail_from=mail_from)
    t.content = content
    return t


def message(*headers: str, body: str = "Hello.\r\n") -> bytes:
    return ("".join(f"{h}\r\n" for h in headers) + "\r\n" + body).encode()


async def at_mail(mail_from: str, identity: Identity | None = ALICE, **options: bool) -> Verdict:
    return await SenderIdentity(Options(**options)).evaluate(
        Stage.MAIL, txn(identity, mail_from), None
    )


async def at_data(content: bytes, identity: Identity | None = ALICE, **options: bool) -> Verdict:
    return await SenderIdentity(Options(**options)).evaluate(
        Stage.DATA, txn(identity, "alice@example.com", content), None
    )


# --- envelope sender (MAIL) -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "sender",
    [
        "alice@example.com",  # owned address
        "anyone@alice.example",  # whole owned domain
        "team@example.com",  # send-as grant, exact address
        "x@shared.example",  # send-as grant, whole domain
        "ALICE@EXAMPLE.COM",  # case of local part and domain
        "Alice@Example.Com",
        "anyone@ALICE.Example",
        "alice@example.com.",  # the root label dot
    ],
)
async def test_owned_or_granted_sender_passes(sender: str) -> None:
    assert await at_mail(sender) is CONTINUE


@pytest.mark.parametrize(
    "sender",
    [
        "bob@example.com",  # another user's address in a domain Alice does not own
        "alice@sub.alice.example",  # subdomains are not covered by @alice.example
        "alice@alice.example.evil",  # look-alike suffix
        "alice@example.co",
        "alice.example@evil.example",
        "alice",  # no domain
        "@alice.example",  # no local part
    ],
)
async def test_not_owned_sender_is_rejected_553(sender: str) -> None:
    verdict = await at_mail(sender)
    assert verdict.action is Action.REJECT
    assert verdict.reply == replies.SENDER_NOT_OWNED.format(address=sender, login="alice")
    assert verdict.reply.code == 553 and verdict.reply.status == "5.7.1"
    assert verdict.measured == sender


async def test_domain_pattern_case_is_ignored() -> None:
    identity = Identity(login="u", account_id=2, owned=("@Example.ORG", "Boss@Example.ORG"))
    assert await at_mail("someone@example.org", identity) is CONTINUE
    assert await at_mail("boss@EXAMPLE.org", identity) is CONTINUE


async def test_null_sender_refused_by_default() -> None:
    verdict = await at_mail("")
    assert verdict.action is Action.REJECT
    assert verdict.reply is replies.NULL_SENDER_REFUSED


async def test_null_sender_allowed_by_option() -> None:
    assert await at_mail("", allow_null_sender=True) is CONTINUE


async def test_allow_null_sender_does_not_relax_other_senders() -> None:
    verdict = await at_mail("bob@example.com", allow_null_sender=True)
    assert verdict.action is Action.REJECT


async def test_trusted_network_client_is_not_judged() -> None:
    assert await at_mail("anyone@anywhere.example", TRUSTED) is CONTINUE
    assert await at_mail("", TRUSTED) is CONTINUE
    assert await at_data(message("Subject: no From"), TRUSTED) is CONTINUE


async def test_identity_without_ownership_owns_nothing() -> None:
    nobody = Identity(login="nobody", account_id=3)
    verdict = await at_mail("nobody@example.com", nobody)
    assert verdict.action is Action.REJECT


# --- From: header (end of data) -------------------------------------------------------------------


@pytest.mark.parametrize(
    "from_value",
    [
        "alice@example.com",
        "<alice@example.com>",
        "Alice Liddell <alice@example.com>",
        '"Someone Else" <Alice@EXAMPLE.com>',
        "=?utf-8?q?Al=C3=AFce?= <alice@example.com>",  # encoded-word display name
        "alice@example.com (Alice)",
        "team@example.com",
        "Alice <alice@example.com>, Team <team@example.com>",  # every address owned or granted
        "x@alice.example",
    ],
)
async def test_owned_from_header_passes(from_value: str) -> None:
    assert await at_data(message(f"From: {from_value}", "Subject: hi")) is CONTINUE


@pytest.mark.parametrize(
    ("from_value", "culprit"),
    [
        ("mallory@evil.example", "mallory@evil.example"),
        # display names and comments are ignored: only the addr-spec counts
        ('"alice@example.com" <mallory@evil.example>', "mallory@evil.example"),
        ("alice@example.com <mallory@evil.example>", "mallory@evil.example"),
        ("mallory@evil.example (alice@example.com)", "mallory@evil.example"),
        # one owned address does not cover another in the same header
        ("alice@example.com, mallory@evil.example", "mallory@evil.example"),
        ("<alice@example.com> <mallory@evil.example>", "mallory@evil.example"),
    ],
)
async def test_not_owned_from_header_is_rejected_550(from_value: str, culprit: str) -> None:
    verdict = await at_data(message(f"From: {from_value}"))
    assert verdict.action is Action.REJECT
    assert verdict.reply == replies.FROM_HEADER_NOT_OWNED.format(login="alice")
    assert (verdict.reply.code, verdict.reply.status) == (550, "5.7.1")
    assert verdict.measured == culprit


@pytest.mark.parametrize(
    "content",
    [
        message("Subject: no From here"),  # missing
        message("From: alice@example.com", "From: alice@example.com"),  # repeated
        message("From: alice@example.com", "from: mallory@evil.example"),  # repeated, other case
        message("From: Alice Liddell"),  # no address
        message("From: "),  # empty
        message("From: undisclosed-recipients:;"),  # empty group
        message("From: alice@example.com@evil.example"),
        message("From: alice@example.org)<alice@example.com>"),  # CVE-2023-27043 shape
        message("Subject: x", body="From: alice@example.com\r\n"),  # From: only in the body
        b"\r\nFrom: alice@example.com\r\n",  # empty header section, From: in the body
    ],
    ids=[
        "missing",
        "repeated",
        "repeated-case",
        "name-only",
        "empty",
        "empty-group",
        "double-at",
        "cve-2023-27043",
        "only-in-body",
        "no-headers",
    ],
)
async def test_missing_repeated_or_unparsable_from_is_rejected(content: bytes) -> None:
    verdict = await at_data(content)
    assert verdict.action is Action.REJECT
    assert verdict.reply is replies.FROM_HEADER_MISSING


async def test_from_header_name_is_case_insensitive() -> None:
    assert await at_data(message("FROM: alice@example.com")) is CONTINUE
    assert (await at_data(message("fRoM: mallory@evil.example"))).action is Action.REJECT


async def test_folded_from_header_is_unfolded() -> None:
    content = message("From: Alice Liddell\r\n <alice@example.com>")
    assert await at_data(content) is CONTINUE


async def test_check_from_header_false_skips_the_header() -> None:
    assert await at_data(message("From: mallory@evil.example"), check_from_header=False) is CONTINUE


async def test_envelope_and_header_are_judged_separately() -> None:
    """An owned envelope sender does not excuse a foreign From: (and the other way round)."""
    check = SenderIdentity(Options())
    t = txn(ALICE, "alice@example.com", message("From: mallory@evil.example"))
    assert await check.evaluate(Stage.MAIL, t, None) is CONTINUE
    assert (await check.evaluate(Stage.DATA, t, None)).action is Action.REJECT
    t = txn(ALICE, "mallory@evil.example", message("From: alice@example.com"))
    assert (await check.evaluate(Stage.MAIL, t, None)).action is Action.REJECT
    assert await check.evaluate(Stage.DATA, t, None) is CONTINUE


async def test_garbage_header_bytes_give_a_verdict_not_an_exception() -> None:
    content = b"From: \xff\xfe\x00\x80@\xc3(\r\n\x00\x00: \r\n\r\n"
    verdict = await at_data(content)
    assert verdict.action is Action.REJECT


async def test_second_from_beyond_the_header_bound_is_not_missed() -> None:
    padding = [f"X-Pad-{i}: {'a' * 200}" for i in range(MAX_HEADER_BYTES // 200 + 10)]
    content = message("From: alice@example.com", *padding, "From: ceo@victim.example")
    assert len(content) > MAX_HEADER_BYTES
    verdict = await at_data(content)
    assert verdict.action is Action.REJECT


# --- wiring ---------------------------------------------------------------------------------------


def test_spec_runs_at_mail_and_data_and_builds_from_options() -> None:
    spec = SPECS["sender-identity"]
    assert spec.stages == frozenset({Stage.MAIL, Stage.DATA})
    check = spec.factory(Options(allow_null_sender=True), None)
    assert isinstance(check, SenderIdentity)
    assert check.options.allow_null_sender is True
