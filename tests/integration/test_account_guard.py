"""Compromised-account detection (``account-guard``) end to end, through the real gateway.

Real SMTP sessions (smtplib, real TLS, real AUTH) against the composition root with the real
database (SQLite and, when MAILWARD_TEST_POSTGRES_URL is set, PostgreSQL) and the limit store in
process and, when MAILWARD_TEST_REDIS_URL is set, in Redis; the operator's side through the real
``mailward account`` command. Tests assert on replies, on what the upstream received, on the
quarantine and on the audit rows. Thresholds are tiny so that each stage is reached in a few
messages; every test uses a fresh login (Redis keys persist between runs).
"""

from __future__ import annotations

import json
import logging
import os
import smtplib
import time
import uuid
from datetime import timedelta
from typing import Any

import pytest

import gateway.cli
from gateway.app import make_pipeline
from gateway.config import load_config
from gateway.core.errors import ConfigError
from gateway.core.model import Identity, Recipient, RecipientStatus, Session, Transaction, utcnow
from gateway.policystate.account_state import EVENT_KINDS
from tests.fixtures.gateway import PASSWORD, RunningGateway

REDIS = os.environ.get("MAILWARD_TEST_REDIS_URL")
STORES = ["memory", *(["redis"] if REDIS else [])]
SUSPENDED_REPLY = "550 5.7.1 Account suspended, contact support"
ACCOUNT_EVENT_KINDS = frozenset(EVENT_KINDS.values())
HUGE = [{"limit": 1_000_000, "period": "1h"}]
LIMITS = (
    "login-messages",
    "login-recipients",
    "login-bytes",
    "login-distinct-recipients",
    "client-ip-messages",
    "sender-domain-messages",
)


@pytest.fixture(params=STORES)
def store_url(request: pytest.FixtureRequest) -> str:
    if request.param == "memory":
        return "memory://"
    assert REDIS is not None
    return REDIS


@pytest.fixture(autouse=True)
def account_subcommand(monkeypatch: pytest.MonkeyPatch) -> None:
    modules = gateway.cli.SUBCOMMAND_MODULES
    if "account" not in modules:
        monkeypatch.setattr(gateway.cli, "SUBCOMMAND_MODULES", (*modules, "account"))


# only the signal under test counts: the others get weight 0
QUIET = {
    "volume_weight": 0.0,
    "recipients_weight": 0.0,
    "ips_weight": 0.0,
    "auth_burst_weight": 0.0,
}


