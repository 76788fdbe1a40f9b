"""Canonical recipient addresses: the one form in which the key store records and looks up addresses.

What it does: :func:`canonical_address` turns an envelope or user-ID address into the string the key
store indexes (``encryption_key_address.address``) and the ``encryption`` check looks up, or refuses
it with :class:`InvalidAddress`; :func:`canonical_domain` does the domain half alone (for per-domain
policy). Both sides -- the stored key's addresses and the recipient being looked up -- go through
the same function, so a recipient finds its key whatever case or IDN form the client used.

The canonical form:

* **Domain**: lower-case; an internationalised (U-label) domain becomes its A-label (punycode, via
  Python's ``encodings.idna`` -- IDNA 2003 ToASCII); ``xn--`` labels are checked to decode and
  re-encode to themselves. Labels are letters, digits, hyphen and underscore (no leading or trailing
  hyphen, 1-63 characters). A U-label that IDNA 2003 would *map* to something else than its own
  lower case (``ß`` → ``ss``, full-width letters, ...) is refused rather than guessed: IDNA 2003 and
  IDNA 2008 disagree on such labels, and a wrong guess would look up another domain's key. Domain
  literals (``user@[192.0.2.1]``) are refused.
* **Local part**: kept as it is, except that (1) ASCII letters are lower-cased -- the local part is
  case-sensitive in theory (RFC 5321 2.4) but no real mailbox provider treats ``Alice`` and
  ``alice`` as different people, and key user IDs are written in every case, so lookup is
  case-insensitive for ASCII; non-ASCII letters are *not* case-folded (Unicode case folding is
  locale-dependent and providers differ); and (2) it is NFC-normalised, as RFC 6532 3.1 asks of
  UTF-8 addresses, so a decomposed ``ö`` finds the key of a precomposed one. UTF-8 local parts
  (SMTPUTF8, RFC 6531) are accepted. Plus-addressing is *not* stripped (``a+tag`` is its own
  address: stripping it would guess at the provider's rules).
* **Refused** (the recipient could otherwise miss its key, or a key could be used for a mailbox
  it does not name): source routes (``@a,@b:user@c``), the percent hack (``user%c@b``), bang
  paths (``b!user@c``), quoted local parts (``"a b"@c``), backslash escapes, comments,
  whitespace and control or format characters (bidi controls, zero-width joiners), a local part
  that is not a dot-atom (leading, trailing or doubled dots), an empty part, more than one ``@``,
  a local part over 64 octets, a domain over 253 characters and an address over 254 octets.

Reads: nothing.

Security notes: every refusal is a :class:`InvalidAddress` (a ValueError) whose message names the
problem but is safe to log (it repeats no more than the caller gave). Callers must treat a refusal
as "no key can be found": the ``encryption`` check refuses or defers such a recipient when
encryption is required, never sends it in clear text.
"""

from __future__ import annotations

import unicodedata
from encodings import idna

__all__ = ["InvalidAddress", "canonical_address", "canonical_domain"]

MAX_LOCAL_OCTETS = 64
MAX_DOMAIN_CHARS = 253
MAX_ADDRESS_OCTETS = 254
MAX_LABEL = 63

#: RFC 5322 specials (and space) that may only appear in a quoted local part.
_SPECIALS = frozenset('()<>[]:;@\\,"')
#: ASCII characters allowed in a domain label besides letters and digits.
_LABEL_EXTRA = frozenset("-_")
#: Unicode categories never allowed anywhere: controls, format (bidi, ZWJ), separators,
#: surrogates, private use, unassigned.
_BAD_CATEGORIES = frozenset(("Cc", "Cf", "Cs", "Co", "Cn", "Zs", "Zl", "Zp"))
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


class InvalidAddress(ValueError):
    """The address cannot be canonicalised; ``reason`` says why (e.g. "percent-hack routing")."""

    def __init__(self, address: str, reason: str) -> None:
        self.address = address
        self.reason = reason
        super().__init__(f"{address!r}: {reason}")


def _bad_character(text: str) -> str | None:
    for char in text:
        if unicodedata.category(char) in _BAD_CATEGORIES:
            return f"U+{ord(char):04X}"
    return None


