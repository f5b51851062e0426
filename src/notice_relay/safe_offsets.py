"""Offset commits that never pass a message nobody processed.

faust-streaming 0.15's consumer decides what to commit from the offsets its streams
have acknowledged. Three of its rules can commit past a message that was never
processed, which a crash then turns into a lost notice:

1. When a partition has no committed offset yet, or its committed offset is 0, it
   keeps ``None`` as the committed position and commits the first run of consecutive
   acknowledged offsets wherever that run starts. A stage that acknowledges out of
   order (``deliver`` acks each task when its lane finishes) thus commits past a task
   still in flight at the head of the partition.
2. Otherwise it refuses a gap at the head only when the gap is *more* than one message
   (``min(acked) - committed > 1``), so exactly one unprocessed message at the head is
   committed past (this is the loss of faust-streaming issue 606).
3. During a rebalance, a stream that meets a message of an older consumer generation,
   or while flow control is suspended, skips it and *acknowledges* it ("otherwise the
   lag would increase"), and the acknowledged offset can be committed once the
   partition is assigned again, though the message was never handed to an agent.

:class:`SafeConsumer` fixes all three, keeping everything else of faust's consumer:

- it learns where each partition starts (the committed offset, else the consumer's
  fetch position) when faust seeks to the committed offsets after every rebalance;
- it commits only a run of acknowledged offsets that begins exactly there;
- it does not count an acknowledgement of a message from an older generation, or one
  made while flow is suspended: such a message is read again from the committed
  offset after the rebalance (at-least-once: a duplicate, never a loss).

A fourth rule is turned off: faust marks the offsets it did not see between two
fetched messages as done ("gaps", meant for compacted or transactional topics), and
right after a seek that can mark real, unprocessed messages as done. The relay's topics
have no missing offsets.

Two more safeguards cover what the rules above cannot see: around a rebalance faust
can drop a fetched message on its way to the stream without anyone acknowledging it
(faust-streaming issues 166 and 629). The commit then stops at that message, which is
safe but would hold the partition's commits back until the next rebalance. When a
partition's head stays unprocessed for ``reread_after`` seconds while later offsets are
done and no stream holds the head, the partition is read again from the head; likewise
when a partition has messages past its head, none processed, while the agent of its
topic holds nothing (it is waiting for input that faust dropped).

Two of those drops are caught where they happen instead of seconds later:

- every fetched batch is compared with what faust handed on (``offsets.dropped`` in
  the log). Records of a partition that was active, dropped while no rebalance began,
  are read again from the first dropped offset at once. Records dropped because a
  rebalance began, or because the partition was paused for a table recovery, need
  nothing: both end with a seek to the committed offsets.
- a partition left paused after its recovery completed (seen once in the fault
  suite: a partition taken over in a rebalance stayed idle until the next one) is
  resumed and read again from its head after ``reread_after`` seconds.

:class:`RelayApp` is a :class:`faust.App` whose transport builds this consumer.
"""

from __future__ import annotations

import asyncio
import time
from bisect import bisect_left
from collections.abc import Mapping
from typing import Any

import faust
import structlog
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP, Message
from mode.utils.objects import cached_property
from mode.utils.queues import FlowControlEvent

log = structlog.get_logger("notice_relay.offsets")

RecordMap = Mapping[TP, list[Any]]  # what aiokafka's fetcher returns: records by partition

__all__ = ["FlowControl", "RelayApp", "SafeConsumer", "SafeTransport", "committable_offset"]


def committable_offset(acked: list[int], head: int | None) -> tuple[int | None, list[int]]:
    """The offset to commit given the acknowledged offsets and the partition's head.

    ``head`` is the first offset not yet committed (where reading resumes after a
    crash). Returns the new committed offset (or None: nothing may be committed) and
    the offsets consumed by it, which the caller forgets. Offsets below ``head`` are
    stale (already committed) and are consumed too. ``acked`` must be sorted.
    """
    if head is None or not acked:
        return None, []
    start = bisect_left(acked, head)
    consumed = acked[:start]
    rest = acked[start:]
    if not rest or rest[0] != head:
        return None, consumed
    end = 1
    while end < len(rest) and rest[end] == rest[end - 1] + 1:
        end += 1
    return rest[end - 1] + 1, consumed + rest[:end]


