"""Builders of audit events, and their encoding on the audit topic (pure).

Event ids are derived from what the event records, so that a stage that runs again
after a crash produces the same ids and the store keeps each event once.

A message of the audit topic is keyed by its declaration and holds either one
``AuditEvent`` (a JSON object) or several events of that one declaration, in order (a
JSON array): a stage step that records several events of a declaration (the ten
``delivery.planned`` of a fan-out, the attempts of a lane's chunk) sends them as one
message instead of one message each.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from datetime import UTC, datetime

from pydantic import JsonValue, TypeAdapter

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


_EVENT_LIST: TypeAdapter[list[AuditEvent]] = TypeAdapter(list[AuditEvent])


def encode_audit(events: Iterable[AuditEvent]) -> list[tuple[bytes, bytes]]:
    """The audit topic's messages (key, value) for ``events``: one per declaration, in
    the order of each declaration's first event; a declaration's events keep their
    order."""
    by_key: dict[str, list[AuditEvent]] = {}
    for e in events:
        by_key.setdefault(e.declaration_key, []).append(e)
    return [
        (key.encode(), group[0].model_dump_json().encode() if len(group) == 1
         else _EVENT_LIST.dump_json(group))
        for key, group in by_key.items()
    ]


def decode_audit(raw: bytes) -> list[AuditEvent]:
    """The events of one audit topic message (an event, or a non-empty array of events
    of one declaration).

    Raises:
        ValueError: not an event or such an array (pydantic's ``ValidationError`` is a
            ``ValueError``), with the reason.
    """
    if raw.lstrip()[:1] != b"[":
        return [AuditEvent.model_validate_json(raw)]
    found = _EVENT_LIST.validate_json(raw)
    if not found:
        raise ValueError("an empty array of audit events")
    keys = {e.declaration_key for e in found}
    if len(keys) > 1:
        raise ValueError(f"audit events of {len(keys)} declarations in one message: "
                         f"{', '.join(sorted(keys)[:3])}")
    return found