class Guarded:
    """A gateway with account-guard tuned by ``options`` and a fresh login of its own."""

    def __init__(
        self,
        make_gateway: Any,
        store_url: str,
        *,
        gateway: dict[str, Any] | None = None,
        **options: Any,
    ) -> None:
        overrides: dict[str, Any] = {
            "limits": {"store": store_url, "rules": {name: {"tiers": HUGE} for name in LIMITS}},
            "checks": {
                "account-guard": {"state_cache": "0.2s", **options},
                # no tarpit, no block: the failures of the burst test must be quick
                "auth-throttle": {
                    "delay_after": 100,
                    "max_delay": 0.0,
                    "block_after": 100,
                    "spray_logins": 100,
                    "login_throttle_after": 100,
                },
            },
        }
        self.gw: RunningGateway = make_gateway({**overrides, **(gateway or {})}, users=False)
        self.login = f"u{uuid.uuid4().hex[:10]}@example.com"
        self.gw.add_user(self.login, addresses=[self.login])
        self.sent = 0

    def message(self) -> bytes:
        self.sent += 1
        return (
            f"From: {self.login}\r\nTo: bob@example.net\r\nSubject: report {self.sent}\r\n"
            f"Message-ID: <m{self.sent}.{uuid.uuid4().hex[:8]}@example.com>\r\n\r\n"
            "The figures for this week are in the shared folder.\r\n"
        ).encode()

    def smtp(self, ip: str = "127.0.0.1") -> smtplib.SMTP:
        return self.gw.smtp(login=self.login, source_address=(ip, 0))

    def send(self, rcpts: tuple[str, ...] = ("bob@example.net",), ip: str = "127.0.0.1") -> str:
        """One message in its own session: the reply that ended it (MAIL or end of data)."""
        with self.smtp(ip) as client:
            code, text = client.mail(self.login)
            if code != 250:
                return f"{code} {text.decode()}"
            for rcpt in rcpts:
                assert client.rcpt(rcpt)[0] == 250
            code, text = client.data(self.message())
        return f"{code} {text.decode()}"

    def auth(self, password: str, ip: str = "127.0.0.1") -> int:
        """One AUTH PLAIN (smtplib's login() would retry with every mechanism on a failure)."""
        with self.gw.smtp(login=None, source_address=(ip, 0)) as client:
            client.user, client.password = self.login, password
            try:
                code, _ = client.auth("PLAIN", client.auth_plain)
            except smtplib.SMTPAuthenticationError as exc:
                code = exc.smtp_code
        return int(code)

    def events(self) -> list[Any]:
        """The login's stage transitions, oldest first."""
        return [r for r in self.gw.records(login=self.login) if r.kind in ACCOUNT_EVENT_KINDS]

    def stage(self) -> str:
        assert self.gw.app.stores is not None
        return str(self.gw.run(self.gw.app.stores.account_state.get(self.login)).stage)

    def cli(self, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
        """``mailward --config <site file for this gateway's database> account ARGV...``."""
        config = self.gw.state_dir.parent / f"{self.gw.state_dir.name}-cli.toml"
        config.write_text(
            f"state_dir = {json.dumps(str(self.gw.state_dir))}\n"
            f"[database]\nurl = {json.dumps(self.gw.config.database_url)}\ntimeout = 5.0\n",
            encoding="utf-8",
        )
        capsys.readouterr()
        code = gateway.cli.main(["--config", str(config), "account", *argv])
        out, err = capsys.readouterr()
        return code, out, err


def test_volume_burst_is_flagged_then_held_then_suspended_until_released(
    make_gateway: Any,
    store_url: str,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # a new login: baseline = the floor, 2 per hour; volume_factor 1 -> threshold 2; the level
    # grows by one with every further multiple of 2 (3..4 -> 1, 5..6 -> 2, 7.. -> 3)
    t = Guarded(
        make_gateway,
        store_url,
        **{**QUIET, "volume_weight": 1.0, "min_messages": 2.0, "volume_factor": 1.0},
    )
    caplog.set_level(logging.WARNING, logger="mailward.checks.account_guard")
    assert t.send().startswith("250 2.0.0 Ok: queued")
    assert t.send().startswith("250 2.0.0 Ok: queued")
    assert t.events() == []

    # 3 > 2: flagged -- audited with its evidence, alerted, and the mail still flows
    assert t.send().startswith("250 2.0.0 Ok: queued")
    (flagged,) = t.events()
    assert flagged.kind == "account-flagged" and flagged.login == t.login
    assert flagged.detail.startswith("ok -> flagged: at data (transaction ")
    assert "score 1: volume 3 vs 2 (baseline 2 per 1h (floor) x1) level 1 x1" in flagged.detail
    assert "flag at 1, hold at 2, suspend at 3, max stage suspend" in flagged.detail
    (verdict,) = flagged.verdicts
    assert (verdict.check_id, verdict.stage, verdict.action, verdict.applied) == (
        "account-guard",
        "data",
        "continue",
        True,
    )
    assert (verdict.measured, verdict.limit) == ("1", "flagged at score 1")
    assert any(
        "ALERT account-guard" in r.getMessage() and "ok -> flagged" in r.getMessage()
        for r in caplog.records
    )
    assert t.stage() == "flagged"
    assert t.send().startswith("250 2.0.0 Ok: queued")  # 4: still level 1
    assert len(t.gw.upstream.messages) == 4

    # 5 > 4: held -- the client gets 250 "held for review", the upstream nothing
    reply = t.send()
    assert reply.startswith("250 2.0.0 Ok: held for review as Q"), reply
    assert len(t.gw.upstream.messages) == 4
    assert [e.kind for e in t.events()] == ["account-flagged", "account-held"]
    held_record = t.gw.records(login=t.login, kind="message")[-1]
    assert held_record.outcome == "held" and [r.status for r in held_record.recipients] == ["held"]
    assert [(v.check_id, v.action) for v in held_record.verdicts] == [("account-guard", "hold")]
    assert t.gw.app.stores is not None
    entry = t.gw.run(t.gw.app.stores.quarantine.get(int(held_record.queue_id[1:])))
    assert entry is not None and entry.check_id == "account-guard"
    assert entry.login == t.login and "account held for review" in entry.reason
    assert t.send().startswith("250 2.0.0 Ok: held for review")  # 6: held counts too

    # 7 > 6: suspended -- this message is refused, and the next one at MAIL FROM
    assert t.send() == SUSPENDED_REPLY
    assert t.send() == SUSPENDED_REPLY
    assert len(t.gw.upstream.messages) == 4
    assert [e.kind for e in t.events()] == ["account-flagged", "account-held", "account-suspended"]
    suspended = t.events()[-1]
    assert suspended.detail.startswith("held -> suspended: at data")
    assert "volume 7 vs 2" in suspended.detail and "level 3" in suspended.detail
    assert suspended.verdicts[0].reply == SUSPENDED_REPLY
    refused = t.gw.records(login=t.login, kind="message")[-1]
    assert refused.outcome == "rejected" and refused.final_reply == SUSPENDED_REPLY
    assert refused.verdicts[0].stage == "mail" and refused.verdicts[0].action == "reject"

    code, out, _ = t.cli(capsys, "list", "--stage", "suspended")
    assert code == 0 and t.login in out
    code, out, _ = t.cli(capsys, "status", t.login)
    assert code == 0 and "stage:      suspended since" in out and '"volume"' in out

    # the operator releases it: mail flows again, with the counters started afresh
    code, out, err = t.cli(capsys, "release", t.login, "--reason", "customer reset password")
    assert code == 0, err
    assert f"{t.login}: suspended -> ok" in out
    assert "2 message(s)" in out and "mailward quarantine list" in out
    time.sleep(0.3)  # the gateway's state_cache
    assert t.send().startswith("250 2.0.0 Ok: queued")
    assert t.send().startswith("250 2.0.0 Ok: queued")
    assert len(t.gw.upstream.messages) == 6
    released = t.events()[-1]
    assert released.kind == "account-released" and released.listener == "cli"
    assert released.detail.startswith("suspended -> ok: released by operator cli")
    assert released.detail.endswith(": customer reset password")
    assert t.stage() == "ok"

    code, out, _ = t.cli(capsys, "status", t.login, "--json")
    status = json.loads(out)
    assert (status["stage"], status["epoch"]) == ("ok", 1)
    assert [h["kind"] for h in status["history"]] == [
        "account-released",
        "account-suspended",
        "account-held",
        "account-flagged",
    ]


def test_many_client_addresses_flag_then_hold_at_auth(make_gateway: Any, store_url: str) -> None:
    t = Guarded(make_gateway, store_url, **{**QUIET, "ips_weight": 1.0, "max_ips": 3})
    # 127.0.0.2 is a trusted network in the fixture: not used here
    for ip in ("127.0.0.1", "127.0.0.3"):
        assert t.auth(PASSWORD, ip) == 235
    assert t.events() == []
    assert t.auth(PASSWORD, "127.0.0.4") == 235  # the third address: flagged, AUTH still fine
    (flagged,) = t.events()
    assert flagged.kind == "account-flagged" and flagged.client_ip == "127.0.0.4"
    assert "ips 3 vs 3 (client addresses in 1h) level 1" in flagged.detail
    assert flagged.verdicts[0].stage == "auth"
    assert t.send(ip="127.0.0.4").startswith("250 2.0.0 Ok: queued")  # flagged: mail flows

    for ip in ("127.0.0.5", "127.0.0.6", "127.0.0.7"):
        assert t.auth(PASSWORD, ip) == 235
    assert [e.kind for e in t.events()] == ["account-flagged", "account-held"]
    assert "ips 6 vs 3" in t.events()[-1].detail
    assert t.send(ip="127.0.0.7").startswith("250 2.0.0 Ok: held for review")
    assert len(t.gw.upstream.messages) == 1


def test_auth_failure_burst_then_success_flags(make_gateway: Any, store_url: str) -> None:
    t = Guarded(
        make_gateway,
        store_url,
        **{**QUIET, "auth_burst_weight": 1.0, "auth_failures_before_success": 4},
    )
    for i in range(3):
        assert t.auth(f"guess{i}", "127.0.0.3") == 535
    assert t.auth(PASSWORD, "127.0.0.3") == 235  # 3 failures: below the threshold
    assert t.events() == []
    assert t.auth("guess3", "127.0.0.4") == 535  # the 4th failure within the window
    assert t.auth(PASSWORD, "127.0.0.4") == 235
    (flagged,) = t.events()
    assert flagged.kind == "account-flagged" and flagged.client_ip == "127.0.0.4"
    assert "auth-burst 1 vs 1" in flagged.detail
    # the burst was consumed by the success that revealed it: no second one from it
    assert t.auth(PASSWORD, "127.0.0.4") == 235
    assert [e.kind for e in t.events()] == ["account-flagged"]
    assert t.send().startswith("250 2.0.0 Ok: queued")


def test_a_quiet_honest_user_is_never_flagged(
    make_gateway: Any, store_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    t = Guarded(make_gateway, store_url)  # the shipped thresholds
    assert t.auth("typo", "127.0.0.3") == 535
    for ip in ("127.0.0.1", "127.0.0.3", "127.0.0.1", "127.0.0.3", "127.0.0.1"):
        assert t.send(("bob@example.net", "carol@example.org"), ip=ip).startswith("250 2.0.0 Ok")
    assert len(t.gw.upstream.messages) == 5
    assert t.events() == []
    assert all(not r.verdicts for r in t.gw.records(login=t.login, kind="message"))
    code, out, _ = t.cli(capsys, "status", t.login)
    assert code == 0 and "stage:      ok (never flagged)" in out
    code, out, _ = t.cli(capsys, "list")
    assert code == 0 and t.login not in out


def test_the_login_is_judged_against_its_own_history(make_gateway: Any, store_url: str) -> None:
    t = Guarded(
        make_gateway,
        store_url,
        **{**QUIET, "volume_weight": 1.0, "min_messages": 2.0, "volume_factor": 1.0},
    )
    # two days ago this login sent 6 messages in one hour: its baseline is 6 per hour
    assert t.gw.app.stores is not None
    session = Session(client_ip="127.0.0.1", client_port=1, listener="submission")
    session.identity = Identity(login=t.login, account_id=None)
    hour = (utcnow() - timedelta(days=2)).replace(minute=10, second=0, microsecond=0)
    for i in range(6):
        txn = Transaction(session, t.login, started_at=hour + timedelta(minutes=i))
        txn.recipients = [Recipient("bob@example.net", RecipientStatus.DELIVERED, "250 ok")]
        t.gw.run(t.gw.app.stores.audit.record_transaction(txn, "delivered"))
    for _ in range(6):  # a new login would have been flagged at the 3rd and held at the 5th
        assert t.send().startswith("250 2.0.0 Ok: queued")
    assert t.events() == []
    assert t.send().startswith("250 2.0.0 Ok: queued")  # 7 > 6
    (flagged,) = t.events()
    assert "volume 7 vs 6 (baseline 6 per 1h (1 active windows) x1)" in flagged.detail


@pytest.mark.parametrize(
    ("signal", "options"),
    [
        ("volume", {"volume_weight": 1.0, "min_messages": 2.0, "volume_factor": 1.0}),
        ("recipients", {"recipients_weight": 1.0, "min_recipients": 2.0, "recipients_factor": 1.0}),
    ],
)
def test_mail_taken_into_the_queue_counts_as_sent(
    make_gateway: Any, store_url: str, signal: str, options: dict[str, Any]
) -> None:
    """A message the upstream could not take now, accepted into the durable queue (the client got
    250), is sent volume: it counts toward the login's messages and distinct recipients."""
    t = Guarded(
        make_gateway,
        store_url,
        gateway={"queue": {"on_upstream_tempfail": "queue", "runner_interval": "1h"}},
        **{**QUIET, **options},
    )
    t.gw.upstream_handle.refuse()  # unreachable: every message is queued
    for n in range(2):
        reply = t.send((f"r{n}@example.net",))
        assert "queued as" in reply and "delivery will be retried" in reply, reply
    assert t.events() == []
    queued = t.gw.records(login=t.login, kind="message")
    assert [r.outcome for r in queued] == ["queued", "queued"]
    assert {r.status for q in queued for r in q.recipients} == {"queued"}
    # the third message, to a third address: 3 > 2 only if the two queued ones were counted
    assert "queued as" in t.send(("r2@example.net",))
    (flagged,) = t.events()
    assert flagged.kind == "account-flagged"
    assert f"{signal} 3 vs 2" in flagged.detail
    assert t.gw.upstream.messages == []


def test_max_stage_flag_never_holds(make_gateway: Any, store_url: str) -> None:
    t = Guarded(
        make_gateway,
        store_url,
        **{
            **QUIET,
            "volume_weight": 1.0,
            "min_messages": 1.0,
            "volume_factor": 1.0,
            "max_stage": "flag",
        },
    )
    for _ in range(8):  # up to 8 times the threshold
        assert t.send().startswith("250 2.0.0 Ok: queued")
    assert len(t.gw.upstream.messages) == 8
    assert [e.kind for e in t.events()] == ["account-flagged"]
    assert t.stage() == "flagged"


def test_warn_mode_measures_but_changes_nothing(make_gateway: Any, store_url: str) -> None:
    t = Guarded(
        make_gateway,
        store_url,
        **{
            **QUIET,
            "mode": "warn",
            "volume_weight": 1.0,
            "min_messages": 1.0,
            "volume_factor": 1.0,
        },
    )
    replies = [t.send() for _ in range(4)]
    assert all(r.startswith("250 2.0.0 Ok: queued") for r in replies), replies
    assert len(t.gw.upstream.messages) == 4
    assert t.events() == [] and t.stage() == "ok"
    would = [v for r in t.gw.records(login=t.login, kind="message") for v in r.verdicts]
    # 2 (flag), 3 (hold), 4 (suspend): what the stage would have been, never applied
    assert [(v.check_id, v.action, v.applied) for v in would] == [
        ("account-guard", "hold", False),
        ("account-guard", "reject", False),
    ]


def test_operator_suspends_and_releases_by_hand(
    make_gateway: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    t = Guarded(make_gateway, "memory://")
    code, out, err = t.cli(capsys, "suspend", t.login, "--reason", "phishing report #42")
    assert code == 0, err
    assert f"{t.login}: ok -> suspended" in out
    time.sleep(0.3)  # the gateway's state_cache
    assert t.send() == SUSPENDED_REPLY
    assert t.gw.upstream.messages == []
    code, out, _ = t.cli(capsys, "suspend", t.login)
    assert code == 0 and "already suspended" in out
    code, out, _ = t.cli(capsys, "list", "--json")
    (row,) = [json.loads(line) for line in out.splitlines() if t.login in line]
    assert row["stage"] == "suspended" and row["evidence"]["reason"] == "phishing report #42"

    code, out, _ = t.cli(capsys, "release", t.login)
    assert code == 0 and "suspended -> ok" in out and "held for review" not in out
    time.sleep(0.3)
    assert t.send().startswith("250 2.0.0 Ok: queued")
    kinds = [(e.kind, e.listener) for e in t.events()]
    assert kinds == [("account-suspended", "cli"), ("account-released", "cli")]
    assert t.events()[0].detail.startswith("ok -> suspended: suspended by operator cli")
    assert t.events()[0].detail.endswith(": phishing report #42")

    # a typo is not suspended: the login must exist
    code, _, err = t.cli(capsys, "suspend", "nobody@example.com")
    assert code == 1 and "no account" in err
    code, out, _ = t.cli(capsys, "release", "nobody@example.com")
    assert code == 0 and "already ok" in out


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"flag_at": 2.0, "hold_at": 1.0}, "flag_at"),
        ({"window": "7d", "baseline_period": "1d"}, "baseline_period"),
        ({"max_ips": 0}, "max_ips"),
        ({"volume_weight": -1.0}, "volume_weight"),
        ({"max_stage": "ban"}, "max_stage"),
        ({"state_cache": "soon"}, "state_cache"),
    ],
)
def test_bad_options_are_configuration_errors(options: dict[str, Any], key: str) -> None:
    config = load_config(None, {"checks": {"account-guard": options}})
    with pytest.raises(ConfigError) as info:
        make_pipeline(config, "site.toml")
    assert f"checks.account-guard.{key}" in str(info.value)


