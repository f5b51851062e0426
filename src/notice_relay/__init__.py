"""notice-relay: relay artists' AI opt-out declarations to every AI developer
concerned, over each developer's channel, with a tamper-evident trail."""

from notice_relay.errors import (
    ChannelError,
    ConfigError,
    ConnectorConfigError,
    DeclarationInvalid,
    KafkaUnavailable,
    NoticeRelayError,
    PermanentChannelError,
    StoreError,
    TransientChannelError,
)
from notice_relay.models import (
    Action,
    AuditEvent,
    Declaration,
    DeliveryState,
    DeliveryTask,
    Notice,
    Outcome,
    OutcomeKind,
    Use,
)

__version__ = "0.1.0"

__all__ = [
    "Action",
    "AuditEvent",
    "ChannelError",
    "ConfigError",
    "ConnectorConfigError",
    "Declaration",
    "DeclarationInvalid",
    "DeliveryState",
    "DeliveryTask",
    "KafkaUnavailable",
    "Notice",
    "NoticeRelayError",
    "Outcome",
    "OutcomeKind",
    "PermanentChannelError",
    "StoreError",
    "TransientChannelError",
    "Use",
    "__version__",
]
