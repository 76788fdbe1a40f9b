"""Rate limits end to end: real SMTP sessions through the ``rate-limit`` check, on both stores.

Every test runs against the in-process store and, when MAILWARD_TEST_REDIS_URL is set (CI), a real
Redis; it asserts on the replies, on what the upstream received and on the audit rows.
"""

from __future__ import annotations

import os
import re
import smtplib
import subprocess
import sys
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from gateway.core.model import utcnow
from gateway.ratelimit.store import SEPARATOR
from gateway.smtp import capture
from tests.fixtures.gateway import RunningGateway

REDIS = os.environ.get("MAILWARD_TEST_REDIS_URL")
STORES = ["memory", *(["redis"] if REDIS else [])]


@pytest.fixture(params=STORES)
def store_url(request: pytest.FixtureRequest) -> str:
    if request.param == "memory":
        return "memory://"
    assert REDIS is not None
    return REDIS


def limited(store_url: str, **rules: Any) -> dict[str, Any]:
    """Site overrides: only the given limits (the shipped ones are switched to huge values)."""
    huge = [{"limit": 1_000_000, "period": "1h"}]
    base = {
        name: {"tiers": huge}
        for name in (
            "login-messages",
            "login-recipients",
            "login-bytes",
            "client-ip-messages",
            "sender-domain-messages",
        )
    }
    base["login-distinct-recipients"] = {"tiers": huge}
    base.update(rules)
    return {"limits": {"store": store_url, "rules": base}}


class Limited:
    """A gateway with tight limits and a fresh login (fresh Redis keys on every run)."""

    def __init__(self, make_gateway: Any, store_url: str, **rules: Any) -> None:
        overrides = limited(store_url, **rules)
        if store_url.startswith("redis://127.0.0.1:1/"):
            # a dead store: auth-throttle and spam-score's fan-out symbol would fail closed too;
            # let them continue so that the rate limits' own behaviour is what is tested
            overrides["checks"] = {
                "auth-throttle": {"on_error": "continue"},
                "spam-score": {"on_error": "continue"},
                "account-guard": {"on_error": "continue"},
            }
        self.gw: RunningGateway = make_gateway(overrides, users=False)
        self.login = f"u{uuid.uuid4().hex[:10]}@example.com"
        self.gw.add_user(self.login, addresses=[self.login])
        self.msg = (
            f"From: {self.login}\r\nTo: x@example.net\r\nSubject: hi\r\n\r\nhello\r\n"
        ).encode()

    def smtp(self) -> smtplib.SMTP:
        return self.gw.smtp(login=self.login)

    def send(self, client: smtplib.SMTP, rcpts: list[str]) -> str:
        try:
            client.sendmail(self.login, rcpts, self.msg)
        except smtplib.SMTPSenderRefused as exc:
            return f"{exc.smtp_code} {exc.smtp_error.decode()}"
        except smtplib.SMTPRecipientsRefused as exc:
            code, text = next(iter(exc.recipients.values()))
            return f"{code} {text.decode()}"
        except smtplib.SMTPDataError as exc:
            return f"{exc.smtp_code} {exc.smtp_error.decode()}"
        return "250"


def test_message_limit_defers_at_mail_with_id_and_retry(make_gateway: Any, store_url: str) -> None:
    t = Limited(
        make_gateway, store_url, **{"login-messages": {"tiers": [{"limit": 2, "period": "1h"}]}}
    )
    with t.smtp() as client:
        assert t.send(client, ["a@example.net"]) == "250"
        assert t.send(client, ["b@example.net"]) == "250"
        reply = t.send(client, ["c@example.net"])
    assert reply.startswith("450 4.7.1 Rate limit login-messages exceeded"), reply
    retry = int(re.search(r"try again in (\d+) s", reply).group(1))  # type: ignore[union-attr]
    assert 1700 <= retry <= 1800  # one of two slots refills after half an hour
    assert len(t.gw.upstream.messages) == 2
    rec = [r for r in t.gw.records(kind="message")][-1]
    (verdict,) = rec.verdicts
    assert (verdict.check_id, verdict.stage, verdict.action) == ("rate-limit", "mail", "defer")
    assert verdict.measured == "3" and verdict.limit == "2 per 3600s"
    assert "admits again in" in verdict.reason


def test_only_accepted_mail_is_charged(make_gateway: Any, store_url: str) -> None:
    t = Limited(
        make_gateway, store_url, **{"login-messages": {"tiers": [{"limit": 2, "period": "1h"}]}}
    )
    t.gw.upstream.inject("EOM", capture.reply("554 5.7.1 no", times=3))
    with t.smtp() as client:
        for _ in range(3):
            assert t.send(client, ["a@example.net"]).startswith("554")
        assert t.send(client, ["a@example.net"]) == "250"
        assert t.send(client, ["a@example.net"]) == "250"
        assert t.send(client, ["a@example.net"]).startswith("450 4.7.1")


def test_rejected_recipients_are_not_charged(make_gateway: Any, store_url: str) -> None:
    t = Limited(
        make_gateway, store_url, **{"login-recipients": {"tiers": [{"limit": 3, "period": "1h"}]}}
    )
    t.gw.upstream.fail_rcpt = {"ghost@example.net": "550 5.1.1 No such user"}
    with t.smtp() as client:
        client.mail(t.login)
        assert client.rcpt("a@example.net")[0] == 250
        assert client.rcpt("ghost@example.net")[0] == 550
        assert client.rcpt("b@example.net")[0] == 250
        assert client.data(t.msg)[0] == 250
        client.mail(t.login)
        assert client.rcpt("c@example.net")[0] == 250  # 2 charged so far, this is the 3rd
        code, text = client.rcpt("d@example.net")
        assert (code, text[:5]) == (450, b"4.7.1")
        assert client.data(t.msg)[0] == 250
    assert [m.rcpt_tos for m in t.gw.upstream.messages] == [
        ("a@example.net", "b@example.net"),
        ("c@example.net",),
    ]


