"""The registry channel against a real registry server on 127.0.0.1 (aiohttp), and the
generic REST adapter's pure rules."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

import httpx
import pytest
from aiohttp import web
from builders import make_task

from notice_relay.channels import Channel, RegistryChannel, build_channel
from notice_relay.channels.registry import (
    GenericRestAdapter,
    RegistryAdapter,
    RegistryResponse,
    idempotency_key,
    make_adapter,
)
from notice_relay.connectors import Developer, RegistryChannelConfig
from notice_relay.errors import ConfigError
from notice_relay.models import ChannelType, DeliveryTask, Outcome, OutcomeKind

TOKEN = "reg_live_0123456789abcdef"

# --------------------------------------------------------------------------- the server


@dataclass
class Seen:
    """One request as the registry saw it."""

    path: str
    headers: Mapping[str, str]
    body: Any


Answer = Callable[["Seen"], Awaitable[web.StreamResponse]]


async def _accept_all(seen: Seen) -> web.StreamResponse:
    return web.json_response({"results": [
        {"id": item["id"], "status": "accepted", "receipt": f"rcpt-{item['id']}"}
        for item in seen.body["items"]
    ]})


@dataclass
class Registry:
    """A real registry server; ``answer`` decides each response; every request is
    recorded."""

    base_url: str = ""
    answer: Answer = _accept_all
    requests: list[Seen] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError:
            body = raw
        seen = Seen(request.path, request.headers.copy(), body)
        self.requests.append(seen)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self.answer(seen)
        finally:
            self.in_flight -= 1


@pytest.fixture
async def registry() -> AsyncIterator[Registry]:
    """A real registry server on 127.0.0.1 (random port), for one test."""
    reg = Registry()
    app = web.Application()
    app.router.add_route("POST", "/{tail:.*}", reg.handle)
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    reg.base_url = f"http://{host}:{port}"
    try:
        yield reg
    finally:
        await runner.cleanup()


def _developer(base_url: str, **channel: Any) -> tuple[Developer, RegistryChannelConfig]:
    developer = Developer.model_validate({
        "id": "acme-ai",
        "name": "Acme AI",
        "accepts": ["train-ai"],
        "channel": [{
            "type": "registry", "base_url": base_url, "token_env": "ACME_REGISTRY_TOKEN",
            "allow_http": True, "allow_private": True, **channel,
        }],
    })
    config = developer.channels[0]
    assert isinstance(config, RegistryChannelConfig)
    return developer, config


def _task(**overrides: Any) -> DeliveryTask:
    return make_task(channel="registry", channel_type=ChannelType.REGISTRY, **overrides)


class _ChannelFactory:
    """Builds RegistryChannels (closed when the test ends)."""

    def __init__(self) -> None:
        self.channels: list[RegistryChannel] = []

    def __call__(self, base_url: str, *, timeout: float = 5, max_in_flight: int = 4,
                 **channel: Any) -> RegistryChannel:
        developer, config = _developer(base_url, **channel)
        ch = RegistryChannel(developer, config, TOKEN, timeout=timeout,
                             max_in_flight=max_in_flight)
        self.channels.append(ch)
        return ch


@pytest.fixture
async def channel_for() -> AsyncIterator[_ChannelFactory]:
    """Build registry channels; every one is closed when the test ends."""
    factory = _ChannelFactory()
    yield factory
    for ch in factory.channels:
        await ch.aclose()


def _status(status: int, *, headers: dict[str, str] | None = None, text: str = "") -> Answer:
    async def answer(seen: Seen) -> web.StreamResponse:
        return web.Response(status=status, headers=headers, text=text)
    return answer


# -------------------------------------------------------------------- real-server tests


async def test_batches_carry_token_key_and_items_and_come_back_in_order(
    registry: Registry, channel_for: _ChannelFactory
) -> None:
    """25 tasks with batch_size 10 make 3 POSTs to {base_url}/v1/optouts (10, 10, 5
    items) with the bearer token and each batch's idempotency key; every item is the
    exact Notice v1; outcomes come back delivered with receipts, in task order."""
    ch = channel_for(f"{registry.base_url}/api/", batch_size=10)
    tasks = [_task() for _ in range(25)]
    outcomes = await ch.send(tasks)

    assert [o.delivery_id for o in outcomes] == [t.delivery_id for t in tasks]
    assert all(o.kind is OutcomeKind.DELIVERED for o in outcomes)
    assert [o.receipt for o in outcomes] == [f"rcpt-{t.delivery_id}" for t in tasks]
    assert all(o.status_code == 200 for o in outcomes)

    assert len(registry.requests) == 3
    by_size = sorted(registry.requests, key=lambda seen: -len(seen.body["items"]))
    assert [len(seen.body["items"]) for seen in by_size] == [10, 10, 5]
    notices = {t.delivery_id: t.notice for t in tasks}
    batches = [tasks[0:10], tasks[10:20], tasks[20:25]]
    keys = {idempotency_key(t.delivery_id for t in batch) for batch in batches}
    for seen in registry.requests:
        assert seen.path == "/api/v1/optouts"
        assert seen.headers["Authorization"] == f"Bearer {TOKEN}"
        assert seen.headers["Content-Type"] == "application/json"
        assert seen.headers["User-Agent"].startswith("notice-relay/")
        ids = [item["id"] for item in seen.body["items"]]
        assert ids == sorted(ids)
        assert seen.headers["Idempotency-Key"] == idempotency_key(ids)
        for item in seen.body["items"]:
            assert item["notice"] == json.loads(
                notices[item["id"]].model_dump_json(by_alias=True))
    assert {seen.headers["Idempotency-Key"] for seen in registry.requests} == keys


async def test_the_same_batch_sent_again_has_the_same_key(
    registry: Registry, channel_for: _ChannelFactory
) -> None:
    """A retried batch (next attempt, same deliveries) carries the same idempotency
    key and body; another batch carries another key."""
    ch = channel_for(registry.base_url)
    batch = [_task() for _ in range(3)]
    await ch.send(batch)
    await ch.send([t.model_copy(update={"attempt": 2}) for t in reversed(batch)])
    await ch.send([_task()])
    first, again, other = registry.requests
    assert first.headers["Idempotency-Key"] == again.headers["Idempotency-Key"]
    assert first.body == again.body
    assert other.headers["Idempotency-Key"] != first.headers["Idempotency-Key"]


async def test_per_item_results_map_back_to_their_deliveries(
    registry: Registry, channel_for: _ChannelFactory
) -> None:
    """accepted/duplicate → delivered with the receipt; rejected → permanent with the
    error; retry → transient; a missing item → transient "did not answer"; an unknown
    status → transient; extra ids in the results are ignored."""
    tasks = [_task(delivery_id=f"dlv-{name}") for name in
             ("accepted", "duplicate", "rejected", "retry", "missing", "weird", "bare")]

    async def answer(seen: Seen) -> web.StreamResponse:
        return web.json_response({"results": [
            {"id": "dlv-retry", "status": "retry", "error": "index rebuilding"},
            {"id": "dlv-accepted", "status": "accepted", "receipt": "R-1"},
            {"id": "dlv-duplicate", "status": "duplicate", "receipt": "R-0"},
            {"id": "dlv-rejected", "status": "rejected", "error": "unknown artist\r\nX: y"},
            {"id": "dlv-weird", "status": "maybe"},
            {"id": "dlv-bare", "status": "accepted"},
            {"id": "dlv-someone-else", "status": "accepted"},
            {"status": "accepted"},
            "junk",
        ]}, headers={"Retry-After": "30"})

    registry.answer = answer
    outcomes = await channel_for(registry.base_url).send(tasks)
    got = {o.delivery_id: (o.kind, o.receipt, o.error, o.retry_after) for o in outcomes}
    assert got == {
        "dlv-accepted": (OutcomeKind.DELIVERED, "R-1", None, None),
        "dlv-duplicate": (OutcomeKind.DELIVERED, "R-0", None, None),
        "dlv-rejected": (OutcomeKind.PERMANENT, None,
                         "registry rejected the notice: unknown artist  X: y", None),
        "dlv-retry": (OutcomeKind.TRANSIENT, None,
                      "registry asked to retry this item: index rebuilding", 30.0),
        "dlv-missing": (OutcomeKind.TRANSIENT, None,
                        "registry did not answer for this item", None),
        "dlv-weird": (OutcomeKind.TRANSIENT, None,
                      "registry answered an unknown status 'maybe' for this item", None),
        "dlv-bare": (OutcomeKind.DELIVERED, "accepted", None, None),
    }
    assert [o.delivery_id for o in outcomes] == [t.delivery_id for t in tasks]


async def test_503_with_retry_after_is_transient_for_every_item(
    registry: Registry, channel_for: _ChannelFactory
) -> None:
    """503 + Retry-After: 2 makes every task of the batch transient with retry_after
    2 (the retry stage waits at least that long)."""
    registry.answer = _status(503, headers={"Retry-After": "2"}, text="maintenance")
    tasks = [_task() for _ in range(4)]
    outcomes = await channel_for(registry.base_url).send(tasks)
    for outcome in outcomes:
        assert outcome.kind is OutcomeKind.TRANSIENT
        assert outcome.retry_after is not None
        assert outcome.retry_after >= 2
        assert outcome.status_code == 503
        assert outcome.error == "HTTP 503 Service Unavailable: maintenance"


@pytest.mark.parametrize("status", [408, 425, 429, 500, 502])
async def test_retryable_statuses_are_transient(
    registry: Registry, channel_for: _ChannelFactory, status: int
) -> None:
    """408, 425, 429 and 5xx are transient for every item."""
    registry.answer = _status(status)
    outcomes = await channel_for(registry.base_url).send([_task(), _task()])
    assert {o.kind for o in outcomes} == {OutcomeKind.TRANSIENT}
    assert {o.status_code for o in outcomes} == {status}


@pytest.mark.parametrize("status", [401, 403])
async def test_refused_token_is_permanent(
    registry: Registry, channel_for: _ChannelFactory, status: int
) -> None:
    """401 and 403 are permanent for every item: the registry refused our token."""
    registry.answer = _status(status, text="token expired")
    outcomes = await channel_for(registry.base_url).send([_task(), _task()])
    for outcome in outcomes:
        assert outcome.kind is OutcomeKind.PERMANENT
        assert outcome.error is not None
        assert "registry refused our token" in outcome.error
        assert outcome.error.endswith(": token expired")
        assert outcome.status_code == status


async def test_other_4xx_are_permanent_and_redirects_not_followed(
    registry: Registry, channel_for: _ChannelFactory
) -> None:
    """400 is permanent with the start of the body; 302 is permanent and its Location
    is never requested; 410 asks to disable the channel."""
    registry.answer = _status(400, text="bad batch")
    [outcome] = await channel_for(registry.base_url).send([_task()])
    assert outcome.kind is OutcomeKind.PERMANENT
    assert outcome.error == "HTTP 400 Bad Request: bad batch"

    registry.answer = _status(302, headers={"Location": f"{registry.base_url}/elsewhere"})
    [outcome] = await channel_for(registry.base_url).send([_task()])
    assert outcome.kind is OutcomeKind.PERMANENT
    assert outcome.error is not None
    assert "redirects are not followed" in outcome.error
    assert [seen.path for seen in registry.requests] == ["/v1/optouts", "/v1/optouts"]

    registry.answer = _status(410)
    [outcome] = await channel_for(registry.base_url).send([_task()])
    assert outcome.kind is OutcomeKind.PERMANENT
    assert outcome.disable_channel is True


@pytest.mark.parametrize(
    "body", [b"<html>oops</html>", b'{"results": "none"}', b"[]", b'{"items": []}']
)
async def test_malformed_2xx_is_transient(
    registry: Registry, channel_for: _ChannelFactory, body: bytes
) -> None:
    """A 2xx whose body is not {"results": [...]} is transient for every item."""
    async def answer(seen: Seen) -> web.StreamResponse:
        return web.Response(status=200, body=body, content_type="application/json")

    registry.answer = answer
    outcomes = await channel_for(registry.base_url).send([_task(), _task()])
    for outcome in outcomes:
        assert outcome.kind is OutcomeKind.TRANSIENT
        assert outcome.error is not None
        assert outcome.error.startswith("HTTP 200 OK: malformed response from the registry")


async def test_slow_registry_times_out_as_transient(
    registry: Registry, channel_for: _ChannelFactory
) -> None:
    """A registry slower than the timeout: transient for the batch, after about the
    timeout."""
    async def slow(seen: Seen) -> web.StreamResponse:
        await asyncio.sleep(5)
        return web.Response(text="late")

    registry.answer = slow
    started = time.perf_counter()
    outcomes = await channel_for(registry.base_url, timeout=0.3).send([_task(), _task()])
    assert time.perf_counter() - started < 2
    for outcome in outcomes:
        assert outcome.kind is OutcomeKind.TRANSIENT
        assert outcome.error is not None
        assert outcome.error.startswith("timed out after 0.3s")


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_connection_refused_is_transient(channel_for: _ChannelFactory) -> None:
    """Nothing listening: transient for every item."""
    outcomes = await channel_for(f"http://127.0.0.1:{_closed_port()}").send([_task(), _task()])
    for outcome in outcomes:
        assert outcome.kind is OutcomeKind.TRANSIENT
        assert outcome.error is not None
        assert outcome.error.startswith("connection failed")


async def test_batches_go_out_concurrently_within_the_bound(
    registry: Registry, channel_for: _ChannelFactory
) -> None:
    """12 batches are sent concurrently, never more than max_in_flight at once; a
    failing batch does not affect the others' outcomes."""
    async def answer(seen: Seen) -> web.StreamResponse:
        await asyncio.sleep(0.05)
        if any(item["id"].startswith("fail") for item in seen.body["items"]):
            return web.Response(status=500)
        return await _accept_all(seen)

    registry.answer = answer
    tasks = [_task(delivery_id=f"{'fail' if n == 7 else 'ok'}-{n:02d}") for n in range(12)]
    started = time.perf_counter()
    outcomes = await channel_for(registry.base_url, batch_size=1, max_in_flight=3).send(tasks)
    elapsed = time.perf_counter() - started
    assert registry.max_in_flight == 3
    assert elapsed < 12 * 0.05
    assert [o.delivery_id for o in outcomes] == [t.delivery_id for t in tasks]
    assert [o.kind for o in outcomes] == [
        OutcomeKind.TRANSIENT if n == 7 else OutcomeKind.DELIVERED for n in range(12)
    ]


