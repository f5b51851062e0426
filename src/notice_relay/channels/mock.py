"""An in-memory channel with scripted outcomes, for unit tests of delivery logic
(retries, state transitions, disabling channels). End-to-end tests use real servers.

::

    channel = MockChannel("webhook")
    channel.script("d-1", fail_transient(retry_after=5), deliver("r-1"))
    await channel.send([task])      # -> transient, retry_after 5
    await channel.send([task])      # -> delivered, receipt "r-1"
    await channel.send([task])      # -> the default: delivered, receipt "mock"
    channel.sent                    # every task received, in order
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Callable, Sequence

from notice_relay.models import DeliveryTask, Outcome

__all__ = ["MockChannel", "Script", "deliver", "fail_permanent", "fail_transient"]

Script = Callable[[DeliveryTask], Outcome]
"""How the mock answers one attempt: a function from the task to its outcome."""


def deliver(receipt: str = "mock") -> Script:
    """Answer: delivered, with ``receipt``."""
    return lambda task: Outcome.delivered(task, receipt=receipt, status_code=200)


def fail_transient(
    error: str = "mock transient failure",
    *,
    retry_after: float | None = None,
    status_code: int | None = None,
) -> Script:
    """Answer: a transient failure (worth retrying)."""
    return lambda task: Outcome.transient(
        task, error, retry_after=retry_after, status_code=status_code
    )


def fail_permanent(
    error: str = "mock permanent failure",
    *,
    disable_channel: bool = False,
    status_code: int | None = None,
) -> Script:
    """Answer: a permanent failure; ``disable_channel`` as a 410 would set it."""
    return lambda task: Outcome.permanent(
        task, error, disable_channel=disable_channel, status_code=status_code
    )


class MockChannel:
    """A :class:`~notice_relay.channels.base.Channel` that records what it is sent and
    answers from a script: per delivery id, queued answers are used one per attempt,
    then ``default`` (delivered, unless given)."""

    def __init__(self, name: str = "mock", *, default: Script | None = None) -> None:
        self.name = name
        self.default: Script = default or deliver()
        self.batches: list[list[DeliveryTask]] = []
        self.closed = False
        self._scripts: defaultdict[str, deque[Script]] = defaultdict(deque)

    def script(self, delivery_id: str, *answers: Script) -> None:
        """Queue ``answers`` for the next attempts of ``delivery_id``, in order."""
        self._scripts[delivery_id].extend(answers)

    @property
    def sent(self) -> list[DeliveryTask]:
        """Every task received, in order, across batches."""
        return [task for batch in self.batches for task in batch]

    async def send(self, tasks: Sequence[DeliveryTask]) -> list[Outcome]:
        """Record ``tasks`` and answer each from its script."""
        if self.closed:
            raise RuntimeError(f"mock channel {self.name!r} is closed")
        self.batches.append(list(tasks))
        outcomes = []
        for task in tasks:
            queued = self._scripts.get(task.delivery_id)
            answer = queued.popleft() if queued else self.default
            outcomes.append(answer(task))
        return outcomes

    async def aclose(self) -> None:
        """Mark the channel closed. Idempotent."""
        self.closed = True
