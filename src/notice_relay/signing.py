"""Standard Webhooks signatures (https://www.standardwebhooks.com/), pure functions.

A receiver verifies a notice with any Standard Webhooks library: the signed content is
``f"{webhook-id}.{webhook-timestamp}."`` followed by the exact body bytes, signed with
HMAC-SHA256 and sent as ``v1,<base64>``. During a key rotation a channel holds several
secrets and sends one signature per secret, space-separated, so a receiver holding
either the old or the new key accepts the message.

Secrets are given either as ``bytes`` (the raw key) or as ``str`` in the Standard
Webhooks form ``whsec_<base64>`` (the prefix is optional here, as in the reference
library; :func:`notice_relay.connectors.resolve_secret` insists on it in configuration).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Mapping, Sequence

__all__ = [
    "SECRET_PREFIX",
    "decode_secret",
    "sign",
    "verify",
    "webhook_headers",
]

SECRET_PREFIX = "whsec_"  # noqa: S105 -- the Standard Webhooks prefix, not a secret
#: How far a ``webhook-timestamp`` may be from the receiver's clock (the spec's default).
DEFAULT_TOLERANCE_SECONDS = 300


def decode_secret(secret: bytes | str) -> bytes:
    """Return the raw key of ``secret`` (``bytes`` as is; ``str`` as ``[whsec_]<base64>``).

    Raises :class:`ValueError` (without the secret in the message) when a string is not
    base64 or the key is empty.
    """
    if isinstance(secret, bytes):
        key = secret
    else:
        encoded = secret.removeprefix(SECRET_PREFIX)
        # Secrets are often copied without their "=" padding; restore it before the
        # strict decode, which otherwise refuses them.
        padded = encoded + "=" * (-len(encoded) % 4)
        try:
            key = base64.b64decode(padded, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("a webhook secret is not valid base64") from None
    if not key:
        raise ValueError("a webhook secret is empty")
    return key


def _signed_content(msg_id: str, timestamp: int, body: bytes) -> bytes:
    return f"{msg_id}.{timestamp}.".encode() + body


def _signature(key: bytes, content: bytes) -> bytes:
    return hmac.new(key, content, hashlib.sha256).digest()


def sign(secrets: Sequence[bytes | str], msg_id: str, timestamp: int, body: bytes) -> str:
    """Return the ``webhook-signature`` header value: ``v1,<sig>`` per secret, space-separated."""
    if not secrets:
        raise ValueError("at least one webhook secret is required to sign")
    content = _signed_content(msg_id, timestamp, body)
    return " ".join(
        "v1," + base64.b64encode(_signature(decode_secret(secret), content)).decode("ascii")
        for secret in secrets
    )


def webhook_headers(
    secrets: Sequence[bytes | str],
    msg_id: str,
    body: bytes,
    timestamp: int | None = None,
) -> dict[str, str]:
    """The Standard Webhooks headers for one attempt to send ``body``.

    ``timestamp`` (Unix seconds) defaults to now: each attempt is signed afresh, because
    receivers refuse timestamps older than a few minutes and retries come much later.
    """
    if timestamp is None:
        timestamp = int(time.time())
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secrets, msg_id, timestamp, body),
        "content-type": "application/json",
    }


def verify(
    secrets: Sequence[bytes | str],
    body: bytes,
    headers: Mapping[str, str],
    *,
    now: float | None = None,
    tolerance: float = DEFAULT_TOLERANCE_SECONDS,
) -> bool:
    """Whether ``headers`` carry a valid signature of ``body`` by any of ``secrets``.

    For notice-relay's own receivers and tests. False when a header is missing or
    malformed, the timestamp is further than ``tolerance`` seconds from ``now``, or no
    ``v1`` signature matches; comparisons are constant-time.
    """
    lowered = {name.lower(): value for name, value in headers.items()}
    msg_id = lowered.get("webhook-id")
    stamp = lowered.get("webhook-timestamp")
    header = lowered.get("webhook-signature")
    if not msg_id or not stamp or not header:
        return False
    try:
        timestamp = int(stamp)
    except ValueError:
        return False
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance:
        return False

    content = _signed_content(msg_id, timestamp, body)
    expected = [_signature(decode_secret(secret), content) for secret in secrets]
    for candidate in header.split():
        version, _, encoded = candidate.partition(",")
        if version != "v1":
            # Other versions (e.g. asymmetric "v1a") are not ours to check; skip, as the
            # spec says, rather than fail the whole header.
            continue
        try:
            given = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            continue
        if any(hmac.compare_digest(given, want) for want in expected):
            return True
    return False
