"""GET /v1/deliveries over 250 deliveries put in a real SQLite store through
``AuditStore.append``: every filter, keyset pagination that returns each row exactly
once in (updated_at, delivery_id) order, cursors that refuse other filters, and a
query plan that uses ix_deliveries_developer_state_updated."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from api_helpers import Harness, attempt_events, declaration, running_api, seed_events

from notice_relay.audit.queries import DeliveryFilter, decode_cursor, deliveries_query
from notice_relay.audit.store import DeliveryRow
from notice_relay.models import AuditEvent, AuditType, DeliveryState

pytestmark = pytest.mark.kafka

T0 = datetime(2026, 10, 1, 12, 0, tzinfo=UTC)
OUTCOMES = ("delivered", "failed", "retry_scheduled", None)
N_DECLARATIONS = 125  # times 2 developers = 250 deliveries


@pytest.fixture
async def api(relay_env: Any) -> AsyncIterator[Harness]:
    """The API over a store holding 250 deliveries in four states, two per minute."""
    async with running_api(relay_env) as h:
        events: list[AuditEvent] = []
        for i in range(N_DECLARATIONS):
            at = T0 + timedelta(minutes=i)
            notice, evs = seed_events(relay_env, declaration(i, prefix="dl"), at=at)
            events += evs
            outcome = OUTCOMES[i % len(OUTCOMES)]
            if outcome is not None:
                for e in evs:
                    if e.type is AuditType.DELIVERY_PLANNED:
                        assert e.delivery_id
                        assert e.developer_id
                        # Both deliveries of a declaration change at the same instant:
                        # pages must break the tie by delivery id.
                        events += attempt_events(notice, e.delivery_id, e.developer_id,
                                                 attempt=1, outcome=outcome,
                                                 at=at + timedelta(seconds=30))
        assert await h.store.append(events) == len(events)
        assert await h.store.count_deliveries() == 2 * N_DECLARATIONS
        yield h


def _order(rows: list[DeliveryRow]) -> list[str]:
    return [r.delivery_id for r in sorted(rows, key=lambda r: (r.updated_at, r.delivery_id))]


async def _all_pages(api: Harness, who: str, params: dict[str, Any],
                     limit: int) -> tuple[list[dict[str, Any]], int]:
    seen: list[dict[str, Any]] = []
    pages = 0
    cursor = None
    while True:
        q = {**params, "limit": limit, **({"cursor": cursor} if cursor else {})}
        res = await api.client.get("/v1/deliveries", params=q, headers=api.auth(who))
        assert res.status_code == 200, res.text
        body = res.json()
        pages += 1
        seen += body["deliveries"]
        assert len(body["deliveries"]) <= limit
        cursor = body["next_cursor"]
        if cursor is None:
            return seen, pages
        assert pages < 1000


async def test_pages_return_every_delivery_once_in_order(api: Harness) -> None:
    """Paging 37 at a time through all 250 deliveries (operator) yields each exactly once,
    in (updated_at, delivery_id) order, and the last page has no next cursor."""
    rows, pages = await _all_pages(api, "operator", {}, 37)
    assert pages == 7  # 250 / 37 → 6 full pages and one of 28
    ids = [r["delivery_id"] for r in rows]
    assert len(ids) == len(set(ids)) == 250
    assert ids == _order(await api.store.all_deliveries())


async def test_filters_developer_states_and_time_range(api: Harness) -> None:
    """developer + repeated status + since/until select exactly the rows that match,
    across pages."""
    since, until = T0 + timedelta(minutes=20), T0 + timedelta(minutes=90)
    params = {"developer": "acme-ai", "status": ["failed", "retry_scheduled"],
              "since": since.isoformat(), "until": until.isoformat()}
    rows, pages = await _all_pages(api, "auditor", params, 10)
    expected = [r for r in await api.store.all_deliveries()
                if r.developer_id == "acme-ai" and r.state in ("failed", "retry_scheduled")
                and since <= r.updated_at < until]
    assert 20 < len(expected) < 60
    assert pages > 2
    assert [r["delivery_id"] for r in rows] == _order(expected)
    assert all(r["developer_id"] == "acme-ai" for r in rows)


async def test_filter_by_declaration_and_single_state(api: Harness) -> None:
    """A declaration's deliveries; a state alone."""
    res = await api.client.get("/v1/deliveries", params={"declaration": "artfolio/dl-0005"},
                               headers=api.auth("operator"))
    assert res.status_code == 200
    got = res.json()["deliveries"]
    assert {r["developer_id"] for r in got} == {"acme-ai", "brushstroke-labs"}
    assert {r["declaration_key"] for r in got} == {"artfolio/dl-0005"}
    rows, _ = await _all_pages(api, "operator", {"status": "planned"}, 500)
    assert len(rows) == 2 * len(range(3, N_DECLARATIONS, 4))
    assert {r["state"] for r in rows} == {"planned"}


