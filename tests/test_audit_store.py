"""The audit store: idempotent projection, sequence numbers, the hash chain, and
tamper detection (rows edited, deleted and swapped directly in the database)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from notice_relay.audit.events import audit_event
from notice_relay.audit.projection import next_state
from notice_relay.audit.store import AuditStore, events
from notice_relay.models import AuditEvent, AuditType, DeliveryState

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
                        developer_id=f"dev{i}", occurred_at=t, data={"attempt": 1, "status_code": 200}),
            audit_event(AuditType.DELIVERY_DELIVERED, key, unique=(1,), delivery_id=did,
                        developer_id=f"dev{i}", occurred_at=t, data={"attempt": 1, "receipt": "ok"}),
        ]
    return evs


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[AuditStore]:
    """A fresh SQLite audit store."""
    s = await AuditStore.open(f"sqlite+aiosqlite:///{tmp_path / 'audit.db'}")
    yield s
    await s.close()


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
    assert decl.status == "relayed" and decl.publisher_id == "p"


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


async def test_rebuild_reaches_the_same_chain_heads(tmp_path: Path) -> None:
    """Projecting the same events into an empty store yields the same chain heads."""
    evs = trail("p/a") + trail("p/b", 3)
    one = await AuditStore.open(f"sqlite+aiosqlite:///{tmp_path / 'one.db'}")
    two = await AuditStore.open(f"sqlite+aiosqlite:///{tmp_path / 'two.db'}")
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
        assert (await conn.execute(sa.select(sa.func.count()).select_from(events))).scalar_one() == 5


def test_state_machine_transitions() -> None:
    """The delivery state machine: settled states are not undone; replays restart."""
    assert next_state(None, AuditType.DELIVERY_PLANNED) is DeliveryState.PLANNED
    assert next_state(DeliveryState.DELIVERED, AuditType.DELIVERY_ATTEMPTED) is None
    assert next_state(DeliveryState.DELIVERED, AuditType.DELIVERY_ACKNOWLEDGED) is DeliveryState.ACKNOWLEDGED
    assert next_state(DeliveryState.DELIVERED, AuditType.DELIVERY_OVERDUE) is DeliveryState.OVERDUE
    assert next_state(DeliveryState.FAILED, AuditType.DELIVERY_REPLAY_REQUESTED) is DeliveryState.PLANNED
    assert next_state(DeliveryState.FAILED, AuditType.DELIVERY_ATTEMPTED) is None
    assert next_state(DeliveryState.RETRY_SCHEDULED, AuditType.DELIVERY_ATTEMPTED) is DeliveryState.SENDING
