"""Declarations posted over HTTP: the same validation as the stream, then the
declarations topic — idempotent on the declaration id.

``api_ingest_results`` remembers the first answer for each declaration
(``publisher_id/declaration_id``); a repeat of the id, whatever its content, gets
that answer again and is not published again. A declaration the stream relayed
before (published straight to Kafka) counts as a first answer too. Two identical
requests racing may both publish: the first stored answer wins, and the stream's
normalize stage relays a declaration id once, so the second copy is only audited
as a duplicate.

Validation is :func:`notice_relay.validate.parse_declaration` with the registry,
except that the publisher id is checked against the caller first: a publisher may
only post as itself (403), and whether another publisher id is registered is never
revealed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from notice_relay.api.auth import Principal
from notice_relay.api.errors import ApiError, forbidden
from notice_relay.api.schemas import IngestResult
from notice_relay.api.state import ApiState
from notice_relay.audit.store import AuditStore, declarations, metadata
from notice_relay.errors import DeclarationInvalid
from notice_relay.models import FieldError
from notice_relay.normalize import normalize, notice_id
from notice_relay.validate import parse_declaration

api_ingest_results = sa.Table(
    "api_ingest_results",
    metadata,
    sa.Column("declaration_key", sa.String(300), primary_key=True),
    sa.Column("publisher_id", sa.String(200), nullable=False),
    sa.Column("declaration_id", sa.String(200), nullable=False),
    sa.Column("notice_id", sa.String(80), nullable=False),
    sa.Column("fingerprint", sa.String(64), nullable=False),
    sa.Column("key_id", sa.String(32), doc="the API key that posted it first"),
    sa.Column("accepted_at", sa.DateTime(timezone=True), nullable=False),
)


@dataclass(frozen=True)
class Ingested:
    """The answer to a post, and whether it is the answer to an earlier one."""

    result: IngestResult
    repeated: bool


def invalid(exc: DeclarationInvalid) -> ApiError:
    """422 naming each offending field, as the rejected topic would."""
    return ApiError(422, exc.reason, code="invalid_declaration", errors=exc.errors)


async def _first(store: AuditStore, key: str) -> IngestResult | None:
    async with store.engine.connect() as conn:
        row = (await conn.execute(sa.select(api_ingest_results)
                                  .where(api_ingest_results.c.declaration_key == key))).first()
        if row is not None:
            return IngestResult(declaration_key=key, notice_id=row.notice_id,
                                fingerprint=row.fingerprint)
        relayed = (await conn.execute(
            sa.select(declarations.c.publisher_id, declarations.c.declaration_id,
                      declarations.c.fingerprint)
            .where(declarations.c.declaration_key == key,
                   declarations.c.status.in_(("received", "relayed")),
                   declarations.c.fingerprint.is_not(None)))).first()
    if relayed is None:
        return None
    return IngestResult(declaration_key=key,
                        notice_id=notice_id(relayed.publisher_id, relayed.declaration_id),
                        fingerprint=relayed.fingerprint)


async def _remember(store: AuditStore, result: IngestResult, publisher_id: str,
                    declaration_id: str, key_id: str) -> None:
    insert = postgresql.insert if store.dialect == "postgresql" else sqlite.insert
    stmt = insert(api_ingest_results).values(
        declaration_key=result.declaration_key, publisher_id=publisher_id,
        declaration_id=declaration_id, notice_id=result.notice_id,
        fingerprint=result.fingerprint, key_id=key_id, accepted_at=datetime.now(UTC),
    ).on_conflict_do_nothing(index_elements=[api_ingest_results.c.declaration_key])
    async with store.engine.begin() as conn:
        await conn.execute(stmt)


async def ingest(state: ApiState, raw: bytes, principal: Principal) -> Ingested:
    """Validate ``raw`` and publish it (once per declaration id) for ``principal``."""
    metrics = state.metrics.declarations
    try:
        decl = parse_declaration(raw, publishers=None, developers=state.developers)
    except DeclarationInvalid as exc:
        metrics.labels(result="rejected").inc()
        raise invalid(exc) from None
    if decl.publisher_id != principal.subject:
        metrics.labels(result="forbidden").inc()
        raise forbidden(f"this key publishes as {principal.subject!r} only; "
                        "publisher_id must be that id")
    if state.publishers is not None and decl.publisher_id not in state.publishers:
        metrics.labels(result="rejected").inc()
        message = (f"unknown publisher {json.dumps(decl.publisher_id)}: no publisher with this "
                   "id is registered with this relay")
        raise invalid(DeclarationInvalid(f"1 invalid field: publisher_id: {message}",
                                         [FieldError(field="publisher_id", message=message)]))
    key = decl.declaration_key
    first = await _first(state.store, key)
    if first is not None:
        metrics.labels(result="repeated").inc()
        return Ingested(first, repeated=True)
    try:
        # The fingerprint leaves out relayed_at and version: the stream computes the same.
        notice = normalize(decl, relayed_at=datetime.now(UTC))
    except DeclarationInvalid as exc:
        metrics.labels(result="rejected").inc()
        raise invalid(exc) from None
    await state.producer.send(state.topics.declarations, decl.artist_key.encode(), raw)
    result = IngestResult(declaration_key=key, notice_id=notice.notice_id,
                          fingerprint=notice.fingerprint)
    await _remember(state.store, result, decl.publisher_id, decl.declaration_id,
                    principal.key_id)
    stored = await _first(state.store, key) or result
    metrics.labels(result="accepted").inc()
    return Ingested(stored, repeated=stored != result)
