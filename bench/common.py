"""Shared pieces of the benchmark: declarations and notices of about 2 KB, secrets,
connector files, and small statistics helpers."""

from __future__ import annotations

import base64
import json
import secrets
import statistics
from datetime import UTC, datetime
from pathlib import Path

from notice_relay.fanout import delivery_id
from notice_relay.normalize import normalize, notice_id
from notice_relay.validate import parse_declaration

PUBLISHER = "artfolio"
#: Works per declaration: sized so that the Notice v1 a developer receives is ~2 KB.
WORKS = 9


def developer_ids(n: int) -> list[str]:
    """``n`` developer ids."""
    return [f"dev-{i:03d}" for i in range(n)]


def new_secret() -> str:
    """A fresh Standard Webhooks secret."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def declaration(run: str, i: int) -> bytes:
    """Declaration v1 number ``i`` of run ``run`` (an opt-out for every developer)."""
    doc = {
        "schema": "notice-relay/declaration/v1",
        "declaration_id": f"bench-{run}-{i:07d}",
        "publisher_id": PUBLISHER,
        "action": "opt_out",
        "declared_at": "2026-07-07T19:00:00+00:00",
        "artist": {
            "artist_id": f"artist-{i:07d}",
            "display_name": f"Benchmark Artist {i}",
            "aliases": [f"bench-artist-{i}", f"BA{i}"],
            "profiles": [f"https://gallery.example.com/users/{i}"],
            "contact_email": f"artist{i}@example.com",
        },
        "works": [{"url": f"https://gallery.example.com/artworks/{i}-{w}",
                   "title": f"Work {w} of artist {i}"} for w in range(WORKS)],
        "uses": ["train-ai", "train-genai"],
        "targets": ["*"],
        "note": "Please do not use my work to train AI models. " * 2,
    }
    return json.dumps(doc).encode()


def notice_body(run: str, i: int) -> tuple[str, bytes]:
    """The notice id and Notice v1 JSON bytes the relay would send for declaration
    ``i`` (for the baseline, which sends ready-made notices of the same size)."""
    decl = parse_declaration(declaration(run, i))
    notice = normalize(decl, relayed_at=datetime.now(UTC))
    return notice.notice_id, notice.model_dump_json(by_alias=True).encode()


def delivery_ids(run: str, i: int, developers: list[str]) -> list[str]:
    """The webhook-ids the relay uses for declaration ``i`` (channel ``webhook``)."""
    nid = notice_id(PUBLISHER, f"bench-{run}-{i:07d}")
    return [delivery_id(nid, dev, "webhook") for dev in developers]


def write_registry(root: Path, developers: dict[str, str], base_url: str) -> dict[str, str]:
    """connectors/*.toml (webhooks to ``base_url``/hook/<dev>, http and loopback allowed
    as in the tests) and publishers.toml under ``root``; the secrets' environment."""
    conn = root / "connectors"
    conn.mkdir(parents=True, exist_ok=True)
    env = {}
    for dev, secret in developers.items():
        var = "WHSEC_" + dev.upper().replace("-", "_")
        env[var] = secret
        (conn / f"{dev}.toml").write_text(
            f'id = "{dev}"\nname = "{dev}"\naccepts = ["train-ai", "train-genai"]\n'
            f'ack_sla = "30d"\n\n[[channel]]\ntype = "webhook"\n'
            f'url = "{base_url}/hook/{dev}"\nsecret_env = "{var}"\ntimeout = "10s"\n'
            f"allow_http = true\nallow_private = true\n", encoding="utf-8")
    (root / "publishers.toml").write_text(
        f'[[publisher]]\nid = "{PUBLISHER}"\nname = "Artfolio"\n', encoding="utf-8")
    return env


def percentiles(values: list[float]) -> dict[str, float]:
    """p50, p95, p99 and max of ``values`` (milliseconds in, milliseconds out)."""
    if not values:
        return {"p50": float("nan"), "p95": float("nan"), "p99": float("nan"),
                "max": float("nan"), "n": 0}
    qs = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": round(qs[49], 1), "p95": round(qs[94], 1), "p99": round(qs[98], 1),
            "max": round(max(values), 1), "n": len(values)}