class SafeConsumer(faust_aiokafka.Consumer):
    """faust's aiokafka consumer with the commit rules described in the module doc."""

    # ------------------------------------------------------------ dropped batches

    async def _wait_next_records(
        self, timeout: float  # noqa: ASYNC109 - faust's signature
    ) -> tuple[RecordMap | None, set[TP] | None]:
        records, active = await super()._wait_next_records(timeout)
        app = self.app
        self.__dict__["_nr_batch"] = (records, set(active or ()), app.consumer_generation_id,
                                      app.rebalancing_count)
        return records, active

    async def getmany(self, timeout: float) -> Any:  # noqa: ASYNC109 - faust's signature
        """faust's getmany, then a look at what of the batch it did not hand on."""
        handed: dict[TP, int] = {}
        async for tp, message in super().getmany(timeout):
            handed[tp] = message.offset
            yield tp, message
        batch = self.__dict__.pop("_nr_batch", None)
        if batch is not None and batch[0]:
            await self._after_batch(*batch, handed=handed)

    async def _after_batch(self, records: RecordMap, active: set[TP], generation: int,
                           rebalances: int, *, handed: dict[TP, int]) -> None:
        app = self.app
        same_generation = generation == app.consumer_generation_id
        settled = (same_generation and not app.rebalancing
                   and rebalances == app.rebalancing_count and self.flow_active)
        recovering = self._recovering()
        changelogs = app.tables.changelog_topics
        assignment = self.assignment()
        for tp, batch in records.items():
            last = handed.get(tp, -1)
            dropped = [r.offset for r in batch if r.offset > last]
            if not dropped or tp not in assignment:
                continue
            if tp.topic in changelogs:
                # A changelog partition is fetched even while paused (faust pauses it
                # in its own bookkeeping only) and what it fetches is dropped: harmless,
                # except while a recovery reads it. The recovery sought it to where
                # the table's copy ends and waits for the records up to the highwater:
                # dropped, they never come, and the recovery, with every stream of
                # the worker, waits until the next rebalance (finding 6).
                if same_generation and tp in recovering:
                    log.info("offsets.dropped", topic=tp.topic, partition=tp.partition,
                             offset=dropped[0], count=len(dropped), recovering=True)
                    self._changelog_rereads[tp] = (generation, dropped[0])
                    self._reread_changelog(tp)
                continue
            was_active = tp in active or tp in self._buffered_partitions
            log.info("offsets.dropped", topic=tp.topic, partition=tp.partition,
                     offset=dropped[0], count=len(dropped), active=was_active,
                     settled=settled)
            if settled and was_active:
                # Nothing else will bring these back: read them again now.
                await self.seek(tp, dropped[0])
            # Otherwise a rebalance began, or the partition was paused for a table
            # recovery: both end with a seek to the committed offsets.

    def _recovering(self) -> set[TP]:
        """The changelog partitions a table recovery is reading now."""
        recovery = self.app.tables.recovery  # type: ignore[attr-defined]  # not on TableManagerT
        if not recovery.in_recovery:
            return set()
        return set(recovery.active_tps) | set(recovery.standby_tps)

    @property
    def _changelog_rereads(self) -> dict[TP, tuple[int, int]]:
        """Changelog partitions to read again (generation, offset) once active."""
        return self._state("_nr_changelog_rereads", dict)  # type: ignore[no-any-return]

    def _reread_changelog(self, tp: TP) -> None:
        """Seek ``tp`` back to its first dropped record if it is active now (if it is
        paused, :meth:`resume_partitions` does it: a seek while paused would only be
        fetched and dropped again)."""
        generation, offset = self._changelog_rereads.get(tp, (None, 0))
        if generation != self.app.consumer_generation_id or tp not in self._recovering():
            self._changelog_rereads.pop(tp, None)
            return
        if tp not in self._get_active_partitions():
            return
        del self._changelog_rereads[tp]
        self._spawn(self.seek(tp, offset))

    def resume_partitions(self, tps: Any) -> None:
        """faust's resume, then the changelog re-reads that waited for it."""
        tps = set(tps)
        super().resume_partitions(tps)
        for tp in tps & set(self._changelog_rereads):
            self._reread_changelog(tp)

    async def perform_seek(self) -> None:
        """Seek every partition to its committed offset and remember each one's head."""
        committed = await self.seek_to_committed()
        acks_enabled_for = self.app.topics.acks_enabled_for
        heads: dict[TP, int] = {}
        fresh: list[TP] = []
        for tp, offset in committed.items():
            if offset is not None and offset >= 0:
                heads[tp] = offset
            elif acks_enabled_for(tp.topic):
                fresh.append(tp)
        if fresh:
            # Nothing committed yet: reading starts at the start of the log (the app's
            # auto_offset_reset is "earliest"). Not the fetch position: faust may have
            # fetched, and even processed, messages of the partition already.
            earliest = await self.earliest_offsets(*fresh)
            for tp in fresh:
                if earliest.get(tp) is not None:
                    heads[tp] = earliest[tp]
        for tp in committed:
            head = heads.get(tp)
            if head is not None and not committed.get(tp) and acks_enabled_for(tp.topic):
                # aiokafka seeks only to a committed offset above 0: a partition with
                # none (or 0) keeps its fetch position, which may be past messages
                # fetched, and skipped, during an earlier generation.
                await self._seek(tp, head)
            # faust's read offset: None means "accept whatever comes first".
            self._read_offset[tp] = head
            self._committed_offset[tp] = head
            # Acknowledgements already recorded stay: ack() counts only those of the
            # current generation, so each is of a message processed since the
            # assignment (faust may hand messages to streams before this seek).

    def ack(self, message: Message) -> bool:
        """Count the acknowledgement of a message processed in the current generation."""
        app = self.app
        if (message.generation_id != app.consumer_generation_id
                or not app.flow_control.is_active()):
            # Skipped during a rebalance, or finished after it: the partition is read
            # again from its committed offset, so this one must not be counted.
            message.acked = True
            self._unacked_messages.discard(message)
            return False
        return super().ack(message)

    async def _add_gap(self, tp: TP, offset_from: int, offset_to: int) -> None:
        """Record no gaps. faust counts the offsets between the last one read and the
        next one fetched as done (for compacted or transactional topics, where offsets
        can be missing). Right after a seek the last one read is the seek position,
        and a message fetched before the seek then makes faust mark messages that
        exist, and were never processed, as done. The relay's topics have no missing
        offsets (no compaction, no transactions), so a gap is never real here."""
        del tp, offset_from, offset_to

    def _new_offset(self, tp: TP) -> int | None:
        acked: list[int] = self._acked[tp]
        if not acked:
            return None
        acked[:] = sorted(set(acked))
        head = self._committed_offset[tp]
        offset, consumed = committable_offset(acked, head)
        if consumed:
            del acked[: len(consumed)]
            self._acked_index[tp].difference_update(consumed)
        if offset is None and head is not None and acked:
            self._watch_head(tp, head)
        else:
            self._blocked.pop(tp, None)
        return offset

    # ------------------------------------------------------------ lost heads

    #: Seconds a partition's head may stay unprocessed while later offsets are done and
    #: no stream holds the head, before the partition is read again from the head.
    reread_after: float = 5.0

    @property
    def _blocked(self) -> dict[TP, tuple[int, float]]:
        return self._state("_nr_blocked", dict)  # type: ignore[no-any-return]

    def _holds(self, tp: TP, offset: int) -> bool:
        """Whether a stream is still working on the message at ``tp``/``offset``."""
        return any(m.offset == offset and m.tp == tp and not m.acked
                   for m in list(self._unacked_messages))

    def _watch_head(self, tp: TP, head: int) -> None:
        """The head of ``tp`` is not done though later offsets are. While a stream holds
        it (a slow delivery, a retry tier waiting), that is fine. If nobody holds it for
        ``reread_after`` seconds, faust dropped it on the way to the stream (as happens
        around rebalances): read the partition again from the head. What was already
        processed after it is processed again (at-least-once: delivery ids are stable)."""
        now = time.monotonic()
        if self._holds(tp, head) or tp in self._paused_partitions:
            self._blocked.pop(tp, None)
            return
        since = self._blocked.get(tp)
        if since is None or since[0] != head:
            self._blocked[tp] = (head, now)
            return
        if now - since[1] < self.reread_after:
            return
        self._blocked.pop(tp, None)
        log.warning("offsets.reread", topic=tp.topic, partition=tp.partition, offset=head,
                    paused=tp in self._paused_partitions)
        self._spawn(self._reread(tp, head))

    async def commit(self, *args: Any, **kwargs: Any) -> bool:
        """faust's commit (run every commit interval), after looking for idle partitions."""
        self._watch_idle()
        return bool(await super().commit(*args, **kwargs))

    @property
    def _idle(self) -> dict[TP, tuple[int, float]]:
        return self._state("_nr_idle", dict)  # type: ignore[no-any-return]

    def _watch_idle(self) -> None:
        """A partition with messages past its head, none of them processed, while no
        stream holds any message of its topic (its agent is waiting for input): faust
        dropped what it fetched of it. After ``reread_after`` seconds in that state,
        the partition is read again from its head."""
        now = time.monotonic()
        busy = {m.tp.topic for m in list(self._unacked_messages) if not m.acked}
        acks_enabled_for = self.app.topics.acks_enabled_for
        self._watch_paused(now)
        self._watch_recovery(now)
        paused = self._paused_partitions
        for tp in self.assignment():
            head = self._committed_offset.get(tp)
            highwater = self.highwater(tp)
            if (tp.topic in busy or not acks_enabled_for(tp.topic) or head is None
                    or highwater is None or highwater <= head or self._acked.get(tp)
                    or tp in paused):  # paused: the end of the recovery seeks it
                self._idle.pop(tp, None)
                continue
            since = self._idle.get(tp)
            if since is None or since[0] != head:
                self._idle[tp] = (head, now)
            elif now - since[1] >= self.reread_after:
                self._idle.pop(tp, None)
                log.warning("offsets.reread", topic=tp.topic, partition=tp.partition,
                            offset=head, idle=True, paused=tp in self._paused_partitions)
                self._spawn(self._reread(tp, head))

    @property
    def _recovery_progress(self) -> dict[TP, tuple[int, float]]:
        return self._state("_nr_recovery", dict)  # type: ignore[no-any-return]

    def _watch_recovery(self, now: float) -> None:
        """A table recovery that has not read a single record of a changelog partition
        for ``reread_after`` seconds while records remain up to the highwater: what it
        fetched was dropped on the way (finding 6). Resume the partition and read it
        again from the record after the last one applied."""
        recovery = self.app.tables.recovery  # type: ignore[attr-defined]  # not on TableManagerT
        progress = self._recovery_progress
        if not recovery.in_recovery:
            progress.clear()
            return
        for tp in list(recovery.active_tps):
            applied = recovery.active_offsets.get(tp)
            highwater = recovery.active_highwaters.get(tp)
            if applied is None or highwater is None or applied >= highwater:
                progress.pop(tp, None)
                continue
            since = progress.get(tp)
            if since is None or since[0] != applied:
                progress[tp] = (applied, now)
                continue
            if now - since[1] < self.reread_after or tp not in self.assignment():
                continue
            del progress[tp]
            log.warning("offsets.recovery_reread", topic=tp.topic, partition=tp.partition,
                        offset=applied + 1, highwater=highwater,
                        paused=tp in self._paused_partitions)
            if tp in self._paused_partitions:
                super().resume_partitions({tp})
            self._spawn(self.seek(tp, applied + 1))

    @property
    def _paused_since(self) -> dict[TP, float]:
        return self._state("_nr_paused_since", dict)  # type: ignore[no-any-return]

    def _watch_paused(self, now: float) -> None:
        """A stream partition still paused ``reread_after`` seconds after the recovery
        completed, outside a rebalance: resume it and read it again from its head."""
        app = self.app
        recovery = app.tables.recovery  # type: ignore[attr-defined]  # not on TableManagerT
        settled = (recovery.completed.is_set() and not app.rebalancing
                   and not app.in_recovery and self.flow_active)
        changelogs = app.tables.changelog_topics
        stuck = {tp for tp in self._paused_partitions
                 if tp.topic not in changelogs} if settled else set()
        for tp in list(self._paused_since):
            if tp not in stuck:
                del self._paused_since[tp]
        for tp in stuck:
            since = self._paused_since.setdefault(tp, now)
            if now - since < self.reread_after or tp not in self.assignment():
                continue
            del self._paused_since[tp]
            head = self._committed_offset.get(tp)
            log.warning("offsets.resume", topic=tp.topic, partition=tp.partition, offset=head)
            self.resume_partitions({tp})
            if head is not None:
                self._spawn(self._reread(tp, head))

    @property
    def _rereads(self) -> set[asyncio.Future[None]]:
        return self._state("_nr_rereads", set)  # type: ignore[no-any-return]

    def _state(self, key: str, factory: Any) -> Any:
        """A piece of this class's own state, created on first use (faust builds the
        consumer through its own ``__init__``, which this class leaves alone)."""
        value = self.__dict__.get(key)
        if value is None:
            value = self.__dict__[key] = factory()
        return value

    def _spawn(self, coro: Any) -> None:
        """Run a seek in the background, kept referenced until it is done."""
        task = asyncio.ensure_future(coro)
        self._rereads.add(task)
        task.add_done_callback(self._rereads.discard)

    async def _reread(self, tp: TP, head: int) -> None:
        if tp not in self.assignment():
            return
        # Offsets already done stay done; the ones after the head are simply read again.
        await self.seek(tp, head)


