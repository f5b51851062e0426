"""Builders of audit events (pure).

Event ids are derived from what the event records, so that a stage that runs again
after a crash produces the same ids and the store keeps each event once.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

from pydantic import JsonValue

from notice_relay.models import SYSTEM, Actor, AuditEvent, AuditType


def event_id(*parts: object) -> str:
    """A deterministic event id from the parts that make the event unique."""
    h = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).hexdigest()
    return f"evt_{h[:40]}"


def audit_event(
    type_: AuditType,
    declaration_key: str,
    *,
    unique: tuple[object, ...] = (),
    delivery_id: str | None = None,
    developer_id: str | None = None,
    actor: Actor = SYSTEM,
    data: dict[str, JsonValue] | None = None,
    occurred_at: datetime | None = None,
) -> AuditEvent:
    """Build an audit event whose id depends on its type, declaration, delivery and
    ``unique`` (e.g. the attempt number)."""
    return AuditEvent(
        event_id=event_id(type_.value, declaration_key, delivery_id or "", *unique),
        declaration_key=declaration_key,
        type=type_,
        occurred_at=occurred_at or datetime.now(UTC),
        actor=actor,
        delivery_id=delivery_id,
        developer_id=developer_id,
        data=data or {},
    )
