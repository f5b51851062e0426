"""Rebuilding the audit store from the audit topic, the trail's source of truth.

The store is emptied, then refilled with every event of the audit topic, read from the
beginning of every partition by a consumer without a group (it commits nothing and
disturbs no worker) up to the end offsets captured when the rebuild started: events
produced meanwhile are left to the live projector.

Every event of one declaration lives in one partition (the topic is keyed by
declaration), so appending each partition's events in offset order gives every chain
the order the live projector saw, and hence the same sequence numbers and hashes. The
partitions are interleaved by record timestamp, head by head, which never reorders a
partition and keeps the current-state tables (a channel's last success or failure, which
events of several declarations update) close to what the projector, which also reads the
partitions side by side, produced.

A worker running meanwhile would keep projecting into the store while it is being
rebuilt: stop the workers first, or rebuild into another database.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy as sa
import structlog
from aiokafka import (  # aiokafka ships no py.typed: see [[tool.mypy.overrides]]
    AIOKafkaConsumer,
    ConsumerRecord,
    TopicPartition,
)
from aiokafka.errors import KafkaError

from notice_relay.audit.events import decode_audit
from notice_relay.audit.store import DB_ERRORS, AuditStore, chain_heads, db_reason
from notice_relay.config import Settings
from notice_relay.errors import ConfigError, KafkaUnavailable, StoreError
from notice_relay.models import AuditEvent
from notice_relay.topics import Topics

log = structlog.get_logger("notice_relay.audit.rebuild")

#: How long a partition may yield nothing before its end offset is reached.
STALL_TIMEOUT = 60.0


@dataclass(frozen=True)
class RebuildResult:
    """What a rebuild read and stored."""

    topic: str
    partitions: int
    #: Messages read from the topic (up to the end offsets captured at the start).
    messages: int
    #: Events in them (a message holds one event, or several of one declaration).
    events: int
    #: Events stored: a message repeated by at-least-once delivery is stored once.
    stored: int
    #: Messages that were not audit events (skipped, as the live projector does).
    unreadable: int
    #: Chain heads in the store afterwards: one per declaration (and channel) trail.
    chain_heads: int


async def rebuild(
    settings: Settings,
    store: AuditStore,
    *,
    batch: int = 1000,
    on_start: Callable[[int], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> RebuildResult:
    """Empty ``store`` and refill it from the audit topic of ``settings``.

    ``on_start(total)`` is called once the end offsets are known, before the store is
    emptied, with the number of messages to read; ``on_progress(n)`` after every
    appended batch with the number of messages read in it. Nothing is emptied unless
    the topic was found and its offsets read.

    Raises:
        KafkaUnavailable: the broker cannot be reached, or a partition stalls.
        ConfigError: there is no audit topic under the configured prefix.
        StoreError: the store cannot be written.
    """
    topic = Topics.from_settings(settings).audit
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        client_id=f"{settings.app_id}-audit-rebuild",
    )
    try:
        await consumer.start()
    except KafkaError as exc:
        raise KafkaUnavailable(f"cannot reach Kafka at {settings.kafka_bootstrap}: {exc}") from exc
    try:
        return await _rebuild(consumer, topic, settings, store, batch, on_start, on_progress)
    except KafkaError as exc:
        raise KafkaUnavailable(f"reading {topic} failed: {exc}") from exc
    finally:
        await consumer.stop()


async def _rebuild(
    consumer: AIOKafkaConsumer,
    topic: str,
    settings: Settings,
    store: AuditStore,
    batch: int,
    on_start: Callable[[int], None] | None,
    on_progress: Callable[[int], None] | None,
) -> RebuildResult:
    # consumer.topics() fetches this same metadata but keeps only the names, and
    # partitions_for_topic() knows only topics the consumer already fetched metadata of.
    cluster = await consumer._client.fetch_all_metadata()
    partitions = sorted(cluster.partitions_for_topic(topic) or ())
    if not partitions:
        raise ConfigError(f"there is no topic {topic} on {settings.kafka_bootstrap} "
                          "(is NOTICE_RELAY_TOPIC_PREFIX right?)")
    tps = [TopicPartition(topic, p) for p in partitions]
    consumer.assign(tps)
    begin = await consumer.beginning_offsets(tps)
    end = await consumer.end_offsets(tps)
    total = sum(end[tp] - begin[tp] for tp in tps)
    if on_start is not None:
        on_start(total)
    log.info("audit.rebuild.start", topic=topic, partitions=len(tps), messages=total)

    await store.truncate()
    for tp in tps:
        consumer.seek(tp, begin[tp])
    pending = {tp for tp in tps if end[tp] > begin[tp]}
    for tp in set(tps) - pending:
        consumer.pause(tp)
    heads: dict[TopicPartition, deque[ConsumerRecord[bytes, bytes]]] = {tp: deque() for tp in tps}
    out: list[AuditEvent] = []
    read = stored = unreadable = n_events = 0
    read_since_flush = 0
    last_progress = time.monotonic()

    def finish(tp: TopicPartition) -> None:
        pending.discard(tp)
        consumer.pause(tp)  # stop prefetching what was produced after the start

    async def flush() -> None:
        nonlocal stored, out, read_since_flush
        stored += await store.append(out)
        if on_progress is not None:
            on_progress(read_since_flush)
        out, read_since_flush = [], 0

    while True:
        # Merge by timestamp only when every unfinished partition shows its next
        # record: otherwise a later record of one partition could overtake an
        # earlier one of another that was not fetched yet.
        need = [tp for tp in pending if not heads[tp]]
        if need:
            fetched = await consumer.getmany(*need, timeout_ms=1000, max_records=batch)
            for tp, records in fetched.items():
                for r in records:
                    if r.offset >= end[tp]:
                        finish(tp)
                        break
                    heads[tp].append(r)
                    if r.offset >= end[tp] - 1:
                        finish(tp)
                        break
            for tp in need:
                # Offsets can have gaps (transaction markers): done when the position
                # passed the end even if no record said so.
                if tp in pending and not heads[tp] and await consumer.position(tp) >= end[tp]:
                    finish(tp)
            if fetched:
                last_progress = time.monotonic()
            elif time.monotonic() - last_progress > STALL_TIMEOUT:
                raise KafkaUnavailable(
                    f"no records from {', '.join(str(tp.partition) for tp in need)} of {topic} "
                    f"for {STALL_TIMEOUT:.0f} s before their end offsets"
                )
            continue
        live = [tp for tp in tps if heads[tp]]
        if not live:
            break
        tp = min(live, key=lambda t: (heads[t][0].timestamp, t.partition))
        record = heads[tp].popleft()
        read += 1
        read_since_flush += 1
        try:
            found = decode_audit(record.value or b"")
        except ValueError as exc:  # pydantic's ValidationError included
            unreadable += 1
            log.error("audit.unreadable", partition=tp.partition, offset=record.offset,  # noqa: TRY400 - a bad message, not a bug: no traceback
                      error=str(exc)[:300])
        else:
            out += found
            n_events += len(found)
        if len(out) >= batch:
            await flush()
    if read_since_flush:
        await flush()

    try:
        async with store.engine.connect() as conn:
            n_heads = int((await conn.execute(
                sa.select(sa.func.count()).select_from(chain_heads))).scalar_one())
    except DB_ERRORS as exc:
        raise StoreError(f"cannot read the audit store: {db_reason(exc)}") from exc
    result = RebuildResult(topic=topic, partitions=len(tps), messages=read, events=n_events,
                           stored=stored,
                           unreadable=unreadable, chain_heads=n_heads)
    log.info("audit.rebuild.done", **{k: v for k, v in vars(result).items() if k != "topic"})
    return result


async def running_workers(settings: Settings, *, request_timeout: float = 10.0) -> int:
    """How many members the workers' consumer group has right now (0 when none run, or
    when that cannot be told: the warning printed before a rebuild still stands)."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap,
                                request_timeout_ms=int(request_timeout * 1000))
    try:
        await admin.start()
    except KafkaError as exc:
        raise KafkaUnavailable(f"cannot reach Kafka at {settings.kafka_bootstrap}: {exc}") from exc
    try:
        responses = await admin.describe_consumer_groups([settings.app_id])
    except KafkaError as exc:
        log.warning("audit.rebuild.group_unknown", group=settings.app_id, error=str(exc)[:300])
        return 0
    finally:
        await admin.close()
    members = 0
    for response in responses:
        # DescribeGroups: (error_code, group_id, state, protocol_type, protocol, members, …)
        for group in getattr(response, "groups", ()):
            if len(group) > 5 and group[1] == settings.app_id:
                members += len(group[5])
    return members
