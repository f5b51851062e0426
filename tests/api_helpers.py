"""Helpers for the HTTP API tests: the app running in-process (httpx.ASGITransport)
against a real SQLite store in the test's directory and the real Kafka broker, API
keys for every role, declarations and deliveries put in the store through
``AuditStore.append`` (events built by the relay's own stage functions), and reading
what really landed on a topic."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from aiokafka import AIOKafkaConsumer
from relay_helpers import make_decl, whsec

from notice_relay.api import create_app
from notice_relay.api.state import ApiState
from notice_relay.audit.events import audit_event
from notice_relay.audit.store import AuditStore
from notice_relay.connectors import load_developers
from notice_relay.fanout import plan_deliveries
from notice_relay.keys import create_key
from notice_relay.models import AuditEvent, AuditType, Notice
from notice_relay.normalize import normalize
from notice_relay.stages import accept
from notice_relay.topics import Topics
from notice_relay.validate import parse_declaration

PUBLISHERS = ("artfolio", "pixelboard")
DEVELOPERS = ("acme-ai", "brushstroke-labs")
#: (role, subject) of every key a harness creates.
PRINCIPALS = {
    "publisher": ("publisher", "artfolio"),
    "other_publisher": ("publisher", "pixelboard"),
    "developer": ("developer", "acme-ai"),
    "other_developer": ("developer", "brushstroke-labs"),
    "operator": ("operator", "alice"),
    "auditor": ("auditor", "audrey"),
}


def register(env: Any) -> None:
    """Publishers and developers of the API tests (developers' URLs are never called
    unless a test runs a worker and says otherwise)."""
    env.write_publishers(*PUBLISHERS)
    for dev in DEVELOPERS:
        env.add_webhook_developer(dev, f"http://127.0.0.1:9/{dev}", whsec())


@dataclass
class Harness:
    """A running API and what the test needs around it."""

    env: Any
    app: Any
    client: httpx.AsyncClient
    keys: dict[str, str] = field(default_factory=dict)

    @property
    def state(self) -> ApiState:
        """The app's shared state (its store, producer, topics)."""
        state: ApiState = self.app.state.api
        return state

    @property
    def store(self) -> AuditStore:
        """The app's audit store."""
        return self.state.store

    @property
    def topics(self) -> Topics:
        """The test's topic names."""
        return self.state.topics

    def auth(self, who: str | None) -> dict[str, str]:
        """Headers for ``who`` (a PRINCIPALS name, a literal key, or None: no key)."""
        if who is None:
            return {}
        return {"Authorization": f"Bearer {self.keys.get(who, who)}"}


@asynccontextmanager
async def running_api(env: Any, *, with_registry: bool = True) -> AsyncIterator[Harness]:
    """The API app with its lifespan, an httpx client on it, and a key per principal."""
    if with_registry:
        register(env)
    app = create_app(env.settings())
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            h = Harness(env=env, app=app, client=client)
            for name, (role, subject) in PRINCIPALS.items():
                _, h.keys[name] = await create_key(h.store, role, subject)
            yield h


def declaration(i: int, *, publisher: str = "artfolio", prefix: str = "api",
                targets: Sequence[str] = ("*",)) -> dict[str, Any]:
    """A valid declaration of ``publisher``."""
    return make_decl(i, publisher=publisher, prefix=prefix, targets=targets)


def seed_events(env: Any, decl: dict[str, Any], *, at: datetime) -> tuple[Notice, list[AuditEvent]]:
    """The events the stream writes for a valid declaration: received, normalized,
    and one planned delivery per targeted developer (built by the stage functions)."""
    parsed = parse_declaration(json.dumps(decl).encode())
    notice = normalize(parsed, relayed_at=at)
    events = accept(parsed, notice, at).audit
    plan = plan_deliveries(notice, list(parsed.targets), load_developers(env.connectors), now=at)
    return notice, events + plan.events


def attempt_events(notice: Notice, delivery_id: str, developer_id: str, *, attempt: int,
                   outcome: str, at: datetime) -> list[AuditEvent]:
    """An attempt and its result: ``delivered``, ``retry_scheduled`` or ``failed``."""
    key = notice.declaration_key
    common: dict[str, Any] = {"delivery_id": delivery_id, "developer_id": developer_id,
                              "occurred_at": at, "unique": (attempt,)}
    evs = [audit_event(AuditType.DELIVERY_ATTEMPTED, key, data={
        "attempt": attempt, "status_code": 200 if outcome == "delivered" else 500,
        "channel": "webhook"}, **common)]
    kind = {"delivered": AuditType.DELIVERY_DELIVERED, "failed": AuditType.DELIVERY_FAILED,
            "retry_scheduled": AuditType.DELIVERY_RETRY_SCHEDULED}[outcome]
    data: dict[str, Any] = {"attempt": attempt, "channel": "webhook"}
    if outcome != "delivered":
        data["error"] = "HTTP 500"
    evs.append(audit_event(kind, key, data=data, **common))
    return evs


async def seed(h: Harness, decl: dict[str, Any], *, at: datetime | None = None,
               outcome: str | None = None) -> tuple[Notice, list[str]]:
    """Put a declaration and its deliveries in the store; with ``outcome``, each
    delivery had one attempt with that result. Returns the notice and delivery ids."""
    at = at or datetime.now(UTC)
    notice, events = seed_events(h.env, decl, at=at)
    planned = [e for e in events if e.type is AuditType.DELIVERY_PLANNED]
    if outcome is not None:
        for e in planned:
            assert e.delivery_id
            assert e.developer_id
            events += attempt_events(notice, e.delivery_id, e.developer_id, attempt=1,
                                     outcome=outcome, at=at + timedelta(milliseconds=1))
    await h.store.append(events)
    return notice, [e.delivery_id for e in planned if e.delivery_id]


async def read_topic(bootstrap: str, topic: str, *, want: int = 1, within: float = 20.0,
                     match: Any = None) -> list[Any]:
    """Records really on ``topic`` (from the beginning), until ``want`` of them satisfy
    ``match`` (every record when None) or ``within`` seconds pass."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    found: list[Any] = []
    try:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline and len(found) < want:
            batches = await consumer.getmany(timeout_ms=500)
            for records in batches.values():
                found.extend(r for r in records if match is None or match(r))
        return found
    finally:
        await consumer.stop()
