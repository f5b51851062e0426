"""``/v1/acks``: developers acknowledge notices.

Two ways: the token of the ack link carried by the notice (no API key needed: the
token is the credential, scoped to one delivery and expiring), or a delivery id with
the developer's own API key. Either way an :class:`~notice_relay.acks.AckRecord` goes
to the acks topic (key: delivery id), and the worker turns it into a
``delivery.acknowledged`` event.

``GET /v1/acks?token=…`` acknowledges too: the link in a notice is clicked, not
POSTed. Mail scanners that open every link acknowledge in the recipient's place;
such records say ``via: token_link``, so the trail tells a link from a deliberate
POST (``via: token``) or API call (``via: api_key``).
"""

from __future__ import annotations

import html
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import HTMLResponse

from notice_relay.acks import AckRecord, AckTokenInvalid, verify_token
from notice_relay.api.auth import Principal, optional_principal
from notice_relay.api.errors import ApiError, forbidden, not_found, unauthorized
from notice_relay.api.routes.common import errors
from notice_relay.api.schemas import AckAccepted, AckRequest
from notice_relay.api.state import ApiState, get_state
from notice_relay.audit.queries import delivery_by_id
from notice_relay.keys import Role

router = APIRouter(prefix="/v1/acks", tags=["acks"])

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Notice acknowledged</title></head>
<body><h1>Notice acknowledged</h1>
<p>Delivery <code>{delivery_id}</code> is recorded as acknowledged. Thank you.</p>
</body></html>
"""


async def _verify(state: ApiState, token: str) -> tuple[str, str]:
    try:
        delivery_id, developer_id = verify_token(state.ack_secret, token)
    except AckTokenInvalid as exc:
        raise ApiError(401, str(exc), code="invalid_token") from None
    # The relay signs a token for the delivery's own developer only; one naming another
    # developer (a leaked or shared ack secret) must not acknowledge in their name. A
    # delivery the store does not know yet is accepted: the ack may overtake the
    # projection of its planning.
    row = await delivery_by_id(state.store, delivery_id)
    if row is not None and row.developer_id != developer_id:
        raise ApiError(401, "ack token is not for this delivery's developer",
                       code="invalid_token")
    return delivery_id, developer_id


async def _publish(state: ApiState, delivery_id: str, developer_id: str, via: str,
                   reference: str | None) -> AckAccepted:
    record = AckRecord(delivery_id=delivery_id, developer_id=developer_id,
                       acknowledged_at=datetime.now(UTC), reference=reference, via=via)
    await state.producer.send(state.topics.acks, delivery_id.encode(),
                              record.model_dump_json().encode())
    return AckAccepted(delivery_id=delivery_id, via=via)


@router.post(
    "", status_code=202, response_model=AckAccepted,
    responses=errors(400, 401, 403, 404, 413, 422, 503),
    summary="Acknowledge a notice (ack token, or developer key: own deliveries)",
)
async def post_ack(
    body: AckRequest,
    state: Annotated[ApiState, Depends(get_state)],
    principal: Annotated[Principal | None, Depends(optional_principal)],
) -> AckAccepted:
    """With ``token``: no key needed. With ``delivery_id``: a developer key, and the
    delivery must be that developer's (another's is 404, like a missing one)."""
    if body.token is not None:
        delivery_id, developer_id = await _verify(state, body.token)
        return await _publish(state, delivery_id, developer_id, "token", body.reference)
    assert body.delivery_id is not None
    if principal is None:
        raise unauthorized()
    if principal.role is not Role.DEVELOPER:
        raise forbidden("only a developer key acknowledges by delivery id")
    row = await delivery_by_id(state.store, body.delivery_id)
    if row is None or row.developer_id != principal.subject:
        raise not_found(f"delivery {body.delivery_id!r}")
    return await _publish(state, row.delivery_id, row.developer_id, "api_key", body.reference)


@router.get(
    "", status_code=202, response_model=AckAccepted,
    responses={
        202: {"description": "Acknowledged (an HTML page when the client accepts text/html).",
              "content": {"text/html": {"schema": {"type": "string"}}}},
        **errors(401, 422, 503),
    },
    summary="Acknowledge by following the link in a notice",
)
async def get_ack(
    request: Request,
    token: Annotated[str, Query(min_length=1, max_length=2048, description="The ack token.")],
    state: Annotated[ApiState, Depends(get_state)],
    principal: Annotated[Principal | None, Depends(optional_principal)],
) -> Response | AckAccepted:
    """A GET acknowledges, because links in emails are clicked (see the module notes)."""
    delivery_id, developer_id = await _verify(state, token)
    accepted = await _publish(state, delivery_id, developer_id, "token_link", None)
    headers = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"}
    if "text/html" in request.headers.get("accept", ""):
        return HTMLResponse(_PAGE.format(delivery_id=html.escape(delivery_id)), status_code=202,
                            headers=headers)
    return Response(accepted.model_dump_json(), status_code=202,
                    media_type="application/json", headers=headers)
