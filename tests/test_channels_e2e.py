"""The email and registry connectors inside a real worker process: a real Kafka
broker, a real SMTP server (aiosmtpd, STARTTLS + AUTH, trustme certificates) and a
real registry HTTP server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import pytest
from aiohttp import web
from relay_helpers import deliveries, eventually, make_decl, publish, trail_types

if TYPE_CHECKING:
    from smtp_server import SmtpServer

pytest_plugins = ["smtp_server"]
pytestmark = pytest.mark.kafka


def add_email_developer(
    env: Any, dev: str, *, digest: str = "0", max_per_digest: int = 100
) -> None:
    """Register a developer reached by email."""
    env.connectors.mkdir(parents=True, exist_ok=True)
    (env.connectors / f"{dev}.toml").write_text(
        f'id = "{dev}"\nname = "{dev}"\naccepts = ["train-ai", "train-genai"]\n\n'
        f'[[channel]]\ntype = "email"\nto = ["optout@{dev}.example.invalid"]\n'
        f'digest = "{digest}"\nmax_per_digest = {max_per_digest}\n', encoding="utf-8")


def attachment_notices(msg: Any) -> list[dict[str, Any]]:
    """The Notice v1 objects of a digest's JSON attachment."""
    for part in msg.walk():
        if part.get_filename() == "notices.json":
            return list(json.loads(part.get_content())["notices"])
    raise AssertionError("no notices.json attachment")


async def test_email_digest_collects_notices_into_one_message(
    relay_env: Any, worker_factory: Any, smtp_server: SmtpServer
) -> None:
    """With a digest window, notices published together arrive as one message whose
    JSON attachment holds every Notice v1; every delivery is delivered."""
    add_email_developer(relay_env, "inbox-ai", digest="4s")
    relay_env.write_publishers("artfolio")
    relay_env.secrets.update(smtp_server.environ())
    worker = worker_factory()
    await publish(relay_env, [make_decl(i) for i in range(6)])
    await eventually(
        lambda: sum(len(attachment_notices(m.parsed())) for m in smtp_server.messages) >= 6,
        60,
        "6 notices by email",
        worker=worker,
    )
    assert len(smtp_server.messages) == 1
    notices = attachment_notices(smtp_server.messages[0].parsed())
    assert sorted(n["declaration_id"] for n in notices) == [f"d-{i:04d}" for i in range(6)]

    async def all_delivered() -> bool:
        rows = await deliveries(relay_env)
        return len(rows) == 6 and all(r.state == "delivered" for r in rows)
    await eventually(all_delivered, 30, "deliveries recorded")


async def test_email_451_is_retried_and_delivered_once(
    relay_env: Any, worker_factory: Any, smtp_server: SmtpServer
) -> None:
    """A 451 on the first try: the delivery is retried and delivered, and the server
    stores the message exactly once."""
    add_email_developer(relay_env, "inbox-ai")
    relay_env.write_publishers("artfolio")
    relay_env.secrets.update(smtp_server.environ())
    relay_env.secrets["NOTICE_RELAY_RETRY_SCHEDULE"] = "1s,1s,1s"
    smtp_server.fail_next("451 4.3.0 try again later", times=1)
    worker = worker_factory()
    await publish(relay_env, [make_decl(0)])

    async def delivered() -> bool:
        rows = await deliveries(relay_env)
        return len(rows) == 1 and rows[0].state == "delivered"
    await eventually(delivered, 60, "delivered after a 451", worker=worker)
    assert len(smtp_server.messages) == 1
    types = [t for t, _ in await trail_types(relay_env, "artfolio/d-0000")]
    assert types.count("delivery.attempted") == 2
    assert "delivery.retry_scheduled" in types


async def test_email_550_fails_with_the_server_reply(
    relay_env: Any, worker_factory: Any, smtp_server: SmtpServer
) -> None:
    """A 550 for the recipient fails the delivery, with the server's reply in the trail."""
    add_email_developer(relay_env, "inbox-ai")
    relay_env.write_publishers("artfolio")
    relay_env.secrets.update(smtp_server.environ())
    smtp_server.refuse_recipient("optout@inbox-ai.example.invalid", "550 5.1.1 mailbox unavailable")
    worker = worker_factory()
    await publish(relay_env, [make_decl(0)])

    async def failed() -> bool:
        rows = await deliveries(relay_env)
        return len(rows) == 1 and rows[0].state == "failed"
    await eventually(failed, 60, "failed on 550", worker=worker)
    trail = await trail_types(relay_env, "artfolio/d-0000")
    errors = [str(d.get("error")) for t, d in trail if t == "delivery.failed"]
    assert errors
    assert "550 5.1.1 mailbox unavailable" in errors[0]


class Registry:
    """A do-not-train registry on 127.0.0.1 implementing the generic REST API."""

    def __init__(self) -> None:
        self.requests: list[tuple[float, dict[str, str], dict[str, Any]]] = []
        self.fail_first = 0
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append((time.time(), dict(request.headers), body))
        if len(self.requests) <= self.fail_first:
            return web.json_response({"error": "busy"}, status=503, headers={"Retry-After": "3"})
        return web.json_response({"results": [
            {"id": item["id"], "status": "accepted", "receipt": f"reg-{item['id']}"}
            for item in body["items"]]})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/optouts", self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def registry() -> AsyncIterator[Registry]:
    """A real registry server for the test."""
    r = Registry()
    await r.start()
    yield r
    await r.stop()


async def test_registry_batches_and_honours_retry_after(
    relay_env: Any, worker_factory: Any, registry: Registry
) -> None:
    """Deliveries reach the registry in batches with a bearer token and an idempotency
    key; a 503 with Retry-After: 3 is retried no earlier than it asked."""
    relay_env.connectors.mkdir(parents=True, exist_ok=True)
    (relay_env.connectors / "dataloom.toml").write_text(
        'id = "dataloom"\nname = "Dataloom"\naccepts = ["train-ai"]\n\n'
        f'[[channel]]\ntype = "registry"\nbase_url = "http://127.0.0.1:{registry.port}"\n'
        'token_env = "DATALOOM_TOKEN"\nbatch_size = 5\nallow_http = true\nallow_private = true\n',
        encoding="utf-8")
    relay_env.secrets.update({"DATALOOM_TOKEN": "tok-123", "NOTICE_RELAY_RETRY_SCHEDULE": "1s,1s"})
    relay_env.write_publishers("artfolio")
    registry.fail_first = 1
    worker = worker_factory()
    await publish(relay_env, [make_decl(i) for i in range(12)])

    async def delivered() -> bool:
        rows = await deliveries(relay_env)
        return len(rows) == 12 and all(r.state == "delivered" for r in rows)
    await eventually(delivered, 90, "registry deliveries", worker=worker)
    assert all(h.get("Authorization") == "Bearer tok-123" for _, h, _ in registry.requests)
    assert all(h.get("Idempotency-Key") for _, h, _ in registry.requests)
    assert all(len(b["items"]) <= 5 for _, _, b in registry.requests)
    first_t, _, first_body = registry.requests[0]
    failed_ids = {i["id"] for i in first_body["items"]}
    retried = [t for t, _, b in registry.requests[1:] if failed_ids & {i["id"] for i in b["items"]}]
    assert retried
    assert min(retried) - first_t >= 3.0
    await asyncio.sleep(0)
