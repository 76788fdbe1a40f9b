"""The configuration reference, generated from the schema: every key, its type, default and meaning.

What it does: :func:`render_reference` walks :class:`~gateway.config.schema.Config` with
:func:`gateway.config.typed.describe`, plus, for each check in :data:`gateway.checks.SPECS`, the
common :class:`~gateway.config.schema.CheckSettings` keys and the check's own ``Options`` dataclass,
and renders Markdown tables (one per TOML table). Where a shipped policy file (``policies/*.toml``)
sets a key to a value other than the schema default, the cell shows both, so the table tells what a
site gets with no site file at all. ``mailward config docs`` prints the result and
``docs/configuration.md`` embeds it between markers; a unit test fails when the two differ, so the
reference cannot go stale.

Reads: the schema dataclasses, the check specs and the shipped ``policies/*.toml`` (never the site
file, never the environment).

Security notes: defaults of secret keys are rendered as ``(secret)`` by ``describe``; no secret is
resolved here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from gateway.checks import SPECS
from gateway.config.loader import load_layers
from gateway.config.schema import CheckSettings, Config
from gateway.config.typed import KeyDoc, describe
from gateway.core.model import Stage
from gateway.pipeline.registry import CheckSpec

BEGIN_MARKER = "<!-- BEGIN GENERATED REFERENCE -->"
END_MARKER = "<!-- END GENERATED REFERENCE -->"

_STAGE_ORDER = {stage: i for i, stage in enumerate(Stage)}


def _toml_value(value: Any) -> str:
    """A parsed TOML value written back as TOML (for shipped values shown next to defaults)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def _cell(text: str) -> str:
    """Text safe inside one Markdown table cell (no line breaks, no bare column separators)."""
    return " ".join(text.split()).replace("|", "\\|")


def _code(text: str) -> str:
    """A code span that survives any backtick inside ``text``."""
    fence = "``" if "`" in text else "`"
    pad = " " if fence == "``" else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _type_cell(type_text: str) -> str:
    """``describe``'s type name; Literal alternatives spelled as a list (no ``|`` in tables)."""
    text = type_text.replace("typing.Any", "any value")
    if " | " in text:
        return "one of " + ", ".join(_code(alt) for alt in text.split(" | "))
    return text


def _shipped_value(shipped: Mapping[str, Any], key: str) -> tuple[bool, Any]:
    """The value the shipped policies give dotted ``key`` (``[]`` keys are never looked up)."""
    if "[]" in key:
        return False, None
    node: Any = shipped
    for part in key.split("."):
        if not isinstance(node, Mapping):
            return False, None
        found = [k for k in node if k == part or k.replace("-", "_") == part]
        if not found:
            return False, None
        node = node[found[-1]]
    return True, node


def _default_cell(doc: KeyDoc, shipped: Mapping[str, Any]) -> str:
    if doc.default == "see below":  # an array of tables: its keys follow in their own table
        return doc.default
    cell = _code(doc.default)
    present, value = _shipped_value(shipped, doc.key)
    if present and not isinstance(value, Mapping):
        shown = _toml_value(value)
        if shown != doc.default:
            cell += f" (shipped policies: {_code(shown)})"
    return cell


def _table(docs: Iterable[KeyDoc], shipped: Mapping[str, Any]) -> list[str]:
    lines = ["| Key | Type | Default | Description |", "|---|---|---|---|"]
    for doc in docs:
        lines.append(
            "| "
            + " | ".join(
                (
                    _cell(_code(doc.key)),
                    _cell(_type_cell(doc.type)),
                    _cell(_default_cell(doc, shipped)),
                    _cell(doc.doc) or "—",
                )
            )
            + " |"
        )
    return lines


def _section_of(key: str) -> str:
    """The TOML table of a dotted key: ``""`` (top level), ``smtp``, ``smtp.listeners``..."""
    head, _, _ = key.rpartition(".")
    return head.removesuffix("[]")


def _heading(section: str) -> str:
    if not section:
        return "### Top level"
    if section == "smtp.listeners":
        return "### `[[smtp.listeners]]` (array of tables)"
    return f"### `[{section}]`"


