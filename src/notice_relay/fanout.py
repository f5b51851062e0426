"""Fan-out planning (pure): which developer gets a notice, over which channel.

A notice goes to every developer its declaration targets (``*`` = every registered
developer) whose ``accepts`` shares at least one use with it, once per enabled
channel of that developer. A developer that accepts none of the uses is skipped,
and the skip is audited, so an auditor can see why a developer was not told.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from notice_relay.audit.events import audit_event
from notice_relay.connectors import Developer
from notice_relay.models import AckInfo, AuditEvent, AuditType, ChannelType, DeliveryTask, Notice

#: Builds the ack block of one delivery: (delivery_id, developer, planned_at) → AckInfo.
AckFor = Callable[[str, Developer, datetime], AckInfo]


def delivery_id(notice_id: str, developer_id: str, channel: str) -> str:
    """The stable id of one delivery; it is the ``webhook-id`` receivers dedupe on."""
    h = hashlib.sha256(f"{notice_id}\x1f{developer_id}\x1f{channel}".encode()).hexdigest()
    return f"dlv_{h[:32]}"


@dataclass
class Plan:
    """The outcome of fan-out for one notice."""

    tasks: list[DeliveryTask] = field(default_factory=list)
    events: list[AuditEvent] = field(default_factory=list)


def plan_deliveries(
    notice: Notice,
    targets: Collection[str],
    developers: Mapping[str, Developer],
    *,
    now: datetime,
    supported: Collection[ChannelType] = tuple(ChannelType),
    ack_for: AckFor | None = None,
) -> Plan:
    """Plan one delivery task per targeted developer and enabled channel."""
    plan = Plan()
    key = notice.declaration_key
    wanted = sorted(developers) if "*" in targets else sorted(set(targets))
    for dev_id in wanted:
        dev = developers.get(dev_id)
        if dev is None:
            plan.events.append(audit_event(
                AuditType.DELIVERY_SKIPPED, key, unique=(dev_id,), developer_id=dev_id,
                delivery_id=delivery_id(notice.notice_id, dev_id, "-"), occurred_at=now,
                data={"reason": f"developer {dev_id!r} is not registered", "channel": "-",
                      "channel_type": "-"},
            ))
            continue
        shared = set(notice.uses) & set(dev.accepts)
        channels = [c for c in dev.channels if c.enabled] if dev.enabled else []
        reason = None
        if not shared:
            reason = "accepts none of the declared uses"
        elif not channels:
            reason = "has no enabled channel"
        if reason is not None:
            plan.events.append(audit_event(
                AuditType.DELIVERY_SKIPPED, key, unique=(dev_id,), developer_id=dev_id,
                delivery_id=delivery_id(notice.notice_id, dev_id, "-"), occurred_at=now,
                data={"reason": f"{dev_id} {reason}", "channel": "-", "channel_type": "-",
                      "uses": [u.value for u in notice.uses],
                      "accepts": [u.value for u in dev.accepts]},
            ))
            continue
        for ch in channels:
            did = delivery_id(notice.notice_id, dev_id, ch.name)
            ctype = ChannelType(ch.type)
            if ctype not in supported:
                plan.events.append(audit_event(
                    AuditType.DELIVERY_SKIPPED, key, developer_id=dev_id, delivery_id=did,
                    occurred_at=now,
                    data={"reason": f"{ctype.value} channels are not supported by this worker",
                          "channel": ch.name, "channel_type": ctype.value},
                ))
                continue
            sent = notice if ack_for is None else notice.model_copy(
                update={"ack": ack_for(did, dev, now)})
            plan.tasks.append(DeliveryTask(
                delivery_id=did, notice=sent, developer_id=dev_id, channel=ch.name,
                channel_type=ctype, attempt=1, planned_at=now,
            ))
            plan.events.append(audit_event(
                AuditType.DELIVERY_PLANNED, key, developer_id=dev_id, delivery_id=did,
                occurred_at=now,
                data={"channel": ch.name, "channel_type": ctype.value,
                      "notice_id": notice.notice_id, "fingerprint": notice.fingerprint},
            ))
    return plan
