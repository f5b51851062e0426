"""The webhook channel: Notice v1 JSON POSTed with Standard Webhooks signatures.

Each attempt sends the notice's exact JSON bytes, signed afresh (a new
``webhook-timestamp``) under the stable ``webhook-id`` = ``delivery_id``, so receivers
deduplicate retries and replays. Redirects are not followed. Every connection goes
through the SSRF guard (:mod:`notice_relay.netguard`): a private, loopback or
link-local address is refused at connect time unless the connector sets
``allow_private = true``. Every exception an attempt can raise is turned into an
outcome by :func:`translate_error`, the one place where HTTP client errors are
interpreted (the registry channel uses it too).

The HTTP client is chosen by ``NOTICE_RELAY_HTTP_CLIENT`` (read when a channel is
built): ``aiohttp`` (the default: aiohttp directly, the fastest in ``make bench``),
``httpx-aiohttp`` (httpx's API over aiohttp's connection pool, the ``httpx-aiohttp``
transport) or ``httpx`` (httpx with its own httpcore transport). Every mode sends the
same signed bytes, follows no redirects, bounds each attempt by the channel's timeout
and connects through the address guard (:class:`notice_relay.netguard.GuardedBackend` for httpcore,
:class:`notice_relay.netguard.GuardedConnector` for aiohttp): the address checked is
the address connected to.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import ssl
import time
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from types import TracebackType
from typing import Final, Protocol, Self

import aiohttp
import certifi
import httpx
import structlog
from httpx_aiohttp import AiohttpTransport

from notice_relay.channels.base import (
    RateLimiter,
    classify_status,
    outcome_from_error,
    outcome_from_status,
    sanitize_text,
    user_agent,
)
from notice_relay.connectors import Developer, WebhookChannelConfig
from notice_relay.errors import (
    ChannelError,
    ChannelTimeout,
    ConfigError,
    PermanentChannelError,
    TransientChannelError,
)
from notice_relay.models import DeliveryTask, Outcome, OutcomeKind
from notice_relay.netguard import guarded_connector, guarded_transport
from notice_relay.signing import decode_secret, webhook_headers

__all__ = ["HTTP_CLIENT_ENV", "HttpClientKind", "WebhookChannel", "http_client_kind",
           "translate_error"]

log = structlog.get_logger(__name__)

#: How much of a response body is read: enough for a receipt or an error message,
#: bounded so that a misbehaving receiver cannot make the worker buffer gigabytes.
MAX_RESPONSE_BYTES: Final = 64 * 1024
#: How much of an error body goes into the outcome's error text.
MAX_ERROR_DETAIL: Final = 200
#: Idle pooled connections are dropped after this many seconds; receivers commonly
#: close idle keep-alive connections after 60 s or more, so reuse stays safe.
KEEPALIVE_EXPIRY: Final = 30.0

_TIMEOUT_PHASES: Final[dict[type[httpx.TimeoutException], str]] = {
    httpx.ConnectTimeout: "connecting",
    httpx.WriteTimeout: "sending the notice",
    httpx.ReadTimeout: "waiting for the response",
    httpx.PoolTimeout: "waiting for a free connection",
}


#: The setting that chooses the webhook channel's HTTP client.
HTTP_CLIENT_ENV: Final = "NOTICE_RELAY_HTTP_CLIENT"


class HttpClientKind(StrEnum):
    """The HTTP client a webhook channel sends with."""

    HTTPX = "httpx"
    HTTPX_AIOHTTP = "httpx-aiohttp"
    AIOHTTP = "aiohttp"


def http_client_kind(environ: Mapping[str, str] | None = None) -> HttpClientKind:
    """The client named by ``NOTICE_RELAY_HTTP_CLIENT`` (default ``aiohttp``: the
    fastest of the three in ``make bench``, see docs/performance.md); a
    :class:`~notice_relay.errors.ConfigError` for any other value."""
    raw = (os.environ if environ is None else environ).get(HTTP_CLIENT_ENV) or "aiohttp"
    try:
        return HttpClientKind(raw.strip().lower())
    except ValueError:
        choices = ", ".join(k.value for k in HttpClientKind)
        raise ConfigError(f"{HTTP_CLIENT_ENV} must be one of {choices}, not {raw!r}") from None


def _describe(exc: BaseException) -> str:
    return sanitize_text(str(exc) or type(exc).__name__, 300)


def _translate_aiohttp(exc: aiohttp.ClientError) -> ChannelError:
    """An aiohttp error as a ChannelError, with the same wording as httpx's."""
    if isinstance(exc, aiohttp.InvalidURL | aiohttp.NonHttpUrlClientError):
        return PermanentChannelError(f"cannot send the request: {_describe(exc)}")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return TransientChannelError(f"connection failed: {_describe(exc)}")
    if isinstance(exc, aiohttp.ClientConnectionError | aiohttp.ClientPayloadError):
        # ServerDisconnectedError, ClientOSError (a reset connection), payload errors.
        return TransientChannelError(f"connection lost: {_describe(exc)}")
    return TransientChannelError(f"HTTP error: {_describe(exc)}")


