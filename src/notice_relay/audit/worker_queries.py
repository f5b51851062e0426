"""The few store reads the worker makes: whether a declaration was withdrawn, one
delivery's state, and deliveries whose acknowledgement is overdue.

The reads of the worker's timers (:func:`delivered_before`, :func:`stalled`,
:func:`unfanned`) find nothing while the store cannot be reached, and log it: they are
periodic repairs that the next tick retries, and an exception escaping a Faust timer
crashes the whole worker, so a database outage would stop deliveries too.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable
from datetime import datetime
from typing import TypeVar

import sqlalchemy as sa
import structlog

from notice_relay.audit.store import (
    DB_ERRORS,
    AuditStore,
    DeliveryRow,
    _delivery_row,
    db_reason,
    declarations,
    deliveries,
)

log = structlog.get_logger("notice_relay.audit")

T = TypeVar("T")


async def _or_nothing(read: Awaitable[list[T]], what: str) -> list[T]:
    """The rows of a timer's read, or none while the store cannot be reached."""
    try:
        return await read
    except DB_ERRORS as exc:
        log.warning("store.unavailable", read=what, error=db_reason(exc)[:300])
        return []


async def is_withdrawn(store: AuditStore, declaration_key: str) -> bool:
    """Whether a later declaration withdrew this one (a primary-key read)."""
    q = sa.select(declarations.c.status).where(declarations.c.declaration_key == declaration_key)
    async with store.engine.connect() as conn:
        row = (await conn.execute(q)).first()
    return row is not None and row[0] == "withdrawn"


async def delivery(store: AuditStore, delivery_id: str) -> DeliveryRow | None:
    """One delivery, or None when the store does not have it (yet)."""
    q = sa.select(deliveries).where(deliveries.c.delivery_id == delivery_id)
    async with store.engine.connect() as conn:
        row = (await conn.execute(q)).first()
    return _delivery_row(row) if row is not None else None


async def delivered_before(
    store: AuditStore, cutoff: datetime, limit: int = 1000
) -> list[DeliveryRow]:
    """Deliveries delivered (not acknowledged, not yet overdue) before ``cutoff``; none
    while the store cannot be reached."""
    return await _or_nothing(_delivered_before(store, cutoff, limit), "delivered_before")


async def _delivered_before(store: AuditStore, cutoff: datetime, limit: int) -> list[DeliveryRow]:
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
    message was lost on the way (see ``sweep`` in app.py). None while the store cannot
    be reached."""
    return await _or_nothing(_stalled(store, cutoff, include_planned, limit), "stalled")


async def _stalled(store: AuditStore, cutoff: datetime, include_planned: bool,
                   limit: int) -> list[DeliveryRow]:
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
    skip): their notice never reached fan-out. Returns (key, notice JSON, targets);
    none while the store cannot be reached."""
    return await _or_nothing(_unfanned(store, cutoff, limit), "unfanned")


async def _unfanned(
    store: AuditStore, cutoff: datetime, limit: int
) -> list[tuple[str, str, list[str]]]:
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
