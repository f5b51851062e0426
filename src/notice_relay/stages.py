"""What each stream stage does with one input, as functions over plain values.

The Faust agents in :mod:`notice_relay.app` are thin shells: they read a topic, call
these functions, and send what they return. Keeping the decisions here means they
are tested without Kafka.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from pydantic import BaseModel, ConfigDict, Field

from notice_relay.audit.events import audit_event
from notice_relay.errors import DeclarationInvalid
from notice_relay.models import (
    Actor,
    ActorKind,
    AuditEvent,
    AuditType,
    Declaration,
    DeliveryTask,
    FieldError,
    Notice,
    Outcome,
    OutcomeKind,
    Rejection,
)

#: Default retry schedule (DESIGN.md); tests and connectors override it.
DEFAULT_RETRY_SCHEDULE: tuple[timedelta, ...] = (
    timedelta(seconds=5), timedelta(minutes=5), timedelta(minutes=30), timedelta(hours=2),
    timedelta(hours=5), timedelta(hours=10), timedelta(hours=10),
)


class RelayedNotice(BaseModel):
    """The value of the notices topic: the notice, plus the targets that fan-out
    needs and that are not part of the developers' contract."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    notice: Notice
    targets: list[str] = Field(min_length=1)


@dataclass
class Out:
    """Records a stage wants sent, per logical topic."""

    rejected: list[tuple[str, Rejection]] = field(default_factory=list)
    notices: list[tuple[str, RelayedNotice]] = field(default_factory=list)
    deliveries: list[DeliveryTask] = field(default_factory=list)
    retries: list[DeliveryTask] = field(default_factory=list)
    audit: list[AuditEvent] = field(default_factory=list)

    def extend(self, other: Out) -> Out:
        """Append everything of ``other`` (in order, topic by topic); ``self``."""
        self.rejected += other.rejected
        self.notices += other.notices
        self.deliveries += other.deliveries
        self.retries += other.retries
        self.audit += other.audit
        return self


_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def _peek_ids(raw: bytes) -> tuple[str | None, str | None]:
    """Best effort: the publisher and declaration ids of a declaration that failed
    validation, so its rejection joins the trail of that id when there is one."""
    try:
        doc = json.loads(raw) if len(raw) < 8 * 1024 * 1024 else None
    except (ValueError, RecursionError):
        return None, None
    if not isinstance(doc, dict):
        return None, None
    pub, did = doc.get("publisher_id"), doc.get("declaration_id")
    return (
        pub if isinstance(pub, str) and _ID.match(pub) else None,
        did if isinstance(did, str) and _ID.match(did) else None,
    )


def rejection_key(raw: bytes) -> str:
    """The audit key of a rejected declaration: its own key when its ids can be read,
    else a key derived from its bytes."""
    pub, did = _peek_ids(raw)
    if pub and did:
        return f"{pub}/{did}"
    return f"_unparseable/sha256:{hashlib.sha256(raw).hexdigest()[:32]}"


def reject(raw: bytes, key: str | None, exc: DeclarationInvalid, now: datetime) -> Out:
    """A declaration that breaks the contract: to the rejected topic, and audited."""
    dkey = rejection_key(raw)
    digest = hashlib.sha256(raw).hexdigest()
    rejection = Rejection(
        declaration_key=dkey,
        received_at=now,
        reason=exc.reason,
        errors=exc.errors,
        raw_base64=base64.b64encode(raw).decode("ascii"),
    )
    out = Out()
    out.rejected.append((key or dkey, rejection))
    out.audit.append(audit_event(
        AuditType.DECLARATION_REJECTED, dkey, unique=(digest,), occurred_at=now,
        data={
            "reason": exc.reason,
            "errors": [e.model_dump(mode="json") for e in exc.errors],
            "sha256": digest,
            "size": len(raw),
        },
    ))
    return out


def accept(decl: Declaration, notice: Notice, now: datetime) -> Out:
    """A valid, new declaration: its notice goes on to fan-out, and it is audited."""
    key = decl.declaration_key
    out = Out()
    out.notices.append(
        (notice.artist_key, RelayedNotice(notice=notice, targets=list(decl.targets)))
    )
    common = {"action": decl.action.value, "artist_ref": notice.artist.artist_ref,
              "fingerprint": notice.fingerprint}
    out.audit.append(audit_event(
        AuditType.DECLARATION_RECEIVED, key, occurred_at=now,
        data={**common, "declared_at": decl.declared_at.isoformat()},
    ))
    out.audit.append(audit_event(
        AuditType.DECLARATION_NORMALIZED, key, occurred_at=now,
        data={**common, "notice_id": notice.notice_id, "version": notice.version,
              "uses": [u.value for u in notice.uses], "targets": list(decl.targets),
              # The notice itself is evidence: exactly what developers were sent.
              "notice": notice.model_dump(mode="json", by_alias=True)},
    ))
    if decl.supersedes:
        # The withdrawn declaration's trail says so; its deliveries not yet made are
        # superseded from now on.
        out.audit.append(audit_event(
            AuditType.DECLARATION_WITHDRAWN, f"{decl.publisher_id}/{decl.supersedes}",
            unique=(key,), occurred_at=now,
            data={"withdrawn_by": key, "notice_id": notice.notice_id},
        ))
    return out


