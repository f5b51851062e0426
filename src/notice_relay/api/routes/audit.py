"""``/v1/audit``: the whole trail exported, and the hash chains verified (auditor)."""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query
from fastapi.responses import StreamingResponse

from notice_relay.api.auth import Principal, require
from notice_relay.api.routes.common import errors
from notice_relay.api.schemas import ChainProblemOut, DeclarationKey, VerifyOut
from notice_relay.api.state import ApiState, get_state
from notice_relay.audit.export import CSV_COLUMNS, csv_row, jsonl_line
from notice_relay.audit.queries import stream_events
from notice_relay.keys import Role

router = APIRouter(prefix="/v1/audit", tags=["audit"])

_MEDIA = {"jsonl": "application/x-ndjson", "csv": "text/csv; charset=utf-8"}


def _csv_line(values: list[Any]) -> bytes:
    buf = io.StringIO()
    csv.writer(buf).writerow(values)
    return buf.getvalue().encode("utf-8")


async def _lines(state: ApiState, fmt: str, declaration: str | None) -> AsyncIterator[bytes]:
    # The same records and bytes as `notice-relay audit export` (notice_relay.audit.export).
    if fmt == "csv":
        yield _csv_line(list(CSV_COLUMNS))
    async for record in stream_events(state.store, declaration_key=declaration):
        yield _csv_line(csv_row(record)) if fmt == "csv" else jsonl_line(record).encode("utf-8")


@router.get(
    "/export",
    responses={
        200: {"description": "Every stored event with its seq, prev_hash and hash, chain by "
                             "chain in sequence order.",
              "content": {"application/x-ndjson": {"schema": {"type": "string"}},
                          "text/csv": {"schema": {"type": "string"}}}},
        **errors(401, 403, 422, 503),
    },
    response_class=StreamingResponse,
    summary="Export the audit trail as JSON lines or CSV (auditor)",
)
async def export(
    _principal: Annotated[Principal, Depends(require(Role.AUDITOR))],
    state: Annotated[ApiState, Depends(get_state)],
    fmt: Annotated[Literal["jsonl", "csv"], Query(alias="format",
                                                  description="jsonl or csv")] = "jsonl",
    declaration: Annotated[DeclarationKey | None, Query(
        description="Only this declaration's trail (publisher_id/declaration_id).")] = None,
) -> StreamingResponse:
    """Streamed, in chain order; each JSON line (canonical JSON) is exactly what the
    chain hashes plus ``prev_hash`` and ``hash``, so every chain can be recomputed from
    the export alone. The same bytes as ``notice-relay audit export``. CSV values are
    written as stored, without spreadsheet formula escaping, which would alter them:
    open the file with a CSV parser."""
    return StreamingResponse(
        _lines(state, fmt, declaration), media_type=_MEDIA[fmt],
        headers={"Content-Disposition": f'attachment; filename="notice-relay-audit.{fmt}"'},
    )


@router.get(
    "/verify", response_model=VerifyOut, responses=errors(401, 403, 503),
    summary="Verify every hash chain of the audit store (auditor)",
)
async def verify(
    _principal: Annotated[Principal, Depends(require(Role.AUDITOR))],
    state: Annotated[ApiState, Depends(get_state)],
) -> VerifyOut:
    """Recompute every chain; ``problems`` names each altered, removed or reordered event."""
    problems = await state.store.verify()
    return VerifyOut(ok=not problems, problems=[
        ChainProblemOut(declaration_key=p.declaration_key, seq=p.seq, problem=p.problem)
        for p in problems
    ])
