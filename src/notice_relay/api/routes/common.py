"""What the route modules share: documented error answers and row conversions."""

from __future__ import annotations

from typing import Any

from notice_relay.api.schemas import (
    ActorOut,
    DeclarationOut,
    DeliveryOut,
    ErrorBody,
    TrailEventOut,
)
from notice_relay.audit.queries import DeclarationView
from notice_relay.audit.store import DeliveryRow

_DESCRIPTIONS = {
    400: "The body could not be read.",
    401: "No API key, or one that is not valid.",
    403: "The key's role may not do this.",
    404: "Not found — or not yours: the two are answered alike.",
    409: "The id is ambiguous.",
    413: "The body is larger than the limit.",
    422: "Invalid input; `errors` names each field.",
    503: "The audit store or Kafka is unavailable; retry later.",
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses=`` of a route answering ``codes`` with :class:`ErrorBody`."""
    return {code: {"model": ErrorBody, "description": _DESCRIPTIONS[code]} for code in codes}


def delivery_out(row: DeliveryRow) -> DeliveryOut:
    """A delivery row as the API shows it."""
    return DeliveryOut(
        delivery_id=row.delivery_id, declaration_key=row.declaration_key,
        developer_id=row.developer_id, channel=row.channel, channel_type=row.channel_type,
        state=row.state, attempts=row.attempts, last_status_code=row.last_status_code,
        last_error=row.last_error, receipt=row.receipt, next_attempt_at=row.next_attempt_at,
        planned_at=row.planned_at, delivered_at=row.delivered_at, updated_at=row.updated_at,
    )


def declaration_out(view: DeclarationView) -> DeclarationOut:
    """A declaration with its deliveries and trail, as the API shows it."""
    d = view.declaration
    return DeclarationOut(
        declaration_key=d.declaration_key, publisher_id=d.publisher_id,
        declaration_id=d.declaration_id, status=d.status, action=d.action,
        fingerprint=d.fingerprint, reason=d.reason, received_at=d.received_at,
        updated_at=d.updated_at,
        deliveries=[delivery_out(x) for x in view.deliveries],
        trail=[
            TrailEventOut(
                seq=s.seq, event_id=s.event.event_id, type=s.event.type.value,
                occurred_at=s.event.occurred_at,
                actor=ActorOut(kind=s.event.actor.kind.value, id=s.event.actor.id),
                delivery_id=s.event.delivery_id, developer_id=s.event.developer_id,
                data=dict(s.event.data), prev_hash=s.prev_hash, hash=s.hash,
            )
            for s in view.trail
        ],
    )
