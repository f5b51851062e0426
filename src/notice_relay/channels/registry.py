"""The registry channel: notices sent in batches to a do-not-train registry.

A registry speaks its own API, so the channel is split in two:

- a :class:`RegistryAdapter` (pure, no I/O) builds the HTTP request for a batch of
  delivery tasks and maps the registry's response back to one outcome per task;
- :class:`RegistryChannel` (the I/O shell) splits the tasks into batches of the
  connector's ``batch_size``, sends a few batches concurrently through the SSRF guard
  (:mod:`notice_relay.netguard`), and turns every transport failure into outcomes with
  :func:`~notice_relay.channels.webhook.translate_error`, the one place where httpx
  errors are interpreted.

The connector's ``adapter`` names the adapter (:data:`ADAPTERS`); the first is
``generic-rest``, :class:`GenericRestAdapter`. Its wire format::

    POST {base_url}/v1/optouts
    Authorization: Bearer <token>
    Idempotency-Key: nr-<64 hex digits>
    Content-Type: application/json
    Accept: application/json
    User-Agent: notice-relay/<version>

    {"items": [{"id": "<delivery_id>", "notice": <Notice v1>}, ...]}

``notice`` is the exact Notice v1 JSON a webhook receives. Items are sorted by delivery
id and a delivery id appears once, so the same set of deliveries always gives the same
body; ``Idempotency-Key`` is ``nr-`` + SHA-256 of those ids joined by newlines: the same
batch sent again (a retry, a replay, a worker restarted mid-request) carries the same
key, and the registry can answer it from its record of the first request. The attempt
number is deliberately not part of it. The answer::

    200 {"results": [{"id": "<delivery_id>",
                      "status": "accepted" | "duplicate" | "rejected" | "retry",
                      "receipt": "<registry's id for it>",    (optional)
                      "error": "<why, for rejected or retry>"}, ...]}   (optional)

===========================================  ============================================
the registry answers                         the outcome of each task of the batch
===========================================  ============================================
2xx, item ``accepted`` or ``duplicate``      delivered, with the item's receipt (or its
                                             status when there is none)
2xx, item ``rejected``                       permanent, with the item's error
2xx, item ``retry``                          transient (the response's Retry-After, if any)
2xx, the item missing from ``results``       transient: "registry did not answer for this
                                             item"; an unknown status is transient too
2xx with a body that is not such JSON        transient (the registry's bug may be fixed)
401, 403                                     permanent: "registry refused our token"
408, 425, 429, 5xx                           transient, Retry-After honoured
410                                          permanent, the channel should be disabled
3xx (not followed) and other 4xx             permanent
timeouts, connection errors                  transient
a refused address (SSRF guard)               permanent
===========================================  ============================================
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Final, Protocol, Self, runtime_checkable

import httpx
import structlog

from notice_relay.channels.base import (
    classify_status,
    outcome_from_error,
    outcome_from_status,
    parse_retry_after,
    sanitize_text,
    user_agent,
)
from notice_relay.channels.webhook import (
    KEEPALIVE_EXPIRY,
    MAX_ERROR_DETAIL,
    _read_capped,
    translate_error,
)
from notice_relay.connectors import Developer, RegistryChannelConfig
from notice_relay.errors import ConfigError, TransientChannelError
from notice_relay.models import DeliveryTask, Outcome
from notice_relay.netguard import guarded_transport

__all__ = [
    "ADAPTERS",
    "DEFAULT_MAX_IN_FLIGHT",
    "DEFAULT_TIMEOUT",
    "GenericRestAdapter",
    "RegistryAdapter",
    "RegistryChannel",
    "RegistryRequest",
    "RegistryResponse",
    "idempotency_key",
    "make_adapter",
]

log = structlog.get_logger(__name__)

#: Seconds one batch request may take, end to end (a batch is bigger than a webhook
#: notice, and registries write it before answering).
DEFAULT_TIMEOUT: Final = 30.0
#: Batches of one channel in flight at once: enough to overlap round trips, few enough
#: not to flood a registry that is already slow.
DEFAULT_MAX_IN_FLIGHT: Final = 4
#: A response may hold a result per item: the cap grows with the batch.
_RESPONSE_BASE_BYTES: Final = 64 * 1024
_RESPONSE_BYTES_PER_ITEM: Final = 2 * 1024


# ------------------------------------------------------------------------- the adapter


@dataclass(frozen=True, slots=True)
class RegistryRequest:
    """One HTTP request an adapter wants sent."""

    method: str
    url: str
    headers: Mapping[str, str]
    content: bytes


@dataclass(frozen=True, slots=True)
class RegistryResponse:
    """What the registry answered. ``headers`` is case-insensitive; ``body`` is capped
    (a registry cannot make the worker buffer without bound)."""

    status_code: int
    reason: str
    headers: Mapping[str, str]
    body: bytes


@runtime_checkable
class RegistryAdapter(Protocol):
    """Speaks one registry's API. Pure: builds requests and reads responses, no I/O."""

    name: str

    def build_request(self, tasks: Sequence[DeliveryTask]) -> RegistryRequest:
        """The request that submits ``tasks`` (one batch, never empty)."""
        ...

    def read_response(
        self,
        tasks: Sequence[DeliveryTask],
        response: RegistryResponse,
        *,
        attempted_at: datetime,
        latency_ms: float,
    ) -> list[Outcome]:
        """One outcome per task, in the order of ``tasks``, from the registry's answer
        to :meth:`build_request` of the same ``tasks``."""
        ...


