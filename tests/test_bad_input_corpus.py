"""The bad-input corpus (tests/corpus/bad, see its README): every bad declaration is
refused with a reason naming the field the manifest gives, and never with a
traceback or a 5xx —

- by :func:`notice_relay.validate.parse_declaration`, with the registry;
- by ``notice-relay validate``, run as a real process;
- by ``POST /v1/declarations`` of the API running on a real store and broker (4xx
  with the reasons; nothing is published);
- by a real worker on a real Kafka broker, with the whole corpus interleaved with
  valid declarations: every valid one reaches real webhook receivers, every bad one
  is on the rejected topic and in the audit trail with its reason, and the worker
  keeps running.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import json
import re
import subprocess
import sys
import time
import tomllib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from api_helpers import Harness, read_topic, running_api
from conftest import Env
from relay_helpers import eventually, make_decl, whsec

from notice_relay.audit.store import AuditStore
from notice_relay.errors import DeclarationInvalid
from notice_relay.keys import create_key
from notice_relay.receiver import Receiver
from notice_relay.topics import Topics, ensure_topics
from notice_relay.validate import MAX_BYTES, parse_declaration

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tests" / "corpus" / "bad"
MANIFEST = tomllib.loads((CORPUS / "manifest.toml").read_text(encoding="utf-8"))
PUBLISHERS = frozenset({"artfolio", "pixelboard"})
DEVELOPERS = frozenset({"acme-ai", "brushstroke-labs"})
_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


@dataclass(frozen=True)
class Entry:
    """One bad declaration: its name, its bytes, the field its rejection must name."""

    name: str
    raw: bytes
    field: str

    @property
    def generated(self) -> bool:
        """Built at test time rather than committed."""
        return self.name in MANIFEST["generated"]


def _valid_base(declaration_id: str) -> dict[str, Any]:
    return {
        "schema": "notice-relay/declaration/v1",
        "declaration_id": declaration_id,
        "publisher_id": "artfolio",
        "action": "opt_out",
        "declared_at": "2026-03-01T12:00:00+09:00",
        "artist": {"artist_id": f"artist-{declaration_id}", "display_name": "Mara Quill"},
        "works": [{"url": "https://www.artstation.com/artwork/Xk3Lm9"}],
        "uses": ["train-ai"],
        "targets": ["*"],
    }


@functools.cache
def generated_cases() -> dict[str, bytes]:
    """The corpus entries too large to commit (see the manifest's [generated] table)."""
    oversized = _valid_base("bad-oversized")
    head = json.dumps(oversized)[:-1] + ', "note": "'
    padding = MAX_BYTES + 1 - len(head) - len('"}')
    works = _valid_base("bad-works-10001-items")
    works["works"] = [{"url": f"https://www.artstation.com/artwork/w{i:05d}"}
                      for i in range(10_001)]
    return {
        "oversized_8_mib_plus_one.json": (head + "x" * padding + '"}').encode(),
        "works_10001_items.json": json.dumps(works).encode(),
        "document_deep_nesting_100000_arrays.json": b"[" * 100_000 + b"]" * 100_000,
        "document_deep_nesting_100000_objects.json":
            b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
    }


@functools.cache
def corpus() -> tuple[Entry, ...]:
    """Every committed file and every generated case, with its expected field."""
    entries = [Entry(name, (CORPUS / name).read_bytes(), fld)
               for name, fld in MANIFEST["files"].items()]
    built = generated_cases()
    entries += [Entry(name, built[name], fld) for name, fld in MANIFEST["generated"].items()]
    return tuple(entries)


ENTRIES = corpus()
IDS = [e.name for e in ENTRIES]


def _contact_email(raw: bytes) -> str | None:
    """The artist's contact email in a bad declaration, when it can be read."""
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if isinstance(doc, dict) and isinstance(doc.get("artist"), dict):
        email = doc["artist"].get("contact_email")
        return email if isinstance(email, str) and len(email) > 3 else None
    return None


# ------------------------------------------------------------------ the corpus itself


def test_manifest_names_every_file_and_nothing_else() -> None:
    """Each committed file has a manifest line and each line a file; at least 200
    cases; no two cases are the same bytes (each one tests something of its own)."""
    on_disk = {p.name for p in CORPUS.iterdir() if p.name != "manifest.toml"}
    assert on_disk == set(MANIFEST["files"])
    assert not set(MANIFEST["generated"]) & on_disk
    assert set(MANIFEST["generated"]) == set(generated_cases())
    assert len(ENTRIES) >= 200
    digests = {hashlib.sha256(e.raw).hexdigest() for e in ENTRIES}
    assert len(digests) == len(ENTRIES)
    assert len(generated_cases()["oversized_8_mib_plus_one.json"]) == MAX_BYTES + 1
    assert json.loads(generated_cases()["works_10001_items.json"])["works"][10_000]


def test_the_corpus_is_bad_only_in_its_one_way() -> None:
    """The base every committed JSON case was made from is valid: the cases are
    refused for their defect, not for something they all share."""
    doc = json.loads((CORPUS / "works_javascript_url.json").read_bytes())
    doc["works"][0]["url"] = "https://www.artstation.com/artwork/Xk3Lm9"
    decl = parse_declaration(json.dumps(doc).encode(), publishers=PUBLISHERS,
                             developers=DEVELOPERS)
    assert decl.artist.contact_email == "mara@example.invalid"
    doc = json.loads((CORPUS / "publisher_id_unknown.json").read_bytes())
    doc["publisher_id"] = "artfolio"
    parse_declaration(json.dumps(doc).encode(), publishers=PUBLISHERS, developers=DEVELOPERS)


# ---------------------------------------------------------------------- the parser


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_parse_declaration_refuses_naming_the_field(entry: Entry) -> None:
    """DeclarationInvalid (nothing else), a one-line reason that is not an internal
    error, the expected field among the named ones, every message non-empty, and the
    contact email never echoed."""
    with pytest.raises(DeclarationInvalid) as info:
        parse_declaration(entry.raw, publishers=PUBLISHERS, developers=DEVELOPERS)
    exc = info.value
    fields = [e.field for e in exc.errors]
    assert entry.field in fields, (exc.reason, fields)
    assert exc.reason
    assert "\n" not in exc.reason
    assert not exc.reason.startswith("could not be validated"), exc.reason
    assert all(e.message and "\n" not in e.message for e in exc.errors)
    email = _contact_email(entry.raw)
    if email is not None:
        shown = exc.reason + " ".join(e.message for e in exc.errors)
        assert email not in shown


# -------------------------------------------------------------------------- the CLI


def _cli_blocks(stderr: str) -> dict[str, str]:
    """``validate`` output split per input file: name -> its lines."""
    blocks: dict[str, str] = {}
    current = None
    for line in stderr.splitlines():
        match = re.match(r"^(\S.*?): invalid declaration: ", line)
        if match:
            current = Path(match.group(1)).name
            blocks[current] = line + "\n"
        elif current is not None:
            blocks[current] += line + "\n"
    return blocks


def test_cli_validate_refuses_the_whole_corpus(tmp_path: Path) -> None:
    """``notice-relay validate FILE…`` on every entry at once (the repository's own
    registry): exit 1, nothing on stdout, no traceback, and for each file a block
    naming its expected field."""
    generated = []
    for name, raw in generated_cases().items():
        (tmp_path / name).write_bytes(raw)
        generated.append(str(tmp_path / name))
    files = [str(CORPUS / name) for name in MANIFEST["files"]] + generated
    res = subprocess.run([sys.executable, "-m", "notice_relay", "validate", *files],
                         capture_output=True, cwd=ROOT, timeout=300, check=False,
                         env=_no_relay_env())
    err = res.stderr.decode()
    assert res.returncode == 1
    assert res.stdout == b""
    assert "Traceback" not in err
    blocks = _cli_blocks(err)
    assert set(blocks) == {e.name for e in ENTRIES}
    for e in ENTRIES:
        assert f"  - {e.field}: " in blocks[e.name], blocks[e.name]


@pytest.mark.parametrize("name", ["not_utf8_latin1_name.bin", "uses_rich_markup_closing_tag.json",
                                  "document_deep_nesting_arrays_300.json",
                                  "display_name_crlf_header_injection.json"])
def test_cli_validate_from_stdin(name: str) -> None:
    """A sample through standard input: the same refusal, no traceback."""
    entry = next(e for e in ENTRIES if e.name == name)
    res = subprocess.run([sys.executable, "-m", "notice_relay", "validate", "-"],
                         input=entry.raw, capture_output=True, cwd=ROOT, timeout=60,
                         check=False, env=_no_relay_env())
    assert res.returncode == 1
    assert b"Traceback" not in res.stderr
    assert f"  - {entry.field}: ".encode() in res.stderr


def _no_relay_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("NOTICE_RELAY_")}


