"""``POST /v1/replays``: an operator sends failed deliveries again."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from notice_relay.api.auth import Principal, require
from notice_relay.api.errors import ApiError
from notice_relay.api.routes.common import errors
from notice_relay.api.schemas import ReplayRequest, ReplayResultOut
from notice_relay.api.state import ApiState, get_state
from notice_relay.audit.queries import DeliveryFilter
from notice_relay.keys import Role
from notice_relay.models import FieldError
from notice_relay.replay import NotReplayable, replay

router = APIRouter(prefix="/v1/replays", tags=["operations"])


@router.post(
    "", response_model=ReplayResultOut, responses=errors(400, 401, 403, 413, 422, 503),
    summary="Replay deliveries (operator)",
)
async def post_replay(
    body: ReplayRequest,
    principal: Annotated[Principal, Depends(require(Role.OPERATOR))],
    state: Annotated[ApiState, Depends(get_state)],
) -> ReplayResultOut:
    """Send every matching delivery again (``failed`` by default; ``failed`` and
    ``retry_scheduled`` can be replayed), audited as ``delivery.replay_requested`` with
    the operator as actor. ``dry_run`` only counts."""
    if body.since is not None and body.until is not None and body.since >= body.until:
        raise ApiError(422, "invalid request: until",
                       errors=[FieldError(field="until", message="must be later than since")])
    flt = DeliveryFilter(developer_id=body.developer, states=tuple(body.status),
                         declaration_key=body.declaration, since=body.since, until=body.until)
    try:
        result = await replay(state.store, state.producer, state.topics, flt,
                              operator=principal.subject, dry_run=body.dry_run)
    except NotReplayable as exc:
        raise ApiError(422, "invalid request: status",
                       errors=[FieldError(field="status", message=str(exc))]) from None
    return ReplayResultOut(matched=result.matched, replayed=result.replayed,
                           skipped=result.skipped, dry_run=result.dry_run)
