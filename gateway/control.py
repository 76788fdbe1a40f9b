"""The control socket: operator commands to a running gateway (limit status/reset, ...).

What it does: the running gateway listens on a Unix socket (``<state_dir>/control.sock``, mode
0600, owned by the gateway's user) for one JSON request per connection, ``{"command": ..., "args":
{...}}``, and answers one JSON object, ``{"ok": true, "result": ...}`` or ``{"ok": false, "error":
"..."}``. The CLI uses it for state that only exists inside the process (the in-process limit
store); with Redis it talks to the store directly. :func:`call` is the client side.

Reads: requests from the socket (local users with access to the state directory only).

Security notes: the socket file is created with mode 0600 in the state directory; requests are
size-bounded (64 KiB) and time-bounded; handlers get validated arguments only; error texts are ours,
never exception text.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from gateway.core.errors import GatewayError
from gateway.core.model import new_id

log = logging.getLogger("mailward.control")

MAX_REQUEST = 64 * 1024
Handler = Callable[[Mapping[str, Any]], Awaitable[Any]]


class ControlError(GatewayError):
    """The control socket is missing, refused the request, or answered an error."""


def socket_path(state_dir: str | Path) -> Path:
    return Path(state_dir) / "control.sock"


class ControlServer:
    def __init__(self, path: Path, handlers: Mapping[str, Handler]) -> None:
        self.path = path
        self.handlers = dict(handlers)
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        finally:
            os.umask(old)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(30):
                raw = await reader.readline()
                answer = await self._dispatch(raw)
                writer.write(json.dumps(answer, default=str).encode() + b"\n")
                await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _dispatch(self, raw: bytes) -> dict[str, Any]:
        if len(raw) > MAX_REQUEST:
            return {"ok": False, "error": "request too large"}
        try:
            request = json.loads(raw)
            command = request["command"]
            args = request.get("args", {})
            if not isinstance(command, str) or not isinstance(args, dict):
                raise ValueError
        except (ValueError, KeyError, TypeError):
            return {"ok": False, "error": "malformed request"}
        handler = self.handlers.get(command)
        if handler is None:
            return {"ok": False, "error": f"unknown command {command!r}"}
        try:
            return {"ok": True, "result": await handler(args)}
        except GatewayError as exc:
            return {"ok": False, "error": str(exc)}
        except Exception:
            incident = new_id()
            log.exception("control command %s failed, incident %s", command, incident)
            return {"ok": False, "error": f"internal error (incident {incident})"}


async def call(path: Path, command: str, args: Mapping[str, Any] | None = None) -> Any:
    """Send one command to the running gateway and return its result (ControlError otherwise)."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), 5)
    except (FileNotFoundError, ConnectionRefusedError, TimeoutError):
        raise ControlError(
            f"no running gateway answers on {path} (is `mailward serve` running with this "
            "configuration?)"
        ) from None
    try:
        writer.write(json.dumps({"command": command, "args": dict(args or {})}).encode() + b"\n")
        await writer.drain()
        raw = await asyncio.wait_for(reader.readline(), 30)
    finally:
        writer.close()
    try:
        answer = json.loads(raw)
    except ValueError:
        raise ControlError(f"malformed answer from {path}") from None
    if not answer.get("ok"):
        raise ControlError(str(answer.get("error", "unknown error")))
    return answer.get("result")
