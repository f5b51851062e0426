"""``notice-relay audit verify | export | rebuild``, run as real processes against SQLite
and a real PostgreSQL server; rebuild against a real Kafka broker and a real worker
process whose projector it must agree with."""

from __future__ import annotations

import asyncio
import csv
import hashlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from relay_helpers import eventually, make_decl, publish, whsec
from test_audit_store import trail

from notice_relay.audit.chain import event_hash
from notice_relay.audit.events import decode_audit, encode_audit
from notice_relay.audit.store import AuditStore, events
from notice_relay.canonical import canonical_json
from notice_relay.config import Settings
from notice_relay.models import AuditEvent
from notice_relay.receiver import Receiver
from notice_relay.topics import Topics, ensure_topics

pytest_plugins = ["pg"]


def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``notice-relay ARGS`` as its own process, with no NOTICE_RELAY_* from our
    environment unless given in ``env``."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("NOTICE_RELAY_")}
    return subprocess.run(
        [sys.executable, "-m", "notice_relay", *args], env={**base, **(env or {})}, cwd=cwd,
        capture_output=True, text=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL,
    )


async def cli(*args: str, cwd: Path,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """:func:`run_cli` off the event loop."""
    return await asyncio.to_thread(run_cli, *args, cwd=cwd, env=env)


KEYS = ("p/a", "p/b", "p/c")


@pytest.fixture
async def filled(database_url: str) -> str:
    """A store holding three declarations' trails (2, 3 and 1 deliveries); its URL."""
    store = await AuditStore.open(database_url)
    try:
        await store.append(trail("p/a") + trail("p/b", 3) + trail("p/c", 1))
    finally:
        await store.close()
    return database_url


async def test_verify_ok_on_a_clean_store(filled: str, tmp_path: Path) -> None:
    """A store nobody touched verifies: exit 0, OK with the counts, and the same as JSON."""
    r = await cli("audit", "verify", "--database-url", filled, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "OK: 3 declarations, 24 events" in r.stdout
    r = await cli("audit", "verify", "--database-url", filled, "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"ok": True, "declarations": 3, "events": 24, "problems": []}


async def test_verify_names_every_tampered_row(filled: str, tmp_path: Path) -> None:
    """Rows edited, deleted and swapped directly in the database: exit 1, and the table
    (and the JSON) names each declaration and sequence number with its problem."""
    store = await AuditStore.open(filled)
    try:
        k, s = events.c.declaration_key, events.c.seq
        async with store.engine.begin() as conn:
            await conn.execute(events.update().where((k == "p/a") & (s == 4))
                               .values(data='{"attempt":1,"status_code":500}'))
            await conn.execute(events.delete().where((k == "p/b") & (s == 6)))
            await conn.execute(events.update().where((k == "p/c") & (s == 2)).values(seq=-2))
            await conn.execute(events.update().where((k == "p/c") & (s == 3)).values(seq=2))
            await conn.execute(events.update().where((k == "p/c") & (s == -2)).values(seq=3))
    finally:
        await store.close()

    r = await cli("audit", "verify", "--database-url", filled, cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    rows = [[cell.strip() for cell in line.split("│")[1:-1]]
            for line in r.stdout.splitlines() if line.startswith("│")]
    named = {(row[0], int(row[1])) for row in rows}
    assert {("p/a", 4), ("p/b", 6), ("p/c", 2), ("p/c", 3)} <= named
    assert all(key in KEYS for key, _ in named)
    problems = {(r0, r1): r2 for r0, r1, r2 in rows}
    assert "altered" in problems[("p/a", "4")]
    assert "missing" in problems[("p/b", "6")]
    assert "FAILED" in r.stderr

    r = await cli("audit", "verify", "--database-url", filled, "--json", cwd=tmp_path)
    assert r.returncode == 1
    report = json.loads(r.stdout)
    assert report["ok"] is False
    assert {(p["declaration_key"], p["seq"]) for p in report["problems"]} == named


def _recomputed(record: dict[str, Any]) -> str:
    """A record's hash, recomputed from the export alone, as an auditor would."""
    body = {k: v for k, v in record.items() if k not in ("prev_hash", "hash")}
    return hashlib.sha256(record["prev_hash"].encode() + b"\n" + canonical_json(body)).hexdigest()


def _check_chains(records: list[dict[str, Any]]) -> None:
    by_key: dict[str, list[dict[str, Any]]] = {}
    for rec in records:
        by_key.setdefault(rec["declaration_key"], []).append(rec)
    assert set(by_key) == set(KEYS)
    for chain in by_key.values():
        assert [r["seq"] for r in chain] == list(range(1, len(chain) + 1))
        prev = "0" * 64
        for rec in chain:
            assert rec["prev_hash"] == prev
            assert _recomputed(rec) == rec["hash"]
            prev = rec["hash"]


async def test_export_jsonl_round_trip(filled: str, tmp_path: Path) -> None:
    """JSON Lines on standard output: one record per stored event, in chain order, each
    with seq, prev_hash and hash, and every hash recomputable from the record alone."""
    r = await cli("audit", "export", "--database-url", filled, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(records) == 24
    _check_chains(records)
    # The store's own event model reads every record back.
    for rec in records:
        body = {k: v for k, v in rec.items() if k not in ("seq", "prev_hash", "hash")}
        event = AuditEvent.model_validate(body, strict=False)
        assert event_hash(rec["prev_hash"], event, rec["seq"]) == rec["hash"]


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """The files beside ``path`` named like it, and its rows."""
    names = sorted(p.name for p in path.parent.iterdir() if p.name.startswith(path.stem))
    with path.open(encoding="utf-8", newline="") as fh:
        return names, list(csv.DictReader(fh))


async def test_export_csv_to_a_file_round_trip(filled: str, tmp_path: Path) -> None:
    """CSV written to a file: a header, one row per event, hashes present and
    recomputable once the flattened columns are put back together; no partial file is
    left beside it."""
    out = tmp_path / "trail.csv"
    r = await cli("audit", "export", "--format", "csv", "--output", str(out),
                  "--database-url", filled, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "exported 24 events" in r.stderr
    names, rows = _read_csv(out)
    assert names == ["trail.csv"]
    assert len(rows) == 24
    assert all(len(row["hash"]) == 64 and len(row["prev_hash"]) == 64 for row in rows)
    records = [{
        "event_id": row["event_id"], "declaration_key": row["declaration_key"],
        "type": row["type"], "occurred_at": row["occurred_at"],
        "actor": {"kind": row["actor_kind"], "id": row["actor_id"]},
        "delivery_id": row["delivery_id"] or None, "developer_id": row["developer_id"] or None,
        "data": json.loads(row["data"]), "seq": int(row["seq"]),
        "prev_hash": row["prev_hash"], "hash": row["hash"],
    } for row in rows]
    _check_chains(records)


async def test_rebuild_refuses_without_confirmation(filled: str, tmp_path: Path) -> None:
    """Without --yes and without a terminal to ask on, rebuild changes nothing (exit 2),
    after warning that running workers must be stopped first."""
    r = await cli("audit", "rebuild", "--database-url", filled, cwd=tmp_path)
    assert r.returncode == 2
    assert "must be stopped first" in " ".join(r.stderr.split())
    assert "--yes" in r.stderr
    r = await cli("audit", "verify", "--database-url", filled, "--json", cwd=tmp_path)
    assert json.loads(r.stdout)["events"] == 24


# ------------------------------------------------------------------------ rebuild


@pytest.fixture
async def receivers() -> AsyncIterator[list[Receiver]]:
    """Real receivers, stopped at the end of the test."""
    started: list[Receiver] = []
    yield started
    for r in started:
        await r.stop()


async def _topic_size(env: Any) -> int:
    """How many audit events the test's audit topic holds (a message holds one event or
    an array of one declaration's events)."""
    topic = Topics.from_settings(env.settings()).audit
    consumer = AIOKafkaConsumer(bootstrap_servers=env.bootstrap, group_id=None,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    try:
        cluster = await consumer._client.fetch_all_metadata()
        tps = [TopicPartition(topic, p) for p in cluster.partitions_for_topic(topic) or ()]
        assert tps, f"no topic {topic}"
        consumer.assign(tps)
        end = await consumer.end_offsets(tps)
        await consumer.seek_to_beginning(*tps)
        n = 0
        while [tp for tp in tps if await consumer.position(tp) < end[tp]]:
            for records in (await consumer.getmany(timeout_ms=1000)).values():
                n += sum(len(decode_audit(r.value or b"")) for r in records
                         if r.offset < end[TopicPartition(r.topic, r.partition)])
        return n
    finally:
        await consumer.stop()


async def _snapshot(url: str) -> tuple[dict[str, tuple[int, str]], int, dict[str, str], list[Any]]:
    """Chain heads, event count, delivery states and verify problems of a store."""
    store = await AuditStore.open(url)
    try:
        report = await store.verify_report()
        states = {d.delivery_id: d.state for d in await store.all_deliveries()}
        return await store.chain_heads(), report.events, states, report.problems
    finally:
        await store.close()


@pytest.mark.kafka
@pytest.mark.parametrize(("live", "rebuilt"), [("sqlite", "postgresql"), ("postgresql", "sqlite")])
async def test_rebuild_reaches_the_live_projectors_chain_heads(
    live: str, rebuilt: str, relay_env: Any, worker_factory: Any, receivers: list[Receiver],
    pg_database: Callable[[], str], tmp_path: Path,
) -> None:
    """A real worker projects the trails of a few declarations (delivered to two real
    receivers, one malformed declaration rejected) into its store; `audit rebuild`
    refuses to empty that store while the worker runs, then, with the worker stopped,
    rebuilds the audit topic into a fresh database of the other backend: every chain
    head, event and delivery state is the same, and the rebuilt store verifies; rebuilt
    in place, the worker's own store ends up as it was."""
    for dev in ("acme-ai", "brushstroke-labs"):
        secret = whsec()
        receivers.append(await Receiver(secret).start())
        relay_env.add_webhook_developer(dev, receivers[-1].url, secret)
    relay_env.write_publishers("artfolio")
    live_url = pg_database() if live == "postgresql" else relay_env.database_url
    relay_env.secrets["NOTICE_RELAY_DATABASE_URL"] = live_url
    worker = worker_factory()
    await publish(relay_env, [*(make_decl(i) for i in range(6)), b"{not json"])

    async def settled() -> bool:
        _, _, states, _ = await _snapshot(live_url)
        return len(states) == 12 and set(states.values()) <= {"delivered", "acknowledged"}

    await eventually(settled, 90, "12 deliveries delivered", worker=worker)

    async def projected() -> bool:
        _, n, _, _ = await _snapshot(live_url)
        return n == await _topic_size(relay_env)

    await eventually(projected, 30, "every audit message projected", worker=worker)

    r = await cli("audit", "rebuild", "--yes", cwd=relay_env.root, env=relay_env.environ())
    assert r.returncode == 2, r.stdout + r.stderr
    assert "worker(s) of consumer group" in " ".join(r.stderr.split())

    worker.stop()
    heads, n_events, states, problems = await _snapshot(live_url)
    assert problems == []
    assert n_events == await _topic_size(relay_env)

    target = (pg_database() if rebuilt == "postgresql"
              else f"sqlite+aiosqlite:///{tmp_path / 'rebuilt.db'}")
    r = await cli("audit", "rebuild", "--yes", "--json", "--database-url", target,
                  cwd=relay_env.root, env=relay_env.environ())
    assert r.returncode == 0, r.stdout + r.stderr
    result = json.loads(r.stdout)
    assert result["events"] == n_events
    assert result["stored"] == n_events
    assert result["chain_heads"] == len(heads)
    assert result["unreadable"] == 0

    rebuilt_heads, rebuilt_events, rebuilt_states, rebuilt_problems = await _snapshot(target)
    assert rebuilt_heads == heads
    assert rebuilt_events == n_events
    assert rebuilt_states == states
    assert rebuilt_problems == []
    assert any(k.startswith("_unparseable/") for k in heads)  # the rejected one has a trail

    # And in place: the worker's own store, emptied and refilled now that it is stopped.
    r = await cli("audit", "rebuild", "--yes", cwd=relay_env.root, env=relay_env.environ())
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{len(heads)} chain heads" in r.stdout
    assert await _snapshot(live_url) == (heads, n_events, states, [])


def _kafka_env(bootstrap: str, prefix: str) -> dict[str, str]:
    return {"KAFKA_BOOTSTRAP_SERVERS": bootstrap, "NOTICE_RELAY_TOPIC_PREFIX": prefix,
            "NOTICE_RELAY_APP_ID": f"nr-test-{uuid.uuid4().hex[:10]}"}


@pytest.mark.kafka
async def test_rebuild_skips_duplicates_and_unreadable_messages(
    kafka: str, database_factory: Callable[[], str], tmp_path: Path,
) -> None:
    """Rebuilt from a topic holding 14 declarations' trails spread over its partitions,
    half of them one message per event and half one message per trail (an array), with
    some events sent twice (at-least-once), one message that is no event and one array
    mixing two declarations: every event is stored once, the bad messages are counted
    and skipped, and the chains are those of appending the events in order."""
    prefix = f"t{uuid.uuid4().hex[:10]}."
    settings = Settings(kafka_bootstrap=kafka, topic_prefix=prefix, partitions=4)
    await ensure_topics(settings)
    evs = [e for i in range(14) for e in trail(f"p/r{i:02d}", 1 + i % 3)]
    producer = AIOKafkaProducer(bootstrap_servers=kafka, acks="all")
    await producer.start()
    try:
        topic = Topics.from_settings(settings).audit
        messages = []
        for i in range(14):
            mine = [e for e in evs if e.declaration_key == f"p/r{i:02d}"]
            if i % 2:
                messages += encode_audit(mine)
            else:
                messages += [(e.declaration_key.encode(), e.model_dump_json().encode())
                             for e in mine]
        messages += [(e.declaration_key.encode(), e.model_dump_json().encode())
                     for e in evs[:5]]
        messages.append((b"p/r00", b"not an audit event"))
        mixed = [evs[0], next(e for e in evs if e.declaration_key == "p/r01")]
        messages.append((b"p/r00", b"[" + b",".join(e.model_dump_json().encode()
                                                     for e in mixed) + b"]"))
        for key, value in messages:
            await producer.send_and_wait(topic, value, key=key)
    finally:
        await producer.stop()
    reference = await AuditStore.open(database_factory())
    try:
        await reference.append(evs)
        heads = await reference.chain_heads()
    finally:
        await reference.close()

    target = database_factory()
    r = await cli("audit", "rebuild", "--yes", "--json", "--batch", "7", "--database-url", target,
                  cwd=tmp_path, env=_kafka_env(kafka, prefix))
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout) == {
        "topic": f"{prefix}audit", "partitions": 4, "messages": len(messages),
        "events": len(evs) + 5,
        "stored": len(evs), "unreadable": 2, "chain_heads": 14,
    }
    rebuilt, n, _, problems = await _snapshot(target)
    assert (rebuilt, n, problems) == (heads, len(evs), [])


@pytest.mark.kafka
async def test_rebuild_without_the_topic_changes_nothing(filled: str, kafka: str,
                                                         tmp_path: Path) -> None:
    """A prefix under which there is no audit topic is an error (exit 2) found before
    the store is emptied."""
    r = await cli("audit", "rebuild", "--yes", "--database-url", filled, cwd=tmp_path,
                  env=_kafka_env(kafka, f"missing{uuid.uuid4().hex[:8]}."))
    assert r.returncode == 2
    assert "there is no topic" in r.stderr
    r = await cli("audit", "verify", "--database-url", filled, "--json", cwd=tmp_path)
    assert json.loads(r.stdout)["events"] == 24
