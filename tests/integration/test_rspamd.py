"""Delegation to rspamd: the client against a REAL rspamd and against broken servers, and the
``spam-score`` check with ``rspamd_url`` end to end through the real gateway.

The real rspamd (``tests/fixtures/rspamd.py``, started once for this module) runs the package's
stock rules. Broken rspamds are simulated here: a closed port (refused), a socket that accepts and
never answers (hung), and small asyncio servers that answer bad HTTP or bad JSON.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from gateway.checks.spam_score import Options
from gateway.config.typed import build
from gateway.core.errors import ConfigError
from gateway.rules.rspamd import (
    MAX_LISTED,
    RspamdClient,
    RspamdResult,
    RspamdSymbol,
    RspamdUnavailable,
)
from tests.fixtures.gateway import ALICE, RunningGateway
from tests.fixtures.rspamd import RspamdServer, closed_port_url, silent_url

GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"

RULES = """
[[rule]]
id = "TEST_TAG"
score = 6.0
description = "test: reaches add_header"
body_regex = '''tag-me-please'''
"""


def message(body: str) -> bytes:
    return (
        f"From: Alice <{ALICE}>\r\nTo: bob@example.net\r\nSubject: status report\r\n"
        f"Date: Thu, 26 Nov 2026 10:00:00 +0000\r\nMessage-ID: <t1@example.com>\r\n\r\n"
        f"Hello Bob,\r\n\r\n{body}\r\n\r\n"
        f"The figures for this week are in the shared folder, and the\r\n"
        f"review is still planned for Thursday morning. Let me know if that does not suit you.\r\n"
        f"\r\nRegards,\r\nAlice\r\n"
    ).encode()


@pytest.fixture
def rules_dir(tmp_path: Path) -> Path:
    d = tmp_path / "site-rules"
    d.mkdir()
    (d / "50-test.toml").write_text(RULES)
    return d


def spam_gateway(make_gateway: Any, rules_dir: Path, **options: Any) -> RunningGateway:
    gw: RunningGateway = make_gateway(
        {"checks": {"spam-score": {"rules_dirs": [str(rules_dir)], **options}}}
    )
    return gw


def send(gw: RunningGateway, data: bytes) -> str:
    """The reply to the end of data."""
    with gw.smtp() as client:
        client.mail(ALICE)
        assert client.rcpt("bob@example.net")[0] == 250
        code, text = client.data(data)
    return f"{code} {text.decode()}"


def spam_header(data: bytes) -> str:
    head = data[: data.index(b"\r\n\r\n")].decode()
    (line,) = [h for h in head.split("\r\n") if h.startswith("X-Mailward-Spam:")]
    return line


# --- the client against the real rspamd ----------------------------------------------------------


async def test_client_reads_a_real_rspamd_answer(rspamd_server: RspamdServer) -> None:
    client = RspamdClient(rspamd_server.url, 5.0)
    result = await client.check(
        message(GTUBE), sender=ALICE, recipients=["bob@example.net"], ip="127.0.0.1", login=ALICE
    )
    assert result.score >= 15 and result.action == "reject"
    assert "GTUBE" in [s.name for s in result.symbols]
    counted, listed = result.hits(1.0)
    assert (counted.id, counted.score, counted.counted) == ("RSPAMD_SCORE", result.score, True)
    assert "RSPAMD_GTUBE" in [s.id for s in listed]
    assert not any(s.counted for s in listed)  # rspamd's symbols are inside RSPAMD_SCORE

    ham = await client.check(message("Meeting moved to 3pm."), sender=ALICE, recipients=[])
    assert ham.score < 5 and ham.action == "no action"


async def test_client_turns_a_wrong_path_into_unavailable(rspamd_server: RspamdServer) -> None:
    client = RspamdClient(rspamd_server.url + "/not-rspamd", 5.0)
    with pytest.raises(RspamdUnavailable, match=r"HTTP status [45]\d\d"):
        await client.check(message("hi"), sender=ALICE, recipients=[])


# --- the client against broken servers -----------------------------------------------------------

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def fake_rspamd(
    answer: bytes | Handler, seen: list[bytes] | None = None
) -> AsyncIterator[str]:
    """A server that reads one request (head and body) and writes ``answer`` (or runs it)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            await reader.readexactly(length)
            if seen is not None:
                seen.append(head)
            if callable(answer):
                await answer(reader, writer)
            else:
                writer.write(answer)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        await server.wait_closed()


