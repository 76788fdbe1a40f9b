"""Failed-AUTH defence end to end: tarpit, IP block, spraying, login under attack, no lockout."""

from __future__ import annotations

import smtplib
import time
from typing import Any

import pytest

from tests.fixtures.gateway import ALICE, PASSWORD, RunningGateway


def throttled(**options: Any) -> dict[str, Any]:
    base = {
        "delay_after": 100,
        "max_delay": 0.0,
        "block_after": 100,
        "spray_logins": 100,
        "login_throttle_after": 100,
    }
    return {"checks": {"auth-throttle": {**base, **options}}}


def attempt(gw: RunningGateway, login: str, password: str, ip: str = "127.0.0.1") -> str:
    """One AUTH PLAIN (smtplib's login() would retry with every mechanism on a failure)."""
    with gw.smtp(login=None, source_address=(ip, 0)) as client:
        client.user, client.password = login, password
        try:
            code, text = client.auth("PLAIN", client.auth_plain)
        except smtplib.SMTPAuthenticationError as exc:
            code, text = exc.smtp_code, exc.smtp_error
    return f"{code} {text.decode()}"


def test_failures_are_tarpitted(make_gateway: Any) -> None:
    gw = make_gateway(throttled(delay_after=1, max_delay=1.0))
    start = time.monotonic()
    assert attempt(gw, ALICE, "wrong1").startswith("535 5.7.8")
    first = time.monotonic() - start
    start = time.monotonic()
    assert attempt(gw, ALICE, "wrong2").startswith("535 5.7.8")
    second = time.monotonic() - start
    assert second - first >= 0.7  # the second failure waited for its 1 s delay


def test_ip_is_blocked_after_repeated_failures(make_gateway: Any) -> None:
    gw = make_gateway(throttled(block_after=3))
    for i in range(3):
        assert attempt(gw, ALICE, f"wrong{i}").startswith("535")
    # blocked now: even the right password gets a temporary refusal, checked before the password
    assert attempt(gw, ALICE, PASSWORD).startswith("454 4.7.0 Too many failed")
    assert attempt(gw, ALICE, PASSWORD, ip="127.0.0.5").startswith("235")  # another address
    (event,) = gw.records(kind="auth-throttled")
    (verdict,) = event.verdicts
    assert (verdict.check_id, verdict.stage, verdict.action) == ("auth-throttle", "auth", "defer")
    assert verdict.measured == "3"


def test_password_spraying_blocks_the_ip(make_gateway: Any) -> None:
    gw = make_gateway(throttled(spray_logins=3))
    for login in ("a@example.com", "b@example.com", "c@example.com"):
        assert attempt(gw, login, "Winter2026!").startswith("535")
    assert attempt(gw, ALICE, PASSWORD).startswith("454 4.7.0")


def test_login_under_attack_keeps_working_from_known_addresses(make_gateway: Any) -> None:
    gw = make_gateway(throttled(login_throttle_after=3))
    assert attempt(gw, ALICE, PASSWORD, ip="127.0.0.2").startswith("235")  # alice's own address
    for i, ip in enumerate(("127.0.0.3", "127.0.0.4", "127.0.0.6")):
        assert attempt(gw, ALICE, f"guess{i}", ip=ip).startswith("535")
    # strangers are refused for this login, whatever the password...
    assert attempt(gw, ALICE, PASSWORD, ip="127.0.0.7").startswith("454 4.7.0")
    # ...while alice, from where she logged in before, is not locked out
    assert attempt(gw, ALICE, PASSWORD, ip="127.0.0.2").startswith("235")
    with gw.smtp(source_address=("127.0.0.2", 0)) as client:
        client.sendmail(ALICE, ["bob@example.net"], b"From: alice@example.com\r\n\r\nhi\r\n")
    assert len(gw.upstream.messages) == 1


def test_store_down_refuses_auth_temporarily(make_gateway: Any) -> None:
    gw = make_gateway({"limits": {"store": "redis://127.0.0.1:1/0"}})
    assert attempt(gw, ALICE, PASSWORD).startswith("454 4.7.0")


@pytest.mark.parametrize("mode", ["warn", "off"])
def test_warn_and_off_modes_never_refuse(make_gateway: Any, mode: str) -> None:
    gw = make_gateway({"checks": {"auth-throttle": {"mode": mode, "block_after": 1}}})
    assert attempt(gw, ALICE, "wrong").startswith("535")
    assert attempt(gw, ALICE, PASSWORD).startswith("235")
