"""Operating the API: channels enabled and disabled as an audited operator action,
health and readiness (also with Kafka unreachable), Prometheus metrics, the OpenAPI
document and /docs, and the CLI commands around it — `keys`, `deliveries` and `api`
itself, run as real processes."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from api_helpers import Harness, declaration, read_topic, register, running_api, seed

from notice_relay.models import AuditEvent

pytestmark = pytest.mark.kafka


@pytest.fixture
async def api(relay_env: Any) -> AsyncIterator[Harness]:
    """The API on the test's store and topics."""
    async with running_api(relay_env) as h:
        yield h


async def test_an_operator_disables_and_enables_a_channel_audited(api: Harness) -> None:
    """disable then enable: 200 with the channel's state, and channel.disabled /
    channel.enabled on the audit topic with the operator as actor and the reason."""
    res = await api.client.post("/v1/channels/acme-ai/webhook/disable",
                                json={"reason": "endpoint answers 500"},
                                headers=api.auth("operator"))
    assert res.status_code == 200, res.text
    assert res.json()["enabled"] is False
    assert res.json()["changed_by"] == "operator:alice"
    res = await api.client.post("/v1/channels/acme-ai/webhook/enable",
                                headers=api.auth("operator"))
    assert res.status_code == 200
    assert res.json()["enabled"] is True
    records = await read_topic(api.env.bootstrap, api.topics.audit, want=2)
    evs = [AuditEvent.model_validate_json(r.value) for r in records]
    assert [e.type.value for e in evs] == ["channel.disabled", "channel.enabled"]
    assert all((e.actor.kind.value, e.actor.id) == ("operator", "alice") for e in evs)
    assert evs[0].data["reason"] == "endpoint answers 500"
    listed = await api.client.get("/v1/channels", headers=api.auth("auditor"))
    assert {c["key"] for c in listed.json()["channels"]} == {"acme-ai/webhook",
                                                             "brushstroke-labs/webhook"}


async def test_health_readiness_and_metrics(api: Harness) -> None:
    """healthz and readyz are 200 with no key; /metrics counts requests by route
    template (never by id) and status, and declarations by result."""
    assert (await api.client.get("/healthz")).json() == {"ok": True, "store": None,
                                                         "kafka": None}
    ready = await api.client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"ok": True, "store": True,
                                                         "kafka": True}
    await api.client.post("/v1/declarations", json=declaration(1),
                          headers=api.auth("publisher"))
    await api.client.post("/v1/declarations", json={"schema": 1},
                          headers=api.auth("publisher"))
    await api.client.get("/v1/declarations/api-0001", headers=api.auth("publisher"))
    text = (await api.client.get("/metrics")).text
    assert 'notice_relay_api_declarations_total{result="accepted"} 1.0' in text
    assert 'notice_relay_api_declarations_total{result="rejected"} 1.0' in text
    assert ('notice_relay_api_requests_total{method="GET",'
            'route="/v1/declarations/{declaration_id}",status="404"} 1.0') in text
    assert "api-0001" not in text
    assert "notice_relay_api_request_duration_seconds_bucket" in text


async def test_openapi_and_docs(api: Harness) -> None:
    """The OpenAPI document lists every endpoint with its bearer key scheme and the
    Declaration v1 body; /docs serves the interactive page."""
    spec = (await api.client.get("/openapi.json")).json()
    assert {"/v1/declarations", "/v1/declarations/{declaration_id}", "/v1/deliveries",
            "/v1/replays", "/v1/acks", "/v1/audit/export", "/v1/audit/verify", "/v1/channels",
            "/v1/channels/{developer}/{channel}/enable",
            "/v1/channels/{developer}/{channel}/disable",
            "/healthz", "/readyz", "/metrics"} <= set(spec["paths"])
    assert spec["components"]["securitySchemes"]["ApiKey"]["scheme"] == "bearer"
    body = spec["paths"]["/v1/declarations"]["post"]["requestBody"]
    assert body["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Declaration"}
    assert "declaration_id" in spec["components"]["schemas"]["Declaration"]["properties"]
    docs = await api.client.get("/docs")
    assert docs.status_code == 200
    assert "swagger" in docs.text.lower()


