"""Policy checks, one per module, each with a kebab-case id used everywhere (config, logs, audit).

``SPECS`` lists every check Mailward ships; the registry builds pipelines from it.
"""

from gateway.checks.account_guard import SPEC as ACCOUNT_GUARD
from gateway.checks.auth_throttle import SPEC as AUTH_THROTTLE
from gateway.checks.encryption import SPEC as ENCRYPTION
from gateway.checks.message_size import SPEC as MESSAGE_SIZE
from gateway.checks.rate_limit import SPEC as RATE_LIMIT
from gateway.checks.recipient_limit import SPEC as RECIPIENT_LIMIT
from gateway.checks.sender_identity import SPEC as SENDER_IDENTITY
from gateway.checks.spam_score import SPEC as SPAM_SCORE
from gateway.pipeline.registry import CheckSpec

SPECS: dict[str, CheckSpec] = {
    s.id: s
    for s in (
        AUTH_THROTTLE,
        SENDER_IDENTITY,
        RECIPIENT_LIMIT,
        MESSAGE_SIZE,
        SPAM_SCORE,
        RATE_LIMIT,
        ACCOUNT_GUARD,
        ENCRYPTION,
    )
}

__all__ = ["SPECS"]
