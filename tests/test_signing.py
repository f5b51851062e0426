"""Standard Webhooks signing, checked against the reference library."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import time

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from notice_relay.signing import decode_secret, sign, verify, webhook_headers


def _secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(32)).decode()


BODY = b'{"schema":"notice-relay/notice/v1","notice_id":"n-1","artist":{"display_name":"\xc3\xa9"}}'


def test_signature_verifies_with_the_reference_library() -> None:
    """What we sign, the Standard Webhooks reference implementation accepts."""
    secret = _secret()
    headers = webhook_headers([secret], "dlv-1", BODY)
    assert Webhook(secret).verify(BODY, headers) == {
        "schema": "notice-relay/notice/v1",
        "notice_id": "n-1",
        "artist": {"display_name": "é"},
    }


def test_headers_carry_id_timestamp_signature_and_content_type() -> None:
    """webhook_headers gives the three Standard Webhooks headers plus JSON content type."""
    headers = webhook_headers([_secret()], "dlv-7", BODY, timestamp=1_700_000_000)
    assert headers["webhook-id"] == "dlv-7"
    assert headers["webhook-timestamp"] == "1700000000"
    assert headers["webhook-signature"].startswith("v1,")
    assert headers["content-type"] == "application/json"


def test_two_active_secrets_give_two_signatures_each_accepted() -> None:
    """During a key rotation a receiver holding either key accepts the message."""
    old, new = _secret(), _secret()
    headers = webhook_headers([old, new], "dlv-2", BODY)
    assert len(headers["webhook-signature"].split(" ")) == 2
    Webhook(old).verify(BODY, headers)
    Webhook(new).verify(BODY, headers)


def test_tampered_body_fails_verification() -> None:
    """A changed body does not verify, with the reference library or ours."""
    secret = _secret()
    headers = webhook_headers([secret], "dlv-3", BODY)
    tampered = BODY.replace(b"n-1", b"n-2")
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(tampered, headers)
    assert not verify([secret], tampered, headers)


def test_wrong_secret_fails_verification() -> None:
    """A receiver with another key rejects the message."""
    headers = webhook_headers([_secret()], "dlv-4", BODY)
    other = _secret()
    with pytest.raises(WebhookVerificationError):
        Webhook(other).verify(BODY, headers)
    assert not verify([other], BODY, headers)


def test_changed_id_or_timestamp_fails_verification() -> None:
    """The id and the timestamp are signed too: a replay under another id fails."""
    secret = _secret()
    headers = webhook_headers([secret], "dlv-5", BODY)
    assert not verify([secret], BODY, {**headers, "webhook-id": "dlv-6"})
    later = str(int(headers["webhook-timestamp"]) + 1)
    assert not verify([secret], BODY, {**headers, "webhook-timestamp": later})


def test_our_verify_accepts_what_we_sign_and_respects_tolerance() -> None:
    """verify() accepts a fresh signature, with either key, and refuses stale ones."""
    old, new = _secret(), _secret()
    now = int(time.time())
    headers = webhook_headers([old, new], "dlv-8", BODY, timestamp=now)
    assert verify([new], BODY, headers)
    assert verify([old], BODY, headers, now=now + 299)
    assert not verify([old], BODY, headers, now=now + 301)
    assert not verify([old], BODY, {k: v for k, v in headers.items() if k != "webhook-id"})
    assert not verify([old], BODY, {**headers, "webhook-timestamp": "soon"})


def test_sign_is_hmac_sha256_over_id_timestamp_body() -> None:
    """The signed content is exactly "id.timestamp." + body, computed here by hand so
    the format cannot drift together with the reference library's; bytes keys and
    whsec_ strings of the same key sign alike."""
    key = bytes(range(32))
    body = b'{"test": 2432232314}'
    digest = hmac.new(key, b"msg_1.1614265330." + body, hashlib.sha256).digest()
    expected = "v1," + base64.b64encode(digest).decode()
    assert sign([key], "msg_1", 1_614_265_330, body) == expected
    whsec = "whsec_" + base64.b64encode(key).decode()
    assert sign([whsec], "msg_1", 1_614_265_330, body) == expected


def test_secrets_are_decoded_with_or_without_prefix_and_padding() -> None:
    """A whsec_ secret with its padding stripped still decodes; bad base64 is an error
    that does not echo the secret."""
    key = os.urandom(32)
    encoded = base64.b64encode(key).decode()
    assert decode_secret("whsec_" + encoded.rstrip("=")) == key
    assert decode_secret(encoded) == key
    assert decode_secret(key) == key
    with pytest.raises(ValueError, match="not valid base64") as caught:
        decode_secret("whsec_not*base64!")
    assert "not*base64" not in str(caught.value)
    with pytest.raises(ValueError, match="at least one"):
        sign([], "id", 0, b"")
