"""``GET /v1/deliveries``: deliveries filtered and paged (developer: own; operator;
auditor)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query
from pydantic import AwareDatetime

from notice_relay.api.auth import Principal, require
from notice_relay.api.errors import ApiError, forbidden
from notice_relay.api.routes.common import delivery_out, errors
from notice_relay.api.schemas import DeclarationKey, DeliveryPageOut, Identifier
from notice_relay.api.state import ApiState, get_state
from notice_relay.audit.queries import MAX_PAGE, CursorInvalid, DeliveryFilter, find_deliveries
from notice_relay.keys import Role
from notice_relay.models import DeliveryState, FieldError

router = APIRouter(prefix="/v1/deliveries", tags=["deliveries"])


def _invalid(field: str, message: str) -> ApiError:
    return ApiError(422, f"invalid request: {field}", errors=[FieldError(field=field,
                                                                        message=message)])


@router.get(
    "", response_model=DeliveryPageOut, responses=errors(401, 403, 422, 503),
    summary="Deliveries by developer, state, declaration and time (developer: own; "
            "operator; auditor)",
)
async def list_deliveries(
    principal: Annotated[Principal, Depends(require(Role.DEVELOPER, Role.OPERATOR,
                                                    Role.AUDITOR))],
    state: Annotated[ApiState, Depends(get_state)],
    developer: Annotated[Identifier | None, Query(description="Developer id.")] = None,
    status: Annotated[list[DeliveryState] | None, Query(
        description="Delivery state; repeat for several.")] = None,
    declaration: Annotated[DeclarationKey | None, Query(
        description="publisher_id/declaration_id")] = None,
    since: Annotated[AwareDatetime | None, Query(
        description="Last changed at or after (RFC 3339 with offset).")] = None,
    until: Annotated[AwareDatetime | None, Query(
        description="Last changed before (RFC 3339 with offset).")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
    cursor: Annotated[str | None, Query(max_length=1024,
                                        description="next_cursor of the previous page.")] = None,
) -> DeliveryPageOut:
    """Ordered by (updated_at, delivery_id), keyset-paged. A developer key sees its own
    developer's deliveries only (naming another developer is 403)."""
    if principal.role is Role.DEVELOPER:
        if developer is not None and developer != principal.subject:
            raise forbidden("a developer key sees its own deliveries only")
        developer = principal.subject
    if since is not None and until is not None and since >= until:
        raise _invalid("until", "must be later than since")
    flt = DeliveryFilter(developer_id=developer, states=tuple(status or ()),
                         declaration_key=declaration, since=since, until=until)
    try:
        page = await find_deliveries(state.store, flt, limit=limit, cursor=cursor)
    except CursorInvalid as exc:
        raise _invalid("cursor", str(exc)) from None
    return DeliveryPageOut(deliveries=[delivery_out(r) for r in page.rows],
                           next_cursor=page.next_cursor)
