"""The webhook channel against real HTTP servers on 127.0.0.1, the pure status rules,
and the in-package test double."""

from __future__ import annotations

import asyncio
import base64
import inspect
import itertools
import os
import socket
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from aiohttp import web
from builders import make_task
from standardwebhooks.webhooks import Webhook

from notice_relay.channels import (
    Channel,
    MockChannel,
    WebhookChannel,
    build_channel,
    classify_status,
    parse_retry_after,
)
from notice_relay.channels.base import MAX_RETRY_AFTER, RateLimiter
from notice_relay.channels.mock import deliver, fail_permanent, fail_transient
from notice_relay.channels.webhook import translate_error
from notice_relay.connectors import Developer, WebhookChannelConfig
from notice_relay.errors import ChannelError, ConfigError
from notice_relay.models import OutcomeKind

SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()


# --------------------------------------------------------------------------- servers


@dataclass
class Request:
    """One request as the receiver saw it."""

    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """A real aiohttp server whose paths behave differently; records every request."""

    base_url: str = ""
    requests: list[Request] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append(Request(request.path, dict(request.headers), body))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self._respond(request)
        finally:
            self.in_flight -= 1

    async def _respond(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        webhook_id = request.headers.get("webhook-id", "")
        if path == "/ok":
            return web.json_response({"receipt": f"rcpt-{webhook_id}"})
        if path == "/text":
            return web.Response(text="thanks")
        if path == "/no-content":
            return web.Response(status=204)
        if path.startswith("/status/"):
            status = int(path.rsplit("/", 1)[1])
            headers = {}
            if "retry_after" in request.query:
                headers["Retry-After"] = request.query["retry_after"]
            return web.Response(status=status, headers=headers, text=request.query.get("body", ""))
        if path == "/redirect":
            return web.Response(status=302, headers={"Location": f"{self.base_url}/ok"})
        if path == "/slow":
            await asyncio.sleep(5)
            return web.Response(text="too late")
        if path == "/mixed":
            kind = webhook_id.split("-", 1)[0]
            if kind == "gone":
                return web.Response(status=410)
            if kind == "slow":
                await asyncio.sleep(5)
            return web.json_response({"receipt": f"rcpt-{webhook_id}"})
        if path == "/concurrent":
            await asyncio.sleep(0.05)
            return web.json_response({"receipt": f"rcpt-{webhook_id}"})
        return web.Response(status=404)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    """A real HTTP server on 127.0.0.1 (random port), for one test."""
    rec = Receiver()
    app = web.Application()
    app.router.add_route("POST", "/{tail:.*}", rec.handle)
    # Handlers are cancelled when the client gives up (the /slow case), so shutdown
    # does not wait for them.
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    rec.base_url = f"http://{host}:{port}"
    try:
        yield rec
    finally:
        await runner.cleanup()


@pytest.fixture
async def resetting_server() -> AsyncIterator[str]:
    """A TCP server that reads the start of a request and resets the connection."""

    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        sock = writer.get_extra_info("socket")
        # SO_LINGER 0: close() sends RST instead of FIN, i.e. "connection reset by peer".
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(reset, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        await server.wait_closed()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _developer(url: str, **channel: Any) -> tuple[Developer, WebhookChannelConfig]:
    developer = Developer.model_validate({
        "id": "acme-ai",
        "name": "Acme AI",
        "accepts": ["train-ai"],
        "channel": [{
            "type": "webhook", "url": url, "secret_env": "ACME_SECRET",
            "allow_http": True, "allow_private": True, **channel,
        }],
    })
    config = developer.channels[0]
    assert isinstance(config, WebhookChannelConfig)
    return developer, config


class _ChannelFactory:
    """Builds WebhookChannels for a URL (and channel settings) and remembers them."""

    def __init__(self) -> None:
        self.channels: list[WebhookChannel] = []

    def __call__(
        self, url: str, secrets: list[str] | None = None, **channel: Any
    ) -> WebhookChannel:
        developer, config = _developer(url, **channel)
        ch = WebhookChannel(developer, config, secrets or [SECRET])
        self.channels.append(ch)
        return ch


@pytest.fixture
async def channel_for() -> AsyncIterator[_ChannelFactory]:
    """Build webhook channels; every one is closed when the test ends."""
    factory = _ChannelFactory()
    yield factory
    for ch in factory.channels:
        await ch.aclose()


# -------------------------------------------------------------------- real-server tests


async def test_delivered_with_signature_verifying_and_stable_id(
    receiver: Receiver, channel_for: _ChannelFactory
) -> None:
    """200: delivered with the receiver's receipt; the exact notice JSON is sent,
    signed so the reference library verifies it, webhook-id = delivery_id on every
    attempt, with our user-agent."""
    ch = channel_for(f"{receiver.base_url}/ok")
    task = make_task()
    [outcome] = await ch.send([task])
    assert outcome.kind is OutcomeKind.DELIVERED
    assert outcome.delivery_id == task.delivery_id
    assert outcome.status_code == 200
    assert outcome.receipt == f"rcpt-{task.delivery_id}"
    assert outcome.latency_ms > 0
    assert outcome.disable_channel is False

    [retry] = await ch.send([task.model_copy(update={"attempt": 2})])
    assert retry.kind is OutcomeKind.DELIVERED
    assert retry.attempt == 2

    first, second = receiver.requests
    for seen in (first, second):
        assert seen.body == task.notice.model_dump_json(by_alias=True).encode()
        assert seen.headers["webhook-id"] == task.delivery_id
        assert seen.headers["Content-Type"] == "application/json"
        assert seen.headers["User-Agent"].startswith("notice-relay/")
        assert Webhook(SECRET).verify(seen.body, seen.headers)["notice_id"] == task.notice.notice_id


async def test_two_secrets_during_rotation(
    receiver: Receiver, channel_for: _ChannelFactory
) -> None:
    """With two secrets, a receiver holding either one verifies the request."""
    new = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    ch = channel_for(f"{receiver.base_url}/ok", secrets=[SECRET, new])
    await ch.send([make_task()])
    [seen] = receiver.requests
    Webhook(SECRET).verify(seen.body, seen.headers)
    Webhook(new).verify(seen.body, seen.headers)


@pytest.mark.parametrize(
    ("path", "receipt"), [("/text", "200 OK"), ("/no-content", "204 No Content")]
)
async def test_receipt_falls_back_to_the_status_line(
    receiver: Receiver, channel_for: _ChannelFactory, path: str, receipt: str
) -> None:
    """A 2xx without a JSON receipt is delivered with the status line as receipt."""
    [outcome] = await channel_for(f"{receiver.base_url}{path}").send([make_task()])
    assert outcome.kind is OutcomeKind.DELIVERED
    assert outcome.receipt == receipt


async def test_503_with_retry_after_is_transient(
    receiver: Receiver, channel_for: _ChannelFactory
) -> None:
    """503 + Retry-After: 7 is transient and carries retry_after = 7."""
    ch = channel_for(f"{receiver.base_url}/status/503?retry_after=7")
    [outcome] = await ch.send([make_task()])
    assert outcome.kind is OutcomeKind.TRANSIENT
    assert outcome.retry_after == 7
    assert outcome.status_code == 503
    assert outcome.error == "HTTP 503 Service Unavailable"


@pytest.mark.parametrize("status", [408, 425, 429, 500, 502, 504])
async def test_retryable_statuses_are_transient(
    receiver: Receiver, channel_for: _ChannelFactory, status: int
) -> None:
    """408, 425, 429 and 5xx are transient; without Retry-After, retry_after is None."""
    [outcome] = await channel_for(f"{receiver.base_url}/status/{status}").send([make_task()])
    assert outcome.kind is OutcomeKind.TRANSIENT
    assert outcome.status_code == status
    assert outcome.retry_after is None


async def test_429_with_http_date_retry_after(
    receiver: Receiver, channel_for: _ChannelFactory
) -> None:
    """429 with an HTTP-date Retry-After gives the seconds until that date."""
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=120), usegmt=True)
    url = f"{receiver.base_url}/status/429?retry_after={quote(when)}"
    [outcome] = await channel_for(url).send([make_task()])
    assert outcome.kind is OutcomeKind.TRANSIENT
    assert outcome.retry_after is not None
    assert 100 < outcome.retry_after <= 120


