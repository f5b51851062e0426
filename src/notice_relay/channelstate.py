"""Every worker's view of channel health, read from the audit store.

Channel health is a projection of the audit trail: ``channel.disabled`` and
``channel.enabled`` events (written by the outcomes stage on a 410 or a failure
streak, or by an operator), and the success/failure streak of delivery events. The
store keeps it in its ``channels`` table; each worker polls that table (a few rows)
every ``poll_interval`` and also applies its own decisions at once, so it never
waits for its own change to come back.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import structlog

from notice_relay.audit.store import AuditStore
from notice_relay.errors import StoreError
from notice_relay.health import ChannelHealth

log = structlog.get_logger("notice_relay.channels")


class ChannelStates:
    """The latest :class:`ChannelHealth` of every channel, kept current."""

    def __init__(
        self, store: Callable[[], Awaitable[AuditStore]], poll_interval: float = 1.0
    ) -> None:
        self._store = store
        self.poll_interval = poll_interval
        self.states: dict[str, ChannelHealth] = {}
        self.ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def get(self, developer_id: str, channel: str) -> ChannelHealth:
        """The state of a channel (enabled, with no history, when never recorded)."""
        return self.states.get(f"{developer_id}/{channel}") or ChannelHealth(
            developer_id=developer_id, channel=channel)

    def set_local(self, health: ChannelHealth) -> None:
        """Apply this worker's own decision at once (the store confirms it later)."""
        self.states[health.key] = health

    async def refresh(self) -> None:
        """Read the store's channel table."""
        store = await self._store()
        rows = await store.channel_health()
        fresh = {}
        for r in rows:
            h = ChannelHealth.model_validate(r)
            fresh[h.key] = h
        for key, h in fresh.items():
            mine = self.states.get(key)
            # A decision of this worker newer than what the store has projected wins
            # until the store catches up.
            if mine is not None and mine.changed_at and (
                h.changed_at is None or mine.changed_at > h.changed_at
            ):
                continue
            self.states[key] = h

    async def _poll(self) -> None:
        while True:
            try:
                await self.refresh()
                self.ready.set()
            except (StoreError, OSError) as exc:
                log.warning("channels.refresh_failed", error=str(exc)[:300])
            except Exception:
                log.exception("channels.refresh_failed")
            await asyncio.sleep(self.poll_interval)

    def start(self) -> None:
        """Poll in the background."""
        self._task = asyncio.create_task(self._poll())

    async def wait_ready(self) -> None:
        """Wait for the first successful read."""
        await self.ready.wait()

    async def stop(self) -> None:
        """Stop polling."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
