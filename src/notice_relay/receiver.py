"""A reference webhook receiver, for AI developers integrating with notice-relay and
for the relay's own demo and tests.

It does what a developer's endpoint should do: verify the Standard Webhooks
signature with the reference library (``standardwebhooks``), refuse what does not
verify, deduplicate on ``webhook-id`` (delivery is at-least-once), answer with a
receipt, and record each notice (one JSON line per request) for inspection.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from standardwebhooks.webhooks import Webhook, WebhookVerificationError


@dataclass
class Received:
    """One request as the receiver saw it."""

    webhook_id: str
    verified: bool
    duplicate: bool
    notice: dict[str, Any] | None
    received_at: float
    error: str | None = None
    status: int = 200


@dataclass
class ReceiverState:
    """What a receiver has seen so far."""

    secret: str
    received: list[Received] = field(default_factory=list)
    ids: set[str] = field(default_factory=set)
    record: Path | None = None
    #: Status to answer with instead of 200 (tests make a receiver fail with it)...
    fail_with: int | None = None
    #: ...for only the first N requests of each webhook-id (0 = always, while set).
    fail_first: int = 0
    #: A Retry-After header sent with failures.
    retry_after: str | None = None
    #: Seconds to wait before answering (a slow receiver).
    delay: float = 0.0
    #: Answer with a receipt (which acknowledges the notice) or just 200.
    receipts: bool = True
    #: Arrival times of each webhook-id's requests (verified or not).
    arrivals: dict[str, list[float]] = field(default_factory=dict)

    def notices(self) -> list[dict[str, Any]]:
        """Verified, first-seen notices."""
        return [r.notice for r in self.received
                if r.status == 200 and not r.duplicate and r.notice]


def make_app(state: ReceiverState) -> web.Application:
    """An aiohttp application that receives notices into ``state``."""
    wh = Webhook(state.secret)

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        wid = headers.get("webhook-id", "")
        state.arrivals.setdefault(wid, []).append(time.time())
        if state.delay:
            await asyncio.sleep(state.delay)
        try:
            payload = wh.verify(body, headers)
            verified, error = True, None
        except WebhookVerificationError as exc:
            payload, verified, error = None, False, str(exc)
        failing = verified and state.fail_with is not None and (
            state.fail_first == 0 or len(state.arrivals[wid]) <= state.fail_first
        )
        status = 401 if not verified else (state.fail_with or 500) if failing else 200
        dup = status == 200 and wid in state.ids
        rec = Received(webhook_id=wid, verified=verified, duplicate=dup,
                       notice=payload if isinstance(payload, dict) else None,
                       received_at=time.time(), error=error, status=status)
        state.received.append(rec)
        if state.record is not None:
            with state.record.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps({
                    "webhook_id": wid, "verified": verified, "duplicate": dup, "status": status,
                    "received_at": rec.received_at, "error": error, "notice": rec.notice,
                }) + "\n")
        if not verified:
            return web.json_response({"error": "signature does not verify"}, status=401)
        if failing:
            hdrs = {"Retry-After": state.retry_after} if state.retry_after else None
            return web.json_response({"error": "failing on purpose"}, status=status,
                                     headers=hdrs)
        state.ids.add(wid)
        if not state.receipts:
            return web.json_response({"received": True})
        return web.json_response({"receipt": f"rcpt-{wid}", "duplicate": dup})

    app = web.Application(client_max_size=32 * 1024 * 1024)
    app.router.add_post("/{tail:.*}", handle)
    return app


class Receiver:
    """A receiver running on 127.0.0.1 inside the current event loop."""

    def __init__(self, secret: str, *, port: int = 0, record: Path | None = None) -> None:
        self.state = ReceiverState(secret=secret, record=record)
        self.port = port
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        """The URL to put in a connector."""
        return f"http://127.0.0.1:{self.port}/notices"

    async def start(self) -> Receiver:
        """Start listening (on a free port when ``port`` is 0)."""
        self._runner = web.AppRunner(make_app(self.state), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        server = site._server
        if self.port == 0 and server is not None:
            # aiohttp types _server as AbstractServer; at runtime it is an asyncio.Server,
            # which has .sockets.
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        return self

    async def stop(self) -> None:
        """Stop listening."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


async def serve_forever(secret: str, port: int, record: Path | None) -> None:
    """Run one receiver until cancelled (``notice-relay receiver``)."""
    r = await Receiver(secret, port=port, record=record).start()
    print(f"receiving on {r.url}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await r.stop()