async def test_410_is_permanent_and_asks_to_disable_the_channel(
    receiver: Receiver, channel_for: _ChannelFactory
) -> None:
    """410 Gone is permanent and flags disable_channel."""
    [outcome] = await channel_for(f"{receiver.base_url}/status/410").send([make_task()])
    assert outcome.kind is OutcomeKind.PERMANENT
    assert outcome.disable_channel is True
    assert outcome.error is not None
    assert "410" in outcome.error


async def test_400_is_permanent_with_a_sanitized_body_excerpt(
    receiver: Receiver, channel_for: _ChannelFactory
) -> None:
    """400 is permanent (channel stays enabled); the error quotes the start of the
    body with control characters removed."""
    url = f"{receiver.base_url}/status/400?body=bad%20signature%0D%0AX-Evil:%201"
    [outcome] = await channel_for(url).send([make_task()])
    assert outcome.kind is OutcomeKind.PERMANENT
    assert outcome.disable_channel is False
    assert outcome.error == "HTTP 400 Bad Request: bad signature  X-Evil: 1"


async def test_302_is_permanent_and_not_followed(
    receiver: Receiver, channel_for: _ChannelFactory
) -> None:
    """A redirect is a permanent failure and the Location is never requested."""
    [outcome] = await channel_for(f"{receiver.base_url}/redirect").send([make_task()])
    assert outcome.kind is OutcomeKind.PERMANENT
    assert outcome.status_code == 302
    assert outcome.error is not None
    assert "redirects are not followed" in outcome.error
    assert [r.path for r in receiver.requests] == ["/redirect"]


