"""Read-side queries over the audit store for the HTTP API and the CLI: deliveries
filtered and paged by an opaque cursor, one declaration with its deliveries and
trail, and every stored event streamed for export.

Everything here runs over :attr:`AuditStore.engine` and the tables of
:mod:`notice_relay.audit.store`, on SQLite and PostgreSQL alike.

Delivery pages are keyset-paged on ``(updated_at, delivery_id)``, never by OFFSET: a
page costs the same however deep it is, and rows that change while someone pages
do not shift the pages after them. With a developer filter the query is answered
from ``ix_deliveries_developer_state_updated`` (developer_id, state, updated_at); with
only a state filter from ``ix_deliveries_state_updated``.

The cursor is base64url JSON of the last row's ``(updated_at, delivery_id)`` and a
digest of the filter it was issued for. It is not signed: it only says where to
resume, the filters (and the caller's permissions) are applied again to every page,
so a forged cursor can show nothing a fresh query could not. A cursor presented with
other filters is refused, because resuming one query's position in another is
never what the caller meant.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

import sqlalchemy as sa

from notice_relay.audit.chunks import in_lists
from notice_relay.audit.store import (
    AuditStore,
    DeclarationRow,
    DeliveryRow,
    StoredEvent,
    declarations,
    deliveries,
    events,
)
from notice_relay.errors import NoticeRelayError, StoreError
from notice_relay.models import AuditEvent, DeliveryState

__all__ = [
    "MAX_PAGE",
    "CursorInvalid",
    "DeclarationView",
    "DeliveryFilter",
    "DeliveryPage",
    "declaration_views",
    "deliveries_query",
    "delivery_by_id",
    "find_deliveries",
    "iter_deliveries",
    "notices_for",
    "ping",
    "stream_events",
]

#: The largest page a caller may ask for.
MAX_PAGE = 500


class CursorInvalid(NoticeRelayError):
    """A pagination cursor that is malformed or was issued for other filters."""


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    if value.tzinfo is None:
        raise ValueError("time bounds must carry a UTC offset")
    # SQLite stores the UTC wall clock without an offset: compare in UTC.
    return value.astimezone(UTC)


def _aware(value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


@dataclass(frozen=True)
class DeliveryFilter:
    """Which deliveries: every field narrows; an empty filter matches all.

    ``since`` is inclusive and ``until`` exclusive, both on ``updated_at`` (when the
    delivery last changed state).
    """

    developer_id: str | None = None
    states: tuple[DeliveryState, ...] = ()
    declaration_key: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "since", _utc(self.since))
        object.__setattr__(self, "until", _utc(self.until))
        object.__setattr__(self, "states",
                           tuple(sorted({DeliveryState(s) for s in self.states})))

    def digest(self) -> str:
        """A short digest of the filter, carried in its cursors."""
        body = json.dumps([self.developer_id, [s.value for s in self.states],
                           self.declaration_key,
                           self.since.isoformat() if self.since else None,
                           self.until.isoformat() if self.until else None])
        return hashlib.sha256(body.encode()).hexdigest()[:16]

    def where(self, dialect: str | None = None) -> list[sa.ColumnElement[bool]]:
        """The filter as SQL conditions on the deliveries table (for ``dialect``)."""
        c = deliveries.c
        conds: list[sa.ColumnElement[bool]] = []
        if self.developer_id is not None:
            conds.append(c.developer_id == self.developer_id)
        state: sa.ColumnElement[bool] | None = None
        if len(self.states) == 1:
            state = c.state == self.states[0].value
        elif self.states:
            state = c.state.in_([s.value for s in self.states])
        if state is not None:
            if dialect == "sqlite" and self.developer_id is not None:
                # SQLite keeps no statistics unless ANALYZE runs (the store never runs
                # it), and without them it rates (developer, state, updated_at) and
                # (state, updated_at) alike and takes whichever index was created
                # first. Telling it that the state narrows little makes it search by
                # developer; ``likelihood`` changes the plan, never the result.
                # (Untyped, so that it is rendered bare rather than as "… = 1".)
                state = cast("sa.ColumnElement[bool]",
                             sa.func.likelihood(state, sa.literal_column("0.9")))
            conds.append(state)
        if self.declaration_key is not None:
            conds.append(c.declaration_key == self.declaration_key)
        if self.since is not None:
            conds.append(c.updated_at >= self.since)
        if self.until is not None:
            conds.append(c.updated_at < self.until)
        return conds


@dataclass(frozen=True)
class _Position:
    updated_at: datetime
    delivery_id: str


def encode_cursor(row: DeliveryRow, flt: DeliveryFilter) -> str:
    """The opaque cursor that resumes after ``row``."""
    updated = (_aware(row.updated_at) or row.updated_at).astimezone(UTC)
    body = json.dumps({"u": updated.isoformat(), "d": row.delivery_id, "f": flt.digest()},
                      separators=(",", ":"))
    return base64.urlsafe_b64encode(body.encode()).rstrip(b"=").decode("ascii")


def decode_cursor(cursor: str, flt: DeliveryFilter) -> _Position:
    """Where ``cursor`` resumes; CursorInvalid when it is not one of ours for ``flt``."""
    malformed = CursorInvalid("malformed cursor: pass back the next_cursor of a page")
    if len(cursor) > 1024:
        raise malformed
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        body = json.loads(raw)
        updated = datetime.fromisoformat(str(body["u"]))
        delivery_id, digest = str(body["d"]), str(body["f"])
    except (ValueError, KeyError, TypeError, binascii.Error, RecursionError):
        raise malformed from None
    if updated.tzinfo is None:
        raise malformed
    if digest != flt.digest():
        raise CursorInvalid("this cursor belongs to a query with other filters")
    return _Position(updated.astimezone(UTC), delivery_id)


def deliveries_query(flt: DeliveryFilter, *, limit: int, after: _Position | None = None,
                     dialect: str | None = None) -> sa.Select[Any]:
    """The SELECT of one page: filtered, after ``after``, ordered by (updated_at,
    delivery_id), at most ``limit`` rows; ``dialect`` is the store's."""
    c = deliveries.c
    conds = flt.where(dialect)
    if after is not None:
        # Written as a range on updated_at plus a tie-break, so that the index range
        # scan on (…, updated_at) starts at the cursor rather than at the beginning.
        conds.append(c.updated_at >= after.updated_at)
        conds.append(sa.or_(c.updated_at > after.updated_at, c.delivery_id > after.delivery_id))
    return (sa.select(deliveries).where(*conds)
            .order_by(c.updated_at, c.delivery_id).limit(limit))


