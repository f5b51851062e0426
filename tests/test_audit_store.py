"""The audit store: idempotent projection, sequence numbers, the hash chain, and
tamper detection (rows edited, deleted and swapped directly in the database).

Every store test runs twice, on SQLite and on a real PostgreSQL server (``pg``
fixtures; each PostgreSQL test gets its own database)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa

from notice_relay.audit.events import audit_event
from notice_relay.audit.projection import next_state
from notice_relay.audit.store import POOL_SIZE, SQLITE_CACHE_KIB, AuditStore, events
from notice_relay.errors import StoreError
from notice_relay.models import Actor, ActorKind, AuditEvent, AuditType, DeliveryState

pytest_plugins = ["pg"]

T0 = datetime(2026, 11, 1, tzinfo=UTC)


def trail(key: str, n_deliveries: int = 2) -> list[AuditEvent]:
    """A realistic trail: received, normalized, then planned/attempted/delivered per delivery."""
    evs = [
        audit_event(AuditType.DECLARATION_RECEIVED, key, occurred_at=T0,
                    data={"action": "opt_out", "fingerprint": "f" * 64}),
        audit_event(AuditType.DECLARATION_NORMALIZED, key, occurred_at=T0,
                    data={"action": "opt_out", "fingerprint": "f" * 64}),
    ]
    for i in range(n_deliveries):
        did = f"dlv_{key}_{i}"
        t = T0 + timedelta(seconds=i + 1)
        evs += [
            audit_event(AuditType.DELIVERY_PLANNED, key, delivery_id=did, developer_id=f"dev{i}",
                        occurred_at=t, data={"channel": "webhook", "channel_type": "webhook"}),
            audit_event(AuditType.DELIVERY_ATTEMPTED, key, unique=(1,), delivery_id=did,
                        developer_id=f"dev{i}", occurred_at=t,
                        data={"attempt": 1, "status_code": 200}),
            audit_event(AuditType.DELIVERY_DELIVERED, key, unique=(1,), delivery_id=did,
                        developer_id=f"dev{i}", occurred_at=t,
                        data={"attempt": 1, "receipt": "ok"}),
        ]
    return evs


async def test_append_is_idempotent_and_numbers_events(store: AuditStore) -> None:
    """Appending the same events twice stores them once, numbered 1..n per declaration."""
    a, b = trail("p/a"), trail("p/b", 1)
    assert await store.append(a + b) == len(a) + len(b)
    assert await store.append(a) == 0
    assert [s.seq for s in await store.trail("p/a")] == list(range(1, len(a) + 1))
    assert [s.seq for s in await store.trail("p/b")] == list(range(1, len(b) + 1))
    assert await store.verify() == []


async def test_projection_tracks_delivery_state(store: AuditStore) -> None:
    """Deliveries move planned → delivered; the declaration is relayed."""
    await store.append(trail("p/a"))
    rows = await store.deliveries_of("p/a")
    assert [r.state for r in rows] == ["delivered", "delivered"]
    assert all(r.attempts == 1 and r.receipt == "ok" for r in rows)
    [decl] = await store.find_declarations("a")
    assert decl.status == "relayed"
    assert decl.publisher_id == "p"


async def test_late_retry_event_does_not_undo_delivered(store: AuditStore) -> None:
    """A retry_scheduled seen after delivered (at-least-once) leaves it delivered."""
    evs = trail("p/a", 1)
    late = audit_event(AuditType.DELIVERY_RETRY_SCHEDULED, "p/a", unique=(9,),
                       delivery_id="dlv_p/a_0", developer_id="dev0", occurred_at=T0,
                       data={"attempt": 9, "error": "x"})
    await store.append([*evs, late])
    assert [r.state for r in await store.deliveries_of("p/a")] == ["delivered"]


async def test_edited_row_is_named(store: AuditStore) -> None:
    """Editing an event's data directly in the database is detected at its seq."""
    await store.append(trail("p/a") + trail("p/b"))
    async with store.engine.begin() as conn:
        await conn.execute(events.update()
                           .where((events.c.declaration_key == "p/a") & (events.c.seq == 4))
                           .values(data='{"attempt": 1, "status_code": 500}'))
    problems = await store.verify()
    assert [(p.declaration_key, p.seq) for p in problems] == [("p/a", 4)]
    assert "altered" in problems[0].problem


async def test_deleted_row_is_named(store: AuditStore) -> None:
    """Deleting an event is detected, naming the declaration and the missing seq."""
    await store.append(trail("p/a"))
    async with store.engine.begin() as conn:
        await conn.execute(events.delete().where((events.c.declaration_key == "p/a")
                                                 & (events.c.seq == 3)))
    problems = await store.verify()
    assert ("p/a", 3) in [(p.declaration_key, p.seq) for p in problems]


