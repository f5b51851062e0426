"""Publishing declarations to the declarations topic (the publisher's side)."""

from __future__ import annotations

from collections.abc import Sequence

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from notice_relay.config import Settings
from notice_relay.errors import KafkaUnavailable
from notice_relay.topics import Topics, ensure_topics


async def publish_declarations(
    settings: Settings, items: Sequence[tuple[str | None, bytes]]
) -> int:
    """Publish ``(artist_key, raw)`` pairs; return how many the broker acknowledged.

    Keying by artist keeps one artist's declarations in order, so a withdrawal never
    overtakes the opt-out it withdraws.
    """
    await ensure_topics(settings)
    topic = Topics.from_settings(settings).declarations
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap, acks="all", enable_idempotence=True,
        max_request_size=16 * 1024 * 1024,
    )
    try:
        await producer.start()
    except KafkaError as exc:
        raise KafkaUnavailable(f"cannot reach Kafka at {settings.kafka_bootstrap}: {exc}") from exc
    try:
        futs = [
            await producer.send(topic, value=raw, key=key.encode() if key else None)
            for key, raw in items
        ]
        for f in futs:
            await f
        return len(futs)
    except KafkaError as exc:
        raise KafkaUnavailable(f"publishing failed: {exc}") from exc
    finally:
        await producer.stop()
