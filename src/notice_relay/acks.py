"""Acknowledgements: signed, expiring ack tokens scoped to one delivery, and the
record an acknowledgement puts on the acks topic.

A token is ``v1.<payload>.<signature>``, both base64url without padding; the payload
is ``{"d": delivery_id, "v": developer_id, "e": expiry (unix seconds)}`` and the
signature HMAC-SHA256 over ``"v1." + payload`` with the relay's ack secret. A token
proves nothing but "whoever holds this may acknowledge this one delivery until then".
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
from datetime import UTC, datetime, timedelta
from pathlib import Path

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from notice_relay.errors import ConfigError, NoticeRelayError


class AckTokenInvalid(NoticeRelayError):
    """An ack token that is malformed, forged, expired or for another delivery."""


class AckRecord(BaseModel):
    """The value of the acks topic: one developer's acknowledgement of one delivery."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    delivery_id: str
    developer_id: str
    declaration_key: str | None = Field(
        default=None, description="publisher_id/declaration_id, when the sender knows it.")
    acknowledged_at: AwareDatetime
    reference: str | None = Field(default=None, max_length=500,
                                  description='e.g. "removed from dataset v4"')
    via: str = Field(description="token | api_key | webhook_receipt")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def make_token(secret: bytes, delivery_id: str, developer_id: str, expires_at: datetime) -> str:
    """A token that lets its holder acknowledge ``delivery_id`` until ``expires_at``."""
    payload = _b64(json.dumps({"d": delivery_id, "v": developer_id,
                               "e": int(expires_at.timestamp())},
                              separators=(",", ":"), sort_keys=True).encode())
    sig = hmac.new(secret, f"v1.{payload}".encode(), hashlib.sha256).digest()
    return f"v1.{payload}.{_b64(sig)}"


def verify_token(secret: bytes, token: str, *, now: datetime | None = None) -> tuple[str, str]:
    """``(delivery_id, developer_id)`` of a valid token; raises AckTokenInvalid otherwise.

    The signature is compared in constant time, before the payload is trusted.
    """
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != "v1" or len(token) > 2048:
        raise AckTokenInvalid("malformed ack token")
    try:
        sig = _unb64(parts[2])
    except ValueError:
        raise AckTokenInvalid("malformed ack token") from None
    want = hmac.new(secret, f"v1.{parts[1]}".encode(), hashlib.sha256).digest()
    if not hmac.compare_digest(sig, want):
        raise AckTokenInvalid("ack token signature does not verify")
    try:
        body = json.loads(_unb64(parts[1]))
        delivery_id, developer_id, exp = str(body["d"]), str(body["v"]), int(body["e"])
    except (ValueError, KeyError, TypeError):
        raise AckTokenInvalid("malformed ack token") from None
    if (now or datetime.now(UTC)).timestamp() > exp:
        raise AckTokenInvalid("ack token expired")
    return delivery_id, developer_id


def load_ack_secret(data_dir: Path) -> bytes:
    """The ack secret: ``NOTICE_RELAY_ACK_SECRET``, else ``NOTICE_RELAY_ACK_SECRET_FILE``,
    else a file next to the worker's data that is created once (development)."""
    raw = os.environ.get("NOTICE_RELAY_ACK_SECRET")
    if raw:
        return raw.encode()
    path_s = os.environ.get("NOTICE_RELAY_ACK_SECRET_FILE")
    path = Path(path_s) if path_s else data_dir.parent / "ack-secret"
    if path_s and not path.exists():
        raise ConfigError(f"NOTICE_RELAY_ACK_SECRET_FILE: {path} does not exist")
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(32))
    return path.read_text().strip().encode()


def ack_url(public_url: str, token: str) -> str:
    """The link a developer follows (or POSTs to) to acknowledge."""
    return f"{public_url.rstrip('/')}/v1/acks?token={token}"


def due_by(delivered_or_planned: datetime, sla: timedelta) -> datetime:
    """When an acknowledgement is due."""
    return delivered_or_planned + sla
