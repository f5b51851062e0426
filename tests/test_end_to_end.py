"""End to end, against real servers: a real Kafka broker, a real worker process and
three real HTTP receivers on 127.0.0.1 that verify every signature with the
Standard Webhooks reference library."""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from notice_relay.audit.store import AuditStore
from notice_relay.receiver import Receiver
from notice_relay.topics import Topics, ensure_topics

pytestmark = pytest.mark.kafka

DEVELOPERS = {
    "acme-ai": ("train-ai", "train-genai"),
    "brushstroke-labs": ("train-genai", "ai-inference", "prompt-name"),
    "canvas-research": ("data-mining",),
}
USE_SETS = [["train-ai"], ["data-mining"], ["ai-inference", "prompt-name"], ["train-genai"],
            ["data-mining", "train-ai"], ["prompt-name"]]
TARGET_SETS = [["*"], ["acme-ai"], ["brushstroke-labs", "canvas-research"], ["*"],
               ["canvas-research"], ["acme-ai", "brushstroke-labs"], ["*"]]


def whsec() -> str:
    """A fresh Standard Webhooks secret."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def declaration(i: int) -> dict[str, Any]:
    """A valid declaration, its uses and targets varied by ``i``."""
    return {
        "schema": "notice-relay/declaration/v1",
        "declaration_id": f"decl-{i:03d}",
        "publisher_id": "artfolio" if i % 2 else "pixelboard",
        "action": "opt_out",
        "declared_at": (datetime.now(UTC) - timedelta(minutes=i)).isoformat(),
        "artist": {
            "artist_id": f"artist-{i}",
            "display_name": f"Artist Number {i}",
            "aliases": [f"@artist{i}"],
            "profiles": [f"https://www.pixiv.net/en/users/{1000 + i}"],
            "contact_email": f"artist{i}@example.invalid",
        },
        "works": [{"url": f"https://www.pixiv.net/en/artworks/{5000 + i}?utm_source=x",
                   "title": f"Work {i}"}],
        "all_works": i % 5 == 0,
        "uses": USE_SETS[i % len(USE_SETS)],
        "targets": TARGET_SETS[i % len(TARGET_SETS)],
    }


def expected_developers(decl: dict[str, Any]) -> set[str]:
    """Who must receive ``decl``, computed independently of the relay's code."""
    uses = set(decl["uses"])
    if "train-ai" in uses:
        uses.add("train-genai")  # train-ai implies train-genai
    targets = set(DEVELOPERS) if decl["targets"] == ["*"] else set(decl["targets"])
    return {d for d in targets if uses & set(DEVELOPERS[d])}


def malformed() -> list[tuple[bytes, str | None]]:
    """Bad declarations, each with the field its rejection must name (None: whole input)."""
    good = declaration(999)

    def variant(**changes: Any) -> bytes:
        d = json.loads(json.dumps(good))
        for k, v in changes.items():
            if v is ...:
                d.pop(k)
            else:
                d[k] = v
        return json.dumps(d).encode()

    return [
        (b"this is not json", None),
        (b"\xff\xfe\x00garbage", None),
        (b"[" * 5000 + b"]" * 5000, None),
        (b"", None),
        (variant(all_work=True), "all_work"),
        (variant(publisher_id="no-such-publisher"), "publisher_id"),
        (variant(targets=["no-such-developer"]), "targets.0"),
        (variant(uses=[]), "uses"),
        (variant(declared_at=(datetime.now(UTC) + timedelta(days=2)).isoformat()), "declared_at"),
        (variant(action="withdraw"), "supersedes"),
        (variant(works=[{"url": "javascript:alert(1)"}], all_works=False), "works.0.url"),
        (variant(schema="notice-relay/declaration/v9"), "schema"),
    ]