def _default_listeners() -> str:
    listeners = Config().smtp.listeners
    parts = [
        f"`{x.name}` on {x.address} port {x.port} (`tls = {_toml_value(x.tls)}`)" for x in listeners
    ]
    return (
        "With no `[[smtp.listeners]]` in any file, the listeners are: "
        + "; ".join(parts)
        + ". A site file that declares listeners replaces this list as a whole (arrays replace). "
        "The defaults below apply to a key left out of one listener's table."
    )


def _check_section(spec: CheckSpec, shipped: Mapping[str, Any]) -> list[str]:
    prefix = f"checks.{spec.id}"
    stages = sorted(spec.stages, key=_STAGE_ORDER.__getitem__)
    option_names = [f.name for f in dataclasses.fields(spec.options)]
    lines = [
        f"#### `[{prefix}]`",
        "",
        f"{spec.doc} May be listed in `pipeline` at: "
        + ", ".join(f"`{s.value}`" for s in stages)
        + ". Own options: "
        + (", ".join(f"`{n}`" for n in option_names) if option_names else "none")
        + ".",
        "",
    ]
    docs = [*describe(CheckSettings, prefix), *describe(spec.options, prefix)]
    lines += _table(docs, shipped)
    return lines


def reference_keys() -> list[KeyDoc]:
    """Every key the reference documents, in order (the schema's, then each check's)."""
    keys = list(describe(Config))
    for spec in SPECS.values():
        keys += describe(CheckSettings, f"checks.{spec.id}")
        keys += describe(spec.options, f"checks.{spec.id}")
    return keys


def render_reference() -> str:
    """The Markdown reference of every configuration key (what ``mailward config docs`` prints)."""
    shipped, _ = load_layers()
    out: list[str] = [
        "## Reference: every key",
        "",
        "Generated from the schema by `mailward config docs`; do not edit by hand. "
        "**Default** is the schema default; where a shipped policy file sets another value, it is "
        "given as well, and that is the value in effect when the site file does not set the key. "
        "Keys may be written with `_` or `-` (`max_size` or `max-size`).",
    ]
    sections: dict[str, list[KeyDoc]] = {}
    for doc in describe(Config):
        sections.setdefault(_section_of(doc.key), []).append(doc)
    for section, docs in sections.items():
        out += ["", _heading(section), ""]
        if section == "smtp.listeners":
            out += [_default_listeners(), ""]
        out += _table(docs, shipped)
    out += [
        "",
        "### Checks: `[checks.<id>]`",
        "",
        "`checks` is a table of tables, one per check id. The configuration loader accepts any "
        "table here; the pipeline registry then validates it against the check's schema "
        "(`mailward config check` and start-up both do): an unknown id, an unknown option or a "
        "wrong type is an error naming the key. Every check has the three common keys `mode`, "
        "`timeout` and `on_error`, followed by its own options.",
    ]
    for spec in SPECS.values():
        out += ["", *_check_section(spec, shipped)]
    return "\n".join(out) + "\n"


def generated_block(document: str) -> str:
    """The text between the markers of ``document``; ValueError unless each is there once."""
    if document.count(BEGIN_MARKER) != 1 or document.count(END_MARKER) != 1:
        raise ValueError("the document must hold each generated-reference marker exactly once")
    start = document.index(BEGIN_MARKER) + len(BEGIN_MARKER)
    end = document.index(END_MARKER)
    if end < start:
        raise ValueError("the end marker comes before the begin marker")
    return document[start:end].strip("\n") + "\n"


def embed_reference(document: str) -> str:
    """``document`` with the text between the markers replaced by :func:`render_reference`.

    After a schema change, regenerate ``docs/configuration.md`` by passing its text through this
    function (or paste the output of ``mailward config docs`` between the markers).
    """
    generated_block(document)  # validates the markers
    head, _, rest = document.partition(BEGIN_MARKER)
    _, _, tail = rest.partition(END_MARKER)
    return f"{head}{BEGIN_MARKER}\n\n{render_reference()}\n{END_MARKER}{tail}"
