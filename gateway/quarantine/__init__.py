"""The quarantine ("hold for review"): messages a check decided to hold, kept in the database until
an operator releases them (sent upstream as live mail is: encrypted per recipient by the
policy and keys at release time) or deletes them.

What it does: exports the table (:mod:`.models`), the store :class:`SqlQuarantine` (:mod:`.store`)
and the release operation (:mod:`.release`). ``mailward quarantine`` (``gateway.cli.quarantine``)
is the operator's interface.

Reads: the ``quarantine`` table, through what it exports.

Security notes: held messages are message bodies: they are never logged, and the CLI prints their
header block only on request (``quarantine show ID --headers``), never the body.
"""

from gateway.quarantine.models import STATUSES, UNDECIDED
from gateway.quarantine.release import RefusedRecipient, ReleaseFailed, release, release_held
from gateway.quarantine.store import (
    QuarantineEntry,
    QuarantineNotFound,
    QuarantineStateError,
    SqlQuarantine,
)

__all__ = [
    "STATUSES",
    "UNDECIDED",
    "QuarantineEntry",
    "QuarantineNotFound",
    "QuarantineStateError",
    "RefusedRecipient",
    "ReleaseFailed",
    "SqlQuarantine",
    "release",
    "release_held",
]
