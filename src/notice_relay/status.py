"""Status queries over the audit store (what ``notice-relay status`` shows)."""

from __future__ import annotations

from typing import Any

from notice_relay.audit.store import AuditStore
from notice_relay.config import Settings


def _detail(data: dict[str, Any]) -> str:
    for key in ("error", "reason", "receipt"):
        if isinstance(data.get(key), str):
            return str(data[key])
    if "status_code" in data and data["status_code"] is not None:
        return f"HTTP {data['status_code']}"
    if isinstance(data.get("fingerprint"), str):
        return f"fingerprint {str(data['fingerprint'])[:16]}"
    return ""


async def declaration_status(settings: Settings, declaration_id: str) -> list[dict[str, Any]]:
    """Every declaration matching ``declaration_id`` with its deliveries and trail."""
    store = await AuditStore.open(settings.database_url)
    try:
        result = []
        for d in await store.find_declarations(declaration_id):
            deliveries = await store.deliveries_of(d.declaration_key)
            trail = await store.trail(d.declaration_key)
            result.append({
                "declaration_key": d.declaration_key,
                "publisher_id": d.publisher_id,
                "declaration_id": d.declaration_id,
                "status": d.status,
                "action": d.action,
                "fingerprint": d.fingerprint,
                "reason": d.reason,
                "received_at": d.received_at.isoformat(),
                "deliveries": [
                    {
                        "delivery_id": x.delivery_id, "developer_id": x.developer_id,
                        "channel": x.channel, "channel_type": x.channel_type, "state": x.state,
                        "attempts": x.attempts, "last_status_code": x.last_status_code,
                        "last_error": x.last_error, "receipt": x.receipt,
                        "delivered_at": x.delivered_at.isoformat() if x.delivered_at else None,
                    }
                    for x in deliveries
                ],
                "trail": [
                    {
                        "seq": s.seq, "type": s.event.type.value,
                        "occurred_at": s.event.occurred_at.isoformat(),
                        "actor": f"{s.event.actor.kind.value}:{s.event.actor.id}",
                        "delivery_id": s.event.delivery_id, "developer_id": s.event.developer_id,
                        "detail": _detail(s.event.data), "data": s.event.data,
                        "hash": s.hash, "prev_hash": s.prev_hash,
                    }
                    for s in trail
                ],
            })
        return result
    finally:
        await store.close()
