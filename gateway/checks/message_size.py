"""Check ``message-size``: a policy size limit, at MAIL (declared SIZE=) and at end of data (actual).

What it does: refuses with 552 5.3.4 a message whose declared or actual size exceeds ``max_size``.
The protocol ceiling ``smtp.max_message_size`` is enforced by the SMTP layer while data arrives (so
memory stays bounded) and is audited under this same check id; this check lets a policy set a lower
limit, or roll one out in ``warn`` mode. ``max_size = 0`` means "the protocol ceiling".

Reads: the MAIL FROM SIZE parameter and the received size.

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

CHECK_ID = "message-size"


@dataclass(frozen=True)
class Options:
    max_size: int = doc_field(
        0, "Largest message in bytes for this policy; 0: `smtp.max_message_size`."
    )

    def validate(self) -> None:
        if self.max_size < 0:
            raise ConfigError("", "max_size", "must not be negative")


class MessageSize:
    id = CHECK_ID
    stages = frozenset({Stage.MAIL, Stage.DATA})

    def __init__(self, options: Options, ceiling: int) -> None:
        self.limit = min(options.max_size or ceiling, ceiling)

    async def evaluate(self, stage: Stage, txn: Transaction, rcpt: Recipient | None) -> Verdict:
        size = txn.declared_size if stage is Stage.MAIL else txn.size
        if size is None or size <= self.limit:
            return CONTINUE
        return Verdict.reject(
            replies.MESSAGE_TOO_BIG,
            "declared size too big" if stage is Stage.MAIL else "message too big",
            measured=str(size),
            limit=str(self.limit),
        )


def _factory(options: Any, deps: Any) -> MessageSize:
    return MessageSize(options, deps.config.smtp.max_message_size)


SPEC = CheckSpec(
    id=MessageSize.id,
    stages=MessageSize.stages,
    options=Options,
    factory=_factory,
    doc="Policy limit on message size (declared and actual).",
)
