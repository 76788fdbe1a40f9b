"""``[queue]``: defaults, durations and sizes, validation errors naming the key, and the runner
settings derived from it."""

from __future__ import annotations

import pytest

from gateway.config import load_config
from gateway.config.schema import QueueConfig, parse_size
from gateway.core.errors import ConfigError
from gateway.queue import RunnerSettings


def test_defaults() -> None:
    config = load_config(overrides={"state_dir": "/srv/mw"})
    queue = config.queue
    assert queue.spool_path(config.state_dir) == "/srv/mw/spool"
    assert queue.on_upstream_tempfail == "queue"
    assert queue.lifetime_seconds == 5 * 86400
    assert (queue.retry_first_seconds, queue.retry_max_seconds) == (300, 3600)
    assert queue.warn_after_seconds == 4 * 3600
    assert queue.min_free_bytes == 512 * 1024 * 1024
    assert queue.claim_lease_seconds == 1200 and queue.runner_batch == 20
    settings = RunnerSettings.from_config(queue, reporting_mta="gw.example")
    assert (settings.interval, settings.batch, settings.lease) == (10, 20, 1200)
    assert (settings.retry_first, settings.retry_max, settings.warn_after) == (300, 3600, 14400)
    assert settings.reporting_mta == "gw.example"


@pytest.mark.parametrize("off", ["", "0", " 0 "])
def test_warnings_can_be_turned_off(off: str) -> None:
    queue = load_config(overrides={"queue": {"warn_after": off}}).queue
    assert queue.warn_after_seconds is None
    assert RunnerSettings.from_config(queue, reporting_mta="x").warn_after is None


def test_sizes() -> None:
    assert parse_size("0") == 0
    assert parse_size("4096") == 4096
    assert parse_size("2K") == 2048
    assert parse_size("512M") == 512 * 1024**2
    assert parse_size("2g") == 2 * 1024**3
    assert parse_size("1GB") == 1024**3
    for bad in ("", "M", "-1M", "1.5G", "12X"):
        with pytest.raises(ValueError):
            parse_size(bad)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"lifetime": "5 days"}, "queue.lifetime"),
        ({"retry_first": "0s"}, "queue.retry_first"),
        ({"retry_first": "2h", "retry_max": "1h"}, "queue.retry_max"),
        ({"warn_after": "soon"}, "queue.warn_after"),
        ({"min_free_space": "lots"}, "queue.min_free_space"),
        ({"claim_lease": "30s"}, "queue.claim_lease"),
        ({"runner_batch": 0}, "queue.runner_batch"),
        ({"runner_interval": "x"}, "queue.runner_interval"),
        ({"spool_dir": " "}, "queue.spool_dir"),
        ({"on_upstream_tempfail": "bounce"}, "queue.on_upstream_tempfail"),
        ({"nope": 1}, "queue.nope"),
    ],
)
def test_bad_values_name_the_key(overrides: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides={"queue": overrides})
    assert key in str(info.value)


def test_queue_config_is_frozen() -> None:
    queue = QueueConfig()
    with pytest.raises(AttributeError):
        queue.lifetime = "1d"  # type: ignore[misc]
