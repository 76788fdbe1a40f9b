"""Check ``sender-identity``: the login may send as the envelope sender and as the From: header.

What it does: at MAIL, the reverse-path must be an address the login owns or holds a send-as grant for
(553 5.7.1 otherwise; the null reverse-path is refused for submission unless allowed). At end of data,
every address in the single From: header must pass the same test (550 5.7.1), and a missing, repeated
or unparsable From: is refused. Clients from trusted networks (no login) are not judged here.

Reads: the session's Identity (owned addresses/domains and grants, loaded at AUTH) and the header block.

Security notes: address comparison lower-cases the domain and the local part; ownership of ``@domain``
covers the whole domain. Display names are ignored (only the addr-spec counts).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.config.typed import doc_field
from gateway.core import replies
from gateway.core.message import Headers
from gateway.core.model import CONTINUE, Recipient, Stage, Transaction, Verdict
from gateway.pipeline.registry import CheckSpec


@dataclass(frozen=True)
class Options:
    allow_null_sender: bool = doc_field(
        False, "Accept MAIL FROM:<> from authenticated users (normally only bounces use it)."
    )
    check_from_header: bool = doc_field(True, "Also require ownership of the From: header.")


class SenderIdentity:
    id = "sender-identity"
    stages = frozenset({Stage.MAIL, Stage.DATA})

    def __init__(self, options: Options) -> None:
        self.options = options

    async def evaluate(self, stage: Stage, txn: Transaction, rcpt: Recipient | None) -> Verdict:
        identity = txn.session.identity
        if identity is None:  # unreachable behind the AUTH gate; fail closed all the same
            return Verdict.reject(replies.AUTH_REQUIRED, "no identity")
        if identity.trusted_network:
            return CONTINUE
        login = identity.login or "-"
        if stage is Stage.MAIL:
            if txn.mail_from == "":
                if self.options.allow_null_sender:
                    return CONTINUE
                return Verdict.reject(replies.NULL_SENDER_REFUSED, "null reverse-path")
            if identity.may_send_as(txn.mail_from):
                return CONTINUE
            return Verdict.reject(
                replies.SENDER_NOT_OWNED.format(address=txn.mail_from, login=login),
                f"envelope sender {txn.mail_from} not owned by {login}",
                measured=txn.mail_from,
            )
        if not self.options.check_from_header or txn.content is None:
            return CONTINUE
        headers = txn.headers if txn.headers is not None else Headers(txn.content)
        addrs = headers.from_addresses()
        if addrs is None:
            return Verdict.reject(replies.FROM_HEADER_MISSING, "From: missing or unparsable")
        for addr in addrs:
            if not identity.may_send_as(addr):
                return Verdict.reject(
                    replies.FROM_HEADER_NOT_OWNED.format(login=login),
                    f"From: {addr} not owned by {login}",
                    measured=addr,
                )
        return CONTINUE


def _factory(options: Any, deps: Any) -> SenderIdentity:
    return SenderIdentity(options)


SPEC = CheckSpec(
    id=SenderIdentity.id,
    stages=SenderIdentity.stages,
    options=Options,
    factory=_factory,
    doc="The envelope sender (MAIL) and the From: header (end of data) belong to the login.",
)
