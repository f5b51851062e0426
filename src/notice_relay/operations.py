"""Operator actions: channel health, and enabling or disabling channels.

Each action is an audit event with the operator as its actor; the store projects it
into the channel's health, which every worker reads.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from notice_relay.audit.store import AuditStore
from notice_relay.config import Settings
from notice_relay.connectors import load_developers
from notice_relay.errors import ConfigError, KafkaUnavailable
from notice_relay.health import ChannelHealth, set_enabled
from notice_relay.models import Actor, ActorKind, AuditEvent
from notice_relay.topics import Topics, ensure_topics


async def _health(settings: Settings) -> dict[str, ChannelHealth]:
    store = await AuditStore.open(settings.database_url)
    try:
        rows = await store.channel_health()
    finally:
        await store.close()
    return {h.key: h for h in (ChannelHealth.model_validate(r) for r in rows)}


async def channel_overview(settings: Settings) -> list[dict[str, Any]]:
    """Every configured channel, with its recorded health."""
    states = await _health(settings)
    rows = []
    for dev in load_developers(settings.connectors_dir).values():
        for cfg in dev.channels:
            key = f"{dev.id}/{cfg.name}"
            h = states.get(key) or ChannelHealth(developer_id=dev.id, channel=cfg.name)
            if not cfg.enabled or not dev.enabled:
                state = "off (connector file)"
            elif not h.enabled:
                state = "disabled"
            elif h.failing_since is not None:
                state = "failing"
            else:
                state = "enabled"
            rows.append({
                "key": key, "developer_id": dev.id, "channel": cfg.name, "type": cfg.type,
                "state": state, "enabled": h.enabled,
                "last_success_at": h.last_success_at.isoformat() if h.last_success_at else None,
                "failing_since": h.failing_since.isoformat() if h.failing_since else None,
                "reason": h.reason, "last_error": h.last_error,
                "changed_by": h.changed_by,
                "changed_at": h.changed_at.isoformat() if h.changed_at else None,
            })
    return rows


async def set_channel(settings: Settings, key: str, *, enabled: bool, operator: str,
                      reason: str | None) -> ChannelHealth:
    """Enable or disable ``developer/channel``, audited with the operator as actor.

    Deliveries held for a disabled channel resume within ``hold_recheck`` of the
    workers seeing the change.
    """
    from notice_relay.app import channel_event

    dev_id, sep, name = key.partition("/")
    devs = load_developers(settings.connectors_dir)
    if not sep or dev_id not in devs or name not in [c.name for c in devs[dev_id].channels]:
        raise ConfigError(f"no channel {key!r}: expected DEVELOPER/CHANNEL as in `channels list`")
    await ensure_topics(settings)
    current = (await _health(settings)).get(key) or ChannelHealth(developer_id=dev_id, channel=name)
    now = datetime.now(UTC)
    new = set_enabled(
        current,
        enabled,
        now=now,
        by=f"operator:{operator}",
        reason=reason or (f"enabled by {operator}" if enabled else f"disabled by {operator}"),
    )
    await _publish_audit(
        settings, channel_event(new, now, Actor(kind=ActorKind.OPERATOR, id=operator))
    )
    return new


async def _publish_audit(settings: Settings, event: AuditEvent) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    try:
        await producer.start()
        await producer.send_and_wait(Topics.from_settings(settings).audit,
                                     event.model_dump_json().encode(),
                                     key=event.declaration_key.encode())
    except KafkaError as exc:
        raise KafkaUnavailable(f"cannot write the audit event: {exc}") from exc
    finally:
        await producer.stop()