# ------------------------------------------------------------------ lifecycle and misuse


async def test_channel_lifecycle_and_misuse(registry: Registry) -> None:
    """The channel satisfies the Channel protocol, refuses tasks of another channel,
    answers an empty batch with nothing, closes idempotently, refuses to send once
    closed, and leaves an injected client open."""
    developer, config = _developer(registry.base_url)
    async with httpx.AsyncClient() as client:
        ch = RegistryChannel(developer, config, TOKEN, client=client)
        assert isinstance(ch, Channel)
        assert await ch.send([]) == []
        with pytest.raises(ValueError, match="is for acme-ai/webhook"):
            await ch.send([make_task()])
        await ch.aclose()
        await ch.aclose()
        assert not client.is_closed
        with pytest.raises(RuntimeError, match="closed"):
            await ch.send([_task()])
    async with RegistryChannel(developer, config, TOKEN) as owned:
        [outcome] = await owned.send([_task()])
        assert outcome.kind is OutcomeKind.DELIVERED
    assert owned._client.is_closed


@pytest.mark.parametrize("token", ["", "two words", "line\nX-Evil: 1", "tab\t"])
def test_unusable_tokens_fail_at_construction(token: str) -> None:
    """A token that is empty or could forge a header is refused when the channel is
    built (at start-up), without echoing it."""
    developer, config = _developer("http://127.0.0.1:9/")
    with pytest.raises(ConfigError, match=r"^developer 'acme-ai', channel 'registry': the "
                       r"registry token is empty or contains") as info:
        RegistryChannel(developer, config, token)
    assert "Evil" not in str(info.value)


