"""The API's store code on both backends, SQLite and a real PostgreSQL: API keys,
filtered and keyset-paged deliveries (time bounds given with any offset), the first
ingest answer winning a conflict, and the export stream."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from notice_relay.api.ingest import _first, _remember
from notice_relay.api.schemas import IngestResult
from notice_relay.audit.events import audit_event
from notice_relay.audit.queries import DeliveryFilter, find_deliveries, stream_events
from notice_relay.audit.store import AuditStore
from notice_relay.keys import authenticate, create_key, list_keys, revoke_key
from notice_relay.models import AuditEvent, AuditType, DeliveryState

pytest_plugins = ["pg"]

T0 = datetime(2026, 9, 1, 12, 0, tzinfo=UTC)
JST = timezone(timedelta(hours=9))


def _events(n: int) -> list[AuditEvent]:
    """n deliveries for two developers, one a minute, failed when i is odd."""
    evs = []
    for i in range(n):
        key, dev, did = f"p/d{i:03d}", ("acme-ai", "brush")[i % 2], f"dlv_{i:03d}"
        at = T0 + timedelta(minutes=i)
        evs.append(audit_event(AuditType.DELIVERY_PLANNED, key, delivery_id=did, developer_id=dev,
                               occurred_at=at,
                               data={"channel": "webhook", "channel_type": "webhook"}))
        if i % 4 in (1, 3):
            evs.append(audit_event(AuditType.DELIVERY_FAILED, key, unique=(1,), delivery_id=did,
                                   developer_id=dev, occurred_at=at + timedelta(seconds=1),
                                   data={"attempt": 1, "error": "HTTP 500"}))
    return evs


async def test_keys_round_trip(store: AuditStore) -> None:
    """A created key authenticates in its role; a revoked one does not."""
    key, plain = await create_key(store, "developer", "acme-ai", note="n")
    found = await authenticate(store, plain)
    assert found is not None
    assert (found.role.value, found.subject) == ("developer", "acme-ai")
    assert found.created_at.tzinfo is not None
    await revoke_key(store, key.key_id)
    assert await authenticate(store, plain) is None
    assert await list_keys(store) == []
    assert len(await list_keys(store, include_revoked=True)) == 1


async def test_deliveries_filters_and_pages(store: AuditStore) -> None:
    """Filters and keyset pages give the same rows on both backends; time bounds in
    +09:00 mean the same instants as in UTC."""
    await store.append(_events(60))
    flt = DeliveryFilter(developer_id="brush", states=(DeliveryState.FAILED,),
                         since=(T0 + timedelta(minutes=10)).astimezone(JST),
                         until=(T0 + timedelta(minutes=50)).astimezone(JST))
    got: list[str] = []
    cursor = None
    while True:
        page = await find_deliveries(store, flt, limit=3, cursor=cursor)
        got += [r.delivery_id for r in page.rows]
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert got == [f"dlv_{i:03d}" for i in range(11, 50, 2)]
    everything = await find_deliveries(store, DeliveryFilter(), limit=500)
    assert len(everything.rows) == 60
    assert everything.next_cursor is None


async def test_the_first_ingest_answer_wins(store: AuditStore) -> None:
    """Two answers for one declaration: the first stored is the one given back."""
    first = IngestResult(declaration_key="p/d1", notice_id="ntc_1", fingerprint="a" * 64)
    second = IngestResult(declaration_key="p/d1", notice_id="ntc_1", fingerprint="b" * 64)
    await _remember(store, first, "p", "d1", "k1")
    await _remember(store, second, "p", "d1", "k2")
    assert await _first(store, "p/d1") == first


async def test_export_streams_every_event(store: AuditStore) -> None:
    """The export stream holds every event, in chain order, with seq and hashes."""
    evs = _events(10)
    await store.append(evs)
    records = [r async for r in stream_events(store)]
    assert len(records) == len(evs)
    assert [(r["declaration_key"], r["seq"]) for r in records] == sorted(
        (r["declaration_key"], r["seq"]) for r in records)
    assert all(len(r["hash"]) == 64 and len(r["prev_hash"]) == 64 for r in records)
