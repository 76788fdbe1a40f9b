"""Generic, typed TOML → dataclass binding with precise error messages.

What it does: :func:`build` turns a parsed TOML table into an instance of a (frozen) dataclass whose
fields carry ``metadata={"doc": ...}``. It checks every key against the field's type (int, float, bool,
str, Literal, list[...], nested dataclass, dict[str, dataclass]) and refuses unknown keys. Errors are
:class:`~gateway.core.errors.ConfigError` naming the file, the dotted key and the problem.
:func:`describe` walks a dataclass and yields ``(key, type, default, doc)`` for the documentation.

Reads: only the data it is given.

Security notes: values of fields marked ``secret`` in their metadata are never echoed in errors.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterator, Mapping
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

from gateway.core.errors import ConfigError

T = TypeVar("T")


def doc_field(default: Any, doc: str, *, secret: bool = False) -> Any:
    """A dataclass field with documentation (mutable defaults are copied per instance)."""
    meta = {"doc": doc, "secret": secret}
    if isinstance(default, list | dict) or dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: _copy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _copy(value: Any) -> Any:
    if isinstance(value, list):
        return [_copy(v) for v in value]
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value)
    return value


def type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp)).replace("'", '"')
    if origin in (list, typing.List):  # noqa: UP006
        return f"list of {type_name(get_args(tp)[0])}"
    if origin in (dict, typing.Dict):  # noqa: UP006
        return f"table of {type_name(get_args(tp)[1])}"
    if origin in (types.UnionType, typing.Union):
        return " or ".join(type_name(a) for a in get_args(tp) if a is not type(None))
    if dataclasses.is_dataclass(tp):
        return "table"
    return {int: "integer", float: "number", bool: "boolean", str: "string"}.get(tp, str(tp))


def _coerce(tp: Any, value: Any, source: str, key: str, secret: bool) -> Any:
    shown = "(hidden)" if secret else repr(value)
    origin = get_origin(tp)

    def fail(expected: str) -> ConfigError:
        return ConfigError(source, key, f"expected {expected}, got {shown}")

    if origin is Literal:
        if value not in get_args(tp):
            raise fail(f"one of {type_name(tp)}")
        return value
    if origin in (types.UnionType, typing.Union):
        for arg in get_args(tp):
            if arg is type(None) and value is None:
                return None
            try:
                return _coerce(arg, value, source, key, secret)
            except ConfigError:
                continue
        raise fail(type_name(tp))
    if origin is list:
        if not isinstance(value, list):
            raise fail(type_name(tp))
        (inner,) = get_args(tp)
        return [_coerce(inner, v, source, f"{key}[{i}]", secret) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise fail("a table")
        _, inner = get_args(tp)
        return {k: _coerce(inner, v, source, f"{key}.{k}", secret) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise fail("a table")
        return build(typing.cast(type, tp), value, source, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise fail("a boolean (true/false)")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail("an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise fail("a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise fail("a string")
        return value
    if tp is Any:
        return value
    raise ConfigError(source, key, f"unsupported type {tp!r}")  # pragma: no cover


def build(cls: type[T], data: Mapping[str, Any], source: str, prefix: str = "") -> T:
    """Instantiate ``cls`` from ``data``; unknown keys and wrong types raise ConfigError."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(cls)
    hints = get_type_hints(cls)
    fields = {f.name.replace("_", "-"): f for f in dataclasses.fields(cls)}
    fields.update({f.name: f for f in dataclasses.fields(cls)})
    kwargs: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = f"{prefix}.{raw_key}" if prefix else raw_key
        f = fields.get(raw_key)
        if f is None:
            known = ", ".join(sorted(x.name for x in dataclasses.fields(cls)))
            raise ConfigError(source, key, f"unknown key (known keys here: {known})")
        secret = bool(f.metadata.get("secret"))
        kwargs[f.name] = _coerce(hints[f.name], value, source, key, secret)
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(source, prefix, str(exc)) from None
    validate = getattr(obj, "validate", None)
    if validate is not None:
        try:
            validate()
        except ConfigError as exc:
            key = f"{prefix}.{exc.key}" if prefix else exc.key
            raise ConfigError(source, key, exc.problem) from None
    return obj


@dataclasses.dataclass(frozen=True)
class KeyDoc:
    key: str
    type: str
    default: str
    doc: str


def _default_repr(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def describe(cls: type, prefix: str = "") -> Iterator[KeyDoc]:
    """Every documented key of ``cls`` (recursing into nested tables) for docs and tests."""
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        default = _default_repr(f)
        if dataclasses.is_dataclass(tp):
            yield from describe(typing.cast(type, tp), key)
            continue
        if get_origin(tp) is list and dataclasses.is_dataclass(get_args(tp)[0]):
            yield KeyDoc(key, type_name(tp), "see below", str(f.metadata.get("doc", "")))
            yield from describe(get_args(tp)[0], f"{key}[]")
            continue
        if get_origin(tp) is dict and dataclasses.is_dataclass(get_args(tp)[1]):
            yield KeyDoc(key, type_name(tp), _toml(default), str(f.metadata.get("doc", "")))
            yield from describe(get_args(tp)[1], f"{key}.<id>")
            continue
        shown = "(secret)" if f.metadata.get("secret") and default else default
        yield KeyDoc(key, type_name(tp), _toml(shown), str(f.metadata.get("doc", "")))


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    return str(value)