async def test_build_channel_resolves_the_token() -> None:
    """build_channel reads the token from the environment; a missing one is a
    ConfigError naming the variable."""
    developer, config = _developer("http://127.0.0.1:9/")
    ch = build_channel(developer, config, environ={"ACME_REGISTRY_TOKEN": f" {TOKEN}\n"})
    assert isinstance(ch, RegistryChannel)
    assert isinstance(ch.adapter, GenericRestAdapter)
    assert ch.adapter.build_request([_task()]).headers["Authorization"] == f"Bearer {TOKEN}"
    await ch.aclose()
    with pytest.raises(ConfigError, match="ACME_REGISTRY_TOKEN"):
        build_channel(developer, config, environ={})


@pytest.mark.parametrize(
    ("exc", "prefix"),
    [
        (httpx.ConnectTimeout("x"), "timed out after 30s while connecting"),
        (httpx.RemoteProtocolError("x"), "connection lost"),
        (httpx.UnsupportedProtocol("x"), "cannot send"),
        (RuntimeError("bug"), "internal error: RuntimeError"),
    ],
)
async def test_exceptions_inside_the_client_become_outcomes(exc: Exception, prefix: str) -> None:
    """Whatever the HTTP client raises, every task of the batch gets an outcome."""
    def explode(request: httpx.Request) -> httpx.Response:
        raise exc

    developer, config = _developer("https://reg.example.invalid/")
    async with httpx.AsyncClient(transport=httpx.MockTransport(explode)) as client:
        ch = RegistryChannel(developer, config, TOKEN, client=client)
        outcomes = await ch.send([_task(), _task()])
    assert len(outcomes) == 2
    for outcome in outcomes:
        assert outcome.error is not None
        assert outcome.error.startswith(prefix)


