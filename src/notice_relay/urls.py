"""URL checks and normalization (pure functions, no I/O)."""

from __future__ import annotations

from urllib.parse import urlsplit


def check_http_url(value: str) -> str:
    """Accept an absolute http(s) URL with a host; raise ValueError otherwise."""
    try:
        parts = urlsplit(value)
    except ValueError as exc:
        raise ValueError(f"is not a valid URL ({exc})") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise ValueError(f"must be an http(s) URL, not {parts.scheme or 'a relative'!r} URL")
    if not parts.hostname:
        raise ValueError("must be an absolute URL with a host")
    if any(ch.isspace() or ord(ch) < 0x20 for ch in value):
        raise ValueError("must not contain whitespace or control characters")
    return value
