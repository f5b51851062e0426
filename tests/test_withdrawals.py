"""The deliver stage's question "was this declaration withdrawn?": answered by a
primary-key read of a real store (SQLite and PostgreSQL), one read per declaration per
``ttl``, never a scan of the declarations, and "no" while the store is down."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import structlog

from notice_relay.audit import worker_queries
from notice_relay.audit.events import audit_event
from notice_relay.audit.store import AuditStore
from notice_relay.errors import StoreError
from notice_relay.models import AuditType
from notice_relay.withdrawals import Withdrawals

pytest_plugins = ["pg"]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def relay(store: AuditStore, *keys: str) -> None:
    await store.append([audit_event(AuditType.DECLARATION_NORMALIZED, k, unique=(k,))
                        for k in keys])


async def withdraw(store: AuditStore, key: str) -> None:
    await store.append([audit_event(AuditType.DECLARATION_WITHDRAWN, key, unique=(key, "w"))])


async def test_withdrawn_declarations_are_told_apart(store: AuditStore) -> None:
    await relay(store, "pub/d1", "pub/d2")
    await withdraw(store, "pub/d2")

    async def get() -> AuditStore:
        return store

    w = Withdrawals(get)
    assert await w.withdrawn("pub/d2") is True
    assert await w.withdrawn("pub/d1") is False
    assert await w.withdrawn("pub/never-seen") is False


async def test_one_read_per_declaration_per_ttl_in_a_bounded_cache(store: AuditStore) -> None:
    await relay(store, "pub/d1")

    async def get() -> AuditStore:
        return store

    clock = Clock()
    w = Withdrawals(get, ttl=1.0, size=3, clock=clock)
    for _ in range(4):  # a declaration's four tasks, one per developer
        assert await w.withdrawn("pub/d1") is False
    assert w.reads == 1
    # A withdrawal recorded meanwhile is seen once the answer is older than ttl.
    await withdraw(store, "pub/d1")
    clock.now += 0.5
    assert await w.withdrawn("pub/d1") is False
    clock.now += 0.6
    assert await w.withdrawn("pub/d1") is True
    assert w.reads == 2
    for i in range(10):
        await w.withdrawn(f"pub/x{i}")
    assert len(w._answers) == 3  # the least recently asked went first
    assert list(w._answers) == ["pub/x7", "pub/x8", "pub/x9"]


async def test_the_read_is_a_primary_key_search_not_a_scan(tmp_path: Path) -> None:
    store = await AuditStore.open(f"sqlite+aiosqlite:///{tmp_path / 'audit.db'}")
    executed: list[tuple[str, Any]] = []

    def seen(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        executed.append((statement, parameters))

    try:
        sa.event.listen(store.engine.sync_engine, "before_cursor_execute", seen)
        await worker_queries.is_withdrawn(store, "pub/d1")
        sa.event.remove(store.engine.sync_engine, "before_cursor_execute", seen)
        [(statement, parameters)] = executed
        async with store.engine.connect() as conn:
            plan = " ".join(str(r[-1]) for r in await conn.exec_driver_sql(
                f"EXPLAIN QUERY PLAN {statement}", parameters))
        # A scan would read every declaration the store holds, at every question.
        assert plan.startswith("SEARCH declarations USING INDEX"), plan
        assert "(declaration_key=?)" in plan, plan
    finally:
        await store.close()


async def test_while_the_store_is_down_the_answer_is_no_and_said_once() -> None:
    async def down() -> AuditStore:
        raise StoreError("cannot open the audit store: connection refused")

    clock = Clock()
    w = Withdrawals(down, retry_after=5.0, clock=clock)
    with structlog.testing.capture_logs() as logs:
        assert await w.withdrawn("pub/d1") is False
        assert await w.withdrawn("pub/d2") is False  # not asked again for 5 s
        assert w.reads == 1
        clock.now += 5.1
        assert await w.withdrawn("pub/d2") is False
        assert w.reads == 2
    warnings = [e for e in logs if e["event"] == "withdrawals.store_unavailable"]
    assert len(warnings) == 1
    assert "connection refused" in warnings[0]["error"]
    assert w._answers == {}  # nothing cached: once the store is back, it is asked


async def test_a_store_that_hangs_does_not_hold_up_the_deliveries(store: AuditStore) -> None:
    hang = asyncio.Event()

    async def get() -> AuditStore:
        if not hang.is_set():
            await asyncio.sleep(3600)  # a database that neither answers nor refuses
        return store

    await relay(store, "pub/d1")
    await withdraw(store, "pub/d1")
    w = Withdrawals(get, timeout=0.2, retry_after=0.5)
    started = time.monotonic()
    with structlog.testing.capture_logs() as logs:
        for i in range(50):  # 50 tasks during the hang: one wait, then none
            assert await w.withdrawn(f"pub/x{i}") is False
        assert time.monotonic() - started < 1.0
        assert w.reads == 1
        hang.set()
        await asyncio.sleep(0.6)
        assert await w.withdrawn("pub/d1") is True  # asked again once it answers
    assert [e["event"] for e in logs] == ["withdrawals.store_unavailable",
                                          "withdrawals.store_available"]
    assert "no answer within 0.2 s" in logs[0]["error"]
