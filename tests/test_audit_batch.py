"""The batched projection: the current-state tables do not depend on how the events
were cut into batches, and the fold follows the per-event rules."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from notice_relay.audit.batch import Ev, fold
from notice_relay.audit.events import audit_event
from notice_relay.audit.store import AuditStore
from notice_relay.models import AuditEvent, AuditType

T0 = datetime(2026, 1, 1, tzinfo=UTC)

DELIVERY_TYPES = [
    AuditType.DELIVERY_PLANNED, AuditType.DELIVERY_ATTEMPTED, AuditType.DELIVERY_DELIVERED,
    AuditType.DELIVERY_RETRY_SCHEDULED, AuditType.DELIVERY_FAILED,
    AuditType.DELIVERY_ACKNOWLEDGED, AuditType.DELIVERY_HELD, AuditType.DELIVERY_SUPERSEDED,
    AuditType.DELIVERY_SKIPPED, AuditType.DELIVERY_REPLAY_REQUESTED,
]


def _event(i: int, kind: AuditType, delivery: str) -> AuditEvent:
    data: dict[str, Any] = {"channel": "webhook", "channel_type": "webhook"}
    if kind is AuditType.DELIVERY_ATTEMPTED:
        data["attempt"] = i
    if kind is AuditType.DELIVERY_RETRY_SCHEDULED:
        data.update(error=f"503 at {i}", status_code=503, transient=True,
                    next_attempt_at=(T0 + timedelta(minutes=i)).isoformat())
    if kind is AuditType.DELIVERY_FAILED:
        data.update(error=f"410 at {i}", status_code=410)
    if kind is AuditType.DELIVERY_DELIVERED:
        data.update(status_code=200, receipt=f"r{i}")
    return audit_event(kind, f"pub/{delivery}", unique=(i,), delivery_id=delivery,
                       developer_id="acme", occurred_at=T0 + timedelta(seconds=i), data=data)


async def _project(path: Path, batches: list[list[AuditEvent]]) -> list[Any]:
    store = await AuditStore.open(f"sqlite+aiosqlite:///{path}")
    try:
        for b in batches:
            await store.append(b)
        rows = await store.all_deliveries()
        assert await store.verify() == []
        return sorted(rows, key=lambda r: r.delivery_id)
    finally:
        await store.close()


@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    steps=st.lists(st.tuples(st.sampled_from(DELIVERY_TYPES), st.sampled_from(["d1", "d2", "d3"])),
                   min_size=1, max_size=25),
    cuts=st.lists(st.integers(min_value=1, max_value=24), max_size=6),
)
def test_rows_do_not_depend_on_batch_boundaries(
    tmp_path: Path, steps: list[tuple[AuditType, str]], cuts: list[int]
) -> None:
    evs = [_event(i, kind, d) for i, (kind, d) in enumerate(steps)]
    bounds = sorted({c for c in cuts if c < len(evs)})
    batches, start = [], 0
    for b in [*bounds, len(evs)]:
        batches.append(evs[start:b])
        start = b
    n = len(list(tmp_path.iterdir()))
    one = asyncio.run(_project(tmp_path / f"one-{n}.db", [[e] for e in evs]))
    cut = asyncio.run(_project(tmp_path / f"cut-{n}.db", batches))
    whole = asyncio.run(_project(tmp_path / f"whole-{n}.db", [evs]))
    assert one == cut == whole


def _ev(kind: AuditType, i: int, **data: Any) -> Ev:
    return Ev(kind, T0 + timedelta(seconds=i), {"channel": "webhook", **data}, "pub/x",
              "acme", "d1")


def test_events_before_the_planning_wait_for_it() -> None:
    row = fold(None, [_ev(AuditType.DELIVERY_ATTEMPTED, 1, attempt=1),
                      _ev(AuditType.DELIVERY_DELIVERED, 2, status_code=200)])
    assert row is None
    row = fold(None, [_ev(AuditType.DELIVERY_ATTEMPTED, 1, attempt=1),
                      _ev(AuditType.DELIVERY_DELIVERED, 2, status_code=200),
                      _ev(AuditType.DELIVERY_PLANNED, 0)])
    assert row is not None
    assert row["state"] == "delivered"
    assert row["attempts"] == 1
    assert row["planned_at"] == T0


def test_a_late_attempt_does_not_move_a_delivered_delivery_back() -> None:
    row = fold(None, [_ev(AuditType.DELIVERY_PLANNED, 0),
                      _ev(AuditType.DELIVERY_DELIVERED, 2, status_code=200, receipt="ok"),
                      _ev(AuditType.DELIVERY_ATTEMPTED, 3, attempt=2)])
    assert row is not None
    assert row["state"] == "delivered"
    assert row["receipt"] == "ok"
    assert row["delivered_at"] == T0 + timedelta(seconds=2)