def http(body: bytes, status: str = "200 OK", headers: str = "") -> bytes:
    return (
        f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{headers}Connection: close\r\n\r\n"
    ).encode() + body


ANSWER = json.dumps(
    {
        "score": 7.5,
        "action": "add header",
        "symbols": {
            "MISSING_MID": {"score": 2.5, "options": ["secret content"], "description": "x"},
            "rbl.hit-1": {"score": 5.0},
            "INFO_ONLY": {"score": 0.0},
        },
    }
).encode()


async def ask(url: str, timeout: float = 5.0, **envelope: Any) -> RspamdResult:
    envelope.setdefault("sender", ALICE)
    envelope.setdefault("recipients", ["bob@example.net"])
    return await RspamdClient(url, timeout).check(b"Subject: x\r\n\r\nhi\r\n", **envelope)


async def test_envelope_goes_in_request_headers_without_injection() -> None:
    seen: list[bytes] = []
    async with fake_rspamd(http(ANSWER), seen) as url:
        await ask(
            url,
            sender="",
            recipients=["bob@example.net", "carol@example.net\r\nX-Evil: 1"],
            ip="192.0.2.7",
            login=ALICE,
            helo="client.example",
            queue_id="abc.1",
        )
    lines = seen[0].decode().split("\r\n")
    assert lines[0] == "POST /checkv2 HTTP/1.1"
    for expected in (
        "From: <>",
        "Rcpt: bob@example.net",
        "Rcpt: carol@example.netX-Evil: 1",  # CR/LF removed: one header, no injected line
        "IP: 192.0.2.7",
        f"User: {ALICE}",
        "Helo: client.example",
        "Queue-Id: abc.1",
        "Connection: close",
    ):
        assert expected in lines
    assert not any(line.startswith("X-Evil") for line in lines)


async def test_answer_is_parsed_sorted_sanitised_and_weighted() -> None:
    async with fake_rspamd(http(ANSWER)) as url:
        result = await ask(url)
    assert result.score == 7.5 and result.action == "add header"
    assert [(s.name, s.score) for s in result.symbols] == [
        ("RBL_HIT_1", 5.0),
        ("MISSING_MID", 2.5),
        ("INFO_ONLY", 0.0),
    ]
    counted, listed = result.hits(0.5)
    assert (counted.id, counted.score) == ("RSPAMD_SCORE", 3.75)
    assert [f"{s.id}({s.score:g})" for s in listed] == [
        "RSPAMD_RBL_HIT_1(5)",
        "RSPAMD_MISSING_MID(2.5)",
        "RSPAMD_INFO_ONLY(0)",
    ]
    assert all("secret" not in s.detail for s in (counted, *listed))  # options are dropped


def test_negative_total_never_lowers_ours_and_listing_is_bounded() -> None:
    many = tuple(RspamdSymbol(f"S{i}", -1.0) for i in range(MAX_LISTED + 10))
    counted, listed = RspamdResult(-4.0, "no action", many).hits(1.0)
    assert counted.score == 0.0
    assert len(listed) == MAX_LISTED


async def test_chunked_answer_is_read() -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        + f"{10:x}\r\n".encode()
        + ANSWER[:10]
        + b"\r\n"
        + f"{len(ANSWER) - 10:x};ext=1\r\n".encode()
        + ANSWER[10:]
        + b"\r\n0\r\n\r\n"
    )
    async with fake_rspamd(chunked) as url:
        assert (await ask(url)).score == 7.5


async def test_answer_until_eof_is_read() -> None:
    async with fake_rspamd(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + ANSWER) as url:
        assert (await ask(url)).score == 7.5


