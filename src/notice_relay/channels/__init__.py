"""Outbound channels: how notices reach developers.

:class:`Channel` is the one interface; :class:`WebhookChannel`, :class:`EmailChannel`
(SMTP settings from :class:`SmtpSettings`) and :class:`RegistryChannel` the real
implementations; :class:`MockChannel` the in-package double for unit tests of logic.
:func:`build_channel` builds the right channel for a connector's channel config.
"""

from __future__ import annotations

from collections.abc import Mapping

from notice_relay.channels.base import (
    Channel,
    StatusVerdict,
    classify_status,
    parse_retry_after,
)
from notice_relay.channels.email import EmailChannel, SmtpSettings
from notice_relay.channels.mock import MockChannel
from notice_relay.channels.registry import RegistryChannel
from notice_relay.channels.webhook import WebhookChannel
from notice_relay.connectors import (
    ChannelConfig,
    Developer,
    EmailChannelConfig,
    RegistryChannelConfig,
    WebhookChannelConfig,
    resolve_secret,
    resolve_token,
)
from notice_relay.errors import ConfigError

__all__ = [
    "Channel",
    "EmailChannel",
    "MockChannel",
    "RegistryChannel",
    "SmtpSettings",
    "StatusVerdict",
    "WebhookChannel",
    "build_channel",
    "classify_status",
    "parse_retry_after",
]


def build_channel(
    developer: Developer,
    config: ChannelConfig,
    *,
    environ: Mapping[str, str] | None = None,
) -> Channel:
    """A ready channel for ``config``, its secret read from the environment or a file
    (for email: the operator's ``NOTICE_RELAY_SMTP_*`` settings).

    Raises :class:`~notice_relay.errors.ConfigError` when the secret or a setting is
    missing or bad, or when the channel type has no sender.
    """
    if isinstance(config, WebhookChannelConfig):
        secrets = resolve_secret(config, developer.id, environ=environ)
        return WebhookChannel(developer, config, secrets)
    if isinstance(config, RegistryChannelConfig):
        token = resolve_token(config, developer.id, environ=environ)
        return RegistryChannel(developer, config, token)
    if isinstance(config, EmailChannelConfig):
        # The SMTP server is the operator's (NOTICE_RELAY_SMTP_*), not the developer's.
        try:
            return EmailChannel(developer, config, SmtpSettings.from_env(environ))
        except ConfigError as exc:
            raise ConfigError(f"developer {developer.id!r}, channel {config.name!r}: {exc}") \
                from None
    raise ConfigError(
        f"developer {developer.id!r}, channel {config.name!r}: "
        f"{config.type} channels have no sender yet"
    )
