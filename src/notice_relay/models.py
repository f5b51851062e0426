"""The contracts: Declaration v1 (publishers), Notice v1 (developers), and the
internal records that travel between the stages (delivery tasks, attempt outcomes,
audit events).

Every model here is pure data. Validation that needs no outside knowledge lives in
the models themselves; rules that need the registry (is this publisher known, is
this target a developer) live in :mod:`notice_relay.validate`.
"""

from __future__ import annotations

import unicodedata
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any, Literal

import email_validator
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    StringConstraints,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from notice_relay.urls import check_http_url

DECLARATION_SCHEMA_V1 = "notice-relay/declaration/v1"
NOTICE_SCHEMA_V1 = "notice-relay/notice/v1"

#: How far in the future a declaration's ``declared_at`` may lie (clock skew).
MAX_CLOCK_SKEW = timedelta(minutes=5)
MAX_WORKS = 10_000
MAX_ALIASES = 50
MAX_PROFILES = 50


class Use(StrEnum):
    """A use of an artist's work or name that the artist refuses."""

    TRAIN_AI = "train-ai"
    TRAIN_GENAI = "train-genai"
    DATA_MINING = "data-mining"
    AI_INFERENCE = "ai-inference"
    PROMPT_NAME = "prompt-name"


class Action(StrEnum):
    """What a declaration does: refuse uses, or withdraw an earlier refusal."""

    OPT_OUT = "opt_out"
    WITHDRAW = "withdraw"


# Characters that may never appear in a name or title: C0/C1 controls (CR/LF make
# header injection possible downstream) and the bidi overrides that let a name
# display as something other than what it is.
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _no_control_chars(value: str, *, allow_newlines: bool = False) -> str:
    for ch in value:
        if allow_newlines and ch in "\n\t":
            continue
        if unicodedata.category(ch) == "Cc" or ch in _BIDI_CONTROLS:
            raise ValueError(f"contains the control character U+{ord(ch):04X}")
    return value


def _clean_line(value: str) -> str:
    value = _no_control_chars(value)
    if not value.strip():
        raise ValueError("must not be blank")
    return value


def _clean_text(value: str) -> str:
    return _no_control_chars(value, allow_newlines=True)


def _check_email(value: str) -> str:
    # email-validator checks the syntax, as pydantic's EmailStr does, but reserved
    # names (example.invalid, *.test, *.local) are accepted: the relay never mails this
    # address, demos and tests must use reserved names, and an artist's opt-out must
    # not bounce over an optional field nobody sends mail to.
    try:
        email_validator.validate_email(value, check_deliverability=False)
    except email_validator.EmailNotValidError as exc:
        if "special-use or reserved name" not in str(exc):
            raise ValueError(f"is not a valid email address: {exc}") from None
        # email-validator stops at the reserved name, before its last checks (a
        # display name "Name <a@b>", the overall length): run them on a stand-in
        # domain of the same shape (a closing ">" kept, so a display name is named).
        local, _, domain = value.rpartition("@")
        stand_in = "".join(ch if ch in ".>" else "a" for ch in domain)
        try:
            email_validator.validate_email(f"{local}@{stand_in}", check_deliverability=False)
        except email_validator.EmailNotValidError as again:
            raise ValueError(f"is not a valid email address: {again}") from None
    return value


Identifier = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._:-]{1,128}$")]
"""An id chosen by a publisher or an operator: 1-128 of ``[A-Za-z0-9._:-]``."""

Line = Annotated[str, StringConstraints(min_length=1, max_length=200), AfterValidator(_clean_line)]
Email = Annotated[
    str,
    StringConstraints(min_length=3, max_length=254),
    AfterValidator(_check_email),
    WithJsonSchema({"type": "string", "format": "email"}),
]
HttpUrl = Annotated[
    str, StringConstraints(min_length=1, max_length=2048), AfterValidator(check_http_url)
]
Sha256Hex = Annotated[str, StringConstraints(pattern=r"^[0-9a-fA-F]{64}$")]