async def test_deleted_last_row_is_named(store: AuditStore) -> None:
    """Deleting the newest event is detected through the stored chain head."""
    evs = trail("p/a")
    await store.append(evs)
    async with store.engine.begin() as conn:
        await conn.execute(events.delete().where((events.c.declaration_key == "p/a")
                                                 & (events.c.seq == len(evs))))
    problems = await store.verify()
    assert [(p.declaration_key, p.seq) for p in problems] == [("p/a", len(evs))]


async def test_swapped_rows_are_named(store: AuditStore) -> None:
    """Swapping two events' places is detected at both places."""
    await store.append(trail("p/a"))
    async with store.engine.begin() as conn:
        await conn.execute(events.update().where((events.c.declaration_key == "p/a")
                                                 & (events.c.seq == 2)).values(seq=-2))
        await conn.execute(events.update().where((events.c.declaration_key == "p/a")
                                                 & (events.c.seq == 3)).values(seq=2))
        await conn.execute(events.update().where((events.c.declaration_key == "p/a")
                                                 & (events.c.seq == -2)).values(seq=3))
    seqs = {p.seq for p in await store.verify() if p.declaration_key == "p/a"}
    assert {2, 3} <= seqs


async def test_whole_trail_removed_is_named(store: AuditStore) -> None:
    """Removing every event of a declaration is detected from its chain head."""
    await store.append(trail("p/a") + trail("p/b"))
    async with store.engine.begin() as conn:
        await conn.execute(events.delete().where(events.c.declaration_key == "p/b"))
    problems = await store.verify()
    assert [p.declaration_key for p in problems] == ["p/b"]


async def test_rebuild_reaches_the_same_chain_heads(database_factory: Callable[[], str]) -> None:
    """Projecting the same events into an empty store yields the same chain heads."""
    evs = trail("p/a") + trail("p/b", 3)
    one = await AuditStore.open(database_factory())
    two = await AuditStore.open(database_factory())
    try:
        await one.append(evs)
        for i in range(0, len(evs), 3):  # other batch boundaries
            await two.append(evs[i:i + 3])
        assert await one.chain_heads() == await two.chain_heads()
        await two.truncate()
        await two.append(evs)
        assert await one.chain_heads() == await two.chain_heads()
    finally:
        await one.close()
        await two.close()


async def test_sql_injection_shaped_ids_are_data(store: AuditStore) -> None:
    """Ids are bound parameters: a quote-laden declaration id is just data."""
    key = "p/x'); DROP TABLE audit_events; --"
    await store.append(trail(key, 1))
    assert len(await store.trail(key)) == 5
    async with store.engine.connect() as conn:
        count = sa.select(sa.func.count()).select_from(events)
        assert (await conn.execute(count)).scalar_one() == 5


def test_state_machine_transitions() -> None:
    """The delivery state machine: settled states are not undone; replays restart."""
    s, t = DeliveryState, AuditType
    assert next_state(None, t.DELIVERY_PLANNED) is s.PLANNED
    assert next_state(s.DELIVERED, t.DELIVERY_ATTEMPTED) is None
    assert next_state(s.DELIVERED, t.DELIVERY_ACKNOWLEDGED) is s.ACKNOWLEDGED
    assert next_state(s.DELIVERED, t.DELIVERY_OVERDUE) is s.OVERDUE
    assert next_state(s.FAILED, t.DELIVERY_REPLAY_REQUESTED) is s.PLANNED
    assert next_state(s.FAILED, t.DELIVERY_ATTEMPTED) is None
    assert next_state(s.RETRY_SCHEDULED, t.DELIVERY_ATTEMPTED) is s.SENDING


# ------------------------------------------------- what differs between the backends


async def test_other_utc_offsets_verify_and_keep_their_instant(store: AuditStore) -> None:
    """An event stamped with a non-UTC offset is stored as the same instant and still
    verifies: SQLite keeps no offset and PostgreSQL hands timestamps back in UTC, so the
    chain hashes the event in UTC. Every timestamp column reads back aware, in UTC."""
    paris = timezone(timedelta(hours=2))
    at = datetime(2026, 11, 1, 12, 0, 0, 123456, tzinfo=paris)
    key = "p/tz"
    await store.append([
        audit_event(AuditType.DECLARATION_NORMALIZED, key, occurred_at=at,
                    data={"action": "opt_out"}),
        audit_event(AuditType.DELIVERY_PLANNED, key, delivery_id="dlv_tz", developer_id="dev",
                    occurred_at=at, data={"channel": "w", "channel_type": "webhook"}),
        audit_event(AuditType.DELIVERY_RETRY_SCHEDULED, key, unique=(1,), delivery_id="dlv_tz",
                    developer_id="dev", occurred_at=at,
                    data={"channel": "w", "error": "503",
                          "next_attempt_at": "2026-11-01T11:00:05"}),  # no offset: UTC
    ])
    assert await store.verify() == []
    [first, *_] = await store.trail(key)
    assert first.event.occurred_at == at
    assert first.event.occurred_at.utcoffset() == timedelta(0)
    [row] = await store.deliveries_of(key)
    assert row.planned_at == at
    assert row.next_attempt_at == datetime(2026, 11, 1, 11, 0, 5, tzinfo=UTC)
    [decl] = await store.find_declarations(key)
    assert decl.received_at == at
    assert decl.received_at.tzinfo is not None


