"""The ``spam-score`` check end to end: actions, warn modes, fan-out, MIME bounds, holds, reload,
and the scan worker processes (a killed worker: 451, then a replacement scans).

Real SMTP sessions through the real gateway; site rule files are written at test time into a
temporary rules directory (``[checks.spam-score] rules_dirs``) so each action is reached on purpose.
The gateway fixture does not close the pipeline (its worker processes end when their gateway is
garbage-collected); the worker test closes it itself and checks that no process is left.
"""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from gateway.checks.spam_score import SpamScore
from gateway.core.errors import ConfigError
from gateway.core.model import Stage
from gateway.rules.workers import ScanWorkers
from tests.fixtures.gateway import ALICE, RunningGateway

GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"

RULES = """
[[rule]]
id = "TEST_TAG"
score = 6.0
description = "test: reaches add_header"
body_regex = '''tag-me-please'''

[[rule]]
id = "TEST_HOLD"
score = 12.0
description = "test: reaches hold"
body_regex = '''hold-me-please'''
"""


def message(body: str, sender: str = ALICE) -> bytes:
    return (
        f"From: {sender}\r\nTo: bob@example.net\r\nSubject: status report\r\n"
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


def send(gw: RunningGateway, data: bytes, rcpts: list[str] | None = None) -> str:
    """The reply to the end of data."""
    with gw.smtp() as client:
        client.mail(ALICE)
        for rcpt in rcpts or ["bob@example.net"]:
            assert client.rcpt(rcpt)[0] == 250
        code, text = client.data(data)
    return f"{code} {text.decode()}"


def test_gtube_is_rejected_and_audited(make_gateway: Any, rules_dir: Path) -> None:
    gw = spam_gateway(make_gateway, rules_dir)
    reply = send(gw, message(GTUBE))
    assert reply.startswith("550 5.7.1 Message refused as spam"), reply
    assert gw.upstream.messages == []
    rec = gw.records(kind="message")[-1]
    assert rec.outcome == "rejected"
    (verdict,) = rec.verdicts
    assert (verdict.check_id, verdict.stage, verdict.action) == ("spam-score", "data", "reject")
    assert "GTUBE(1000)" in verdict.reason
    assert verdict.limit == "reject at 15"


def test_clean_mail_is_relayed_without_a_spam_header(make_gateway: Any, rules_dir: Path) -> None:
    gw = spam_gateway(make_gateway, rules_dir)
    assert send(gw, message("Meeting moved to 3pm, see you there.")).startswith("250")
    (received,) = gw.upstream.messages
    assert b"X-Mailward-Spam" not in received.data


def test_add_header_action_prepends_the_score(make_gateway: Any, rules_dir: Path) -> None:
    gw = spam_gateway(make_gateway, rules_dir)
    body = message("please tag-me-please now")
    assert send(gw, body).startswith("250")
    (received,) = gw.upstream.messages
    head = received.data[: received.data.index(b"\r\n\r\n")]
    assert b"X-Mailward-Spam: 6, TEST_TAG(6)" in head
    assert received.data.endswith(body)  # the original bytes follow the added headers


def test_hold_takes_custody_and_quarantines(make_gateway: Any, rules_dir: Path) -> None:
    gw = spam_gateway(make_gateway, rules_dir)
    body = message("please hold-me-please now")
    reply = send(gw, body)
    assert reply.startswith("250 2.0.0 Ok: held for review as Q"), reply
    assert gw.upstream.messages == []
    rec = gw.records(kind="message")[-1]
    assert rec.outcome == "held"
    assert rec.queue_id and rec.queue_id.startswith("Q")
    assert [r.status for r in rec.recipients] == ["held"]
    (verdict,) = rec.verdicts
    assert (verdict.check_id, verdict.action) == ("spam-score", "hold")
    assert gw.app.stores is not None
    entry = gw.run(gw.app.stores.quarantine.get(int(rec.queue_id[1:])))
    assert entry is not None
    assert entry.message.endswith(body) and b"X-Mailward-Spam: 12" in entry.message
    assert list(entry.recipients) == ["bob@example.net"]


def test_rule_in_warn_mode_does_not_count(make_gateway: Any, rules_dir: Path) -> None:
    (rules_dir / "60-warn.toml").write_text('[override.TEST_HOLD]\nmode = "warn"\n')
    gw = spam_gateway(make_gateway, rules_dir)
    assert send(gw, message("please hold-me-please now")).startswith("250 2.0.0 Ok: queued")
    assert len(gw.upstream.messages) == 1


def test_check_in_warn_mode_changes_nothing(make_gateway: Any, rules_dir: Path) -> None:
    gw = spam_gateway(make_gateway, rules_dir, mode="warn")
    assert send(gw, message(GTUBE)).startswith("250")
    (received,) = gw.upstream.messages
    assert b"X-Mailward-Spam" not in received.data
    (verdict,) = gw.records(kind="message")[-1].verdicts
    assert (verdict.check_id, verdict.mode, verdict.applied) == ("spam-score", "warn", False)


def test_identical_content_fanout_raises_a_symbol(make_gateway: Any, rules_dir: Path) -> None:
    gw = spam_gateway(make_gateway, rules_dir, fanout_recipients=3, fanout_score=6.0)
    body = message("Our quarterly newsletter, token 123456 for you.")
    assert send(gw, body, ["a@example.net", "b@example.net"]).startswith("250")
    # same content, tracking token changed: the fingerprint is the same; 3 distinct now
    other = body.replace(b"123456", b"987654")
    assert send(gw, other, ["c@example.net"]).startswith("250")
    first, second = gw.upstream.messages
    assert b"FANOUT_IDENTICAL_CONTENT" not in first.data
    assert b"X-Mailward-Spam: 6, FANOUT_IDENTICAL_CONTENT(6)" in second.data


def test_message_beyond_mime_bounds_is_refused(make_gateway: Any, rules_dir: Path) -> None:
    gw = spam_gateway(make_gateway, rules_dir)
    depth = 40
    parts = "".join(
        f'Content-Type: multipart/mixed; boundary="b{i}"\r\n\r\n--b{i}\r\n' for i in range(depth)
    )
    data = (
        f"From: {ALICE}\r\nTo: bob@example.net\r\nSubject: nested\r\nMIME-Version: 1.0\r\n"
        f"{parts}Content-Type: text/plain\r\n\r\nhi\r\n"
    ).encode()
    reply = send(gw, data)
    assert reply.startswith("554 5.6.0"), reply
    assert gw.upstream.messages == []


def test_reload_applies_new_rules_and_keeps_the_old_on_error(
    make_gateway: Any, rules_dir: Path
) -> None:
    gw = spam_gateway(make_gateway, rules_dir)
    body = message("contains the word zanzibar-offer")
    assert send(gw, body).startswith("250")
    (rules_dir / "70-new.toml").write_text(
        '[[rule]]\nid = "TEST_NEW"\nscore = 20.0\ndescription = "new"\n'
        "body_regex = '''zanzibar-offer'''\n"
    )
    assert "policy reloaded" in gw.run(gw.app.reload())
    assert send(gw, body).startswith("550 5.7.1")

    (rules_dir / "80-broken.toml").write_text(
        '[[rule]]\nid = "TEST_BROKEN"\nscore = 1.0\ndescription = "x"\nbody_regex = "(unclosed"\n'
    )
    with pytest.raises(ConfigError) as err:
        gw.run(gw.app.reload())
    assert "80-broken.toml" in str(err.value)
    assert send(gw, body).startswith("550 5.7.1")  # the previous policy is still in force


def scan_workers(gw: RunningGateway) -> ScanWorkers:
    """The running pipeline's spam-score worker processes."""
    assert gw.app.context is not None
    for configured in gw.app.context.gateway.pipeline.describe()[Stage.DATA]:
        if isinstance(configured.check, SpamScore):
            assert configured.check.workers is not None
            return configured.check.workers
    raise AssertionError("no spam-score check at DATA")


def our_child(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[1] == str(os.getpid())


def wait_for(condition: Any, bound: float = 60.0) -> None:
    """Poll ``condition()`` up to a generous liveness bound."""
    deadline = time.monotonic() + bound
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_worker_process_scans_and_a_killed_worker_defers_then_recovers(
    make_gateway: Any, rules_dir: Path
) -> None:
    gw = spam_gateway(make_gateway, rules_dir, workers=1, timeout=30.0)
    workers = scan_workers(gw)
    pids: set[int] = set()
    try:
        assert send(gw, message(GTUBE)).startswith("550 5.7.1 Message refused as spam")
        assert send(gw, message("Meeting moved to 3pm.")).startswith("250")
        (pid,) = workers.pids
        pids.add(pid)
        os.kill(pid, signal.SIGSTOP)  # hold the next scan in flight
        with ThreadPoolExecutor(1) as pool:
            sending = pool.submit(send, gw, message(GTUBE))
            wait_for(lambda: workers.inflight == 1)
            os.kill(pid, signal.SIGKILL)
            reply = sending.result(60)
        assert reply.startswith("451 4.3.0 Temporary policy failure (spam-score)"), reply
        rec = gw.records(kind="message")[-1]
        assert rec.outcome == "deferred"
        (verdict,) = rec.verdicts
        assert (verdict.check_id, verdict.action) == ("spam-score", "defer")
        assert len(gw.upstream.messages) == 1  # only the clean message was relayed
        # a replacement worker scans the next message
        assert send(gw, message(GTUBE)).startswith("550 5.7.1 Message refused as spam")
        assert send(gw, message("please tag-me-please now")).startswith("250")
        (new_pid,) = workers.pids
        assert new_pid != pid
        pids.add(new_pid)
        assert b"X-Mailward-Spam: 6, TEST_TAG(6)" in gw.upstream.messages[-1].data
    finally:
        assert gw.app.context is not None
        gw.run(gw.app.context.gateway.pipeline.close())
    assert workers.pids == []
    wait_for(lambda: not any(our_child(p) for p in pids))  # exited and reaped