class _Strict(BaseModel):
    """Unknown fields are errors: a typo must never silently change a declaration."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        strict=True,
        validate_by_alias=True,
        validate_by_name=True,
        serialize_by_alias=True,
    )


class Artist(_Strict):
    """The artist a declaration speaks for, as the publisher knows them."""

    artist_id: Annotated[
        str, StringConstraints(min_length=1, max_length=256), AfterValidator(_clean_line)
    ]
    display_name: Line
    aliases: list[Line] = Field(default_factory=list, max_length=MAX_ALIASES)
    profiles: list[HttpUrl] = Field(default_factory=list, max_length=MAX_PROFILES)
    contact_email: Email | None = Field(
        default=None,
        description="PII: never sent to developers, never logged.",
    )


class Work(_Strict):
    """One work the declaration covers."""

    url: HttpUrl
    sha256: Sha256Hex | None = None
    title: (
        Annotated[str, StringConstraints(min_length=1, max_length=500), AfterValidator(_clean_line)]
        | None
    ) = None


class Declaration(_Strict):
    """Declaration v1: what a publisher sends on behalf of an artist."""

    schema_: Literal["notice-relay/declaration/v1"] = Field(alias="schema")
    declaration_id: Identifier
    publisher_id: Identifier
    action: Action
    declared_at: AwareDatetime
    artist: Artist
    works: list[Work] = Field(default_factory=list, max_length=MAX_WORKS)
    all_works: bool = False
    uses: list[Use] = Field(min_length=1)
    targets: list[Identifier | Literal["*"]] = Field(min_length=1, max_length=1000)
    supersedes: Identifier | None = None
    note: Annotated[str, StringConstraints(max_length=2000), AfterValidator(_clean_text)] | None = (
        None
    )

    @field_validator("declared_at")
    @classmethod
    def _not_in_future(cls, value: datetime) -> datetime:
        if value - datetime.now(UTC) > MAX_CLOCK_SKEW:
            raise ValueError("is more than 5 minutes in the future")
        return value

    @field_validator("targets")
    @classmethod
    def _star_alone(cls, value: list[str]) -> list[str]:
        if "*" in value and len(value) > 1:
            raise ValueError('"*" (every developer) cannot be combined with developer ids')
        return value

    @model_validator(mode="after")
    def _cross_field_rules(self) -> Declaration:
        if self.action is Action.WITHDRAW and self.supersedes is None:
            raise ValueError("supersedes: required when action is withdraw")
        if self.action is Action.OPT_OUT and self.supersedes is not None:
            raise ValueError("supersedes: only allowed when action is withdraw")
        if self.supersedes == self.declaration_id:
            raise ValueError("supersedes: a declaration cannot supersede itself")
        if not self.works and not self.all_works:
            raise ValueError("works: must list at least one work unless all_works is true")
        return self

    @property
    def artist_key(self) -> str:
        """The Kafka key that keeps one artist's declarations in order."""
        return f"{self.publisher_id}/{self.artist.artist_id}"

    @property
    def declaration_key(self) -> str:
        """The globally unique id of this declaration (ids are unique per publisher)."""
        return f"{self.publisher_id}/{self.declaration_id}"


# --------------------------------------------------------------------------- notice


class Standards(_Strict):
    """The same refusal rendered for vocabularies that developers already read."""

    aipref: str | None = Field(
        default=None, description='IETF AIPREF usage preference, e.g. "train-ai=n".'
    )
    cawg: dict[str, Literal["notAllowed"]] = Field(
        default_factory=dict,
        description="CAWG training-and-data-mining assertion entries.",
    )
    iptc: list[str] = Field(default_factory=list, description="IPTC plus:DataMining values.")
    tdmrep: int | None = Field(default=None, description="TDMRep tdm-reservation (1 = reserved).")