async def test_an_adapter_that_loses_a_task_gives_transient_outcomes() -> None:
    """An adapter bug (an outcome missing) cannot lose a task: the batch is transient."""
    class Lossy(GenericRestAdapter):
        def read_response(self, tasks: Sequence[DeliveryTask], response: RegistryResponse,
                          *, attempted_at: datetime, latency_ms: float) -> list[Outcome]:
            return super().read_response(tasks, response, attempted_at=attempted_at,
                                         latency_ms=latency_ms)[1:]

    def ok(request: httpx.Request) -> httpx.Response:
        items = json.loads(request.content)["items"]
        return httpx.Response(200, json={"results": [
            {"id": item["id"], "status": "accepted"} for item in items]})

    developer, config = _developer("https://reg.example.invalid/")
    adapter = Lossy(config.base_url, TOKEN)
    assert isinstance(adapter, RegistryAdapter)
    async with httpx.AsyncClient(transport=httpx.MockTransport(ok)) as client:
        ch = RegistryChannel(developer, config, TOKEN, client=client, adapter=adapter)
        outcomes = await ch.send([_task(), _task()])
    assert [o.kind for o in outcomes] == [OutcomeKind.TRANSIENT, OutcomeKind.TRANSIENT]
    assert all("internal error: adapter 'generic-rest'" in (o.error or "") for o in outcomes)


