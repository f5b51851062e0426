"""The channels topic: every worker's shared view of channel health.

A small compacted topic keyed by ``developer_id/channel``. Each worker reads it from
the beginning at start-up and follows it; a change (a 410, a failure streak, an
operator's enable) is written to it and so reaches every worker.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError
from pydantic import ValidationError

from notice_relay.config import Settings
from notice_relay.errors import KafkaUnavailable
from notice_relay.health import ChannelHealth
from notice_relay.topics import Topics

log = structlog.get_logger("notice_relay.channels")

Sender = Callable[[str, bytes], Awaitable[object]]


class ChannelStates:
    """The latest :class:`ChannelHealth` of every channel, kept current."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topic = Topics.from_settings(settings).channels
        self.states: dict[str, ChannelHealth] = {}
        self.ready = asyncio.Event()
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None

    def get(self, developer_id: str, channel: str) -> ChannelHealth:
        """The state of a channel (enabled, with no history, when never recorded)."""
        return self.states.get(f"{developer_id}/{channel}") or ChannelHealth(
            developer_id=developer_id, channel=channel)

    def apply(self, raw: bytes | None, key: bytes | None) -> None:
        """Take one record of the topic into the view."""
        if raw is None:
            if key is not None:
                self.states.pop(key.decode(), None)
            return
        try:
            h = ChannelHealth.model_validate_json(raw)
        except ValidationError:
            log.error("channels.unreadable_record")
            return
        self.states[h.key] = h

    async def load(self) -> None:
        """Read the topic from the beginning to its current end."""
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.kafka_bootstrap, group_id=None,
            enable_auto_commit=False, auto_offset_reset="earliest",
        )
        try:
            await consumer.start()
        except KafkaError as exc:
            raise KafkaUnavailable(f"cannot read {self.topic}: {exc}") from exc
        self._consumer = consumer
        parts = consumer.partitions_for_topic(self.topic) or {0}
        tps = [TopicPartition(self.topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        async def behind() -> bool:
            return any([await consumer.position(tp) < end[tp] for tp in tps])

        while await behind():
            batch = await consumer.getmany(*tps, timeout_ms=500)
            for msgs in batch.values():
                for m in msgs:
                    self.apply(m.value, m.key)
        self.ready.set()

    async def follow(self) -> None:
        """Keep the view current until cancelled."""
        assert self._consumer is not None
        while True:
            try:
                batch = await self._consumer.getmany(timeout_ms=1000)
            except KafkaError as exc:
                log.warning("channels.read_failed", error=str(exc))
                await asyncio.sleep(1)
                continue
            for msgs in batch.values():
                for m in msgs:
                    self.apply(m.value, m.key)

    async def start(self) -> None:
        """Load, then follow in the background."""
        await self.load()
        self._task = asyncio.create_task(self.follow())

    async def stop(self) -> None:
        """Stop following."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._consumer is not None:
            await self._consumer.stop()

    async def put(self, health: ChannelHealth, send: Sender) -> None:
        """Record a new state: locally at once, and on the topic for every worker."""
        self.states[health.key] = health
        await send(health.key, health.model_dump_json().encode())


async def read_all(settings: Settings) -> dict[str, ChannelHealth]:
    """The current state of every recorded channel (for the CLI)."""
    states = ChannelStates(settings)
    await states.load()
    await states.stop()
    return states.states


async def publish(settings: Settings, health: ChannelHealth) -> None:
    """Write one channel state to the channels topic (for the CLI)."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    try:
        await producer.start()
        await producer.send_and_wait(Topics.from_settings(settings).channels,
                                     health.model_dump_json().encode(), key=health.key.encode())
    except KafkaError as exc:
        raise KafkaUnavailable(f"cannot write the channel state: {exc}") from exc
    finally:
        await producer.stop()


def now() -> datetime:
    """Now, in UTC."""
    return datetime.now(UTC)
