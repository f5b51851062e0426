"""How audit events move the current-state tables (declarations, deliveries).

The rules for which state may follow which are pure (:func:`next_state`); this module
applies them inside the store's transaction.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from notice_relay.models import AuditEvent, AuditType, DeliveryState

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection

    from notice_relay.audit.store import AuditStore

_EVENT_STATE: dict[AuditType, DeliveryState] = {
    AuditType.DELIVERY_PLANNED: DeliveryState.PLANNED,
    AuditType.DELIVERY_SKIPPED: DeliveryState.SKIPPED,
    AuditType.DELIVERY_HELD: DeliveryState.HELD,
    AuditType.DELIVERY_ATTEMPTED: DeliveryState.SENDING,
    AuditType.DELIVERY_RETRY_SCHEDULED: DeliveryState.RETRY_SCHEDULED,
    AuditType.DELIVERY_DELIVERED: DeliveryState.DELIVERED,
    AuditType.DELIVERY_FAILED: DeliveryState.FAILED,
    AuditType.DELIVERY_ACKNOWLEDGED: DeliveryState.ACKNOWLEDGED,
    AuditType.DELIVERY_OVERDUE: DeliveryState.OVERDUE,
    AuditType.DELIVERY_SUPERSEDED: DeliveryState.SUPERSEDED,
    AuditType.DELIVERY_REPLAY_REQUESTED: DeliveryState.PLANNED,
}

# States that a late or repeated event must not move a delivery out of. At-least-once
# delivery means a notice can be sent again after it was delivered (a crash before the
# commit); the delivery stays delivered.
_SETTLED = {DeliveryState.DELIVERED, DeliveryState.ACKNOWLEDGED, DeliveryState.OVERDUE}
_AFTER_SETTLED = {DeliveryState.ACKNOWLEDGED, DeliveryState.OVERDUE, DeliveryState.DELIVERED}


def next_state(current: DeliveryState | None, event: AuditType) -> DeliveryState | None:
    """The state a delivery moves to on ``event``; None when it does not move."""
    target = _EVENT_STATE.get(event)
    if target is None:
        return None
    if current is None:
        return target
    if current in _SETTLED:
        if target is DeliveryState.ACKNOWLEDGED:
            return target
        if target is DeliveryState.OVERDUE and current is DeliveryState.DELIVERED:
            return target
        if target is DeliveryState.DELIVERED and current in _AFTER_SETTLED:
            return None
        return None
    if current is DeliveryState.SUPERSEDED and target is not DeliveryState.PLANNED:
        return None
    if current is DeliveryState.FAILED and target not in (DeliveryState.PLANNED,):
        return None
    return target


_CHANNEL_EVENTS = {AuditType.CHANNEL_DISABLED, AuditType.CHANNEL_ENABLED,
                   AuditType.DELIVERY_DELIVERED, AuditType.DELIVERY_RETRY_SCHEDULED,
                   AuditType.DELIVERY_FAILED}

_DECLARATION_STATUS: dict[AuditType, str] = {
    AuditType.DECLARATION_RECEIVED: "received",
    AuditType.DECLARATION_REJECTED: "rejected",
    AuditType.DECLARATION_NORMALIZED: "relayed",
    AuditType.DECLARATION_WITHDRAWN: "withdrawn",
}


async def _apply_channel(conn: AsyncConnection, store: AuditStore, e: AuditEvent) -> None:
    """Channel health: enable/disable events, and the success/failure streak."""
    from notice_relay.audit.store import channels

    d = e.data
    dev, name = e.developer_id, d.get("channel")
    if not dev or not isinstance(name, str) or name in ("", "-"):
        return
    ins = store._insert(channels)
    base = {"developer_id": dev, "channel": name, "enabled": True}
    if e.type in (AuditType.CHANNEL_DISABLED, AuditType.CHANNEL_ENABLED):
        enabled = e.type is AuditType.CHANNEL_ENABLED
        values = {
            **base,
            "enabled": enabled,
            "reason": d.get("reason"),
            "changed_at": e.occurred_at,
            "changed_by": f"{e.actor.kind.value}:{e.actor.id}",
        }
        update = {k: v for k, v in values.items() if k not in ("developer_id", "channel")}
        if enabled:
            values["failing_since"] = update["failing_since"] = None
        await conn.execute(ins.on_conflict_do_update(
            index_elements=[channels.c.developer_id, channels.c.channel], set_=update), [values])
    elif e.type is AuditType.DELIVERY_DELIVERED:
        values = {**base, "last_success_at": e.occurred_at, "failing_since": None}
        await conn.execute(ins.on_conflict_do_update(
            index_elements=[channels.c.developer_id, channels.c.channel],
            set_={"last_success_at": e.occurred_at, "failing_since": None, "last_error": None}),
            [values])
    elif e.type in (AuditType.DELIVERY_RETRY_SCHEDULED, AuditType.DELIVERY_FAILED) and (
        d.get("status_code") is not None or d.get("transient")
    ):
        err = d.get("error") if isinstance(d.get("error"), str) else None
        values = {**base, "failing_since": e.occurred_at, "last_error": err}
        await conn.execute(ins.on_conflict_do_update(
            index_elements=[channels.c.developer_id, channels.c.channel],
            set_={"failing_since": sa.func.coalesce(channels.c.failing_since, e.occurred_at),
                  "last_error": err}),
            [values])


async def apply_event(conn: AsyncConnection, store: AuditStore, e: AuditEvent) -> None:
    """Update the channel and declaration tables for one newly stored event (delivery
    rows are folded per batch in :mod:`notice_relay.audit.batch`)."""
    from notice_relay.audit.store import declarations

    d = e.data
    if e.type in _CHANNEL_EVENTS:
        await _apply_channel(conn, store, e)
        if e.type in (AuditType.CHANNEL_DISABLED, AuditType.CHANNEL_ENABLED):
            return
    status = _DECLARATION_STATUS.get(e.type)
    if status is not None:
        publisher_id, _, declaration_id = e.declaration_key.partition("/")
        values: dict[str, Any] = {
            "declaration_key": e.declaration_key,
            "publisher_id": publisher_id or None,
            "declaration_id": declaration_id or None,
            "status": status,
            "received_at": e.occurred_at,
            "updated_at": e.occurred_at,
        }
        for col in ("action", "artist_ref", "fingerprint", "reason"):
            if isinstance(d.get(col), str):
                values[col] = d[col]
        if isinstance(d.get("notice"), dict):
            values["notice"] = json.dumps(d["notice"], sort_keys=True, separators=(",", ":"))
        ins = store._insert(declarations)
        update = {k: v for k, v in values.items() if k not in ("declaration_key", "received_at")}
        if e.type is AuditType.DECLARATION_RECEIVED:
            update["status"] = sa.case(
                (declarations.c.status.in_(("relayed", "withdrawn")), declarations.c.status),
                else_="received",
            )
        if e.type is AuditType.DECLARATION_NORMALIZED:
            # A withdrawal seen before its target was relayed must not be undone.
            update["status"] = sa.case(
                (declarations.c.status == "withdrawn", declarations.c.status), else_="relayed"
            )
        if e.type is AuditType.DECLARATION_REJECTED:
            # A broken resubmission of an id already relayed does not undo the relay.
            update.pop("status")
            update["status"] = sa.case(
                (declarations.c.status == "relayed", declarations.c.status), else_="rejected"
            )
        await conn.execute(
            ins.on_conflict_do_update(index_elements=[declarations.c.declaration_key], set_=update),
            [values],
        )