# --------------------------------------------------------------- the adapter, pure rules


def test_request_is_order_independent_and_deduplicated() -> None:
    """The same deliveries in any order, or repeated, give the same body and key."""
    adapter = GenericRestAdapter("https://reg.example.invalid/base", TOKEN)
    a, b, c = _task(), _task(), _task()
    first = adapter.build_request([a, b, c])
    assert first.method == "POST"
    assert first.url == "https://reg.example.invalid/base/v1/optouts"
    assert adapter.build_request([c, a, b, a]) == first
    assert first.headers["Idempotency-Key"] == idempotency_key([b.delivery_id, a.delivery_id,
                                                                c.delivery_id])
    assert first.headers["Idempotency-Key"].startswith("nr-")
    assert len(first.headers["Idempotency-Key"]) == 3 + 64
    document = json.loads(first.content)
    assert [item["id"] for item in document["items"]] == sorted(
        t.delivery_id for t in (a, b, c))
    assert adapter.build_request([a, b]).headers["Idempotency-Key"] != \
        first.headers["Idempotency-Key"]


@pytest.mark.parametrize(
    ("base_url", "expected"),
    [
        ("https://reg.example.invalid", "https://reg.example.invalid/v1/optouts"),
        ("https://reg.example.invalid/", "https://reg.example.invalid/v1/optouts"),
        ("https://reg.example.invalid/api/", "https://reg.example.invalid/api/v1/optouts"),
        ("https://reg.example.invalid:8443/x?tenant=7",
         "https://reg.example.invalid:8443/x/v1/optouts?tenant=7"),
    ],
)
def test_endpoint_is_appended_to_the_base_path(base_url: str, expected: str) -> None:
    """/v1/optouts goes after the base URL's path, keeping its port and query."""
    assert GenericRestAdapter(base_url, TOKEN).url == expected


def test_make_adapter_knows_generic_rest() -> None:
    """The connector's adapter name selects the adapter."""
    _, config = _developer("https://reg.example.invalid/")
    assert isinstance(make_adapter(config, TOKEN), GenericRestAdapter)


def test_retry_after_http_date_on_a_per_item_retry() -> None:
    """A per-item retry takes the response's Retry-After (an HTTP-date too)."""
    adapter = GenericRestAdapter("https://reg.example.invalid/", TOKEN)
    task = _task()
    when = datetime.now(UTC).replace(microsecond=0)
    response = RegistryResponse(
        200, "OK",
        httpx.Headers({"Retry-After": format_datetime(when.replace(year=when.year + 1),
                                                      usegmt=True)}),
        json.dumps({"results": [{"id": task.delivery_id, "status": "retry"}]}).encode(),
    )
    [outcome] = adapter.read_response([task], response, attempted_at=when, latency_ms=1.0)
    assert outcome.kind is OutcomeKind.TRANSIENT
    assert outcome.retry_after is not None
    assert outcome.retry_after > 0
