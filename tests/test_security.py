"""Security checks, as tests against real components:

- the relay's webhook signatures, made by a real worker with two secrets during a
  key rotation, verify with the Standard Webhooks reference library
  (``standardwebhooks``) under either secret, and fail under any other secret or
  after any change to the id, timestamp or body;
- the SSRF guard holds inside a real worker whose connectors come from TOML
  (loopback, ``localhost``, the cloud metadata address) and for host names that
  resolve to private, link-local and loopback addresses;
- ack tokens that are forged, expired, meant for another delivery or naming another
  developer acknowledge nothing;
- the API role matrix on what tests/test_api_permissions.py does not cover
  (disabling channels, CSV export, real replays), and a check that every API route
  is covered by one of the two;
- webhook secrets, registry tokens, the SMTP password, the ack secret, API keys, ack
  tokens and artists' contact emails never appear in the logs of a real worker or a
  real API process (JSON logs, captured and searched).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import pytest_asyncio
from aiohttp import web
from api_helpers import Harness, declaration, read_topic, running_api, seed
from builders import make_task
from conftest import Env
from relay_helpers import deliveries, eventually, make_decl, publish, whsec
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from notice_relay import netguard
from notice_relay.acks import AckRecord, load_ack_secret, make_token
from notice_relay.channels import WebhookChannel
from notice_relay.connectors import Developer, WebhookChannelConfig
from notice_relay.keys import create_key, revoke_key
from notice_relay.models import DeliveryTask, OutcomeKind

if TYPE_CHECKING:
    from smtp_server import SmtpServer

pytest_plugins = ["smtp_server"]


# ------------------------------------------------------------------ local servers


@dataclass
class Capture:
    """A real HTTP server on 127.0.0.1 that records each request's headers and exact
    body bytes."""

    url: str = ""
    requests: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    runner: web.AppRunner | None = None

    async def start(self) -> Capture:
        """Listen on a free port."""

        async def handle(request: web.Request) -> web.Response:
            self.requests.append((dict(request.headers), await request.read()))
            return web.json_response({})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/hook"
        return self

    async def stop(self) -> None:
        """Stop listening."""
        if self.runner is not None:
            await self.runner.cleanup()


async def _counting_server() -> tuple[list[int], asyncio.Server, int]:
    """A TCP server on 127.0.0.1 that only counts connections (and closes them)."""
    count = [0]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        count[0] += 1
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return count, server, server.sockets[0].getsockname()[1]


def _write_connector(env: Env, dev: str, channel: str, accepts: str = '["train-ai"]') -> None:
    env.connectors.mkdir(parents=True, exist_ok=True)
    (env.connectors / f"{dev}.toml").write_text(
        f'id = "{dev}"\nname = "{dev}"\naccepts = {accepts}\nack_sla = "30d"\n\n'
        f"[[channel]]\n{channel}", encoding="utf-8")


# ------------------------------------------------- a real worker: signatures, SSRF, logs


@pytest.mark.kafka
async def test_worker_signs_for_every_rotating_secret_refuses_private_targets_and_logs_no_secret(
    relay_env: Env, worker_factory: Any, smtp_server: SmtpServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One real worker at log level info, JSON logs, with: a webhook developer whose
    secret is being rotated (old and new), an email developer (SMTP with AUTH), a
    registry and webhooks pointing at loopback, ``localhost`` and the cloud metadata
    address. Valid and invalid declarations carry contact emails.

    Every webhook request verifies with the reference library under the old secret
    and under the new one, and under no other; tampering breaks it. The refused
    targets fail permanently, naming the address, and the loopback server sees no
    connection. And the worker's log holds none of the secrets, tokens or emails."""
    monkeypatch.setenv("NOTICE_RELAY_TEST_WORKER_LOGLEVEL", "info")
    marker = secrets.token_hex(4)
    old, new = whsec(), whsec()
    registry_token = f"regtoken-{secrets.token_hex(16)}"
    ack_secret = f"acksecret-{secrets.token_hex(16)}"
    capture = await Capture().start()
    count, probe, probe_port = await _counting_server()
    try:
        relay_env.write_publishers("artfolio")
        relay_env.add_webhook_developer("acme-ai", capture.url, f"{old} {new}",
                                        accepts=("train-ai",))
        _write_connector(relay_env, "inbox-ai",
                         'type = "email"\nto = ["optout@inbox-ai.example.invalid"]\n'
                         'digest = "0"\n')
        for dev, url, private in (
            ("loopback-ai", f"http://127.0.0.1:{probe_port}/hook", False),
            ("localhost-ai", f"http://localhost:{probe_port}/hook", False),
            ("metadata-ai", "http://169.254.169.254/latest/meta-data/", True),
        ):
            var = "WHSEC_" + dev.upper().replace("-", "_")
            relay_env.secrets[var] = whsec()
            _write_connector(relay_env, dev, f'type = "webhook"\nurl = "{url}"\n'
                             f'secret_env = "{var}"\ntimeout = "2s"\nallow_http = true\n'
                             f"allow_private = {str(private).lower()}\n")
        _write_connector(relay_env, "metadata-registry",
                         'type = "registry"\nadapter = "generic-rest"\n'
                         'base_url = "http://169.254.169.254/api"\ntoken_env = "REG_TOKEN"\n'
                         "allow_http = true\nallow_private = true\n")
        relay_env.secrets["REG_TOKEN"] = registry_token
        relay_env.secrets["NOTICE_RELAY_ACK_SECRET"] = ack_secret
        relay_env.secrets.update(smtp_server.environ())

        emails = [f"artist{i}.{marker}@example.invalid" for i in range(6)]
        valid = []
        for i in range(3):
            d = make_decl(i, prefix=f"sec{marker}")
            d["artist"]["contact_email"] = emails[i]
            valid.append(d)
        bad = []
        for i, change in enumerate([
            {"works": [{"url": "javascript:alert(1)"}]},
            {"all_work": True},
            {"declared_at": "2999-01-01T00:00:00Z"},
        ], start=3):
            d = make_decl(i, prefix=f"sec{marker}")
            d["artist"]["contact_email"] = emails[i]
            d.update(change)
            bad.append(d)
        # An invalid contact email is not echoed either.
        broken = make_decl(9, prefix=f"sec{marker}")
        broken["artist"]["contact_email"] = f"Mara <bad.{marker}@example.invalid>"
        bad.append(broken)

        worker = worker_factory()
        await publish(relay_env, [*valid, *bad])

        await eventually(lambda: len({h["webhook-id"] for h, _ in capture.requests}) >= 3,
                         120, "three signed webhook requests", worker=worker)
        await eventually(lambda: len(smtp_server.messages) >= 1, 60, "an email notice",
                         worker=worker)

        async def refused() -> bool:
            rows = [r for r in await deliveries(relay_env)
                    if r.developer_id in ("loopback-ai", "localhost-ai", "metadata-ai",
                                          "metadata-registry")]
            return len(rows) == 12 and all(r.state == "failed" for r in rows)

        await eventually(refused, 90, "the private targets' deliveries to fail", worker=worker)
        failed = [r for r in await deliveries(relay_env)
                  if r.developer_id.startswith(("loopback", "localhost", "metadata"))]
        errors = {r.developer_id: r.last_error or "" for r in failed}
        assert "127.0.0.1 (loopback address)" in errors["loopback-ai"]
        assert "(loopback address) for localhost" in errors["localhost-ai"]
        assert "169.254.169.254 (cloud metadata address)" in errors["metadata-ai"]
        assert "169.254.169.254 (cloud metadata address)" in errors["metadata-registry"]
        assert count[0] == 0, "the loopback server was connected to"
        worker.stop()
    finally:
        probe.close()
        await capture.stop()

    # Signatures: the reference library, either secret of the rotation.
    assert capture.requests
    for headers, body in capture.requests:
        lowered = {k.lower(): v for k, v in headers.items()}
        assert len(lowered["webhook-signature"].split()) == 2
        for secret in (old, new):
            payload = Webhook(secret).verify(body, lowered)
            assert payload["schema"] == "notice-relay/notice/v1"
        with pytest.raises(WebhookVerificationError):
            Webhook(whsec()).verify(body, lowered)
        with pytest.raises(WebhookVerificationError):
            Webhook(old).verify(body.replace(b"train-ai", b"train-AI"), lowered)
        with pytest.raises(WebhookVerificationError):
            Webhook(new).verify(body, {**lowered, "webhook-id": lowered["webhook-id"] + "x"})
        stamp = str(int(lowered["webhook-timestamp"]) + 1)
        with pytest.raises(WebhookVerificationError):
            Webhook(new).verify(body, {**lowered, "webhook-timestamp": stamp})
        for email in emails:
            assert email.encode() not in body

    # Logs: JSON lines, and none of the secrets.
    log = worker.output()
    events = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert any(e.get("event") == "declaration.rejected" for e in events), log[-3000:]
    forbidden = {
        "old webhook secret": old, "new webhook secret": new,
        "old webhook key": old.removeprefix("whsec_"),
        "new webhook key": new.removeprefix("whsec_"),
        "registry token": registry_token, "ack secret": ack_secret,
        "SMTP password": smtp_server.password, "email marker": f".{marker}@",
        **{f"email {i}": e for i, e in enumerate(emails)},
        **{f"webhook secret of {k}": v for k, v in relay_env.secrets.items()
           if k.startswith("WHSEC_")},
    }
    for what, value in forbidden.items():
        assert value not in log, f"the worker logged the {what}"