def duplicate(decl: Declaration, fingerprint: str, first_fingerprint: str, now: datetime) -> Out:
    """A declaration id seen before: not relayed again; audited, with whether the
    content differs from the first one (a publisher bug worth seeing)."""
    out = Out()
    out.audit.append(audit_event(
        AuditType.DECLARATION_DUPLICATE, decl.declaration_key, unique=(fingerprint,),
        occurred_at=now,
        data={"fingerprint": fingerprint, "first_fingerprint": first_fingerprint,
              "same_content": fingerprint == first_fingerprint},
    ))
    return out


def retry_delay(
    attempt: int,
    schedule: Sequence[timedelta],
    *,
    retry_after: float | None = None,
    jitter: float = 0.2,
    rng: random.Random | None = None,
) -> timedelta | None:
    """The wait before attempt ``attempt + 1``, or None when the schedule is spent.

    ±``jitter`` spreads retries of many deliveries that failed together; a
    receiver's Retry-After is a floor, never shortened by jitter.
    """
    if attempt > len(schedule):
        return None
    base = schedule[attempt - 1].total_seconds()
    r = rng or random
    delay = base * (1 + r.uniform(-jitter, jitter))
    if retry_after is not None:
        delay = max(delay, retry_after)
    return timedelta(seconds=max(0.0, delay))


def on_outcome(
    task: DeliveryTask,
    outcome: Outcome,
    *,
    schedule: Sequence[timedelta] = DEFAULT_RETRY_SCHEDULE,
    slow_down_floor: timedelta = timedelta(seconds=60),
    rng: random.Random | None = None,
) -> Out:
    """Move a delivery on after one attempt: delivered, retry later, or failed."""
    out = Out()
    key = task.declaration_key
    common = {
        "delivery_id": task.delivery_id,
        "developer_id": task.developer_id,
        "occurred_at": outcome.attempted_at,
    }
    attempt_data: dict[str, object] = {
        "attempt": outcome.attempt, "outcome": outcome.kind.value,
        "status_code": outcome.status_code, "latency_ms": round(outcome.latency_ms, 2),
        "channel": task.channel,
    }
    if outcome.error:
        attempt_data["error"] = outcome.error
    out.audit.append(audit_event(AuditType.DELIVERY_ATTEMPTED, key, unique=(outcome.attempt,),
                                 data=attempt_data, **common))  # type: ignore[arg-type]
    if outcome.kind is OutcomeKind.DELIVERED:
        out.audit.append(audit_event(
            AuditType.DELIVERY_DELIVERED, key, unique=(outcome.attempt,),
            data={"attempt": outcome.attempt, "receipt": outcome.receipt,
                  "status_code": outcome.status_code, "channel": task.channel},
            **common,  # type: ignore[arg-type]
        ))
        if outcome.acknowledged:
            out.audit.append(audit_event(
                AuditType.DELIVERY_ACKNOWLEDGED, key, unique=("receipt",),
                actor=Actor(kind=ActorKind.DEVELOPER, id=task.developer_id),
                data={"via": "webhook_receipt", "reference": outcome.receipt,
                      "channel": task.channel},
                **common,  # type: ignore[arg-type]
            ))
        return out
    delay = None
    if outcome.kind is OutcomeKind.TRANSIENT:
        floor = outcome.retry_after
        if outcome.slow_down:
            floor = max(floor or 0.0, slow_down_floor.total_seconds())
        # Jitter drawn from the delivery and attempt: an outcome processed twice (after
        # a crash) schedules its retry for the same moment, and audits the same event.
        rng = rng or random.Random(f"{task.delivery_id}:{outcome.attempt}")  # noqa: S311 - jitter, not security
        delay = retry_delay(outcome.attempt, schedule, retry_after=floor, rng=rng)
    if delay is None:
        why = outcome.error or "failed"
        if outcome.kind is OutcomeKind.TRANSIENT:
            why = f"attempts exhausted ({outcome.attempt}); last error: {why}"
        out.audit.append(audit_event(
            AuditType.DELIVERY_FAILED, key, unique=(outcome.attempt,),
            data={"attempt": outcome.attempt, "error": why, "status_code": outcome.status_code,
                  "channel": task.channel,
                  "transient": outcome.kind is OutcomeKind.TRANSIENT},
            **common,  # type: ignore[arg-type]
        ))
        return out
    due = outcome.attempted_at + delay
    out.retries.append(task.model_copy(update={"attempt": outcome.attempt + 1, "not_before": due}))
    out.audit.append(audit_event(
        AuditType.DELIVERY_RETRY_SCHEDULED, key, unique=(outcome.attempt,),
        data={"attempt": outcome.attempt, "next_attempt": outcome.attempt + 1,
              "next_attempt_at": due.isoformat(), "error": outcome.error,
              "status_code": outcome.status_code, "retry_after": outcome.retry_after,
              "channel": task.channel, "transient": True},
        **common,  # type: ignore[arg-type]
    ))
    return out


def utcnow() -> datetime:
    """Now, in UTC."""
    return datetime.now(UTC)


__all__ = [
    "DEFAULT_RETRY_SCHEDULE",
    "FieldError",
    "RelayedNotice",
    "accept",
    "duplicate",
    "on_outcome",
    "reject",
    "retry_delay",
]
