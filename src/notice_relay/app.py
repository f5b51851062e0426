"""The Faust app: the stream stages wired to their topics.

Stages (each a Faust agent, each a thin shell around :mod:`notice_relay.stages`):

- ``normalize``  declarations → notices | rejected, + audit
- ``fanout``     notices → deliveries, + audit
- ``deliver``    deliveries → outcomes (the only stage that talks to developers)
- ``outcomes``   outcomes → retries, + audit (delivered / retry_scheduled / failed)
- ``retry``      retries → deliveries, when each task is due
- ``project``    audit → the audit store

Every agent runs with concurrency 1. Parallelism inside ``deliver`` comes from
sending a whole batch (``stream.take``) concurrently; Faust acks the batch's events
only after the loop body has produced their outcomes, and flushes the producer
before it commits, so an offset is never committed past a task still in flight
(faust-streaming issue 606 is about agent concurrency > 1, which we do not use).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from datetime import timedelta
from typing import Any

import faust
import structlog
from pydantic import ValidationError

from notice_relay.audit.store import AuditStore
from notice_relay.channels import build_channel
from notice_relay.channels.base import Channel
from notice_relay.config import Settings
from notice_relay.connectors import Developer, Publisher, load_developers, load_publishers
from notice_relay.errors import DeclarationInvalid, NoticeRelayError, StoreError
from notice_relay.fanout import plan_deliveries
from notice_relay.models import AuditEvent, ChannelType, DeliveryTask, Outcome
from notice_relay.normalize import normalize
from notice_relay.stages import (
    DEFAULT_RETRY_SCHEDULE,
    OutcomeRecord,
    Out,
    RelayedNotice,
    accept,
    duplicate,
    on_outcome,
    reject,
    utcnow,
)
from notice_relay.topics import Topics
from notice_relay.validate import parse_declaration

log = structlog.get_logger("notice_relay.worker")

#: Channel types this worker can deliver over.
SUPPORTED_CHANNELS: tuple[ChannelType, ...] = (ChannelType.WEBHOOK,)


class Runtime:
    """What the agents share: the registry, the channels and the store."""

    def __init__(self, settings: Settings, developers: dict[str, Developer],
                 publishers: dict[str, Publisher]) -> None:
        self.settings = settings
        self.developers = developers
        self.publishers = publishers
        self.channels: dict[tuple[str, str], Channel] = {}
        self._store: AuditStore | None = None
        self._store_lock = asyncio.Lock()

    @classmethod
    def load(cls, settings: Settings) -> Runtime:
        """Load and validate the registry; a broken file raises ConnectorConfigError."""
        return cls(settings, load_developers(settings.connectors_dir),
                   load_publishers(settings.publishers_file))

    def build_channels(self) -> None:
        """Create one channel object per enabled, supported channel (secrets resolved
        now, so that a missing secret stops the worker at start-up, not mid-stream)."""
        for dev in self.developers.values():
            for cfg in dev.channels:
                if ChannelType(cfg.type) in SUPPORTED_CHANNELS:
                    self.channels[(dev.id, cfg.name)] = build_channel(dev, cfg)

    def schedule_for(self, task: DeliveryTask) -> Sequence[timedelta]:
        """The retry schedule of a task's channel."""
        dev = self.developers.get(task.developer_id)
        if dev is not None:
            for cfg in dev.channels:
                if cfg.name == task.channel and cfg.retry_schedule:
                    return list(cfg.retry_schedule)
        return DEFAULT_RETRY_SCHEDULE

    async def store(self) -> AuditStore:
        """The audit store, opened on first use."""
        async with self._store_lock:
            if self._store is None:
                self._store = await AuditStore.open(self.settings.database_url)
            return self._store

    async def close(self) -> None:
        """Close channels and the store."""
        for ch in self.channels.values():
            with contextlib.suppress(Exception):
                await ch.aclose()
        if self._store is not None:
            await self._store.close()


def _raw_topic(app: faust.App, name: str, partitions: int) -> Any:
    return app.topic(name, key_type=bytes, value_type=bytes, key_serializer="raw",
                     value_serializer="raw", partitions=partitions)


