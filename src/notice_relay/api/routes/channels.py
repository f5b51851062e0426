"""``/v1/channels``: channel health (operator, auditor); enabling and disabling a
channel (operator), audited with the operator as actor (:mod:`notice_relay.operations`)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Depends, Path

from notice_relay.api.auth import Principal, require
from notice_relay.api.errors import not_found
from notice_relay.api.routes.common import errors
from notice_relay.api.schemas import ChannelChange, ChannelHealthOut, ChannelOut, ChannelsOut
from notice_relay.api.state import ApiState, get_state
from notice_relay.errors import ConfigError
from notice_relay.keys import Role
from notice_relay.operations import channel_overview, set_channel

router = APIRouter(prefix="/v1/channels", tags=["operations"])

ChannelName = Annotated[str, Path(pattern=r"^[A-Za-z0-9._:-]{1,128}$")]


@router.get(
    "", response_model=ChannelsOut, responses=errors(401, 403, 503),
    summary="Every configured channel with its health (operator, auditor)",
)
async def list_channels(
    _principal: Annotated[Principal, Depends(require(Role.OPERATOR, Role.AUDITOR))],
    state: Annotated[ApiState, Depends(get_state)],
) -> ChannelsOut:
    """What ``notice-relay channels list`` shows."""
    rows = await channel_overview(state.settings)
    return ChannelsOut(channels=[ChannelOut.model_validate(r) for r in rows])


async def _set(state: ApiState, principal: Principal, developer: str, channel: str,
               enabled: bool, change: ChannelChange | None) -> ChannelHealthOut:
    devs = state.developers
    if devs is None or developer not in devs or channel not in [
            c.name for c in devs[developer].channels]:
        raise not_found(f"channel {developer}/{channel}")
    try:
        health = await set_channel(state.settings, f"{developer}/{channel}", enabled=enabled,
                                   operator=principal.subject,
                                   reason=change.reason if change else None)
    except ConfigError:
        raise not_found(f"channel {developer}/{channel}") from None
    return ChannelHealthOut(developer_id=health.developer_id, channel=health.channel,
                            enabled=health.enabled, reason=health.reason,
                            changed_at=health.changed_at, changed_by=health.changed_by)


@router.post(
    "/{developer}/{channel}/disable", response_model=ChannelHealthOut,
    responses=errors(400, 401, 403, 404, 413, 422, 503),
    summary="Disable a channel; its deliveries are held until it is enabled (operator)",
)
async def disable_channel(
    developer: ChannelName,
    channel: ChannelName,
    principal: Annotated[Principal, Depends(require(Role.OPERATOR))],
    state: Annotated[ApiState, Depends(get_state)],
    change: Annotated[ChannelChange | None, Body()] = None,
) -> ChannelHealthOut:
    """Audited as ``channel.disabled`` with the operator as actor."""
    return await _set(state, principal, developer, channel, False, change)


@router.post(
    "/{developer}/{channel}/enable", response_model=ChannelHealthOut,
    responses=errors(400, 401, 403, 404, 413, 422, 503),
    summary="Enable a channel; held deliveries resume (operator)",
)
async def enable_channel(
    developer: ChannelName,
    channel: ChannelName,
    principal: Annotated[Principal, Depends(require(Role.OPERATOR))],
    state: Annotated[ApiState, Depends(get_state)],
    change: Annotated[ChannelChange | None, Body()] = None,
) -> ChannelHealthOut:
    """Audited as ``channel.enabled`` with the operator as actor."""
    return await _set(state, principal, developer, channel, True, change)
