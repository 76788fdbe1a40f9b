"""``docs/configuration.md`` documents every configuration key and cannot go stale.

What it tests: every key the schema declares (``describe(Config)``), the three common check keys and
every check's own options (``gateway.checks.SPECS``) have a row in the reference with their type
default; the generated block equals :func:`gateway.config.docs.render_reference`; values the shipped
policies set are shown beside the schema default; the annotated example site file in the page is a
valid configuration.

Reads: ``docs/configuration.md`` and the shipped policies.

Security notes: none.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gateway.app import make_pipeline
from gateway.checks import SPECS
from gateway.config import load_config
from gateway.config.docs import (
    BEGIN_MARKER,
    END_MARKER,
    embed_reference,
    generated_block,
    render_reference,
)
from gateway.config.loader import load_layers
from gateway.config.schema import CheckSettings, Config
from gateway.config.typed import KeyDoc, describe

DOC = Path(__file__).resolve().parents[3] / "docs" / "configuration.md"
REGENERATE = (
    "docs/configuration.md is stale: run `mailward config docs` and paste its output between "
    "the generated-reference markers (or pass the file through gateway.config.docs.embed_reference)"
)


def all_keys() -> list[KeyDoc]:
    keys = list(describe(Config))
    for spec in SPECS.values():
        keys += describe(CheckSettings, f"checks.{spec.id}")
        keys += describe(spec.options, f"checks.{spec.id}")
    return keys


@pytest.fixture(scope="module")
def document() -> str:
    return DOC.read_text(encoding="utf-8")


def rows(text: str) -> dict[str, str]:
    """Reference table rows by key: ``| `key` | type | default | doc |``."""
    found: dict[str, str] = {}
    for line in text.splitlines():
        m = re.match(r"^\| `([^`]+)` \|", line)
        if m:
            assert m.group(1) not in found, f"key {m.group(1)} documented twice"
            found[m.group(1)] = line
    return found


def test_the_generated_block_is_current(document: str) -> None:
    assert generated_block(document) == render_reference(), REGENERATE


def test_embed_reference_leaves_a_current_document_unchanged(document: str) -> None:
    assert embed_reference(document) == document, REGENERATE


@pytest.mark.parametrize("key", all_keys(), ids=lambda k: k.key)
def test_every_key_is_documented_with_type_and_default(document: str, key: KeyDoc) -> None:
    row = rows(generated_block(document)).get(key.key)
    assert row is not None, f"{key.key} is missing from docs/configuration.md"
    cells = [c.strip() for c in re.split(r"(?<!\\)\|", row)[1:-1]]
    assert len(cells) == 4, row
    assert key.default in cells[2], f"{key.key}: default {key.default} not in {cells[2]!r}"
    assert cells[3] not in ("", "—"), f"{key.key} has no description"
    assert cells[1], f"{key.key} has no type"


def test_the_reference_has_no_row_for_an_unknown_key(document: str) -> None:
    assert set(rows(generated_block(document))) == {k.key for k in all_keys()}


def test_every_check_has_a_section_with_its_description(document: str) -> None:
    block = generated_block(document)
    for spec in SPECS.values():
        assert f"#### `[checks.{spec.id}]`" in block
        assert spec.doc in block


def test_values_set_by_the_shipped_policies_are_shown(document: str) -> None:
    shipped, _ = load_layers()
    table = rows(generated_block(document))
    assert '"sender-identity", "message-size"' in table["pipeline.mail"]
    for check_id, settings in shipped["checks"].items():
        for name, value in settings.items():
            row = table[f"checks.{check_id}.{name}"]
            if isinstance(value, bool):
                shown = "true" if value else "false"
            else:
                shown = f'"{value}"' if isinstance(value, str) else str(value)
            assert f"`{shown}`" in row, (check_id, name, row)


def test_markers_appear_once(document: str) -> None:
    assert document.count(BEGIN_MARKER) == 1
    assert document.count(END_MARKER) == 1
    assert document.index(BEGIN_MARKER) < document.index(END_MARKER)


def test_generated_block_refuses_a_document_without_markers() -> None:
    with pytest.raises(ValueError):
        generated_block("# no markers here\n")
    with pytest.raises(ValueError):
        generated_block(f"{END_MARKER}\n{BEGIN_MARKER}\n")


def test_the_annotated_example_is_a_valid_site_file(document: str, tmp_path: Path) -> None:
    head = document.split("## Annotated example site file", 1)[1]
    example = head.split("```toml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "example.toml"
    path.write_text(example, encoding="utf-8")
    config = load_config(path)
    make_pipeline(config, str(path))
    assert config.relay.password.startswith("file:")
    assert [x.name for x in config.smtp.listeners] == ["submission", "submissions"]
