"""canonical_address / canonical_domain: the one address form the key store and the encryption
check share (case, IDN, Unicode, and the refused forms that could make a recipient miss its key)."""

from __future__ import annotations

import unicodedata

import pytest

from gateway.keys.address import InvalidAddress, canonical_address, canonical_domain


@pytest.mark.parametrize(
    ("given", "canonical"),
    [
        ("alice@example.com", "alice@example.com"),
        ("Alice@Example.COM", "alice@example.com"),
        ("ALICE.SMITH@EXAMPLE.COM", "alice.smith@example.com"),
        ("a+Tag@example.com", "a+tag@example.com"),  # plus-addressing kept, only case folded
        (
            "first.last-x_y=z{1}~'*/?^`|&$#@example.com",
            "first.last-x_y=z{1}~'*/?^`|&$#@example.com",
        ),
        ("user@sub.example.co.uk", "user@sub.example.co.uk"),
        ("user@localhost", "user@localhost"),
        ("user@_dmarc-like.example", "user@_dmarc-like.example"),
        ("user@123.example", "user@123.example"),
    ],
)
def test_ascii_addresses_are_lower_cased(given: str, canonical: str) -> None:
    assert canonical_address(given) == canonical


@pytest.mark.parametrize(
    ("given", "canonical"),
    [
        ("user@bücher.example", "user@xn--bcher-kva.example"),
        ("user@BÜCHER.example", "user@xn--bcher-kva.example"),  # Unicode upper case in the domain
        ("user@xn--bcher-kva.example", "user@xn--bcher-kva.example"),  # A-label as given
        ("user@XN--BCHER-KVA.EXAMPLE", "user@xn--bcher-kva.example"),
        ("user@例え.テスト", "user@xn--r8jz45g.xn--zckzah"),
        ("user@münchen.de", "user@xn--mnchen-3ya.de"),
    ],
)
def test_idn_domains_become_their_a_label(given: str, canonical: str) -> None:
    assert canonical_address(given) == canonical


def test_u_label_and_a_label_forms_are_the_same_key_address() -> None:
    assert canonical_address("Jörg@Bücher.example") == canonical_address(
        "jörg@xn--bcher-kva.example"
    )


@pytest.mark.parametrize(
    ("given", "canonical"),
    [
        # SMTPUTF8 (RFC 6531) local parts: kept, ASCII letters lower-cased, non-ASCII not folded
        ("jörg@example.com", "jörg@example.com"),
        ("Jörg@example.com", "jörg@example.com"),
        ("ÄRGER@example.com", "Ärger@example.com"),
        ("用户@例子.测试", "用户@xn--fsqu00a.xn--0zwm56d"),
        ("δοκιμή@παράδειγμα.δοκιμή", "δοκιμή@xn--hxajbheg2az3al.xn--jxalpdlp"),
    ],
)
def test_unicode_local_parts_are_kept_with_ascii_lowercased(given: str, canonical: str) -> None:
    assert canonical_address(given) == canonical


def test_local_part_is_nfc_normalised() -> None:
    decomposed = unicodedata.normalize("NFD", "jörg") + "@example.com"
    assert decomposed != "jörg@example.com"
    assert canonical_address(decomposed) == "jörg@example.com"


@pytest.mark.parametrize(
    "address",
    [
        "alice@example.com",
        "jörg@xn--bcher-kva.example",
        "Ärger@example.com",
        "a+tag@sub.example.org",
    ],
)
def test_canonical_form_is_a_fixed_point(address: str) -> None:
    once = canonical_address(address)
    assert canonical_address(once) == once


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("user%other.example@relay.example", "percent-hack"),
        ("a%b@c.example", "percent-hack"),
        ("@relay.example:user@example.com", "source route"),
        ("@a.example,@b.example:user@example.com", "source route"),
        ('"john doe"@example.com', "quoted"),
        ('"alice"@example.com', "quoted"),
        ('alice"@example.com', "quoted"),
        ("host!user@relay.example", "bang-path"),
        ("alice@example.com@evil.example", "more than one '@'"),
        ("alice", "no '@'"),
        ("", "empty address"),
        ("@example.com", "source route"),
        ("alice@", "empty domain"),
        ("<alice@example.com>", "angle brackets"),
        ("alice@[192.0.2.1]", "domain literal"),
        ("alice@[IPv6:2001:db8::1]", "domain literal"),
        ("al ice@example.com", "space character"),
        ("alice @example.com", "space character"),
        ("alice\t@example.com", "U+0009"),
        ("ali\x00ce@example.com", "U+0000"),
        ("alice\r\n@example.com", "U+000D"),
        ("ali\u202ece@example.com", "U+202E"),  # bidi override
        ("ali\u200dce@example.com", "U+200D"),  # zero-width joiner
        ("alice(comment)@example.com", "'('"),
        ("ali\\ce@example.com", "'\\\\'"),
        ("alice,bob@example.com", "','"),
        ("ali;ce@example.com", "';'"),
        (".alice@example.com", "dot-atom"),
        ("alice.@example.com", "dot-atom"),
        ("ali..ce@example.com", "dot-atom"),
        ("alice@example..com", "empty domain label"),
        ("alice@.example.com", "empty domain label"),
        ("alice@example.com.", "empty domain label"),
        ("alice@-example.com", "hyphen"),
        ("alice@example-.com", "hyphen"),
        ("alice@exa mple.com", "space character"),
        ("alice@exa:mple.com", "not allowed"),
        ("alice@exa/mple.com", "not allowed"),
        ("alice@straße.de", "ambiguous under IDNA"),  # IDNA 2003 maps ß to ss, IDNA 2008 keeps it
        (
            "alice@\uff25\uff38\uff21\uff2d\uff30\uff2c\uff25.com",
            "ambiguous under IDNA",
        ),  # fullwidth
        ("alice@xn--zz.example", "not a valid A-label"),
        ("x" * 65 + "@example.com", "longer than 64"),
        ("alice@" + "a" * 64 + ".example", "longer than 63"),
        ("alice@" + ".".join(["a" * 60] * 5), "longer than 253"),
    ],
)
def test_refused_forms(address: str, reason: str) -> None:
    with pytest.raises(InvalidAddress) as info:
        canonical_address(address)
    assert reason in str(info.value)
    assert isinstance(info.value, ValueError)
    assert info.value.reason in str(info.value)


def test_address_over_254_octets_is_refused() -> None:
    local = "a" * 64
    domain = ".".join(["b" * 63, "c" * 63, "d" * 63])
    assert len(f"{local}@{domain}") > 254
    with pytest.raises(InvalidAddress, match="longer than 254"):
        canonical_address(f"{local}@{domain}")


def test_multi_octet_local_part_limit_counts_octets() -> None:
    assert canonical_address("ö" * 32 + "@example.com")  # 64 octets
    with pytest.raises(InvalidAddress, match="64 octets"):
        canonical_address("ö" * 33 + "@example.com")  # 66 octets, 33 characters


def test_canonical_domain_alone() -> None:
    assert canonical_domain("Bücher.Example") == "xn--bcher-kva.example"
    assert canonical_domain("EXAMPLE.ORG") == "example.org"
    with pytest.raises(InvalidAddress):
        canonical_domain("")
    with pytest.raises(InvalidAddress):
        canonical_domain("exa%mple.org")


def test_non_strings_are_a_type_error() -> None:
    with pytest.raises(TypeError):
        canonical_address(b"alice@example.com")  # type: ignore[arg-type]
