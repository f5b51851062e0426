"""Fault injection for notice-relay: the machinery shared by the fault suite
(``scripts/faults.py``, ``make faults``), the soak run (``scripts/soak.py``, ``make soak``)
and the shorter suite in ``tests/test_faults.py``.

Everything is real: a KRaft Kafka broker (``scripts/localkafka.py``), ``notice-relay
worker`` processes (killed with SIGKILL where a scenario says so), PostgreSQL
(``scripts/localpg.py``) for the scenario that stops the audit store, webhook receivers
(``notice_relay.receiver``, aiohttp on 127.0.0.1) and an SMTP server (aiosmtpd with
STARTTLS and AUTH, from ``tests/smtp_server.py``).

A scenario runs under steady load: declarations are published continuously at a modest
rate to a relay with several webhook developers and one email developer, a fault is
injected while the load runs, then the load stops and the run waits until every notice
has arrived and every trail is complete (or a deadline passes). It reports what was
published, how many notices were expected and delivered, duplicates (the same
``webhook-id`` / delivery id received more than once), losses, and whether every
declaration's audit trail is complete and every hash chain verifies (with ``notice-relay
audit verify``).

A supervisor restarts any worker that exits on its own, as a process manager would; such
exits are counted and reported (a healthy run has none).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email
import email.policy
import json
import os
import random
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

ROOT = Path(__file__).resolve().parent.parent
for _p in (ROOT / "scripts", ROOT / "tests"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import localkafka  # noqa: E402
import localpg  # noqa: E402

if TYPE_CHECKING:
    from notice_relay.config import Settings
    from notice_relay.receiver import Receiver

__all__ = [
    "DEVELOPERS",
    "EMAIL_DEVELOPER",
    "FAST_SETTINGS",
    "SCENARIOS",
    "FlakySmtp",
    "Harness",
    "Load",
    "Relay",
    "Result",
    "ScenarioParams",
    "Worker",
    "format_table",
    "quiet_kafka_logs",
    "run_scenario",
]

PUBLISHER = "artfolio"
#: The webhook developers of every scenario (each with its own receiver).
DEVELOPERS = ("acme-ai", "brushstroke-labs", "canvas-research")
#: The email developer (notices go through the SMTP server).
EMAIL_DEVELOPER = "inbox-ai"
_DELIVERY_ID = re.compile(r"dlv_[0-9a-f]{32}")

#: Settings every fault scenario's workers run with: short waits, so that a fault and
#: its repair fit in a few minutes (the production defaults are minutes to hours).
RETRY_SCHEDULE = "1s,2s,4s,8s,8s,8s,8s,8s,8s,8s,8s,8s,8s,8s,8s,8s,8s,8s,8s,8s"
FAST_SETTINGS = {
    "NOTICE_RELAY_RETRY_SCHEDULE": RETRY_SCHEDULE,
    "NOTICE_RELAY_SLOW_DOWN_FLOOR": "2s",
    "NOTICE_RELAY_SESSION_TIMEOUT": "6s",
    "NOTICE_RELAY_BREAKER_COOLDOWN": "2s",
    "NOTICE_RELAY_HOLD_RECHECK": "1s",
    "NOTICE_RELAY_SWEEP_AFTER": "20s",
}


def quiet_kafka_logs() -> None:
    """Keep the Kafka clients' reconnect chatter (expected during outages) off stderr."""
    import logging

    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)


def run(main: Callable[[], Awaitable[int]]) -> int:
    """``asyncio.run(main())``, where SIGTERM ends the run as Ctrl-C does: the main task
    is cancelled, so its ``finally`` blocks stop the broker, the workers and the servers
    instead of leaving them running. Returns 130 or 143 when interrupted."""

    async def guarded() -> int:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        try:
            return await main()
        except asyncio.CancelledError:
            log("interrupted: the run's processes are stopped")
            return 143

    try:
        return asyncio.run(guarded())
    except KeyboardInterrupt:  # SIGINT: the same cancellation, reported by asyncio.run
        return 130


def log(msg: str) -> None:
    """A timestamped progress line on stderr."""
    sys.stderr.write(f"[{datetime.now(UTC):%H:%M:%S}] {msg}\n")
    sys.stderr.flush()


def whsec() -> str:
    """A fresh Standard Webhooks secret."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def expected_delivery_id(declaration_id: str, developer: str, channel: str) -> str:
    """The delivery id (the ``webhook-id``) the relay gives a declaration's notice to a
    developer's channel: stable, so it is known before the relay runs."""
    from notice_relay.fanout import delivery_id
    from notice_relay.normalize import notice_id

    return delivery_id(notice_id(PUBLISHER, declaration_id), developer, channel)


# --------------------------------------------------------------------------- relay


