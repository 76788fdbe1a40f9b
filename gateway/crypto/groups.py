"""Recipient grouping: which recipients may share one copy of an encrypted message.

What it does: :func:`group_recipients` takes the envelope recipients, the addresses named in the
To/Cc header fields (:func:`named_addresses`) and one :class:`Decision` per recipient (clear text,
OpenPGP with a key fingerprint, or S/MIME with a certificate) and returns the copies to send: a list
of :class:`Group` (format, recipients, keys), each a separate upstream transaction. Pure function;
every envelope recipient is in exactly one group; groups come in the order of their first recipient.

The rule (no recipient can learn who else received the message):

* **Every encrypted Bcc recipient gets a copy of its own** (a Bcc recipient is an envelope recipient
  not named in To/Cc). Separate copies rather than hidden recipients, because hiding is not enough:
  a shared OpenPGP ciphertext with ``--throw-keyids`` still shows *how many* PKESK packets it has
  (one more than the named recipients betrays a Bcc), and S/MIME has no hidden recipients at all
  (each RecipientInfo names its certificate's issuer and serial number). A separate copy shows the
  Bcc recipient's key to nobody else, in either format.
* **To/Cc recipients of the same format share one ciphertext**, with their key ids visible to each
  other (``hidden_recipients=False``): they are named in the headers everyone receives, so the key
  list tells them nothing about who received the message, and visible key ids keep decryption cheap
  and working in clients that handle anonymous recipients badly. ``hide_key_ids=True`` hides them
  anyway (``--throw-keyids`` on every OpenPGP copy; e.g. to keep key ids from relays).
* **Clear-text recipients share one copy**, Bcc or not: it is the message as received (the outer
  Bcc field, if the client left one, is removed by the upstream MSA as for any clear message).

Matching a recipient against To/Cc: the domain is compared case-insensitively (and in its IDNA
A-label form when it converts), the local part exactly. A mismatch only ever classifies a named
recipient as Bcc, which costs one more copy and leaks nothing; the reverse (folding ``BOB`` into
``bob``) could show a Bcc recipient's key to the named ones, so it is not done.

Reads: nothing but its arguments (:func:`named_addresses` parses the message's header section).

Security notes: a recipient without a decision is a programming error (``ValueError``), never a
silent clear-text copy. Addresses may appear in error text; keys and message content never do.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from email.utils import getaddresses
from enum import StrEnum

from cryptography import x509

from gateway.core.message import Headers
from gateway.crypto.smime import certificate_fingerprint

_FINGERPRINT = re.compile(r"[0-9A-F]{40}|[0-9A-F]{64}")
NAMING_FIELDS = ("To", "Cc")


class Format(StrEnum):
    """How one copy of the message travels."""

    CLEAR = "clear"
    OPENPGP = "openpgp"
    SMIME = "smime"


@dataclass(frozen=True, slots=True)
class Decision:
    """The policy's answer for one recipient: the format and the key to use.

    ``fingerprint`` names the key actually used (OpenPGP fingerprint, or the S/MIME certificate's
    SHA-256 fingerprint), for the key list and the audit."""

    format: Format
    fingerprint: str = ""
    certificate: x509.Certificate | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "format", Format(self.format))
        if self.format is Format.CLEAR:
            if self.fingerprint or self.certificate is not None:
                raise ValueError("a clear-text decision carries no key")
        elif not _FINGERPRINT.fullmatch(self.fingerprint):
            raise ValueError("an encryption decision needs an upper-case hex fingerprint")
        if self.format is Format.OPENPGP and self.certificate is not None:
            raise ValueError("an OpenPGP decision carries no certificate")
        if self.format is Format.SMIME and self.certificate is None:
            raise ValueError("an S/MIME decision needs its certificate")

    @classmethod
    def clear(cls) -> Decision:
        return cls(Format.CLEAR)

    @classmethod
    def openpgp(cls, fingerprint: str) -> Decision:
        return cls(Format.OPENPGP, fingerprint.replace(" ", "").upper())

    @classmethod
    def smime(cls, certificate: x509.Certificate) -> Decision:
        return cls(Format.SMIME, certificate_fingerprint(certificate), certificate)


@dataclass(frozen=True, slots=True)
class Group:
    """One copy of the message: its format, its recipients and the distinct keys it is encrypted to."""

    format: Format
    recipients: tuple[str, ...]
    keys: tuple[Decision, ...] = ()
    hidden_recipients: bool = False
    bcc: bool = False  # a Bcc recipient's own copy

    @property
    def fingerprints(self) -> tuple[str, ...]:
        return tuple(key.fingerprint for key in self.keys)

    @property
    def certificates(self) -> tuple[x509.Certificate, ...]:
        return tuple(key.certificate for key in self.keys if key.certificate is not None)


def named_addresses(message: bytes | Headers) -> list[str]:
    """The addresses in the message's To and Cc fields (an unparsable entry names nobody);
    ``message`` may be its already parsed header section."""
    headers = message if isinstance(message, Headers) else Headers(message)
    values = [value for name in NAMING_FIELDS for value in headers.values(name)]
    return [address for _, address in getaddresses(values) if "@" in address]


def address_key(address: str) -> str:
    """The form compared against To/Cc: exact local part, lower-case (A-label) domain."""
    local, at, domain = address.strip().strip("<>").rpartition("@")
    if not at:
        return address.strip()
    domain = domain.lower().rstrip(".")
    with contextlib.suppress(UnicodeError):  # not convertible: compare the lower-cased form
        domain = domain.encode("idna").decode("ascii")
    return f"{local}@{domain}"


def group_recipients(
    envelope: Sequence[str],
    named: Iterable[str],
    decisions: Mapping[str, Decision],
    *,
    hide_key_ids: bool = False,
) -> list[Group]:
    """The copies to send: one per encrypted Bcc recipient, one per format for the rest.

    ``decisions`` is keyed by the envelope recipient exactly as in ``envelope``; an exact duplicate
    in ``envelope`` is grouped once."""
    named_keys = {address_key(address) for address in named}
    slots: dict[tuple[str, str], list[str]] = {}
    keys: dict[tuple[str, str], dict[str, Decision]] = {}
    for recipient in dict.fromkeys(envelope):
        decision = decisions.get(recipient)
        if decision is None:
            raise ValueError(f"no encryption decision for recipient {recipient!r}")
        is_bcc = address_key(recipient) not in named_keys
        if decision.format is Format.CLEAR:
            slot = ("clear", "")
        elif is_bcc:
            slot = ("bcc", recipient)
        else:
            slot = ("named", decision.format.value)
        slots.setdefault(slot, []).append(recipient)
        if decision.format is not Format.CLEAR:
            keys.setdefault(slot, {}).setdefault(decision.fingerprint, decision)
    groups = []
    for slot, recipients in slots.items():
        slot_keys = tuple(keys.get(slot, {}).values())
        fmt = slot_keys[0].format if slot_keys else Format.CLEAR
        groups.append(
            Group(
                format=fmt,
                recipients=tuple(recipients),
                keys=slot_keys,
                hidden_recipients=hide_key_ids and fmt is Format.OPENPGP,
                bcc=slot[0] == "bcc",
            )
        )
    return groups
