"""The few store reads the worker makes: withdrawn declarations, one delivery's
state, and deliveries whose acknowledgement is overdue."""

from __future__ import annotations

import json
from datetime import datetime

import sqlalchemy as sa

from notice_relay.audit.store import (
    AuditStore,
    DeliveryRow,
    _delivery_row,
    declarations,
    deliveries,
)


async def withdrawn_declarations(store: AuditStore) -> set[str]:
    """Keys of declarations withdrawn by a later declaration."""
    q = sa.select(declarations.c.declaration_key).where(declarations.c.status == "withdrawn")
    async with store.engine.connect() as conn:
        return {r[0] for r in await conn.execute(q)}


async def delivery(store: AuditStore, delivery_id: str) -> DeliveryRow | None:
    """One delivery, or None when the store does not have it (yet)."""
    q = sa.select(deliveries).where(deliveries.c.delivery_id == delivery_id)
    async with store.engine.connect() as conn:
        row = (await conn.execute(q)).first()
    return _delivery_row(row) if row is not None else None


async def delivered_before(
    store: AuditStore, cutoff: datetime, limit: int = 1000
) -> list[DeliveryRow]:
    """Deliveries delivered (not acknowledged, not yet overdue) before ``cutoff``."""
    q = (
        sa.select(deliveries)
        .where(deliveries.c.state == "delivered", deliveries.c.delivered_at < cutoff)
        .order_by(deliveries.c.delivered_at)
        .limit(limit)
    )
    async with store.engine.connect() as conn:
        return [_delivery_row(r) for r in (await conn.execute(q)).all()]


async def notice_json(store: AuditStore, declaration_key: str) -> str | None:
    """The Notice v1 JSON relayed for a declaration."""
    q = sa.select(declarations.c.notice).where(declarations.c.declaration_key == declaration_key)
    async with store.engine.connect() as conn:
        row = (await conn.execute(q)).first()
    return row[0] if row is not None else None


async def stalled(store: AuditStore, cutoff: datetime, *, include_planned: bool,
                  limit: int = 500) -> list[DeliveryRow]:
    """Deliveries that should have moved by ``cutoff`` and did not: a retry due before
    it, or (``include_planned``) planned or sending with no change since. Their
    message was lost on the way (see ``sweep`` in app.py)."""
    cond = (deliveries.c.state == "retry_scheduled") & (deliveries.c.next_attempt_at < cutoff)
    if include_planned:
        cond = cond | (deliveries.c.state.in_(("planned", "sending"))
                       & (deliveries.c.updated_at < cutoff))
    q = sa.select(deliveries).where(cond).order_by(deliveries.c.updated_at).limit(limit)
    async with store.engine.connect() as conn:
        return [_delivery_row(r) for r in (await conn.execute(q)).all()]


async def unfanned(
    store: AuditStore, cutoff: datetime, limit: int = 200
) -> list[tuple[str, str, list[str]]]:
    """Declarations relayed before ``cutoff`` that have no delivery at all (not even a
    skip): their notice never reached fan-out. Returns (key, notice JSON, targets)."""
    from notice_relay.audit.store import events

    has_delivery = sa.exists().where(deliveries.c.declaration_key == declarations.c.declaration_key)
    q = (
        sa.select(declarations.c.declaration_key, declarations.c.notice)
        .where(declarations.c.status == "relayed", declarations.c.updated_at < cutoff,
               declarations.c.notice.is_not(None), ~has_delivery)
        .limit(limit)
    )
    out: list[tuple[str, str, list[str]]] = []
    async with store.engine.connect() as conn:
        for key, notice in (await conn.execute(q)).all():
            row = (await conn.execute(
                sa.select(events.c.data).where(events.c.declaration_key == key,
                                               events.c.type == "declaration.normalized")
            )).first()
            if row is None:
                continue
            targets = json.loads(row[0]).get("targets")
            if isinstance(targets, list) and targets:
                out.append((key, notice, [str(t) for t in targets]))
    return out
