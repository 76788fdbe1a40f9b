"""UpstreamRelay against a real CaptureUpstream over TCP: delivery, pool, TLS, AUTH, failures."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from gateway.core import replies
from gateway.core.errors import (
    UpstreamDropped,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from gateway.core.ports import UpstreamReply
from gateway.relay import UpstreamRelay
from gateway.smtp.capture import CaptureUpstream, drop, drop_mid_data, reply, stall
from tests.fixtures.certs import CertFiles
from tests.fixtures.upstream import (
    RelayFactory,
    UpstreamFactory,
    eventually,
    relay_config,
    tls_relay_config,
)

SENDER = "sender@gw.test"
RCPT = "rcpt@dest.test"
MESSAGE = b"From: sender@gw.test\r\nTo: rcpt@dest.test\r\nSubject: test\r\n\r\nHello.\r\n"


async def send(
    relay: UpstreamRelay,
    content: bytes = MESSAGE,
    *,
    mail_from: str = SENDER,
    rcpts: tuple[str, ...] = (RCPT,),
    smtputf8: bool = False,
    body_8bitmime: bool = False,
) -> UpstreamReply:
    """One complete transaction; asserts MAIL and RCPT were accepted, returns the final reply."""
    mail_reply, txn = await relay.begin(
        mail_from, smtputf8=smtputf8, body_8bitmime=body_8bitmime, size=len(content)
    )
    assert txn is not None, mail_reply
    for rcpt in rcpts:
        assert (await txn.rcpt(rcpt)).code == 250
    return await txn.data(content)


# --- delivery -------------------------------------------------------------------------------------


async def test_message_arrives_byte_exact_with_leading_dots(
    upstream: CaptureUpstream, relay_factory: RelayFactory
) -> None:
    content = (
        b"Subject: dots\r\n\r\n.leading dot\r\n.\r\n..two dots\r\n\r\n. space\r\nlast line\r\n"
    )
    relay = relay_factory(relay_config(upstream))

    final = await send(relay, content, rcpts=(RCPT, "second@dest.test"))

    assert final.code == 250
    assert final.status == "2.0.0"
    [received] = upstream.messages
    assert received.data == content
    assert received.mail_from == SENDER
    assert received.rcpt_tos == (RCPT, "second@dest.test")
    assert final.queue_id == received.queue_id
    assert f"SIZE={len(content)}" in received.mail_options


async def test_smtputf8_and_8bit_content_arrive_intact(
    upstream: CaptureUpstream, relay_factory: RelayFactory
) -> None:
    content = "Subject: Grüße\r\n\r\nJörg schreibt: ça va? 日本語\r\n".encode() + b"\xe9raw\r\n"
    relay = relay_factory(relay_config(upstream))

    final = await send(
        relay,
        content,
        mail_from="jörg@exämple.de",
        rcpts=("zoë@dest.test",),
        smtputf8=True,
        body_8bitmime=True,
    )

    assert final.code == 250
    [received] = upstream.messages
    assert received.data == content
    assert received.mail_from == "jörg@exämple.de"
    assert received.rcpt_tos == ("zoë@dest.test",)
    assert "SMTPUTF8" in received.mail_options
    assert "BODY=8BITMIME" in received.mail_options


async def test_size_not_sent_when_upstream_does_not_offer_it(
    upstream_factory: UpstreamFactory, relay_factory: RelayFactory
) -> None:
    upstream = await upstream_factory(max_message_size=None)
    relay = relay_factory(relay_config(upstream))

    assert (await send(relay)).code == 250

    assert not any(o.startswith("SIZE=") for o in upstream.messages[0].mail_options)


@pytest.mark.parametrize(
    ("address", "smtputf8", "expected"),
    [
        ("a@b.test> SIZE=1", False, replies.MALFORMED_ADDRESS),
        ("a@b.test\r\nRSET", False, replies.MALFORMED_ADDRESS),
        ("<a@b.test>", False, replies.MALFORMED_ADDRESS),
        ("jörg@b.test", False, replies.RECIPIENT_NOT_ASCII),
    ],
)
async def test_unsafe_sender_refused_before_anything_is_sent(
    upstream: CaptureUpstream,
    relay_factory: RelayFactory,
    address: str,
    smtputf8: bool,
    expected: replies.Reply,
) -> None:
    relay = relay_factory(relay_config(upstream))

    with pytest.raises(UpstreamRejected) as info:
        await relay.begin(address, smtputf8=smtputf8, body_8bitmime=False, size=None)

    assert info.value.reply == expected
    assert upstream.connections_opened == 0


async def test_unsafe_recipient_ends_transaction_and_frees_connection(
    upstream: CaptureUpstream, relay_factory: RelayFactory
) -> None:
    relay = relay_factory(relay_config(upstream, pool_size=1))
    _, txn = await relay.begin(SENDER, smtputf8=False, body_8bitmime=False, size=None)
    assert txn is not None

    with pytest.raises(UpstreamRejected) as info:
        await txn.rcpt("x@y.test> NOTIFY=NEVER")
    assert info.value.reply == replies.MALFORMED_ADDRESS
    with pytest.raises(RuntimeError):
        await txn.rcpt(RCPT)
    await txn.abort()  # a no-op now

    assert (await send(relay)).code == 250  # the only pooled connection was given back
    assert upstream.connections[0].commands == ["EHLO", "MAIL", "RSET", "MAIL", "RCPT", "DATA"]


async def test_null_sender_is_relayed(
    upstream: CaptureUpstream, relay_factory: RelayFactory
) -> None:
    relay = relay_factory(relay_config(upstream))

    assert (await send(relay, mail_from="")).code == 250

    assert upstream.messages[0].mail_from == ""


# --- pool -----------------------------------------------------------------------------------------


async def test_connection_is_reused_across_messages(
    upstream: CaptureUpstream, relay_factory: RelayFactory
) -> None:
    relay = relay_factory(relay_config(upstream))

    for _ in range(5):
        assert (await send(relay)).code == 250

    assert len(upstream.messages) == 5
    assert upstream.connections_opened == 1
    assert upstream.transactions_per_connection == [5]
    assert relay.idle_connections == 1


async def test_connection_renewed_after_max_messages(
    upstream: CaptureUpstream, relay_factory: RelayFactory
) -> None:
    relay = relay_factory(relay_config(upstream, max_messages_per_connection=2))

    for _ in range(5):
        assert (await send(relay)).code == 250

    assert upstream.transactions_per_connection == [2, 2, 1]
    await eventually(lambda: upstream.connections[0].closed and upstream.connections[1].closed)
    assert upstream.connections[0].quit
    assert upstream.connections[1].quit
    assert not upstream.connections[2].closed


async def test_pool_limit_makes_caller_wait_then_gives_up(
    upstream: CaptureUpstream, relay_factory: RelayFactory
) -> None:
    relay = relay_factory(relay_config(upstream, pool_size=1, connect_timeout=0.3))
    _, held = await relay.begin(SENDER, smtputf8=False, body_8bitmime=False, size=None)
    assert held is not None

    started = time.monotonic()
    with pytest.raises(UpstreamUnreachable) as info:
        await relay.begin(SENDER, smtputf8=False, body_8bitmime=False, size=None)
    waited = time.monotonic() - started

    assert 0.25 <= waited < 2.0
    assert info.value.reply == replies.UPSTREAM_UNAVAILABLE
    assert upstream.connections_opened == 1
    await held.abort()


async def test_waiting_caller_gets_the_released_connection(
    upstream: CaptureUpstream, relay_factory: RelayFactory
) -> None:
    relay = relay_factory(relay_config(upstream, pool_size=1))
    _, first = await relay.begin(SENDER, smtputf8=False, body_8bitmime=False, size=None)
    assert first is not None
    waiting = asyncio.create_task(send(relay))
    await asyncio.sleep(0.1)
    assert not waiting.done()

    assert (await first.rcpt(RCPT)).code == 250
    assert (await first.data(MESSAGE)).code == 250
    assert (await asyncio.wait_for(waiting, 5)).code == 250

    assert upstream.connections_opened == 1
    assert upstream.transactions_per_connection == [2]


async def test_concurrent_senders_share_a_bounded_pool(
    upstream: CaptureUpstream, relay_factory: RelayFactory
) -> None:
    relay = relay_factory(relay_config(upstream, pool_size=2))

    results = await asyncio.gather(*(send(relay) for _ in range(8)))

    assert [r.code for r in results] == [250] * 8
    assert len(upstream.messages) == 8
    assert upstream.connections_opened == 2
    assert relay.open_connections == 2


async def test_idle_connection_is_closed_with_quit(
    upstream: CaptureUpstream, relay_factory: RelayFactory
) -> None:
    relay = relay_factory(relay_config(upstream, pool_idle_seconds=0.2))

    assert (await send(relay)).code == 250
    await eventually(lambda: upstream.connections[0].closed, timeout=3)

    assert upstream.connections[0].quit
    assert relay.open_connections == 0
    assert (await send(relay)).code == 250
    assert upstream.connections_opened == 2


async def test_connection_closed_by_upstream_while_idle_is_replaced(
    upstream: CaptureUpstream, relay_factory: RelayFactory
) -> None:
    relay = relay_factory(relay_config(upstream))
    assert (await send(relay)).code == 250

    await upstream.drop_connections()
    await asyncio.sleep(0.05)

    assert (await send(relay)).code == 250
    assert upstream.connections_opened == 2
    assert len(upstream.messages) == 2


async def test_stale_pooled_connection_retried_once_at_mail(
    upstream: CaptureUpstream, relay_factory: RelayFactory
) -> None:
    relay = relay_factory(relay_config(upstream))
    assert (await send(relay)).code == 250
    upstream.inject("MAIL", drop())  # the pooled connection dies when MAIL arrives

    assert (await send(relay)).code == 250

    assert upstream.connections_opened == 2
    assert upstream.connections[0].commands[-1] == "MAIL"
    assert upstream.transactions_per_connection == [1, 1]


async def test_421_at_mail_on_pooled_connection_retried_on_new_one(
    upstream: CaptureUpstream, relay_factory: RelayFactory
) -> None:
    relay = relay_factory(relay_config(upstream))
    assert (await send(relay)).code == 250
    upstream.inject("MAIL", reply("421 4.4.2 Idle timeout, closing"))

    assert (await send(relay)).code == 250

    assert upstream.transactions_per_connection == [1, 1]


async def test_drop_at_mail_on_fresh_connection_is_not_retried(
    upstream: CaptureUpstream, relay_factory: RelayFactory
) -> None:
    relay = relay_factory(relay_config(upstream))
    upstream.inject("MAIL", drop())

    with pytest.raises(UpstreamDropped):
        await relay.begin(SENDER, smtputf8=False, body_8bitmime=False, size=None)

    assert upstream.connections_opened == 1
    assert relay.open_connections == 0


async def test_abort_sends_rset_and_returns_connection(
    upstream: CaptureUpstream, relay_factory: RelayFactory
) -> None:
    relay = relay_factory(relay_config(upstream))
    _, txn = await relay.begin(SENDER, smtputf8=False, body_8bitmime=False, size=None)
    assert txn is not None
    assert (await txn.rcpt(RCPT)).code == 250

    await txn.abort()
    await txn.abort()  # idempotent
    with pytest.raises(RuntimeError):
        await txn.rcpt(RCPT)
    assert (await send(relay)).code == 250

    assert upstream.connections[0].commands == [
        "EHLO",
        "MAIL",
        "RCPT",
        "RSET",
        "MAIL",
        "RCPT",
        "DATA",
    ]
    assert upstream.connections_opened == 1


async def test_close_quits_idle_connections_and_refuses_new_work(
    upstream: CaptureUpstream, relay_factory: RelayFactory
) -> None:
    relay = relay_factory(relay_config(upstream))
    assert (await send(relay)).code == 250

    await relay.close()
    await eventually(lambda: upstream.connections[0].closed)

    assert upstream.connections[0].quit
    assert relay.open_connections == 0
    with pytest.raises(UpstreamUnreachable):
        await relay.begin(SENDER, smtputf8=False, body_8bitmime=False, size=None)


# --- TLS and AUTH ---------------------------------------------------------------------------------


async def test_starttls_with_verified_certificate(
    tls_upstream: CaptureUpstream, upstream_cert: CertFiles, relay_factory: RelayFactory
) -> None:
    relay = relay_factory(tls_relay_config(tls_upstream, upstream_cert))

    assert (await send(relay)).code == 250

    assert tls_upstream.messages[0].tls
    assert tls_upstream.connections[0].commands.count("EHLO") == 2  # again after STARTTLS


async def test_starttls_untrusted_certificate_is_refused(
    tls_upstream: CaptureUpstream, relay_factory: RelayFactory
) -> None:
    relay = relay_factory(relay_config(tls_upstream, tls="starttls"))  # system CAs only

    with pytest.raises(UpstreamUnreachable) as info:
        await relay.begin(SENDER, smtputf8=False, body_8bitmime=False, size=None)

    assert "CERTIFICATE_VERIFY_FAILED" in str(info.value)
    assert "MAIL" not in tls_upstream.connections[0].commands
    assert relay.open_connections == 0


async def test_starttls_certificate_for_another_host_is_refused(
    upstream_factory: UpstreamFactory, wrong_host_cert: CertFiles, relay_factory: RelayFactory
) -> None:
    upstream = await upstream_factory(tls_context_for_starttls=wrong_host_cert.server_context())
    relay = relay_factory(tls_relay_config(upstream, wrong_host_cert))

    with pytest.raises(UpstreamUnreachable) as info:
        await relay.begin(SENDER, smtputf8=False, body_8bitmime=False, size=None)

    assert "CERTIFICATE_VERIFY_FAILED" in str(info.value)
    assert upstream.messages == []


async def test_starttls_without_verification_accepts_self_signed(
    tls_upstream: CaptureUpstream, relay_factory: RelayFactory
) -> None:
    relay = relay_factory(relay_config(tls_upstream, tls="starttls", verify_certificate=False))

    assert (await send(relay)).code == 250

    assert tls_upstream.messages[0].tls


async def test_starttls_required_but_not_offered_is_an_error_not_plaintext(
    upstream: CaptureUpstream, relay_factory: RelayFactory
) -> None:
    relay = relay_factory(relay_config(upstream, tls="starttls"))

    with pytest.raises(UpstreamUnreachable) as info:
        await relay.begin(SENDER, smtputf8=False, body_8bitmime=False, size=None)

    assert "STARTTLS" in str(info.value)
    assert upstream.connections[0].commands == ["EHLO"]


async def test_implicit_tls(
    implicit_tls_upstream: CaptureUpstream, upstream_cert: CertFiles, relay_factory: RelayFactory
) -> None:
    relay = relay_factory(tls_relay_config(implicit_tls_upstream, upstream_cert, tls="implicit"))

    assert (await send(relay)).code == 250

    assert implicit_tls_upstream.messages[0].tls
    assert implicit_tls_upstream.connections[0].tls


async def test_implicit_tls_untrusted_certificate_is_refused(
    implicit_tls_upstream: CaptureUpstream, relay_factory: RelayFactory
) -> None:
    relay = relay_factory(relay_config(implicit_tls_upstream, tls="implicit"))

    with pytest.raises(UpstreamUnreachable) as info:
        await relay.begin(SENDER, smtputf8=False, body_8bitmime=False, size=None)

    assert "CERTIFICATE_VERIFY_FAILED" in str(info.value)
    assert implicit_tls_upstream.messages == []


async def test_auth_after_starttls(
    upstream_factory: UpstreamFactory, upstream_cert: CertFiles, relay_factory: RelayFactory
) -> None:
    upstream = await upstream_factory(
        tls_context_for_starttls=upstream_cert.server_context(), auth_users={"gw": "s3cret"}
    )
    relay = relay_factory(
        tls_relay_config(upstream, upstream_cert, username="gw"), password="s3cret"
    )

    assert (await send(relay)).code == 250

    assert upstream.messages[0].login == "gw"


async def test_auth_failure_is_unreachable_and_password_never_logged(
    upstream_factory: UpstreamFactory,
    upstream_cert: CertFiles,
    relay_factory: RelayFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    upstream = await upstream_factory(
        tls_context_for_starttls=upstream_cert.server_context(), auth_users={"gw": "right"}
    )
    relay = relay_factory(
        tls_relay_config(upstream, upstream_cert, username="gw"), password="wrong-Pa55word"
    )
    caplog.set_level(logging.DEBUG, logger="mailward.relay")

    with pytest.raises(UpstreamUnreachable) as info:
        await relay.begin(SENDER, smtputf8=False, body_8bitmime=False, size=None)

    assert info.value.upstream_code == 535
    assert upstream.messages == []
    assert "wrong-Pa55word" not in caplog.text
    assert "wrong-Pa55word" not in str(info.value)
    assert caplog.records  # the failure itself was logged


async def test_auth_configured_but_not_offered(
    upstream: CaptureUpstream, relay_factory: RelayFactory
) -> None:
    relay = relay_factory(relay_config(upstream, username="gw"), password="x")

    with pytest.raises(UpstreamUnreachable) as info:
        await relay.begin(SENDER, smtputf8=False, body_8bitmime=False, size=None)

    assert "AUTH" in str(info.value)


# --- unreachable, timeouts, drops -----------------------------------------------------------------


async def test_refused_port_is_unreachable(
    upstream: CaptureUpstream, relay_factory: RelayFactory
) -> None:
    relay = relay_factory(relay_config(upstream))
    await upstream.refuse()

    with pytest.raises(UpstreamUnreachable) as info:
        await relay.begin(SENDER, smtputf8=False, body_8bitmime=False, size=None)
    assert info.value.reply == replies.UPSTREAM_UNAVAILABLE
    assert relay.open_connections == 0

    await upstream.resume()
    assert (await send(relay)).code == 250


async def test_blackhole_times_out(upstream: CaptureUpstream, relay_factory: RelayFactory) -> None:
    upstream.blackhole = True
    relay = relay_factory(relay_config(upstream, connect_timeout=0.3))

    started = time.monotonic()
    with pytest.raises(UpstreamTimeout) as info:
        await relay.begin(SENDER, smtputf8=False, body_8bitmime=False, size=None)

    assert time.monotonic() - started < 2.0
    assert info.value.reply == replies.UPSTREAM_TIMEOUT
    assert relay.open_connections == 0


async def test_421_banner_is_unreachable_with_upstream_reply(
    upstream: CaptureUpstream, relay_factory: RelayFactory
) -> None:
    upstream.inject("BANNER", reply("421 4.3.2 Service shutting down"))
    relay = relay_factory(relay_config(upstream))

    with pytest.raises(UpstreamUnreachable) as info:
        await relay.begin(SENDER, smtputf8=False, body_8bitmime=False, size=None)

    assert info.value.upstream_code == 421
    assert "4.3.2 Service shutting down" in info.value.upstream_text
    assert (await send(relay)).code == 250  # the fault was one-shot


async def test_ehlo_refused_is_unreachable(
    upstream: CaptureUpstream, relay_factory: RelayFactory
) -> None:
    upstream.inject("EHLO", reply("554 5.7.1 Go away"))
    relay = relay_factory(relay_config(upstream))

    with pytest.raises(UpstreamUnreachable) as info:
        await relay.begin(SENDER, smtputf8=False, body_8bitmime=False, size=None)

    assert info.value.upstream_code == 554


async def test_drop_mid_data_raises_dropped_and_connection_not_reused(
    upstream: CaptureUpstream, relay_factory: RelayFactory
) -> None:
    relay = relay_factory(relay_config(upstream))
    assert (await send(relay)).code == 250
    upstream.inject("DATA", drop_mid_data())

    with pytest.raises(UpstreamDropped) as info:
        await send(relay)
    assert info.value.reply == replies.UPSTREAM_DROPPED
    assert relay.open_connections == 0

    assert (await send(relay)).code == 250
    assert upstream.connections_opened == 2
    assert upstream.transactions_per_connection == [1, 1]


async def test_drop_before_final_reply_raises_dropped(
    upstream: CaptureUpstream, relay_factory: RelayFactory
) -> None:
    relay = relay_factory(relay_config(upstream))
    upstream.inject("EOM", drop())

    with pytest.raises(UpstreamDropped):
        await send(relay)

    assert upstream.messages == []
    assert relay.open_connections == 0


async def test_stall_at_end_of_data_beyond_data_timeout(
    upstream: CaptureUpstream, relay_factory: RelayFactory
) -> None:
    relay = relay_factory(relay_config(upstream, data_timeout=0.3))
    upstream.inject("EOM", stall(3.0))

    started = time.monotonic()
    with pytest.raises(UpstreamTimeout) as info:
        await send(relay)

    assert time.monotonic() - started < 2.0
    assert info.value.reply == replies.UPSTREAM_TIMEOUT
    assert relay.open_connections == 0
    assert (await send(relay)).code == 250
    assert upstream.connections_opened == 2


async def test_data_command_uses_command_timeout(
    upstream: CaptureUpstream, relay_factory: RelayFactory
) -> None:
    relay = relay_factory(relay_config(upstream, command_timeout=0.3, data_timeout=10.0))
    upstream.inject("DATA", stall(3.0))

    started = time.monotonic()
    with pytest.raises(UpstreamTimeout):
        await send(relay)

    assert time.monotonic() - started < 2.0


async def test_stall_within_data_timeout_is_fine(
    upstream: CaptureUpstream, relay_factory: RelayFactory
) -> None:
    relay = relay_factory(relay_config(upstream, data_timeout=2.0))
    upstream.inject("EOM", stall(0.3))

    assert (await send(relay)).code == 250


# --- upstream replies ---------------------------------------------------------------------------


@pytest.mark.parametrize("line", ["451 4.3.0 Try again later", "550 5.7.1 Sender refused"])
async def test_mail_refusal_returned_then_rset_and_connection_kept(
    upstream: CaptureUpstream, relay_factory: RelayFactory, line: str
) -> None:
    relay = relay_factory(relay_config(upstream))
    upstream.inject("MAIL", reply(line))

    mail_reply, txn = await relay.begin(SENDER, smtputf8=False, body_8bitmime=False, size=None)

    assert txn is None
    assert str(mail_reply) == line
    assert upstream.connections[0].commands[-1] == "RSET"
    assert (await send(relay)).code == 250
    assert upstream.connections_opened == 1


async def test_rcpt_refusals_returned_per_recipient(
    upstream: CaptureUpstream, relay_factory: RelayFactory
) -> None:
    upstream.fail_rcpt = {"bad@dest.test": "550 5.1.1 No such user"}
    upstream.inject("RCPT", reply("450 4.2.1 Mailbox busy", recipients={"busy@dest.test"}))
    relay = relay_factory(relay_config(upstream))
    _, txn = await relay.begin(SENDER, smtputf8=False, body_8bitmime=False, size=None)
    assert txn is not None

    bad = await txn.rcpt("bad@dest.test")
    busy = await txn.rcpt("busy@dest.test")
    good = await txn.rcpt(RCPT)
    final = await txn.data(MESSAGE)

    assert (bad.code, bad.status, bad.text) == (550, "5.1.1", "No such user")
    assert (busy.code, busy.status) == (450, "4.2.1")
    assert busy.temporary
    assert good.code == 250
    assert final.code == 250
    assert upstream.messages[0].rcpt_tos == (RCPT,)


@pytest.mark.parametrize("line", ["451 4.7.1 Greylisted", "554 5.7.1 Message refused as spam"])
async def test_end_of_data_refusal_returned_and_connection_reused(
    upstream: CaptureUpstream, relay_factory: RelayFactory, line: str
) -> None:
    relay = relay_factory(relay_config(upstream))
    upstream.inject("EOM", reply(line))

    final = await send(relay)

    assert str(final) == line
    assert upstream.messages == []
    assert (await send(relay)).code == 250
    assert upstream.connections_opened == 1


async def test_data_command_refusal_returned_then_rset(
    upstream: CaptureUpstream, relay_factory: RelayFactory
) -> None:
    relay = relay_factory(relay_config(upstream))
    upstream.inject("DATA", reply("451 4.3.0 Not now"))

    final = await send(relay)

    assert final.code == 451
    assert upstream.connections[0].commands[-2:] == ["DATA", "RSET"]
    assert (await send(relay)).code == 250
    assert upstream.connections_opened == 1


async def test_smtputf8_not_offered_is_rejected_with_catalog_reply(
    upstream_factory: UpstreamFactory, relay_factory: RelayFactory
) -> None:
    upstream = await upstream_factory(smtputf8=False)
    relay = relay_factory(relay_config(upstream))

    with pytest.raises(UpstreamRejected) as info:
        await relay.begin("jörg@b.test", smtputf8=True, body_8bitmime=True, size=None)

    assert info.value.reply == replies.UPSTREAM_SMTPUTF8_UNSUPPORTED
    assert "MAIL" not in upstream.connections[0].commands
    assert (await send(relay)).code == 250  # the connection went back to the pool
    assert upstream.connections_opened == 1


async def test_8bitmime_not_offered_is_rejected_with_catalog_reply(
    upstream_factory: UpstreamFactory, relay_factory: RelayFactory
) -> None:
    upstream = await upstream_factory(eightbitmime=False)
    relay = relay_factory(relay_config(upstream))

    with pytest.raises(UpstreamRejected) as info:
        await relay.begin(SENDER, smtputf8=False, body_8bitmime=True, size=None)

    assert info.value.reply == replies.UPSTREAM_8BIT_UNSUPPORTED
    assert "MAIL" not in upstream.connections[0].commands
