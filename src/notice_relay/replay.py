"""Replaying deliveries: an operator sends failed deliveries again.

A replay rebuilds each matching delivery's task from the audit store — the notice
as it was relayed (``declarations.notice``) and the delivery's developer, channel
and channel type — with ``attempt = attempts + 1``, and puts it on the deliveries
topic, where the deliver stage takes it like any other task. Before the task, a
``delivery.replay_requested`` event with the operator as its actor goes to the audit
topic, keyed by the declaration, so the trail reads "replay requested by alice",
then the new attempt, in that order.

Decisions:

- Only ``failed`` and ``retry_scheduled`` deliveries can be replayed
  (:data:`REPLAYABLE`). A delivered, acknowledged or overdue delivery was delivered;
  a superseded one was withdrawn and must never be sent; a skipped one has no
  channel; planned, sending and held ones are in the pipeline already.
- A replay continues the delivery's retry schedule where it stopped (the attempt
  number goes on), so a delivery whose schedule is spent gets one attempt.
- ``until`` defaults to the moment the replay starts: a delivery that the replay
  itself moves (its ``updated_at`` changes) is never met again further down the
  pages and replayed twice.
- The replay event's id is derived from the delivery and the attempt, so a replay
  requested twice before the worker moved the delivery is stored once; the task may
  then go out twice, which at-least-once delivery already allows (receivers
  deduplicate on ``webhook-id``, the delivery id).

The logic is shared by ``POST /v1/replays`` and ``notice-relay replay``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Protocol

import structlog
from pydantic import ValidationError

from notice_relay.audit.events import audit_event
from notice_relay.audit.queries import (
    DeliveryFilter,
    count_deliveries,
    iter_deliveries,
    notices_for,
)
from notice_relay.audit.store import AuditStore, DeliveryRow
from notice_relay.errors import NoticeRelayError
from notice_relay.models import (
    Actor,
    ActorKind,
    AuditEvent,
    AuditType,
    ChannelType,
    DeliveryState,
    DeliveryTask,
    Notice,
)
from notice_relay.topics import Topics

if TYPE_CHECKING:
    from notice_relay.config import Settings

__all__ = [
    "REPLAYABLE",
    "NotReplayable",
    "ReplayResult",
    "Sender",
    "replay",
    "replay_event",
    "replay_task",
    "replay_with_settings",
]

log = structlog.get_logger("notice_relay.replay")

#: The states a replay may take a delivery out of.
REPLAYABLE: frozenset[DeliveryState] = frozenset({DeliveryState.FAILED,
                                                  DeliveryState.RETRY_SCHEDULED})


class NotReplayable(NoticeRelayError):
    """A replay filter naming a state that cannot be replayed."""


_CHANNEL_TYPES = frozenset(t.value for t in ChannelType)


class Sender(Protocol):
    """Where a replay puts its records (a Kafka producer in production)."""

    async def send_many(self, topic: str, items: Sequence[tuple[bytes, bytes]]) -> None:
        """Send ``(key, value)`` pairs to ``topic``; return when the broker has them all."""


@dataclass(frozen=True)
class ReplayResult:
    """What a replay matched and sent. ``skipped`` deliveries matched but their
    notice is not in the store (a store rebuilt from a topic that lost it)."""

    matched: int
    replayed: int
    skipped: int
    dry_run: bool


def replay_task(row: DeliveryRow, notice: Notice, *, now: datetime) -> DeliveryTask:
    """The task that sends delivery ``row`` again (pure)."""
    return DeliveryTask(
        delivery_id=row.delivery_id, notice=notice, developer_id=row.developer_id,
        channel=row.channel, channel_type=ChannelType(row.channel_type),
        attempt=row.attempts + 1, planned_at=now,
    )


def replay_event(task: DeliveryTask, *, operator: str, previous_state: str,
                 now: datetime) -> AuditEvent:
    """The ``delivery.replay_requested`` event of ``task`` (pure)."""
    return audit_event(
        AuditType.DELIVERY_REPLAY_REQUESTED, task.declaration_key, unique=(task.attempt,),
        delivery_id=task.delivery_id, developer_id=task.developer_id,
        actor=Actor(kind=ActorKind.OPERATOR, id=operator), occurred_at=now,
        data={"attempt": task.attempt, "channel": task.channel,
              "previous_state": previous_state},
    )


def _check_states(flt: DeliveryFilter) -> DeliveryFilter:
    bad = [s.value for s in flt.states if s not in REPLAYABLE]
    if bad:
        allowed = ", ".join(sorted(s.value for s in REPLAYABLE))
        raise NotReplayable(f"cannot replay deliveries in state {', '.join(bad)}; "
                            f"only {allowed} deliveries can be replayed")
    if not flt.states:
        flt = replace(flt, states=tuple(REPLAYABLE))
    return flt


def replay_filter(flt: DeliveryFilter, *, now: datetime) -> DeliveryFilter:
    """``flt`` as a replay applies it: replayable states only (NotReplayable for others;
    all of them when none is named) and ``until`` no later than ``now``."""
    flt = _check_states(flt)
    if flt.until is None or flt.until > now:
        flt = replace(flt, until=now)
    return flt


async def replay(
    store: AuditStore,
    sender: Sender,
    topics: Topics,
    flt: DeliveryFilter,
    *,
    operator: str,
    dry_run: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
    page_size: int = 500,
) -> ReplayResult:
    """Replay every delivery matching ``flt`` as ``operator``.

    ``on_progress(done, total)`` is called after each page. Raises NotReplayable for
    a filter naming a state that cannot be replayed.
    """
    now = datetime.now(UTC)
    flt = replay_filter(flt, now=now)
    total = await count_deliveries(store, flt)
    matched = replayed = skipped = 0
    if on_progress is not None:
        on_progress(0, total)
    async for rows in iter_deliveries(store, flt, page_size=page_size):
        matched += len(rows)
        stored = await notices_for(store, (r.declaration_key for r in rows))
        notices: dict[str, Notice | None] = {}
        for key, text in stored.items():
            try:
                notices[key] = Notice.model_validate_json(text) if text else None
            except ValidationError:
                notices[key] = None
        tasks: list[tuple[DeliveryRow, DeliveryTask]] = []
        for row in rows:
            notice = notices.get(row.declaration_key)
            if notice is None or row.channel_type not in _CHANNEL_TYPES:
                log.warning("replay.skipped", delivery_id=row.delivery_id,
                            reason="no relayed notice in the store")
                skipped += 1
                continue
            tasks.append((row, replay_task(row, notice, now=now)))
        if not dry_run and tasks:
            # The events first, and on the broker before the tasks: the trail must show
            # the request before the attempt it causes.
            await sender.send_many(topics.audit, [
                (t.declaration_key.encode(), replay_event(
                    t, operator=operator, previous_state=row.state, now=now,
                ).model_dump_json().encode())
                for row, t in tasks
            ])
            await sender.send_many(topics.deliveries, [
                (t.delivery_id.encode(), t.model_dump_json().encode()) for _, t in tasks
            ])
            replayed += len(tasks)
        if on_progress is not None:
            on_progress(matched, max(total, matched))
    return ReplayResult(matched=matched, replayed=replayed, skipped=skipped, dry_run=dry_run)


async def replay_with_settings(
    settings: Settings,
    flt: DeliveryFilter,
    *,
    operator: str,
    dry_run: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
) -> ReplayResult:
    """:func:`replay` with a store and a producer of its own (the CLI)."""
    from notice_relay.api.producer import RelayProducer

    store = await AuditStore.open(settings.database_url)
    producer = RelayProducer(settings)
    try:
        if not dry_run:
            await producer.start()
        return await replay(store, producer, Topics.from_settings(settings), flt,
                            operator=operator, dry_run=dry_run, on_progress=on_progress)
    finally:
        await producer.stop()
        await store.close()
