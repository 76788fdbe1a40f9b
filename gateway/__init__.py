"""Mailward: an outbound mail gateway (authenticated submission, policy, relay, audit)."""
