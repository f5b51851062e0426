"""Projecting a whole batch of stored events into the current-state tables at once.

The per-event rules are those of :mod:`notice_relay.audit.projection`
(:func:`~notice_relay.audit.projection.next_state` decides every move). What this
module changes is the number of statements: a batch of events costs a few statements
per 512 deliveries instead of two per event, which is what kept the store behind the
deliveries under load.

- Delivery rows: the current rows of every delivery the batch touches are read in one
  query per 512; each delivery's events are folded over its row in Python; the results
  are written with one INSERT and one UPDATE (each executemany). A delivery with no row
  yet is folded from its whole stored history (events of a delivery can be stored
  before the ``delivery.planned`` that creates its row when two workers share the
  work; they are applied, in the order they were stored, once the row exists).
- Channel health: a run of ``delivery.delivered`` events of one channel needs only its
  last upsert (each sets the last success and clears the failure streak).
- Declarations: one upsert per event, as before (a handful per declaration).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from notice_relay.audit.chunks import in_lists
from notice_relay.audit.projection import (
    _CHANNEL_EVENTS,
    _DECLARATION_STATUS,
    _EVENT_STATE,
    _apply_channel,
    apply_event,
    next_state,
)
from notice_relay.models import AuditEvent, AuditType, DeliveryState

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection

    from notice_relay.audit.store import AuditStore

_CREATES = (AuditType.DELIVERY_PLANNED, AuditType.DELIVERY_SKIPPED)

#: The columns a fold may change on an existing row.
_MUTABLE = ("state", "attempts", "last_status_code", "last_error", "receipt",
            "next_attempt_at", "delivered_at", "updated_at")


@dataclass(frozen=True, slots=True)
class Ev:
    """What the delivery fold needs of one event."""

    type: AuditType
    occurred_at: datetime
    data: dict[str, Any]
    declaration_key: str
    developer_id: str | None
    delivery_id: str


def _created(e: Ev) -> dict[str, Any]:
    d = e.data
    target = next_state(None, e.type)
    return {
        "delivery_id": e.delivery_id,
        "declaration_key": e.declaration_key,
        "developer_id": e.developer_id or "",
        "channel": str(d.get("channel", "")),
        "channel_type": str(d.get("channel_type", "")),
        "state": (target or DeliveryState.PLANNED).value,
        "attempts": 0,
        "last_status_code": None,
        "last_error": d.get("reason") if isinstance(d.get("reason"), str) else None,
        "receipt": None,
        "next_attempt_at": None,
        "planned_at": e.occurred_at,
        "delivered_at": None,
        "updated_at": e.occurred_at,
    }


def _move(row: dict[str, Any], e: Ev) -> None:
    """Apply one event to an existing row (the move is decided by next_state)."""
    d = e.data
    target = next_state(DeliveryState(row["state"]), e.type)
    row["updated_at"] = e.occurred_at
    if target is not None:
        row["state"] = target.value
    if isinstance(d.get("attempt"), int) and e.type is AuditType.DELIVERY_ATTEMPTED:
        row["attempts"] = d["attempt"]
    if "status_code" in d and isinstance(d["status_code"], int | None):
        row["last_status_code"] = d["status_code"]
    if isinstance(d.get("error"), str):
        row["last_error"] = d["error"]
    if e.type is AuditType.DELIVERY_DELIVERED and target is not None:
        row["delivered_at"] = e.occurred_at
        row["last_error"] = None
        if isinstance(d.get("receipt"), str):
            row["receipt"] = d["receipt"]
    if e.type is AuditType.DELIVERY_RETRY_SCHEDULED and isinstance(d.get("next_attempt_at"), str):
        row["next_attempt_at"] = datetime.fromisoformat(str(d["next_attempt_at"]))


def fold(row: dict[str, Any] | None, events: Iterable[Ev]) -> dict[str, Any] | None:
    """A delivery's row after ``events`` (in stored order); None while it has no row.

    Events before the one that creates the row wait, and are applied right after it,
    in order (the ones that would create a row again are skipped)."""
    waiting: list[Ev] = []
    for e in events:
        if row is None:
            if e.type in _CREATES:
                row = _created(e)
                for w in waiting:
                    if w.type not in _CREATES:
                        _move(row, w)
                waiting.clear()
            else:
                waiting.append(e)
            continue
        _move(row, e)
    return row


def _ev(e: AuditEvent) -> Ev:
    assert e.delivery_id is not None
    return Ev(e.type, e.occurred_at, dict(e.data), e.declaration_key, e.developer_id,
              e.delivery_id)


def _channel_events(batch: Sequence[AuditEvent]) -> list[AuditEvent]:
    """The channel-health events worth applying: of a run of deliveries delivered on one
    channel (no other health event of that channel in between) only the last."""
    keep: list[AuditEvent] = []
    last_kind: dict[tuple[str | None, Any], AuditType] = {}
    for e in reversed(batch):
        if e.type not in _CHANNEL_EVENTS:
            continue
        key = (e.developer_id, e.data.get("channel"))
        if e.type is AuditType.DELIVERY_DELIVERED and last_kind.get(key) is \
                AuditType.DELIVERY_DELIVERED:
            continue
        last_kind[key] = e.type
        keep.append(e)
    keep.reverse()
    return keep


async def apply_batch(conn: AsyncConnection, store: AuditStore,
                      batch: Sequence[AuditEvent]) -> None:
    """Update the current-state tables for a batch of newly stored events (already
    inserted into the events table, in this order)."""
    from notice_relay.audit.store import deliveries, events

    for e in _channel_events(batch):
        await _apply_channel(conn, store, e)
    for e in batch:
        if e.type in _DECLARATION_STATUS:
            await apply_event(conn, store, e)

    by_delivery: dict[str, list[Ev]] = {}
    for e in batch:
        if e.delivery_id is not None and e.type in _EVENT_STATE:
            by_delivery.setdefault(e.delivery_id, []).append(_ev(e))
    if not by_delivery:
        return
    ids = list(by_delivery)
    current: dict[str, dict[str, Any]] = {}
    for chunk in in_lists(ids):
        rows = await conn.execute(sa.select(deliveries).where(deliveries.c.delivery_id.in_(chunk)))
        current.update({r.delivery_id: dict(r._mapping) for r in rows})

    # Deliveries with no row yet: fold their whole stored history (this batch included).
    missing = [i for i in ids if i not in current]
    history: dict[str, list[Ev]] = {}
    types = [t.value for t in _EVENT_STATE]
    for chunk in in_lists(missing):
        rows = await conn.execute(
            sa.select(events.c.delivery_id, events.c.type, events.c.occurred_at, events.c.data,
                      events.c.declaration_key, events.c.developer_id)
            .where(events.c.delivery_id.in_(chunk), events.c.type.in_(types))
            .order_by(events.c.id))
        for r in rows:
            history.setdefault(r.delivery_id, []).append(Ev(
                AuditType(r.type), r.occurred_at, json.loads(r.data) if r.data else {},
                r.declaration_key, r.developer_id, r.delivery_id))

    inserts: list[dict[str, Any]] = []
    updates: list[dict[str, Any]] = []
    for did in ids:
        if did in current:
            row = fold(dict(current[did]), by_delivery[did])
            assert row is not None
            updates.append({f"b_{k}": row[k] for k in _MUTABLE} | {"b_delivery_id": did})
        else:
            row = fold(None, history.get(did, by_delivery[did]))
            if row is not None:
                inserts.append(row)
    if inserts:
        await conn.execute(deliveries.insert(), inserts)
    if updates:
        await conn.execute(
            deliveries.update()
            .where(deliveries.c.delivery_id == sa.bindparam("b_delivery_id"))
            .values({k: sa.bindparam(f"b_{k}") for k in _MUTABLE}),
            updates,
        )
