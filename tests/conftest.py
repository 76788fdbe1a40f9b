"""Shared test configuration. Fixture modules live in tests/fixtures/ and are loaded as plugins.

Services: the suite needs PostgreSQL and Redis only when MAILWARD_TEST_POSTGRES_URL /
MAILWARD_TEST_REDIS_URL are set (CI sets them; .ci/run fails when they are unreachable). Locally,
without them, the PostgreSQL variants are not collected (they are not "skipped": they do not exist);
CI proves them.

Parallel: ``tests/run`` runs the suite in pytest-xdist workers (``-n``, MAILWARD_TEST_WORKERS).
Every fixture is safe for that — nothing is shared between workers but the PostgreSQL and Redis
servers, and on those each test has a database and a key prefix of its own (names carry the
worker, ``tests/fixtures/parallel.py``); ports are bound as port 0 and held, or drawn from a block
of the worker's own below the ephemeral range; session fixtures (keys, certificates, rspamd) are
per worker. A test must not assume it runs alone: no global counts or FLUSH on the shared servers,
no looking for processes by name (only for its own children), no fixed ports or /tmp names.
"""

pytest_plugins = [
    "tests.fixtures.db",
    "tests.fixtures.upstream",
    "tests.fixtures.gateway",
    "tests.fixtures.limits",
    "tests.fixtures.rspamd",
    "tests.fixtures.keys",
]