@pytest.mark.parametrize(
    ("answer", "problem"),
    [
        (http(b"not json"), "not JSON"),
        (http(b"[1, 2]"), "not a JSON object"),
        (http(b"[" * 100_000), "not JSON"),  # deep nesting: RecursionError inside json
        (http(b'{"action": "reject"}'), "no numeric score"),
        (http(b'{"score": "15"}'), "no numeric score"),
        (http(b'{"score": NaN}'), "no numeric score"),
        (http(b'{"score": 1, "symbols": []}'), "symbols are not"),
        (http(b'{"score": 1, "symbols": {"X": {"score": null}}}'), "without a numeric score"),
        (http(b'{"error": "bad"}', "500 Internal"), "HTTP status 500"),
        (b"SMTP/1.0 200 OK\r\n\r\n", "malformed HTTP"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "malformed HTTP"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 12x\r\n\r\n", "malformed Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 99999999\r\n\r\n", "over 1048576 bytes"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{}", "closed before the answer"),
        (b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n", "head over"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "malformed chunked"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcdXY", "malformed chunked"),
        (b"", "closed before the answer"),
    ],
)
async def test_bad_answers_are_unavailable(answer: bytes, problem: str) -> None:
    async with fake_rspamd(answer) as url:
        with pytest.raises(RspamdUnavailable, match=re.escape(problem)):
            await ask(url)


async def test_endless_body_is_cut_at_the_bound() -> None:
    async def stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
        for _ in range(40):  # 2.5 MiB, beyond the 1 MiB bound
            writer.write(b"x" * 65536)
            await writer.drain()

    async with fake_rspamd(stream) as url:
        with pytest.raises(RspamdUnavailable, match="over 1048576 bytes"):
            await ask(url)


async def test_refused_connection_is_unavailable() -> None:
    with pytest.raises(RspamdUnavailable, match=r"rspamd at 127\.0\.0\.1:\d+: "):
        await ask(closed_port_url())


async def test_time_limit_holds_against_a_silent_server() -> None:
    with silent_url() as url:
        started = time.monotonic()
        with pytest.raises(RspamdUnavailable, match=r"no answer within 0\.5 s"):
            await ask(url, timeout=0.5)
        assert 0.4 < time.monotonic() - started < 2.0


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"rspamd_url": "https://127.0.0.1:11333"}, "http://"),
        ({"rspamd_url": "127.0.0.1:11333"}, "http://"),
        ({"rspamd_url": "http://127.0.0.1"}, "port"),
        ({"rspamd_url": "http://:11333"}, "no host"),
        ({"rspamd_url": "http://u:pw@127.0.0.1:11333"}, "credentials"),
        ({"rspamd_url": "http://127.0.0.1:11333/?x=1"}, "query"),
        ({"rspamd_url": "http://127.0.0.1:11333/a b"}, "path"),
        ({"rspamd_url": "http://127.0.0.1:99999"}, "not a URL"),
        ({"rspamd_timeout": 0}, "positive"),
        ({"rspamd_weight": -1.0}, ">= 0"),
        ({"rspamd_on_error": "continue"}, "skip"),
    ],
)
def test_bad_options_are_refused(options: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError) as err:
        build(Options, options, "site.toml", "checks.spam-score")
    key = next(iter(options))
    assert f"checks.spam-score.{key}" in str(err.value) and problem in str(err.value)
    assert "pw" not in str(err.value)


def test_url_prefix_is_kept() -> None:
    client = RspamdClient("http://[::1]:11333/rspamd/", 1.0)
    assert (client.where, client.endpoint.path) == ("[::1]:11333", "/rspamd/checkv2")


# --- end to end: the gateway with rspamd -----------------------------------------------------------


def test_gtube_is_refused_with_rspamds_symbol_in_the_audit(
    make_gateway: Any, rules_dir: Path, rspamd_server: RspamdServer
) -> None:
    gw = spam_gateway(make_gateway, rules_dir, rspamd_url=rspamd_server.url)
    reply = send(gw, message(GTUBE))
    assert reply.startswith("550 5.7.1 Message refused as spam"), reply
    assert gw.upstream.messages == []
    (verdict,) = gw.records(kind="message")[-1].verdicts
    assert (verdict.check_id, verdict.action) == ("spam-score", "reject")
    assert "GTUBE(1000)" in verdict.reason  # ours
    assert "RSPAMD_SCORE(15)" in verdict.reason  # rspamd's total, counted once
    assert "RSPAMD_GTUBE(0, info)" in verdict.reason  # rspamd's symbol, listed


