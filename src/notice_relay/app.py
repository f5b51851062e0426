"""The Faust app: the stream stages wired to their topics.

Stages (each a Faust agent, each a thin shell around :mod:`notice_relay.stages`):

- ``normalize``  declarations → notices | rejected, + audit
- ``fanout``     notices → deliveries, + audit
- ``deliver``    deliveries → retries, + audit (attempted, then delivered /
                 retry_scheduled / failed); the only stage that talks to developers
- ``retry``      retries → deliveries, when each task is due
- ``project``    audit → the audit store

Every agent runs with concurrency 1. Parallelism inside ``deliver`` comes from the
per-channel lanes: each task is acked when what its outcome leads to (audit events, a
retry) is handed to the producer, in any order, and
:class:`notice_relay.safe_offsets.SafeConsumer` commits only a run of processed offsets
that starts at the partition's head, so an offset is never committed past a task still
in flight (see docs/architecture.md, "At-least-once").
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, cast

import faust
import structlog
from pydantic import ValidationError

from notice_relay import tablestore, workdir
from notice_relay.acks import AckRecord, ack_url, load_ack_secret, make_token
from notice_relay.audit import worker_queries
from notice_relay.audit.events import audit_event, decode_audit, encode_audit
from notice_relay.audit.store import AuditStore
from notice_relay.channels import build_channel
from notice_relay.channels.base import Channel
from notice_relay.channelstate import ChannelStates
from notice_relay.coalesce import Coalescer
from notice_relay.config import Settings
from notice_relay.connectors import Developer, Publisher, load_developers, load_publishers
from notice_relay.errors import DeclarationInvalid, StoreError
from notice_relay.fanout import delivery_id as make_delivery_id
from notice_relay.fanout import plan_deliveries
from notice_relay.health import ChannelHealth, after_outcome
from notice_relay.lanes import Admission, Lane, LaneSettings
from notice_relay.memory import NativeHeap, python_allocator
from notice_relay.models import (
    AckInfo,
    Action,
    Actor,
    ActorKind,
    AuditEvent,
    AuditType,
    ChannelType,
    DeliveryTask,
    Notice,
    Outcome,
)
from notice_relay.normalize import normalize
from notice_relay.normalize import notice_id as make_notice_id
from notice_relay.safe_offsets import RelayApp
from notice_relay.stages import (
    DEFAULT_RETRY_SCHEDULE,
    Out,
    RelayedNotice,
    accept,
    duplicate,
    on_outcome,
    reject,
    utcnow,
)
from notice_relay.stopping import BoundedWorker
from notice_relay.topics import Topics, tier_for
from notice_relay.validate import parse_declaration
from notice_relay.withdrawals import Withdrawals

log = structlog.get_logger("notice_relay.worker")

#: Seconds during which lanes' finished chunks are gathered into one send (see
#: coalesce.py): a declaration's deliveries, finishing in several lanes, then record
#: their events in one audit message. A few milliseconds added to each acknowledgement.
REPORT_WINDOW = 0.005

#: Libraries whose loggers get the worker's level explicitly.
QUIET_LIBRARIES = ("aiosqlite", "aiokafka", "faust", "mode", "httpcore", "httpx", "aiohttp",
                   "sqlalchemy", "asyncio")

#: Channel types this worker can deliver over.
SUPPORTED_CHANNELS: tuple[ChannelType, ...] = (
    ChannelType.WEBHOOK,
    ChannelType.EMAIL,
    ChannelType.REGISTRY,
)


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
        self.states: ChannelStates | None = None
        self.ack_secret = b""
        self.background: set[asyncio.Future[None]] = set()
        self.closers: list[Callable[[], Awaitable[None]]] = []

    @classmethod
    def load(cls, settings: Settings) -> Runtime:
        """Load and validate the registry; a broken file raises ConnectorConfigError."""
        rt = cls(settings, load_developers(settings.connectors_dir),
                 load_publishers(settings.publishers_file))
        rt.ack_secret = load_ack_secret(settings.data_dir)
        return rt

    def ack_for(self, delivery_id: str, developer: Developer, planned_at: datetime) -> AckInfo:
        """The ack block of one delivery: a link with a token scoped to it, and the due
        date from the developer's ``ack_sla``. Deterministic, so a reminder or a
        re-planned delivery carries the same link."""
        due = planned_at + developer.ack_sla
        token = make_token(
            self.ack_secret, delivery_id, developer.id, due + self.settings.ack_grace
        )
        return AckInfo(url=ack_url(self.settings.public_url, token), due_by=due)

    def build_channels(self) -> None:
        """Create one channel object per enabled, supported channel (secrets resolved
        now, so that a missing secret stops the worker at start-up, not mid-stream)."""
        for dev in self.developers.values():
            for cfg in dev.channels:
                if ChannelType(cfg.type) in SUPPORTED_CHANNELS:
                    self.channels[(dev.id, cfg.name)] = build_channel(dev, cfg)

    def schedule_for(self, task: DeliveryTask) -> Sequence[timedelta]:
        """The retry schedule of a task's channel (else the global one, else the default)."""
        dev = self.developers.get(task.developer_id)
        if dev is not None:
            for cfg in dev.channels:
                if cfg.name == task.channel and cfg.retry_schedule:
                    return list(cfg.retry_schedule)
        return self.settings.retry_schedule or DEFAULT_RETRY_SCHEDULE

    def lane_settings(self, key: tuple[str, str]) -> LaneSettings:
        """The lane bounds of a channel (a digest window for email channels)."""
        ch = self.channels.get(key)
        window = getattr(ch, "digest_window", None)
        max_batch = getattr(ch, "max_per_digest", 64)
        return LaneSettings(
            breaker_threshold=self.settings.breaker_threshold,
            breaker_cooldown=self.settings.breaker_cooldown.total_seconds(),
            digest_window=window.total_seconds() if isinstance(window, timedelta) else 0.0,
            max_batch=int(max_batch),
            capacity=max(256, 2 * int(max_batch)),
        )

    async def store(self) -> AuditStore:
        """The audit store, opened on first use."""
        async with self._store_lock:
            if self._store is None:
                self._store = await AuditStore.open(self.settings.database_url, warm_pool=True)
            return self._store

    async def store_when_up(self) -> AuditStore:
        """The audit store, waiting (and logging) while it cannot be opened: an agent
        that needs it holds its messages, uncommitted, until the database is back."""
        delay = 0.5
        while True:
            try:
                return await self.store()
            except StoreError as exc:
                log.warning("store.unavailable", error=str(exc)[:300], retry_in=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    async def close(self) -> None:
        """Close lanes, channels and the store."""
        for closer in self.closers:
            with contextlib.suppress(Exception):
                await closer()
        for ch in self.channels.values():
            with contextlib.suppress(Exception):
                await ch.aclose()
        if self._store is not None:
            await self._store.close()


def held_event(task: DeliveryTask, reason: str | None) -> AuditEvent:
    """The audit event of a delivery held because its channel is disabled."""
    return audit_event(
        AuditType.DELIVERY_HELD,
        task.declaration_key,
        unique=(task.attempt,),
        delivery_id=task.delivery_id,
        developer_id=task.developer_id,
        data={
            "channel": task.channel,
            "reason": f"channel disabled: {reason or 'no reason given'}",
        },
    )


def channel_event(health: ChannelHealth, at: datetime, actor: Actor | None = None) -> AuditEvent:
    """The audit event of a channel being disabled or enabled (in the channel's own trail)."""
    kind = AuditType.CHANNEL_ENABLED if health.enabled else AuditType.CHANNEL_DISABLED
    return audit_event(
        kind, f"_channel/{health.key}", unique=(at.isoformat(),), developer_id=health.developer_id,
        actor=actor or Actor(kind=ActorKind.SYSTEM, id="notice-relay"), occurred_at=at,
        data={"channel": health.channel, "reason": health.reason, "last_error": health.last_error},
    )


def _raw_topic(app: faust.App, name: str, partitions: int) -> Any:
    return app.topic(name, key_type=bytes, value_type=bytes, key_serializer="raw",
                     value_serializer="raw", partitions=partitions)


#: RocksDB options of each table partition's database. Faust's defaults (64 MiB
#: write buffers, 2 GiB block cache) are sized for one big table on a dedicated
#: host; here a worker holds two databases per partition of entries of about 100
#: bytes, looked up mostly for keys that are not there (the bloom filter answers).
#: All of them share one memory budget (``memory``, set from
#: ``Settings.table_memory_mib``; :mod:`notice_relay.tablestore`) that holds their
#: blocks, index and filter blocks included, and their write buffers.
ROCKSDB_OPTIONS: dict[str, Any] = {
    "driver": "rocksdict",
    "write_buffer_size": 256 << 10,
    "max_write_buffer_number": 2,
    "target_file_size_base": 16 << 20,
    "max_open_files": 64,
}


def create_app(settings: Settings, runtime: Runtime | None = None, *,
               datadir: Path | None = None) -> faust.App:
    """Build the Faust app for ``settings``; its tables live under ``datadir``
    (default ``settings.data_dir``; a running worker passes the directory it claimed,
    see :mod:`notice_relay.workdir`)."""
    rt = runtime or Runtime.load(settings)
    rocksdb = settings.table_store == "rocksdb"
    tablestore.register()
    table_options = {**ROCKSDB_OPTIONS, "memory": settings.table_memory_mib << 20}
    app = RelayApp(
        settings.app_id,
        broker=[f"kafka://{h.strip()}" for h in settings.kafka_bootstrap.split(",")],
        store=tablestore.STORE_URL if rocksdb else "memory://",
        datadir=str(datadir or settings.data_dir),
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
        broker_session_timeout=settings.session_timeout.total_seconds(),
        broker_heartbeat_interval=min(3.0, settings.session_timeout.total_seconds() / 3),
        processing_guarantee="at_least_once",
    )
    app.runtime = rt  # type: ignore[attr-defined]
    topics = Topics.from_settings(settings)
    parts = settings.partitions
    t_declarations = _raw_topic(app, topics.declarations, parts)
    t_rejected = _raw_topic(app, topics.rejected, parts)
    t_notices = _raw_topic(app, topics.notices, parts)
    t_deliveries = _raw_topic(app, topics.deliveries, parts)
    t_audit = _raw_topic(app, topics.audit, parts)

    # Both tables are keyed by something the declarations topic is partitioned by
    # (the artist), so a table entry lives in the partition of the message that set it.
    # (Faust pops its keys from ``options``: each table gets a copy of its own.)
    seen = app.Table("declarations-seen", default=None, partitions=parts,
                     options=dict(table_options) if rocksdb else None)
    versions = app.Table("artist-versions", default=int, partitions=parts,
                         options=dict(table_options) if rocksdb else None)

    retry_topics = {seconds: _raw_topic(app, name, parts) for seconds, name in topics.retry_tiers}
    states = ChannelStates(rt.store)
    rt.states = states
    withdrawals = Withdrawals(rt.store)

    async def schedule(task: DeliveryTask, due: datetime) -> Any:
        """Put a task in the retry tier for its remaining wait (durable, in Kafka)."""
        task = task.model_copy(update={"not_before": due})
        tier = tier_for((due - utcnow()).total_seconds())
        return await retry_topics[tier].send(key=task.delivery_id.encode(),
                                             value=task.model_dump_json().encode())

    async def send_out(out: Out) -> list[Any]:
        futs = []
        for key, rej in out.rejected:
            futs.append(
                await t_rejected.send(key=key.encode(), value=rej.model_dump_json().encode())
            )
        for key, rn in out.notices:
            futs.append(await t_notices.send(key=key.encode(), value=rn.model_dump_json().encode()))
        for task in out.deliveries:
            futs.append(await t_deliveries.send(key=task.delivery_id.encode(),
                                                value=task.model_dump_json().encode()))
        for task in out.retries:
            futs.append(await schedule(task, task.not_before or utcnow()))
        for audit_key, audit_value in encode_audit(out.audit):
            futs.append(await t_audit.send(key=audit_key, value=audit_value))
        return futs

    @app.task  # type: ignore[untyped-decorator]  # faust's decorators are untyped
    async def load_channel_states() -> None:
        states.start()

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
            source = f"{event.message.topic}:{event.message.partition}:{event.message.offset}"
            first = seen.get(decl.declaration_key)
            if first is not None:
                first_fp, first_source = [*first.split("@", 1), ""][:2]
                if first_source == source:
                    # The same message read again after a crash: its notice is already
                    # on the broker (it was marked seen only after that). Not a duplicate.
                    continue
                log.info("declaration.duplicate", declaration=decl.declaration_key)
                await send_out(duplicate(decl, notice.fingerprint, first_fp, now))
                continue
            futs = await send_out(accept(decl, notice, now))
            # Mark the declaration seen only once its notice is on the broker: a crash
            # in between relays it again (harmless: delivery ids are stable) rather than
            # never.
            await asyncio.gather(*futs)
            seen[decl.declaration_key] = f"{notice.fingerprint}@{source}"
            versions[decl.artist_key] = version
            yield None

    @app.agent(t_notices, name="fanout")
    async def fanout_agent(stream: faust.StreamT[bytes]) -> AsyncIterator[None]:
        async for raw in stream:
            try:
                relayed = RelayedNotice.model_validate_json(raw)
            except ValidationError as exc:
                log.error("notice.unreadable", error=str(exc)[:500])  # noqa: TRY400 - bad input, no traceback
                continue
            plan = plan_deliveries(relayed.notice, relayed.targets, rt.developers,
                                   now=utcnow(), supported=SUPPORTED_CHANNELS, ack_for=rt.ack_for)
            await send_out(Out(deliveries=plan.tasks, audit=plan.events))
            yield None

    deliver_stream: list[Any] = []

    async def withdrawal_gate(task: DeliveryTask) -> AuditEvent | str | None:
        """None to send; an audit event to record instead of sending; "defer" to wait.

        An opt-out whose declaration was withdrawn is superseded if not yet delivered.
        A withdrawal goes only to developers that were sent what it withdraws; while
        that delivery is still under way, the withdrawal waits for it.
        """
        n = task.notice
        if n.action is Action.OPT_OUT and await withdrawals.withdrawn(task.declaration_key):
            return audit_event(
                AuditType.DELIVERY_SUPERSEDED, task.declaration_key, delivery_id=task.delivery_id,
                developer_id=task.developer_id,
                data={"channel": task.channel, "reason": "withdrawn before it was delivered"})
        if n.action is Action.WITHDRAW and n.supersedes:
            original = make_delivery_id(make_notice_id(n.publisher_id, n.supersedes),
                                        task.developer_id, task.channel)
            row = await worker_queries.delivery(await rt.store_when_up(), original)
            if row is not None and row.state in ("delivered", "acknowledged", "overdue"):
                return None
            if row is not None and row.state in ("planned", "sending", "retry_scheduled", "held"):
                return "defer"
            if row is None and utcnow() - task.planned_at < timedelta(minutes=2):
                # The store may not have projected the original delivery yet.
                return "defer"
            return audit_event(
                AuditType.DELIVERY_SKIPPED, task.declaration_key, delivery_id=task.delivery_id,
                developer_id=task.developer_id,
                data={"channel": task.channel, "channel_type": task.channel_type.value,
                      "reason": f"{task.developer_id} was never sent {n.supersedes}"})
        return None

    async def send_reports(outs: list[Out]) -> None:
        merged = Out()
        for o in outs:
            merged.extend(o)
        await send_out(merged)

    # Chunks finishing in several lanes within REPORT_WINDOW go out together: one audit
    # message per declaration for all of them.
    reports: Coalescer[Out] = Coalescer(send_reports, REPORT_WINDOW)

    async def report(done: Sequence[tuple[Any, DeliveryTask, Outcome]]) -> None:
        """A lane's chunk is done: its audit events (one message per declaration) and
        retries go out, channel health follows, and then each task is acknowledged."""
        out = Out()
        for _, task, outcome in done:
            step = on_outcome(task, outcome, schedule=rt.schedule_for(task),
                              slow_down_floor=settings.slow_down_floor)
            out.extend(step)
            health = states.get(task.developer_id, task.channel)
            changed = after_outcome(health, outcome, now=utcnow(),
                                    disable_after=settings.disable_after)
            if changed is not None and health.enabled and not changed.enabled:
                states.set_local(changed)
                log.warning("channel.disabled", developer=changed.developer_id,
                            channel=changed.channel, reason=changed.reason)
                out.audit.append(channel_event(changed, outcome.attempted_at))
        await reports.submit([out])
        for event, task, outcome in done:
            await deliver_stream[0].ack(event)
            log.debug("deliver.acked", delivery_id=task.delivery_id, attempt=task.attempt,
                      outcome=outcome.kind.value, partition=event.message.partition,
                      offset=event.message.offset)

    lanes: dict[tuple[str, str], Lane[Any]] = {}

    def lane_for(key: tuple[str, str]) -> Lane[Any] | None:
        lane = lanes.get(key)
        if lane is None:
            ch = rt.channels.get(key)
            if ch is None:
                return None
            lane = Lane(key, ch, report, rt.lane_settings(key))
            lanes[key] = lane
        return lane

    @app.agent(t_deliveries, name="deliver")
    async def deliver_agent(stream: faust.StreamT[bytes]) -> AsyncIterator[None]:
        # Manual acks: each message is acked when its outcome is out, in whatever
        # order the lanes finish; Faust commits up to the first one still in flight.
        # noack() is on faust.Stream, the runtime class, not on the StreamT protocol.
        s = stream.noack()  # type: ignore[attr-defined]
        deliver_stream[:] = [s]
        await states.wait_ready()
        async for event in s.events():
            try:
                task = DeliveryTask.model_validate_json(event.value)
            except ValidationError as exc:
                log.error("delivery.unreadable", error=str(exc)[:500])  # noqa: TRY400 - bad input, no traceback
                await s.ack(event)
                continue
            key = (task.developer_id, task.channel)
            log.debug("deliver.task", delivery_id=task.delivery_id, attempt=task.attempt,
                      partition=event.message.partition, offset=event.message.offset)
            lane = lane_for(key)
            if lane is None:
                await report([(event, task, Outcome.permanent(
                    task, f"channel {key[0]}/{key[1]} is no longer configured"))])
                continue
            health = states.get(*key)
            if not health.enabled:
                # Held, durably, until an operator enables the channel again.
                if not task.held:
                    await send_out(Out(audit=[held_event(task, health.reason)]))
                await schedule(task.model_copy(update={"held": True}),
                               utcnow() + settings.hold_recheck)
                await s.ack(event)
                continue
            if task.held:
                task = task.model_copy(update={"held": False})
            gate = await withdrawal_gate(task)
            if gate is not None:
                if gate == "defer":
                    await schedule(task, utcnow() + timedelta(seconds=5))
                else:
                    # withdrawal_gate's only str is "defer": here gate is an AuditEvent.
                    await send_out(Out(audit=[cast(AuditEvent, gate)]))
                await s.ack(event)
                continue
            admission = lane.admission()
            if admission is Admission.DEFER:
                # The channel is stalled or its breaker is open: its task waits in the
                # retry tiers (no attempt counted) instead of blocking the others.
                wait = max(lane.cooldown_left(), 1.0)
                await schedule(task, utcnow() + timedelta(seconds=wait))
                await s.ack(event)
                continue
            await lane.put(event, task)
            yield None

    def make_tier_agent(seconds: int, topic: Any) -> None:
        async def tier_agent(stream: faust.StreamT[bytes]) -> AsyncIterator[None]:
            # Every message of this tier waits the same time, so the head of the
            # stream is always the first one due.
            async for event in stream.events():
                try:
                    task = DeliveryTask.model_validate_json(event.value)
                except ValidationError as exc:
                    log.error("retry.unreadable", error=str(exc)[:500])  # noqa: TRY400 - bad input, no traceback
                    continue
                entered = event.message.timestamp or time.time()
                wait = entered + seconds - time.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                due = task.not_before or utcnow()
                log.debug("retry.tier", tier=seconds, delivery_id=task.delivery_id,
                          attempt=task.attempt, due=due.isoformat())
                if (due - utcnow()).total_seconds() > 0.05:
                    await schedule(task, due)
                else:
                    await t_deliveries.send(key=task.delivery_id.encode(), value=event.value)
                yield None

        app.agent(topic, name=f"retry-{seconds}s")(tier_agent)

    for seconds, topic in retry_topics.items():
        make_tier_agent(seconds, topic)

    t_acks = _raw_topic(app, topics.acks, parts)

    @app.agent(t_acks, name="acks")
    async def acks_agent(stream: faust.StreamT[bytes]) -> AsyncIterator[None]:
        async for raw in stream:
            try:
                ack = AckRecord.model_validate_json(raw)
            except ValidationError as exc:
                log.error("ack.unreadable", error=str(exc)[:500])  # noqa: TRY400 - bad input, no traceback
                continue
            key = ack.declaration_key
            if key is None:
                row = await worker_queries.delivery(await rt.store_when_up(), ack.delivery_id)
                key = row.declaration_key if row is not None else None
            if key is None:
                log.error("ack.unknown_delivery", delivery_id=ack.delivery_id)
                continue
            await send_out(Out(audit=[audit_event(
                AuditType.DELIVERY_ACKNOWLEDGED, key, unique=(ack.via, ack.acknowledged_at),
                delivery_id=ack.delivery_id, developer_id=ack.developer_id,
                actor=Actor(kind=ActorKind.DEVELOPER, id=ack.developer_id),
                occurred_at=ack.acknowledged_at,
                data={"via": ack.via, "reference": ack.reference})]))
            yield None

    @app.timer(settings.overdue_check.total_seconds(), on_leader=True)  # type: ignore[untyped-decorator]  # faust's decorators are untyped
    async def find_overdue() -> None:
        """Deliveries not acknowledged within their developer's ack_sla: overdue, audited,
        and a reminder sent over the same channel (a delivery of its own)."""
        if not rt.developers:
            return
        try:
            store = await rt.store()
        except StoreError as exc:  # the next tick tries again
            log.warning("store.unavailable", timer="find_overdue", error=str(exc)[:300])
            return
        now = utcnow()
        shortest = min(d.ack_sla for d in rt.developers.values())
        out = Out()
        for row in await worker_queries.delivered_before(store, now - shortest):
            dev = rt.developers.get(row.developer_id)
            if dev is None or row.delivered_at is None or row.delivered_at + dev.ack_sla > now:
                continue
            out.audit.append(
                audit_event(
                    AuditType.DELIVERY_OVERDUE,
                    row.declaration_key,
                    delivery_id=row.delivery_id,
                    developer_id=row.developer_id,
                    occurred_at=now,
                    data={
                        "channel": row.channel,
                        "due_by": (row.delivered_at + dev.ack_sla).isoformat(),
                    },
                )
            )
            raw_notice = await worker_queries.notice_json(store, row.declaration_key)
            if raw_notice is None or ".reminder" in row.delivery_id:
                continue
            notice = Notice.model_validate_json(raw_notice).model_copy(
                update={"ack": rt.ack_for(row.delivery_id, dev, row.planned_at)})
            rid = f"{row.delivery_id}.reminder"
            out.deliveries.append(DeliveryTask(
                delivery_id=rid, notice=notice, developer_id=row.developer_id, channel=row.channel,
                channel_type=ChannelType(row.channel_type), planned_at=now))
            out.audit.append(audit_event(
                AuditType.DELIVERY_PLANNED, row.declaration_key, delivery_id=rid,
                developer_id=row.developer_id, occurred_at=now,
                data={"channel": row.channel, "channel_type": row.channel_type,
                      "reminder_of": row.delivery_id}))
        if out.audit:
            await send_out(out)

    @app.timer(max(1.0, settings.sweep_after.total_seconds() / 4), on_leader=True)  # type: ignore[untyped-decorator]  # faust's decorators are untyped
    async def sweep() -> None:
        """Repair: a delivery that should have moved long ago (a retry past its due
        time, a planned delivery never attempted) is re-sent from the store. A second
        line of defence behind the commit rules of safe_offsets: the store knows every
        planned delivery, so a task lost anyway becomes a delay. Delivery ids are
        stable: a delivery that was only late is deduplicated by receivers."""
        try:
            store = await rt.store()
        except StoreError as exc:  # the next tick tries again
            log.warning("store.unavailable", timer="sweep", error=str(exc)[:300])
            return
        now = utcnow()
        out = Out()
        # Planned deliveries are only stalled if nothing is waiting in the deliveries
        # topic: with a backlog, old planned deliveries are simply queued.
        c = app.consumer
        backlog = any(
            # _committed_offset is on faust's Consumer implementation, not on ConsumerT.
            (c.highwater(tp) or 0) > (c._committed_offset.get(tp) or 0)  # type: ignore[attr-defined]
            for tp in c.assignment() if tp.topic == topics.deliveries
        )
        for row in await worker_queries.stalled(store, now - settings.sweep_after,
                                                include_planned=not backlog):
            raw_notice = await worker_queries.notice_json(store, row.declaration_key)
            dev = rt.developers.get(row.developer_id)
            if raw_notice is None or dev is None:
                continue
            notice = Notice.model_validate_json(raw_notice).model_copy(
                update={"ack": rt.ack_for(row.delivery_id.split(".")[0], dev, row.planned_at)})
            log.warning("sweep.resend", delivery_id=row.delivery_id, due=str(row.next_attempt_at))
            out.deliveries.append(DeliveryTask(
                delivery_id=row.delivery_id, notice=notice, developer_id=row.developer_id,
                channel=row.channel, channel_type=ChannelType(row.channel_type),
                attempt=row.attempts + 1, planned_at=row.planned_at))
        if rt.developers:
            for key, raw_notice, targets in await worker_queries.unfanned(
                    store, now - settings.sweep_after):
                notice = Notice.model_validate_json(raw_notice)
                log.warning("sweep.refanout", declaration=key)
                relayed = RelayedNotice(notice=notice, targets=targets)
                out.notices.append((notice.artist_key, relayed))
        if out.deliveries or out.notices:
            await send_out(out)

    @app.agent(t_audit, name="project")
    async def project_agent(stream: faust.StreamT[bytes]) -> AsyncIterator[None]:
        store = await rt.store_when_up()
        async for batch in stream.take(settings.audit_batch, within=settings.audit_batch_wait):
            events: list[AuditEvent] = []
            for raw in batch:
                try:
                    events += decode_audit(raw)
                except ValueError as exc:  # pydantic's ValidationError included
                    log.error("audit.unreadable", error=str(exc)[:500])  # noqa: TRY400 - bad input, no traceback
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

    async def close_lanes() -> None:
        for lane in lanes.values():
            await lane.close()
        await states.stop()

    rt.closers.append(close_lanes)

    @app.task  # type: ignore[untyped-decorator]  # faust's decorators are untyped
    async def install_task_dump() -> None:
        """SIGUSR1 logs what every asyncio task of the worker is waiting on (for
        operators diagnosing a stuck worker)."""
        import signal
        import sys

        def dump() -> None:
            # Private attributes of faust's Consumer implementation, not on ConsumerT.
            c: Any = app.consumer
            sys.stderr.write(f"--- consumer assignment={sorted(map(str, c.assignment()))}\n"
                             f"paused={sorted(map(str, c._paused_partitions))}\n"
                             f"active={sorted(map(str, c._active_partitions or ()))}\n"
                             f"buffered={sorted(map(str, c._buffered_partitions))}\n")
            for t in asyncio.all_tasks():
                sys.stderr.write(f"--- task {t.get_name()}\n")
                t.print_stack(limit=12, file=sys.stderr)
            sys.stderr.flush()

        with contextlib.suppress(NotImplementedError, RuntimeError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, dump)

    # mode's signal typing wants a `signal` keyword argument; **_ takes it at runtime.
    @app.on_before_shutdown.connect  # type: ignore[arg-type]
    async def _close(app: faust.App, **_: Any) -> None:
        await rt.close()

    return app


def run_worker(settings: Settings, *, loglevel: str = "warning") -> None:
    """Create the topics, load the registry and run a worker until it is stopped."""
    from notice_relay.topics import ensure_topics

    heap = NativeHeap()
    # Before any thread allocates (ensure_topics' name lookups run in threads):
    # notice_relay.memory, HeapLimits; docs/reliability.md, finding 7. Nothing to do
    # under jemalloc.
    limited = heap.limit()
    if limited:
        log.debug("memory.limited", **limited)
    log.info("memory.allocator", allocator=heap.allocator, chosen=settings.allocator,
             objects=python_allocator(), objects_chosen=settings.object_allocator,
             malloc_conf=os.environ.get("MALLOC_CONF", "") if heap.allocator == "jemalloc"
             else None)
    rt = Runtime.load(settings)
    rt.build_channels()
    asyncio.run(ensure_topics(settings))
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    # Held until the process ends: the lock is what keeps the directory this worker's.
    own = workdir.claim(settings.data_dir)
    log.info("worker.datadir", path=str(own.path), table_store=settings.table_store)
    app = create_app(settings, rt, datadir=own.path)
    level = getattr(logging, loglevel.upper(), logging.WARNING)

    @app.task  # type: ignore[untyped-decorator]  # faust's decorators are untyped
    async def set_library_log_levels() -> None:
        # After the worker set up logging: without explicit levels the libraries'
        # per-operation debug records (aiosqlite, aiokafka, httpcore) are built and
        # then dropped, a few per cent of the worker's CPU under load.
        for name in ("", *QUIET_LIBRARIES):
            logging.getLogger(name).setLevel(level)

    @app.task  # type: ignore[untyped-decorator]  # faust's decorators are untyped
    async def freeze_startup_heap() -> None:
        # What exists once the worker is up (modules, the app, clients) lives as long as
        # the process: moved out of the collector's reach, it is no longer scanned by
        # every full collection, which otherwise stalls the event loop for ~50-90 ms
        # each time (a latency spike for every delivery in flight; docs/performance.md).
        gc.collect()
        gc.freeze()

    if heap.available and settings.malloc_trim_interval > timedelta(0):

        @app.timer(settings.malloc_trim_interval.total_seconds())  # type: ignore[untyped-decorator]  # faust's decorators are untyped
        async def trim_native_heap() -> None:
            # Free pages left in the middle of the allocator's heaps stay resident
            # until handed back (notice_relay.memory; docs/reliability.md, finding 7).
            done = await asyncio.to_thread(heap.trim)
            if done is not None:
                log.debug("memory.trimmed", ms=round(done.seconds * 1000, 2),
                          released=done.released)

    # A stop that cannot finish (the broker gone) ends the process after
    # NOTICE_RELAY_STOP_TIMEOUT, as a SIGKILL would (notice_relay.stopping).
    worker = BoundedWorker(app, loglevel=loglevel, quiet=True,
                           stop_timeout=settings.stop_timeout.total_seconds())
    worker.execute_from_commandline()
