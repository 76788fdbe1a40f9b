"""Check registry: check ids → factories, and building the Pipeline from configuration.

What it does: knows every check id Mailward ships (kebab-case, the same id in config, logs, audit rows
and docs), splits each ``[checks.<id>]`` table into the common settings (mode, timeout, on_error) and the
check's own options (validated against the check's ``Options`` dataclass), and builds the per-stage
lists in the configured order. Unknown ids, a check listed at a stage it cannot run at, or a bad option
raise ConfigError naming the key.

Reads: ``Config.pipeline`` and ``Config.checks``.

Security notes: none beyond validation; a check that cannot be built stops the start-up (exit 2).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from gateway.config.schema import CheckSettings, Config
from gateway.config.typed import build
from gateway.core.errors import ConfigError
from gateway.core.model import Stage
from gateway.pipeline.runner import Check, ConfiguredCheck, Pipeline


@dataclass(frozen=True)
class CheckSpec:
    """How to build one check: its id, stages it may run at, options schema and factory."""

    id: str
    stages: frozenset[Stage]
    options: type
    factory: Callable[[Any, Any], Check]  # (options, dependencies) -> Check
    doc: str


_COMMON = {f.name for f in dataclasses.fields(CheckSettings)}


def split_settings(
    check_id: str, raw: Mapping[str, Any], spec: CheckSpec, source: str
) -> tuple[CheckSettings, Any]:
    common = {k: v for k, v in raw.items() if k.replace("-", "_") in _COMMON}
    own = {k: v for k, v in raw.items() if k.replace("-", "_") not in _COMMON}
    settings = build(CheckSettings, common, source, f"checks.{check_id}")
    options: Any = build(spec.options, own, source, f"checks.{check_id}")
    if settings.timeout <= 0:
        raise ConfigError(source, f"checks.{check_id}.timeout", "must be positive")
    return settings, options


def build_pipeline(
    config: Config, specs: Mapping[str, CheckSpec], deps: Any, source: str = "configuration"
) -> Pipeline:
    for check_id in config.checks:
        if check_id not in specs:
            known = ", ".join(sorted(specs))
            raise ConfigError(source, f"checks.{check_id}", f"unknown check (known: {known})")
    built: dict[str, ConfiguredCheck] = {}
    stages: dict[Stage, list[ConfiguredCheck]] = {}
    for stage in (Stage.CONNECT, Stage.AUTH, Stage.MAIL, Stage.RCPT, Stage.DATA):
        ids: list[str] = getattr(config.pipeline, stage.value)
        if len(set(ids)) != len(ids):
            raise ConfigError(source, f"pipeline.{stage.value}", "a check is listed twice")
        for i, check_id in enumerate(ids):
            spec = specs.get(check_id)
            key = f"pipeline.{stage.value}[{i}]"
            if spec is None:
                raise ConfigError(source, key, f"unknown check {check_id!r}")
            if stage not in spec.stages:
                allowed = ", ".join(sorted(s.value for s in spec.stages))
                raise ConfigError(
                    source, key, f"check {check_id} cannot run at {stage.value} (only: {allowed})"
                )
            if check_id not in built:
                settings, options = split_settings(
                    check_id, config.checks.get(check_id, {}), spec, source
                )
                built[check_id] = ConfiguredCheck.from_settings(
                    spec.factory(options, deps), settings
                )
            stages.setdefault(stage, []).append(built[check_id])
    # validate options of checks that are configured but not listed in any stage, too
    for check_id, raw in config.checks.items():
        if check_id not in built:
            split_settings(check_id, raw, specs[check_id], source)
    return Pipeline(stages, soft_fail=config.pipeline.soft_fail)
