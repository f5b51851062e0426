"""The one exception tree of notice-relay.

::

    NoticeRelayError
    ├── ConfigError                 bad settings or environment
    │   └── ConnectorConfigError    a connector/publisher file is invalid (names file and field)
    ├── DeclarationInvalid          a declaration breaks the Declaration v1 contract
    ├── ChannelError                a delivery attempt failed (translated from httpx/aiosmtplib)
    │   ├── TransientChannelError   retriable = True: 5xx, 429, connection errors
    │   │   └── ChannelTimeout      no answer in time (slow_down = True)
    │   └── PermanentChannelError   retriable = False: 4xx, refused address, bad TLS
    │       └── AddressRefused      the SSRF guard refused the address (netguard)
    ├── StoreError                  the audit store failed
    └── KafkaUnavailable            the broker could not be reached (retriable)

Whether an error is worth retrying is a property of its class (``retriable``), not
something each caller decides. Third-party exceptions are translated at the edge
that calls the library, in one place per edge.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from notice_relay.models import FieldError


class NoticeRelayError(Exception):
    """Base of every error notice-relay raises."""

    retriable: bool = False


class ConfigError(NoticeRelayError):
    """Settings or the environment are unusable."""


class ConnectorConfigError(ConfigError):
    """A connector or publisher file is invalid; the message names the file and field."""

    def __init__(self, path: str, field: str, message: str) -> None:
        self.path = path
        self.field = field
        self.message = message
        super().__init__(f"{path}: {field}: {message}" if field else f"{path}: {message}")


class DeclarationInvalid(NoticeRelayError):
    """A declaration breaks the contract. ``errors`` names each offending field."""

    def __init__(self, reason: str, errors: list[FieldError]) -> None:
        self.reason = reason
        self.errors = errors
        super().__init__(reason)


class ChannelError(NoticeRelayError):
    """A delivery attempt failed."""

    #: The receiver is overloaded: the next attempt should wait longer than usual.
    slow_down: bool = False

    def __init__(self, message: str, *, status_code: int | None = None,
                 retry_after: float | None = None) -> None:
        self.status_code = status_code
        self.retry_after = retry_after
        super().__init__(message)


class TransientChannelError(ChannelError):
    """A failure that a later attempt may not meet."""

    retriable = True


class ChannelTimeout(TransientChannelError):
    """The receiver did not answer in time: retry, and back off longer than usual."""

    slow_down = True


class PermanentChannelError(ChannelError):
    """A failure that no retry will fix."""

    retriable = False


class AddressRefused(PermanentChannelError):
    """The network guard refused to connect to ``address`` (a private, loopback,
    link-local, reserved or cloud-metadata address) while reaching ``host``."""

    def __init__(self, message: str, *, host: str, address: str, kind: str) -> None:
        self.host = host
        self.address = address
        self.kind = kind
        super().__init__(message)


class StoreError(NoticeRelayError):
    """The audit store failed."""

    retriable = True


class KafkaUnavailable(NoticeRelayError):
    """The Kafka cluster could not be reached."""

    retriable = True
