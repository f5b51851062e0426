"""Lanes: one per channel, so that one developer's slow or dead endpoint never delays
the others.

The deliver stage reads delivery tasks in order and hands each to its channel's
lane. A lane has a bounded queue and sends what it holds in chunks, a few chunks at
a time (the channel bounds its own requests in flight). The reader waits for room in
a lane only while that lane is making progress; a lane that has not completed an
attempt for ``stall_after`` seconds, or whose circuit breaker is open after
``breaker_threshold`` consecutive transient failures, is not waited for: its new
tasks are deferred (sent to the retry tiers, no attempt counted) and the reader moves
on. Outcomes are reported per chunk through a callback, in whatever order chunks
complete; the deliver stage sends what they lead to and acks each task's message then
(only a run of acked offsets from the partition's head is committed, so nothing is
committed before its outcome is out).

An email lane with a digest window collects tasks for up to that window (or until
``max_batch``) and sends them as one message.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Generic, TypeVar

import structlog

from notice_relay.channels.base import Channel
from notice_relay.models import DeliveryTask, Outcome, OutcomeKind

log = structlog.get_logger("notice_relay.lanes")

T = TypeVar("T")


@dataclass(frozen=True)
class LaneSettings:
    """Bounds of one lane."""

    capacity: int = 256
    chunk: int = 64
    concurrent_chunks: int = 4
    stall_after: float = 2.0
    breaker_threshold: int = 5
    breaker_cooldown: float = 30.0
    digest_window: float = 0.0
    max_batch: int = 64


class Admission(Enum):
    """What the reader may do with a new task for a lane."""

    ACCEPT = "accept"
    WAIT = "wait"
    DEFER = "defer"


class Lane(Generic[T]):
    """The queue and sender of one channel. ``T`` is the caller's token per task
    (the deliver stage passes the Kafka event, to ack it when the outcome is out)."""

    def __init__(
        self,
        key: tuple[str, str],
        channel: Channel,
        report: Callable[[Sequence[tuple[T, DeliveryTask, Outcome]]], Awaitable[None]],
        settings: LaneSettings,
    ) -> None:
        self.key = key
        self.channel = channel
        self.report = report
        self.settings = settings
        self.queue: asyncio.Queue[tuple[T, DeliveryTask]] = asyncio.Queue(settings.capacity)
        self.in_flight = 0
        self.last_progress = time.monotonic()
        self.consecutive_failures = 0
        self.open_until = 0.0
        self._chunks = asyncio.Semaphore(settings.concurrent_chunks)
        self._runner: asyncio.Task[None] | None = None
        self._sends: set[asyncio.Task[None]] = set()

    # ---------------------------------------------------------------- admission

    @property
    def busy(self) -> bool:
        """Whether the lane holds or sends anything."""
        return self.in_flight > 0 or not self.queue.empty()

    def breaker_open(self, now: float | None = None) -> bool:
        """Whether the circuit breaker currently refuses new tasks."""
        return (now if now is not None else time.monotonic()) < self.open_until

    def admission(self) -> Admission:
        """May a new task enter now, should the reader wait, or defer it?"""
        now = time.monotonic()
        if self.breaker_open(now):
            return Admission.DEFER
        if not self.queue.full():
            return Admission.ACCEPT
        if now - self.last_progress < self.settings.stall_after:
            return Admission.WAIT
        return Admission.DEFER

    def cooldown_left(self) -> float:
        """Seconds until the breaker lets tasks through again."""
        return max(0.0, self.open_until - time.monotonic())

    async def put(self, token: T, task: DeliveryTask) -> None:
        """Queue a task (waits while the queue is full)."""
        if not self.busy:
            # An idle lane that starts again is not stalled.
            self.last_progress = time.monotonic()
        await self.queue.put((token, task))
        self._ensure_running()

    # ------------------------------------------------------------------ sending

    def _ensure_running(self) -> None:
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(
                self._run(), name=f"lane:{self.key[0]}/{self.key[1]}"
            )

    async def _collect(self) -> list[tuple[T, DeliveryTask]]:
        first = await self.queue.get()
        batch = [first]
        limit = self.settings.max_batch if self.settings.digest_window > 0 else self.settings.chunk
        if self.settings.digest_window > 0:
            deadline = time.monotonic() + self.settings.digest_window
            while len(batch) < limit:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), left))
                except TimeoutError:
                    break
        while len(batch) < limit and not self.queue.empty():
            batch.append(self.queue.get_nowait())
        return batch

    async def _run(self) -> None:
        while True:
            batch = await self._collect()
            await self._chunks.acquire()
            self.in_flight += len(batch)
            t = asyncio.create_task(self._send(batch))
            self._sends.add(t)
            t.add_done_callback(self._sends.discard)

    async def _send(self, batch: list[tuple[T, DeliveryTask]]) -> None:
        tasks = [task for _, task in batch]
        try:
            try:
                outcomes = await self.channel.send(tasks)
            except Exception as exc:  # a channel bug must stay in its lane
                log.exception("lane.channel_crashed", developer=self.key[0], channel=self.key[1])
                outcomes = [
                    Outcome.transient(t, f"internal error in channel: {exc!r}") for t in tasks
                ]
            self.last_progress = time.monotonic()
            done = [(token, task, outcome)
                    for (token, task), outcome in zip(batch, outcomes, strict=True)]
            for _, _, outcome in done:
                self._observe(outcome)
            try:
                await self.report(done)
            except Exception:  # not acked: read again after a restart or a re-read
                log.exception("lane.report_failed", developer=self.key[0], channel=self.key[1],
                              deliveries=[t.delivery_id for _, t, _ in done][:10])
        finally:
            self.in_flight -= len(batch)
            self._chunks.release()

    def _observe(self, outcome: Outcome) -> None:
        if outcome.kind is OutcomeKind.TRANSIENT:
            self.consecutive_failures += 1
            if self.consecutive_failures >= self.settings.breaker_threshold:
                if not self.breaker_open():
                    log.warning("lane.breaker_open", developer=self.key[0], channel=self.key[1],
                                failures=self.consecutive_failures)
                self.open_until = time.monotonic() + self.settings.breaker_cooldown
        else:
            self.consecutive_failures = 0
            self.open_until = 0.0

    async def close(self) -> None:
        """Stop sending (tasks still queued are re-read after a restart: not acked)."""
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
        for t in list(self._sends):
            t.cancel()
        for t in list(self._sends):
            with contextlib.suppress(asyncio.CancelledError):
                await t