# -------------------------------------------------------------------------- the API


@dataclass
class Api:
    """The API, and a publisher key per publisher id the corpus posts as."""

    h: Harness
    keys: dict[str, str] = field(default_factory=dict)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def api(kafka: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Api]:
    """One API for the whole corpus (a refused declaration changes nothing)."""
    env = Env(root=tmp_path_factory.mktemp("corpus-api"), bootstrap=kafka)
    async with running_api(env) as h:
        yield Api(h=h, keys={"artfolio": h.keys["publisher"]})


async def _key_for(api: Api, raw: bytes) -> str:
    """A key of the publisher the declaration claims to be (registered or not), so
    that the declaration itself, not the key, is what is judged."""
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        doc = None
    pid = doc.get("publisher_id") if isinstance(doc, dict) else None
    if not isinstance(pid, str) or not _ID.match(pid):
        pid = "artfolio"
    if pid not in api.keys:
        _, api.keys[pid] = await create_key(api.h.store, "publisher", pid)
    return api.keys[pid]


@pytest.mark.kafka
@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
async def test_api_answers_4xx_with_reasons(api: Api, entry: Entry) -> None:
    """POST /v1/declarations: a 4xx (never a 5xx) with the one error body; a 422
    names the expected field; only the oversized body is refused unread (413)."""
    key = await _key_for(api, entry.raw)
    res = await api.h.client.post("/v1/declarations", content=entry.raw, headers={
        "Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    assert 400 <= res.status_code < 500, (res.status_code, res.text[:500])
    body = res.json()
    assert set(body) == {"error", "reason", "errors"}
    assert body["reason"]
    if entry.name == "oversized_8_mib_plus_one.json":
        assert res.status_code == 413
        assert "too large" in body["reason"]
        return
    assert res.status_code == 422, body
    assert body["error"] == "invalid_declaration"
    assert entry.field in [e["field"] for e in body["errors"]], body
    email = _contact_email(entry.raw)
    if email is not None:
        assert email not in res.text


@pytest.mark.kafka
@pytest.mark.asyncio(loop_scope="module")
async def test_api_published_none_of_the_corpus(api: Api) -> None:
    """After the whole corpus was posted, the declarations topic is still empty."""
    assert await read_topic(api.h.env.bootstrap, api.h.topics.declarations, within=3) == []


# -------------------------------------------------------------- a real worker, Kafka


@pytest.mark.kafka
@pytest.mark.asyncio(loop_scope="module")
async def test_worker_relays_the_valid_and_rejects_the_corpus(
    relay_env: Env, worker_factory: Any
) -> None:
    """The corpus interleaved with 30 valid declarations, on a real broker to a real
    worker: every valid declaration reaches both real receivers (signatures verified
    by the reference library), every bad one is on the rejected topic with its reason
    naming the expected field and in its audit trail as declaration.rejected, and the
    worker is still running, with no traceback in its log. The 8 MiB case is left
    out: it is over the broker's message size limit, so it never reaches a worker."""
    receivers: dict[str, Receiver] = {}
    for dev in sorted(DEVELOPERS):
        secret = whsec()
        receivers[dev] = await Receiver(secret).start()
        relay_env.add_webhook_developer(dev, receivers[dev].url, secret,
                                        accepts=("train-ai", "train-genai"))
    relay_env.write_publishers(*sorted(PUBLISHERS))
    settings = relay_env.settings()
    topics = Topics.from_settings(settings)
    await ensure_topics(settings)
    worker = worker_factory()
    try:
        bad = [e for e in ENTRIES if e.name != "oversized_8_mib_plus_one.json"]
        valid = [make_decl(i, prefix="ok") for i in range(30)]
        # One valid declaration after every eleventh or so bad one.
        after = {j * len(bad) // len(valid): d for j, d in enumerate(valid)}
        messages: list[tuple[bytes, bytes]] = []
        for i, entry in enumerate(bad):
            messages.append((b"corpus", entry.raw))
            if i in after:
                d = after[i]
                messages.append((f"{d['publisher_id']}/{d['artist']['artist_id']}".encode(),
                                 json.dumps(d).encode()))
        assert len(messages) == len(bad) + 30
        producer = AIOKafkaProducer(bootstrap_servers=relay_env.bootstrap, acks="all",
                                    max_request_size=4 * 1024 * 1024)
        await producer.start()
        try:
            for key, value in messages:
                await producer.send_and_wait(topics.declarations, value, key=key)
        finally:
            await producer.stop()
        want = {d["declaration_id"] for d in valid}

        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if all({n["declaration_id"] for n in r.state.notices()} >= want
                   for r in receivers.values()):
                break
            assert worker.proc.poll() is None, f"worker died:\n{worker.output()[-20000:]}"
            await asyncio.sleep(0.25)
        for dev, r in receivers.items():
            got = [n["declaration_id"] for n in r.state.notices()]
            assert sorted(got) == sorted(want), f"{dev} got {sorted(got)}"
            assert all(x.verified for x in r.state.received)

        rejected = await _read_rejected(relay_env.bootstrap, topics.rejected, len(bad))
        by_raw = {base64.b64decode(r["raw_base64"]): r for r in rejected}
        assert len(rejected) == len(bad)
        store = await AuditStore.open(relay_env.database_url)
        try:
            for entry in bad:
                r = by_raw.get(entry.raw)
                assert r is not None, f"{entry.name} is not on the rejected topic"
                assert r["reason"]
                assert entry.field in [e["field"] for e in r["errors"]], (entry.name, r)
                digest = hashlib.sha256(entry.raw).hexdigest()

                async def audited(key: str = r["declaration_key"], digest: str = digest) -> bool:
                    return any(s.event.type.value == "declaration.rejected"
                               and s.event.data.get("sha256") == digest
                               for s in await store.trail(key))

                await eventually(audited, 30, f"{entry.name}: declaration.rejected audited")
            assert await store.verify() == []
        finally:
            await store.close()
        assert worker.proc.poll() is None, "the worker stopped"
        assert "Traceback" not in worker.output(), worker.output()[-5000:]
    finally:
        for r in receivers.values():
            await r.stop()


async def _read_rejected(bootstrap: str, topic: str, want: int) -> list[dict[str, Any]]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None,
                                auto_offset_reset="earliest", enable_auto_commit=False,
                                fetch_max_bytes=16 * 1024 * 1024,
                                max_partition_fetch_bytes=16 * 1024 * 1024)
    await consumer.start()
    found: list[dict[str, Any]] = []
    try:
        end = time.monotonic() + 90
        while len(found) < want and time.monotonic() < end:
            batch = await consumer.getmany(timeout_ms=500)
            for msgs in batch.values():
                found.extend(json.loads(m.value) for m in msgs)
    finally:
        await consumer.stop()
    return found
