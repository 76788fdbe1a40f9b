"""The key store's tables: ``encryption_key``, ``encryption_key_address`` and
``encryption_key_generation``.

What it does: declares the query-side description of the tables created by Alembic revision
``0007``. One ``encryption_key`` row per public key or certificate the gateway may encrypt to:

* ``fingerprint`` (unique; upper-case hex: the OpenPGP v4/v5 fingerprint, or the SHA-256 of an
  S/MIME certificate's DER), ``kind`` (:data:`KINDS`), ``algorithm`` (e.g. ``ed25519/cv25519``,
  ``rsa3072/rsa3072``, ``rsa2048``, ``ec-secp256r1``), ``user_ids`` (the key's valid user IDs, or
  the certificate's subject, for display only: lookups use the address table);
* ``created_at`` (key creation, or certificate notBefore), ``expires_at`` (primary key expiry, or
  notAfter; NULL = never), ``encryption_expires_at`` (OpenPGP: the latest expiry among the key's
  usable encryption subkeys, NULL = one never expires; S/MIME: NULL), ``revoked`` /
  ``revoked_at``;
* ``source`` (:data:`SOURCES`: uploaded by the user, imported by an operator), ``verification``
  (:data:`VERIFICATIONS`), ``imported_at`` / ``imported_by`` / ``updated_at``, ``last_used_at``;
* ``material``: the key itself in binary form -- OpenPGP: the transferable public key as gpg
  exports it with ``export-minimal`` (self-signatures only); S/MIME: the certificate's DER --
  and its ``material_sha256``.

``encryption_key_address`` holds one row per (key, canonical address) the key is valid for
(:func:`gateway.keys.address.canonical_address`), indexed by address for the per-recipient lookup;
rows go with their key (``ON DELETE CASCADE``).

``encryption_key_generation`` (revision ``0009``) is one row (``id = 1``) whose ``generation`` every
change to the two tables above increments in its own transaction (recording use does not): the
change counter that lets a gateway cache lookups (:class:`gateway.keys.directory.KeyDirectory`).

Reads: nothing.

Security notes: only public material is ever stored (validation refuses secret keys before
anything is written). ``user_ids`` are key-holder supplied text: printed escaped by the CLI.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
)
from sqlalchemy.orm import Mapped, mapped_column

from gateway.db.base import Base, BigIntId, UtcDateTime

OPENPGP = "openpgp"
SMIME = "smime"
#: Kinds of key the store holds.
KINDS = (OPENPGP, SMIME)

USER = "user"
OPERATOR = "operator"
#: Who brought the key in: uploaded by the address owner, or imported by an operator.
SOURCES = (USER, OPERATOR)

UNVERIFIED = "unverified"
VERIFIED = "verified"
#: Whether someone vouched that the key belongs to the addresses it is recorded for.
VERIFICATIONS = (UNVERIFIED, VERIFIED)

#: Longest canonical address stored (RFC 5321 path limit, with room for UTF-8 local parts).
ADDRESS_LENGTH = 320


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN (" + ", ".join(f"'{v}'" for v in values) + ")"


class EncryptionKeyRow(Base):
    __tablename__ = "encryption_key"

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    fingerprint: Mapped[str] = mapped_column(String(64), unique=True)
    kind: Mapped[str] = mapped_column(String(16))
    algorithm: Mapped[str] = mapped_column(String(64))
    user_ids: Mapped[list[str]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    encryption_expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    revoked: Mapped[bool] = mapped_column(Boolean)
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    source: Mapped[str] = mapped_column(String(16))
    verification: Mapped[str] = mapped_column(String(16))
    imported_at: Mapped[datetime] = mapped_column(UtcDateTime)
    imported_by: Mapped[str] = mapped_column(String(255))
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)
    last_used_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    material: Mapped[bytes] = mapped_column(LargeBinary)
    material_sha256: Mapped[str] = mapped_column(String(64))

    __table_args__ = (
        CheckConstraint(_in("kind", KINDS), name="kind"),
        CheckConstraint(_in("source", SOURCES), name="source"),
        CheckConstraint(_in("verification", VERIFICATIONS), name="verification"),
    )


class EncryptionKeyAddressRow(Base):
    __tablename__ = "encryption_key_address"

    key_id: Mapped[int] = mapped_column(
        BigIntId, ForeignKey("encryption_key.id", ondelete="CASCADE"), primary_key=True
    )
    address: Mapped[str] = mapped_column(String(ADDRESS_LENGTH), primary_key=True, index=True)


class EncryptionKeyGenerationRow(Base):
    __tablename__ = "encryption_key_generation"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    generation: Mapped[int] = mapped_column(BigInteger)

    __table_args__ = (CheckConstraint("id = 1", name="single_row"),)
