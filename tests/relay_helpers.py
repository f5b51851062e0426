"""Helpers shared by the tests that run real workers: declarations, publishing,
and polling the audit store and receivers."""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from aiokafka import AIOKafkaProducer

from notice_relay.audit.store import AuditStore, DeliveryRow
from notice_relay.topics import Topics, ensure_topics


def whsec() -> str:
    """A fresh Standard Webhooks secret."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def make_decl(i: int, *, targets: Sequence[str] = ("*",), uses: Sequence[str] = ("train-ai",),
              publisher: str = "artfolio", prefix: str = "d") -> dict[str, Any]:
    """A valid opt-out declaration."""
    return {
        "schema": "notice-relay/declaration/v1",
        "declaration_id": f"{prefix}-{i:04d}",
        "publisher_id": publisher,
        "action": "opt_out",
        "declared_at": (datetime.now(UTC) - timedelta(seconds=i)).isoformat(),
        "artist": {"artist_id": f"{prefix}-artist-{i}", "display_name": f"Artist {i}"},
        "works": [{"url": f"https://www.artstation.com/artwork/{prefix}{i}"}],
        "uses": list(uses),
        "targets": list(targets),
    }


async def publish(env: Any, decls: Sequence[dict[str, Any] | bytes]) -> None:
    """Publish declarations (dicts as JSON, bytes as they are) to the test's topic."""
    settings = env.settings()
    await ensure_topics(settings)
    topic = Topics.from_settings(settings).declarations
    producer = AIOKafkaProducer(bootstrap_servers=env.bootstrap, acks="all")
    await producer.start()
    try:
        for d in decls:
            if isinstance(d, bytes):
                await producer.send_and_wait(topic, d, key=b"raw")
            else:
                key = f"{d['publisher_id']}/{d['artist']['artist_id']}".encode()
                await producer.send_and_wait(topic, json.dumps(d).encode(), key=key)
    finally:
        await producer.stop()


async def eventually(
    check: Callable[[], Awaitable[bool]] | Callable[[], bool],
    timeout: float,  # noqa: ASYNC109 - a polling deadline for test helpers, read by the loop
    what: str,
    *,
    worker: Any = None,
    interval: float = 0.25,
) -> None:
    """Poll ``check`` (sync or async) until true; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = check()
        if asyncio.iscoroutine(r):
            r = await r
        if r:
            return
        if worker is not None and worker.proc is not None and worker.proc.poll() is not None:
            raise AssertionError(
                f"worker died while waiting for {what}:\n{worker.output()[-5000:]}"
            )
        await asyncio.sleep(interval)
    if worker is not None and worker.proc is not None and worker.proc.poll() is None:
        import signal

        worker.proc.send_signal(signal.SIGUSR1)  # the worker logs its tasks' stacks
        await asyncio.sleep(1)
    extra = ""
    if worker is not None:
        extra = f"\n{await diagnose(worker.env)}\nworker log:\n{worker.output()[-3000:]}"
    raise AssertionError(f"timed out after {timeout}s waiting for {what}{extra}")


async def diagnose(env: Any) -> str:
    """Where a stuck test stands: the consumer group's lag on each topic of the test,
    and the deliveries of the store by state (for the assertion message)."""
    from collections import Counter

    from aiokafka import AIOKafkaConsumer
    from aiokafka.admin import AIOKafkaAdminClient

    lines = []
    admin = AIOKafkaAdminClient(bootstrap_servers=env.bootstrap)
    consumer = AIOKafkaConsumer(bootstrap_servers=env.bootstrap)
    try:
        await admin.start()
        await consumer.start()
        committed = await admin.list_consumer_group_offsets(env.app_id)
        for topic in sorted({tp.topic for tp in await _topic_partitions(consumer, env)}):
            parts = [tp for tp in await _topic_partitions(consumer, env) if tp.topic == topic]
            ends = await consumer.end_offsets(parts)
            row = []
            for tp in sorted(parts, key=lambda t: t.partition):
                meta = committed.get(tp)
                row.append(f"{tp.partition}:{meta.offset if meta else '-'}/{ends[tp]}")
            lines.append(f"  {topic[len(env.prefix):]}: {' '.join(row)}")
    except Exception as exc:  # diagnostics must not hide the failure
        lines.append(f"  (lag unavailable: {exc!r})")
    finally:
        await consumer.stop()
        await admin.close()
    try:
        states = Counter(row.state for row in await deliveries(env))
        lines.append(f"  store deliveries by state: {dict(states)}")
    except Exception as exc:  # diagnostics must not hide the failure
        lines.append(f"  (store unavailable: {exc!r})")
    return "committed/end offsets per partition:\n" + "\n".join(lines)


async def _topic_partitions(consumer: Any, env: Any) -> list[Any]:
    from aiokafka import TopicPartition

    topics = await consumer.topics()
    parts = env.settings().partitions
    return [TopicPartition(t, p) for t in sorted(topics) if t.startswith(env.prefix)
            for p in range(parts)]


async def deliveries(env: Any) -> list[DeliveryRow]:
    """Every delivery row of the test's audit store."""
    store = await AuditStore.open(env.database_url)
    try:
        return await store.all_deliveries()
    finally:
        await store.close()


async def trail_types(env: Any, declaration_key: str) -> list[tuple[str, dict[str, Any]]]:
    """The (type, data) of each event of a declaration's trail."""
    store = await AuditStore.open(env.database_url)
    try:
        return [
            (s.event.type.value, dict(s.event.data)) for s in await store.trail(declaration_key)
        ]
    finally:
        await store.close()
