"""The durable queue: messages Mailward took custody of but could not (yet) hand to the upstream.

What it does: exports the vocabulary and the store port (:mod:`.model`), the spool of message
files (:mod:`.spool`: written and fsynced before custody is taken), the SQL store
(:mod:`.store`, tables in :mod:`.models`, revision ``0006``) and the runner (:mod:`.runner`:
claim, attempt, record, schedule, bounce). DSNs are written by :mod:`.dsn`. The service takes
custody (spool write, then :meth:`SqlQueueStore.enqueue`, then 250); the composition root
(``gateway.app``) builds the runner and starts it.

Reads: ``[queue]`` (through the runner's settings), the queue tables and the spool directory,
through what it exports.

Security notes: spool files are message bodies (mode 0600, never logged); rows hold envelope
addresses and upstream replies only.
"""

from gateway.queue.model import (
    BOUNCED,
    COPY_STATES,
    CORRUPT,
    DELETED,
    DELIVERED,
    DONE,
    DROPPED,
    HELD,
    PENDING,
    QUEUED,
    RECIPIENT_STATES,
    AttemptResult,
    ClaimLost,
    NewBounce,
    NewCopy,
    QueuedCopy,
    QueuedMessage,
    QueuedRecipient,
    QueueStore,
)
from gateway.queue.runner import Dsn, QueueRunner, Recovery, RunnerSettings, SenderOwned
from gateway.queue.spool import Spool, SpoolCorrupt, SpoolError, SpoolFile, SpoolFull
from gateway.queue.store import SqlQueueStore

__all__ = [
    "BOUNCED",
    "COPY_STATES",
    "CORRUPT",
    "DELETED",
    "DELIVERED",
    "DONE",
    "DROPPED",
    "HELD",
    "PENDING",
    "QUEUED",
    "RECIPIENT_STATES",
    "AttemptResult",
    "ClaimLost",
    "Dsn",
    "NewBounce",
    "NewCopy",
    "QueueRunner",
    "QueueStore",
    "QueuedCopy",
    "QueuedMessage",
    "QueuedRecipient",
    "Recovery",
    "RunnerSettings",
    "SenderOwned",
    "Spool",
    "SpoolCorrupt",
    "SpoolError",
    "SpoolFile",
    "SpoolFull",
    "SqlQueueStore",
]
