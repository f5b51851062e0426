"""POST /v1/declarations against the real broker: the stream's validation, a 202 with
the notice id and fingerprint, the raw declaration really on the declarations topic
keyed by artist, idempotency on the declaration id, and 4xx (never 5xx) for anything
bad — invalid, oversize, garbage, or posted as another publisher."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from api_helpers import Harness, declaration, read_topic, running_api

from notice_relay.normalize import normalize
from notice_relay.validate import parse_declaration

pytestmark = pytest.mark.kafka


@pytest.fixture
async def api(relay_env: Any) -> AsyncIterator[Harness]:
    """The API on the test's store and topics."""
    async with running_api(relay_env) as h:
        yield h


async def test_valid_declaration_is_published_and_answered_202(api: Harness) -> None:
    """A valid declaration: 202 with the declaration key, notice id and the same
    fingerprint the stream computes; the posted bytes are on the declarations topic,
    keyed publisher_id/artist_id."""
    decl = declaration(1)
    raw = json.dumps(decl).encode()
    res = await api.client.post("/v1/declarations", content=raw, headers=api.auth("publisher"))
    assert res.status_code == 202, res.text
    body = res.json()
    expected = normalize(parse_declaration(raw), relayed_at=parse_declaration(raw).declared_at)
    assert body == {"declaration_key": "artfolio/api-0001", "notice_id": expected.notice_id,
                    "fingerprint": expected.fingerprint, "status": "accepted"}
    [record] = await read_topic(api.env.bootstrap, api.topics.declarations)
    assert record.key == b"artfolio/api-artist-1"
    assert record.value == raw


async def test_repeat_answers_the_first_result_and_publishes_once(api: Harness) -> None:
    """The same declaration id again — even with other content — gets the first answer
    (marked Idempotent-Replayed) and is not published again."""
    decl = declaration(2)
    first = await api.client.post("/v1/declarations", json=decl, headers=api.auth("publisher"))
    assert first.status_code == 202
    changed = {**decl, "uses": ["data-mining"]}
    for body in (decl, changed):
        again = await api.client.post("/v1/declarations", json=body,
                                      headers=api.auth("publisher"))
        assert again.status_code == 202
        assert again.json() == first.json()
        assert again.headers["Idempotent-Replayed"] == "true"
    records = await read_topic(api.env.bootstrap, api.topics.declarations, want=2, within=5)
    assert len(records) == 1


async def test_declaration_already_relayed_by_the_stream_is_not_published_again(
    api: Harness,
) -> None:
    """A declaration id the stream already relayed (published straight to Kafka)
    answers with the stored fingerprint and is not published again."""
    from api_helpers import seed

    decl = declaration(3)
    notice, _ = await seed(api, decl)
    res = await api.client.post("/v1/declarations", json=decl, headers=api.auth("publisher"))
    assert res.status_code == 202
    assert res.json()["fingerprint"] == notice.fingerprint
    assert res.headers["Idempotent-Replayed"] == "true"
    assert await read_topic(api.env.bootstrap, api.topics.declarations, within=3) == []


async def test_invalid_declaration_is_422_naming_each_field(api: Harness) -> None:
    """An invalid declaration: 422 with the stream's reason and each offending field,
    including unknown targets checked against the registry."""
    decl = declaration(4)
    decl.update(uses=[], targets=["no-such-developer"], all_work=True)
    res = await api.client.post("/v1/declarations", json=decl, headers=api.auth("publisher"))
    assert res.status_code == 422
    body = res.json()
    assert body["error"] == "invalid_declaration"
    fields = {e["field"] for e in body["errors"]}
    assert {"uses", "all_work"} <= fields
    assert body["reason"]
    decl = declaration(5, targets=["no-such-developer"])
    res = await api.client.post("/v1/declarations", json=decl, headers=api.auth("publisher"))
    assert res.status_code == 422
    assert [e["field"] for e in res.json()["errors"]] == ["targets.0"]
    assert await read_topic(api.env.bootstrap, api.topics.declarations, within=3) == []


