"""``/v1/declarations``: publishers post declarations; publishers (their own),
operators and auditors read one with its deliveries and trail."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request, Response

from notice_relay.api.auth import Principal, require
from notice_relay.api.errors import ApiError, not_found
from notice_relay.api.ingest import ingest
from notice_relay.api.routes.common import declaration_out, errors
from notice_relay.api.schemas import DeclarationOut, Identifier, IngestResult
from notice_relay.api.state import ApiState, get_state
from notice_relay.audit.queries import declaration_views
from notice_relay.keys import Role
from notice_relay.models import FieldError

router = APIRouter(prefix="/v1/declarations", tags=["declarations"])

_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "A Declaration v1 (schemas/declaration.v1.json), at most 8 MiB.",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Declaration"}}},
    }
}


@router.post(
    "", status_code=202, response_model=IngestResult, openapi_extra=_BODY,
    responses=errors(400, 401, 403, 413, 422, 503),
    summary="Publish a declaration (publisher)",
)
async def post_declaration(
    request: Request,
    response: Response,
    principal: Annotated[Principal, Depends(require(Role.PUBLISHER))],
    state: Annotated[ApiState, Depends(get_state)],
) -> IngestResult:
    """Validate a Declaration v1 exactly as the stream does and publish it to the
    declarations topic. Idempotent on the declaration id: a repeat answers with the
    first answer (header ``Idempotent-Replayed: true``) and publishes nothing."""
    done = await ingest(state, await request.body(), principal)
    if done.repeated:
        response.headers["Idempotent-Replayed"] = "true"
    return done.result


@router.get(
    "/{declaration_id}", response_model=DeclarationOut,
    responses=errors(401, 403, 404, 409, 422, 503),
    summary="A declaration, its deliveries and its trail (publisher: own; operator; auditor)",
)
async def get_declaration(
    declaration_id: Annotated[Identifier, Path(description="The publisher's declaration id.")],
    principal: Annotated[Principal, Depends(require(Role.PUBLISHER, Role.OPERATOR,
                                                    Role.AUDITOR))],
    state: Annotated[ApiState, Depends(get_state)],
    publisher_id: Annotated[Identifier | None, Query(
        description="Whose declaration, when several publishers used the id.")] = None,
) -> DeclarationOut:
    """A publisher sees its own declarations only; another's is 404 like a missing one."""
    if principal.role is Role.PUBLISHER:
        if publisher_id is not None and publisher_id != principal.subject:
            raise not_found(f"declaration {declaration_id!r}")
        publisher_id = principal.subject
    views = await declaration_views(state.store, declaration_id, publisher_id=publisher_id)
    if not views:
        raise not_found(f"declaration {declaration_id!r}")
    if len(views) > 1:
        pubs = ", ".join(sorted(v.declaration.publisher_id or "?" for v in views))
        raise ApiError(409, f"several publishers have a declaration {declaration_id!r}",
                       code="ambiguous", errors=[FieldError(
                           field="publisher_id",
                           message=f"pass ?publisher_id= (one of: {pubs})")])
    return declaration_out(views[0])
