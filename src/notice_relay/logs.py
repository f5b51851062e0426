"""Logging: structlog, JSON in production, and PII kept out.

Artists' contact emails and secrets must never reach a log. Rather than trusting
every call site, a processor redacts any key that can carry them and any value
that looks like an email address or a webhook secret.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

_SENSITIVE_KEYS = re.compile(r"(secret|token|password|authorization|contact_email|api_key)", re.I)
_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
_WHSEC = re.compile(r"whsec_[A-Za-z0-9+/=]+")


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return _WHSEC.sub("whsec_[redacted]", _EMAIL.sub("[email redacted]", value))
    if isinstance(value, dict):
        return {k: ("[redacted]" if _SENSITIVE_KEYS.search(str(k)) else _scrub(v))
                for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub(v) for v in value]
    return value


def redact(
    _logger: Any, _name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: remove secrets and email addresses from an event."""
    for key in list(event_dict):
        if _SENSITIVE_KEYS.search(key):
            event_dict[key] = "[redacted]"
        else:
            event_dict[key] = _scrub(event_dict[key])
    return event_dict


def configure(fmt: str = "console", level: str = "info") -> None:
    """Configure structlog (and the stdlib root logger it writes through) once."""
    lvl = getattr(logging, level.upper(), logging.INFO)
    renderer: Any = (
        structlog.processors.JSONRenderer() if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