@dataclass
class Relay:
    """One scenario's corner of the relay: topic prefix, consumer group, audit store,
    connectors and publisher registry, under ``root``."""

    root: Path
    bootstrap: str
    database_url: str = ""
    prefix: str = field(default_factory=lambda: f"f{uuid.uuid4().hex[:10]}.")
    app_id: str = field(default_factory=lambda: f"nr-faults-{uuid.uuid4().hex[:10]}")
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.connectors.mkdir(parents=True, exist_ok=True)
        if not self.database_url:
            self.database_url = f"sqlite+aiosqlite:///{self.root / 'audit.db'}"
        self.publishers.write_text(
            f'[[publisher]]\nid = "{PUBLISHER}"\nname = "{PUBLISHER}"\n', encoding="utf-8")

    @property
    def connectors(self) -> Path:
        """The connectors directory."""
        return self.root / "connectors"

    @property
    def publishers(self) -> Path:
        """The publisher registry."""
        return self.root / "publishers.toml"

    def environ(self) -> dict[str, str]:
        """The environment of this relay's worker and CLI processes."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("NOTICE_RELAY_")}
        env.update({
            "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap,
            "NOTICE_RELAY_TOPIC_PREFIX": self.prefix,
            "NOTICE_RELAY_APP_ID": self.app_id,
            "NOTICE_RELAY_DATABASE_URL": self.database_url,
            "NOTICE_RELAY_CONNECTORS": str(self.connectors),
            "NOTICE_RELAY_PUBLISHERS": str(self.publishers),
            "NOTICE_RELAY_DATA_DIR": str(self.root / "faust"),
            "NOTICE_RELAY_PARTITIONS": "4",
            "NOTICE_RELAY_LOG_FORMAT": "json",
        })
        env.update(self.env)
        return env

    def settings(self) -> Settings:
        """Settings equal to what this relay's processes read."""
        from notice_relay.config import Settings

        return Settings(
            kafka_bootstrap=self.bootstrap, topic_prefix=self.prefix, app_id=self.app_id,
            database_url=self.database_url, connectors_dir=self.connectors,
            publishers_file=self.publishers, data_dir=self.root / "faust", partitions=4,
        )

    def add_webhook_developer(self, dev: str, url: str, secret: str) -> None:
        """Register a developer reached by a signed webhook at ``url``."""
        var = "WHSEC_" + dev.upper().replace("-", "_")
        self.env[var] = secret
        (self.connectors / f"{dev}.toml").write_text(
            f'id = "{dev}"\nname = "{dev}"\naccepts = ["train-ai", "train-genai"]\n'
            f'ack_sla = "30d"\n\n[[channel]]\ntype = "webhook"\nurl = "{url}"\n'
            f'secret_env = "{var}"\ntimeout = "5s"\nallow_http = true\nallow_private = true\n',
            encoding="utf-8")

    def add_email_developer(self, dev: str) -> None:
        """Register a developer reached by email (each notice sent at once)."""
        (self.connectors / f"{dev}.toml").write_text(
            f'id = "{dev}"\nname = "{dev}"\naccepts = ["train-ai", "train-genai"]\n'
            f'ack_sla = "30d"\n\n[[channel]]\ntype = "email"\n'
            f'to = ["optout@{dev}.example.invalid"]\ndigest = "0"\n', encoding="utf-8")

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[bytes]:
        """Run ``notice-relay ARGS`` as its own process."""
        return subprocess.run(
            [sys.executable, "-m", "notice_relay", *args], env=self.environ(), cwd=self.root,
            capture_output=True, timeout=timeout, check=False)


class Worker:
    """A real ``notice-relay worker`` process of a relay."""

    def __init__(self, relay: Relay, name: str = "worker") -> None:
        self.relay = relay
        self.name = name
        self.log = relay.root / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.kills = 0
        #: Exit codes of exits nobody asked for (the supervisor restarted the worker).
        self.crashes: list[int] = []
        self.wanted = False

    @property
    def pid(self) -> int | None:
        """The running process's id."""
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def start(self) -> Worker:
        """Start the process (it creates its topics first)."""
        level = os.environ.get("NOTICE_RELAY_TEST_WORKER_LOGLEVEL", "warning")
        with self.log.open("ab") as fh:
            fh.write(f"--- start {self.starts + 1} at {datetime.now(UTC).isoformat()}\n".encode())
            fh.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "notice_relay", "worker", "--loglevel", level],
                env=self.relay.environ(), cwd=self.relay.root, stdout=fh,
                stderr=subprocess.STDOUT, start_new_session=True)
        self.starts += 1
        self.wanted = True
        return self

    def kill(self) -> None:
        """SIGKILL: no chance to commit or flush anything."""
        self.wanted = False
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
            self.kills += 1
            with self.log.open("ab") as fh:
                fh.write(f"--- SIGKILL at {datetime.now(UTC).isoformat()}\n".encode())

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 20 s."""
        self.wanted = False
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def check(self) -> None:
        """Restart the worker if it exited without being asked to (a crash)."""
        if self.wanted and self.proc is not None and self.proc.poll() is not None:
            code = self.proc.returncode
            self.crashes.append(code)
            log(f"  worker {self.name} exited by itself (code {code}); restarting it")
            self.start()

    def output(self) -> str:
        """What the worker logged."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""


