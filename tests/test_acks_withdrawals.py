"""Acknowledgements, overdue reminders and withdrawals in a real worker process, with
a real Kafka broker and real receivers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from aiokafka import AIOKafkaProducer
from relay_helpers import deliveries, eventually, make_decl, publish, trail_types, whsec

from notice_relay.acks import AckRecord, verify_token
from notice_relay.receiver import Receiver
from notice_relay.topics import Topics

pytestmark = pytest.mark.kafka


@pytest.fixture
async def receivers() -> AsyncIterator[dict[str, Receiver]]:
    """Real receivers, stopped at the end of the test."""
    started: dict[str, Receiver] = {}
    yield started
    for r in started.values():
        await r.stop()


async def add(env: Any, started: dict[str, Receiver], dev: str, extra: str = "") -> Receiver:
    """A receiver for ``dev``, registered as its webhook."""
    secret = whsec()
    r = await Receiver(secret).start()
    started[dev] = r
    env.add_webhook_developer(dev, r.url, secret)
    if extra:
        path = env.connectors / f"{dev}.toml"
        path.write_text(path.read_text().replace('ack_sla = "30d"', extra))
    return r


async def test_ack_link_token_and_ack_record(
    relay_env: Any, worker_factory: Any, receivers: dict[str, Receiver]
) -> None:
    """Each notice carries an ack link whose token is scoped to its delivery; an ack
    on the acks topic (what the API publishes) makes the delivery acknowledged, with
    the developer as actor and the reference in the trail."""
    ack_secret = secrets.token_urlsafe(32)
    r = await add(relay_env, receivers, "acme-ai")
    r.state.receipts = False
    relay_env.write_publishers("artfolio")
    relay_env.secrets.update({"NOTICE_RELAY_ACK_SECRET": ack_secret,
                              "NOTICE_RELAY_PUBLIC_URL": "https://relay.example.invalid"})
    worker = worker_factory()
    await publish(relay_env, [make_decl(0)])
    await eventually(lambda: len(r.state.notices()) == 1, 60, "delivered", worker=worker)
    [x] = r.state.received
    ack = x.notice["ack"]
    assert ack["url"].startswith("https://relay.example.invalid/v1/acks?token=")
    token = parse_qs(urlsplit(ack["url"]).query)["token"][0]
    assert verify_token(ack_secret.encode(), token) == (x.webhook_id, "acme-ai")

    async def state(s: str) -> bool:
        rows = await deliveries(relay_env)
        return len(rows) == 1 and rows[0].state == s
    await eventually(lambda: state("delivered"), 30, "delivered in the store")
    producer = AIOKafkaProducer(bootstrap_servers=relay_env.bootstrap)
    await producer.start()
    try:
        rec = AckRecord(delivery_id=x.webhook_id, developer_id="acme-ai",
                        acknowledged_at=datetime.now(UTC), reference="removed from dataset v4",
                        via="token")
        await producer.send_and_wait(Topics.from_settings(relay_env.settings()).acks,
                                     rec.model_dump_json().encode(), key=x.webhook_id.encode())
    finally:
        await producer.stop()
    await eventually(lambda: state("acknowledged"), 30, "acknowledged", worker=worker)
    trail = await trail_types(relay_env, "artfolio/d-0000")
    [acked] = [d for t, d in trail if t == "delivery.acknowledged"]
    assert acked["reference"] == "removed from dataset v4"
    assert acked["via"] == "token"


async def test_overdue_is_audited_and_a_reminder_sent(
    relay_env: Any, worker_factory: Any, receivers: dict[str, Receiver]
) -> None:
    """No ack within the developer's ack_sla: the delivery becomes overdue (audited)
    and a reminder carrying the same ack link is sent as a delivery of its own."""
    r = await add(relay_env, receivers, "acme-ai", extra='ack_sla = "2s"')
    r.state.receipts = False
    relay_env.write_publishers("artfolio")
    relay_env.secrets["NOTICE_RELAY_OVERDUE_CHECK"] = "1s"
    worker = worker_factory()
    await publish(relay_env, [make_decl(0)])
    await eventually(lambda: len(r.state.notices()) == 2, 60, "notice and reminder", worker=worker)
    first, reminder = r.state.notices()
    assert first["ack"]["url"] == reminder["ack"]["url"]
    assert [x.webhook_id for x in r.state.received][1].endswith(".reminder")

    async def overdue() -> bool:
        return any(x.state == "overdue" for x in await deliveries(relay_env))
    await eventually(overdue, 30, "overdue in the store")
    types = [t for t, _ in await trail_types(relay_env, "artfolio/d-0000")]
    assert "delivery.overdue" in types


async def test_withdrawal_supersedes_pending_and_notifies_the_notified(
    relay_env: Any, worker_factory: Any, receivers: dict[str, Receiver]
) -> None:
    """An artist's withdrawal: the developer already notified gets the withdrawal
    notice; the developer whose delivery was still retrying never gets the opt-out
    (superseded) nor the withdrawal."""
    told = await add(relay_env, receivers, "acme-ai")
    failing = await add(relay_env, receivers, "brushstroke-labs")
    failing.state.fail_with = 503
    relay_env.write_publishers("artfolio")
    relay_env.secrets["NOTICE_RELAY_RETRY_SCHEDULE"] = "2s,2s,2s,2s,2s,2s,2s,2s,2s,2s"
    relay_env.secrets["NOTICE_RELAY_BREAKER_THRESHOLD"] = "1000"
    worker = worker_factory()
    opt_out = make_decl(0)
    await publish(relay_env, [opt_out])
    await eventually(lambda: len(told.state.notices()) == 1, 60, "opt-out delivered", worker=worker)
    withdraw = {**make_decl(1), "action": "withdraw", "supersedes": opt_out["declaration_id"],
                "artist": opt_out["artist"]}
    await publish(relay_env, [withdraw])
    await eventually(lambda: len(told.state.notices()) == 2, 60, "withdrawal delivered",
                     worker=worker)
    assert told.state.notices()[1]["action"] == "withdraw"
    assert told.state.notices()[1]["supersedes"] == "d-0000"

    async def superseded() -> bool:
        rows = {(x.declaration_key, x.developer_id): x.state for x in await deliveries(relay_env)}
        return (rows.get(("artfolio/d-0000", "brushstroke-labs")) == "superseded"
                and rows.get(("artfolio/d-0001", "brushstroke-labs")) == "skipped")
    await eventually(superseded, 60, "pending opt-out superseded", worker=worker)
    failing.state.fail_with = None
    await asyncio.sleep(5)
    assert failing.state.notices() == []
    types = [t for t, _ in await trail_types(relay_env, "artfolio/d-0000")]
    assert "declaration.withdrawn" in types
    assert "delivery.superseded" in types
    res = relay_env.cli("status", "d-0000", "--json")
    assert b'"withdrawn"' in res.stdout