def translate_error(exc: Exception, timeout: float) -> ChannelError:
    """Turn any exception of an attempt into a :class:`~notice_relay.errors.ChannelError`
    whose class says whether to retry.

    Timeouts and connection failures are transient (the receiver may be back later);
    errors in what we would send (unsupported scheme, invalid URL) are permanent.
    Anything unexpected is logged and treated as transient, so a bug costs a few
    bounded retries instead of stopping the deliveries of every other developer.
    """
    if isinstance(exc, ChannelError):
        return exc
    cause = exc.__cause__
    if isinstance(exc, httpx.HTTPError) and isinstance(cause, aiohttp.ClientError) and not (
        isinstance(cause, TimeoutError)
    ):
        # httpx-aiohttp re-raises aiohttp's errors as httpx ones, some of them as the
        # wrong kind (a refused connection as ConnectTimeout): judge the original.
        return _translate_aiohttp(cause)
    if isinstance(exc, aiohttp.ClientError) and not isinstance(exc, TimeoutError):
        return _translate_aiohttp(exc)
    if isinstance(exc, TimeoutError | httpx.TimeoutException):
        phase = _TIMEOUT_PHASES.get(type(exc)) if isinstance(exc, httpx.TimeoutException) else None
        return ChannelTimeout(
            f"timed out after {timeout:g}s" + (f" while {phase}" if phase else "")
        )
    if isinstance(exc, httpx.UnsupportedProtocol | httpx.InvalidURL | httpx.LocalProtocolError):
        return PermanentChannelError(f"cannot send the request: {_describe(exc)}")
    if isinstance(exc, httpx.ConnectError):
        return TransientChannelError(f"connection failed: {_describe(exc)}")
    if isinstance(exc, httpx.TransportError):
        # ReadError, WriteError, RemoteProtocolError (e.g. a reset connection), ProxyError.
        return TransientChannelError(f"connection lost: {_describe(exc)}")
    if isinstance(exc, httpx.HTTPError | httpx.StreamError):
        return TransientChannelError(f"HTTP error: {_describe(exc)}")
    log.error("channel.unexpected_error", exc_info=exc)
    return TransientChannelError(f"internal error: {type(exc).__name__}: {_describe(exc)}")


@functools.cache
def _certifi_context() -> ssl.SSLContext:
    return ssl.create_default_context(cafile=certifi.where())


def _aiohttp_session(config: WebhookChannelConfig) -> aiohttp.ClientSession:
    """An aiohttp session whose connections go through the address guard; created on
    first use, inside the event loop (aiohttp binds its connector to the running loop)."""
    return aiohttp.ClientSession(
        connector=guarded_connector(
            allow_private=config.allow_private,
            # The pool matches the in-flight bound, as for httpx.
            limit=config.max_in_flight,
            keepalive_timeout=KEEPALIVE_EXPIRY,
            # The CA bundle httpx uses (certifi), so that the clients trust the same roots.
            ssl_context=_certifi_context(),
        ),
        # No proxies or .netrc credentials from the environment (as for httpx).
        trust_env=False,
        timeout=aiohttp.ClientTimeout(total=config.timeout.total_seconds()),
        headers={"user-agent": user_agent()},
        # A compressed answer is decoded (as httpx does), so its receipt is read; the
        # body stays capped at MAX_RESPONSE_BYTES after decoding. (httpx-aiohttp asks
        # for raw bytes per request and lets httpx decode them.)
        auto_decompress=True,
    )