async def test_a_long_actor_id_is_stored(store: AuditStore) -> None:
    """Actor ids (an operator's name, an API user) have no length limit in the contract:
    PostgreSQL, which enforces VARCHAR lengths where SQLite does not, stores a long one
    too (a refused event would stall the projector)."""
    operator = Actor(kind=ActorKind.OPERATOR, id="o" * 500)
    await store.append([audit_event(
        AuditType.CHANNEL_DISABLED, "_channel/dev/w", developer_id="dev", actor=operator,
        occurred_at=T0, data={"channel": "w", "reason": "maintenance"})])
    [stored] = await store.trail("_channel/dev/w")
    assert stored.event.actor.id == "o" * 500
    [health] = await store.channel_health()
    assert health["changed_by"] == "operator:" + "o" * 500
    assert await store.verify() == []


async def test_upserts_keep_relayed_and_channel_health(store: AuditStore) -> None:
    """The dialect-specific upserts: a broken resubmission of a relayed declaration leaves
    it relayed (a CASE in ON CONFLICT DO UPDATE); channel disable/enable flips a boolean;
    a failure streak keeps its first failure time (COALESCE) and a success clears it."""
    key = "p/up"
    dev = {"developer_id": "dev", "delivery_id": "dlv_up"}
    t = [T0 + timedelta(minutes=i) for i in range(6)]
    await store.append([
        audit_event(AuditType.DECLARATION_NORMALIZED, key, occurred_at=t[0],
                    data={"action": "opt_out"}),
        audit_event(AuditType.DECLARATION_REJECTED, key, unique=("x",), occurred_at=t[1],
                    data={"reason": "broken resubmission"}),
        audit_event(AuditType.DECLARATION_REJECTED, "p/never", unique=("y",), occurred_at=t[1],
                    data={"reason": "not JSON"}),
        audit_event(AuditType.CHANNEL_DISABLED, "_channel/dev/w", developer_id="dev",
                    occurred_at=t[1], data={"channel": "w", "reason": "410 Gone"}),
    ])
    statuses = {d.declaration_key: d.status for d in await store.all_declarations()}
    assert statuses == {key: "relayed", "p/never": "rejected"}
    [health] = await store.channel_health()
    assert health["enabled"] is False
    await store.append([
        audit_event(AuditType.CHANNEL_ENABLED, "_channel/dev/w", developer_id="dev",
                    occurred_at=t[2], data={"channel": "w"}),
        audit_event(AuditType.DELIVERY_RETRY_SCHEDULED, key, unique=(1,), **dev,
                    occurred_at=t[3], data={"channel": "w", "status_code": 503, "error": "a"}),
        audit_event(AuditType.DELIVERY_RETRY_SCHEDULED, key, unique=(2,), **dev,
                    occurred_at=t[4], data={"channel": "w", "status_code": 503, "error": "b"}),
    ])
    [health] = await store.channel_health()
    assert health["enabled"] is True
    assert health["failing_since"] == t[3]
    assert health["last_error"] == "b"
    await store.append([audit_event(AuditType.DELIVERY_DELIVERED, key, unique=(3,), **dev,
                                    occurred_at=t[5], data={"channel": "w"})])
    [health] = await store.channel_health()
    assert health["failing_since"] is None
    assert health["last_success_at"] == t[5]
    assert await store.verify() == []


async def test_verify_streams_and_counts(store: AuditStore) -> None:
    """verify_report streams every row (more than one fetch batch) and counts the
    declarations and events it checked, removed trails included."""
    evs = [e for i in range(120) for e in trail(f"p/s{i:03d}", 3)]  # 120 x 11 events
    for i in range(0, len(evs), 400):
        await store.append(evs[i:i + 400])
    report = await store.verify_report()
    assert (report.declarations, report.events, report.problems) == (120, 1320, [])
    async with store.engine.begin() as conn:
        await conn.execute(events.delete().where(events.c.declaration_key == "p/s007"))
    report = await store.verify_report()
    assert (report.declarations, report.events) == (120, 1309)
    assert [(p.declaration_key, p.seq) for p in report.problems] == [("p/s007", 11)]


