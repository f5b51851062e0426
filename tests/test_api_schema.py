"""Property-based: schemathesis generates requests (valid and invalid) for every
operation of the API's own OpenAPI document and sends each with every role's key
and with none, to the app in-process (real SQLite store, real broker). No answer is
a 5xx, and every answer conforms to the document: a documented status, content type,
headers and body schema."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
import schemathesis
from api_helpers import PRINCIPALS, declaration, register, seed_events
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.python import asgi

from notice_relay.api import create_app
from notice_relay.audit.store import AuditStore
from notice_relay.config import Settings
from notice_relay.keys import create_key

pytestmark = pytest.mark.kafka

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance]


@dataclass
class Target:
    """The app under test and a key per role."""

    app: Any
    keys: dict[str, str]


async def _prepare(env: Any) -> dict[str, str]:
    """Keys for every principal, and a declaration with deliveries to read."""
    store = await AuditStore.open(env.database_url)
    try:
        keys = {name: (await create_key(store, role, subject))[1]
                for name, (role, subject) in PRINCIPALS.items()}
        _, events = seed_events(env, declaration(1, prefix="sch"), at=datetime.now(UTC))
        await store.append(events)
        return keys
    finally:
        await store.close()


@pytest.fixture
def target(relay_env: Any) -> Iterator[Target]:
    """The API app (its lifespan run by schemathesis' ASGI client) and its keys."""
    register(relay_env)
    keys = asyncio.run(_prepare(relay_env))
    yield Target(app=create_app(relay_env.settings()), keys=keys)
    asgi.shutdown_lifespans()


# The document does not depend on settings: read it from an app that is never started
# (schemathesis' from_fixture does not run under pytest 9), and send the requests to
# the test's own app.
schema = schemathesis.openapi.from_dict(create_app(Settings()).openapi())


@schema.parametrize()
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_answer_conforms_to_the_openapi_document(case: Any, target: Target) -> None:
    """For each generated request and each principal (every role, and no key): no 5xx,
    and status, content type, headers and body as documented."""
    for key in (*target.keys.values(), None):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        case.call_and_validate(app=target.app, base_url="http://testserver", headers=headers,
                               checks=CHECKS)
