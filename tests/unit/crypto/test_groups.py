"""Recipient grouping: who may share a copy, exhaustively over small recipient mixes.

What it tests: :func:`group_recipients` over every mix of four recipients (clear / OpenPGP / S/MIME,
named in To/Cc or Bcc): the groups partition the envelope, a group has one format and exactly its
recipients' distinct keys, every encrypted Bcc recipient is alone in its copy and its key appears in
no other copy, clear recipients share one copy, named recipients share one copy per format; plus
the case rules (domain folded, IDNA forms equal, local part exact), duplicates, shared keys,
``hide_key_ids``, a missing decision, :class:`Decision` validation and :func:`named_addresses`.

Reads: nothing (certificates are generated in memory).

Security notes: the Bcc invariants are the issue's "no recipient can learn who else received the
message"; the upper-case local part case checks we err on the side of a separate copy.
"""

from __future__ import annotations

import itertools

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.crypto.groups import (
    Decision,
    Format,
    Group,
    address_key,
    group_recipients,
    named_addresses,
)
from tests.unit.crypto.conftest import MULTIPART, _certificate

RECIPIENTS = ["r0@example.net", "r1@example.org", "r2@example.com", "r3@example.net"]


@pytest.fixture(scope="module")
def certs() -> list[x509.Certificate]:
    out = []
    for address in RECIPIENTS:
        key = ec.generate_private_key(ec.SECP256R1())
        out.append(_certificate(address, key.public_key(), key))
    return out


def pgp(index: int) -> Decision:
    return Decision.openpgp(f"{index:X}" * 40)


def decision_for(kind: str, index: int, certs: list[x509.Certificate]) -> Decision:
    if kind == "clear":
        return Decision.clear()
    if kind == "openpgp":
        return pgp(index)
    return Decision.smime(certs[index])


def group_of(groups: list[Group], recipient: str) -> Group:
    (found,) = [g for g in groups if recipient in g.recipients]
    return found


def test_every_mix_of_four_recipients(certs: list[x509.Certificate]) -> None:
    kinds = ["clear", "openpgp", "smime"]
    count = 0
    for chosen in itertools.product(kinds, repeat=4):
        for named_flags in itertools.product([True, False], repeat=4):
            decisions = {
                r: decision_for(k, i, certs)
                for i, (r, k) in enumerate(zip(RECIPIENTS, chosen, strict=True))
            }
            named = [r for r, flag in zip(RECIPIENTS, named_flags, strict=True) if flag]
            groups = group_recipients(RECIPIENTS, named, decisions)
            count += 1
            # A partition of the envelope, in envelope order of first recipients.
            listed = [r for g in groups for r in g.recipients]
            assert sorted(listed) == sorted(RECIPIENTS)
            firsts = [RECIPIENTS.index(g.recipients[0]) for g in groups]
            assert firsts == sorted(firsts)
            for g in groups:
                formats = {decisions[r].format for r in g.recipients}
                assert formats == {g.format}
                expected = {decisions[r].fingerprint for r in g.recipients} - {""}
                assert set(g.fingerprints) == expected and len(g.fingerprints) == len(expected)
                assert g.hidden_recipients is False
                if g.format is Format.SMIME:
                    assert len(g.certificates) == len(g.recipients)
            for recipient, is_named, kind in zip(RECIPIENTS, named_flags, chosen, strict=True):
                own = group_of(groups, recipient)
                if kind == "clear":
                    continue
                if not is_named:
                    assert own.recipients == (recipient,) and own.bcc
                    fingerprint = decisions[recipient].fingerprint
                    others = [g for g in groups if g is not own]
                    assert all(fingerprint not in g.fingerprints for g in others)
                else:
                    assert not own.bcc
                    same = [
                        r
                        for r, n, k in zip(RECIPIENTS, named_flags, chosen, strict=True)
                        if n and k == kind
                    ]
                    assert own.recipients == tuple(same)
            clear = [r for r, k in zip(RECIPIENTS, chosen, strict=True) if k == "clear"]
            clear_groups = [g for g in groups if g.format is Format.CLEAR]
            assert [g.recipients for g in clear_groups] == ([tuple(clear)] if clear else [])
            named_formats = {
                k for k, n in zip(chosen, named_flags, strict=True) if n and k != "clear"
            }
            bcc_encrypted = sum(
                1 for k, n in zip(chosen, named_flags, strict=True) if not n and k != "clear"
            )
            assert len(groups) == (1 if clear else 0) + len(named_formats) + bcc_encrypted
    assert count == 3**4 * 2**4


