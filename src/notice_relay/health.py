"""Channel health (pure): when a channel is disabled, and what every worker knows of it.

A channel is disabled when its receiver says it is gone (HTTP 410), when it has failed
without a single success for ``disable_after`` (default 5 days), or by an operator.
A disabled channel keeps its deliveries: they are held, durably, until an operator
enables it again (``notice-relay channels enable DEV/CHANNEL``).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from pydantic import AwareDatetime, BaseModel, ConfigDict

from notice_relay.models import Outcome, OutcomeKind

#: How often, at most, a worker records a channel's latest success (it is news only
#: when the channel was failing, or the last record is old).
SUCCESS_RECORD_INTERVAL = timedelta(minutes=1)


class ChannelHealth(BaseModel):
    """The shared state of one channel (the value of the channels topic)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    developer_id: str
    channel: str
    enabled: bool = True
    reason: str | None = None
    changed_at: AwareDatetime | None = None
    changed_by: str | None = None
    last_success_at: AwareDatetime | None = None
    failing_since: AwareDatetime | None = None
    last_error: str | None = None

    @property
    def key(self) -> str:
        """``developer_id/channel``."""
        return f"{self.developer_id}/{self.channel}"


def after_outcome(
    health: ChannelHealth, outcome: Outcome, *, now: datetime, disable_after: timedelta
) -> ChannelHealth | None:
    """The channel's new state after ``outcome``; None when nothing worth recording
    changed (so a busy healthy channel does not flood the channels topic)."""
    if outcome.kind is OutcomeKind.DELIVERED:
        stale = (health.last_success_at is None
                 or now - health.last_success_at >= SUCCESS_RECORD_INTERVAL)
        if health.failing_since is None and not stale:
            return None
        return health.model_copy(update={"last_success_at": now, "failing_since": None,
                                         "last_error": None})
    if not health.enabled:
        return None
    if outcome.disable_channel:
        return health.model_copy(update={
            "enabled": False, "changed_at": now, "changed_by": "system",
            "reason": f"the receiver says the endpoint is gone: {outcome.error}",
            "last_error": outcome.error,
        })
    if outcome.kind is OutcomeKind.PERMANENT and outcome.status_code is None:
        # A refused address or a broken request: a configuration problem, not a sign
        # that the receiver is failing.
        return None
    since = health.failing_since or now
    if now - since >= disable_after:
        return health.model_copy(update={
            "enabled": False, "changed_at": now, "changed_by": "system",
            "reason": f"no successful delivery for {disable_after} (failing since "
                      f"{since.isoformat()}); last error: {outcome.error}",
            "last_error": outcome.error, "failing_since": since,
        })
    if health.failing_since is None:
        return health.model_copy(update={"failing_since": now, "last_error": outcome.error})
    return None


def set_enabled(health: ChannelHealth, enabled: bool, *, now: datetime, by: str,
                reason: str | None) -> ChannelHealth:
    """An operator's enable or disable. Enabling forgets the failure streak, so a
    channel is not disabled again at once for the failures that disabled it."""
    update: dict[str, object] = {"enabled": enabled, "changed_at": now, "changed_by": by,
                                 "reason": reason}
    if enabled:
        update["failing_since"] = None
    return health.model_copy(update=update)