def create_app(settings: Settings, runtime: Runtime | None = None) -> faust.App:
    """Build the Faust app for ``settings``."""
    rt = runtime or Runtime.load(settings)
    app = faust.App(
        settings.app_id,
        broker=[f"kafka://{h.strip()}" for h in settings.kafka_bootstrap.split(",")],
        store="memory://",
        datadir=str(settings.data_dir),
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        web_enabled=False,
        # Commit often: fewer notices are re-sent after a crash (receivers dedupe on
        # webhook-id, but fewer duplicates is kinder).
        broker_commit_interval=1.0,
        stream_wait_empty=False,
        table_standby_replicas=0,
        processing_guarantee="at_least_once",
    )
    app.runtime = rt  # type: ignore[attr-defined]
    topics = Topics.from_settings(settings)
    parts = settings.partitions
    t_declarations = _raw_topic(app, topics.declarations, parts)
    t_rejected = _raw_topic(app, topics.rejected, parts)
    t_notices = _raw_topic(app, topics.notices, parts)
    t_deliveries = _raw_topic(app, topics.deliveries, parts)
    t_retries = _raw_topic(app, topics.retries, parts)
    t_outcomes = _raw_topic(app, topics.outcomes, parts)
    t_audit = _raw_topic(app, topics.audit, parts)

    # Both tables are keyed by something the declarations topic is partitioned by
    # (the artist), so a table entry lives in the partition of the message that set it.
    seen = app.Table("declarations-seen", default=None, partitions=parts)
    versions = app.Table("artist-versions", default=int, partitions=parts)

    async def send_out(out: Out) -> list[Any]:
        futs = []
        for key, rej in out.rejected:
            futs.append(await t_rejected.send(key=key.encode(), value=rej.model_dump_json().encode()))
        for key, rn in out.notices:
            futs.append(await t_notices.send(key=key.encode(), value=rn.model_dump_json().encode()))
        for task in out.deliveries:
            futs.append(await t_deliveries.send(key=task.delivery_id.encode(),
                                                value=task.model_dump_json().encode()))
        for task in out.retries:
            futs.append(await t_retries.send(key=task.delivery_id.encode(),
                                             value=task.model_dump_json().encode()))
        for ev in out.audit:
            futs.append(await t_audit.send(key=ev.declaration_key.encode(),
                                           value=ev.model_dump_json().encode()))
        return futs

    @app.agent(t_declarations, name="normalize")
    async def normalize_agent(stream: faust.StreamT[bytes]) -> AsyncIterator[None]:
        async for event in stream.events():
            raw: bytes = event.value or b""
            key = event.key.decode("utf-8", "replace") if event.key else None
            now = utcnow()
            try:
                decl = parse_declaration(raw, publishers=rt.publishers, developers=rt.developers)
            except DeclarationInvalid as exc:
                log.info("declaration.rejected", reason=exc.reason, key=key)
                await send_out(reject(raw, key, exc, now))
                continue
            version = versions[decl.artist_key] + 1
            notice = normalize(decl, relayed_at=now, version=version)
            first = seen.get(decl.declaration_key)
            if first is not None:
                log.info("declaration.duplicate", declaration=decl.declaration_key)
                await send_out(duplicate(decl, notice.fingerprint, first, now))
                continue
            futs = await send_out(accept(decl, notice, now))
            # Mark the declaration seen only once its notice is on the broker: a crash
            # in between relays it again (harmless: delivery ids are stable) rather than
            # never.
            await asyncio.gather(*futs)
            seen[decl.declaration_key] = notice.fingerprint
            versions[decl.artist_key] = version
            yield None

    @app.agent(t_notices, name="fanout")
    async def fanout_agent(stream: faust.StreamT[bytes]) -> AsyncIterator[None]:
        async for raw in stream:
            try:
                relayed = RelayedNotice.model_validate_json(raw)
            except ValidationError as exc:
                log.error("notice.unreadable", error=str(exc)[:500])
                continue
            plan = plan_deliveries(relayed.notice, relayed.targets, rt.developers,
                                   now=utcnow(), supported=SUPPORTED_CHANNELS)
            await send_out(Out(deliveries=plan.tasks, audit=plan.events))
            yield None

    async def deliver_batch(tasks: list[DeliveryTask]) -> list[tuple[DeliveryTask, Outcome]]:
        groups: dict[tuple[str, str], list[DeliveryTask]] = defaultdict(list)
        for t in tasks:
            groups[(t.developer_id, t.channel)].append(t)

        async def run(key: tuple[str, str], group: list[DeliveryTask]) -> list[Outcome]:
            ch = rt.channels.get(key)
            if ch is None:
                return [Outcome.permanent(t, f"channel {key[0]}/{key[1]} is no longer configured")
                        for t in group]
            try:
                return await ch.send(group)
            except Exception as exc:  # a channel bug must not stop other channels
                log.exception("channel.crashed", developer=key[0], channel=key[1])
                return [Outcome.transient(t, f"internal error in channel: {exc!r}") for t in group]

        keys = list(groups)
        results = await asyncio.gather(*(run(k, groups[k]) for k in keys))
        pairs: list[tuple[DeliveryTask, Outcome]] = []
        for k, outs in zip(keys, results, strict=True):
            pairs.extend(zip(groups[k], outs, strict=True))
        return pairs

    @app.agent(t_deliveries, name="deliver")
    async def deliver_agent(stream: faust.StreamT[bytes]) -> AsyncIterator[None]:
        async for batch in stream.take(settings.deliver_batch, within=settings.deliver_batch_wait):
            tasks = []
            for raw in batch:
                try:
                    tasks.append(DeliveryTask.model_validate_json(raw))
                except ValidationError as exc:
                    log.error("delivery.unreadable", error=str(exc)[:500])
            for task, outcome in await deliver_batch(tasks):
                await t_outcomes.send(
                    key=task.delivery_id.encode(),
                    value=OutcomeRecord(task=task, outcome=outcome).model_dump_json().encode(),
                )
            yield None

    @app.agent(t_outcomes, name="outcomes")
    async def outcomes_agent(stream: faust.StreamT[bytes]) -> AsyncIterator[None]:
        async for batch in stream.take(500, within=0.05):
            for raw in batch:
                try:
                    rec = OutcomeRecord.model_validate_json(raw)
                except ValidationError as exc:
                    log.error("outcome.unreadable", error=str(exc)[:500])
                    continue
                await send_out(on_outcome(rec.task, rec.outcome, schedule=rt.schedule_for(rec.task)))
            yield None

    @app.agent(t_retries, name="retry")
    async def retry_agent(stream: faust.StreamT[bytes]) -> AsyncIterator[None]:
        async for raw in stream:
            try:
                task = DeliveryTask.model_validate_json(raw)
            except ValidationError as exc:
                log.error("retry.unreadable", error=str(exc)[:500])
                continue
            if task.not_before is not None:
                wait = (task.not_before - utcnow()).total_seconds()
                if wait > 0:
                    await asyncio.sleep(wait)
            await t_deliveries.send(key=task.delivery_id.encode(), value=raw)
            yield None

    @app.agent(t_audit, name="project")
    async def project_agent(stream: faust.StreamT[bytes]) -> AsyncIterator[None]:
        store = await rt.store()
        async for batch in stream.take(settings.audit_batch, within=settings.audit_batch_wait):
            events: list[AuditEvent] = []
            for raw in batch:
                try:
                    events.append(AuditEvent.model_validate_json(raw))
                except ValidationError as exc:
                    log.error("audit.unreadable", error=str(exc)[:500])
            delay = 0.5
            while True:
                try:
                    await store.append(events)
                    break
                except StoreError as exc:
                    # The store being down must not lose events: hold the batch (its
                    # offsets stay uncommitted) and try again until it is back.
                    log.warning("audit.store_unavailable", error=str(exc)[:300], retry_in=delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 30.0)
            yield None

    @app.on_before_shutdown.connect
    async def _close(app: faust.App, **_: Any) -> None:
        await rt.close()

    return app


def run_worker(settings: Settings, *, loglevel: str = "warning") -> None:
    """Create the topics, load the registry and run a worker until it is stopped."""
    from notice_relay.topics import ensure_topics

    rt = Runtime.load(settings)
    rt.build_channels()
    asyncio.run(ensure_topics(settings))
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    app = create_app(settings, rt)
    worker = faust.Worker(app, loglevel=loglevel, quiet=True)
    try:
        worker.execute_from_commandline()
    except NoticeRelayError:
        raise
