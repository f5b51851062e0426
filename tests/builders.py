"""Small builders of valid records for tests: ``make_notice(**overrides)`` and
``make_task(**overrides)``. Each call gives fresh ids; any field can be overridden
(nested ones by passing the whole nested value)."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from typing import Any

from notice_relay.canonical import canonical_json, sha256_hex
from notice_relay.models import (
    NOTICE_SCHEMA_V1,
    Action,
    ChannelType,
    DeliveryTask,
    Notice,
    NoticeArtist,
    NoticeWork,
    Standards,
    Use,
)

_counter = itertools.count(1)

__all__ = ["make_notice", "make_task"]


def make_notice(**overrides: Any) -> Notice:
    """A valid opt-out Notice v1 for one work; ``fingerprint`` is computed over the
    other fields unless given."""
    n = next(_counter)
    now = datetime.now(UTC).replace(microsecond=0)
    fields: dict[str, Any] = {
        "schema": NOTICE_SCHEMA_V1,
        "notice_id": f"notice-{n}",
        "declaration_id": f"decl-{n}",
        "publisher_id": "artfolio",
        "action": Action.OPT_OUT,
        "artist": NoticeArtist(
            artist_ref=f"ar_{n:08d}",
            display_name="Mika Tanaka",
            aliases=["mikatan"],
            match_keys=["mika tanaka", "mikatan"],
            profiles=["https://www.pixiv.net/users/1234"],
        ),
        "works": [NoticeWork(url=f"https://artfolio.example.invalid/works/{n}", title="Dawn")],
        "all_works": False,
        "uses": [Use.TRAIN_AI, Use.TRAIN_GENAI],
        "standards": Standards(
            aipref="train-ai=n",
            cawg={"cawg.ai_training": "notAllowed", "cawg.ai_generative_training": "notAllowed"},
            iptc=["DMI-PROHIBITED-AIMLTRAINING", "DMI-PROHIBITED-GENAIMLTRAINING"],
            tdmrep=1,
        ),
        "declared_at": now,
        "relayed_at": now,
        "version": 1,
    }
    fields.update(overrides)
    if "fingerprint" not in fields:
        content = {k: v for k, v in fields.items() if k != "ack"}
        fields["fingerprint"] = sha256_hex(canonical_json(content))
    return Notice.model_validate(fields)


def make_task(**overrides: Any) -> DeliveryTask:
    """A first-attempt delivery of a fresh notice to acme-ai's webhook channel."""
    n = next(_counter)
    fields: dict[str, Any] = {
        "delivery_id": f"dlv-{n}",
        "developer_id": "acme-ai",
        "channel": "webhook",
        "channel_type": ChannelType.WEBHOOK,
        "attempt": 1,
        "planned_at": datetime.now(UTC),
    }
    fields.update(overrides)
    if "notice" not in fields:
        fields["notice"] = make_notice()
    return DeliveryTask(**fields)
