"""Secrets: ``env:NAME`` / ``file:PATH`` resolution, and secret values never shown in errors.

What it tests: :func:`gateway.config.resolve_secret` and the typed binder's handling of the
``relay.password`` key (the one key marked ``secret``): a wrong type, a misspelt key, invalid TOML
or a related validation error must say what is wrong without echoing the value.

Reads: files and environment variables the tests create (monkeypatched, removed afterwards).

Security notes: the fake secret ``S3CRET-VALUE-xyz`` is searched for in every message.
"""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest

from gateway.config import load_config, resolve_secret
from gateway.config.schema import RelayConfig
from gateway.config.typed import describe, doc_field
from gateway.core.errors import ConfigError

SECRET = "S3CRET-VALUE-xyz"
ENV = "MAILWARD_TEST_RELAY_PASSWORD"


def test_env_secret_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, SECRET)
    assert resolve_secret(f"env:{ENV}", "relay.password") == SECRET


def test_missing_env_secret_names_the_variable_and_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    with pytest.raises(ConfigError) as info:
        resolve_secret(f"env:{ENV}", "relay.password")
    assert info.value.key == "relay.password"
    assert ENV in info.value.problem


def test_file_secret_is_the_first_line_stripped(tmp_path: Path) -> None:
    path = tmp_path / "relay-password"
    path.write_text(f"  {SECRET} \nsecond line is ignored\n", encoding="utf-8")
    assert resolve_secret(f"file:{path}", "relay.password") == SECRET


def test_literal_is_returned_unchanged() -> None:
    assert resolve_secret(SECRET, "relay.password") == SECRET
    assert resolve_secret("", "relay.password") == ""


@pytest.mark.parametrize("content", [None, b"", b"\xff\xfe" + SECRET.encode()])
def test_bad_secret_file_names_path_and_key_but_not_the_content(
    tmp_path: Path, content: bytes | None
) -> None:
    path = tmp_path / "relay-password"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        resolve_secret(f"file:{path}", "relay.password")
    assert info.value.source == str(path)
    assert info.value.key == "relay.password"
    assert SECRET not in str(info.value)


def site(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mailward.toml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("text", "key"),
    [
        # wrong type: the binder says what it expected, "(hidden)" instead of the value
        (f'[relay]\nusername = "u"\npassword = ["{SECRET}"]\n', "relay.password"),
        (f'[relay]\nusername = "u"\npassword = {{ value = "{SECRET}" }}\n', "relay.password"),
        # a password without a username: the validation error does not quote it
        (f'[relay]\npassword = "{SECRET}"\n', "relay.username"),
        # a misspelt secret key: "unknown key" without the value
        (f'[relay]\nusername = "u"\npasword = "{SECRET}"\n', "relay.pasword"),
        # invalid TOML on the secret's line
        (f'[relay]\nusername = "u"\npassword = "{SECRET}\n', ""),
        (f'[relay]\nusername = "u"\npassword = {SECRET}\n', ""),
    ],
    ids=["list", "table", "no-username", "misspelt-key", "unterminated", "unquoted"],
)
def test_secret_value_never_appears_in_errors(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(site(tmp_path, text))
    assert info.value.key == key
    assert SECRET not in str(info.value)
    assert SECRET not in info.value.problem


def test_wrong_type_of_secret_says_hidden(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(site(tmp_path, '[relay]\nusername = "u"\npassword = 12345\n'))
    assert info.value.problem == "expected a string, got (hidden)"


def test_wrong_type_of_ordinary_key_shows_the_value(tmp_path: Path) -> None:
    """The counterpart of the hidden case: only secret keys are masked."""
    with pytest.raises(ConfigError) as info:
        load_config(site(tmp_path, "[relay]\nhost = 12345\n"))
    assert "12345" in info.value.problem


def test_secret_is_loaded_verbatim_and_resolved_only_on_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ENV, raising=False)
    config = load_config(site(tmp_path, f'[relay]\nusername = "u"\npassword = "env:{ENV}"\n'))
    assert config.relay.password == f"env:{ENV}"  # loading does not need the variable
    monkeypatch.setenv(ENV, SECRET)
    assert resolve_secret(config.relay.password, "relay.password") == SECRET


def test_relay_password_is_the_key_marked_secret() -> None:
    secret_keys = [f.name for f in dataclasses.fields(RelayConfig) if f.metadata["secret"]]
    assert secret_keys == ["password"]


def test_describe_masks_a_secret_default() -> None:
    @dataclasses.dataclass(frozen=True)
    class WithSecret:
        token: str = doc_field(SECRET, "A secret with a default.", secret=True)
        plain: str = doc_field("visible", "Not secret.")

    shown = {d.key: d.default for d in describe(WithSecret)}
    assert SECRET not in shown["token"]
    assert "(secret)" in shown["token"]
    assert shown["plain"] == '"visible"'