# --------------------------------------------------------------------------- developers


class FlakySmtp:
    """The email developer's mail server: aiosmtpd (STARTTLS, then AUTH) that can be
    told to answer every DATA command with 421/451 for a while."""

    def __init__(self, ca_file: Path) -> None:
        from smtp_server import SmtpHandler

        from notice_relay.channels.email_render import DELIVERY_IDS_HEADER

        outer = self

        class Handler(SmtpHandler):
            async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
                replies = outer.outage
                if replies:
                    outer.refused += 1
                    return replies[outer.refused % len(replies)]
                reply = await super().handle_DATA(server, session, envelope)
                if reply.startswith("250"):
                    msg = email.message_from_bytes(envelope.original_content or b"",
                                                   policy=email.policy.default)
                    ids = _DELIVERY_ID.findall(str(msg.get(DELIVERY_IDS_HEADER, "")))
                    outer.accepted.append((time.time(), ids))
                return reply

        self.handler = Handler(require_auth=True)
        self.ca_file = ca_file
        self.outage: list[str] = []
        self.refused = 0
        #: (time, delivery ids) of every message the server accepted.
        self.accepted: list[tuple[float, list[str]]] = []
        self._controller: Any = None
        self.port = 0

    def start(self) -> FlakySmtp:
        """Listen on a free port of 127.0.0.1."""
        from smtp_server import _authenticate, _Controller, _server_context

        self._controller = _Controller(
            self.handler, hostname="127.0.0.1", port=0, server_hostname="smtp.test.invalid",
            ready_timeout=10.0, authenticator=_authenticate, tls_context=_server_context(),
            require_starttls=True, auth_required=True, auth_require_tls=True)
        self._controller.start()
        self.port = self._controller.port
        return self

    def stop(self) -> None:
        """Stop listening."""
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def environ(self) -> dict[str, str]:
        """The ``NOTICE_RELAY_SMTP_*`` variables for a worker."""
        from smtp_server import TEST_FROM, TEST_PASSWORD, TEST_USERNAME

        return {
            "NOTICE_RELAY_SMTP_HOST": "127.0.0.1",
            "NOTICE_RELAY_SMTP_PORT": str(self.port),
            "NOTICE_RELAY_SMTP_TLS": "starttls",
            "NOTICE_RELAY_SMTP_FROM": TEST_FROM,
            "NOTICE_RELAY_SMTP_CA_FILE": str(self.ca_file),
            "NOTICE_RELAY_SMTP_HELO_NAME": "relay.example.invalid",
            "NOTICE_RELAY_SMTP_USERNAME": TEST_USERNAME,
            "NOTICE_RELAY_SMTP_PASSWORD": TEST_PASSWORD,
        }


def smtp_ca_file(where: Path) -> Path:
    """The test CA's certificate (PEM), written under ``where``."""
    from smtp_server import _ca

    path = where / "smtp-test-ca.pem"
    # Always written: a file left by an earlier run holds another CA.
    _ca().cert_pem.write_to_path(str(path))
    return path


@dataclass
class Tally:
    """What the developers received, against what was expected."""

    expected: int = 0
    delivered: int = 0
    duplicates: int = 0
    #: A notice received under another id than its delivery's (must be 0).
    id_mismatches: int = 0
    unexpected: int = 0
    requests: int = 0
    lost_ids: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    duplicates_by_developer: dict[str, int] = field(default_factory=dict)