async def test_a_developer_sees_only_its_own_deliveries(api: Harness) -> None:
    """A developer key lists its own deliveries only, with or without naming itself;
    naming another developer is 403."""
    rows, _ = await _all_pages(api, "developer", {}, 500)
    assert len(rows) == N_DECLARATIONS
    assert {r["developer_id"] for r in rows} == {"acme-ai"}
    own, _ = await _all_pages(api, "developer", {"developer": "acme-ai"}, 500)
    assert own == rows
    res = await api.client.get("/v1/deliveries", params={"developer": "brushstroke-labs"},
                               headers=api.auth("developer"))
    assert res.status_code == 403


@pytest.mark.parametrize(("params", "field"), [
    ({"cursor": "not-a-cursor"}, "cursor"),
    ({"cursor": "e30"}, "cursor"),
    ({"limit": 501}, "limit"),
    ({"limit": 0}, "limit"),
    ({"status": "lost"}, "status.0"),
    ({"since": "2026-10-01T12:00:00"}, "since"),
    ({"since": "yesterday"}, "since"),
    ({"since": "2026-10-02T00:00:00Z", "until": "2026-10-01T00:00:00Z"}, "until"),
    ({"developer": "a b"}, "developer"),
    ({"declaration": "no-slash"}, "declaration"),
])
async def test_bad_parameters_are_422_naming_them(api: Harness, params: dict[str, Any],
                                                  field: str) -> None:
    """Malformed cursors, limits over 500, unknown states, times without an offset:
    422 naming the parameter."""
    res = await api.client.get("/v1/deliveries", params=params, headers=api.auth("operator"))
    assert res.status_code == 422, res.text
    assert field in [e["field"] for e in res.json()["errors"]]


async def test_a_cursor_is_refused_with_other_filters(api: Harness) -> None:
    """A cursor resumes the query it was issued for; with other filters it is 422."""
    res = await api.client.get("/v1/deliveries", params={"limit": 5, "status": "failed"},
                               headers=api.auth("operator"))
    cursor = res.json()["next_cursor"]
    assert cursor
    res = await api.client.get("/v1/deliveries", params={"cursor": cursor, "status": "planned"},
                               headers=api.auth("operator"))
    assert res.status_code == 422
    assert "other filters" in res.json()["errors"][0]["message"]


async def _plan(api: Harness, flt: DeliveryFilter, cursor: str | None) -> str:
    stmt = deliveries_query(flt, limit=101, after=decode_cursor(cursor, flt) if cursor else None,
                            dialect=api.store.dialect)
    compiled = stmt.compile(dialect=api.store.engine.dialect,
                            compile_kwargs={"render_postcompile": True})
    params = [compiled.params[name] for name in compiled.positiontup or ()]
    params = [p.astimezone(UTC).replace(tzinfo=None).isoformat(sep=" ")
              if isinstance(p, datetime) else p for p in params]
    async with api.store.engine.connect() as conn:
        rows = (await conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}",
                                           tuple(params))).all()
    return "\n".join(str(r[-1]) for r in rows)


async def test_query_plan_uses_the_developer_state_updated_index(api: Harness) -> None:
    """SQLite answers a developer + states + time range page, first and later ones, by
    searching ix_deliveries_developer_state_updated (no table scan), whichever of the
    two state indexes was created first (an index set has no fixed order)."""
    flt = DeliveryFilter(developer_id="acme-ai",
                         states=(DeliveryState.FAILED, DeliveryState.RETRY_SCHEDULED),
                         since=T0, until=T0 + timedelta(hours=3))
    res = await api.client.get("/v1/deliveries", headers=api.auth("operator"), params={
        "developer": "acme-ai", "status": ["failed", "retry_scheduled"],
        "since": T0.isoformat(), "until": (T0 + timedelta(hours=3)).isoformat(), "limit": 3})
    cursor = res.json()["next_cursor"]
    assert cursor
    for c in (None, cursor):
        plan = await _plan(api, flt, c)
        assert ("SEARCH deliveries USING INDEX ix_deliveries_developer_state_updated "
                "(developer_id=? AND state=? AND updated_at>? AND updated_at<?)") in plan, plan
        assert "SCAN deliveries" not in plan, plan
    one_state = DeliveryFilter(developer_id="acme-ai", states=(DeliveryState.FAILED,))
    plan = await _plan(api, one_state, None)
    assert ("USING INDEX ix_deliveries_developer_state_updated (developer_id=? AND state=?)"
            in plan), plan