async def test_kafka_unreachable_means_not_ready_but_reads_work(relay_env: Any) -> None:
    """With no broker: the API starts, readyz is 503 naming Kafka, a declaration is
    503 (retry later), and reads from the store still answer."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    register(relay_env)
    relay_env.bootstrap = dead
    async with running_api(relay_env, with_registry=False) as h:
        ready = await h.client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json() == {"ok": False, "store": True, "kafka": False}
        res = await h.client.post("/v1/declarations", json=declaration(1),
                                  headers=h.auth("publisher"))
        assert res.status_code == 503
        assert res.json()["error"] == "unavailable"
        assert res.headers["Retry-After"]
        res = await h.client.get("/v1/deliveries", headers=h.auth("operator"))
        assert res.status_code == 200


def test_keys_cli_create_list_revoke(relay_env: Any) -> None:
    """`keys create` prints a key once; `keys list` shows it without its secret;
    `keys revoke` revokes it (and an unknown key id exits 1)."""
    res = relay_env.cli("keys", "create", "--role", "publisher", "--subject", "artfolio",
                        "--note", "staging")
    assert res.returncode == 0, res.stderr
    key = res.stdout.decode().strip()
    assert key.startswith("nr_")
    assert len(key.split("_")[2]) == 64
    key_id = key.split("_")[1]
    listed = json.loads(relay_env.cli("keys", "list", "--json").stdout)["keys"]
    assert [(k["key_id"], k["role"], k["subject"], k["note"]) for k in listed] == [
        (key_id, "publisher", "artfolio", "staging")]
    assert key.split("_")[2] not in json.dumps(listed)
    assert relay_env.cli("keys", "revoke", key_id).returncode == 0
    assert json.loads(relay_env.cli("keys", "list", "--json").stdout)["keys"] == []
    assert json.loads(relay_env.cli("keys", "list", "--all", "--json").stdout)["keys"][0][
        "revoked_at"]
    assert relay_env.cli("keys", "revoke", "000000000000").returncode == 1
    bad = relay_env.cli("keys", "create", "--role", "publisher", "--subject", "a b")
    assert bad.returncode == 2
    assert b"Traceback" not in bad.stderr


async def test_a_cli_key_works_until_revoked(api: Harness) -> None:
    """A key made by `notice-relay keys create` is accepted by the API; once revoked
    with `keys revoke`, it is refused (401) from the next request on."""
    res = api.env.cli("keys", "create", "--role", "auditor", "--subject", "carol", "--json")
    made = json.loads(res.stdout)
    headers = {"Authorization": f"Bearer {made['key']}"}
    assert (await api.client.get("/v1/audit/verify", headers=headers)).status_code == 200
    assert api.env.cli("keys", "revoke", made["key_id"]).returncode == 0
    assert (await api.client.get("/v1/audit/verify", headers=headers)).status_code == 401


async def test_deliveries_cli(api: Harness) -> None:
    """`notice-relay deliveries` filters like the API, as a table or --json with a
    cursor to the next page."""
    for i in range(3):
        await seed(api, declaration(i, prefix="cli"), outcome="failed")
    assert api.env.cli("deliveries", "--since", "1h", "--json").returncode == 0
    # A cursor resumes the same filters: absolute times, since "1h" moves with the clock.
    since = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    res = api.env.cli("deliveries", "--developer", "acme-ai", "--status", "failed",
                      "--since", since, "--limit", "2", "--json")
    assert res.returncode == 0, res.stderr
    page = json.loads(res.stdout)
    assert len(page["deliveries"]) == 2
    assert page["next_cursor"]
    assert {d["developer_id"] for d in page["deliveries"]} == {"acme-ai"}
    res = api.env.cli("deliveries", "--developer", "acme-ai", "--status", "failed",
                      "--since", since, "--limit", "2", "--cursor", page["next_cursor"], "--json")
    assert len(json.loads(res.stdout)["deliveries"]) == 1
    table = api.env.cli("deliveries", "--status", "failed")
    assert table.returncode == 0
    assert b"6 deliveries" in table.stdout
    bad = api.env.cli("deliveries", "--since", "yesterday")
    assert bad.returncode == 2
    assert b"Traceback" not in bad.stderr


def test_api_command_serves_http(relay_env: Any) -> None:
    """`notice-relay api --host 127.0.0.1 --port N` serves the API over real HTTP:
    /healthz, /readyz and /docs answer."""
    register(relay_env)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "notice_relay", "api", "--host", "127.0.0.1", "--port", str(port)],
        env=relay_env.environ(), cwd=relay_env.root, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
                if ready.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, "the API did not become ready"
            time.sleep(0.2)
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").json()["ok"] is True
        assert httpx.get(f"http://127.0.0.1:{port}/docs").status_code == 200
        assert httpx.get(f"http://127.0.0.1:{port}/v1/deliveries").status_code == 401
    finally:
        proc.terminate()
        proc.wait(20)
        if proc.stdout:
            proc.stdout.close()
