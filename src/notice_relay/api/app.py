"""The FastAPI application: :func:`create_app` builds it for a :class:`Settings`.

Its lifespan opens the audit store (creating the API's own tables, ``api_keys`` and
``api_ingest_results``, beside the store's), loads the registry and the ack secret,
and starts the one Kafka producer every request shares.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

# Imported for their tables: they must be on the store's metadata before
# AuditStore.open creates what is missing.
import notice_relay.api.ingest
import notice_relay.keys  # noqa: F401
from notice_relay import __version__
from notice_relay.acks import load_ack_secret
from notice_relay.api import errors
from notice_relay.api.limits import BodyLimitMiddleware
from notice_relay.api.metrics import Metrics, MetricsMiddleware
from notice_relay.api.producer import RelayProducer
from notice_relay.api.routes import acks, audit, channels, declarations, deliveries, health, replays
from notice_relay.api.state import ApiState
from notice_relay.audit.store import AuditStore
from notice_relay.config import Settings
from notice_relay.connectors import Developer, load_developers, load_publishers
from notice_relay.models import Declaration
from notice_relay.topics import Topics

DESCRIPTION = """\
Relay artists' AI opt-out declarations to every AI developer concerned.

Every endpoint but `/healthz`, `/readyz`, `/metrics` and the ack link needs an API key
(`Authorization: Bearer nr_<key_id>_<secret>`, from `notice-relay keys create`). Roles:
**publisher** (its own declarations), **developer** (its own deliveries and acks),
**operator** (replays, channels; reads declarations and deliveries),
**auditor** (reads everything, exports and verifies the trail).
"""


def _registry(settings: Settings) -> tuple[set[str] | None, dict[str, Developer] | None]:
    # As `notice-relay validate` does: ids are checked against the registry files
    # that exist (a worker refuses to start without them, so production has both).
    pubs = (set(load_publishers(settings.publishers_file))
            if settings.publishers_file.exists() else None)
    devs = load_developers(settings.connectors_dir) if settings.connectors_dir.is_dir() else None
    return pubs, devs


def _lifespan(settings: Settings, metrics: Metrics) -> Callable[[FastAPI], Any]:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        publishers, developers = _registry(settings)
        ack_secret = load_ack_secret(settings.data_dir)
        store = await AuditStore.open(settings.database_url, warm_pool=True)
        producer = RelayProducer(settings)
        try:
            await producer.start_or_keep_trying()
            app.state.api = ApiState(
                settings=settings, store=store, producer=producer,
                topics=Topics.from_settings(settings), metrics=metrics,
                publishers=publishers, developers=developers, ack_secret=ack_secret,
            )
            yield
        finally:
            await producer.stop()
            await store.close()

    return lifespan


def _openapi(app: FastAPI) -> Callable[[], dict[str, Any]]:
    def build() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description,
                             routes=app.routes)
        # The declarations body is read raw (so that validation is exactly the
        # stream's); its schema is the published Declaration v1.
        decl = Declaration.model_json_schema(by_alias=True,
                                             ref_template="#/components/schemas/{model}")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(decl.pop("$defs", {}))
        components["Declaration"] = decl
        app.openapi_schema = schema
        return schema

    return build


def create_app(settings: Settings | None = None) -> FastAPI:
    """The API application for ``settings`` (default: from the environment)."""
    settings = settings or Settings.from_env()
    metrics = Metrics()
    app = FastAPI(title="notice-relay", version=__version__, description=DESCRIPTION,
                  lifespan=_lifespan(settings, metrics), docs_url="/docs",
                  openapi_url="/openapi.json", redoc_url=None)
    errors.install(app)
    for module in (declarations, deliveries, replays, acks, audit, channels, health):
        app.include_router(module.router)
    # Added last = outermost: metrics see the 413s of the body limit too.
    app.add_middleware(BodyLimitMiddleware)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.openapi = _openapi(app)  # type: ignore[method-assign]
    return app