async def test_slow_receiver_times_out_as_transient(
    receiver: Receiver, channel_for: _ChannelFactory
) -> None:
    """A receiver slower than the configured timeout gives a transient outcome,
    after about the timeout."""
    ch = channel_for(f"{receiver.base_url}/slow", timeout="300ms")
    started = time.perf_counter()
    [outcome] = await ch.send([make_task()])
    elapsed = time.perf_counter() - started
    assert outcome.kind is OutcomeKind.TRANSIENT
    assert outcome.error is not None
    assert outcome.error.startswith("timed out after 0.3s")
    assert 0.25 < elapsed < 2.0


async def test_closed_port_is_transient(channel_for: _ChannelFactory) -> None:
    """Nothing listening (connection refused) is transient."""
    [outcome] = await channel_for(f"http://127.0.0.1:{_closed_port()}/").send([make_task()])
    assert outcome.kind is OutcomeKind.TRANSIENT
    assert outcome.error is not None
    assert outcome.error.startswith("connection failed")
    assert outcome.status_code is None


async def test_connection_reset_is_transient(
    resetting_server: str, channel_for: _ChannelFactory
) -> None:
    """A server that resets the connection mid-request gives a transient outcome."""
    [outcome] = await channel_for(resetting_server).send([make_task()])
    assert outcome.kind is OutcomeKind.TRANSIENT
    assert outcome.error is not None
    assert outcome.error.startswith("connection lost")