@dataclass(frozen=True)
class DeliveryPage:
    """One page of deliveries and the cursor of the next (None on the last page)."""

    rows: list[DeliveryRow]
    next_cursor: str | None


def _delivery(r: Any) -> DeliveryRow:
    m = dict(r._mapping)
    for k in ("next_attempt_at", "planned_at", "delivered_at", "updated_at"):
        m[k] = _aware(m[k])
    return DeliveryRow(**m)


async def find_deliveries(store: AuditStore, flt: DeliveryFilter, *, limit: int = 100,
                          cursor: str | None = None) -> DeliveryPage:
    """One page of the deliveries matching ``flt``."""
    limit = max(1, min(limit, MAX_PAGE))
    after = decode_cursor(cursor, flt) if cursor else None
    q = deliveries_query(flt, limit=limit + 1, after=after, dialect=store.dialect)
    try:
        async with store.engine.connect() as conn:
            rows = [_delivery(r) for r in (await conn.execute(q)).all()]
    except sa.exc.SQLAlchemyError as exc:
        raise StoreError(f"cannot query deliveries: {exc}") from exc
    more = len(rows) > limit
    rows = rows[:limit]
    return DeliveryPage(rows, encode_cursor(rows[-1], flt) if more and rows else None)


async def iter_deliveries(store: AuditStore, flt: DeliveryFilter, *,
                          page_size: int = MAX_PAGE) -> AsyncIterator[list[DeliveryRow]]:
    """Every delivery matching ``flt``, a page at a time."""
    after: _Position | None = None
    while True:
        q = deliveries_query(flt, limit=page_size, after=after, dialect=store.dialect)
        async with store.engine.connect() as conn:
            rows = [_delivery(r) for r in (await conn.execute(q)).all()]
        if not rows:
            return
        yield rows
        if len(rows) < page_size:
            return
        last = rows[-1]
        after = _Position((_aware(last.updated_at) or last.updated_at).astimezone(UTC),
                          last.delivery_id)


