"""``/healthz`` (the process is up), ``/readyz`` (the store answers and the Kafka
producer is started) and ``/metrics`` (Prometheus). No key needed: they carry no
ids, only route templates and counts."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from notice_relay.api.schemas import HealthOut
from notice_relay.api.state import ApiState, get_state
from notice_relay.audit.queries import ping

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthOut, summary="The process is up")
async def healthz() -> HealthOut:
    """Always ok while the process answers."""
    return HealthOut(ok=True)


@router.get(
    "/readyz", response_model=HealthOut,
    responses={503: {"model": HealthOut, "description": "Not ready: see which part."}},
    summary="The store answers and the Kafka producer is started",
)
async def readyz(state: Annotated[ApiState, Depends(get_state)]) -> Response:
    """200 when ready, 503 (same body) when not."""
    body = HealthOut(ok=False, store=await ping(state.store), kafka=state.producer.started)
    body = body.model_copy(update={"ok": bool(body.store and body.kafka)})
    return JSONResponse(body.model_dump(), status_code=200 if body.ok else 503)


@router.get(
    "/metrics",
    responses={200: {"description": "Prometheus text format.",
                     "content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}},
    response_class=Response, summary="Prometheus metrics",
)
async def metrics(state: Annotated[ApiState, Depends(get_state)]) -> Response:
    """Requests by route and status, their latency, declarations by result."""
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