# --------------------------------------------------------------------- SSRF by name


def _webhook_to(url: str, *, allow_private: bool) -> tuple[WebhookChannel, DeliveryTask]:
    developer = Developer.model_validate({
        "id": "acme-ai", "name": "Acme AI", "accepts": ["train-ai"],
        "channel": [{"type": "webhook", "url": url, "secret_env": "S", "timeout": "2s",
                     "allow_http": True, "allow_private": allow_private}],
    })
    config = developer.channels[0]
    assert isinstance(config, WebhookChannelConfig)
    return WebhookChannel(developer, config, [whsec()]), make_task(channel=config.name)


@pytest.mark.parametrize(("address", "kind", "allow_private"), [
    ("10.0.0.1", "private", False),
    ("192.168.0.10", "private", False),
    ("172.16.5.4", "private", False),
    ("169.254.169.254", "cloud metadata", False),
    ("169.254.169.254", "cloud metadata", True),
    ("::1", "loopback", False),
    ("fd12:3456::1", "private", False),
    ("127.0.0.1", "loopback", False),
])
async def test_a_name_resolving_to_a_non_public_address_is_refused(
    address: str, kind: str, allow_private: bool, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """hooks.example.invalid resolving (through the resolver seam the guard asks) to a
    private, loopback, unique-local or metadata address: a permanent outcome naming
    the address and the name, and no connection — the one server that could answer
    (on 127.0.0.1) sees none."""
    count, server, port = await _counting_server()
    asked: list[str] = []

    async def resolve(host: str, port: int) -> list[str]:
        asked.append(host)
        return [address]

    monkeypatch.setattr(netguard, "resolve_host", resolve)
    channel, task = _webhook_to(f"http://hooks.example.invalid:{port}/",
                                allow_private=allow_private)
    try:
        async with channel:
            [outcome] = await asyncio.wait_for(channel.send([task]), 10)
    finally:
        server.close()
    assert outcome.kind is OutcomeKind.PERMANENT
    assert outcome.error is not None
    assert f"refused to connect to {address} ({kind} address) for hooks.example.invalid" \
        in outcome.error
    assert asked == ["hooks.example.invalid"]
    assert count[0] == 0


@pytest.mark.parametrize("url", ["http://127.0.0.1:{port}/", "http://10.0.0.1:{port}/",
                                 "http://169.254.169.254:{port}/", "http://[::1]:{port}/",
                                 "http://[::ffff:127.0.0.1]:{port}/",
                                 "http://2130706433:{port}/", "http://0x7f.0.0.1:{port}/"])
async def test_literal_non_public_addresses_are_refused_in_any_spelling(url: str) -> None:
    """Loopback, private, metadata and IPv6 loopback literals — and loopback written
    as an IPv4-mapped IPv6 address, a decimal integer or in hex — are refused by the
    guard (a permanent "refused to connect" outcome), without a connection to the
    server listening on 127.0.0.1."""
    count, server, port = await _counting_server()
    channel, task = _webhook_to(url.format(port=port), allow_private=False)
    try:
        async with channel:
            [outcome] = await asyncio.wait_for(channel.send([task]), 10)
    finally:
        server.close()
    assert outcome.kind is OutcomeKind.PERMANENT
    assert outcome.error is not None
    assert outcome.error.startswith("refused to connect to "), outcome.error
    assert count[0] == 0, f"{url} reached the loopback server"


# ------------------------------------------------------------------------ ack tokens


@pytest_asyncio.fixture
async def acks_api(relay_env: Env) -> AsyncIterator[Harness]:
    """The API with one declaration delivered to acme-ai and brushstroke-labs."""
    async with running_api(relay_env) as h:
        await seed(h, declaration(1, prefix="sec"), outcome="delivered")
        yield h


async def _ack_records(h: Harness, within: float) -> list[AckRecord]:
    records = await read_topic(h.env.bootstrap, h.topics.acks, want=50, within=within)
    return [AckRecord.model_validate_json(r.value) for r in records]


@pytest.mark.kafka
async def test_ack_tokens_for_another_delivery_or_developer_acknowledge_nothing_else(
    acks_api: Harness,
) -> None:
    """A relay-signed token naming a developer other than the delivery's is refused
    (401, by POST and by link); a token used next to another delivery's id is refused
    (422); a token followed with another delivery id in the query acknowledges its
    own delivery only; forged and expired tokens are refused. The acks topic ends up
    holding exactly the one legitimate acknowledgement."""
    h = acks_api
    rows = {r.developer_id: r.delivery_id for r in await h.store.all_deliveries()}
    mine, theirs = rows["acme-ai"], rows["brushstroke-labs"]
    secret = load_ack_secret(h.env.settings().data_dir)
    soon = datetime.now(UTC) + timedelta(days=1)
    token = make_token(secret, mine, "acme-ai", soon)

    wrong_developer = make_token(secret, mine, "brushstroke-labs", soon)
    res = await h.client.post("/v1/acks", json={"token": wrong_developer})
    assert res.status_code == 401, res.text
    assert res.json()["error"] == "invalid_token"
    assert (await h.client.get("/v1/acks", params={"token": wrong_developer})).status_code == 401

    both = await h.client.post("/v1/acks", json={"token": token, "delivery_id": theirs},
                               headers=h.auth("developer"))
    assert both.status_code == 422

    refused = {
        "signed with another secret": make_token(b"another-relay", theirs, "brushstroke-labs",
                                                 soon),
        "expired an hour ago": make_token(secret, theirs, "brushstroke-labs",
                                          datetime.now(UTC) - timedelta(hours=1)),
        "signature of my token on their payload":
            token.split(".")[0] + "." + make_token(secret, theirs, "brushstroke-labs",
                                                   soon).split(".")[1]
            + "." + token.split(".")[2],
        "no signature": token.rsplit(".", 1)[0],
    }
    for what, bad in refused.items():
        for res in (await h.client.post("/v1/acks", json={"token": bad}),
                    await h.client.get("/v1/acks", params={"token": bad})):
            assert res.status_code == 401, (what, res.text)

    res = await h.client.get("/v1/acks", params={"token": token, "delivery_id": theirs})
    assert res.status_code == 202
    assert res.json()["delivery_id"] == mine
    acks = await _ack_records(h, within=5)
    assert [(a.delivery_id, a.developer_id) for a in acks] == [(mine, "acme-ai")]


@pytest.mark.kafka
async def test_a_token_for_a_delivery_the_store_does_not_know_yet_still_acknowledges(
    acks_api: Harness,
) -> None:
    """The developer check must not refuse an ack that overtakes the projection of its
    delivery: a valid token for an unknown delivery id is accepted as before."""
    h = acks_api
    secret = load_ack_secret(h.env.settings().data_dir)
    token = make_token(secret, "dlv_not_projected_yet", "acme-ai",
                       datetime.now(UTC) + timedelta(days=1))
    res = await h.client.post("/v1/acks", json={"token": token})
    assert res.status_code == 202, res.text


# ------------------------------------------------------------------- the role matrix

ROLES = ("publisher", "other_publisher", "developer", "other_developer", "operator", "auditor")
NO_KEY = ("none", "malformed", "unknown", "wrong_secret", "revoked")


@dataclass
class Matrix:
    """The API with keys for every principal, and a bad key of every kind."""

    h: Harness
    bad_keys: dict[str, str] = field(default_factory=dict)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def matrix(kafka: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Matrix]:
    """One API for the added rows of the matrix."""
    env = Env(root=tmp_path_factory.mktemp("security-matrix"), bootstrap=kafka)
    async with running_api(env) as h:
        await seed(h, declaration(1, prefix="mx"), outcome="failed")
        key_id = h.keys["auditor"].split("_")[1]
        m = Matrix(h=h, bad_keys={"none": "", "malformed": "Bearer-ish nonsense",
                                  "unknown": "nr_000000000000_" + "0" * 64,
                                  "wrong_secret": f"nr_{key_id}_" + "e" * 64})
        revoked, m.bad_keys["revoked"] = await create_key(h.store, "operator", "gone")
        await revoke_key(h.store, revoked.key_id)
        yield m


ADDED_CASES: list[tuple[str, str, str, dict[str, Any], dict[str, int]]] = [
    ("disable a channel", "POST", "/v1/channels/brushstroke-labs/webhook/disable",
     {"json": {"reason": "matrix"}}, {"operator": 200}),
    ("disable a missing channel", "POST", "/v1/channels/acme-ai/nope/disable", {},
     {"operator": 404}),
    ("export the trail as CSV", "GET", "/v1/audit/export", {"params": {"format": "csv"}},
     {"auditor": 200}),
    ("export one declaration's trail", "GET", "/v1/audit/export",
     {"params": {"format": "jsonl", "declaration": "artfolio/mx-0001"}}, {"auditor": 200}),
    ("replay for real", "POST", "/v1/replays",
     {"json": {"developer": "nobody-at-all", "dry_run": False}}, {"operator": 200}),
    ("read a declaration naming a publisher", "GET", "/v1/declarations/mx-0001",
     {"params": {"publisher_id": "artfolio"}},
     {"publisher": 200, "other_publisher": 404, "operator": 200, "auditor": 200}),
    ("list deliveries filtered by declaration", "GET", "/v1/deliveries",
     {"params": {"declaration": "artfolio/mx-0001"}},
     {"developer": 200, "other_developer": 200, "operator": 200, "auditor": 200}),
]


@pytest.mark.kafka
@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("who", ROLES + NO_KEY)
@pytest.mark.parametrize("case", ADDED_CASES, ids=lambda c: c[0])
async def test_added_rows_of_the_role_matrix(
    matrix: Matrix, case: tuple[str, str, str, dict[str, Any], dict[str, int]], who: str,
) -> None:
    """Each added request answers each principal as the README's role table says:
    the allowed roles as listed, other valid keys 403, no valid key 401 — and every
    refusal has the one error body."""
    name, method, path, kwargs, allowed = case
    h = matrix.h
    key = matrix.bad_keys.get(who, h.keys.get(who))
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    expected = allowed.get(who, 401 if who in NO_KEY else 403)
    res = await h.client.request(method, path, headers=headers, **kwargs)
    assert res.status_code == expected, (name, who, res.text[:300])
    if res.status_code >= 400:
        assert set(res.json()) == {"error", "reason", "errors"}


@pytest.mark.kafka
@pytest.mark.asyncio(loop_scope="module")
async def test_a_developer_sees_only_its_own_deliveries(matrix: Matrix) -> None:
    """Listing deliveries with a developer key returns that developer's only, and
    naming another developer is 403."""
    h = matrix.h
    res = await h.client.get("/v1/deliveries", headers=h.auth("developer"))
    assert res.status_code == 200
    assert res.json()["deliveries"]
    assert {d["developer_id"] for d in res.json()["deliveries"]} == {"acme-ai"}
    res = await h.client.get("/v1/deliveries", params={"developer": "brushstroke-labs"},
                             headers=h.auth("developer"))
    assert res.status_code == 403


#: Every route of the API and where its permissions are tested: "matrix" =
#: tests/test_api_permissions.py, "added" = ADDED_CASES above.
ROUTES = {
    ("POST", "/v1/declarations"): "matrix",
    ("GET", "/v1/declarations/{declaration_id}"): "matrix",
    ("GET", "/v1/deliveries"): "matrix",
    ("POST", "/v1/replays"): "matrix",
    ("POST", "/v1/acks"): "matrix",
    ("GET", "/v1/acks"): "matrix",
    ("GET", "/v1/audit/export"): "matrix",
    ("GET", "/v1/audit/verify"): "matrix",
    ("GET", "/v1/channels"): "matrix",
    ("POST", "/v1/channels/{developer}/{channel}/enable"): "matrix",
    ("POST", "/v1/channels/{developer}/{channel}/disable"): "added",
    ("GET", "/healthz"): "matrix",
    ("GET", "/readyz"): "matrix",
    ("GET", "/metrics"): "matrix",
}


@pytest.mark.kafka
@pytest.mark.asyncio(loop_scope="module")
async def test_every_route_is_in_the_role_matrix(matrix: Matrix) -> None:
    """The app's operations (from its OpenAPI document) are exactly those listed: a
    new endpoint fails this test until its permissions are tested."""
    found = {(method.upper(), path)
             for path, operations in matrix.h.app.openapi()["paths"].items()
             for method in operations}
    assert found == set(ROUTES)
    permissions = (Path(__file__).parent / "test_api_permissions.py").read_text()
    for (method, path), where in ROUTES.items():
        if where == "added":
            assert any(c[1] == method and c[2].rsplit("/", 1)[-1] == path.rsplit("/", 1)[-1]
                       for c in ADDED_CASES)
        else:
            assert f'"{path.split("{")[0]}' in permissions, (method, path)


# ------------------------------------------------------------- a real API process, logs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _start_api(env: Env, port: int, log_path: Path) -> subprocess.Popen[bytes]:
    """``notice-relay api`` as its own process, logging everything it logs (debug, JSON)
    into ``log_path``."""
    with log_path.open("wb") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "notice_relay", "api", "--host", "127.0.0.1",
             "--port", str(port), "--log-level", "debug"],
            env=env.environ(NOTICE_RELAY_LOG_FORMAT="json", NOTICE_RELAY_LOG_LEVEL="debug"),
            cwd=env.root,
            stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 20 s."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


