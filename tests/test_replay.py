"""Replays end to end, against real servers: a real Kafka broker, a real worker
process, real webhook receivers on 127.0.0.1 and the API in-process. Deliveries fail
until their attempts are spent; the receiver recovers; an operator's replay by
developer and time range delivers them, and the trail shows who asked for it."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from api_helpers import declaration, read_topic, running_api, seed
from relay_helpers import deliveries, eventually, whsec

from notice_relay.audit.store import AuditStore
from notice_relay.models import AuditEvent, DeliveryTask
from notice_relay.receiver import Receiver

pytestmark = pytest.mark.kafka

FAST = {"NOTICE_RELAY_RETRY_SCHEDULE": "1s", "NOTICE_RELAY_BREAKER_THRESHOLD": "100",
        "NOTICE_RELAY_SESSION_TIMEOUT": "6s", "NOTICE_RELAY_HOLD_RECHECK": "1s"}


@pytest.fixture
async def receivers() -> AsyncIterator[dict[str, Receiver]]:
    """Real receivers, stopped at the end of the test."""
    started: dict[str, Receiver] = {}
    yield started
    for r in started.values():
        await r.stop()


#: Delivered, and maybe already acknowledged by the receiver's receipt.
DONE = {"delivered", "acknowledged"}


async def _states(env: Any, developer: str) -> list[str]:
    return [r.state for r in await deliveries(env) if r.developer_id == developer]


async def _done(env: Any, developer: str, n: int) -> bool:
    states = await _states(env, developer)
    return len(states) == n and set(states) <= DONE


async def test_replay_by_developer_and_time_range_delivers_failed_deliveries(
    relay_env: Any, worker_factory: Any, receivers: dict[str, Receiver],
) -> None:
    """Three declarations posted through the API fail at two developers (HTTP 500
    until the one-step schedule is spent). acme-ai's receiver recovers; a dry run
    counts, then a replay by operator alice for acme-ai and the time range delivers
    its three — audited as delivery.replay_requested (actor operator alice) before
    delivery.delivered — while brushstroke-labs' stay failed, untouched."""
    for dev in ("acme-ai", "brushstroke-labs"):
        secret = whsec()
        receivers[dev] = await Receiver(secret).start()
        receivers[dev].state.fail_with = 500
        relay_env.add_webhook_developer(dev, receivers[dev].url, secret)
    relay_env.write_publishers("artfolio")
    relay_env.secrets.update(FAST)
    worker = worker_factory()
    started = datetime.now(UTC)

    async with running_api(relay_env, with_registry=False) as api:
        for i in range(3):
            res = await api.client.post("/v1/declarations", json=declaration(i, prefix="rp"),
                                        headers=api.auth("publisher"))
            assert res.status_code == 202, res.text

        async def all_failed() -> bool:
            rows = await deliveries(relay_env)
            return len(rows) == 6 and all(r.state == "failed" for r in rows)

        await eventually(all_failed, 120, "six failed deliveries", worker=worker)
        assert all(r.attempts == 2 for r in await deliveries(relay_env))
        receivers["acme-ai"].state.fail_with = None
        window = {"developer": "acme-ai", "status": ["failed"],
                  "since": started.isoformat(),
                  "until": (datetime.now(UTC) + timedelta(seconds=1)).isoformat()}

        dry = await api.client.post("/v1/replays", json={**window, "dry_run": True},
                                    headers=api.auth("operator"))
        assert dry.status_code == 200, dry.text
        assert dry.json() == {"matched": 3, "replayed": 0, "skipped": 0, "dry_run": True}
        before = await api.client.post("/v1/replays", headers=api.auth("operator"), json={
            **window, "until": started.isoformat(), "since": (started - timedelta(hours=1))
            .isoformat(), "dry_run": True})
        assert before.json()["matched"] == 0

        res = await api.client.post("/v1/replays", json=window, headers=api.auth("operator"))
        assert res.status_code == 200, res.text
        assert res.json() == {"matched": 3, "replayed": 3, "skipped": 0, "dry_run": False}

        async def acme_delivered() -> bool:
            return await _done(relay_env, "acme-ai", 3)

        await eventually(acme_delivered, 60, "acme-ai's deliveries delivered", worker=worker)
        assert len(receivers["acme-ai"].state.notices()) == 3
        assert await _states(relay_env, "brushstroke-labs") == ["failed"] * 3

    store = await AuditStore.open(relay_env.database_url)
    try:
        for i in range(3):
            trail = await store.trail(f"artfolio/rp-{i:04d}")
            acme = [s.event for s in trail if s.event.developer_id == "acme-ai"]
            types = [e.type.value for e in acme]
            asked = types.index("delivery.replay_requested")
            replay = acme[asked]
            assert (replay.actor.kind.value, replay.actor.id) == ("operator", "alice")
            assert replay.data["attempt"] == 3
            assert replay.data["previous_state"] == "failed"
            assert types[asked + 1:asked + 3] == ["delivery.attempted", "delivery.delivered"]
            assert acme[asked + 2].data["attempt"] == 3
            other = [s.event.type.value for s in trail
                     if s.event.developer_id == "brushstroke-labs"]
            assert "delivery.replay_requested" not in other
        assert await store.verify() == []
    finally:
        await store.close()

    res = relay_env.cli("replay", "--developer", "brushstroke-labs", "--dry-run", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {"matched": 3, "replayed": 0, "skipped": 0, "dry_run": True}


async def test_replay_cli_sends_and_refuses_states_it_cannot_replay(
    relay_env: Any, worker_factory: Any, receivers: dict[str, Receiver],
) -> None:
    """`notice-relay replay` replays as the named operator (exit 0, JSON counts), and
    refuses a state that cannot be replayed (delivered) with exit 2 and a reason."""
    secret = whsec()
    receivers["acme-ai"] = r = await Receiver(secret).start()
    r.state.fail_with = 500
    relay_env.add_webhook_developer("acme-ai", r.url, secret)
    relay_env.write_publishers("artfolio")
    relay_env.secrets.update(FAST)
    worker = worker_factory()
    async with running_api(relay_env, with_registry=False) as api:
        res = await api.client.post("/v1/declarations", json=declaration(0, prefix="cl"),
                                    headers=api.auth("publisher"))
        assert res.status_code == 202

    async def failed() -> bool:
        return await _states(relay_env, "acme-ai") == ["failed"]

    await eventually(failed, 120, "a failed delivery", worker=worker)
    r.state.fail_with = None
    bad = relay_env.cli("replay", "--status", "delivered")
    assert bad.returncode == 2
    assert b"cannot replay" in bad.stderr
    res = relay_env.cli("replay", "--developer", "acme-ai", "--since", "10m", "--operator", "bob",
                        "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["replayed"] == 1

    async def delivered() -> bool:
        return await _done(relay_env, "acme-ai", 1)

    await eventually(delivered, 60, "delivered after the replay", worker=worker)
    store = await AuditStore.open(relay_env.database_url)
    try:
        trail = [s.event for s in await store.trail("artfolio/cl-0000")]
        [asked] = [e for e in trail if e.type.value == "delivery.replay_requested"]
        assert (asked.actor.kind.value, asked.actor.id) == ("operator", "bob")
    finally:
        await store.close()


async def test_a_replay_puts_its_events_then_its_tasks_on_the_broker(relay_env: Any) -> None:
    """Without a worker, what a replay sends: one delivery.replay_requested per delivery
    (actor operator alice, keyed by declaration) on the audit topic, acknowledged by the
    broker before the tasks (attempt = attempts + 1, the stored notice, keyed by
    delivery id) go to the deliveries topic. States that cannot be replayed are 422."""
    async with running_api(relay_env) as api:
        notice, ids = await seed(api, declaration(1, prefix="ev"), outcome="failed")
        res = await api.client.post("/v1/replays", json={"declaration": "artfolio/ev-0001"},
                                    headers=api.auth("operator"))
        assert res.json() == {"matched": 2, "replayed": 2, "skipped": 0, "dry_run": False}
        audit = await read_topic(relay_env.bootstrap, api.topics.audit, want=2)
        tasks = await read_topic(relay_env.bootstrap, api.topics.deliveries, want=2)
        events = [AuditEvent.model_validate_json(r.value) for r in audit]
        assert {e.delivery_id for e in events} == set(ids)
        assert all(r.key == b"artfolio/ev-0001" for r in audit)
        assert all(e.type.value == "delivery.replay_requested" for e in events)
        assert all((e.actor.kind.value, e.actor.id) == ("operator", "alice") for e in events)
        sent = [DeliveryTask.model_validate_json(r.value) for r in tasks]
        assert {(r.key.decode(), t.delivery_id) for r, t in zip(tasks, sent, strict=True)} == {
            (i, i) for i in ids}
        assert all(t.attempt == 2 and t.notice == notice for t in sent)
        assert max(r.timestamp for r in audit) <= min(r.timestamp for r in tasks)

        for body, field in (({"status": ["delivered"]}, "status"),
                            ({"status": ["failed"], "since": "2026-01-02T00:00:00Z",
                              "until": "2026-01-01T00:00:00Z"}, "until"),
                            ({"status": []}, "status"), ({"dry_run": "maybe"}, "dry_run"),
                            ({"developer": "acme-ai", "typo": 1}, "typo")):
            bad = await api.client.post("/v1/replays", json=body, headers=api.auth("operator"))
            assert bad.status_code == 422, (body, bad.text)
            assert field in [e["field"] for e in bad.json()["errors"]], bad.json()
