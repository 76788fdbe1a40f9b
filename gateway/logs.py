"""Logging set-up: text for humans or one JSON object per line, never secrets or message bodies.

What it does: configures the root logger from ``[log]`` (level, format). Modules log through
``logging.getLogger("mailward.<area>")`` with ids (session, transaction, incident), never bodies or
passwords; aiosmtpd's own logger is capped at WARNING because at INFO/DEBUG it logs client lines
(which include AUTH exchanges).

Reads: ``Config.log``.

Security notes: see above; aiosmtpd's DEBUG logging would print AUTH data and is never enabled.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

from gateway.config.schema import LogConfig


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data, ensure_ascii=False)


def configure(config: LogConfig) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if config.format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.level.upper())
    logging.getLogger("mail.log").setLevel(logging.ERROR)  # aiosmtpd: logs client lines
    logging.getLogger("aiosmtplib").setLevel(logging.WARNING)