def canonical_domain(domain: str) -> str:
    """The canonical (lower-case, A-label) form of ``domain``; raises InvalidAddress."""
    if not isinstance(domain, str):
        raise TypeError("domain must be a str")
    if not domain:
        raise InvalidAddress(domain, "empty domain")
    if domain.startswith("[") or domain.endswith("]"):
        raise InvalidAddress(domain, "domain literal (an address in brackets)")
    bad = _bad_character(domain)
    if bad is not None:
        raise InvalidAddress(domain, f"control, format or space character {bad} in the domain")
    labels = domain.split(".")
    out = [_canonical_label(domain, label) for label in labels]
    result = ".".join(out)
    if len(result) > MAX_DOMAIN_CHARS:
        raise InvalidAddress(domain, f"domain longer than {MAX_DOMAIN_CHARS} characters")
    return result


def _canonical_label(domain: str, label: str) -> str:
    if not label:
        raise InvalidAddress(domain, "empty domain label (leading, trailing or doubled dot)")
    if label.isascii():
        ascii_label = label.lower()
    else:
        unicode_label = unicodedata.normalize("NFC", label).lower()
        try:
            mapped = idna.nameprep(unicode_label)
        except UnicodeError:
            raise InvalidAddress(domain, f"label {label!r} is not a valid IDN label") from None
        if mapped != unicode_label:
            raise InvalidAddress(
                domain,
                f"label {label!r} is ambiguous under IDNA (it maps to {mapped!r}); "
                "write the domain in its A-label (xn--) form",
            )
        try:
            ascii_label = idna.ToASCII(unicode_label).decode("ascii").lower()
        except UnicodeError:
            raise InvalidAddress(domain, f"label {label!r} is not a valid IDN label") from None
    if len(ascii_label) > MAX_LABEL:
        raise InvalidAddress(domain, f"domain label longer than {MAX_LABEL} characters")
    if not all(c.isalnum() or c in _LABEL_EXTRA for c in ascii_label):
        raise InvalidAddress(domain, f"label {label!r} has a character not allowed in a domain")
    if ascii_label.startswith("-") or ascii_label.endswith("-"):
        raise InvalidAddress(domain, f"label {label!r} starts or ends with a hyphen")
    if ascii_label.startswith("xn--"):
        try:
            decoded = idna.ToUnicode(ascii_label)
            again = idna.ToASCII(decoded).decode("ascii").lower()
        except UnicodeError:
            raise InvalidAddress(domain, f"label {label!r} is not a valid A-label") from None
        if again != ascii_label:
            raise InvalidAddress(domain, f"label {label!r} is not a canonical A-label")
    return ascii_label


def _canonical_local(address: str, local: str) -> str:
    if not local:
        raise InvalidAddress(address, "empty local part")
    if local.startswith('"') or '"' in local:
        raise InvalidAddress(address, "quoted local part")
    if "%" in local:
        raise InvalidAddress(address, "percent-hack routing ('%' in the local part)")
    if "!" in local:
        raise InvalidAddress(address, "bang-path routing ('!' in the local part)")
    bad = _bad_character(local)
    if bad is not None:
        raise InvalidAddress(address, f"control, format or space character {bad} in the local part")
    for char in local:
        if char in _SPECIALS:
            raise InvalidAddress(address, f"character {char!r} in the local part")
    if local.startswith(".") or local.endswith(".") or ".." in local:
        raise InvalidAddress(
            address, "local part is not a dot-atom (leading, trailing or double dot)"
        )
    local = unicodedata.normalize("NFC", local).translate(_ASCII_LOWER)
    if len(local.encode("utf-8")) > MAX_LOCAL_OCTETS:
        raise InvalidAddress(address, f"local part longer than {MAX_LOCAL_OCTETS} octets")
    return local


def canonical_address(address: str) -> str:
    """The canonical form of ``address`` (``local@domain``, no angle brackets) for key lookup.

    Raises :class:`InvalidAddress` (a ValueError) for forms that could make a recipient miss its
    key: see the module docstring for the exact rules.
    """
    if not isinstance(address, str):
        raise TypeError("address must be a str")
    if not address:
        raise InvalidAddress(address, "empty address")
    if address.startswith("@"):
        raise InvalidAddress(address, "source route ('@host:' before the mailbox)")
    if address.startswith("<") or address.endswith(">"):
        raise InvalidAddress(address, "angle brackets: give the bare address")
    if '"' in address:
        raise InvalidAddress(address, "quoted local part")
    if address.count("@") != 1:
        if "@" not in address:
            raise InvalidAddress(address, "no '@' (not an address)")
        raise InvalidAddress(address, "more than one '@'")
    local, domain = address.split("@")
    canonical = f"{_canonical_local(address, local)}@{canonical_domain(domain)}"
    if len(canonical.encode("utf-8")) > MAX_ADDRESS_OCTETS:
        raise InvalidAddress(address, f"address longer than {MAX_ADDRESS_OCTETS} octets")
    return canonical
