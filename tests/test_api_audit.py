"""The auditor's endpoints on a real store: the export streams every stored event with
its seq and hashes (JSON lines from which every chain can be recomputed, or CSV), and
verify reports an edited row."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import sqlalchemy as sa
from api_helpers import Harness, declaration, running_api, seed

from notice_relay.audit.chain import GENESIS, event_hash
from notice_relay.audit.queries import EXPORT_FIELDS
from notice_relay.audit.store import events
from notice_relay.models import AuditEvent

pytestmark = pytest.mark.kafka


@pytest.fixture
async def api(relay_env: Any) -> AsyncIterator[Harness]:
    """The API over three declarations' trails."""
    async with running_api(relay_env) as h:
        await seed(h, declaration(1, prefix="au"), outcome="delivered")
        await seed(h, declaration(2, prefix="au"), outcome="failed")
        await seed(h, declaration(3, prefix="au", publisher="pixelboard"))
        yield h


async def test_jsonl_export_holds_every_event_and_recomputes_every_chain(api: Harness) -> None:
    """Each line is an event with seq, prev_hash and hash; recomputing the chains from
    the export alone gives the stored hashes; the count matches the store."""
    res = await api.client.get("/v1/audit/export", params={"format": "jsonl"},
                               headers=api.auth("auditor"))
    assert res.status_code == 200
    assert res.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in res.text.splitlines()]
    async with api.store.engine.connect() as conn:
        stored = (await conn.execute(sa.select(sa.func.count()).select_from(events))).scalar_one()
    assert len(lines) == stored > 10
    prev: dict[str, str] = {}
    for line in lines:
        key = line["declaration_key"]
        seq, prev_hash, digest = line.pop("seq"), line.pop("prev_hash"), line.pop("hash")
        assert prev_hash == prev.get(key, GENESIS)
        assert event_hash(prev_hash, AuditEvent.model_validate(line, strict=False), seq) == digest
        prev[key] = digest
    assert len(prev) == 3


async def test_csv_export_and_one_declaration(api: Harness) -> None:
    """CSV with a header row; ?declaration= limits the export to one trail."""
    res = await api.client.get("/v1/audit/export",
                               params={"format": "csv", "declaration": "artfolio/au-0001"},
                               headers=api.auth("auditor"))
    assert res.status_code == 200
    assert res.headers["content-type"].startswith("text/csv")
    rows = list(csv.reader(io.StringIO(res.text)))
    assert rows[0] == list(EXPORT_FIELDS)
    assert {r[0] for r in rows[1:]} == {"artfolio/au-0001"}
    assert [int(r[1]) for r in rows[1:]] == list(range(1, len(rows)))
    assert all(json.loads(r[EXPORT_FIELDS.index("data")]) is not None for r in rows[1:])


async def test_bad_export_format_is_422(api: Harness) -> None:
    """An unknown format is 422, not a 5xx or an empty file."""
    res = await api.client.get("/v1/audit/export", params={"format": "xml"},
                               headers=api.auth("auditor"))
    assert res.status_code == 422


async def test_verify_reports_an_edited_row(api: Harness) -> None:
    """verify: ok on an untouched store; after a row's data is edited in the database,
    not ok, naming the declaration and seq."""
    res = await api.client.get("/v1/audit/verify", headers=api.auth("auditor"))
    assert res.status_code == 200
    assert res.json() == {"ok": True, "problems": []}
    async with api.store.engine.begin() as conn:
        await conn.execute(events.update()
                           .where(events.c.declaration_key == "artfolio/au-0002",
                                  events.c.seq == 2)
                           .values(data=json.dumps({"fingerprint": "0" * 64})))
    res = await api.client.get("/v1/audit/verify", headers=api.auth("auditor"))
    body = res.json()
    assert res.status_code == 200
    assert body["ok"] is False
    assert {"declaration_key": "artfolio/au-0002", "seq": 2,
            "problem": "event content was altered"} in body["problems"]