async def test_batch_is_sent_concurrently_up_to_max_in_flight(
    receiver: Receiver, channel_for: _ChannelFactory
) -> None:
    """50 tasks go out concurrently, never more than max_in_flight at once, and the
    outcomes come back in task order."""
    ch = channel_for(f"{receiver.base_url}/concurrent", max_in_flight=8)
    tasks = [make_task() for _ in range(50)]
    started = time.perf_counter()
    outcomes = await ch.send(tasks)
    elapsed = time.perf_counter() - started
    assert [o.delivery_id for o in outcomes] == [t.delivery_id for t in tasks]
    assert [o.receipt for o in outcomes] == [f"rcpt-{t.delivery_id}" for t in tasks]
    assert all(o.kind is OutcomeKind.DELIVERED for o in outcomes)
    assert receiver.max_in_flight == 8
    assert len(receiver.requests) == 50
    assert elapsed < 50 * 0.05  # serial sending would take at least 2.5 s


async def test_rate_limit_spaces_requests(receiver: Receiver, channel_for: _ChannelFactory) -> None:
    """rate_limit = 20/s: 5 requests take at least 4 intervals of 50 ms."""
    ch = channel_for(f"{receiver.base_url}/ok", rate_limit=20)
    started = time.perf_counter()
    await ch.send([make_task() for _ in range(5)])
    assert time.perf_counter() - started >= 0.19


async def test_mixed_batch_one_outcome_per_task(
    receiver: Receiver, channel_for: _ChannelFactory
) -> None:
    """In one batch, a gone, a slow and a fine task each get their own outcome, in
    order; the slow one does not hold up the others' results; an empty batch is fine."""
    ch = channel_for(f"{receiver.base_url}/mixed", timeout="300ms")
    tasks = [make_task(delivery_id=f"{kind}-1") for kind in ("gone", "slow", "ok")]
    outcomes = await ch.send(tasks)
    assert [(o.delivery_id, o.kind) for o in outcomes] == [
        ("gone-1", OutcomeKind.PERMANENT), ("slow-1", OutcomeKind.TRANSIENT),
        ("ok-1", OutcomeKind.DELIVERED),
    ]
    assert outcomes[2].latency_ms < 250
    assert await ch.send([]) == []


# ------------------------------------------------------------------ lifecycle and misuse


async def test_channel_lifecycle_and_misuse(receiver: Receiver) -> None:
    """The channel satisfies the Channel protocol, refuses tasks of another channel,
    closes idempotently, refuses to send once closed, and leaves an injected client open."""
    developer, config = _developer(f"{receiver.base_url}/ok")
    async with httpx.AsyncClient() as client:
        ch = WebhookChannel(developer, config, [SECRET], client=client)
        assert isinstance(ch, Channel)
        with pytest.raises(ValueError, match="is for acme-ai/other"):
            await ch.send([make_task(channel="other")])
        await ch.aclose()
        await ch.aclose()
        assert not client.is_closed
        with pytest.raises(RuntimeError, match="closed"):
            await ch.send([make_task()])
    async with WebhookChannel(developer, config, [SECRET]) as owned:
        [outcome] = await owned.send([make_task()])
        assert outcome.kind is OutcomeKind.DELIVERED
    assert owned._client.is_closed


def test_bad_secrets_fail_at_construction() -> None:
    """A channel without a usable secret cannot be built (fails at start-up)."""
    developer, config = _developer("http://127.0.0.1:9/")
    with pytest.raises(ConfigError, match="no webhook secret"):
        WebhookChannel(developer, config, [])
    with pytest.raises(ConfigError, match="not valid base64"):
        WebhookChannel(developer, config, ["whsec_***"])


async def test_build_channel_resolves_the_secret() -> None:
    """build_channel reads the secret from the environment; a missing secret (or, for
    email, missing SMTP settings) is a ConfigError."""
    developer, config = _developer("http://127.0.0.1:9/")
    ch = build_channel(developer, config, environ={"ACME_SECRET": SECRET})
    assert isinstance(ch, WebhookChannel)
    await ch.aclose()
    with pytest.raises(ConfigError, match="ACME_SECRET"):
        build_channel(developer, config, environ={})
    email = Developer.model_validate({
        "id": "x", "name": "X", "accepts": ["train-ai"],
        "channel": [{"type": "email", "to": ["a@b.example.invalid"]}],
    })
    with pytest.raises(ConfigError, match="NOTICE_RELAY_SMTP_HOST is not set"):
        build_channel(email, email.channels[0], environ={})