def idempotency_key(delivery_ids: Iterable[str]) -> str:
    """``nr-`` + SHA-256 of the distinct delivery ids, sorted, joined by newlines: the
    same deliveries give the same key whatever their order or attempt."""
    joined = "\n".join(sorted(set(delivery_ids)))
    return "nr-" + hashlib.sha256(joined.encode("utf-8")).hexdigest()


def _check_token(token: str) -> str:
    # A newline in a token would let it add headers of its own; resolve_token refuses
    # those already, this guards tokens handed in by other code.
    if not token or any(ch.isspace() or not ch.isprintable() for ch in token):
        raise ValueError("the registry token is empty or contains whitespace or control characters")
    return token


_ACCEPTED: Final = frozenset({"accepted", "duplicate"})


class GenericRestAdapter:
    """The ``generic-rest`` adapter: batched ``POST {base_url}/v1/optouts`` with a
    bearer token and an idempotency key (wire format in the module docstring)."""

    name = "generic-rest"

    def __init__(self, base_url: str, token: str) -> None:
        url = httpx.URL(base_url)
        # The API path goes after any path the base URL has (a registry behind /api/).
        self.url = str(url.copy_with(path=url.path.rstrip("/") + "/v1/optouts"))
        self._token = _check_token(token)

    def build_request(self, tasks: Sequence[DeliveryTask]) -> RegistryRequest:
        """``{"items": [{"id", "notice"}, ...]}``, one item per distinct delivery id,
        sorted by it."""
        by_id = {task.delivery_id: task for task in tasks}
        items = [
            b'{"id":' + json.dumps(delivery_id).encode() + b',"notice":'
            + by_id[delivery_id].notice.model_dump_json(by_alias=True).encode("utf-8") + b"}"
            for delivery_id in sorted(by_id)
        ]
        return RegistryRequest(
            method="POST",
            url=self.url,
            headers={
                "Authorization": f"Bearer {self._token}",
                "Idempotency-Key": idempotency_key(by_id),
                "Content-Type": "application/json",
                "Accept": "application/json",
            },
            content=b'{"items":[' + b",".join(items) + b"]}",
        )

    def read_response(
        self,
        tasks: Sequence[DeliveryTask],
        response: RegistryResponse,
        *,
        attempted_at: datetime,
        latency_ms: float,
    ) -> list[Outcome]:
        """Per-item results on a 2xx; one verdict for every task otherwise (see the
        table in the module docstring)."""
        status = response.status_code
        common: dict[str, Any] = {
            "attempted_at": attempted_at, "latency_ms": latency_ms, "status_code": status,
        }
        line = f"HTTP {status} {response.reason}".rstrip()
        retry_after = response.headers.get("retry-after")
        if 200 <= status < 300:
            try:
                results = _parse_results(response.body)
            except ValueError as exc:
                error = f"{line}: malformed response from the registry: {exc}"
                return [Outcome.transient(task, error, **common) for task in tasks]
            wait = parse_retry_after(retry_after)
            return [_item_outcome(task, results.get(task.delivery_id), wait, common)
                    for task in tasks]
        detail = _detail(response.body)
        if status in (401, 403):
            error = f"{line}: registry refused our token" + (f": {detail}" if detail else "")
            return [Outcome.permanent(task, error, **common) for task in tasks]
        verdict = classify_status(status, response.reason, retry_after=retry_after)
        return [
            outcome_from_status(task, status, verdict, attempted_at=attempted_at,
                                latency_ms=latency_ms, detail=detail)
            for task in tasks
        ]