def test_all_tiers_are_enforced(make_gateway: Any, store_url: str) -> None:
    tiers = [{"limit": 100, "period": "1d"}, {"limit": 2, "period": "1m"}]
    t = Limited(make_gateway, store_url, **{"login-messages": {"tiers": tiers}})
    with t.smtp() as client:
        assert t.send(client, ["a@example.net"]) == "250"
        assert t.send(client, ["a@example.net"]) == "250"
        reply = t.send(client, ["a@example.net"])
    assert reply.startswith("450 4.7.1"), reply
    verdict = t.gw.records(kind="message")[-1].verdicts[0]
    assert verdict.limit == "2 per 60s"


def test_distinct_recipients(make_gateway: Any, store_url: str) -> None:
    t = Limited(
        make_gateway,
        store_url,
        **{"login-distinct-recipients": {"tiers": [{"limit": 2, "period": "1h"}]}},
    )
    with t.smtp() as client:
        assert t.send(client, ["a@example.net", "b@example.net"]) == "250"
        assert t.send(client, ["a@example.net"]) == "250"  # not new: still 2 distinct
        assert t.send(client, ["c@example.net"]).startswith("450 4.7.1")


def test_per_login_config_and_timeboxed_override(make_gateway: Any, store_url: str) -> None:
    t = Limited(
        make_gateway, store_url, **{"login-messages": {"tiers": [{"limit": 1, "period": "1h"}]}}
    )
    assert t.gw.app.stores is not None
    t.gw.run(
        t.gw.app.stores.policy.add_limit_override(
            t.login, "login-messages", [{"limit": 3, "period": "1h"}], utcnow() + timedelta(hours=1)
        )
    )
    with t.smtp() as client:
        results = [t.send(client, ["a@example.net"]) for _ in range(4)]
    assert results[:3] == ["250", "250", "250"]
    assert results[3].startswith("450 4.7.1")


def test_client_ip_limit_applies_to_trusted_networks(make_gateway: Any, store_url: str) -> None:
    t = Limited(
        make_gateway, store_url, **{"client-ip-messages": {"tiers": [{"limit": 1, "period": "1h"}]}}
    )
    t.gw.run(t.gw.app.limit_store.reset("client-ip-messages:ip:127.0.0.2/32" + SEPARATOR))  # type: ignore[union-attr]
    with t.gw.smtp("plain", login=None, source_address=("127.0.0.2", 0)) as client:
        assert t.send(client, ["a@example.net"]) == "250"
        assert t.send(client, ["a@example.net"]).startswith(
            "450 4.7.1 Rate limit client-ip-messages"
        )


def test_store_down_fails_closed_unless_fail_open(make_gateway: Any) -> None:
    dead = "redis://127.0.0.1:1/0"
    t = Limited(make_gateway, dead)
    with t.smtp() as client:
        reply = t.send(client, ["a@example.net"])
    assert reply.startswith("451 4.3.0") and "rate-limit" in reply
    assert t.gw.upstream.messages == []

    huge = [{"limit": 1_000_000, "period": "1h"}]
    rules = {name: {"fail_open": True, "tiers": huge} for name in limited(dead)["limits"]["rules"]}
    t2 = Limited(make_gateway, dead, **rules)
    with t2.smtp() as client:
        assert t2.send(client, ["a@example.net"]) == "250"


def test_limit_status_and_reset_via_cli(make_gateway: Any, store_url: str, tmp_path: Path) -> None:
    t = Limited(
        make_gateway, store_url, **{"login-messages": {"tiers": [{"limit": 5, "period": "1h"}]}}
    )
    with t.smtp() as client:
        for _ in range(2):
            assert t.send(client, ["a@example.net"]) == "250"
    config = tmp_path / "site.toml"
    config.write_text(
        f'state_dir = "{t.gw.state_dir}"\n[database]\nurl = "{t.gw.config.database_url}"\n'
        f'[limits]\nstore = "{store_url}"\n'
        '[limits.rules.login-messages]\ntiers = [{ limit = 5, period = "1h" }]\n'
    )
    cmd = [sys.executable, "-m", "gateway.cli", "--config", str(config), "limit"]
    status = subprocess.run(
        [*cmd, "status", t.login, "--json"], capture_output=True, text=True, timeout=60
    )
    assert status.returncode == 0, status.stderr
    rows = [eval_json(line) for line in status.stdout.splitlines()]
    row = next(r for r in rows if r["limit"] == "login-messages")
    assert (row["used"], row["remaining"]) == (2, 3)

    reset = subprocess.run([*cmd, "reset", t.login], capture_output=True, text=True, timeout=60)
    assert reset.returncode == 0, reset.stderr
    status = subprocess.run(
        [*cmd, "status", t.login, "--json"], capture_output=True, text=True, timeout=60
    )
    row = next(
        r for r in map(eval_json, status.stdout.splitlines()) if r["limit"] == "login-messages"
    )
    assert row["used"] == 0


def eval_json(line: str) -> dict[str, Any]:
    import json

    data: dict[str, Any] = json.loads(line)
    return data