# ------------------------------------------------------- no exception escapes (one place)


def _httpx_exception_classes() -> list[type[Exception]]:
    return sorted(
        (obj for obj in vars(httpx).values()
         if inspect.isclass(obj) and issubclass(obj, Exception)
         and obj.__module__.startswith("httpx")),
        key=lambda cls: cls.__name__,
    )


def _instantiate(cls: type[Exception]) -> Exception:
    request = httpx.Request("POST", "https://h.example.invalid/")
    for args, kwargs in (((), {}), (("boom",), {}), (("boom",), {"request": request})):
        try:
            return cls(*args, **kwargs)
        except TypeError:
            continue
    response = httpx.Response(500, request=request)
    return cls("boom", request=request, response=response)  # type: ignore[call-arg]


@pytest.mark.parametrize("cls", _httpx_exception_classes(), ids=lambda cls: cls.__name__)
def test_every_httpx_exception_translates_to_a_channel_error(cls: type[Exception]) -> None:
    """translate_error maps every exception class httpx exports to a ChannelError,
    so none can escape send."""
    error = translate_error(_instantiate(cls), timeout=10)
    assert isinstance(error, ChannelError)
    if issubclass(cls, httpx.TimeoutException):
        assert error.retriable
    if issubclass(cls, httpx.UnsupportedProtocol | httpx.InvalidURL):
        assert not error.retriable


@pytest.mark.parametrize(
    ("exc", "kind", "prefix"),
    [
        (httpx.ConnectTimeout("x"), OutcomeKind.TRANSIENT, "timed out after 10s while connecting"),
        (httpx.ReadError("x"), OutcomeKind.TRANSIENT, "connection lost"),
        (httpx.RemoteProtocolError("x"), OutcomeKind.TRANSIENT, "connection lost"),
        (httpx.UnsupportedProtocol("x"), OutcomeKind.PERMANENT, "cannot send"),
        (httpx.LocalProtocolError("x"), OutcomeKind.PERMANENT, "cannot send"),
        (httpx.DecodingError("x"), OutcomeKind.TRANSIENT, "HTTP error"),
        (OSError("disk on fire"), OutcomeKind.TRANSIENT, "internal error: OSError"),
        (RuntimeError("bug"), OutcomeKind.TRANSIENT, "internal error: RuntimeError"),
    ],
)
async def test_exceptions_inside_the_client_become_outcomes(
    exc: Exception, kind: OutcomeKind, prefix: str
) -> None:
    """Whatever the HTTP client raises (httpx errors or a bug), send returns an outcome."""

    def explode(request: httpx.Request) -> httpx.Response:
        raise exc

    developer, config = _developer("https://h.example.invalid/")
    async with httpx.AsyncClient(transport=httpx.MockTransport(explode)) as client:
        ch = WebhookChannel(developer, config, [SECRET], client=client)
        [outcome] = await ch.send([make_task()])
    assert outcome.kind is kind
    assert outcome.error is not None
    assert outcome.error.startswith(prefix)


# -------------------------------------------------------------------- pure status rules


