"""Check ``recipient-limit``: at most N accepted recipients per message (452 4.5.3 beyond).

What it does: at each RCPT, counts the recipients already accepted in this transaction; the one that
would exceed ``max_recipients`` gets 452 4.5.3 (RFC 5321 4.5.3.1.10: the client sends the rest in a
new transaction). Rejected recipients do not count.

Reads: the transaction's recipient list.

Security notes: none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.config.typed import doc_field
from gateway.core import replies
from gateway.core.errors import ConfigError
from gateway.core.model import CONTINUE, Recipient, Stage, Transaction, Verdict
from gateway.pipeline.registry import CheckSpec


@dataclass(frozen=True)
class Options:
    max_recipients: int = doc_field(100, "Accepted recipients per message (RFC 5321 minimum: 100).")

    def validate(self) -> None:
        if self.max_recipients < 1:
            raise ConfigError("", "max_recipients", "must be at least 1")


class RecipientLimit:
    id = "recipient-limit"
    stages = frozenset({Stage.RCPT})

    def __init__(self, options: Options) -> None:
        self.limit = options.max_recipients

    async def evaluate(self, stage: Stage, txn: Transaction, rcpt: Recipient | None) -> Verdict:
        accepted = sum(1 for r in txn.accepted if r is not rcpt)
        if accepted < self.limit:
            return CONTINUE
        return Verdict.defer(
            replies.TOO_MANY_RECIPIENTS.format(limit=self.limit),
            "too many recipients",
            measured=str(accepted + 1),
            limit=str(self.limit),
        )


def _factory(options: Any, deps: Any) -> RecipientLimit:
    return RecipientLimit(options)


SPEC = CheckSpec(
    id=RecipientLimit.id,
    stages=RecipientLimit.stages,
    options=Options,
    factory=_factory,
    doc="Caps accepted recipients per message.",
)