def test_store_down_fails_closed_unless_fail_open(make_gateway: Any) -> None:
    dead = "redis://127.0.0.1:1/0"
    others = {"on_error": "continue"}
    for fail_open, expected in ((False, "451 4.3.0"), (True, "250 2.0.0 Ok: queued")):
        gw: RunningGateway = make_gateway(
            {
                "limits": {
                    "store": dead,
                    "rules": {n: {"tiers": HUGE, "fail_open": True} for n in LIMITS},
                },
                "checks": {
                    "auth-throttle": others,
                    "spam-score": others,
                    "account-guard": {"fail_open": fail_open},
                },
            },
            users=not fail_open,  # one database for both gateways: alice is added once
        )
        gw.users["alice@example.com"] = PASSWORD
        with gw.smtp() as client:
            client.mail("alice@example.com")
            client.rcpt("bob@example.net")
            code, text = client.data(b"From: alice@example.com\r\n\r\nhi\r\n")
        reply = f"{code} {text.decode()}"
        assert reply.startswith(expected), (fail_open, reply)
        if not fail_open:
            assert "account-guard" in reply


def test_shipped_policy_lists_the_check() -> None:
    config = load_config(None)
    assert config.pipeline.auth[-1] == "account-guard"
    assert config.pipeline.mail[0] == "account-guard"
    data = config.pipeline.data
    assert data.index("account-guard") < data.index("spam-score") < data.index("rate-limit")
    assert data[-1] == "rate-limit"
