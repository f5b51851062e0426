"""The one interface every outbound channel implements, and the pure rules shared by
the HTTP channels: how a status code and a ``Retry-After`` header become an outcome.

A channel is handed a batch of delivery tasks and returns exactly one
:class:`~notice_relay.models.Outcome` per task, in the same order. A failure of one
task is that task's outcome, never an exception: the deliver stage must be able to
produce an outcome for every task of a batch before it commits the batch's offsets.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Final, Protocol, runtime_checkable

from notice_relay.errors import ChannelError
from notice_relay.models import DeliveryTask, Outcome, OutcomeKind

__all__ = [
    "MAX_RETRY_AFTER",
    "Channel",
    "RateLimiter",
    "StatusVerdict",
    "classify_status",
    "outcome_from_error",
    "outcome_from_status",
    "parse_retry_after",
    "sanitize_text",
    "user_agent",
]

#: The longest wait a receiver can ask for (seconds). Beyond it the retry schedule's
#: own step applies: a mistaken or hostile ``Retry-After: 99999999`` must not park a
#: delivery for years.
MAX_RETRY_AFTER: Final = 24 * 3600.0

# Statuses that mean "not now" rather than "never" (RFC 9110, RFC 8470, RFC 6585).
_TRANSIENT_4XX: Final = frozenset({408, 425, 429})


@runtime_checkable
class Channel(Protocol):
    """Sends delivery tasks to one channel of one developer."""

    name: str

    async def send(self, tasks: Sequence[DeliveryTask]) -> list[Outcome]:
        """Attempt every task; one outcome per task, in order. Raises only for misuse
        (e.g. a closed channel), never because an attempt failed."""
        ...

    async def aclose(self) -> None:
        """Release connections. Idempotent."""
        ...


def user_agent() -> str:
    """``notice-relay/<version>``, as sent to receivers so they can tell who calls."""
    try:
        return f"notice-relay/{version('notice-relay')}"
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "notice-relay/0+unknown"


@dataclass(frozen=True, slots=True)
class StatusVerdict:
    """What an HTTP status means for a delivery."""

    kind: OutcomeKind
    error: str | None = None
    retry_after: float | None = None
    disable_channel: bool = False


def parse_retry_after(
    value: str | None, *, now: datetime | None = None, cap: float = MAX_RETRY_AFTER
) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delay-seconds or an HTTP-date).

    ``None`` when absent or unreadable; a date in the past gives 0; the result is
    capped at ``cap``.
    """
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        seconds = float(value)
    else:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # "-0000" dates parse as naive; HTTP-dates are GMT
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), cap)


def classify_status(
    status: int,
    reason: str = "",
    *,
    retry_after: str | None = None,
    now: datetime | None = None,
) -> StatusVerdict:
    """Map an HTTP response status to an outcome kind.

    2xx delivered; 408, 425, 429 and 5xx transient (``Retry-After`` honoured); 410
    permanent and the channel should be disabled; 3xx permanent (redirects are not
    followed: a signed notice goes only where the operator configured); any other
    status permanent.
    """
    line = f"HTTP {status} {reason}".rstrip()
    if 200 <= status < 300:
        return StatusVerdict(OutcomeKind.DELIVERED)
    if status in _TRANSIENT_4XX or 500 <= status < 600:
        return StatusVerdict(
            OutcomeKind.TRANSIENT, line, retry_after=parse_retry_after(retry_after, now=now)
        )
    if status == 410:
        return StatusVerdict(
            OutcomeKind.PERMANENT,
            f"{line}: the receiver says this endpoint is gone; the channel should be disabled",
            disable_channel=True,
        )
    if 300 <= status < 400:
        return StatusVerdict(OutcomeKind.PERMANENT, f"{line}: redirects are not followed")
    return StatusVerdict(OutcomeKind.PERMANENT, line)


def outcome_from_status(
    task: DeliveryTask,
    status: int,
    verdict: StatusVerdict,
    *,
    attempted_at: datetime,
    latency_ms: float,
    receipt: str | None = None,
    detail: str | None = None,
) -> Outcome:
    """The outcome of an attempt that got an HTTP response. ``detail`` (e.g. the start
    of an error body) is appended to the error text."""
    common: dict[str, Any] = {
        "attempted_at": attempted_at,
        "latency_ms": latency_ms,
        "status_code": status,
    }
    if verdict.kind is OutcomeKind.DELIVERED:
        return Outcome.delivered(task, receipt=receipt, **common)
    error = verdict.error or f"HTTP {status}"
    if detail:
        error = f"{error}: {detail}"
    if verdict.kind is OutcomeKind.TRANSIENT:
        return Outcome.transient(task, error, retry_after=verdict.retry_after,
                                 slow_down=status == 429, **common)
    return Outcome.permanent(task, error, disable_channel=verdict.disable_channel, **common)


def outcome_from_error(
    task: DeliveryTask, error: ChannelError, *, attempted_at: datetime, latency_ms: float
) -> Outcome:
    """The outcome of an attempt that failed with ``error``; its class says whether a
    retry may help (``retriable``)."""
    common: dict[str, Any] = {
        "attempted_at": attempted_at,
        "latency_ms": latency_ms,
        "status_code": error.status_code,
    }
    if error.retriable:
        return Outcome.transient(task, str(error), retry_after=error.retry_after,
                                 slow_down=error.slow_down, **common)
    return Outcome.permanent(task, str(error), **common)


class RateLimiter:
    """Spaces the starts of requests to at most ``per_second`` per second.

    Each caller reserves the next free slot and sleeps until it; reservations are
    made in arrival order, so no caller starves. Per process: each worker holding the
    channel enforces its own limit.
    """

    def __init__(self, per_second: float) -> None:
        if per_second <= 0:
            raise ValueError("per_second must be positive")
        self._interval = 1.0 / per_second
        self._next = 0.0

    async def acquire(self) -> None:
        """Wait for this caller's slot."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        slot = max(now, self._next)
        self._next = slot + self._interval
        if slot > now:
            await asyncio.sleep(slot - now)


def sanitize_text(value: str, limit: int = 512) -> str:
    """``value`` made safe to store and print: control characters replaced, capped."""
    cleaned = "".join(ch if ch.isprintable() else " " for ch in value).strip()
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 1] + "…"

