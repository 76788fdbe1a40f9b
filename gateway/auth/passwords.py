"""Password hashing: argon2id (argon2-cffi) with the library's recommended parameters.

What it does: :func:`hash_password` produces a PHC string (``$argon2id$v=19$m=...``) with a random
salt; :func:`verify_password` checks a password against one in constant time and never raises for a
wrong password or a malformed hash (it answers False); :func:`needs_rehash` tells whether a stored
hash was made with other parameters than today's, so the account store can rehash it at the next
successful login. :func:`check_password_policy` is the minimum every new password must meet.

Reads: nothing.

Security notes: passwords are never logged, never put in exception messages and never returned.
These functions are CPU- and memory-hard on purpose (~64 MiB, tens of milliseconds): callers on the
event loop run them in a thread (``asyncio.to_thread``).
"""

from __future__ import annotations

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from gateway.core.errors import GatewayError

MIN_PASSWORD_LENGTH = 8
MAX_PASSWORD_LENGTH = 1024

#: Parameters are immutable after construction; RFC 9106's "second recommended option" defaults.
_HASHER = PasswordHasher()


class WeakPassword(GatewayError):
    """A new password does not meet the policy (the message never contains the password)."""


def check_password_policy(password: str) -> None:
    """Raise WeakPassword when ``password`` is empty, too short or absurdly long."""
    if not password:
        raise WeakPassword("the password is empty")
    if len(password) < MIN_PASSWORD_LENGTH:
        raise WeakPassword(f"the password is too short (at least {MIN_PASSWORD_LENGTH} characters)")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise WeakPassword(f"the password is too long (at most {MAX_PASSWORD_LENGTH} characters)")


def hash_password(password: str) -> str:
    """An argon2id PHC string for ``password`` (random salt)."""
    return _HASHER.hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    """True when ``password`` matches ``password_hash``; False for a mismatch or a bad hash."""
    try:
        return _HASHER.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def needs_rehash(password_hash: str) -> bool:
    """True when the hash was made with other parameters than the current ones."""
    try:
        return _HASHER.check_needs_rehash(password_hash)
    except (InvalidHashError, ValueError):
        return True