class Developers:
    """The webhook receivers and the SMTP server of a scenario."""

    def __init__(self, relay: Relay, ca_file: Path) -> None:
        self.relay = relay
        self.receivers: dict[str, Receiver] = {}
        self.smtp = FlakySmtp(ca_file)
        self._received_ids: set[str] = set()
        self._read_upto: dict[str, int] = {}

    async def start(self) -> Developers:
        """Start every server and write the connectors."""
        from notice_relay.receiver import Receiver

        for dev in DEVELOPERS:
            secret = whsec()
            r = await Receiver(secret, record=self.relay.root / f"received-{dev}.jsonl").start()
            self.receivers[dev] = r
            self.relay.add_webhook_developer(dev, r.url, secret)
        await asyncio.to_thread(self.smtp.start)
        self.relay.add_email_developer(EMAIL_DEVELOPER)
        self.relay.env.update(self.smtp.environ())
        return self

    async def stop(self) -> None:
        """Stop every server; what the SMTP server accepted goes to smtp-accepted.jsonl."""
        for r in self.receivers.values():
            await r.stop()
        await asyncio.to_thread(self.smtp.stop)
        with (self.relay.root / "smtp-accepted.jsonl").open("w") as fh:
            for at, ids in self.smtp.accepted:
                fh.write(json.dumps({"received_at": at, "delivery_ids": ids}) + "\n")

    def expected(self, declaration_ids: list[str]) -> dict[str, tuple[str, str]]:
        """delivery id → (declaration id, developer) for every notice expected."""
        out = {}
        for d in declaration_ids:
            for dev in DEVELOPERS:
                out[expected_delivery_id(d, dev, "webhook")] = (d, dev)
            out[expected_delivery_id(d, EMAIL_DEVELOPER, "email")] = (d, EMAIL_DEVELOPER)
        return out

    def delivered_so_far(self) -> int:
        """Distinct delivery ids received so far (verified 2xx requests, accepted mails),
        counted from where the last call stopped. A long run samples this every few
        seconds: :meth:`tally` reads everything received and hashes every id, which at
        100,000 notices blocks the event loop the load publishes from for over a second
        (the soak's load fell from 10 to 7.7 declarations/s that way)."""
        for dev, r in self.receivers.items():
            records = r.state.received
            start = self._read_upto.get(dev, 0)
            for rec in records[start:]:
                if rec.status == 200 and rec.verified:
                    self._received_ids.add(rec.webhook_id)
            self._read_upto[dev] = len(records)
        start = self._read_upto.get("", 0)
        for _, ids in self.smtp.accepted[start:]:
            self._received_ids.update(ids)
        self._read_upto[""] = len(self.smtp.accepted)
        return len(self._received_ids)

    def tally(self, published: dict[str, float]) -> Tally:
        """Count what arrived, for the declarations in ``published`` (id → time)."""
        expected = self.expected(list(published))
        t = Tally(expected=len(expected))
        first: dict[str, float] = {}
        counts: Counter[str] = Counter()
        for dev, r in self.receivers.items():
            for rec in list(r.state.received):
                t.requests += 1
                if rec.status != 200 or not rec.verified:
                    continue
                wid = rec.webhook_id
                counts[wid] += 1
                first.setdefault(wid, rec.received_at)
                decl = (rec.notice or {}).get("declaration_id")
                if not isinstance(decl, str) or wid != expected_delivery_id(decl, dev, "webhook"):
                    t.id_mismatches += 1
        for at, ids in list(self.smtp.accepted):
            t.requests += 1
            for wid in ids:
                counts[wid] += 1
                first.setdefault(wid, at)
        for wid, n in counts.items():
            if wid not in expected:
                t.unexpected += 1
                continue
            t.delivered += 1
            t.duplicates += n - 1
            if n > 1:
                dev = expected[wid][1]
                t.duplicates_by_developer[dev] = t.duplicates_by_developer.get(dev, 0) + n - 1
            t.latencies.append(first[wid] - published[expected[wid][0]])
        t.lost_ids = sorted(set(expected) - set(counts))
        return t


# --------------------------------------------------------------------------- load


class Load:
    """Publishes declarations continuously at ``rate`` per second until stopped.

    A declaration counts as published once the broker acknowledged it (acks=all); a
    send that fails is sent again (the relay recognises a repeated declaration id) until
    it is acknowledged, so a broker outage pauses publishing instead of skipping ids.
    """

    def __init__(self, relay: Relay, rate: float, tag: str = "f") -> None:
        self.relay = relay
        self.rate = rate
        self.tag = tag
        #: declaration id → when the broker acknowledged it.
        self.published: dict[str, float] = {}
        self.send_failures = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def declaration(self, i: int) -> dict[str, Any]:
        """A valid opt-out declaration, aimed at every developer."""
        did = f"{self.tag}-{i:06d}"
        return {
            "schema": "notice-relay/declaration/v1",
            "declaration_id": did,
            "publisher_id": PUBLISHER,
            "action": "opt_out",
            "declared_at": datetime.now(UTC).isoformat(),
            "artist": {"artist_id": f"{self.tag}-artist-{i}", "display_name": f"Artist {i}"},
            "works": [{"url": f"https://www.artstation.com/artwork/{self.tag}{i}"}],
            "uses": ["train-ai"],
            "targets": ["*"],
        }

    async def start(self) -> Load:
        """Create the topics and start publishing in the background."""
        from notice_relay.topics import ensure_topics

        await ensure_topics(self.relay.settings())
        self._task = asyncio.create_task(self._run())
        return self

    @property
    def stopped(self) -> bool:
        """Whether :meth:`stop` was called."""
        return self._stop.is_set()

    async def stop(self) -> None:
        """Stop publishing (after the declaration being sent, if any)."""
        self._stop.set()
        if self._task is not None:
            await self._task

    async def _producer(self) -> Any:
        from aiokafka import AIOKafkaProducer

        while True:
            p = AIOKafkaProducer(bootstrap_servers=self.relay.bootstrap, acks="all",
                                 request_timeout_ms=10_000, retry_backoff_ms=250)
            try:
                await asyncio.wait_for(p.start(), 30)
            except Exception:  # the broker may be down; try again
                self.send_failures += 1
                with contextlib.suppress(Exception):
                    await p.stop()
                if self._stop.is_set():
                    return None
                await asyncio.sleep(1)
                continue
            return p

    async def _run(self) -> None:
        from notice_relay.topics import Topics

        topic = Topics.from_settings(self.relay.settings()).declarations
        producer = await self._producer()
        i = 0
        next_at = time.monotonic()
        try:
            while producer is not None and not self._stop.is_set():
                d = self.declaration(i)
                key = f"{PUBLISHER}/{d['artist']['artist_id']}".encode()
                try:
                    await asyncio.wait_for(
                        producer.send_and_wait(topic, json.dumps(d).encode(), key=key), 30)
                except Exception:  # sent again below
                    self.send_failures += 1
                    with contextlib.suppress(Exception):
                        await producer.stop()
                    await asyncio.sleep(1)
                    producer = await self._producer()
                    next_at = time.monotonic()
                    continue
                self.published[d["declaration_id"]] = time.time()
                i += 1
                next_at += 1 / self.rate
                now = time.monotonic()
                if next_at < now - 1:
                    next_at = now  # behind after an outage: no burst
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), max(0.0, next_at - now))
        finally:
            if producer is not None:
                with contextlib.suppress(Exception):
                    await producer.stop()


