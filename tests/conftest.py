"""Shared test configuration. Fixture modules live in tests/fixtures/ and are loaded as plugins.

Services: the suite needs PostgreSQL and Redis only when MAILWARD_TEST_POSTGRES_URL /
MAILWARD_TEST_REDIS_URL are set (CI sets them; .ci/run fails when they are unreachable). Locally,
without them, the PostgreSQL variants are not collected (they are not "skipped": they do not exist);
CI proves them.
"""

pytest_plugins = [
    "tests.fixtures.db",
    "tests.fixtures.upstream",
    "tests.fixtures.gateway",
    "tests.fixtures.limits",
    "tests.fixtures.rspamd",
    "tests.fixtures.keys",
]
