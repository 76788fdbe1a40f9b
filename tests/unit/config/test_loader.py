"""Configuration loading: shipped defaults, overlay semantics, and a ConfigError for every bad
input.

What it tests: ``gateway.config.loader`` (layers, merge, TOML reading) with the typed binder and the
pipeline registry's validation of ``[pipeline]`` and ``[checks.<id>]``, the way ``mailward config
check`` runs them: load, then build the pipeline. Every error must name the site file and the dotted
key, and say what is wrong.

Reads: the shipped ``policies/*.toml`` and site files written to a temporary directory.

Security notes: none (no secrets here; see test_secrets.py).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from gateway.app import make_pipeline
from gateway.config import Config, load_config, shipped_dir
from gateway.config.loader import load_layers, merge, read_toml
from gateway.config.schema import ListenerConfig, SmtpConfig
from gateway.core.errors import ConfigError
from gateway.core.model import Mode, OnError, Stage
from gateway.pipeline.runner import Pipeline


def site(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mailward.toml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def check_config(path: Path | None) -> tuple[Config, Pipeline]:
    """What ``mailward config check`` does: bind the schema, then build the pipeline."""
    config = load_config(path)
    source = str(path) if path else "shipped policies"
    return config, make_pipeline(config, source)


def stage_ids(pipeline: Pipeline, stage: Stage) -> list[str]:
    return [c.id for c in pipeline.describe()[stage]]


# --- shipped defaults -----------------------------------------------------------------------------


def test_shipped_defaults_load_and_build_the_shipped_pipeline() -> None:
    config, pipeline = check_config(None)
    # values that come from policies/00-pipeline.toml, not from the schema defaults
    assert config.pipeline.auth == ["auth-throttle", "account-guard"]
    assert config.pipeline.mail == [
        "account-guard",
        "sender-identity",
        "message-size",
        "rate-limit",
    ]
    assert config.pipeline.rcpt == ["recipient-limit", "rate-limit", "encryption"]
    assert config.pipeline.data == [
        "message-size",
        "sender-identity",
        "account-guard",
        "spam-score",
        "rate-limit",
    ]
    assert config.checks["recipient-limit"]["max_recipients"] == 100
    assert stage_ids(pipeline, Stage.MAIL) == [
        "account-guard",
        "sender-identity",
        "message-size",
        "rate-limit",
    ]
    assert stage_ids(pipeline, Stage.RCPT) == ["recipient-limit", "rate-limit", "encryption"]
    assert stage_ids(pipeline, Stage.DATA) == [
        "message-size",
        "sender-identity",
        "account-guard",
        "spam-score",
        "rate-limit",
    ]
    assert stage_ids(pipeline, Stage.CONNECT) == []
    limit = pipeline.describe()[Stage.RCPT][0]
    assert (limit.mode, limit.timeout, limit.on_error) == (Mode.ENFORCE, 1.0, OnError.DEFER)
    assert pipeline.soft_fail is False


def test_without_site_file_every_other_key_is_the_schema_default() -> None:
    config = load_config(None)
    assert config.smtp == SmtpConfig()
    assert config.relay == Config().relay
    assert [x.port for x in config.smtp.listeners] == [587, 465]
    assert config.database_url == "sqlite+aiosqlite:////var/lib/mailward/mailward.db"


def test_load_layers_merges_every_shipped_file_in_name_order() -> None:
    files = sorted(p.name for p in shipped_dir("policies").glob("*.toml"))
    assert "00-pipeline.toml" in files
    data, source = load_layers()
    assert source == "shipped policies"
    expected: dict[str, object] = {}
    for name in files:
        expected = merge(expected, read_toml(shipped_dir("policies") / name))
    assert data == expected


# --- overlay semantics ----------------------------------------------------------------------------


def test_site_tables_merge_key_by_key(tmp_path: Path) -> None:
    path = site(
        tmp_path,
        """
        [checks.sender-identity]
        mode = "warn"

        [smtp]
        max_connections = 5
        """,
    )
    config, pipeline = check_config(path)
    # the site's key wins, the shipped keys of the same table stay
    assert config.checks["sender-identity"] == {
        "mode": "warn",
        "timeout": 5.0,
        "on_error": "defer",
        "allow_null_sender": False,
        "check_from_header": True,
    }
    identity = next(c for c in pipeline.describe()[Stage.MAIL] if c.id == "sender-identity")
    assert identity.mode is Mode.WARN
    assert config.smtp.max_connections == 5
    assert config.smtp.max_connections_per_ip == SmtpConfig().max_connections_per_ip


def test_site_arrays_replace_whole_arrays(tmp_path: Path) -> None:
    path = site(
        tmp_path,
        """
        [pipeline]
        mail = ["message-size"]

        [[smtp.listeners]]
        name = "internal"
        address = "127.0.0.1"
        port = 2525
        """,
    )
    config, pipeline = check_config(path)
    assert config.pipeline.mail == ["message-size"]
    assert stage_ids(pipeline, Stage.MAIL) == ["message-size"]
    # the sibling arrays of the same table are untouched (tables merge)
    assert config.pipeline.data == [
        "message-size",
        "sender-identity",
        "account-guard",
        "spam-score",
        "rate-limit",
    ]
    assert config.pipeline.rcpt == ["recipient-limit", "rate-limit", "encryption"]
    # one listener replaces both default listeners; unset keys take the schema default
    assert config.smtp.listeners == [ListenerConfig("internal", "127.0.0.1", 2525, "starttls")]


def test_site_empty_array_switches_a_stage_off(tmp_path: Path) -> None:
    config, pipeline = check_config(site(tmp_path, "[pipeline]\nrcpt = []\n"))
    assert config.pipeline.rcpt == []
    assert stage_ids(pipeline, Stage.RCPT) == []


def test_merge_does_not_modify_its_inputs() -> None:
    base = {"a": {"x": 1, "y": [1, 2]}, "b": 1}
    overlay = {"a": {"y": [3]}, "c": {"z": 1}}
    merged = merge(base, overlay)
    assert merged == {"a": {"x": 1, "y": [3]}, "b": 1, "c": {"z": 1}}
    assert base == {"a": {"x": 1, "y": [1, 2]}, "b": 1}
    assert overlay == {"a": {"y": [3]}, "c": {"z": 1}}


def test_hyphenated_keys_and_integer_numbers_are_accepted(tmp_path: Path) -> None:
    path = site(
        tmp_path,
        """
        [smtp]
        max-connections = 7
        idle_timeout = 30

        [checks.recipient-limit]
        max-recipients = 12
        """,
    )
    config, pipeline = check_config(path)
    assert config.smtp.max_connections == 7
    assert config.smtp.idle_timeout == 30.0
    assert isinstance(config.smtp.idle_timeout, float)
    check = pipeline.describe()[Stage.RCPT][0].check
    assert check.limit == 12  # type: ignore[attr-defined]


def test_database_url_substitutes_state_dir(tmp_path: Path) -> None:
    config = load_config(site(tmp_path, 'state_dir = "/srv/mw"\n'))
    assert config.database_url == "sqlite+aiosqlite:////srv/mw/mailward.db"


# --- every kind of bad input ----------------------------------------------------------------------

BAD_INPUTS: list[tuple[str, str, str, str]] = [
    # (test id, site file, key named in the error, words of the problem)
    ("unknown-top-level-key", 'stat_dir = "/x"\n', "stat_dir", "unknown key"),
    ("unknown-nested-key", '[relay]\nhots = "mx"\n', "relay.hots", "unknown key"),
    ("unknown-table", "[smtpd]\nport = 25\n", "smtpd", "unknown key"),
    ("wrong-type-int", '[smtp]\nmax_connections = "many"\n', "smtp.max_connections", "integer"),
    ("bool-is-not-int", "[smtp]\nmax_connections = true\n", "smtp.max_connections", "integer"),
    ("float-is-not-int", "[relay]\npool_size = 2.5\n", "relay.pool_size", "integer"),
    ("wrong-type-bool", '[smtp]\nsmtputf8 = "yes"\n', "smtp.smtputf8", "boolean"),
    ("wrong-type-number", '[smtp]\nidle_timeout = "5m"\n', "smtp.idle_timeout", "number"),
    ("wrong-type-string", "[relay]\nhost = 25\n", "relay.host", "string"),
    ("table-expected", "smtp = 5\n", "smtp", "table"),
    ("list-expected", '[smtp]\ntrusted_networks = "10.0.0.0/8"\n', "smtp.trusted_networks", "list"),
    ("list-item-type", "[pipeline]\nmail = [1]\n", "pipeline.mail[0]", "string"),
    ("bad-literal", '[smtp]\nbare_newline = "fix"\n', "smtp.bare_newline", '"reject"'),
    ("bad-literal-tls", '[tls]\nmin_version = "SSLv3"\n', "tls.min_version", '"TLSv1.2"'),
    (
        "bad-literal-in-listener",
        '[[smtp.listeners]]\nname = "x"\naddress = "127.0.0.1"\ntls = "ssl"\n',
        "smtp.listeners[0].tls",
        '"implicit"',
    ),
    (
        "bad-cidr",
        '[smtp]\ntrusted_networks = ["10.0.0.0/8", "10.0.0.0/33"]\n',
        "smtp.trusted_networks[1]",
        "not a network",
    ),
    (
        "cidr-not-an-address",
        '[smtp]\ntrusted_networks = ["intranet"]\n',
        "smtp.trusted_networks[0]",
        "not a network",
    ),
    (
        "listener-port-too-big",
        '[[smtp.listeners]]\naddress = "127.0.0.1"\nport = 70000\n',
        "smtp.listeners[0].port",
        "not a TCP port",
    ),
    (
        "listener-port-negative",
        '[[smtp.listeners]]\naddress = "127.0.0.1"\nport = -1\n',
        "smtp.listeners[0].port",
        "not a TCP port",
    ),
    (
        "listener-address-not-ip",
        '[[smtp.listeners]]\naddress = "localhost"\n',
        "smtp.listeners[0].address",
        "not an IP address",
    ),
    (
        "listener-names-not-unique",
        '[[smtp.listeners]]\nname = "a"\n[[smtp.listeners]]\nname = "a"\nport = 465\n',
        "smtp.listeners",
        "unique",
    ),
    ("relay-port-zero", "[relay]\nport = 0\n", "relay.port", "not a TCP port"),
    ("relay-port-too-big", "[relay]\nport = 65536\n", "relay.port", "not a TCP port"),
    ("relay-pool-size", "[relay]\npool_size = 0\n", "relay.pool_size", "at least 1"),
    ("cert-without-key", '[tls]\ncert_file = "/etc/c.pem"\n', "tls.key_file", "together"),
    ("key-without-cert", '[tls]\nkey_file = "/etc/k.pem"\n', "tls.key_file", "together"),
    (
        "message-size-too-small",
        "[smtp]\nmax_message_size = 100\n",
        "smtp.max_message_size",
        "at least 1024",
    ),
    ("timeout-not-positive", "[smtp]\ndata_timeout = 0\n", "smtp.data_timeout", "positive"),
    # pipeline and check tables (validated by the registry)
    (
        "unknown-check-in-pipeline",
        '[pipeline]\nmail = ["sender-identity", "spf"]\n',
        "pipeline.mail[1]",
        "unknown check 'spf'",
    ),
    (
        "check-at-wrong-stage",
        '[pipeline]\nrcpt = ["sender-identity"]\n',
        "pipeline.rcpt[0]",
        "cannot run at rcpt",
    ),
    (
        "check-at-connect",
        '[pipeline]\nconnect = ["message-size"]\n',
        "pipeline.connect[0]",
        "cannot run at connect",
    ),
    (
        "check-listed-twice",
        '[pipeline]\ndata = ["message-size", "message-size"]\n',
        "pipeline.data",
        "listed twice",
    ),
    ("unknown-check-table", '[checks.spf]\nmode = "warn"\n', "checks.spf", "unknown check"),
    ("check-table-not-table", "[checks]\nmessage-size = 5\n", "checks.message-size", "table"),
    (
        "unknown-check-option",
        "[checks.recipient-limit]\nmax_rcpt = 5\n",
        "checks.recipient-limit.max_rcpt",
        "unknown key",
    ),
    (
        "unknown-option-of-unlisted-check",
        "[pipeline]\nrcpt = []\n[checks.recipient-limit]\nmax_rcpt = 5\n",
        "checks.recipient-limit.max_rcpt",
        "unknown key",
    ),
    (
        "bad-check-option-type",
        '[checks.recipient-limit]\nmax_recipients = "many"\n',
        "checks.recipient-limit.max_recipients",
        "integer",
    ),
    (
        "bad-check-option-bool",
        "[checks.sender-identity]\nallow_null_sender = 1\n",
        "checks.sender-identity.allow_null_sender",
        "boolean",
    ),
    (
        "bad-check-option-value",
        "[checks.recipient-limit]\nmax_recipients = 0\n",
        "checks.recipient-limit.max_recipients",
        "at least 1",
    ),
    (
        "negative-max-size",
        "[checks.message-size]\nmax_size = -1\n",
        "checks.message-size.max_size",
        "negative",
    ),
    (
        "bad-check-mode",
        '[checks.message-size]\nmode = "audit"\n',
        "checks.message-size.mode",
        '"warn"',
    ),
    (
        "bad-check-on-error",
        '[checks.message-size]\non_error = "ignore"\n',
        "checks.message-size.on_error",
        '"continue"',
    ),
    (
        "check-timeout-zero",
        "[checks.message-size]\ntimeout = 0\n",
        "checks.message-size.timeout",
        "positive",
    ),
    (
        "check-timeout-type",
        '[checks.message-size]\ntimeout = "1s"\n',
        "checks.message-size.timeout",
        "number",
    ),
]


@pytest.mark.parametrize(
    ("text", "key", "problem"), [case[1:] for case in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS]
)
def test_bad_input_names_file_key_and_problem(
    tmp_path: Path, text: str, key: str, problem: str
) -> None:
    path = site(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        check_config(path)
    err = info.value
    assert err.source == str(path)
    assert err.key == key
    assert problem in err.problem
    assert str(err) == f"{path}: {key}: {err.problem}"


def test_invalid_toml_names_the_file_and_the_position(tmp_path: Path) -> None:
    path = site(tmp_path, "[relay]\nhost = \n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.source == str(path)
    assert info.value.key == ""
    assert info.value.problem.startswith("invalid TOML")
    assert "line 2" in info.value.problem


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert (info.value.source, info.value.problem) == (str(path), "file not found")


def test_directory_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert info.value.source == str(tmp_path)
    assert "directory" in info.value.problem


def test_unknown_key_error_lists_the_known_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(site(tmp_path, "[audit]\nbatch = 5\n"))
    assert "batch_size" in info.value.problem


def test_audit_batch_linger_is_bounded(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(site(tmp_path, "[audit]\nbatch_linger = 2\n"))
    assert info.value.key.endswith("batch_linger") and "between 0 and 1" in info.value.problem