# --------------------------------------------------------------------------- audit


@dataclass
class AuditFigures:
    """What the audit store holds of the published declarations."""

    trails: int = 0
    complete: int = 0
    incomplete: list[str] = field(default_factory=list)
    states: dict[str, int] = field(default_factory=dict)
    verified: bool = False
    chains: int = 0
    events: int = 0
    problems: list[str] = field(default_factory=list)
    cli_exit: int | None = None


async def audit_figures(relay: Relay, developers: Developers,
                        declaration_ids: list[str], *, verify: bool = True) -> AuditFigures:
    """Which trails are complete: each declaration received and normalized, and each
    expected delivery planned, attempted and delivered, in a delivered (or
    acknowledged) state. With ``verify``, also verifies every hash chain in the store
    (it reads and hashes every event: the waits for completeness pass False and verify
    once, at the end)."""
    import sqlalchemy as sa

    from notice_relay.audit.store import AuditStore
    from notice_relay.audit.store import deliveries as deliveries_table
    from notice_relay.audit.store import events as events_table

    fig = AuditFigures(trails=len(declaration_ids))
    expected = developers.expected(declaration_ids)
    store = await AuditStore.open(relay.database_url, create=False)
    try:
        async with store.engine.connect() as conn:
            rows = (await conn.execute(sa.select(
                events_table.c.declaration_key, events_table.c.type,
                events_table.c.delivery_id))).all()
            drows = (await conn.execute(sa.select(
                deliveries_table.c.delivery_id, deliveries_table.c.state))).all()
        report = await store.verify_report() if verify else None
    finally:
        await store.close()
    by_decl: dict[str, set[str]] = defaultdict(set)
    by_delivery: dict[str, set[str]] = defaultdict(set)
    for key, typ, did in rows:
        by_decl[key].add(typ)
        if did:
            by_delivery[did].add(typ)
    state: dict[str, str] = dict(drows)
    fig.states = dict(Counter(state.get(did, "missing") for did in expected))
    per_decl: dict[str, list[str]] = defaultdict(list)
    for did, (decl, _dev) in expected.items():
        per_decl[decl].append(did)
    need = {"delivery.planned", "delivery.attempted", "delivery.delivered"}
    for decl in declaration_ids:
        ok = {"declaration.received", "declaration.normalized"} <= by_decl.get(
            f"{PUBLISHER}/{decl}", set())
        ok = ok and all(need <= by_delivery.get(did, set())
                        and state.get(did) in ("delivered", "acknowledged")
                        for did in per_decl[decl])
        if ok:
            fig.complete += 1
        else:
            fig.incomplete.append(decl)
    if report is None:
        return fig
    fig.verified = report.ok
    fig.chains = report.declarations
    fig.events = report.events
    fig.problems = [f"{p.declaration_key}#{p.seq}: {p.problem}" for p in report.problems[:20]]
    return fig


async def cli_verify(relay: Relay) -> tuple[int, dict[str, Any]]:
    """``notice-relay audit verify --json``: its exit code and report."""
    res = await asyncio.to_thread(relay.cli, "audit", "verify", "--json")
    try:
        data = json.loads(res.stdout)
    except ValueError:
        data = {"ok": False, "error": res.stderr.decode(errors="replace")[-500:]}
    return res.returncode, data


# --------------------------------------------------------------------------- harness


