"""A worker's stop, bounded in time.

On SIGTERM or SIGINT a faust worker stops its streams, waits for the events in flight,
commits, leaves its consumer group and flushes its producer. With the broker gone
every one of those steps retries for ever: a worker told to stop while Kafka is down
logs connection errors and never exits (faust only acts on the first signal, so a
second SIGTERM changes nothing). A supervisor then has to SIGKILL it, and one that
does not (a shell script, ``docker stop`` with a long timeout, an operator waiting at a
terminal) waits for good.

:class:`BoundedWorker` arms a deadline when the stop begins. If the process is still
there when it expires, it logs ``worker.stop_timeout`` and ends with status
:data:`STOP_TIMEOUT_STATUS`, as a SIGKILL would end it. That is safe by construction:
offsets are committed only past processed messages and the audit trail is rebuilt
from its topic (``docs/reliability.md``, findings 1 and 2), so what was in flight is
processed again by the next worker, exactly as after a crash.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable
from typing import Any

import faust
import structlog

log = structlog.get_logger(__name__)

#: The exit status of a worker whose stop outlived its deadline.
STOP_TIMEOUT_STATUS = 3


class StopDeadline:
    """Ends the process ``seconds`` after :meth:`arm` unless it ended by itself first
    (the timer thread is a daemon: a process that exits does not wait for it).

    ``exit`` is what ends it (``os._exit``: no cleanup, since the cleanup is what hangs).
    """

    def __init__(self, seconds: float, *, exit: Callable[[int], Any] = os._exit) -> None:
        self.seconds = seconds
        self._exit = exit
        self._timer: threading.Timer | None = None

    @property
    def armed(self) -> bool:
        """True once :meth:`arm` ran."""
        return self._timer is not None

    def arm(self) -> None:
        """Start the countdown (once; later calls do nothing). No deadline when
        ``seconds`` is zero or less."""
        if self._timer is not None or self.seconds <= 0:
            return
        self._timer = threading.Timer(self.seconds, self._expire)
        self._timer.name = "stop-deadline"
        self._timer.daemon = True
        self._timer.start()

    def _expire(self) -> None:
        log.error("worker.stop_timeout", seconds=self.seconds, status=STOP_TIMEOUT_STATUS,
                  consequence="exiting without a clean stop; messages not committed are "
                              "processed again by the next worker")
        for stream in (sys.stdout, sys.stderr):
            # A closed or broken stream does not matter now.
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        self._exit(STOP_TIMEOUT_STATUS)


class BoundedWorker(faust.Worker):
    """faust's worker, whose stop ends the process within ``stop_timeout`` seconds."""

    def __init__(self, *args: Any, stop_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stop_deadline = StopDeadline(stop_timeout)

    async def on_stop(self) -> None:
        """The first step of every stop (a signal, a crash): arm the deadline."""
        if not self.stop_deadline.armed:
            log.info("worker.stopping", deadline_s=self.stop_deadline.seconds)
        self.stop_deadline.arm()
        await super().on_stop()
