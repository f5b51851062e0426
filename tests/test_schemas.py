"""The published contracts: the JSON Schema files match the models, and every
example in schemas/examples/ is accepted or rejected as documented."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from notice_relay.errors import DeclarationInvalid
from notice_relay.models import DECLARATION_SCHEMA_V1, NOTICE_SCHEMA_V1
from notice_relay.normalize import normalize, renormalize
from notice_relay.validate import parse_declaration

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = ROOT / "schemas"
EXAMPLES = SCHEMAS / "examples"
VALID = sorted((EXAMPLES / "valid").glob("*.json"))
INVALID = sorted((EXAMPLES / "invalid").glob("*.json"))
# The demo registry's ids, which the examples are written against.
PUBLISHERS = frozenset({"artfolio", "pixelboard"})
DEVELOPERS = frozenset({"acme-ai", "brushstroke-labs", "canvas-research"})


def _load_generator() -> ModuleType:
    path = ROOT / "scripts" / "gen_schemas.py"
    spec = importlib.util.spec_from_file_location("gen_schemas", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen_schemas = _load_generator()


def _documented_invalid() -> dict[str, str]:
    """file name → field, from the table in schemas/examples/README.md."""
    table = (EXAMPLES / "README.md").read_text(encoding="utf-8").split("## invalid/", 1)[1]
    return dict(re.findall(r"^\| `([^`]+\.json)` \| `([^`]+)` \|", table, flags=re.MULTILINE))


def _load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


# ------------------------------------------------------------------ schema files


def test_schema_files_are_up_to_date() -> None:
    """schemas/*.json equal what scripts/gen_schemas.py generates from the models:
    a model change without regenerating them fails here."""
    assert gen_schemas.stale(SCHEMAS) == [], "run: python scripts/gen_schemas.py"


def test_check_mode_exit_codes(tmp_path: Path) -> None:
    """gen_schemas --check exits 0 when the files are current and 1 when one is
    missing or differs."""
    assert gen_schemas.main(["--check", "--out", str(tmp_path)]) == 1
    assert gen_schemas.main(["--out", str(tmp_path)]) == 0
    assert gen_schemas.main(["--check", "--out", str(tmp_path)]) == 0
    stale = tmp_path / "notice.v1.json"
    text = stale.read_text(encoding="utf-8")
    stale.write_text(text.replace("Notice", "Notise"), encoding="utf-8")
    assert gen_schemas.main(["--check", "--out", str(tmp_path)]) == 1


def test_check_mode_runs_as_a_script() -> None:
    """The script runs on its own, as CI and developers run it, and finds the
    committed files current."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_schemas.py"), "--check"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stderr


def test_schema_output_is_deterministic() -> None:
    """Generating twice gives the same bytes: sorted keys, 2-space indent, newline."""
    first, second = gen_schemas.render(), gen_schemas.render()
    assert first == second
    for text in first.values():
        assert text.endswith("}\n")
        canonical = json.dumps(json.loads(text), indent=2, sort_keys=True, ensure_ascii=False)
        assert text == canonical + "\n"


@pytest.mark.parametrize(("name", "schema_value", "title"), [
    ("declaration.v1.json", DECLARATION_SCHEMA_V1, "notice-relay Declaration v1"),
    ("notice.v1.json", NOTICE_SCHEMA_V1, "notice-relay Notice v1"),
])
def test_schema_files_identify_themselves(name: str, schema_value: str, title: str) -> None:
    """Each schema has a $id, a title, the JSON Schema dialect, and pins the
    document's own schema value."""
    schema = _load(SCHEMAS / name)
    assert schema["$id"] == "urn:" + schema_value.replace("/", ":")
    assert schema["title"] == title
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["properties"]["schema"]["const"] == schema_value


def test_declaration_schema_forbids_unknown_fields_everywhere() -> None:
    """Every object in the publishers' contract refuses unknown fields."""
    schema = _load(SCHEMAS / "declaration.v1.json")
    objects = [schema, *(d for d in schema["$defs"].values() if d.get("type") == "object")]
    assert len(objects) == 3
    assert all(o["additionalProperties"] is False for o in objects)


def test_notice_schema_never_mentions_the_contact_email() -> None:
    """The developers' contract has no place for the artist's contact email."""
    assert "contact_email" not in (SCHEMAS / "notice.v1.json").read_text(encoding="utf-8")
    assert "contact_email" in (SCHEMAS / "declaration.v1.json").read_text(encoding="utf-8")


# ------------------------------------------------------------------ examples


def test_there_are_enough_examples() -> None:
    """At least 6 valid and 12 invalid examples are published."""
    assert len(VALID) >= 6
    assert len(INVALID) >= 12


@pytest.mark.parametrize("path", VALID, ids=[p.name for p in VALID])
def test_valid_example_parses_and_normalizes(path: Path) -> None:
    """Every valid example passes validation against the demo registry, normalizes,
    normalizes again to the same notice, and leaves the contact email behind."""
    decl = parse_declaration(path.read_bytes(), publishers=PUBLISHERS, developers=DEVELOPERS)
    notice = normalize(decl, relayed_at=datetime.now(UTC))
    assert renormalize(notice) == notice
    assert "@example" not in notice.model_dump_json()


def test_normalization_example_is_normalized() -> None:
    """The URL example really exercises normalization: pixiv, X and tracking
    parameters come out in normal form, duplicates once."""
    raw = (EXAMPLES / "valid" / "urls-needing-normalization.json").read_bytes()
    notice = normalize(parse_declaration(raw), relayed_at=datetime.now(UTC))
    assert notice.artist.profiles == [
        "https://www.pixiv.net/users/5550001", "https://x.com/keiaoba",
        "https://www.artstation.com/keiaoba", "https://www.deviantart.com/keiaoba",
    ]
    assert [w.url for w in notice.works] == [
        "https://www.pixiv.net/artworks/118000001",
        "https://www.pixiv.net/artworks/118000002",
        "https://x.com/keiaoba/status/1800000000000000001/photo/1",
        "https://pixelboard.example.invalid/i/9001/night-market?page=2",
    ]


def test_readme_documents_every_invalid_example() -> None:
    """The README's table has exactly one row per invalid example file."""
    assert sorted(_documented_invalid()) == [p.name for p in INVALID]


@pytest.mark.parametrize("path", INVALID, ids=[p.name for p in INVALID])
def test_invalid_example_is_rejected_on_its_documented_field(path: Path) -> None:
    """Every invalid example is rejected, and the error names the field the README
    says it breaks (and only that field: each example breaks one rule)."""
    expected = _documented_invalid()[path.name]
    with pytest.raises(DeclarationInvalid) as info:
        parse_declaration(path.read_bytes(), publishers=PUBLISHERS, developers=DEVELOPERS)
    assert [e.field for e in info.value.errors] == [expected], info.value.reason


def test_valid_examples_match_the_json_schema() -> None:
    """Valid examples also validate against the published JSON Schema (needs the
    optional jsonschema package, which the project does not depend on)."""
    jsonschema = pytest.importorskip("jsonschema")
    schema = _load(SCHEMAS / "declaration.v1.json")
    for path in VALID:
        jsonschema.validate(_load(path), schema)