class NoticeArtist(_Strict):
    """The artist as developers see them: never the publisher's contact email."""

    artist_ref: str
    display_name: str
    aliases: list[str]
    match_keys: list[str] = Field(
        description="Case-folded NFKC keys of the display name and aliases, for matching."
    )
    profiles: list[str]


class NoticeWork(_Strict):
    """A work, its URL normalized."""

    url: str
    sha256: str | None = None
    title: str | None = None


class AckInfo(_Strict):
    """Where and by when a developer acknowledges the notice."""

    url: str
    due_by: AwareDatetime


class Notice(_Strict):
    """Notice v1: the normalized form of a declaration, as developers receive it."""

    schema_: Literal["notice-relay/notice/v1"] = Field(alias="schema")
    notice_id: str
    declaration_id: str
    publisher_id: str
    action: Action
    artist: NoticeArtist
    works: list[NoticeWork]
    all_works: bool
    uses: list[Use]
    standards: Standards
    declared_at: AwareDatetime
    relayed_at: AwareDatetime
    version: int = Field(ge=1)
    supersedes: str | None = None
    note: str | None = None
    fingerprint: str = Field(description="SHA-256 of the canonical JSON of the notice content.")
    ack: AckInfo | None = None

    @property
    def declaration_key(self) -> str:
        """The globally unique id of the declaration this notice carries."""
        return f"{self.publisher_id}/{self.declaration_id}"

    @property
    def artist_key(self) -> str:
        """The Kafka key of the artist (opaque ref: ids are not exposed)."""
        return self.artist.artist_ref


# ------------------------------------------------------------------ internal records


class ChannelType(StrEnum):
    """How a developer is reached."""

    EMAIL = "email"
    WEBHOOK = "webhook"
    REGISTRY = "registry"


class DeliveryTask(_Strict):
    """One delivery: a notice × a developer × one of that developer's channels."""  # noqa: RUF002 - product sign meant

    delivery_id: str
    notice: Notice
    developer_id: str
    channel: str = Field(description="The channel's name within the developer's connector.")
    channel_type: ChannelType
    attempt: int = Field(default=1, ge=1)
    planned_at: AwareDatetime
    not_before: AwareDatetime | None = None
    held: bool = Field(
        default=False, description="Waiting for its disabled channel to be enabled again."
    )

    @property
    def declaration_key(self) -> str:
        """The audit key of the declaration this delivery belongs to."""
        return self.notice.declaration_key


class OutcomeKind(StrEnum):
    """The three results of one attempt."""

    DELIVERED = "delivered"
    TRANSIENT = "transient"
    PERMANENT = "permanent"


class Outcome(_Strict):
    """The result of one delivery attempt."""

    delivery_id: str
    kind: OutcomeKind
    attempt: int = Field(ge=1)
    attempted_at: AwareDatetime
    latency_ms: float = 0.0
    status_code: int | None = None
    error: str | None = None
    retry_after: float | None = Field(
        default=None, description="Seconds the receiver asked to wait."
    )
    receipt: str | None = None
    disable_channel: bool = Field(
        default=False, description="The receiver said the endpoint is gone (HTTP 410)."
    )
    slow_down: bool = Field(
        default=False,
        description="The receiver is overloaded (HTTP 429 or a timeout): back off longer.",
    )
    acknowledged: bool = Field(
        default=False, description="The receiver's answer acknowledged the notice (a receipt)."
    )

    @classmethod
    def delivered(cls, task: DeliveryTask, *, receipt: str | None = None, **kw: Any) -> Outcome:
        """A successful attempt."""
        return cls(
            delivery_id=task.delivery_id,
            kind=OutcomeKind.DELIVERED,
            attempt=task.attempt,
            attempted_at=kw.pop("attempted_at", None) or datetime.now(UTC),
            receipt=receipt,
            **kw,
        )

    @classmethod
    def transient(cls, task: DeliveryTask, error: str, *, retry_after: float | None = None,
                  **kw: Any) -> Outcome:
        """A failed attempt worth retrying."""
        return cls(delivery_id=task.delivery_id, kind=OutcomeKind.TRANSIENT, attempt=task.attempt,
                   attempted_at=kw.pop("attempted_at", None) or datetime.now(UTC), error=error,
                   retry_after=retry_after, **kw)

    @classmethod
    def permanent(cls, task: DeliveryTask, error: str, **kw: Any) -> Outcome:
        """A failed attempt that no retry will fix."""
        return cls(
            delivery_id=task.delivery_id,
            kind=OutcomeKind.PERMANENT,
            attempt=task.attempt,
            attempted_at=kw.pop("attempted_at", None) or datetime.now(UTC),
            error=error,
            **kw,
        )