async def test_posting_as_another_publisher_is_403_whether_or_not_it_exists(
    api: Harness,
) -> None:
    """A publisher may post its own declarations only: another publisher id is 403, the
    same answer for a registered and an unregistered one."""
    answers = []
    for other in ("pixelboard", "no-such-publisher"):
        res = await api.client.post("/v1/declarations", json=declaration(6, publisher=other),
                                    headers=api.auth("publisher"))
        assert res.status_code == 403
        answers.append(res.json()["reason"])
    assert answers[0] == answers[1]


async def test_unregistered_publisher_key_posting_as_itself_is_422(relay_env: Any) -> None:
    """A key whose publisher is not in the registry: its declarations are invalid on
    publisher_id, as the stream would reject them."""
    async with running_api(relay_env) as h:
        from notice_relay.keys import create_key

        _, key = await create_key(h.store, "publisher", "ghost")
        res = await h.client.post("/v1/declarations", json=declaration(7, publisher="ghost"),
                                  headers=h.auth(key))
        assert res.status_code == 422
        assert [e["field"] for e in res.json()["errors"]] == ["publisher_id"]


async def test_oversize_bodies_are_413(api: Harness) -> None:
    """A declaration over 8 MiB, or another body over 64 KiB, is 413 — refused by its
    Content-Length or, without one, as it streams in."""
    big = b"{" + b" " * (8 * 1024 * 1024) + b"}"
    res = await api.client.post("/v1/declarations", content=big, headers=api.auth("publisher"))
    assert res.status_code == 413
    assert res.json()["error"] == "payload_too_large"

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(9):
            yield b" " * (1024 * 1024)

    res = await api.client.post("/v1/declarations", content=chunks(),
                                headers=api.auth("publisher"))
    assert res.status_code == 413
    res = await api.client.post("/v1/replays", content=b"{" + b" " * 70_000 + b"}",
                                headers={**api.auth("operator"),
                                         "Content-Type": "application/json"})
    assert res.status_code == 413


@pytest.mark.parametrize("raw", [
    b"", b"not json", b"\xff\xfe\x00", b"[" * 100_000, b'{"a":' * 50_000, b"null", b"[]",
    b'{"schema": "notice-relay/declaration/v1"}', b"\x00" * 100, "💥".encode() * 1000,
], ids=lambda r: repr(r[:10]))
async def test_garbage_is_4xx_never_5xx(api: Harness, raw: bytes) -> None:
    """Whatever bytes are posted, to every endpoint that takes a body, the answer is a
    4xx with the error body, never a 5xx (the channel endpoints' body is optional: an
    empty one, or null, is fine there)."""
    targets = [("/v1/declarations", "publisher"), ("/v1/replays", "operator"),
               ("/v1/acks", "developer")]
    if raw not in (b"", b"null"):
        targets.append(("/v1/channels/acme-ai/webhook/disable", "operator"))
    for path, who in targets:
        for ctype in ("application/json", "text/plain"):
            res = await api.client.post(path, content=raw,
                                        headers={**api.auth(who), "Content-Type": ctype})
            assert 400 <= res.status_code < 500, (path, res.status_code, res.text[:300])
            body = res.json()
            assert set(body) == {"error", "reason", "errors"}, body


async def test_concurrent_repeats_all_get_one_answer(api: Harness) -> None:
    """Five identical posts at once: every answer is 202 with the same body (the first
    stored answer wins any race)."""
    import asyncio

    decl = declaration(8)
    answers = await asyncio.gather(*(
        api.client.post("/v1/declarations", json=decl, headers=api.auth("publisher"))
        for _ in range(5)))
    assert {a.status_code for a in answers} == {202}
    assert len({a.text for a in answers}) == 1


async def test_the_api_tables_are_created_with_the_store(api: Harness) -> None:
    """Opening the store from the API creates its own tables beside the store's."""
    import sqlalchemy as sa

    async with api.store.engine.connect() as conn:
        names = await conn.run_sync(lambda c: sa.inspect(c).get_table_names())
    assert {"api_keys", "api_ingest_results", "deliveries", "audit_events"} <= set(names)
