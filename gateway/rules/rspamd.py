"""Delegation to rspamd: one ``POST /checkv2`` per message, rspamd's verdict as our symbols.

What it does: :class:`RspamdClient` sends a message to an rspamd *normal* worker (its HTTP
``/checkv2`` API: the message bytes as the body; the envelope as request headers ``From`` (the
envelope sender, ``<>`` for the null sender), one ``Rcpt`` per recipient, ``IP`` (client address),
``User`` (login), ``Helo``, ``Queue-Id``) and parses the JSON answer into an :class:`RspamdResult`:
rspamd's total, its action and its symbols. :meth:`RspamdResult.hits` turns that into our
:class:`~gateway.rules.model.SymbolHit` s, without counting anything twice:

* ``RSPAMD_SCORE``: the one counted symbol, ``weight`` times rspamd's total, floored at 0 (rspamd may
  add to our score, never subtract from it: its ham symbols such as whitelists or DKIM/DMARC
  "allow" are inbound trust signals, and a sender must not buy its way past our own rules).
  rspamd's total is taken as is (not the sum of its symbols): it includes what symbols do not
  show, e.g. a GTUBE pre-result sets the total to rspamd's reject threshold with a 0-score
  ``GTUBE`` symbol. rspamd's *action* is recorded in the detail, never obeyed: our thresholds
  decide (``gateway.rules.model.Actions``).
* ``RSPAMD_<NAME>`` for each rspamd symbol with rspamd's score for it, in ``warn`` mode (never
  counted: they are already inside ``RSPAMD_SCORE``); listed for the audit and the header, the
  strongest first, at most :data:`MAX_LISTED`.

One HTTP/1.1 exchange per message (``Connection: close``), written by hand on asyncio streams (no
HTTP library): the request is a handful of lines and the answer is read with hard bounds. The whole
exchange, connect included, runs under ``asyncio.timeout(timeout)``. Every failure — connection
refused or reset, timeout, HTTP status other than 200, a head over :data:`MAX_HEAD` bytes, a body
over ``max_response`` bytes, malformed HTTP or JSON, a JSON without a numeric ``score`` — raises
:class:`RspamdUnavailable` and nothing else (the caller decides: skip or defer).

Reads: the message bytes and envelope it is given; the rspamd URL (``http://host:port[/prefix]``,
from configuration).

Security notes: the message and its envelope (sender, recipients, client IP, login, HELO) are sent
to rspamd, a service the operator configured (plain HTTP: keep it on localhost or a trusted
network; URLs with credentials, a query or another scheme are refused). Nothing is logged here.
Envelope values are stripped of control characters before they become request headers (no header
injection). rspamd's symbol options and descriptions (which may quote message content: URLs,
addresses, file names) are dropped: only symbol names, sanitised to UPPER_SNAKE, and scores are
kept, so results stay free of message content like every other symbol. Error texts name the rspamd
address and the failure, never message content.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from gateway.core import replies
from gateway.core.errors import GatewayError
from gateway.rules.model import SymbolHit

SYMBOL_PREFIX = "RSPAMD_"
SCORE_SYMBOL = "RSPAMD_SCORE"
UNAVAILABLE_SYMBOL = "RSPAMD_UNAVAILABLE"
CHECK_PATH = "/checkv2"

MAX_HEAD = 16 * 1024  # status line and headers of the answer
MAX_RESPONSE = 1024 * 1024  # the JSON body
MAX_LISTED = 32  # rspamd symbols listed per message
MAX_NAME = 64  # characters of a symbol name (after the prefix)
MAX_HEADER_VALUE = 1000  # characters of one request header value

_NOT_NAME = re.compile(r"[^A-Z0-9_]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_ACTION = re.compile(r"[^a-z_ -]")
_PATH = re.compile(r"[A-Za-z0-9/._~%-]+")


class RspamdUnavailable(GatewayError):
    """rspamd could not be asked or gave no usable answer (always temporary)."""

    reply = replies.POLICY_TEMPFAIL


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where ``/checkv2`` is: host, port and the request path (any URL prefix kept)."""

    host: str
    port: int
    path: str

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_url(url: str) -> Endpoint:
    """``http://host:port[/prefix]`` → the endpoint; ValueError says what is wrong."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"not a URL: {exc}") from None
    if parts.scheme != "http":
        raise ValueError("must be an http:// URL (rspamd's normal worker speaks plain HTTP)")
    if not parts.hostname:
        raise ValueError("names no host")
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not carry credentials")
    if parts.query or parts.fragment:
        raise ValueError("must not have a query or fragment")
    if port is None:
        raise ValueError("must give the port (rspamd's normal worker: 11333)")
    endpoint = Endpoint(parts.hostname, port, parts.path.rstrip("/") + CHECK_PATH)
    try:
        endpoint.authority.encode("idna")
    except UnicodeError:
        raise ValueError("host cannot be sent in an HTTP request") from None
    if not _PATH.fullmatch(endpoint.path):
        raise ValueError("path may hold only letters, digits and / . _ ~ % -")
    return endpoint


@dataclass(frozen=True, slots=True)
class RspamdSymbol:
    name: str  # sanitised, without the RSPAMD_ prefix
    score: float


@dataclass(frozen=True, slots=True)
class RspamdResult:
    """rspamd's answer: its total, its action (informative) and its symbols, strongest first."""

    score: float
    action: str
    symbols: tuple[RspamdSymbol, ...]

    def hits(self, weight: float) -> tuple[SymbolHit, tuple[SymbolHit, ...]]:
        """``(RSPAMD_SCORE, listed)``: the one counted symbol and rspamd's own, never counted."""
        counted = SymbolHit(
            SCORE_SYMBOL,
            round(weight * max(self.score, 0.0), 3),
            "enforce",
            f"rspamd total {self.score:g} x weight {weight:g}; rspamd action {self.action}",
        )
        listed = tuple(
            SymbolHit(SYMBOL_PREFIX + s.name, s.score, "warn", "rspamd symbol (in RSPAMD_SCORE)")
            for s in self.symbols[:MAX_LISTED]
        )
        return counted, listed


