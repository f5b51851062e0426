"""The bodies the HTTP API reads and writes (they make its OpenAPI schema)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints, model_validator

from notice_relay.models import DeliveryState

Identifier = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._:-]{1,128}$")]
#: ``publisher_id/declaration_id``.
DeclarationKey = Annotated[str, StringConstraints(
    pattern=r"^[A-Za-z0-9._:-]{1,128}/[A-Za-z0-9._:-]{1,128}$")]
DeliveryId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._:-]{1,80}$")]


class _In(BaseModel):
    """A request body: unknown fields are errors."""

    model_config = ConfigDict(extra="forbid")


class FieldErrorOut(BaseModel):
    """One offending field."""

    field: str = Field(description='Dotted path ("works.3.url"); "$" is the body as a whole.')
    message: str


class ErrorBody(BaseModel):
    """Every error answer."""

    error: str = Field(description="Stable machine-readable code, e.g. invalid_declaration.")
    reason: str = Field(description="What went wrong, for people.")
    errors: list[FieldErrorOut] = Field(default_factory=list)


class IngestResult(BaseModel):
    """A declaration accepted for relaying (the same answer for every repeat of its id)."""

    declaration_key: str
    notice_id: str
    fingerprint: str
    status: Literal["accepted"] = "accepted"


class ActorOut(BaseModel):
    """Who caused an event."""

    kind: str
    id: str


class DeliveryOut(BaseModel):
    """The current state of one delivery."""

    delivery_id: str
    declaration_key: str
    developer_id: str
    channel: str
    channel_type: str
    state: str
    attempts: int
    last_status_code: int | None
    last_error: str | None
    receipt: str | None
    next_attempt_at: datetime | None
    planned_at: datetime
    delivered_at: datetime | None
    updated_at: datetime


class TrailEventOut(BaseModel):
    """One event of a declaration's trail, with its place in the hash chain."""

    seq: int
    event_id: str
    type: str
    occurred_at: datetime
    actor: ActorOut
    delivery_id: str | None
    developer_id: str | None
    data: dict[str, Any]
    prev_hash: str
    hash: str


class DeclarationOut(BaseModel):
    """A declaration, its deliveries and its trail."""

    declaration_key: str
    publisher_id: str | None
    declaration_id: str | None
    status: str
    action: str | None
    fingerprint: str | None
    reason: str | None
    received_at: datetime
    updated_at: datetime
    deliveries: list[DeliveryOut]
    trail: list[TrailEventOut]


class DeliveryPageOut(BaseModel):
    """One page of deliveries."""

    deliveries: list[DeliveryOut]
    next_cursor: str | None = Field(description="Pass as ?cursor= for the next page; "
                                                "null on the last page.")


class ReplayRequest(_In):
    """Which deliveries to send again. Every field narrows; ``since``/``until`` are on
    the time the delivery last changed (``until`` defaults to now)."""

    developer: Identifier | None = None
    status: list[DeliveryState] = Field(default_factory=lambda: [DeliveryState.FAILED],
                                        min_length=1, max_length=10)
    since: AwareDatetime | None = None
    until: AwareDatetime | None = None
    declaration: DeclarationKey | None = None
    dry_run: bool = False


class ReplayResultOut(BaseModel):
    """What a replay matched and sent."""

    matched: int
    replayed: int
    skipped: int = Field(description="Matched, but the relayed notice is not in the store.")
    dry_run: bool


class AckRequest(_In):
    """An acknowledgement: a token from the notice, or a delivery id with a developer key."""

    token: Annotated[str, StringConstraints(min_length=1, max_length=2048)] | None = None
    delivery_id: DeliveryId | None = None
    reference: Annotated[str, StringConstraints(max_length=500)] | None = Field(
        default=None, description='What the developer did, e.g. "removed from dataset v4".')

    @model_validator(mode="after")
    def _one_of(self) -> AckRequest:
        if (self.token is None) == (self.delivery_id is None):
            raise ValueError("give exactly one of token or delivery_id")
        return self


class AckAccepted(BaseModel):
    """An acknowledgement put on the acks topic."""

    delivery_id: str
    status: Literal["accepted"] = "accepted"
    via: str


class ChainProblemOut(BaseModel):
    """One place where the stored trail does not verify."""

    declaration_key: str
    seq: int
    problem: str


class VerifyOut(BaseModel):
    """The result of verifying every hash chain."""

    ok: bool
    problems: list[ChainProblemOut]


class ChannelOut(BaseModel):
    """A configured channel and its recorded health."""

    key: str
    developer_id: str
    channel: str
    type: str
    state: str
    enabled: bool
    last_success_at: str | None
    failing_since: str | None
    reason: str | None
    last_error: str | None
    changed_by: str | None
    changed_at: str | None


class ChannelsOut(BaseModel):
    """Every configured channel."""

    channels: list[ChannelOut]


class ChannelChange(_In):
    """Why a channel is enabled or disabled (recorded in the audit trail)."""

    reason: Annotated[str, StringConstraints(max_length=500)] | None = None


class ChannelHealthOut(BaseModel):
    """A channel's state after an operator's change."""

    developer_id: str
    channel: str
    enabled: bool
    reason: str | None
    changed_at: datetime | None
    changed_by: str | None


class HealthOut(BaseModel):
    """Liveness or readiness."""

    ok: bool
    store: bool | None = None
    kafka: bool | None = None