async def test_fifty_declarations_reach_exactly_their_receivers(
    relay_env: Any, worker_factory: Any
) -> None:
    """50 declarations for various targets, malformed ones mixed in: each receiver gets
    exactly the notices meant for it, every signature verifies, every malformed one
    is in the rejected topic with a reason naming the field, a repeated declaration id
    is not relayed twice, and the audit store shows each delivery delivered with its
    trail."""
    receivers: dict[str, Receiver] = {}
    for dev in DEVELOPERS:
        secret = whsec()
        receivers[dev] = await Receiver(secret).start()
        relay_env.add_webhook_developer(dev, receivers[dev].url, secret, accepts=DEVELOPERS[dev])
    relay_env.write_publishers("artfolio", "pixelboard")
    settings = relay_env.settings()
    topics = Topics.from_settings(settings)
    await ensure_topics(settings)
    worker = worker_factory()

    decls = [declaration(i) for i in range(50)]
    bad = malformed()
    producer = AIOKafkaProducer(bootstrap_servers=relay_env.bootstrap, acks="all",
                                max_request_size=16 * 1024 * 1024)
    await producer.start()
    try:
        for i, d in enumerate(decls):
            key = f"{d['publisher_id']}/{d['artist']['artist_id']}".encode()
            await producer.send_and_wait(topics.declarations, json.dumps(d).encode(), key=key)
            if i % 4 == 0 and i // 4 < len(bad):
                await producer.send_and_wait(topics.declarations, bad[i // 4][0], key=b"bad")
        # The same declaration again: must not be relayed twice.
        d0 = decls[0]
        await producer.send_and_wait(
            topics.declarations, json.dumps(d0).encode(),
            key=f"{d0['publisher_id']}/{d0['artist']['artist_id']}".encode())
    finally:
        await producer.stop()

    expected = {dev: {d["declaration_id"] for d in decls if dev in expected_developers(d)}
                for dev in DEVELOPERS}
    total = sum(len(v) for v in expected.values())
    assert total > 50  # the mix really fans out

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        got = sum(len(r.state.notices()) for r in receivers.values())
        if got >= total:
            break
        assert worker.proc.poll() is None, f"worker died:\n{worker.output()[-30000:]}"
        await asyncio.sleep(0.25)
    await asyncio.sleep(2)  # anything extra that was going to arrive, arrives

    for dev, r in receivers.items():
        assert all(x.verified for x in r.state.received), f"{dev}: a signature did not verify"
        got_ids = [n["declaration_id"] for n in r.state.notices()]
        assert sorted(got_ids) == sorted(expected[dev]), f"{dev} got the wrong notices"
        for x in r.state.received:
            assert x.notice is not None
            assert x.webhook_id.startswith("dlv_")
            assert "contact_email" not in json.dumps(x.notice)
            assert x.notice["schema"] == "notice-relay/notice/v1"

    # Normalization really happened on the way.
    sample = receivers["acme-ai"].state.notices()[0]
    assert all("utm_" not in w["url"] and "/en/" not in w["url"] for w in sample["works"])

    # Every malformed declaration is in the rejected topic, with its reason.
    consumer = AIOKafkaConsumer(topics.rejected, bootstrap_servers=relay_env.bootstrap,
                                auto_offset_reset="earliest", enable_auto_commit=False,
                                group_id=None)
    await consumer.start()
    rejected: list[dict[str, Any]] = []
    try:
        end = time.monotonic() + 30
        while len(rejected) < len(bad) and time.monotonic() < end:
            batch = await consumer.getmany(timeout_ms=500)
            for msgs in batch.values():
                rejected.extend(json.loads(m.value) for m in msgs)
    finally:
        await consumer.stop()
    assert len(rejected) == len(bad)
    by_raw = {base64.b64decode(r["raw_base64"]): r for r in rejected}
    for raw, field in bad:
        r = by_raw[raw]
        assert r["reason"]
        if field is not None:
            assert field in [e["field"] for e in r["errors"]], (field, r["errors"])

    # The audit store catches up: every delivery delivered, with its trail.
    store = await AuditStore.open(relay_env.database_url)
    try:
        end = time.monotonic() + 60
        while time.monotonic() < end:
            done = await store.count_deliveries(state="delivered") + \
                await store.count_deliveries(state="acknowledged")
            if done >= total:
                break
            await asyncio.sleep(0.5)
        rows = await store.all_deliveries()
        # The reference receiver answers with a receipt: that acknowledges the notice.
        delivered = [r for r in rows if r.state == "acknowledged" and r.delivered_at]
        assert len(delivered) == total, {r.state for r in rows}
        assert await store.verify() == []
    finally:
        await store.close()

    for d in decls[:6]:
        res = relay_env.cli("status", d["declaration_id"], "--json")
        assert res.returncode == 0, res.stderr.decode()
        [st] = json.loads(res.stdout)["declarations"]
        assert st["status"] == "relayed"
        devs = expected_developers(d)
        states = {
            x["developer_id"]: x["state"] for x in st["deliveries"] if x["state"] != "skipped"
        }
        assert states == dict.fromkeys(devs, "acknowledged")
        types = [e["type"] for e in st["trail"]]
        assert types[:2] == ["declaration.received", "declaration.normalized"]
        assert types.count("delivery.delivered") == len(devs)
        assert types.count("delivery.acknowledged") == len(devs)
        assert [e["seq"] for e in st["trail"]] == list(range(1, len(types) + 1))
    # The repeated declaration's trail records the duplicate.
    res = relay_env.cli("status", "decl-000", "--json")
    types = [e["type"] for e in json.loads(res.stdout)["declarations"][0]["trail"]]
    assert "declaration.duplicate" in types

    # Human-readable status renders too.
    res = relay_env.cli("status", "decl-000")
    assert res.returncode == 0
    assert b"delivered" in res.stdout

    for r in receivers.values():
        await r.stop()