class DeliveryState(StrEnum):
    """Where a delivery stands; see docs/architecture.md for the transitions."""

    PLANNED = "planned"
    SENDING = "sending"
    RETRY_SCHEDULED = "retry_scheduled"
    DELIVERED = "delivered"
    ACKNOWLEDGED = "acknowledged"
    OVERDUE = "overdue"
    FAILED = "failed"
    SUPERSEDED = "superseded"
    SKIPPED = "skipped"
    HELD = "held"


class ActorKind(StrEnum):
    """Who caused an audit event."""

    SYSTEM = "system"
    PUBLISHER = "publisher"
    DEVELOPER = "developer"
    OPERATOR = "operator"


class Actor(_Strict):
    """The actor behind an audit event."""

    kind: ActorKind
    id: str


SYSTEM = Actor(kind=ActorKind.SYSTEM, id="notice-relay")


class AuditType(StrEnum):
    """Every kind of event in a declaration's trail."""

    DECLARATION_RECEIVED = "declaration.received"
    DECLARATION_REJECTED = "declaration.rejected"
    DECLARATION_DUPLICATE = "declaration.duplicate"
    DECLARATION_NORMALIZED = "declaration.normalized"
    DECLARATION_WITHDRAWN = "declaration.withdrawn"
    DELIVERY_PLANNED = "delivery.planned"
    DELIVERY_SKIPPED = "delivery.skipped"
    DELIVERY_HELD = "delivery.held"
    DELIVERY_ATTEMPTED = "delivery.attempted"
    DELIVERY_RETRY_SCHEDULED = "delivery.retry_scheduled"
    DELIVERY_DELIVERED = "delivery.delivered"
    DELIVERY_FAILED = "delivery.failed"
    DELIVERY_ACKNOWLEDGED = "delivery.acknowledged"
    DELIVERY_OVERDUE = "delivery.overdue"
    DELIVERY_SUPERSEDED = "delivery.superseded"
    DELIVERY_REPLAY_REQUESTED = "delivery.replay_requested"
    CHANNEL_DISABLED = "channel.disabled"
    CHANNEL_ENABLED = "channel.enabled"


class AuditEvent(_Strict):
    """One entry in a declaration's trail. ``event_id`` is deterministic where the
    event is, so that a stage re-run after a crash writes the same id and the
    projector stores it once."""

    event_id: str
    declaration_key: str = Field(description="publisher_id/declaration_id; the audit topic key.")
    type: AuditType
    occurred_at: AwareDatetime
    actor: Actor = SYSTEM
    delivery_id: str | None = None
    developer_id: str | None = None
    data: dict[str, JsonValue] = Field(default_factory=dict)


class Rejection(_Strict):
    """What goes to the rejected topic: the raw bytes and reasons a publisher can act on."""

    declaration_key: str
    received_at: AwareDatetime
    reason: str
    errors: list[FieldError]
    raw_base64: str


class FieldError(_Strict):
    """One reason a declaration was refused, naming the field."""

    field: str
    message: str


Rejection.model_rebuild()