async def test_verify_while_the_projector_appends(store: AuditStore) -> None:
    """Verifying while events are appended never reports a problem that is not there:
    the events and their chain heads are read in one statement, one snapshot."""
    await store.append([e for i in range(60) for e in trail(f"p/c{i:02d}", 2)])
    stop = asyncio.Event()

    async def projector(first: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            await store.append([
                audit_event(AuditType.DELIVERY_RETRY_SCHEDULED, f"p/c{i:02d}", unique=(n,),
                            delivery_id=f"dlv_p/c{i:02d}_0", developer_id="dev0",
                            occurred_at=T0, data={"attempt": n})
                for i in range(first, 60, 3)])

    tasks = [asyncio.create_task(projector(first)) for first in range(3)]
    try:
        for _ in range(15):
            assert (await store.verify_report()).problems == []
    finally:
        stop.set()
        await asyncio.gather(*tasks)


async def test_an_unreachable_store_is_a_store_error(unused_tcp_port: int) -> None:
    """A PostgreSQL server that does not answer is a StoreError (which the projector
    retries), not a bare OSError from the driver."""
    url = f"postgresql+asyncpg://u:p@127.0.0.1:{unused_tcp_port}/nothing"
    with pytest.raises(StoreError):
        await AuditStore.open(url)
    store = await AuditStore.open(url, create=False)
    try:
        with pytest.raises(StoreError):
            await store.append(trail("p/a", 1))
        with pytest.raises(StoreError):
            await store.verify()
    finally:
        await store.close()


async def test_the_auditors_deliveries_query_uses_its_index(store: AuditStore) -> None:
    """The filtered deliveries query (one developer, some states, a time range, ordered
    by updated_at and delivery_id) is answered from ix_deliveries_developer_state_updated
    on both backends, as scripts/explain_deliveries.py shows."""
    from explain_deliveries import INDEX, plan, seed, uses_index

    await seed(store, 5000)
    lines = await plan(store)
    assert uses_index(lines), f"{INDEX} not used:\n" + "\n".join(lines)


async def test_every_sqlite_connection_gets_the_bounded_page_cache(tmp_path: Path) -> None:
    """Each connection of the pool, not only the first, runs with the store's page cache
    (512 KiB); zero leaves SQLite's own default."""
    async def cache_sizes(store: AuditStore) -> list[int]:
        async with store.engine.connect() as a, store.engine.connect() as b, \
                store.engine.connect() as c:
            return [(await conn.execute(sa.text("PRAGMA cache_size"))).scalar_one()
                    for conn in (a, b, c)]

    store = await AuditStore.open(f"sqlite+aiosqlite:///{tmp_path / 'a.db'}")
    try:
        assert SQLITE_CACHE_KIB == 512
        assert await cache_sizes(store) == [-512] * 3
    finally:
        await store.close()
    store = await AuditStore.open(f"sqlite+aiosqlite:///{tmp_path / 'b.db'}", sqlite_cache_kib=0)
    try:
        assert await cache_sizes(store) == [-2000] * 3
    finally:
        await store.close()


async def test_a_warmed_pool_opens_its_connections_at_start_and_no_more_later(
        tmp_path: Path) -> None:
    """``warm_pool`` (the worker's store) opens all POOL_SIZE connections, each a thread
    of its own on SQLite, when the store opens; a burst of that many concurrent queries
    afterwards finds them all open and starts no thread. Without it the pool opens them
    one by one, in the first burst that needs each (finding 7 of docs/reliability.md)."""
    async def burst(store: AuditStore) -> None:
        async def one() -> None:
            async with store.engine.connect() as conn:
                await conn.execute(sa.text("SELECT count(*) FROM audit_events"))
                await asyncio.sleep(0.05)  # held at once, so the pool needs them all
        await asyncio.gather(*(one() for _ in range(POOL_SIZE)))

    before = threading.active_count()
    store = await AuditStore.open(f"sqlite+aiosqlite:///{tmp_path / 'a.db'}", warm_pool=True)
    try:
        assert store.engine.pool.checkedin() == POOL_SIZE
        opened = threading.active_count()
        assert opened - before == POOL_SIZE
        await burst(store)
        assert threading.active_count() == opened
        assert store.engine.pool.checkedin() == POOL_SIZE
    finally:
        await store.close()

    store = await AuditStore.open(f"sqlite+aiosqlite:///{tmp_path / 'b.db'}")
    try:
        assert store.engine.pool.checkedin() == 1
        lazy = threading.active_count()
        await burst(store)
        assert store.engine.pool.checkedin() == POOL_SIZE
        assert threading.active_count() - lazy == POOL_SIZE - 1
    finally:
        await store.close()


async def test_warming_the_pool_of_an_unreachable_store_is_a_store_error(
        unused_tcp_port: int) -> None:
    url = f"postgresql+asyncpg://nobody:x@127.0.0.1:{unused_tcp_port}/none"
    with pytest.raises(StoreError, match="cannot open the audit store"):
        await AuditStore.open(url, create=False, warm_pool=True)
