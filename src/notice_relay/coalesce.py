"""Coalescing sends: what several lanes report within a few milliseconds goes out as
one send.

The deliver stage's lanes finish their chunks independently; a declaration's ten
deliveries finish in ten lanes at about the same time. Each chunk's outcomes lead to
audit events and retries, and each task may be acknowledged only once those are on
their way. A :class:`Coalescer` collects what is submitted during ``window`` seconds,
hands it to ``send`` at once (so one declaration's events from ten lanes make one audit
message), and only then lets every submitter go on: nobody returns before what they
submitted was sent, and a failed send fails every submitter of that round.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")


class Coalescer(Generic[T]):
    """Submissions within ``window`` seconds of the first one are sent together."""

    def __init__(self, send: Callable[[list[T]], Awaitable[None]], window: float) -> None:
        self._send = send
        self.window = window
        self._pending: list[T] = []
        self._round: asyncio.Future[None] | None = None
        self._flushes: set[asyncio.Task[None]] = set()
        #: Rounds sent (for tests and figures).
        self.rounds = 0

    async def submit(self, items: Sequence[T]) -> None:
        """Add ``items`` to the current round; return once that round was sent.

        Raises:
            Exception: whatever the round's send raised.
        """
        self._pending.extend(items)
        if self._round is None:
            self._round = asyncio.get_running_loop().create_future()
            asyncio.get_running_loop().call_later(self.window, self._start_flush, self._round)
        await asyncio.shield(self._round)

    def _start_flush(self, fut: asyncio.Future[None]) -> None:
        batch, self._pending, self._round = self._pending, [], None
        task = asyncio.ensure_future(self._flush(batch, fut))
        self._flushes.add(task)  # a reference, until it is done
        task.add_done_callback(self._flushes.discard)

    async def _flush(self, batch: list[T], fut: asyncio.Future[None]) -> None:
        self.rounds += 1
        try:
            await self._send(batch)
        except Exception as exc:  # every submitter of the round sees it
            fut.set_exception(exc)
            # Retrieved here so that a round nobody waits for any more is not logged
            # as "exception never retrieved".
            fut.exception()
        else:
            fut.set_result(None)
