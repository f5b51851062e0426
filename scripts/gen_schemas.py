#!/usr/bin/env python3
"""Write the published JSON Schemas from the pydantic models.

    python scripts/gen_schemas.py            # (re)write schemas/*.json
    python scripts/gen_schemas.py --check    # exit 1 if a file is missing or stale

``schemas/declaration.v1.json`` is the publishers' contract (the model's *validation*
schema: what the relay accepts); ``schemas/notice.v1.json`` the developers' (the
*serialization* schema: what the relay sends). Output is deterministic (sorted keys,
2-space indent, trailing newline), so a stale file shows up as a diff and
``tests/test_schemas.py`` fails until this script is run again.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from notice_relay.models import DECLARATION_SCHEMA_V1, NOTICE_SCHEMA_V1, Declaration, Notice

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = ROOT / "schemas"
JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"

# Rules JSON Schema cannot state; the relay enforces them (notice_relay.models,
# notice_relay.validate). Written into the schema so that a reader learns of them.
_DECLARATION_NOTE = (
    "Also enforced by the relay, beyond this schema: declared_at is not more than 5 "
    "minutes in the future; supersedes is required when action is withdraw and only "
    "allowed then, and never equals declaration_id; works lists at least one work "
    'unless all_works is true; "*" in targets stands alone; publisher_id and every '
    "target are registered with the relay; no key appears twice in one object; names "
    "are not made only of invisible characters; URLs have a valid host and port."
)
_NOTICE_NOTE = (
    "Normalized by the relay: URLs in normal form and deduplicated, names NFKC with "
    "whitespace collapsed, uses expanded (train-ai implies train-genai) and sorted, "
    "datetimes in UTC. fingerprint is the SHA-256 of the canonical JSON of every field "
    "except fingerprint, relayed_at, version and ack."
)


def _schema(
    model: type[BaseModel],
    mode: Literal["validation", "serialization"],
    schema_id: str,
    title: str,
    note: str,
) -> dict[str, Any]:
    schema = model.model_json_schema(mode=mode, by_alias=True)
    schema["$schema"] = JSON_SCHEMA_DIALECT
    schema["$id"] = schema_id
    schema["title"] = title
    schema["$comment"] = (
        f"Generated from notice_relay.models.{model.__name__} by scripts/gen_schemas.py; "
        "do not edit. " + note
    )
    return schema


def render() -> dict[str, str]:
    """The content of each schema file, by file name."""
    # The $id is a URN made from the schema value a document carries: an identifier,
    # not a location, so nothing ever tries to fetch it from a host we do not own.
    schemas = {
        "declaration.v1.json": _schema(
            Declaration, "validation", "urn:" + DECLARATION_SCHEMA_V1.replace("/", ":"),
            "notice-relay Declaration v1", _DECLARATION_NOTE,
        ),
        "notice.v1.json": _schema(
            Notice, "serialization", "urn:" + NOTICE_SCHEMA_V1.replace("/", ":"),
            "notice-relay Notice v1", _NOTICE_NOTE,
        ),
    }
    return {
        name: json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        for name, schema in schemas.items()
    }


def stale(out_dir: Path) -> list[Path]:
    """The schema files in ``out_dir`` that are missing or differ from :func:`render`."""
    return [
        out_dir / name
        for name, text in render().items()
        if not (out_dir / name).is_file() or (out_dir / name).read_text(encoding="utf-8") != text
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """Write the schemas, or with ``--check`` report the stale ones (exit 1)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="exit 1 if a file is stale")
    parser.add_argument("--out", type=Path, default=SCHEMAS, help="directory (default: schemas/)")
    args = parser.parse_args(argv)
    if args.check:
        outdated = stale(args.out)
        for path in outdated:
            print(f"stale: {path} (run: python scripts/gen_schemas.py)", file=sys.stderr)
        return 1 if outdated else 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in render().items():
        (args.out / name).write_text(text, encoding="utf-8")
        print(f"wrote {args.out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