class SafeTransport(faust_aiokafka.Transport):
    """The aiokafka transport, building :class:`SafeConsumer`."""

    Consumer = SafeConsumer


class FlowControl(FlowControlEvent):
    """faust's flow control of the stream buffers, except that resuming a flow that
    is already running keeps what the buffers hold.

    ``mode``'s ``FlowControlEvent.resume`` clears every stream buffer each time it is
    called, and faust calls it twice in a table recovery: when it starts reading the
    changelogs and again when it is done, after the stream partitions were sought to
    their committed offsets and resumed. Messages fetched in between, of the new
    generation and from the committed offsets, were put in the buffers and then
    silently thrown away by the second call: never processed, never acknowledged. The
    partition's commits then stopped at the first of them until the re-read safeguard
    fired (the 5-18 s take-overs of finding 6 in docs/reliability.md). Clearing is
    needed only when flow was suspended (a rebalance began), and faust already clears
    the buffers explicitly at that moment."""

    def resume(self) -> None:
        """Resume production into the queues; clear them only after a suspension."""
        was_suspended = not self.is_active()
        self._suspend.clear()
        self._resume.set()
        if was_suspended:
            self.clear()


class RelayApp(faust.App):
    """A :class:`faust.App` whose consumer commits only what was processed, and whose
    flow control keeps what a running flow fetched (:class:`FlowControl`)."""

    @cached_property
    def flow_control(self) -> FlowControlEvent:
        """Flow control of the streams (see :class:`FlowControl`)."""
        return FlowControl(loop=self.loop)

    def _new_transport(self) -> Any:
        return SafeTransport(self.conf.broker_consumer, self)

    def _new_producer_transport(self) -> Any:
        return SafeTransport(self.conf.broker_producer, self)