def test_bcc_clear_recipient_shares_the_clear_copy() -> None:
    groups = group_recipients(
        ["to@example.net", "bcc@example.org"],
        ["to@example.net"],
        {"to@example.net": Decision.clear(), "bcc@example.org": Decision.clear()},
    )
    assert groups == [Group(Format.CLEAR, ("to@example.net", "bcc@example.org"))]


def test_upper_case_domain_is_the_same_recipient_upper_case_local_part_is_not() -> None:
    decisions = {
        "bob@EXAMPLE.NET": pgp(1),
        "Carol@example.org": pgp(2),
        "dave@example.com": pgp(3),
    }
    named = ["Bob <bob@example.net>", "carol@example.org", "dave@Example.COM."]
    groups = group_recipients(
        list(decisions), [a.split("<")[-1].rstrip(">") for a in named], decisions
    )
    assert [(g.recipients, g.bcc) for g in groups] == [
        (("bob@EXAMPLE.NET", "dave@example.com"), False),
        (("Carol@example.org",), True),  # the safe side: its own copy
    ]


def test_idn_domains_compare_in_a_label_form() -> None:
    assert address_key("jörg@BÜCHER.example") == "jörg@xn--bcher-kva.example"
    assert address_key("<a@Example.NET>") == "a@example.net"
    assert address_key("no-at-sign") == "no-at-sign"
    groups = group_recipients(
        ["anna@xn--bcher-kva.example"],
        ["anna@bücher.example"],
        {"anna@xn--bcher-kva.example": pgp(1)},
    )
    assert not groups[0].bcc


def test_named_recipients_sharing_a_key_give_one_key() -> None:
    decisions = {"a@example.net": pgp(7), "b@example.net": pgp(7)}
    groups = group_recipients(list(decisions), list(decisions), decisions)
    assert len(groups) == 1 and groups[0].fingerprints == ("7" * 40,)


def test_duplicate_envelope_recipient_is_grouped_once() -> None:
    decisions = {"a@example.net": pgp(1)}
    groups = group_recipients(["a@example.net", "a@example.net"], [], decisions)
    assert [g.recipients for g in groups] == [("a@example.net",)]


def test_hide_key_ids_hides_every_openpgp_copy_only(certs: list[x509.Certificate]) -> None:
    decisions = {
        "a@example.net": pgp(1),
        "b@example.net": pgp(2),
        "c@example.net": Decision.smime(certs[0]),
        "d@example.net": Decision.clear(),
    }
    groups = group_recipients(
        list(decisions), ["a@example.net", "c@example.net"], decisions, hide_key_ids=True
    )
    assert {g.format: g.hidden_recipients for g in groups if not g.bcc} == {
        Format.OPENPGP: True,
        Format.SMIME: False,
        Format.CLEAR: False,
    }
    assert group_of(groups, "b@example.net").hidden_recipients


def test_missing_decision_is_an_error_not_clear_text() -> None:
    with pytest.raises(ValueError, match="no encryption decision"):
        group_recipients(
            ["a@example.net", "b@example.net"], [], {"a@example.net": Decision.clear()}
        )


def test_decision_validation(certs: list[x509.Certificate]) -> None:
    assert Decision.openpgp("ab" * 20).fingerprint == "AB" * 20
    assert Decision("openpgp", "AB" * 20).format is Format.OPENPGP  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Decision(Format.CLEAR, "AB" * 20)
    with pytest.raises(ValueError):
        Decision.openpgp("bob@example.net")
    with pytest.raises(ValueError):
        Decision(Format.SMIME, "AB" * 32)  # no certificate
    with pytest.raises(ValueError):
        Decision(Format.OPENPGP, "AB" * 20, certs[0])
    with pytest.raises(ValueError):
        Decision("pgp", "AB" * 20)  # type: ignore[arg-type]


def test_named_addresses_reads_to_and_cc() -> None:
    assert named_addresses(MULTIPART) == ["bob@example.net", "carol@example.org"]
    message = (
        b"To: undisclosed-recipients:;\r\n"
        b'Cc: =?utf-8?q?J=C3=B6rg?= <joerg@example.net>, "Doe, Jane" <jane@example.org>\r\n'
        b"Bcc: hidden@example.com\r\nResent-To: other@example.com\r\n\r\nbody\r\n"
    )
    assert named_addresses(message) == ["joerg@example.net", "jane@example.org"]
    assert named_addresses(b"Subject: none\r\n\r\n") == []