class Harness:
    """The shared servers of a run: one Kafka broker (stopped and started again by the
    broker scenario, on the same data dir and ports), and PostgreSQL when a scenario
    needs it (started on first use)."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.work.mkdir(parents=True, exist_ok=True)
        self.kafka: localkafka.KafkaNode | None = None
        self.kafka_ports: tuple[int, int] | None = None
        self.pg: localpg.PgServer | None = None
        self._pg_dir: Path | None = None
        self.ca_file = smtp_ca_file(self.work)

    @property
    def bootstrap(self) -> str:
        """The broker's address."""
        assert self.kafka is not None
        return self.kafka.bootstrap

    async def start_kafka(self) -> None:
        """Start the broker (on the ports it had before, if it ran already)."""
        if self.kafka_ports is None:
            self.kafka_ports = (localkafka.free_port(), localkafka.free_port())
            while self.kafka_ports[1] == self.kafka_ports[0]:
                self.kafka_ports = (self.kafka_ports[0], localkafka.free_port())
        port, controller = self.kafka_ports
        self.kafka = await asyncio.to_thread(
            localkafka.start, self.work / "kafka", port, controller)

    async def stop_kafka(self) -> None:
        """Stop the broker (SIGTERM: a clean shutdown; the data stays)."""
        if self.kafka is not None:
            await asyncio.to_thread(localkafka.stop, self.kafka)

    async def start_pg(self) -> localpg.PgServer:
        """Start PostgreSQL (on its previous port, if it ran already)."""
        if self._pg_dir is None:
            # Not under var/: run as root, the server runs as the postgres account,
            # which must reach its data dir.
            self._pg_dir = Path(tempfile.mkdtemp(prefix="nr-faults-pg-"))
        port = self.pg.port if self.pg is not None else None
        self.pg = await asyncio.to_thread(localpg.start, self._pg_dir, port)
        return self.pg

    async def stop_pg(self) -> None:
        """Stop PostgreSQL (a fast shutdown; the data stays)."""
        if self.pg is not None:
            await asyncio.to_thread(localpg.stop, self.pg)

    async def new_database(self) -> str:
        """A fresh database on the PostgreSQL server; its SQLAlchemy URL."""
        import asyncpg

        pg = self.pg or await self.start_pg()
        name = f"nr_faults_{uuid.uuid4().hex[:12]}"
        conn = await asyncpg.connect(pg.dsn)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        return pg.url_for(name)

    async def close(self) -> None:
        """Stop every server this harness started."""
        with contextlib.suppress(Exception):
            await self.stop_kafka()
        with contextlib.suppress(Exception):
            await self.stop_pg()
        if self._pg_dir is not None:
            shutil.rmtree(self._pg_dir, ignore_errors=True)


@dataclass
class ScenarioParams:
    """How hard a run pushes: load and fault sizes."""

    rate: float = 2.0            # declarations per second
    min_load: float = 60.0       # seconds of load at least
    tail: float = 10.0           # seconds of load after the fault ended
    warmup: int = 20             # notices delivered before the fault starts
    kills: int = 12              # scenario a
    kill_gap: tuple[float, float] = (4.0, 14.0)
    outage: float = 30.0         # seconds a broker / receiver / SMTP / database is down
    settle: float = 300.0        # seconds to wait for everything to arrive afterwards
    seed: int | None = None


@dataclass
class Result:
    """One row of the fault suite."""

    scenario: str
    title: str
    fault: str
    published: int
    expected: int
    delivered: int
    duplicates: int
    duplicates_by_developer: dict[str, int]
    lost: int
    id_mismatches: int
    unexpected: int
    trails_complete: int
    trails: int
    chains_verify: bool
    cli_verify_exit: int | None
    events: int
    delivery_states: dict[str, int]
    worker_crashes: list[int]
    sweeper_resends: int
    sweeper_refanouts: int
    send_failures: int
    latency_p50_s: float | None
    latency_max_s: float | None
    load_seconds: float
    settle_seconds: float
    lost_sample: list[str]
    incomplete_sample: list[str]
    problems: list[str]
    workdir: str

    @property
    def passed(self) -> bool:
        """Nothing lost, no id mismatch, every trail complete and every chain verifying."""
        return (self.lost == 0 and self.id_mismatches == 0
                and self.trails_complete == self.trails and self.chains_verify
                and self.cli_verify_exit == 0)

    def as_json(self) -> dict[str, Any]:
        """The row as JSON-ready data (with ``passed``)."""
        return {**asdict(self), "passed": self.passed}