async def count_deliveries(store: AuditStore, flt: DeliveryFilter) -> int:
    """How many deliveries match ``flt``."""
    q = sa.select(sa.func.count()).select_from(deliveries).where(*flt.where(store.dialect))
    async with store.engine.connect() as conn:
        return int((await conn.execute(q)).scalar_one())


async def delivery_by_id(store: AuditStore, delivery_id: str) -> DeliveryRow | None:
    """One delivery, or None."""
    q = sa.select(deliveries).where(deliveries.c.delivery_id == delivery_id)
    async with store.engine.connect() as conn:
        row = (await conn.execute(q)).first()
    return _delivery(row) if row is not None else None


async def notices_for(store: AuditStore, declaration_keys: Iterable[str]) -> dict[str, str | None]:
    """The relayed Notice v1 JSON of each declaration (None when none is stored)."""
    keys = list(dict.fromkeys(declaration_keys))
    out: dict[str, str | None] = {}
    async with store.engine.connect() as conn:
        for chunk in in_lists(keys):
            q = sa.select(declarations.c.declaration_key, declarations.c.notice).where(
                declarations.c.declaration_key.in_(chunk))
            out.update({r.declaration_key: r.notice for r in await conn.execute(q)})
    return {k: out.get(k) for k in keys}


@dataclass(frozen=True)
class DeclarationView:
    """A declaration with its deliveries and its trail, as ``status`` shows it."""

    declaration: DeclarationRow
    deliveries: list[DeliveryRow]
    trail: list[StoredEvent]


async def declaration_views(store: AuditStore, declaration_id: str, *,
                            publisher_id: str | None = None) -> list[DeclarationView]:
    """Every declaration with id ``declaration_id`` (of ``publisher_id`` only, when given)."""
    found = [d for d in await store.find_declarations(declaration_id)
             if d.declaration_id == declaration_id
             and (publisher_id is None or d.publisher_id == publisher_id)]
    return [DeclarationView(d, await store.deliveries_of(d.declaration_key),
                            await store.trail(d.declaration_key))
            for d in found]


async def ping(store: AuditStore) -> bool:
    """Whether the store answers."""
    try:
        async with store.engine.connect() as conn:
            await conn.execute(sa.select(1))
    except (sa.exc.SQLAlchemyError, OSError):
        return False
    return True


#: The columns of an export, in order (CSV header).
EXPORT_FIELDS: Sequence[str] = (
    "declaration_key", "seq", "event_id", "type", "occurred_at", "actor_kind", "actor_id",
    "delivery_id", "developer_id", "data", "prev_hash", "hash",
)


def _exported(row: Any) -> dict[str, Any]:
    event = AuditEvent.model_validate(
        {
            "event_id": row.event_id, "declaration_key": row.declaration_key, "type": row.type,
            "occurred_at": _aware(row.occurred_at),
            "actor": {"kind": row.actor_kind, "id": row.actor_id},
            "delivery_id": row.delivery_id, "developer_id": row.developer_id,
            "data": json.loads(row.data),
        },
        strict=False,
    )
    # Exactly the form the chain hashes (audit.chain.chained_form), plus its place in
    # the chain: an auditor can recompute every hash from an export alone.
    body: dict[str, Any] = event.model_dump(mode="json", by_alias=True)
    body["seq"] = row.seq
    body["prev_hash"] = row.prev_hash
    body["hash"] = row.hash
    return body


async def stream_events(store: AuditStore, *,
                        declaration_key: str | None = None) -> AsyncIterator[dict[str, Any]]:
    """Every stored event, chain by chain in sequence order, without loading them all."""
    q = sa.select(events).order_by(events.c.declaration_key, events.c.seq)
    if declaration_key is not None:
        q = q.where(events.c.declaration_key == declaration_key)
    async with store.engine.connect() as conn:
        result = await conn.stream(q.execution_options(yield_per=500))
        async for row in result:
            yield _exported(row)
