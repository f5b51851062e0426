"""One long-lived Kafka producer for the API process (and the CLI's replays).

Opening a producer costs a metadata round trip and a connection; the API keeps one
for its whole life, started in its lifespan. When Kafka is down at start-up the API
still starts — reads, health and metrics do not need Kafka — and keeps trying to
start the producer in the background; until it has, ``/readyz`` says not ready and
writes answer 503. aiokafka errors are translated here, in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

import structlog

# aiokafka ships no type information (the ignores stay harmless once mypy is told so).
from aiokafka import AIOKafkaProducer  # type: ignore[import-untyped, unused-ignore]
from aiokafka.errors import (  # type: ignore[import-untyped, unused-ignore]
    KafkaError,
    MessageSizeTooLargeError,
    RecordTooLargeError,
)

from notice_relay.config import Settings
from notice_relay.errors import KafkaUnavailable, NoticeRelayError
from notice_relay.topics import ensure_topics

log = structlog.get_logger("notice_relay.api")

#: The largest request the producer sends (a declaration is at most 8 MiB).
MAX_REQUEST_SIZE = 16 * 1024 * 1024


class MessageTooLarge(NoticeRelayError):
    """The broker (or the producer) refused a record for its size."""


class RelayProducer:
    """An idempotent, ``acks=all`` producer that is started once and shared."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._producer: AIOKafkaProducer | None = None
        self._retry: asyncio.Task[None] | None = None

    @property
    def started(self) -> bool:
        """Whether records can be sent now."""
        return self._producer is not None

    async def start(self, *, connect_timeout: float = 30.0) -> None:
        """Create the relay's topics if missing and start the producer."""
        if self._producer is not None:
            return
        await ensure_topics(self.settings, timeout=connect_timeout)
        producer = AIOKafkaProducer(
            bootstrap_servers=self.settings.kafka_bootstrap, acks="all",
            enable_idempotence=True, max_request_size=MAX_REQUEST_SIZE,
            # Declarations are JSON: compressed, most large ones fit the broker's
            # default 1 MiB message limit.
            compression_type="gzip", request_timeout_ms=int(connect_timeout * 1000),
        )
        try:
            await producer.start()
        except KafkaError as exc:
            with contextlib.suppress(KafkaError):
                await producer.stop()
            raise KafkaUnavailable(
                f"cannot reach Kafka at {self.settings.kafka_bootstrap}: {exc}") from exc
        self._producer = producer

    async def start_or_keep_trying(self, *, first_timeout: float = 10.0) -> None:
        """Start now if Kafka answers; otherwise keep trying in the background."""
        try:
            await self.start(connect_timeout=first_timeout)
        except KafkaUnavailable as exc:
            log.warning("api.kafka_unavailable", error=str(exc)[:300])
            self._retry = asyncio.create_task(self._keep_trying())

    async def _keep_trying(self) -> None:
        delay = 1.0
        while self._producer is None:
            await asyncio.sleep(delay)
            try:
                await self.start()
            except KafkaUnavailable as exc:
                log.warning("api.kafka_unavailable", error=str(exc)[:300], retry_in=delay)
                delay = min(delay * 2, 30.0)
        log.info("api.kafka_started")

    async def send_many(self, topic: str, items: Sequence[tuple[bytes, bytes]]) -> None:
        """Send ``(key, value)`` pairs; return once the broker has acknowledged all."""
        producer = self._producer
        if producer is None:
            raise KafkaUnavailable("the Kafka producer is not started (is Kafka reachable?)")
        try:
            futures = [await producer.send(topic, value=value, key=key) for key, value in items]
            for f in futures:
                await f
        except (MessageSizeTooLargeError, RecordTooLargeError) as exc:
            raise MessageTooLarge(f"the broker refused a record for its size: {exc}") from exc
        except KafkaError as exc:
            raise KafkaUnavailable(f"publishing to {topic} failed: {exc}") from exc

    async def send(self, topic: str, key: bytes, value: bytes) -> None:
        """Send one record and wait for the broker."""
        await self.send_many(topic, [(key, value)])

    async def stop(self) -> None:
        """Stop retrying and flush and close the producer."""
        if self._retry is not None:
            self._retry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retry
            self._retry = None
        if self._producer is not None:
            producer, self._producer = self._producer, None
            with contextlib.suppress(KafkaError):
                await producer.stop()