@pytest.mark.parametrize(
    ("status", "kind", "disable"),
    [
        (200, OutcomeKind.DELIVERED, False),
        (202, OutcomeKind.DELIVERED, False),
        (204, OutcomeKind.DELIVERED, False),
        (301, OutcomeKind.PERMANENT, False),
        (302, OutcomeKind.PERMANENT, False),
        (304, OutcomeKind.PERMANENT, False),
        (307, OutcomeKind.PERMANENT, False),
        (400, OutcomeKind.PERMANENT, False),
        (401, OutcomeKind.PERMANENT, False),
        (403, OutcomeKind.PERMANENT, False),
        (404, OutcomeKind.PERMANENT, False),
        (408, OutcomeKind.TRANSIENT, False),
        (410, OutcomeKind.PERMANENT, True),
        (413, OutcomeKind.PERMANENT, False),
        (425, OutcomeKind.TRANSIENT, False),
        (429, OutcomeKind.TRANSIENT, False),
        (500, OutcomeKind.TRANSIENT, False),
        (503, OutcomeKind.TRANSIENT, False),
        (599, OutcomeKind.TRANSIENT, False),
        (101, OutcomeKind.PERMANENT, False),
        (600, OutcomeKind.PERMANENT, False),
    ],
)
def test_classify_status(status: int, kind: OutcomeKind, disable: bool) -> None:
    """The status table of DESIGN.md: 2xx delivered; 408/425/429/5xx transient; 410
    permanent + disable; other 3xx/4xx permanent."""
    verdict = classify_status(status, "Reason")
    assert verdict.kind is kind
    assert verdict.disable_channel is disable
    if 300 <= status < 400:
        assert verdict.error is not None
        assert "redirects are not followed" in verdict.error


def test_retry_after_only_counts_for_transient_statuses() -> None:
    """Retry-After is read on transient statuses, ignored on permanent ones."""
    assert classify_status(503, retry_after="7").retry_after == 7
    assert classify_status(400, retry_after="7").retry_after is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("7", 7.0),
        (" 120 ", 120.0),
        ("0", 0.0),
        ("-5", None),
        ("1.5", None),
        ("soon", None),
        ("", None),
        ("999999999999", MAX_RETRY_AFTER),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),  # in the past
        ("Wed, 21 Oct 2015 07:30:00 GMT", 120.0),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    """Seconds or an HTTP-date (relative to now), never negative, capped, None when
    unreadable."""
    now = datetime(2015, 10, 21, 7, 28, 0, tzinfo=UTC)
    assert parse_retry_after(value, now=now) == expected


async def test_rate_limiter_is_first_come_first_served() -> None:
    """The limiter hands out slots in arrival order, 1/rate apart."""
    limiter = RateLimiter(50)
    loop = asyncio.get_running_loop()
    starts: list[float] = []

    async def take() -> None:
        await limiter.acquire()
        starts.append(loop.time())

    await asyncio.gather(*(take() for _ in range(4)))
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert all(gap >= 0.015 for gap in gaps), gaps
    with pytest.raises(ValueError, match="positive"):
        RateLimiter(0)


# ------------------------------------------------------------------------ the test double


async def test_mock_channel_records_and_follows_its_script() -> None:
    """MockChannel answers scripted outcomes per delivery id, then its default, and
    records every batch."""
    ch: Channel = MockChannel("webhook")
    assert isinstance(ch, MockChannel)
    a, b = make_task(), make_task()
    ch.script(a.delivery_id, fail_transient(retry_after=5), fail_permanent(disable_channel=True))
    first = await ch.send([a, b])
    assert [(o.kind, o.retry_after) for o in first] == [
        (OutcomeKind.TRANSIENT, 5), (OutcomeKind.DELIVERED, None)
    ]
    [second] = await ch.send([a])
    assert second.kind is OutcomeKind.PERMANENT
    assert second.disable_channel
    [third] = await ch.send([a])
    assert third.kind is OutcomeKind.DELIVERED
    assert third.receipt == "mock"
    assert [t.delivery_id for t in ch.sent] == [a.delivery_id, b.delivery_id, a.delivery_id,
                                                a.delivery_id]
    assert len(ch.batches) == 3
    await ch.aclose()
    with pytest.raises(RuntimeError, match="closed"):
        await ch.send([a])


async def test_mock_channel_default_answer() -> None:
    """A MockChannel built with another default answers it for unscripted tasks."""
    ch = MockChannel(default=deliver("r-1"))
    [outcome] = await ch.send([make_task()])
    assert outcome.receipt == "r-1"

