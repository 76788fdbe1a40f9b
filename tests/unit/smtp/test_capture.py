"""CaptureUpstream: what it records, the .eml outbox, and every documented fault."""

from __future__ import annotations

import asyncio
import contextlib
import re
import smtplib
import socket
import stat
import time

import pytest

from gateway.smtp.capture import (
    CaptureThread,
    CaptureUpstream,
    drop,
    drop_mid_data,
    reply,
    stall,
)
from tests.fixtures.upstream import UpstreamFactory, eventually

MESSAGE = b"Subject: hi\r\n\r\n.leading dot\r\n.\r\nbody\r\n"


class Wire:
    """A raw SMTP client over asyncio streams: exact bytes in, reply lines out."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Wire:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def reply(self, timeout: float = 5.0) -> str:
        """One (possibly multi-line) reply, lines joined with newlines."""
        lines = []
        while True:
            line = (await asyncio.wait_for(self.reader.readline(), timeout)).decode()
            if not line:
                raise ConnectionError("closed")
            lines.append(line.rstrip("\r\n"))
            if line[3:4] != "-":
                return "\n".join(lines)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def command(self, line: str) -> str:
        await self.send(line.encode() + b"\r\n")
        return await self.reply()

    async def closed(self, timeout: float = 5.0) -> bool:
        try:
            return await asyncio.wait_for(self.reader.read(), timeout) == b""
        except ConnectionResetError:
            return True

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


async def open_transaction(port: int) -> Wire:
    wire = await Wire.open(port)
    assert (await wire.reply()).startswith("220 ")
    assert (await wire.command("EHLO client.test")).startswith("250")
    assert (await wire.command("MAIL FROM:<a@b.test>")).startswith("250")
    assert (await wire.command("RCPT TO:<c@d.test>")).startswith("250")
    return wire


def smtp_client(handle: CaptureThread) -> smtplib.SMTP:
    return smtplib.SMTP("127.0.0.1", handle.port, local_hostname="client.test", timeout=5)


# --- recording and the outbox ---------------------------------------------------------------------


def test_eml_written_atomically_with_exact_bytes(sync_upstream: CaptureThread) -> None:
    up = sync_upstream.upstream
    with smtp_client(sync_upstream) as client:
        client.sendmail("a@b.test", ["c@d.test", "e@f.test"], MESSAGE)

    [received] = up.messages
    assert received.data == MESSAGE
    assert received.mail_from == "a@b.test"
    assert received.rcpt_tos == ("c@d.test", "e@f.test")
    assert received.path is not None
    assert received.path.read_bytes() == MESSAGE
    assert re.fullmatch(rf"\d{{8}}T\d{{6}}\.\d{{6}}Z-{received.queue_id}\.eml", received.path.name)
    assert stat.S_IMODE(received.path.stat().st_mode) == 0o600
    assert [p.name for p in received.path.parent.iterdir()] == [received.path.name]  # no tmp


def test_eml_per_message_and_counts_per_connection(sync_upstream: CaptureThread) -> None:
    up = sync_upstream.upstream
    with smtp_client(sync_upstream) as client:
        client.sendmail("a@b.test", ["c@d.test"], b"Subject: 1\r\n\r\none\r\n")
        client.sendmail("a@b.test", ["c@d.test"], b"Subject: 2\r\n\r\ntwo\r\n")
    with smtp_client(sync_upstream) as client:
        client.sendmail("a@b.test", ["c@d.test"], b"Subject: 3\r\n\r\nthree\r\n")

    assert up.connections_opened == 2
    assert up.transactions_per_connection == [2, 1]
    assert [m.connection_id for m in up.messages] == [1, 1, 2]
    outbox = up.outbox_dir
    assert outbox is not None
    assert sorted(p.read_bytes() for p in outbox.glob("*.eml")) == sorted(
        m.data for m in up.messages
    )


async def test_dot_unstuffing_keeps_bytes_and_reply_names_queue_id(
    upstream: CaptureUpstream,
) -> None:
    wire = await open_transaction(upstream.port)
    assert (await wire.command("DATA")).startswith("354")
    await wire.send(b"..x\r\n..\r\n...\r\nend\r\n.\r\n")
    final = await wire.reply()
    await wire.close()

    [received] = upstream.messages
    assert received.data == b".x\r\n.\r\n..\r\nend\r\n"
    assert final == f"250 2.0.0 Ok: queued as {received.queue_id}"


async def test_null_sender_and_mail_options_recorded(upstream: CaptureUpstream) -> None:
    wire = await Wire.open(upstream.port)
    await wire.reply()
    await wire.command("EHLO client.test")
    assert (await wire.command("MAIL FROM:<> BODY=8BITMIME SIZE=10")).startswith("250")
    await wire.command("RCPT TO:<c@d.test>")
    await wire.command("DATA")
    await wire.send(b"x\r\n.\r\n")
    assert (await wire.reply()).startswith("250")
    await wire.command("QUIT")
    await wire.close()

    assert upstream.messages[0].mail_from == ""
    assert upstream.messages[0].mail_options == ("BODY=8BITMIME", "SIZE=10")
    await eventually(lambda: upstream.connections[0].closed)
    assert upstream.connections[0].quit
    assert upstream.connections[0].commands == ["EHLO", "MAIL", "RCPT", "DATA", "QUIT"]


async def test_extensions_follow_options(upstream_factory: UpstreamFactory) -> None:
    full = await upstream_factory()
    bare = await upstream_factory(smtputf8=False, eightbitmime=False, max_message_size=None)

    async def ehlo(port: int) -> list[str]:
        wire = await Wire.open(port)
        await wire.reply()
        lines = (await wire.command("EHLO client.test")).splitlines()
        await wire.close()
        return [line[4:].split(" ")[0] for line in lines[1:]]

    assert {"SIZE", "8BITMIME", "SMTPUTF8"} <= set(await ehlo(full.port))
    assert "AUTH" not in await ehlo(full.port)
    assert not {"SIZE", "8BITMIME", "SMTPUTF8", "AUTH"} & set(await ehlo(bare.port))


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
async def test_auth_users_required_and_checked(upstream_factory: UpstreamFactory) -> None:
    up = await upstream_factory(auth_users={"gw": "pw"}, auth_require_tls=False)
    wire = await Wire.open(up.port)
    await wire.reply()
    assert "AUTH" in await wire.command("EHLO client.test")

    assert (await wire.command("MAIL FROM:<a@b.test>")).startswith("530")
    assert (await wire.command("AUTH PLAIN AGd3AHdyb25n")).startswith("535")  # gw / wrong
    assert (await wire.command("AUTH PLAIN AGd3AHB3")).startswith("235")  # gw / pw
    assert (await wire.command("MAIL FROM:<a@b.test>")).startswith("250")
    await wire.close()


def test_outbox_write_failure_answers_451(sync_upstream: CaptureThread) -> None:
    outbox = sync_upstream.upstream.outbox_dir
    assert outbox is not None
    outbox.rmdir()
    outbox.write_bytes(b"")  # a file where the directory was: the .eml cannot be created

    with smtp_client(sync_upstream) as client, pytest.raises(smtplib.SMTPDataError) as info:
        client.sendmail("a@b.test", ["c@d.test"], MESSAGE)

    assert info.value.smtp_code == 451
    assert sync_upstream.upstream.messages == []


# --- faults ---------------------------------------------------------------------------------------


def test_banner_reply_is_one_shot_and_closes(sync_upstream: CaptureThread) -> None:
    sync_upstream.upstream.inject("BANNER", reply("421 4.3.2 Shutting down"))

    with pytest.raises(smtplib.SMTPConnectError) as info:
        smtp_client(sync_upstream)
    assert info.value.smtp_code == 421

    with smtp_client(sync_upstream) as client:
        assert client.noop()[0] == 250


def test_persistent_and_counted_faults(sync_upstream: CaptureThread) -> None:
    up = sync_upstream.upstream
    up.inject("MAIL", reply("451 4.3.0 Twice", times=2))
    up.inject("RCPT", reply("550 5.1.1 Always", times=None))

    with smtp_client(sync_upstream) as client:
        client.ehlo()
        codes = [client.mail("a@b.test")[0] for _ in range(3)]
        assert codes == [451, 451, 250]
        assert [client.rcpt("c@d.test")[0] for _ in range(3)] == [550, 550, 550]

    up.clear_faults()
    with smtp_client(sync_upstream) as client:
        client.sendmail("a@b.test", ["c@d.test"], MESSAGE)
    assert len(up.messages) == 1


def test_rcpt_faults_for_specific_recipients(sync_upstream: CaptureThread) -> None:
    up = sync_upstream.upstream
    up.fail_rcpt = {"Bad@D.test": "550 5.1.1 No such user"}
    up.inject("RCPT", reply("450 4.2.1 Busy", recipients={"busy@d.test"}))

    with smtp_client(sync_upstream) as client:
        refused = client.sendmail("a@b.test", ["bad@d.test", "busy@d.test", "ok@d.test"], MESSAGE)

    assert refused == {
        "bad@d.test": (550, b"5.1.1 No such user"),
        "busy@d.test": (450, b"4.2.1 Busy"),
    }
    assert up.messages[0].rcpt_tos == ("ok@d.test",)


def test_drop_at_mail_closes_connection(sync_upstream: CaptureThread) -> None:
    sync_upstream.upstream.inject("MAIL", drop())

    with smtp_client(sync_upstream) as client:
        client.ehlo()
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.mail("a@b.test")


def test_stall_delays_then_answers_normally(sync_upstream: CaptureThread) -> None:
    sync_upstream.upstream.inject("EHLO", stall(0.3))

    with smtp_client(sync_upstream) as client:
        started = time.monotonic()
        code, _ = client.ehlo()
        assert code == 250
        assert time.monotonic() - started >= 0.3


def test_eom_reply_refuses_without_recording(sync_upstream: CaptureThread) -> None:
    up = sync_upstream.upstream
    up.inject("EOM", reply("554 5.7.1 Spam"))

    with smtp_client(sync_upstream) as client:
        with pytest.raises(smtplib.SMTPDataError) as info:
            client.sendmail("a@b.test", ["c@d.test"], MESSAGE)
        assert info.value.smtp_code == 554
        client.sendmail("a@b.test", ["c@d.test"], MESSAGE)

    assert len(up.messages) == 1
    assert up.transactions_per_connection == [1]


def test_data_stage_reply(sync_upstream: CaptureThread) -> None:
    sync_upstream.upstream.inject("DATA", reply("451 4.3.0 No DATA now"))

    with smtp_client(sync_upstream) as client:
        client.ehlo()
        client.mail("a@b.test")
        client.rcpt("c@d.test")
        assert client.docmd("DATA") == (451, b"4.3.0 No DATA now")
        assert client.rset()[0] == 250

    assert sync_upstream.upstream.messages == []


async def test_drop_mid_data_closes_after_first_line(upstream: CaptureUpstream) -> None:
    upstream.inject("DATA", drop_mid_data())
    wire = await open_transaction(upstream.port)

    assert (await wire.command("DATA")).startswith("354")
    await wire.send(b"Subject: partial\r\n")

    assert await wire.closed()
    assert upstream.messages == []
    await eventually(lambda: upstream.connections[0].closed)
    await wire.close()


async def test_drop_at_eom_after_all_data(upstream: CaptureUpstream) -> None:
    upstream.inject("EOM", drop())
    wire = await open_transaction(upstream.port)
    await wire.command("DATA")

    await wire.send(MESSAGE + b".\r\n")

    assert await wire.closed()
    assert upstream.messages == []
    await wire.close()


async def test_blackhole_accepts_but_never_greets(upstream: CaptureUpstream) -> None:
    upstream.blackhole = True
    wire = await Wire.open(upstream.port)

    with pytest.raises(TimeoutError):
        await wire.reply(timeout=0.3)
    assert upstream.connections_opened == 1
    await wire.close()

    upstream.blackhole = False
    wire = await Wire.open(upstream.port)
    assert (await wire.reply()).startswith("220 ")
    await wire.close()


def test_refuse_and_resume_on_the_same_port(sync_upstream: CaptureThread) -> None:
    port = sync_upstream.port
    sync_upstream.refuse()

    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), 2):
        pass

    sync_upstream.resume()
    assert sync_upstream.port == port
    with smtp_client(sync_upstream) as client:
        assert client.noop()[0] == 250


def test_inject_validates_its_arguments(upstream_factory: UpstreamFactory) -> None:
    up = CaptureUpstream()

    with pytest.raises(ValueError, match="unknown command"):
        up.inject("HELO", drop())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="DATA only"):
        up.inject("RCPT", drop_mid_data())
    with pytest.raises(ValueError, match="RCPT only"):
        up.inject("MAIL", reply("550 5.1.1 x", recipients={"a@b"}))
    with pytest.raises(ValueError, match="one-line SMTP reply"):
        reply("hello")
    with pytest.raises(ValueError, match="times"):
        stall(1.0, times=0)
