"""Acknowledgements over HTTP, against the real broker: a valid ack token (POSTed, or
its link followed) or a developer's own delivery id puts an AckRecord on the acks
topic; expired, forged and malformed tokens, and other developers' deliveries, are
refused with a 4xx — never a 5xx."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from api_helpers import Harness, declaration, read_topic, running_api, seed

from notice_relay.acks import AckRecord, load_ack_secret, make_token

pytestmark = pytest.mark.kafka


@pytest.fixture
async def api(relay_env: Any) -> AsyncIterator[Harness]:
    """The API with one declaration delivered to acme-ai and brushstroke-labs."""
    async with running_api(relay_env) as h:
        await seed(h, declaration(1, prefix="ack"), outcome="delivered")
        yield h


def _secret(h: Harness) -> bytes:
    return load_ack_secret(h.env.settings().data_dir)


async def _delivery(h: Harness, developer: str) -> str:
    return next(r.delivery_id for r in await h.store.all_deliveries()
                if r.developer_id == developer)


async def _acks(h: Harness, want: int, within: float = 20.0) -> list[AckRecord]:
    records = await read_topic(h.env.bootstrap, h.topics.acks, want=want, within=within)
    return [AckRecord.model_validate_json(r.value) for r in records]


async def test_a_valid_token_puts_an_ack_record_on_the_acks_topic(api: Harness) -> None:
    """POST {token, reference}: 202, and an AckRecord keyed by the delivery id, for the
    token's developer, with the reference — no API key needed."""
    did = await _delivery(api, "acme-ai")
    token = make_token(_secret(api), did, "acme-ai", datetime.now(UTC) + timedelta(days=30))
    res = await api.client.post("/v1/acks", json={"token": token,
                                                  "reference": "removed from dataset v4"})
    assert res.status_code == 202, res.text
    assert res.json() == {"delivery_id": did, "status": "accepted", "via": "token"}
    [record] = await read_topic(api.env.bootstrap, api.topics.acks)
    assert record.key == did.encode()
    ack = AckRecord.model_validate_json(record.value)
    assert (ack.delivery_id, ack.developer_id, ack.via) == (did, "acme-ai", "token")
    assert ack.reference == "removed from dataset v4"


async def test_following_the_ack_link_acknowledges(api: Harness) -> None:
    """GET /v1/acks?token= (the link in a notice) acknowledges: JSON for programs, a
    small page for browsers, never cached; the record says it came from a link."""
    did = await _delivery(api, "acme-ai")
    token = make_token(_secret(api), did, "acme-ai", datetime.now(UTC) + timedelta(days=30))
    res = await api.client.get("/v1/acks", params={"token": token})
    assert res.status_code == 202
    assert res.json()["via"] == "token_link"
    assert res.headers["Cache-Control"] == "no-store"
    page = await api.client.get("/v1/acks", params={"token": token},
                                headers={"Accept": "text/html,application/xhtml+xml"})
    assert page.status_code == 202
    assert page.headers["content-type"].startswith("text/html")
    assert did in page.text
    acks = await _acks(api, 2)
    assert [a.via for a in acks] == ["token_link", "token_link"]


async def test_a_developer_acknowledges_its_own_delivery_by_id(api: Harness) -> None:
    """POST {delivery_id} with the developer's key: 202 and an AckRecord via api_key."""
    did = await _delivery(api, "acme-ai")
    res = await api.client.post("/v1/acks", json={"delivery_id": did},
                                headers=api.auth("developer"))
    assert res.status_code == 202
    [ack] = await _acks(api, 1)
    assert (ack.delivery_id, ack.developer_id, ack.via) == (did, "acme-ai", "api_key")


def _forge(token: str, **changes: Any) -> str:
    """The token with its payload changed and the old signature kept."""
    v, payload, sig = token.split(".")
    body = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    body.update(changes)
    raw = base64.urlsafe_b64encode(json.dumps(body).encode()).rstrip(b"=").decode()
    return f"{v}.{raw}.{sig}"


async def test_bad_tokens_are_refused(api: Harness) -> None:
    """Expired, forged (payload edited, or signed with another secret) and malformed
    tokens: 401 invalid_token by POST and by link; nothing reaches the acks topic."""
    did = await _delivery(api, "acme-ai")
    other = await _delivery(api, "brushstroke-labs")
    good = make_token(_secret(api), did, "acme-ai", datetime.now(UTC) + timedelta(days=1))
    bad = {
        "expired": make_token(_secret(api), did, "acme-ai",
                              datetime.now(UTC) - timedelta(seconds=1)),
        "edited": _forge(good, d=other, v="brushstroke-labs"),
        "other secret": make_token(b"not-the-relay-secret", did, "acme-ai",
                                   datetime.now(UTC) + timedelta(days=1)),
        "two parts": "v1.abc",
        "bad base64": "v1.%%%.***",
        "not v1": "v2." + good.split(".", 1)[1],
        "huge": "v1." + "a" * 2000 + ".b",
        "empty signature": good.rsplit(".", 1)[0] + ".",
    }
    for name, token in bad.items():
        res = await api.client.post("/v1/acks", json={"token": token})
        assert res.status_code == 401, (name, res.text)
        assert res.json()["error"] == "invalid_token", name
        link = await api.client.get("/v1/acks", params={"token": token})
        assert link.status_code == 401, (name, link.text)
    expired = await api.client.post("/v1/acks", json={"token": bad["expired"]})
    assert "expired" in expired.json()["reason"]
    assert await _acks(api, 1, within=3) == []


async def test_another_developers_delivery_is_404_and_role_checks_hold(api: Harness) -> None:
    """By delivery id: another developer's delivery is 404 like a missing one; a
    non-developer key is 403; no key is 401. Nothing reaches the acks topic."""
    theirs = await _delivery(api, "brushstroke-labs")
    res = await api.client.post("/v1/acks", json={"delivery_id": theirs},
                                headers=api.auth("developer"))
    assert res.status_code == 404
    for who in ("publisher", "operator", "auditor"):
        res = await api.client.post("/v1/acks", json={"delivery_id": theirs},
                                    headers=api.auth(who))
        assert res.status_code == 403
    assert (await api.client.post("/v1/acks", json={"delivery_id": theirs})).status_code == 401
    assert await _acks(api, 1, within=3) == []


@pytest.mark.parametrize("body", [
    {}, {"token": "x", "delivery_id": "y"}, {"delivery_id": "y", "reference": "r" * 501},
    {"token": ""}, {"token": 5}, {"delivery_id": ["a"]}, {"delivery_id": "a b"},
    {"token": "v1.a.b", "extra": 1}, [], "token", None,
])
async def test_malformed_ack_bodies_are_422(api: Harness, body: Any) -> None:
    """Neither or both of token and delivery_id, a reference over 500 characters, wrong
    types, unknown fields: 422 naming what is wrong."""
    res = await api.client.post("/v1/acks", json=body, headers=api.auth("developer"))
    assert res.status_code == 422, res.text
    assert res.json()["errors"]
