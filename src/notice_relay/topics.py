"""The Kafka topics of the relay, and their explicit creation.

Topics are created by the relay itself with the partition count it expects, rather
than left to broker auto-creation: a topic auto-created with one partition would
silently cap the parallelism of every stage that reads it.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from notice_relay.config import Settings
from notice_relay.errors import KafkaUnavailable


@dataclass(frozen=True)
class Topics:
    """Full topic names, each carrying the configured prefix."""

    declarations: str
    rejected: str
    notices: str
    deliveries: str
    retries: str
    outcomes: str
    acks: str
    audit: str

    @classmethod
    def from_settings(cls, settings: Settings) -> Topics:
        """Topic names for ``settings.topic_prefix``."""
        p = settings.topic_prefix
        return cls(**{name: f"{p}{name}" for name in cls.__dataclass_fields__})

    def all(self) -> list[str]:
        """Every topic name."""
        return [getattr(self, name) for name in self.__dataclass_fields__]


async def ensure_topics(settings: Settings, *, timeout: float = 30.0) -> list[str]:
    """Create the relay's topics that do not exist yet; return the ones created."""
    topics = Topics.from_settings(settings)
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.kafka_bootstrap, request_timeout_ms=int(timeout * 1000)
    )
    try:
        await admin.start()
    except KafkaError as exc:
        raise KafkaUnavailable(f"cannot reach Kafka at {settings.kafka_bootstrap}: {exc}") from exc
    try:
        existing = set(await admin.list_topics())
        wanted = [t for t in topics.all() if t not in existing]
        if wanted:
            new = [
                NewTopic(
                    name=t,
                    num_partitions=settings.partitions,
                    replication_factor=settings.replication_factor,
                    # The audit topic is the source of truth: it is never deleted by age.
                    topic_configs={"retention.ms": "-1"} if t == topics.audit else {},
                )
                for t in wanted
            ]
            try:
                await admin.create_topics(new)
            except TopicAlreadyExistsError:
                pass  # another worker created it between list and create
        return wanted
    except KafkaError as exc:
        raise KafkaUnavailable(f"cannot create topics on {settings.kafka_bootstrap}: {exc}") from exc
    finally:
        await admin.close()