@pytest.mark.parametrize("weight", [1.0, 0.5])
def test_rspamds_total_counts_on_its_own(
    make_gateway: Any, rules_dir: Path, rspamd_server: RspamdServer, weight: float
) -> None:
    """With our GTUBE rule off, rspamd's verdict alone (15 x weight) sets the action."""
    (rules_dir / "60-no-gtube.toml").write_text("[override.GTUBE]\nenabled = false\n")
    gw = spam_gateway(make_gateway, rules_dir, rspamd_url=rspamd_server.url, rspamd_weight=weight)
    reply = send(gw, message(GTUBE))
    if weight == 1.0:
        assert reply.startswith("550 5.7.1 Message refused as spam (score 15)"), reply
        return
    assert reply.startswith("250"), reply  # 7.5: add_header
    (received,) = gw.upstream.messages
    header = spam_header(received.data)
    assert header.startswith("X-Mailward-Spam: 7.5, RSPAMD_SCORE(7.5)"), header
    assert "RSPAMD_GTUBE(0, info)" in header


def test_ham_is_relayed_and_a_scored_message_shows_rspamds_symbols(
    make_gateway: Any, rules_dir: Path, rspamd_server: RspamdServer
) -> None:
    gw = spam_gateway(make_gateway, rules_dir, rspamd_url=rspamd_server.url)
    assert send(gw, message("Meeting moved to 3pm, see you there.")).startswith("250 2.0.0 Ok")
    tagged = message("please tag-me-please now")
    assert send(gw, tagged).startswith("250 2.0.0 Ok")
    ham, scored = gw.upstream.messages
    assert b"X-Mailward-Spam" not in ham.data
    header = spam_header(scored.data)
    assert "TEST_TAG(6)" in header and "RSPAMD_SCORE(" in header, header
    assert "RSPAMD_FROM_HAS_DN(0, info)" in header, header  # one of rspamd's own symbols
    assert scored.data.endswith(tagged)


@pytest.mark.parametrize("broken", ["refused", "silent"])
def test_broken_rspamd_is_skipped_and_our_rules_decide(
    make_gateway: Any, rules_dir: Path, broken: str
) -> None:
    with silent_url() as silent:
        url = closed_port_url() if broken == "refused" else silent
        gw = spam_gateway(make_gateway, rules_dir, rspamd_url=url, rspamd_timeout=1.0)
        started = time.monotonic()
        assert send(gw, message("please tag-me-please now")).startswith("250 2.0.0 Ok")
        assert time.monotonic() - started < 5.0  # the time limit holds (not the check's 10 s)
        assert send(gw, message(GTUBE)).startswith("550 5.7.1")  # our own rules still refuse
    (received,) = gw.upstream.messages
    header = spam_header(received.data)
    assert header == "X-Mailward-Spam: 6, TEST_TAG(6), RSPAMD_UNAVAILABLE(0)", header
    (verdict,) = gw.records(kind="message")[-1].verdicts
    assert "RSPAMD_UNAVAILABLE(0)" in verdict.reason


@pytest.mark.parametrize("broken", ["refused", "silent"])
def test_broken_rspamd_defers_when_asked_to(
    make_gateway: Any, rules_dir: Path, broken: str
) -> None:
    with silent_url() as silent:
        url = closed_port_url() if broken == "refused" else silent
        gw = spam_gateway(
            make_gateway, rules_dir, rspamd_url=url, rspamd_timeout=1.0, rspamd_on_error="defer"
        )
        started = time.monotonic()
        reply = send(gw, message("Meeting moved to 3pm."))
        elapsed = time.monotonic() - started
    assert reply.startswith("451 4.3.0 Temporary policy failure (spam-score)"), reply
    assert elapsed < 5.0
    assert gw.upstream.messages == []
    rec = gw.records(kind="message")[-1]
    (verdict,) = rec.verdicts
    assert (verdict.check_id, verdict.action, verdict.applied) == ("spam-score", "defer", True)


def test_our_refusal_stands_when_rspamd_fails_in_defer_mode(
    make_gateway: Any, rules_dir: Path
) -> None:
    """A message beyond our MIME bounds is refused 554 whatever rspamd does (its task is dropped)."""
    gw = spam_gateway(
        make_gateway, rules_dir, rspamd_url=closed_port_url(), rspamd_on_error="defer"
    )
    parts = "".join(
        f'Content-Type: multipart/mixed; boundary="b{i}"\r\n\r\n--b{i}\r\n' for i in range(40)
    )
    data = (
        f"From: {ALICE}\r\nTo: bob@example.net\r\nSubject: nested\r\nMIME-Version: 1.0\r\n"
        f"{parts}Content-Type: text/plain\r\n\r\nhi\r\n"
    ).encode()
    assert send(gw, data).startswith("554 5.6.0")
    assert gw.upstream.messages == []