def _make_client(
    config: WebhookChannelConfig, kind: HttpClientKind = HttpClientKind.HTTPX
) -> httpx.AsyncClient:
    transport: httpx.AsyncBaseTransport
    if kind is HttpClientKind.HTTPX_AIOHTTP:
        # httpx's API over aiohttp's pool; the session (and its guarded connector) is
        # created by the transport on its first request, inside the event loop.
        transport = AiohttpTransport(client=lambda: _aiohttp_session(config))
    else:
        # The pool matches the in-flight bound: every concurrent attempt has a
        # connection, and idle ones are kept for the next batch.
        limits = httpx.Limits(
            max_connections=config.max_in_flight,
            max_keepalive_connections=config.max_in_flight,
            keepalive_expiry=KEEPALIVE_EXPIRY,
        )
        # Every connection goes through the SSRF guard (netguard): the address
        # connected to is checked, unless the connector allows private addresses.
        transport = guarded_transport(allow_private=config.allow_private, limits=limits)
    return httpx.AsyncClient(
        transport=transport,
        follow_redirects=False,
        timeout=httpx.Timeout(config.timeout.total_seconds()),
        # No proxies or .netrc credentials from the environment: a signed notice goes
        # straight to the configured URL, and no local credential is ever sent with it.
        trust_env=False,
        headers={"user-agent": user_agent()},
    )


def _receipt(body: bytes) -> str | None:
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if isinstance(document, dict) and isinstance(document.get("receipt"), str):
        return sanitize_text(document["receipt"]) or None
    return None


async def _read_capped(response: httpx.Response, limit: int = MAX_RESPONSE_BYTES) -> bytes:
    chunks: list[bytes] = []
    size = 0
    stream = response.aiter_bytes()
    try:
        async for chunk in stream:
            chunks.append(chunk)
            size += len(chunk)
            if size >= limit:
                break
    finally:
        # Stopping early leaves the generator suspended; close it now rather than
        # leave it to the garbage collector and the event loop's finalizer.
        if isinstance(stream, AsyncGenerator):
            await stream.aclose()
    return b"".join(chunks)[:limit]


@dataclass(frozen=True)
class _Reply:
    """What an attempt got back: status, reason, Retry-After and the (capped) body."""

    status: int
    reason: str
    retry_after: str | None
    content: bytes


class _Sender(Protocol):
    """One HTTP client behind the channel: POST bytes, get a :class:`_Reply`."""

    @property
    def is_closed(self) -> bool: ...

    async def post(self, url: str, body: bytes, headers: dict[str, str],
                   timeout: float) -> _Reply: ...  # noqa: ASYNC109 (bounded by the caller too)

    async def aclose(self) -> None: ...