@dataclass
class Ctx:
    """What a fault function works with."""

    harness: Harness
    relay: Relay
    workers: list[Worker]
    developers: Developers
    params: ScenarioParams
    rng: random.Random
    notes: list[str] = field(default_factory=list)

    async def sleep(self, seconds: float) -> None:
        """Sleep while supervising the workers."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            for w in self.workers:
                w.check()
            await asyncio.sleep(min(0.5, left))


FaultFn = Callable[[Ctx], Awaitable[None]]


async def fault_kills(ctx: Ctx) -> None:
    """(a) SIGKILL the worker at random moments, each followed by a restart."""
    w = ctx.workers[0]
    for k in range(ctx.params.kills):
        await ctx.sleep(ctx.rng.uniform(*ctx.params.kill_gap))
        w.kill()
        log(f"  SIGKILL {k + 1}/{ctx.params.kills}")
        await ctx.sleep(ctx.rng.uniform(0.0, 2.0))
        w.start()
    ctx.notes.append(f"{w.kills} SIGKILLs, each followed by a restart")


async def fault_rebalance(ctx: Ctx) -> None:
    """(b) Two workers share the partitions; one is SIGKILLed, later started again."""
    _a, b = ctx.workers
    await ctx.sleep(ctx.params.outage / 2)
    b.kill()
    log("  SIGKILL of worker b; worker a takes its partitions")
    await ctx.sleep(ctx.params.outage)
    b.start()
    log("  worker b started again; partitions shared again")
    await ctx.sleep(ctx.params.outage / 2)
    ctx.notes.append("2 workers; one SIGKILLed under load, restarted "
                     f"{ctx.params.outage:.0f}s later")


async def fault_broker(ctx: Ctx) -> None:
    """(c) The broker stopped and started under load (same data dir, same ports)."""
    await ctx.sleep(5)
    t0 = time.monotonic()
    await ctx.harness.stop_kafka()
    log(f"  broker stopped ({time.monotonic() - t0:.1f}s)")
    await ctx.sleep(ctx.params.outage)
    t1 = time.monotonic()
    await ctx.harness.start_kafka()
    log(f"  broker started again ({time.monotonic() - t1:.1f}s)")
    down = time.monotonic() - t0
    ctx.notes.append(f"broker stopped (SIGTERM) and started again; down {down:.0f}s")


async def fault_receiver(ctx: Ctx) -> None:
    """(d) One webhook receiver down longer than several retry steps."""
    dev = DEVELOPERS[0]
    r = ctx.developers.receivers[dev]
    await r.stop()
    log(f"  receiver {dev} down")
    await ctx.sleep(ctx.params.outage)
    await r.start()
    log(f"  receiver {dev} up again")
    ctx.notes.append(f"receiver {dev} down {ctx.params.outage:.0f}s "
                     f"(retry schedule {RETRY_SCHEDULE.split(',')[:5]}…)")


async def fault_smtp(ctx: Ctx) -> None:
    """(e) The SMTP server answers 421/451 for a while, then recovers."""
    smtp = ctx.developers.smtp
    smtp.outage = ["421 4.3.2 service not available, closing transmission channel",
                   "451 4.3.0 try again later"]
    log("  SMTP answering 421/451")
    await ctx.sleep(ctx.params.outage)
    smtp.outage = []
    log(f"  SMTP recovered after {smtp.refused} refused DATA commands")
    ctx.notes.append(f"SMTP 421/451 for {ctx.params.outage:.0f}s "
                     f"({smtp.refused} DATA commands refused)")


async def fault_database(ctx: Ctx) -> None:
    """(f) The audit store (PostgreSQL) stopped, then started again."""
    await ctx.harness.stop_pg()
    log("  PostgreSQL stopped")
    await ctx.sleep(ctx.params.outage)
    await ctx.harness.start_pg()
    log("  PostgreSQL started again")
    ctx.notes.append(f"PostgreSQL (the audit store) down {ctx.params.outage:.0f}s")


@dataclass(frozen=True)
class Scenario:
    """A fault and how it is set up."""

    key: str
    title: str
    fault: FaultFn
    workers: int = 1
    postgres: bool = False


SCENARIOS: dict[str, Scenario] = {s.key: s for s in (
    Scenario("a", "worker SIGKILLs + restarts", fault_kills),
    Scenario("b", "rebalance: 1 of 2 workers killed", fault_rebalance, workers=2),
    Scenario("c", "broker stopped + started", fault_broker),
    Scenario("d", "webhook receiver down", fault_receiver),
    Scenario("e", "SMTP 421/451 then recovers", fault_smtp),
    Scenario("f", "audit store (PostgreSQL) down", fault_database, postgres=True),
)}


def _count_log(workers: list[Worker], event: str) -> int:
    needle = f'"event": "{event}"'
    return sum(w.output().count(needle) for w in workers)


async def run_scenario(harness: Harness, key: str, params: ScenarioParams) -> Result:
    """Run one scenario from start to finish; its row."""
    sc = SCENARIOS[key]
    rng = random.Random(params.seed)  # noqa: S311 - kill moments, not secrets
    root = harness.work / f"scenario-{key}"
    if root.exists():
        shutil.rmtree(root)
    if harness.kafka is None:
        await harness.start_kafka()
    url = await harness.new_database() if sc.postgres else ""
    relay = Relay(root, harness.bootstrap, database_url=url)
    relay.env.update(FAST_SETTINGS)
    developers = await Developers(relay, harness.ca_file).start()
    workers = [Worker(relay, name) for name in "ab"[: sc.workers]]
    ctx = Ctx(harness, relay, workers, developers, params, rng)
    log(f"scenario {key}: {sc.title} ({relay.prefix} in {root})")
    load = Load(relay, params.rate, tag=key)
    try:
        await load.start()
        for w in workers:
            w.start()
        t_load = time.monotonic()
        deadline = t_load + 180
        while developers.tally(load.published).delivered < params.warmup:
            if time.monotonic() > deadline:
                raise RuntimeError(f"scenario {key}: nothing delivered within 180s; "
                                   f"see {workers[0].log}")
            await ctx.sleep(0.5)
        log(f"  warm: {developers.tally(load.published).delivered} delivered; fault starts")
        await sc.fault(ctx)
        await ctx.sleep(max(params.tail, params.min_load - (time.monotonic() - t_load)))
        await load.stop()
        load_seconds = time.monotonic() - t_load
        log(f"  load stopped: {len(load.published)} declarations published in "
            f"{load_seconds:.0f}s; settling")
        t_settle = time.monotonic()
        fig = AuditFigures()
        ids = sorted(load.published)
        while True:
            tally = developers.tally(load.published)
            if not tally.lost_ids:
                try:
                    fig = await audit_figures(relay, developers, ids, verify=False)
                except Exception as exc:  # the store may still be coming back
                    log(f"  store not readable yet: {str(exc)[:120]}")
                if fig.complete == len(ids):
                    break
            if time.monotonic() - t_settle > params.settle:
                break
            await ctx.sleep(3)
        settle_seconds = time.monotonic() - t_settle
        # Two more seconds for late duplicates, then the final figures.
        await ctx.sleep(2)
        tally = developers.tally(load.published)
        try:
            fig = await audit_figures(relay, developers, ids)
        except Exception as exc:  # reported as a problem of the row
            fig = AuditFigures(trails=len(ids), problems=[f"store unreadable: {exc}"])
        code, _report = await cli_verify(relay)
        fig.cli_exit = code
    finally:
        if not load.stopped:
            await load.stop()
        for w in workers:
            await asyncio.to_thread(w.stop)
        await developers.stop()
    lat = sorted(tally.latencies)
    res = Result(
        scenario=key, title=sc.title, fault="; ".join(ctx.notes),
        published=len(load.published), expected=tally.expected, delivered=tally.delivered,
        duplicates=tally.duplicates, duplicates_by_developer=tally.duplicates_by_developer,
        lost=len(tally.lost_ids),
        id_mismatches=tally.id_mismatches, unexpected=tally.unexpected,
        trails_complete=fig.complete, trails=fig.trails, chains_verify=fig.verified,
        cli_verify_exit=fig.cli_exit, events=fig.events, delivery_states=fig.states,
        worker_crashes=[c for w in workers for c in w.crashes],
        sweeper_resends=_count_log(workers, "sweep.resend"),
        sweeper_refanouts=_count_log(workers, "sweep.refanout"),
        send_failures=load.send_failures,
        latency_p50_s=round(statistics.median(lat), 2) if lat else None,
        latency_max_s=round(lat[-1], 2) if lat else None,
        load_seconds=round(load_seconds, 1), settle_seconds=round(settle_seconds, 1),
        lost_sample=tally.lost_ids[:10], incomplete_sample=fig.incomplete[:10],
        problems=fig.problems, workdir=str(root),
    )
    log(f"  {'PASS' if res.passed else 'FAIL'}: " + format_row(res))
    return res


# --------------------------------------------------------------------------- output

COLUMNS = ("scenario", "published", "expected", "delivered", "dups", "lost",
           "trails ok", "verify", "result")


def _cells(r: Result) -> list[str]:
    return [f"{r.scenario} {r.title}", str(r.published), str(r.expected), str(r.delivered),
            str(r.duplicates), str(r.lost), f"{r.trails_complete}/{r.trails}",
            "ok" if r.chains_verify and r.cli_verify_exit == 0 else "FAIL",
            "PASS" if r.passed else "FAIL"]


def format_row(r: Result) -> str:
    """One result as a line of ``key=value``."""
    return ", ".join(f"{k}={v}" for k, v in zip(COLUMNS[1:], _cells(r)[1:], strict=True))


def format_table(results: list[Result]) -> str:
    """The results as an aligned text table, one row per scenario."""
    rows = [list(COLUMNS), *(_cells(r) for r in results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(row, widths, strict=True)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def iter_results(data: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The rows of a saved ``latest.json``."""
    yield from data.get("results", [])


def since(t0: float) -> timedelta:
    """Time since a ``time.monotonic()`` mark."""
    return timedelta(seconds=round(time.monotonic() - t0))