def unavailable_hit(error: RspamdUnavailable) -> SymbolHit:
    """The zero-score symbol that records a skipped rspamd (``rspamd_on_error = "skip"``)."""
    return SymbolHit(UNAVAILABLE_SYMBOL, 0.0, "enforce", str(error))


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def symbol_name(raw: str) -> str:
    """rspamd's symbol name as an UPPER_SNAKE id fragment (bounded)."""
    return _NOT_NAME.sub("_", raw.upper())[:MAX_NAME] or "UNNAMED"


def parse_result(body: bytes) -> RspamdResult:
    """The ``/checkv2`` JSON → RspamdResult; ValueError when it is not one."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise ValueError("answer is not JSON") from None
    if not isinstance(data, dict):
        raise ValueError("answer is not a JSON object")
    score = _number(data.get("score"))
    if score is None:
        raise ValueError("answer has no numeric score")
    action = data.get("action", "")
    action = _ACTION.sub("?", action[:32]) if isinstance(action, str) else "?"
    raw_symbols = data.get("symbols", {})
    if not isinstance(raw_symbols, dict):
        raise ValueError("answer's symbols are not a JSON object")
    symbols: list[RspamdSymbol] = []
    for key, entry in raw_symbols.items():
        value = _number(entry.get("score")) if isinstance(entry, dict) else None
        if value is None:
            raise ValueError("answer has a symbol without a numeric score")
        symbols.append(RspamdSymbol(symbol_name(key), round(value, 3)))
    symbols.sort(key=lambda s: (-abs(s.score), s.name))
    return RspamdResult(round(score, 3), action, tuple(symbols))


def _header_value(value: str) -> bytes:
    return _CONTROL.sub("", value)[:MAX_HEADER_VALUE].strip().encode("utf-8", "replace")


class RspamdClient:
    """Asks one rspamd normal worker about messages; see the module docstring."""

    def __init__(self, url: str, timeout: float, *, max_response: int = MAX_RESPONSE) -> None:
        self.endpoint = parse_url(url)
        self.timeout = timeout
        self.max_response = max_response

    @property
    def where(self) -> str:
        return self.endpoint.authority

    async def check(
        self,
        message: bytes,
        *,
        sender: str,
        recipients: Sequence[str],
        ip: str | None = None,
        login: str | None = None,
        helo: str | None = None,
        queue_id: str | None = None,
    ) -> RspamdResult:
        """rspamd's result for ``message``; RspamdUnavailable on any failure."""
        envelope: list[tuple[bytes, str]] = [(b"From", sender or "<>")]
        envelope += [(b"Rcpt", r) for r in recipients]
        optional = ((b"IP", ip), (b"User", login), (b"Helo", helo), (b"Queue-Id", queue_id))
        envelope += [(name, value) for name, value in optional if value]
        head = [
            f"POST {self.endpoint.path} HTTP/1.1".encode("ascii"),
            b"Host: " + self.endpoint.authority.encode("idna"),
            b"Content-Length: " + str(len(message)).encode(),
            b"Connection: close",
            *(name + b": " + _header_value(value) for name, value in envelope),
        ]
        request = b"\r\n".join(head) + b"\r\n\r\n"
        where = f"rspamd at {self.where}"
        try:
            async with asyncio.timeout(self.timeout):
                status, body = await self._exchange(request, message)
        except TimeoutError:  # before OSError: TimeoutError is one
            raise RspamdUnavailable(f"{where}: no answer within {self.timeout:g} s") from None
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise RspamdUnavailable(f"{where}: {reason}") from None
        except asyncio.IncompleteReadError:
            raise RspamdUnavailable(f"{where}: connection closed before the answer ended") from None
        except asyncio.LimitOverrunError:
            raise RspamdUnavailable(f"{where}: answer head over {MAX_HEAD} bytes") from None
        except ValueError as exc:
            raise RspamdUnavailable(f"{where}: {exc}") from None
        if status != 200:
            raise RspamdUnavailable(f"{where}: HTTP status {status}")
        try:
            return parse_result(body)
        except ValueError as exc:
            raise RspamdUnavailable(f"{where}: {exc}") from None

    async def _exchange(self, request: bytes, message: bytes) -> tuple[int, bytes]:
        reader, writer = await asyncio.open_connection(
            self.endpoint.host, self.endpoint.port, limit=MAX_HEAD
        )
        try:
            writer.write(request)
            writer.write(message)
            await writer.drain()
            status, headers = _parse_head(await reader.readuntil(b"\r\n\r\n"))
            if headers.get("transfer-encoding", "").lower() == "chunked":
                body = await self._read_chunked(reader)
            elif "content-length" in headers:
                length = _content_length(headers["content-length"])
                if length > self.max_response:
                    raise ValueError(f"answer body over {self.max_response} bytes")
                body = await reader.readexactly(length)
            else:
                body = await self._read_to_eof(reader)
            return status, body
        finally:
            writer.close()

    async def _read_chunked(self, reader: asyncio.StreamReader) -> bytes:
        body = bytearray()
        while True:
            line = await reader.readuntil(b"\r\n")
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise ValueError("malformed chunked answer") from None
            if size < 0 or len(body) + size > self.max_response:
                raise ValueError(f"answer body over {self.max_response} bytes")
            if size == 0:
                break
            chunk = await reader.readexactly(size + 2)
            if chunk[-2:] != b"\r\n":
                raise ValueError("malformed chunked answer")
            body += chunk[:-2]
        for _ in range(64):  # trailer fields, then the empty line
            if await reader.readuntil(b"\r\n") == b"\r\n":
                return bytes(body)
        raise ValueError("malformed chunked answer")

    async def _read_to_eof(self, reader: asyncio.StreamReader) -> bytes:
        body = bytearray()
        while chunk := await reader.read(65536):
            body += chunk
            if len(body) > self.max_response:
                raise ValueError(f"answer body over {self.max_response} bytes")
        return bytes(body)


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise ValueError("malformed HTTP answer")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise ValueError("malformed HTTP answer")
        headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


def _content_length(value: str) -> int:
    if not value.isdigit():
        raise ValueError("malformed Content-Length")
    return int(value)
