"""What every request handler shares: settings, the store, the producer, the registry."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

from fastapi import Request

from notice_relay.api.metrics import Metrics
from notice_relay.api.producer import RelayProducer
from notice_relay.audit.store import AuditStore
from notice_relay.config import Settings
from notice_relay.connectors import Developer
from notice_relay.topics import Topics


@dataclass
class ApiState:
    """Created in the app's lifespan, closed at its end."""

    settings: Settings
    store: AuditStore
    producer: RelayProducer
    topics: Topics
    metrics: Metrics
    #: Registered ids; None when the registry file does not exist (ids not checked).
    publishers: Collection[str] | None
    developers: Mapping[str, Developer] | None
    ack_secret: bytes


def get_state(request: Request) -> ApiState:
    """The state of the app serving ``request`` (a FastAPI dependency)."""
    state: ApiState = request.app.state.api
    return state