class _HttpxSender:
    """Sends through an :class:`httpx.AsyncClient` (httpcore or httpx-aiohttp transport)."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    @property
    def is_closed(self) -> bool:
        return self.client.is_closed

    async def post(self, url: str, body: bytes, headers: dict[str, str],
                   timeout: float) -> _Reply:  # noqa: ASYNC109 (bounded by the caller too)
        async with self.client.stream(
            "POST", url, content=body, headers=headers, timeout=timeout,
            follow_redirects=False,
        ) as response:
            retry_after = response.headers.get("retry-after")
            content = await _read_capped(response)
        return _Reply(response.status_code, response.reason_phrase, retry_after, content)

    async def aclose(self) -> None:
        await self.client.aclose()


class _AiohttpSender:
    """Sends through an :class:`aiohttp.ClientSession` with a guarded connector,
    created on the first request."""

    def __init__(self, config: WebhookChannelConfig) -> None:
        self._config = config
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    @property
    def is_closed(self) -> bool:
        return self._closed

    async def post(self, url: str, body: bytes, headers: dict[str, str],
                   timeout: float) -> _Reply:  # noqa: ASYNC109 (bounded by the caller too)
        if self._closed:
            raise RuntimeError("the HTTP client is closed")
        if self._session is None:
            self._session = _aiohttp_session(self._config)
        async with self._session.post(
            url, data=body, headers=headers, allow_redirects=False,
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as response:
            chunks: list[bytes] = []
            size = 0
            async for chunk in response.content.iter_chunked(MAX_RESPONSE_BYTES):
                chunks.append(chunk)
                size += len(chunk)
                if size >= MAX_RESPONSE_BYTES:
                    break
            return _Reply(response.status, response.reason or "",
                          response.headers.get("retry-after"),
                          b"".join(chunks)[:MAX_RESPONSE_BYTES])

    async def aclose(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()


def _make_sender(config: WebhookChannelConfig, kind: HttpClientKind) -> _Sender:
    if kind is HttpClientKind.AIOHTTP:
        return _AiohttpSender(config)
    return _HttpxSender(_make_client(config, kind))


class WebhookChannel:
    """Delivers notices to one developer's webhook.

    Tasks of a batch are sent concurrently, at most ``config.max_in_flight`` at once
    (and at most ``config.rate_limit`` starts per second when set). The channel owns
    its HTTP client (of the kind ``http_client`` names, else ``NOTICE_RELAY_HTTP_CLIENT``)
    unless an :class:`httpx.AsyncClient` is passed in; close it with :meth:`aclose` or
    ``async with``. An injected client brings its own address guard (build its
    transport with :func:`notice_relay.netguard.guarded_transport`).
    """

    def __init__(
        self,
        developer: Developer,
        config: WebhookChannelConfig,
        secrets: Sequence[str],
        client: httpx.AsyncClient | None = None,
        *,
        http_client: HttpClientKind | None = None,
    ) -> None:
        owner = f"developer {developer.id!r}, channel {config.name!r}"
        if not secrets:
            raise ConfigError(f"{owner}: no webhook secret")
        try:
            # Decoded once here, so that a bad key fails at start-up, not per attempt.
            self._keys = [decode_secret(secret) for secret in secrets]
        except ValueError as exc:
            raise ConfigError(f"{owner}: {exc}") from None
        self.name = config.name
        self.developer_id = developer.id
        self.config = config
        self._timeout = config.timeout.total_seconds()
        self._user_agent = user_agent()
        self._in_flight = asyncio.Semaphore(config.max_in_flight)
        self._limiter = RateLimiter(config.rate_limit) if config.rate_limit else None
        self._owns_client = client is None
        self.http_client = (
            HttpClientKind.HTTPX if client is not None else http_client or http_client_kind()
        )
        self._client: _Sender = (
            _make_sender(config, self.http_client) if client is None else _HttpxSender(client)
        )
        self._closed = False

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def send(self, tasks: Sequence[DeliveryTask]) -> list[Outcome]:
        """POST every task's notice; one outcome per task, in order.

        Raises :class:`RuntimeError` if the channel is closed and :class:`ValueError`
        if a task belongs to another developer or channel (a routing bug); never
        because an attempt failed.
        """
        if self._closed:
            raise RuntimeError(f"webhook channel {self.name!r} is closed")
        for task in tasks:
            if task.developer_id != self.developer_id or task.channel != self.name:
                raise ValueError(
                    f"task {task.delivery_id} is for {task.developer_id}/{task.channel}, "
                    f"not {self.developer_id}/{self.name}"
                )
        return list(await asyncio.gather(*(self._attempt(task) for task in tasks)))

    async def _attempt(self, task: DeliveryTask) -> Outcome:
        async with self._in_flight:
            if self._limiter is not None:
                await self._limiter.acquire()
            attempted_at = datetime.now(UTC)
            started = time.perf_counter()
            try:
                # httpx's timeout applies per phase (connect, each read...); this one
                # bounds the whole exchange, so a receiver trickling bytes cannot hold
                # the batch for longer than configured.
                async with asyncio.timeout(self._timeout):
                    return await self._post(task, attempted_at, started)
            except Exception as exc:  # every failure, whatever its type, becomes an outcome
                return outcome_from_error(
                    task,
                    translate_error(exc, self._timeout),
                    attempted_at=attempted_at,
                    latency_ms=_elapsed_ms(started),
                )

    async def _post(self, task: DeliveryTask, attempted_at: datetime, started: float) -> Outcome:
        body = task.notice.model_dump_json(by_alias=True).encode("utf-8")
        headers = webhook_headers(self._keys, task.delivery_id, body)
        # Set per request too, so that an injected client behaves the same.
        headers["user-agent"] = self._user_agent
        reply = await self._client.post(self.config.url, body, headers, self._timeout)
        verdict = classify_status(reply.status, reply.reason, retry_after=reply.retry_after)
        content = reply.content
        status_line = f"{reply.status} {reply.reason}".rstrip()
        acknowledged = False
        if verdict.kind is OutcomeKind.DELIVERED:
            body_receipt = _receipt(content)
            # A receipt in the 2xx body is the developer acknowledging the notice.
            acknowledged = body_receipt is not None
            receipt = body_receipt or status_line
            detail = None
        else:
            receipt = None
            text = content.decode("utf-8", errors="replace")
            detail = sanitize_text(text, MAX_ERROR_DETAIL) if text.strip() else None
        outcome = outcome_from_status(
            task,
            reply.status,
            verdict,
            attempted_at=attempted_at,
            latency_ms=_elapsed_ms(started),
            receipt=receipt,
            detail=detail,
        )
        if acknowledged:
            outcome = outcome.model_copy(update={"acknowledged": True})
        return outcome

    async def aclose(self) -> None:
        """Close the HTTP client if this channel created it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._owns_client:
            await self._client.aclose()


def _elapsed_ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000.0, 3)
