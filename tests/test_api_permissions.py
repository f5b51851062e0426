"""The permission matrix: every endpoint, by every role (and no key, a malformed key,
an unknown key, a wrong secret, a revoked key), on its own and someone else's data, against
the API running in-process on a real store and the real broker.

401: no valid key. 403: a valid key whose role may not do this. 404: what does not
exist — or belongs to someone else, answered exactly alike."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import pytest_asyncio
from api_helpers import Harness, declaration, running_api, seed
from conftest import Env

from notice_relay.acks import load_ack_secret, make_token
from notice_relay.keys import create_key, revoke_key

pytestmark = [pytest.mark.kafka, pytest.mark.asyncio(loop_scope="module")]

ROLES = ("publisher", "other_publisher", "developer", "other_developer", "operator", "auditor")
NO_KEY = ("none", "malformed", "unknown", "wrong_secret", "revoked")
EVERYONE = ROLES + NO_KEY


@dataclass
class World:
    """The API with two publishers' declarations delivered to two developers."""

    h: Harness
    own_delivery: str = ""
    their_delivery: str = ""
    token: str = ""
    extra_keys: dict[str, str] = field(default_factory=dict)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(kafka: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    """One API for the whole matrix (its requests change nothing another one reads)."""
    env = Env(root=tmp_path_factory.mktemp("matrix"), bootstrap=kafka)
    async with running_api(env) as h:
        now = datetime.now(UTC)
        _, own = await seed(h, declaration(1, prefix="own"), outcome="delivered")
        await seed(h, declaration(2, publisher="pixelboard", prefix="theirs"), outcome="failed")
        rows = {r.delivery_id: r for r in await h.store.all_deliveries()}
        w = World(h=h)
        w.own_delivery = next(d for d in own if rows[d].developer_id == "acme-ai")
        w.their_delivery = next(d for d in own if rows[d].developer_id == "brushstroke-labs")
        w.token = make_token(load_ack_secret(env.settings().data_dir), w.own_delivery, "acme-ai",
                             now + timedelta(days=1))
        key_id = h.keys["auditor"].split("_")[1]
        w.extra_keys = {
            "none": "",
            "malformed": "not-a-key",
            "unknown": "nr_000000000000_" + "0" * 64,
            "wrong_secret": f"nr_{key_id}_" + "f" * 64,
        }
        revoked, w.extra_keys["revoked"] = await create_key(h.store, "auditor", "gone")
        await revoke_key(h.store, revoked.key_id)
        yield w


@dataclass(frozen=True)
class Case:
    """One request and the status each principal gets."""

    name: str
    method: str
    path: str
    expect: dict[str, int]
    json: Any = None
    params: dict[str, Any] | None = None


def rule(allowed: dict[str, int], *, default: int = 403, anonymous: int = 401) -> dict[str, int]:
    """Expected statuses: ``allowed`` as given, other roles ``default``, no valid key
    ``anonymous``."""
    out = dict.fromkeys(ROLES, default)
    out.update(dict.fromkeys(NO_KEY, anonymous))
    out.update(allowed)
    return out


OWN_DECL = declaration(1, prefix="own")
CASES = [
    Case("post declaration", "POST", "/v1/declarations", json=OWN_DECL,
         expect=rule({"publisher": 202})),
    Case("get own declaration", "GET", "/v1/declarations/own-0001",
         expect=rule({"publisher": 200, "other_publisher": 404, "operator": 200, "auditor": 200})),
    Case("get their declaration naming them", "GET", "/v1/declarations/theirs-0002",
         params={"publisher_id": "pixelboard"},
         expect=rule({"publisher": 404, "other_publisher": 200, "operator": 200,
                      "auditor": 200})),
    Case("get missing declaration", "GET", "/v1/declarations/no-such-declaration",
         expect=rule({"publisher": 404, "other_publisher": 404, "operator": 404,
                      "auditor": 404})),
    Case("list deliveries", "GET", "/v1/deliveries",
         expect=rule({"developer": 200, "other_developer": 200, "operator": 200,
                      "auditor": 200})),
    Case("list a developer's deliveries", "GET", "/v1/deliveries",
         params={"developer": "acme-ai"},
         expect=rule({"developer": 200, "operator": 200, "auditor": 200})),
    Case("replay (dry run)", "POST", "/v1/replays", json={"dry_run": True},
         expect=rule({"operator": 200})),
    Case("ack own delivery by id", "POST", "/v1/acks", json={"delivery_id": "OWN"},
         expect=rule({"developer": 202, "other_developer": 404})),
    Case("ack another developer's delivery by id", "POST", "/v1/acks",
         json={"delivery_id": "THEIRS"},
         expect=rule({"developer": 404, "other_developer": 202})),
    Case("ack a missing delivery by id", "POST", "/v1/acks",
         json={"delivery_id": "dlv_no_such_delivery"},
         expect=rule({"developer": 404, "other_developer": 404})),
    Case("ack by token", "POST", "/v1/acks", json={"token": "TOKEN"},
         expect=rule(dict.fromkeys((*ROLES, "none"), 202), default=202)),
    Case("ack by link", "GET", "/v1/acks", params={"token": "TOKEN"},
         expect=rule(dict.fromkeys((*ROLES, "none"), 202), default=202)),
    Case("export the trail", "GET", "/v1/audit/export", params={"format": "jsonl"},
         expect=rule({"auditor": 200})),
    Case("verify the trail", "GET", "/v1/audit/verify", expect=rule({"auditor": 200})),
    Case("list channels", "GET", "/v1/channels", expect=rule({"operator": 200, "auditor": 200})),
    Case("enable a channel", "POST", "/v1/channels/acme-ai/webhook/enable",
         json={"reason": "matrix"}, expect=rule({"operator": 200})),
    Case("enable a missing channel", "POST", "/v1/channels/acme-ai/nope/enable",
         expect=rule({"operator": 404})),
    *(Case(f"GET {p}", "GET", p, expect=dict.fromkeys(EVERYONE, 200))
      for p in ("/healthz", "/readyz", "/metrics")),
]


def _fill(value: Any, w: World) -> Any:
    subst = {"OWN": w.own_delivery, "THEIRS": w.their_delivery, "TOKEN": w.token}
    if isinstance(value, dict):
        return {k: _fill(v, w) for k, v in value.items()}
    return subst.get(value, value) if isinstance(value, str) else value


@pytest.mark.parametrize("who", EVERYONE)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
async def test_permission_matrix(world: World, case: Case, who: str) -> None:
    """Each endpoint answers each principal with the status of the matrix, and every
    refusal carries the one error body (401 with WWW-Authenticate)."""
    h = world.h
    key = world.extra_keys.get(who, h.keys.get(who))
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    res = await h.client.request(case.method, case.path, json=_fill(case.json, world),
                                 params=_fill(case.params, world), headers=headers)
    assert res.status_code == case.expect[who], res.text[:500]
    if res.status_code >= 400:
        assert set(res.json()) == {"error", "reason", "errors"}
    if res.status_code == 401:
        assert res.headers["WWW-Authenticate"] == "Bearer"


async def test_someone_elses_data_is_answered_like_missing_data(world: World) -> None:
    """Another publisher's declaration and another developer's delivery get exactly the
    answer a nonexistent one gets (only the id asked about differs)."""
    h = world.h

    async def body(method: str, path: str, who: str, **kw: Any) -> tuple[int, Any]:
        res = await h.client.request(method, path, headers=h.auth(who), **kw)
        return res.status_code, res.json()

    theirs = await body("GET", "/v1/declarations/theirs-0002", "publisher")
    missing = await body("GET", "/v1/declarations/theirs-0003", "publisher")
    assert theirs[0] == missing[0] == 404
    assert theirs[1]["reason"].replace("0002", "X") == missing[1]["reason"].replace("0003", "X")
    theirs = await body("POST", "/v1/acks", "developer", json={"delivery_id": world.their_delivery})
    fake = world.their_delivery[:-4] + "0000"
    missing = await body("POST", "/v1/acks", "developer", json={"delivery_id": fake})
    assert theirs[0] == missing[0] == 404
    assert theirs[1]["reason"].replace(world.their_delivery, "X") == \
        missing[1]["reason"].replace(fake, "X")


async def test_bad_keys_are_indistinguishable(world: World) -> None:
    """A malformed, an unknown, a wrong-secret and a revoked key get the same 401 body."""
    h = world.h
    bodies = []
    for who in ("malformed", "unknown", "wrong_secret", "revoked"):
        res = await h.client.get("/v1/audit/verify",
                                 headers={"Authorization": f"Bearer {world.extra_keys[who]}"})
        assert res.status_code == 401
        bodies.append(res.json())
    assert all(b == bodies[0] for b in bodies)


async def test_a_publisher_reads_its_own_declaration_with_deliveries_and_trail(
    world: World,
) -> None:
    """The publisher's view: its declaration, each delivery and the hash-chained trail."""
    res = await world.h.client.get("/v1/declarations/own-0001", headers=world.h.auth("publisher"))
    body = res.json()
    assert body["declaration_key"] == "artfolio/own-0001"
    assert body["status"] == "relayed"
    assert {d["developer_id"] for d in body["deliveries"]} == {"acme-ai", "brushstroke-labs"}
    assert [e["seq"] for e in body["trail"]] == list(range(1, len(body["trail"]) + 1))
    assert body["trail"][1]["prev_hash"] == body["trail"][0]["hash"]
