"""The HTTP API (FastAPI): ingest, status, deliveries, replays, acks, audit export and
verification, channels, health and metrics. See :func:`create_app`."""

from notice_relay.api.app import create_app

__all__ = ["create_app"]
