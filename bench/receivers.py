#!/usr/bin/env python3
"""The benchmark's webhook receivers: one process, many developers (``/hook/<developer>``).

Every request's Standard Webhooks signature is verified with the developer's own key
(:func:`notice_relay.signing.verify`, constant-time HMAC-SHA256); a request that does not
verify is answered 401 and counted as ``failed``. The first arrival time (``time.time()``)
of each ``webhook-id`` is recorded. Several processes can share the data port
(``SO_REUSEPORT``); each has its own control port:

- ``GET  /stats``     {"verified", "failed", "unique", "last_arrival"}
- ``POST /reset``     forget everything
- ``GET  /arrivals``  {webhook-id: first arrival}

The answer to a verified notice is 200 ``{"received": true}`` (no receipt, so the
relay records the delivery as ``delivered``, not ``acknowledged``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from pathlib import Path

from aiohttp import web

from notice_relay.signing import decode_secret, verify


class State:
    """What this receiver process has seen since the last reset."""

    def __init__(self, keys: dict[str, bytes]) -> None:
        self.keys = keys
        self.reset()

    def reset(self) -> None:
        """Forget every arrival."""
        self.arrivals: dict[str, float] = {}
        self.verified = 0
        self.failed = 0
        self.last_arrival = 0.0


def data_app(state: State) -> web.Application:
    """The webhook endpoints."""
    ok = web.json_response({"received": True})
    ok_body, ok_type = ok.body, ok.content_type

    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        now = time.time()
        key = state.keys.get(request.match_info["developer"])
        if key is None or not verify([key], body, request.headers, now=now):
            state.failed += 1
            return web.json_response({"error": "signature does not verify"}, status=401)
        state.verified += 1
        state.last_arrival = now
        state.arrivals.setdefault(request.headers["webhook-id"], now)
        return web.Response(body=ok_body, content_type=ok_type)

    app = web.Application(client_max_size=1024 * 1024)
    app.router.add_post("/hook/{developer}", hook)
    return app


def control_app(state: State) -> web.Application:
    """Stats, reset and arrivals."""

    async def stats(_: web.Request) -> web.Response:
        return web.json_response({"verified": state.verified, "failed": state.failed,
                                  "unique": len(state.arrivals),
                                  "last_arrival": state.last_arrival})

    async def reset(_: web.Request) -> web.Response:
        state.reset()
        return web.json_response({"reset": True})

    async def arrivals(_: web.Request) -> web.Response:
        return web.json_response(state.arrivals)

    app = web.Application()
    app.router.add_get("/stats", stats)
    app.router.add_post("/reset", reset)
    app.router.add_get("/arrivals", arrivals)
    return app


async def serve(port: int, control_port: int, keys: dict[str, bytes]) -> None:
    """Serve until cancelled."""
    state = State(keys)
    runners = []
    for app, p, reuse in ((data_app(state), port, True), (control_app(state), control_port, False)):
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", p, reuse_port=reuse, backlog=1024).start()
        runners.append(runner)
    print(f"receiving on 127.0.0.1:{port} (control {control_port})", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        for runner in runners:
            await runner.cleanup()


def main() -> None:
    """Command line: --port, --control-port, --secrets FILE (JSON developer -> whsec_)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--control-port", type=int, required=True)
    parser.add_argument("--secrets", type=Path, required=True)
    args = parser.parse_args()
    secrets = json.loads(args.secrets.read_text())
    keys = {dev: decode_secret(secret) for dev, secret in secrets.items()}
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.port, args.control_port, keys))


if __name__ == "__main__":
    main()
