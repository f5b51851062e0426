"""The fault suite, shortened (``scripts/faults.py`` runs the full one): each scenario
under steady load against real processes (a KRaft broker of this module's own, which
one scenario stops and starts; worker processes killed with SIGKILL; PostgreSQL stopped
and started; real webhook receivers and an SMTP server). Nothing may be lost, every
notice must carry its delivery's id (so duplicates carry the same webhook-id), every
trail must be complete and every chain must verify."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import faultlib
import pytest

pytestmark = pytest.mark.kafka

#: Smaller than the full suite: a few minutes for all six scenarios on two cores.
SHORT = faultlib.ScenarioParams(
    rate=1.5, min_load=20.0, tail=4.0, warmup=8, kills=3, kill_gap=(3.0, 8.0),
    outage=12.0, settle=120.0, seed=6,
)


def _in_thread(coro: object) -> None:
    # Its own thread and event loop: a sync fixture must not touch the test's loop.
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, coro).result()  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[faultlib.Harness]:
    """A broker of this module's own (the broker scenario stops and starts it)."""
    h = faultlib.Harness(Path(tmp_path_factory.mktemp("faults")))
    _in_thread(h.start_kafka())
    try:
        yield h
    finally:
        _in_thread(h.close())


@pytest.mark.timeout(280)
@pytest.mark.parametrize("key", list(faultlib.SCENARIOS))
async def test_fault_scenario_loses_nothing(harness: faultlib.Harness, key: str) -> None:
    """Under load, through the scenario's fault: every notice arrives under its own
    delivery id, every trail is complete and every chain verifies."""
    if harness.kafka is None or not faultlib.localkafka.running(harness.work / "kafka"):
        await harness.start_kafka()
    res = await faultlib.run_scenario(harness, key, SHORT)
    row = faultlib.format_row(res)
    assert res.published > 0, row
    assert res.lost == 0, f"{row}; lost e.g. {res.lost_sample}; logs in {res.workdir}"
    assert res.delivered == res.expected, row
    assert res.id_mismatches == 0, f"{row}: a notice arrived under another id"
    assert res.unexpected == 0, f"{row}: notices nobody expected"
    assert res.trails_complete == res.trails, (
        f"{row}; incomplete e.g. {res.incomplete_sample}; states {res.delivery_states}")
    assert res.chains_verify, f"{row}: {res.problems}"
    assert res.cli_verify_exit == 0, row


@pytest.mark.parametrize("batches", [2, 1], ids=["separate-batches", "one-batch"])
async def test_an_outcome_stored_before_its_planning_still_settles_the_delivery(
    tmp_path: Path, batches: int
) -> None:
    """With two workers, one worker's outcome can reach the audit topic before the other
    worker's ``delivery.planned`` (two producers). The delivery must end delivered, not
    ``planned`` (which the sweeper would re-send for ever), and the chain must verify."""
    from notice_relay.audit.events import audit_event
    from notice_relay.audit.store import AuditStore
    from notice_relay.models import AuditType

    key, did, ch = "artfolio/d-1", "dlv_" + "0" * 32, {"channel": "webhook"}
    outcome = [
        audit_event(AuditType.DELIVERY_ATTEMPTED, key, unique=(1,), delivery_id=did,
                    developer_id="acme-ai", data={**ch, "attempt": 1}),
        audit_event(AuditType.DELIVERY_DELIVERED, key, unique=(1,), delivery_id=did,
                    developer_id="acme-ai", data={**ch, "attempt": 1, "receipt": "r-1"}),
    ]
    planned = audit_event(AuditType.DELIVERY_PLANNED, key, delivery_id=did,
                          developer_id="acme-ai", data={**ch, "channel_type": "webhook"})
    store = await AuditStore.open(f"sqlite+aiosqlite:///{tmp_path / 'audit.db'}")
    try:
        if batches == 2:
            await store.append(outcome)
            await store.append([planned])
        else:
            await store.append([*outcome, planned])
        [row] = await store.all_deliveries()
        assert row.state == "delivered"
        assert row.attempts == 1
        assert row.delivered_at is not None
        assert row.receipt == "r-1"
        assert await store.verify() == []
    finally:
        await store.close()