@pytest.mark.kafka
async def test_api_process_logs_no_key_token_secret_or_email(relay_env: Env) -> None:
    """A real ``notice-relay api`` process (JSON logs, debug), used with real keys
    and wrong ones, declarations with contact emails (accepted and refused), ack
    tokens valid and forged: its output holds none of them."""
    relay_env.write_publishers("artfolio")
    relay_env.add_webhook_developer("acme-ai", "http://127.0.0.1:9/acme-ai", whsec())
    ack_secret = f"acksecret-{secrets.token_hex(16)}"
    relay_env.secrets["NOTICE_RELAY_ACK_SECRET"] = ack_secret
    keys = {}
    for role, subject in (("publisher", "artfolio"), ("developer", "acme-ai"),
                          ("auditor", "audrey")):
        res = relay_env.cli("keys", "create", "--role", role, "--subject", subject, "--json")
        assert res.returncode == 0, res.stderr
        keys[role] = json.loads(res.stdout)["key"]
    port = _free_port()
    log_path = relay_env.root / "api.log"
    proc = _start_api(relay_env, port, log_path)
    marker = secrets.token_hex(4)
    emails = [f"artist{i}.{marker}@example.invalid" for i in range(3)]
    token = make_token(ack_secret.encode(), "dlv_" + "a" * 64, "acme-ai",
                       datetime.now(UTC) + timedelta(days=1))
    forged = make_token(b"forged", "dlv_" + "b" * 64, "acme-ai",
                        datetime.now(UTC) + timedelta(days=1))
    wrong_secret = keys["auditor"][:-64] + secrets.token_hex(32)
    try:
        base = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:
            end = time.monotonic() + 60
            while True:
                try:
                    if (await client.get("/readyz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < end, log_path.read_text()[-3000:]
                assert proc.poll() is None, log_path.read_text()[-3000:]
                await asyncio.sleep(0.3)

            pub = {"Authorization": f"Bearer {keys['publisher']}"}
            good = make_decl(1, prefix=f"api{marker}")
            good["artist"]["contact_email"] = emails[0]
            assert (await client.post("/v1/declarations", json=good, headers=pub)
                    ).status_code == 202
            assert (await client.post("/v1/declarations", json=good, headers=pub)
                    ).status_code == 202
            bad = make_decl(2, prefix=f"api{marker}")
            bad["artist"]["contact_email"] = emails[1]
            bad["works"] = [{"url": "file:///etc/passwd"}]
            assert (await client.post("/v1/declarations", json=bad, headers=pub)
                    ).status_code == 422
            worse = make_decl(3, prefix=f"api{marker}")
            worse["artist"]["contact_email"] = f"{emails[2]}\r\nBcc: x@example.invalid"
            assert (await client.post("/v1/declarations", json=worse, headers=pub)
                    ).status_code == 422
            for key in (wrong_secret, f"nr_{marker}_{marker}", keys["publisher"]):
                res = await client.get("/v1/audit/verify",
                                       headers={"Authorization": f"Bearer {key}"})
                assert res.status_code in (401, 403)
            assert (await client.get(
                "/v1/audit/verify", headers={"Authorization": f"Bearer {keys['auditor']}"})
            ).status_code == 200
            assert (await client.get("/v1/acks", params={"token": token})).status_code == 202
            assert (await client.post("/v1/acks", json={"token": forged})).status_code == 401
            assert (await client.post("/v1/acks", json={"delivery_id": "dlv_x"}, headers={
                "Authorization": f"Bearer {keys['developer']}"})).status_code == 404
            assert (await client.get("/metrics")).status_code == 200
    finally:
        _stop(proc)
    log = log_path.read_text(errors="replace")
    assert "Started server process" in log, log[-3000:]  # the capture works
    forbidden = {
        "publisher key": keys["publisher"], "developer key": keys["developer"],
        "auditor key": keys["auditor"], "wrong secret": wrong_secret.rsplit("_", 1)[1],
        "ack secret": ack_secret, "ack token": token, "forged token": forged,
        "email marker": f".{marker}@",
        **{f"key secret of the {r}": k.rsplit("_", 1)[1] for r, k in keys.items()},
        **{f"email {i}": e for i, e in enumerate(emails)},
        **{f"webhook secret {k}": v for k, v in relay_env.secrets.items()
           if k.startswith("WHSEC_")},
    }
    for what, value in forbidden.items():
        assert value not in log, f"the API logged the {what}"