def _detail(body: bytes) -> str | None:
    text = body.decode("utf-8", errors="replace")
    return sanitize_text(text, MAX_ERROR_DETAIL) if text.strip() else None


def _parse_results(body: bytes) -> dict[str, Mapping[str, Any]]:
    """Results by delivery id. Raises :class:`ValueError` when the body is not
    ``{"results": [...]}``; an entry without a string ``id`` and ``status`` is skipped
    (its task then counts as not answered), and the first entry for an id wins."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        raise ValueError("not JSON") from None
    if not isinstance(document, dict) or not isinstance(document.get("results"), list):
        # ValueError, not TypeError: the caller treats every malformed body alike.
        raise ValueError('expected an object with a "results" array')  # noqa: TRY004
    results: dict[str, Mapping[str, Any]] = {}
    for entry in document["results"]:
        if isinstance(entry, dict) and isinstance(entry.get("id"), str) \
                and isinstance(entry.get("status"), str):
            results.setdefault(entry["id"], entry)
    return results


def _text(entry: Mapping[str, Any], key: str) -> str | None:
    value = entry.get(key)
    return (sanitize_text(value, 300) or None) if isinstance(value, str) else None


def _item_outcome(
    task: DeliveryTask,
    entry: Mapping[str, Any] | None,
    retry_after: float | None,
    common: dict[str, Any],
) -> Outcome:
    if entry is None:
        return Outcome.transient(task, "registry did not answer for this item", **common)
    status = entry["status"]
    error = _text(entry, "error")
    if status in _ACCEPTED:
        return Outcome.delivered(task, receipt=_text(entry, "receipt") or status, **common)
    if status == "rejected":
        return Outcome.permanent(
            task, "registry rejected the notice" + (f": {error}" if error else ""), **common
        )
    if status == "retry":
        return Outcome.transient(
            task, "registry asked to retry this item" + (f": {error}" if error else ""),
            retry_after=retry_after, **common,
        )
    return Outcome.transient(
        task, f"registry answered an unknown status {sanitize_text(status, 40)!r} for this item",
        **common,
    )


AdapterFactory = Callable[[RegistryChannelConfig, str], RegistryAdapter]

#: The adapters by the name a connector gives in ``adapter``.
ADAPTERS: Final[Mapping[str, AdapterFactory]] = {
    "generic-rest": lambda config, token: GenericRestAdapter(config.base_url, token),
}


def make_adapter(config: RegistryChannelConfig, token: str) -> RegistryAdapter:
    """The adapter ``config`` names, holding ``token``; :class:`ConfigError` if there is
    no such adapter or the token is unusable (the message never holds the token)."""
    try:
        factory = ADAPTERS[config.adapter]
    except KeyError:
        raise ConfigError(
            f"unknown registry adapter {config.adapter!r}; known: {sorted(ADAPTERS)}"
        ) from None
    try:
        return factory(config, token)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


# ------------------------------------------------------------------------- the channel


def _make_client(config: RegistryChannelConfig, max_in_flight: int) -> httpx.AsyncClient:
    limits = httpx.Limits(
        max_connections=max_in_flight,
        max_keepalive_connections=max_in_flight,
        keepalive_expiry=KEEPALIVE_EXPIRY,
    )
    return httpx.AsyncClient(
        transport=guarded_transport(allow_private=config.allow_private, limits=limits),
        follow_redirects=False,
        # No proxies or .netrc credentials from the environment (as for webhooks).
        trust_env=False,
        headers={"user-agent": user_agent()},
    )


class RegistryChannel:
    """Delivers notices to one developer's do-not-train registry, in batches.

    ``send`` splits the tasks into batches of ``config.batch_size`` (in task order),
    sends at most ``max_in_flight`` batches at once, each bounded by ``timeout``
    seconds end to end, and returns one outcome per task in task order. The channel
    owns its :class:`httpx.AsyncClient` (guarded by :mod:`notice_relay.netguard`)
    unless one is passed in; an injected client brings its own guard.
    """

    def __init__(
        self,
        developer: Developer,
        config: RegistryChannelConfig,
        token: str,
        client: httpx.AsyncClient | None = None,
        *,
        adapter: RegistryAdapter | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    ) -> None:
        owner = f"developer {developer.id!r}, channel {config.name!r}"
        if timeout <= 0 or max_in_flight < 1:
            raise ValueError("timeout must be positive and max_in_flight at least 1")
        try:
            self.adapter = adapter or make_adapter(config, token)
        except ConfigError as exc:
            raise ConfigError(f"{owner}: {exc}") from None
        self.name = config.name
        self.developer_id = developer.id
        self.config = config
        self._timeout = timeout
        self._user_agent = user_agent()
        self._in_flight = asyncio.Semaphore(max_in_flight)
        self._owns_client = client is None
        self._client = _make_client(config, max_in_flight) if client is None else client
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
        """Submit every task in batches; one outcome per task, in order.

        Raises :class:`RuntimeError` if the channel is closed and :class:`ValueError`
        if a task belongs to another developer or channel (a routing bug); never
        because an attempt failed.
        """
        if self._closed:
            raise RuntimeError(f"registry channel {self.name!r} is closed")
        for task in tasks:
            if task.developer_id != self.developer_id or task.channel != self.name:
                raise ValueError(
                    f"task {task.delivery_id} is for {task.developer_id}/{task.channel}, "
                    f"not {self.developer_id}/{self.name}"
                )
        size = self.config.batch_size
        batches = [tasks[start:start + size] for start in range(0, len(tasks), size)]
        results = await asyncio.gather(*(self._attempt(batch) for batch in batches))
        return [outcome for batch_outcomes in results for outcome in batch_outcomes]

    async def _attempt(self, batch: Sequence[DeliveryTask]) -> list[Outcome]:
        async with self._in_flight:
            attempted_at = datetime.now(UTC)
            started = time.perf_counter()
            try:
                # Bounds the whole exchange: a registry trickling bytes cannot hold the
                # batch longer than the timeout (httpx's own timeouts are per phase).
                async with asyncio.timeout(self._timeout):
                    response = await self._exchange(batch)
                outcomes = self.adapter.read_response(
                    batch, response, attempted_at=attempted_at, latency_ms=_elapsed_ms(started)
                )
                _check_outcomes(self.adapter.name, batch, outcomes)
            except Exception as exc:  # every failure, whatever its type, becomes outcomes
                error = translate_error(exc, self._timeout)
                latency_ms = _elapsed_ms(started)
                return [
                    outcome_from_error(task, error, attempted_at=attempted_at,
                                       latency_ms=latency_ms)
                    for task in batch
                ]
            return outcomes

    async def _exchange(self, batch: Sequence[DeliveryTask]) -> RegistryResponse:
        request = self.adapter.build_request(batch)
        headers = dict(request.headers)
        # Set per request too, so that an injected client behaves the same.
        headers["user-agent"] = self._user_agent
        limit = _RESPONSE_BASE_BYTES + _RESPONSE_BYTES_PER_ITEM * len(batch)
        async with self._client.stream(
            request.method,
            request.url,
            content=request.content,
            headers=headers,
            timeout=self._timeout,
            follow_redirects=False,
        ) as response:
            body = await _read_capped(response, limit)
        return RegistryResponse(
            status_code=response.status_code,
            reason=response.reason_phrase,
            headers=response.headers,
            body=body,
        )

    async def aclose(self) -> None:
        """Close the HTTP client if this channel created it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._owns_client:
            await self._client.aclose()


def _check_outcomes(
    adapter: str, batch: Sequence[DeliveryTask], outcomes: Sequence[Outcome]
) -> None:
    """An adapter bug must not lose or misattribute a task's outcome."""
    if [o.delivery_id for o in outcomes] != [t.delivery_id for t in batch]:
        log.error("registry.adapter_mismatch", adapter=adapter, tasks=len(batch),
                  outcomes=len(outcomes))
        raise TransientChannelError(
            f"internal error: adapter {adapter!r} answered {len(outcomes)} outcomes that do "
            f"not match the batch's {len(batch)} tasks"
        )


def _elapsed_ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000.0, 3)
