"""The hash chain over a declaration's audit events (pure)."""

from __future__ import annotations

import hashlib

from notice_relay.canonical import canonical_json
from notice_relay.models import AuditEvent

GENESIS = "0" * 64


def chained_form(event: AuditEvent, seq: int) -> bytes:
    """The bytes an event contributes to its chain: its content and its place."""
    body = event.model_dump(mode="json", by_alias=True)
    body["seq"] = seq
    return canonical_json(body)


def event_hash(prev_hash: str, event: AuditEvent, seq: int) -> str:
    """SHA-256(prev_hash ‖ "\\n" ‖ canonical event with its seq), hex."""
    h = hashlib.sha256(prev_hash.encode("ascii"))
    h.update(b"\n")
    h.update(chained_form(event, seq))
    return h.hexdigest()
