"""End-to-end submission: real clients → the real gateway → a real upstream, with the audit checked.

Each test drives the running GatewayApp (tests/fixtures/gateway.py) over TCP with smtplib, aiosmtplib
or swaks, and asserts on three things: the reply the client got, what the upstream received, and the
audit rows.
"""

from __future__ import annotations

import asyncio
import hashlib
import smtplib
import socket
import subprocess
import time
from typing import Any

import aiosmtplib
import pytest

from gateway.smtp import capture
from tests.fixtures.gateway import ALICE, PASSWORD, RunningGateway

MSG = (
    b"From: Alice <alice@example.com>\r\n"
    b"To: Bob <bob@example.net>\r\n"
    b"Subject: hello\r\n"
    b"Message-ID: <m1@example.com>\r\n"
    b"\r\n"
    b"Hi Bob,\r\n"
    b".a line starting with a dot\r\n"
    b"bye\r\n"
)


def _strip_received(data: bytes) -> bytes:
    """The upstream copy minus the one Received: header the gateway prepends."""
    assert data.startswith(b"Received: ")
    end = data.index(b"\r\n", data.index(b";\r\n") + 3) + 2
    return data[end:]


def _reply(exc: smtplib.SMTPResponseException) -> str:
    return f"{exc.smtp_code} {exc.smtp_error.decode()}"


def _last_message_record(gw: RunningGateway) -> Any:
    records = [r for r in gw.records() if r.kind == "message"]
    assert records, "no message audit record"
    return records[-1]


# --- happy paths, every client and listener ---------------------------------------------------


def test_starttls_auth_plain_relays_exact_bytes_and_audits(gateway: RunningGateway) -> None:
    with gateway.smtp() as client:
        assert client.sock is not None
        refused = client.sendmail(ALICE, ["bob@example.net", "carol@example.org"], MSG)
        code, _ = client.noop()
    assert refused == {}
    assert code == 250
    (received,) = gateway.upstream.messages
    assert received.mail_from == ALICE
    assert received.rcpt_tos == ("bob@example.net", "carol@example.org")
    assert _strip_received(received.data) == MSG
    assert b"with ESMTPSA" in received.data.split(b"\r\n\r\n")[0]

    rec = _last_message_record(gateway)
    assert rec.outcome == "delivered"
    assert rec.login == ALICE
    assert rec.mail_from == ALICE
    assert rec.listener == "submission"
    assert rec.tls_version in ("TLSv1.2", "TLSv1.3")
    assert rec.tls_cipher
    assert rec.client_ip == "127.0.0.1" and rec.client_port
    assert rec.helo == "client.example"
    assert rec.message_id == "<m1@example.com>"
    assert rec.size == len(MSG)
    assert rec.sha256 == hashlib.sha256(MSG).hexdigest()
    assert rec.queue_id == received.queue_id
    assert rec.upstream_reply.startswith("250")
    assert rec.final_reply.startswith("250 2.0.0")
    assert [(r.address, r.status) for r in rec.recipients] == [
        ("bob@example.net", "delivered"),
        ("carol@example.org", "delivered"),
    ]


def test_implicit_tls_with_auth_login(gateway: RunningGateway) -> None:
    with gateway.smtp("submissions", login=None) as client:
        client.user, client.password = ALICE, PASSWORD
        code, _ = client.auth("LOGIN", client.auth_login)
        assert code == 235
        client.sendmail(ALICE, ["bob@example.net"], MSG)
    (received,) = gateway.upstream.messages
    assert _strip_received(received.data) == MSG
    rec = _last_message_record(gateway)
    assert rec.listener == "submissions" and rec.outcome == "delivered"


def test_aiosmtplib_client(gateway: RunningGateway) -> None:
    async def send() -> Any:
        client = aiosmtplib.SMTP(
            hostname="127.0.0.1",
            port=gateway.port("submission"),
            start_tls=True,
            tls_context=gateway.tls_context(),
        )
        async with client:
            await client.login(ALICE, PASSWORD)
            return await client.sendmail(ALICE, ["bob@example.net"], MSG)

    errors, reply = asyncio.run(send())
    assert errors == {}
    assert reply.startswith("2.0.0 Ok: queued as")
    assert _strip_received(gateway.upstream.messages[0].data) == MSG


