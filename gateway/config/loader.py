"""Load the configuration: schema defaults → shipped policy files → the site's TOML file.

What it does: reads the shipped defaults in ``policies/*.toml`` (never edited by sites), overlays the
site file given with ``--config`` (tables merge key by key, arrays replace), and binds the result to
:class:`~gateway.config.schema.Config`. Any problem raises ConfigError naming the file, key and problem.
Also locates shipped resources (``policies/``, ``migrations/``) both in a source checkout and in an
installed wheel, and resolves ``env:``/``file:`` secrets.

Reads: ``policies/*.toml``, the site file, environment variables and files named by secrets.

Security notes: secret values are resolved only when needed and never logged; a missing secret file or
variable is an error naming the key, not the value.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gateway.config.schema import Config
from gateway.config.typed import build
from gateway.core.errors import ConfigError

_PACKAGE_DIR = Path(__file__).resolve().parent.parent


def shipped_dir(name: str) -> Path:
    """``policies`` or ``migrations``: inside the wheel (``gateway/_shipped``) or the checkout."""
    for candidate in (_PACKAGE_DIR / "_shipped" / name, _PACKAGE_DIR.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"shipped directory {name!r} not found")


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(str(path), "", "file not found") from None
    except PermissionError:
        raise ConfigError(str(path), "", "permission denied") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), "", f"invalid TOML: {exc}") from None
    except IsADirectoryError:
        raise ConfigError(str(path), "", "is a directory, not a file") from None


def merge(base: Mapping[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge tables; any other value (arrays included) in ``overlay`` replaces the base's."""
    out = dict(base)
    for key, value in overlay.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def load_layers(
    site_file: Path | None = None, overrides: Mapping[str, Any] | None = None
) -> tuple[dict[str, Any], str]:
    """The merged raw data and a label naming its last source (for error messages)."""
    data: dict[str, Any] = {}
    for path in sorted(shipped_dir("policies").glob("*.toml")):
        data = merge(data, read_toml(path))
    source = "shipped policies"
    if site_file is not None:
        data = merge(data, read_toml(site_file))
        source = str(site_file)
    if overrides:
        data = merge(data, overrides)
    return data, source


def load_config(
    site_file: Path | str | None = None, overrides: Mapping[str, Any] | None = None
) -> Config:
    """Load and validate; raises ConfigError (file, key, problem) on any defect."""
    path = Path(site_file) if site_file is not None else None
    data, source = load_layers(path, overrides)
    config = build(Config, data, source)
    # Check options are validated against each check's own schema by the pipeline registry
    # (gateway.pipeline.registry.validate_checks), which the CLI runs right after this.
    return config


def resolve_secret(value: str, key: str) -> str:
    """``env:NAME`` → the variable, ``file:PATH`` → the file's first line, else the literal."""
    if value.startswith("env:"):
        name = value[4:]
        if name not in os.environ:
            raise ConfigError("environment", key, f"variable {name} is not set")
        return os.environ[name]
    if value.startswith("file:"):
        path = Path(value[5:])
        try:
            return path.read_text(encoding="utf-8").splitlines()[0].strip()
        except (OSError, IndexError, UnicodeDecodeError):
            raise ConfigError(str(path), key, "secret file missing, unreadable or empty") from None
    return value
