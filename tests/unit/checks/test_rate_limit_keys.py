"""``rate-limit`` keys: the client-IP grouping gives the same key whatever path computes it."""

from __future__ import annotations

import ipaddress

import pytest

from gateway.checks.rate_limit import client_key


@pytest.mark.parametrize(
    ("ip", "v4", "v6", "expected"),
    [
        ("192.0.2.7", 32, 64, "192.0.2.7/32"),
        ("192.0.2.7", 24, 64, "192.0.2.0/24"),
        ("2001:db8:1:2:3:4:5:6", 32, 64, "2001:db8:1:2::/64"),
        ("2001:DB8::0001", 32, 128, "2001:db8::1/128"),
        ("not an address", 32, 64, "not an address"),
    ],
)
def test_client_key_groups_by_prefix(ip: str, v4: int, v6: int, expected: str) -> None:
    assert client_key(ip, v4, v6) == expected
    if expected != ip:  # the same key as the network's own notation (stored keys stay valid)
        prefix = v4 if ":" not in ip else v6
        assert expected == ipaddress.ip_network(f"{ip}/{prefix}", strict=False).with_prefixlen
