"""Canonical JSON: the one byte form that fingerprints, signatures and the audit
hash chain are computed over. Keys sorted, no insignificant whitespace, UTF-8,
datetimes as RFC 3339 in UTC."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel


def _default(obj: Any) -> Any:
    if isinstance(obj, datetime):
        return obj.astimezone(UTC).isoformat().replace("+00:00", "Z")
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json", by_alias=True)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def canonical_json(value: Any) -> bytes:
    """Serialize ``value`` (JSON data or a pydantic model) to canonical JSON bytes."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json", by_alias=True)
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_default
    ).encode("utf-8")


def sha256_hex(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()
