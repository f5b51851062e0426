"""Prometheus metrics of the API: requests by route and status, their latency, and
declarations accepted or rejected.

Each app has its own registry (so that several apps in one process, as in tests,
do not collide). Routes are labelled by their template (``/v1/declarations/{declaration_id}``),
never by the path, so ids never become label values.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class Metrics:
    """The API's collectors, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "notice_relay_api_requests", "HTTP requests answered.",
            ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram(
            "notice_relay_api_request_duration_seconds", "Time to answer an HTTP request.",
            ["method", "route"], registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.declarations = Counter(
            "notice_relay_api_declarations", "Declarations posted, by result.",
            ["result"], registry=self.registry)
        for result in ("accepted", "repeated", "rejected", "forbidden"):
            self.declarations.labels(result=result)

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)


def route_template(scope: Scope) -> str:
    """The template of the route that ``scope`` matched, or ``unmatched``."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if isinstance(path, str):
        return path
    app: Any = scope.get("app")
    for candidate in getattr(app, "routes", ()):
        match, _ = candidate.matches(scope)
        if match is Match.FULL:
            return str(getattr(candidate, "path", "unmatched"))
    return "unmatched"


class MetricsMiddleware:
    """Counts and times every HTTP request (including those refused by middleware)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = route_template(scope)
            method = str(scope.get("method", ""))
            self.metrics.requests.labels(method=method, route=route, status=str(status)).inc()
            self.metrics.latency.labels(method=method, route=route).observe(
                time.perf_counter() - start)