def test_swaks_client(gateway: RunningGateway) -> None:
    result = subprocess.run(
        [
            "swaks",
            "--server",
            f"127.0.0.1:{gateway.port('submission')}",
            "-tls",
            "--tls-ca-path",
            gateway.cafile,
            "--tls-verify",
            "--auth",
            "PLAIN",
            "--auth-user",
            ALICE,
            "--auth-password",
            PASSWORD,
            "--from",
            ALICE,
            "--to",
            "dave@example.net",
            "--h-From",
            f"<{ALICE}>",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "250 2.0.0 Ok: queued as" in result.stdout
    assert gateway.upstream.messages[0].rcpt_tos == ("dave@example.net",)


def test_upstream_connection_is_reused(gateway: RunningGateway) -> None:
    with gateway.smtp() as client:
        for _ in range(3):
            client.sendmail(ALICE, ["bob@example.net"], MSG)
    with gateway.smtp() as client:
        client.sendmail(ALICE, ["bob@example.net"], MSG)
    assert len(gateway.upstream.messages) == 4
    assert gateway.upstream.connections_opened == 1


# --- authentication ---------------------------------------------------------------------------


def test_auth_not_offered_nor_accepted_without_tls(gateway: RunningGateway) -> None:
    with smtplib.SMTP("127.0.0.1", gateway.port("submission"), timeout=10) as client:
        client.ehlo("client.example")
        assert not client.has_extn("auth")
        assert client.has_extn("starttls")
        code, text = client.docmd("AUTH", "PLAIN AGFsaWNlAHg=")
    assert (code, text.decode()[:6]) == (538, "5.7.11")


def test_mail_without_auth_is_refused_and_audited(gateway: RunningGateway) -> None:
    with gateway.smtp(login=None) as client:
        code, text = client.mail(ALICE)
    assert code == 530 and text.startswith(b"5.7.0")
    rec = _last_message_record(gateway)
    assert rec.outcome == "rejected"
    assert [(v.check_id, v.stage, v.action) for v in rec.verdicts] == [
        ("auth-gate", "mail", "reject")
    ]
    assert gateway.upstream.messages == []


def test_bad_password_is_535_promptly_and_audited(gateway: RunningGateway) -> None:
    with gateway.smtp(login=None) as client:
        started = time.monotonic()
        with pytest.raises(smtplib.SMTPAuthenticationError) as err:
            client.login(ALICE, "wrong password")
        elapsed = time.monotonic() - started
        assert client.noop()[0] == 250  # the session is still usable: no hang
    assert _reply(err.value).startswith("535 5.7.8")
    assert elapsed < 10
    failures = gateway.records(kind="auth-failure")
    assert len(failures) >= 1
    assert failures[-1].login == ALICE
    assert "wrong password" not in repr(failures[-1])


def test_unknown_login_and_disabled_account_are_535(gateway: RunningGateway) -> None:
    gateway.add_user("mallory@example.com", PASSWORD, ["mallory@example.com"])
    gateway.run(gateway.app.stores.accounts.set_disabled("mallory@example.com", True))
    for login in ("nobody@example.com", "mallory@example.com"):
        with (
            gateway.smtp(login=None) as client,
            pytest.raises(smtplib.SMTPAuthenticationError) as err,
        ):
            client.login(login, PASSWORD)
        assert err.value.smtp_code == 535


def _rename_table(gw: RunningGateway, table: str, new: str) -> None:
    import sqlalchemy as sa

    url = gw.config.database_url.replace("+aiosqlite", "")
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text(f"ALTER TABLE {table} RENAME TO {new}"))
    engine.dispose()


def test_credential_store_down_is_454(gateway: RunningGateway) -> None:
    _rename_table(gateway, "account", "account_gone")
    try:
        with (
            gateway.smtp(login=None) as client,
            pytest.raises(smtplib.SMTPAuthenticationError) as err,
        ):
            client.login(ALICE, PASSWORD)
        assert _reply(err.value).startswith("454 4.7.0")
    finally:
        _rename_table(gateway, "account_gone", "account")


def test_audit_down_defers_and_relays_nothing(gateway: RunningGateway) -> None:
    with gateway.smtp() as client:
        _rename_table(gateway, "audit_record", "audit_gone")
        try:
            with pytest.raises(smtplib.SMTPDataError) as err:
                client.sendmail(ALICE, ["bob@example.net"], MSG)
        finally:
            _rename_table(gateway, "audit_gone", "audit_record")
    assert _reply(err.value).startswith("451 4.3.0")
    assert gateway.upstream.messages == []


# --- sender ownership -------------------------------------------------------------------------


def test_envelope_sender_not_owned_is_553(gateway: RunningGateway) -> None:
    with gateway.smtp() as client:
        code, text = client.mail("eve@example.com")
    assert code == 553 and text.startswith(b"5.7.1")
    rec = _last_message_record(gateway)
    assert rec.verdicts[0].check_id == "sender-identity"
    assert rec.verdicts[0].stage == "mail"


def test_from_header_not_owned_is_550(gateway: RunningGateway) -> None:
    forged = MSG.replace(b"From: Alice <alice@example.com>", b"From: Boss <ceo@example.com>")
    with gateway.smtp() as client, pytest.raises(smtplib.SMTPDataError) as err:
        client.sendmail(ALICE, ["bob@example.net"], forged)
    assert _reply(err.value).startswith("550 5.7.1")
    assert gateway.upstream.messages == []
    rec = _last_message_record(gateway)
    assert rec.outcome == "rejected"
    assert [(v.check_id, v.stage) for v in rec.verdicts] == [("sender-identity", "data")]
    assert rec.sha256 == hashlib.sha256(forged).hexdigest()


def test_send_as_grant_and_domain_ownership(gateway: RunningGateway) -> None:
    gateway.add_user("bob@corp.example", PASSWORD, ["@corp.example"])
    gateway.grant("bob@corp.example", "news@example.org")
    msg = MSG.replace(b"alice@example.com", b"news@example.org")
    with gateway.smtp(login="bob@corp.example") as client:
        client.sendmail(
            "anyone@corp.example",
            ["x@example.net"],
            MSG.replace(b"alice@example.com", b"anyone@corp.example"),
        )
        client.sendmail("news@example.org", ["x@example.net"], msg)
    assert [m.mail_from for m in gateway.upstream.messages] == [
        "anyone@corp.example",
        "news@example.org",
    ]


# --- protocol limits --------------------------------------------------------------------------


def test_size_declared_and_actual(make_gateway: Any) -> None:
    gw = make_gateway({"smtp": {"max_message_size": 4096}})
    with gw.smtp() as client:
        assert "4096" in client.esmtp_features["size"]
        code, text = client.mail(ALICE, ["SIZE=5000"])
        assert (code, text[:5]) == (552, b"5.3.4")
        client.rset()
        big = (MSG + b"x" * 70 + b"\r\n") * 60
        client.mail(ALICE)  # no SIZE declared: the DATA itself is too big
        client.rcpt("bob@example.net")
        code, text = client.data(big)
        assert (code, text[:5]) == (552, b"5.3.4")
    assert gw.upstream.messages == []
    ids = [v.check_id for r in gw.records(kind="message") for v in r.verdicts]
    assert ids.count("message-size") == 2


def test_too_many_recipients_is_452(make_gateway: Any) -> None:
    gw = make_gateway({"checks": {"recipient-limit": {"max_recipients": 2}}})
    with gw.smtp() as client:
        client.mail(ALICE)
        assert client.rcpt("a@example.net")[0] == 250
        assert client.rcpt("b@example.net")[0] == 250
        code, text = client.rcpt("c@example.net")
        assert (code, text[:5]) == (452, b"4.5.3")
        code, _ = client.data(MSG)
        assert code == 250
    assert gw.upstream.messages[0].rcpt_tos == ("a@example.net", "b@example.net")
    rec = _last_message_record(gw)
    assert [(r.address, r.status) for r in rec.recipients] == [
        ("a@example.net", "delivered"),
        ("b@example.net", "delivered"),
        ("c@example.net", "rejected"),
    ]


def test_long_command_and_long_data_line(gateway: RunningGateway) -> None:
    with gateway.smtp() as client:
        code, text = client.docmd("NOOP " + "x" * 600)
        assert (code, text[:5]) == (500, b"5.5.6")
        long_line = MSG + b"y" * 1200 + b"\r\n"
        with pytest.raises(smtplib.SMTPDataError) as err:
            client.sendmail(ALICE, ["bob@example.net"], long_line)
        assert _reply(err.value).startswith("500 5.5.6")
    assert gateway.upstream.messages == []
    ids = [v.check_id for r in gateway.records(kind="message") for v in r.verdicts]
    assert "line-length" in ids


def _raw(port: int, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    return sock


def _read_reply(sock: socket.socket) -> bytes:
    """One complete (possibly multi-line) reply."""
    data = b""
    while True:
        lines = data.split(b"\r\n")
        if data.endswith(b"\r\n") and len(lines[-2]) >= 4 and lines[-2][3:4] == b" ":
            return data
        chunk = sock.recv(4096)
        if not chunk:
            return data
        data += chunk


def test_idle_timeout_sends_421_before_closing(make_gateway: Any) -> None:
    gw = make_gateway({"smtp": {"idle_timeout": 1.0}})
    sock = _raw(gw.port("plain"))
    assert _read_reply(sock).startswith(b"220 ")
    sock.sendall(b"EHLO x\r\n")
    _read_reply(sock)
    time.sleep(1.5)
    rest = _read_reply(sock)
    assert rest.startswith(b"421 4.4.2"), rest
    assert sock.recv(10) == b""
    sock.close()
    assert any(r.kind == "timeout" for r in gw.records())


def test_data_timeout_sends_421_and_relays_nothing(make_gateway: Any) -> None:
    gw = make_gateway({"smtp": {"data_timeout": 1.0}})
    sock = _raw(gw.port("plain"), "127.0.0.2")  # trusted network: no AUTH needed
    _read_reply(sock)
    for line in (b"EHLO x", b"MAIL FROM:<a@example.com>", b"RCPT TO:<b@example.net>", b"DATA"):
        sock.sendall(line + b"\r\n")
        _read_reply(sock)
    sock.sendall(b"Subject: slow\r\n")
    time.sleep(1.5)
    assert _read_reply(sock).startswith(b"421 4.4.2")
    sock.close()
    assert gw.upstream.messages == []
    rec = _last_message_record(gw)
    assert rec.outcome == "dropped"


def test_connection_limit_per_ip_is_421(make_gateway: Any) -> None:
    gw = make_gateway({"smtp": {"max_connections_per_ip": 2}})
    socks = [_raw(gw.port("plain")) for _ in range(2)]
    for s in socks:
        assert _read_reply(s).startswith(b"220 ")
    third = _raw(gw.port("plain"))
    assert _read_reply(third).startswith(b"421 4.7.0")
    third.close()
    other = _raw(gw.port("plain"), "127.0.0.2")  # another IP is still welcome
    assert _read_reply(other).startswith(b"220 ")
    for s in [*socks, other]:
        s.close()
    assert any(r.kind == "refused" for r in gw.records())


def test_smtputf8_and_8bitmime_are_passed_upstream(gateway: RunningGateway) -> None:
    body = "From: alice@example.com\r\nSubject: grüße\r\n\r\nçà va - ünïcödé\r\n".encode()
    with gateway.smtp() as client:
        assert client.has_extn("smtputf8") and client.has_extn("8bitmime")
        client.sendmail(ALICE, ["jürgen@bücher.example"], body, ["SMTPUTF8", "BODY=8BITMIME"])
    (received,) = gateway.upstream.messages
    assert received.rcpt_tos == ("jürgen@bücher.example",)
    assert "SMTPUTF8" in received.mail_options and "BODY=8BITMIME" in received.mail_options
    assert _strip_received(received.data) == body


def test_non_ascii_recipient_without_smtputf8_is_refused(gateway: RunningGateway) -> None:
    sock = _raw(gateway.port("plain"), "127.0.0.2")
    _read_reply(sock)
    for line in (b"EHLO x", b"MAIL FROM:<a@example.com>"):
        sock.sendall(line + b"\r\n")
        _read_reply(sock)
    sock.sendall("RCPT TO:<jürgen@bücher.example>\r\n".encode())
    reply = _read_reply(sock)
    sock.close()
    assert reply.startswith(b"553 5.6.7"), reply


# --- relay and custody ------------------------------------------------------------------------


def test_upstream_5xx_at_end_of_data_is_passed_to_client(gateway: RunningGateway) -> None:
    gateway.upstream.inject("EOM", capture.reply("554 5.7.1 Message rejected by upstream policy"))
    with gateway.smtp() as client, pytest.raises(smtplib.SMTPDataError) as err:
        client.sendmail(ALICE, ["bob@example.net"], MSG)
    text = _reply(err.value)
    assert text.startswith("554 5.7.1") and "rejected by upstream policy" in text
    rec = _last_message_record(gateway)
    assert rec.outcome == "failed"
    assert rec.upstream_reply.startswith("554")
    assert rec.recipients[0].status == "failed"


@pytest.mark.parametrize(
    ("fault", "command", "expected"),
    [
        (capture.reply("451 4.3.0 Try later"), "EOM", "451 4.4.3"),
        (capture.drop_mid_data(), "DATA", "451 4.4.2"),
        (capture.drop(), "EOM", "451 4.4.2"),
        (capture.stall(8), "EOM", "451 4.4.2"),
        (capture.reply("421 4.3.2 Shutting down"), "MAIL", "451 4.4.3"),
    ],
    ids=["4xx-eom", "drop-mid-data", "drop-at-eom", "stall-eom", "421-mail"],
)
def test_upstream_temporary_failures_are_451(
    gateway: RunningGateway, fault: Any, command: str, expected: str
) -> None:
    gateway.upstream.inject(command, fault)
    with gateway.smtp() as client:
        try:
            client.sendmail(ALICE, ["bob@example.net"], MSG)
        except smtplib.SMTPRecipientsRefused as exc:
            code, text = next(iter(exc.recipients.values()))
            got = f"{code} {text.decode()}"
        except smtplib.SMTPDataError as exc:
            got = _reply(exc)
        else:
            pytest.fail("the client got 250 although the upstream did not accept")
    assert got.startswith(expected), got
    assert gateway.upstream.messages == []
    rec = _last_message_record(gateway)
    # refused at RCPT → the client resets (aborted); refused at DATA → deferred
    assert rec.outcome in ("deferred", "aborted")
    assert all(r.status in ("deferred", "rejected") for r in rec.recipients)
    assert all(r.reply.startswith(expected) for r in rec.recipients)


def test_upstream_refused_is_451_441(gateway: RunningGateway) -> None:
    gateway.upstream_handle.refuse()
    with gateway.smtp() as client:
        client.mail(ALICE)
        code, text = client.rcpt("bob@example.net")
    assert (code, text[:5]) == (451, b"4.4.1")
    gateway.upstream_handle.resume()


def test_upstream_rcpt_refusal_reaches_client_at_rcpt(gateway: RunningGateway) -> None:
    gateway.upstream.fail_rcpt = {"ghost@example.net": "550 5.1.1 No such user here"}
    with gateway.smtp() as client:
        client.mail(ALICE)
        assert client.rcpt("bob@example.net")[0] == 250
        code, text = client.rcpt("ghost@example.net")
        assert code == 550 and text.startswith(b"5.1.1") and b"No such user here" in text
        assert client.data(MSG)[0] == 250
    assert gateway.upstream.messages[0].rcpt_tos == ("bob@example.net",)
    rec = _last_message_record(gateway)
    assert {r.address: r.status for r in rec.recipients} == {
        "bob@example.net": "delivered",
        "ghost@example.net": "rejected",
    }


# --- SMTP smuggling (outbound) ----------------------------------------------------------------

SMUGGLE = (
    b"From: alice@example.com\r\n\r\nfirst\r\n"
    b"\n.\r\nMAIL FROM:<alice@example.com>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\n"
    b"From: ceo@example.com\r\n\r\nsmuggled\r\n"
)


def _send_raw_data(port: int, body: bytes, source: str = "127.0.0.2") -> list[bytes]:
    sock = _raw(port, source)
    replies = [_read_reply(sock)]
    for line in (
        b"EHLO x",
        b"MAIL FROM:<alice@example.com>",
        b"RCPT TO:<bob@example.net>",
        b"DATA",
    ):
        sock.sendall(line + b"\r\n")
        replies.append(_read_reply(sock))
    sock.sendall(body + b".\r\n")
    replies.append(_read_reply(sock))
    sock.sendall(b"QUIT\r\n")
    replies.append(_read_reply(sock))
    sock.close()
    return replies


def test_bare_lf_smuggling_is_refused(gateway: RunningGateway) -> None:
    replies = _send_raw_data(gateway.port("plain"), SMUGGLE)
    assert replies[5].startswith(b"550 5.6.0"), replies
    assert gateway.upstream.messages == []
    rec = _last_message_record(gateway)
    assert [v.check_id for v in rec.verdicts] == ["bare-newline"]


def test_bare_lf_normalized_is_one_message(make_gateway: Any) -> None:
    gw = make_gateway({"smtp": {"bare_newline": "normalize"}})
    replies = _send_raw_data(gw.port("plain"), SMUGGLE)
    assert replies[5].startswith(b"250 2.0.0"), replies
    (received,) = gw.upstream.messages
    assert received.rcpt_tos == ("bob@example.net",)
    body = _strip_received(received.data)
    assert b"\r\n.\r\nMAIL FROM" in body  # the would-be terminator is content, intact
    assert b"\n" not in body.replace(b"\r\n", b"")


# --- trusted networks and sessions ------------------------------------------------------------


def test_trusted_network_relays_without_auth(gateway: RunningGateway) -> None:
    with gateway.smtp("plain", login=None, source_address=("127.0.0.2", 0)) as client:
        client.sendmail("anyone@anywhere.example", ["bob@example.net"], MSG)
    assert gateway.upstream.messages[0].mail_from == "anyone@anywhere.example"
    with gateway.smtp("plain", login=None) as client:
        code, _ = client.mail("anyone@anywhere.example")
    assert code == 530


def test_rset_and_dropped_transactions_are_audited(gateway: RunningGateway) -> None:
    with gateway.smtp() as client:
        client.mail(ALICE)
        client.rcpt("bob@example.net")
        client.rset()
    client = gateway.smtp()
    client.mail(ALICE)
    client.rcpt("carol@example.net")
    assert client.sock is not None
    client.sock.shutdown(socket.SHUT_RDWR)  # a client that just goes away
    client.close()
    records = gateway.records(kind="message")
    assert [r.outcome for r in records] == ["aborted", "dropped"]
    assert records[1].recipients[0].address == "carol@example.net"
    assert gateway.upstream.messages == []


def test_internal_error_is_451_with_incident_and_no_exception_text(
    gateway: RunningGateway, caplog: pytest.LogCaptureFixture
) -> None:
    gw_service = gateway.app.context.gateway  # type: ignore[union-attr]

    async def boom(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("secret internals /etc/passwd")

    gw_service.on_rcpt = boom  # type: ignore[method-assign]
    with gateway.smtp() as client:
        client.mail(ALICE)
        code, text = client.rcpt("bob@example.net")
        assert client.noop()[0] == 250
    assert code == 451 and text.startswith(b"4.3.0")
    assert b"incident" in text and b"secret" not in text and b"RuntimeError" not in text
    rec = _last_message_record(gateway)
    assert rec.incident and rec.incident.encode() in text


def test_every_reply_carries_an_enhanced_status_code(gateway: RunningGateway) -> None:
    """A session exercising aiosmtpd's own replies: each is translated to the catalog."""
    sock = _raw(gateway.port("submission"))
    replies = [_read_reply(sock)]
    for line in (
        b"MAIL FROM:<a@b>",
        b"EHLO x",
        b"BOGUS",
        b"RCPT TO:<b@c>",
        b"DATA",
        b"MAIL FROM:<<>",
        b"VRFY x",
        b"EXPN x",
        b"HELP",
        b"NOOP",
        b"RSET",
        b"AUTH PLAIN",
        b"STARTTLS x",
        b"QUIT",
    ):
        sock.sendall(line + b"\r\n")
        replies.append(_read_reply(sock))
    sock.close()
    for reply in replies[1:]:
        if reply.startswith(b"250-"):
            continue  # the EHLO keyword list
        last = reply.rstrip(b"\r\n").split(b"\r\n")[-1]
        assert last[4:5] in b"245" and last[5:6] == b".", reply
    assert gateway.app.context.untranslated == []  # type: ignore[union-attr]


def test_total_connection_limit_is_421(make_gateway: Any) -> None:
    gw = make_gateway({"smtp": {"max_connections": 2}})
    first = _raw(gw.port("plain"))
    second = _raw(gw.port("submission"), "127.0.0.2")
    assert _read_reply(first).startswith(b"220 ") and _read_reply(second).startswith(b"220 ")
    third = _raw(gw.port("plain"), "127.0.0.3")
    assert _read_reply(third).startswith(b"421 4.7.0 Too many connections")
    for s in (first, second, third):
        s.close()
    gw.settle()
    again = _raw(gw.port("plain"), "127.0.0.3")  # slots are given back on close
    assert _read_reply(again).startswith(b"220 ")
    again.close()


def test_upstream_without_smtputf8_refuses_utf8_mail(make_gateway: Any) -> None:
    gw = make_gateway(upstream_options={"smtputf8": False})
    with gw.smtp() as client:
        client.mail(ALICE, ["SMTPUTF8"])
        code, text = client.rcpt("bob@example.net")
    assert (code, text[:5]) == (553, b"5.6.7")
    assert gw.upstream.messages == []


def test_warn_mode_records_but_does_not_refuse(make_gateway: Any) -> None:
    gw = make_gateway({"checks": {"sender-identity": {"mode": "warn"}}})
    forged = MSG.replace(b"From: Alice <alice@example.com>", b"From: ceo@example.com")
    with gw.smtp() as client:
        client.sendmail(ALICE, ["bob@example.net"], forged)
    assert len(gw.upstream.messages) == 1
    rec = _last_message_record(gw)
    assert rec.outcome == "delivered"
    (verdict,) = rec.verdicts
    assert (verdict.check_id, verdict.mode, verdict.applied, verdict.action) == (
        "sender-identity",
        "warn",
        False,
        "reject",
    )


def test_soft_fail_turns_policy_rejections_into_4xx(make_gateway: Any) -> None:
    gw = make_gateway({"pipeline": {"soft_fail": True}})
    with gw.smtp() as client:
        code, text = client.mail("eve@example.com")
    assert (code, text[:5]) == (453, b"4.7.1")


def test_incident_id_is_in_the_log(
    gateway: RunningGateway, caplog: pytest.LogCaptureFixture
) -> None:
    service = gateway.app.context.gateway  # type: ignore[union-attr]

    async def boom(*args: Any, **kwargs: Any) -> Any:
        raise ValueError("boom")

    service.on_mail = boom  # type: ignore[method-assign]
    with gateway.smtp() as client:
        code, text = client.mail(ALICE)
    assert code == 451
    incident = text.decode().rsplit("incident ", 1)[1].rstrip(")")
    logged = [r for r in caplog.records if incident in r.getMessage()]
    assert logged and logged[0].exc_info is not None
