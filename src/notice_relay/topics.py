"""The Kafka topics of the relay, and their explicit creation.

Topics are created by the relay itself with the partition count it expects, rather
than left to broker auto-creation: a topic auto-created with one partition would
silently cap the parallelism of every stage that reads it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from notice_relay.config import Settings
from notice_relay.errors import KafkaUnavailable

#: The delays of the retry tiers, in seconds. A retry waits in the tier whose delay
#: is the longest not exceeding its remaining wait, then moves to the next tier or to
#: the deliveries topic. Every message in one tier waits the same time, so each tier
#: is consumed in due order and nothing waits behind a later-due message.
RETRY_TIERS: tuple[int, ...] = (1, 5, 30, 120, 600, 3600, 14400)


def tier_name(seconds: int) -> str:
    """``retry-5s``, ``retry-2m``, ``retry-1h``…"""
    if seconds % 3600 == 0:
        return f"retry-{seconds // 3600}h"
    if seconds % 60 == 0:
        return f"retry-{seconds // 60}m"
    return f"retry-{seconds}s"


def tier_for(remaining: float) -> int:
    """The tier (its delay in seconds) for a retry due in ``remaining`` seconds."""
    best = RETRY_TIERS[0]
    for t in RETRY_TIERS:
        if t <= remaining:
            best = t
    return best


@dataclass(frozen=True)
class Topics:
    """Full topic names, each carrying the configured prefix."""

    declarations: str
    rejected: str
    notices: str
    deliveries: str
    acks: str
    audit: str
    retry_tiers: tuple[tuple[int, str], ...]

    @classmethod
    def from_settings(cls, settings: Settings) -> Topics:
        """Topic names for ``settings.topic_prefix``."""
        p = settings.topic_prefix
        names = {n: f"{p}{n}" for n in cls.__dataclass_fields__ if n != "retry_tiers"}
        tiers = tuple((t, f"{p}{tier_name(t)}") for t in RETRY_TIERS)
        return cls(**names, retry_tiers=tiers)

    def all(self) -> list[str]:
        """Every topic name."""
        plain = [getattr(self, n) for n in self.__dataclass_fields__ if n != "retry_tiers"]
        return plain + [name for _, name in self.retry_tiers]


#: The Faust tables of the worker (see app.py); their changelog topics are created with
#: the others, before the worker starts. A worker that creates them itself does not see
#: them in its consumer's metadata until the next refresh, and its normalize agent
#: crashes with PartitionsMismatch on every new artist until then.
TABLES = ("declarations-seen", "artist-versions")


def changelog_topics(settings: Settings) -> list[str]:
    """The changelog topics of the worker's tables (named by Faust: app id, table)."""
    return [f"{settings.app_id}-{table}-changelog" for table in TABLES]


def _topic_config(name: str, topics: Topics) -> dict[str, str]:
    if name == topics.audit:
        # The audit topic is the source of truth: never deleted by age.
        return {"retention.ms": "-1"}
    return {}


async def ensure_topics(
    settings: Settings,
    *,
    timeout: float = 30.0,  # noqa: ASYNC109 - Kafka's request timeout, not a wait on this call
) -> list[str]:
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
        changelogs = changelog_topics(settings)
        wanted = [t for t in [*topics.all(), *changelogs] if t not in existing]
        if wanted:
            new = [
                NewTopic(
                    name=t,
                    num_partitions=settings.partitions,
                    replication_factor=settings.replication_factor,
                    topic_configs=(
                        {"cleanup.policy": "compact"} if t in changelogs
                        else _topic_config(t, topics)
                    ),
                )
                for t in wanted
            ]
            # another worker created it between list and create
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(new)
    except KafkaError as exc:
        raise KafkaUnavailable(
            f"cannot create topics on {settings.kafka_bootstrap}: {exc}"
        ) from exc
    else:
        return wanted
    finally:
        await admin.close()
