#!/usr/bin/env python3
"""notice-relay benchmark (``make bench``): the relay against a plain aiokafka → aiohttp
baseline, on a real local Kafka, real worker processes and real HTTP receivers that
verify every signature.

Phases (each figure from a real run; nothing is mocked):

1. baseline throughput: N ready-made, signed ~2 KB notices on a topic, a plain
   aiokafka consumer POSTing them with one aiohttp session, at 16/64/128 in flight;
   the best is kept;
2. relay throughput: declarations published, each fanned out to 10 webhook developers,
   until every delivery is recorded ``delivered`` in the audit store;
3. latency publish → receipt at a fixed rate of ~30 % of the relay's measured
   maximum, relay and baseline (single hop) at the same deliveries/s;
4. growth: 1 / 10 / 100 developers; worker RSS idle and with a backlog of pending
   deliveries; the auditor's filtered deliveries query on 1,000,000 rows, SQLite and
   PostgreSQL, with its EXPLAIN plan;
5. the webhook channel's HTTP client: httpx, httpx over httpx-aiohttp, aiohttp;
6. the worker's allocator (``--phases allocators``, ``make bench-allocators``): glibc's
   against jemalloc (``NOTICE_RELAY_ALLOCATOR``), runs alternating, medians compared;
7. what allocates the worker's Python objects (``--phases objects``, also in ``make
   bench-allocators``): the C allocator (``PYTHONMALLOC=malloc``) against CPython's
   pymalloc, the default (``NOTICE_RELAY_OBJECT_ALLOCATOR``), the same way.

Throughput windows: the consumer (baseline process or relay worker) is started and
warmed up first (connections open, partitions assigned), then frozen with SIGSTOP
while the whole input is published, and resumed with SIGCONT; the window runs from
SIGCONT until the last delivery (baseline: received by a receiver; relay: recorded
``delivered`` in the store). So neither side competes with the publisher for the
CPU, and neither pays its start-up. CPU seconds are the consumer process's own
(user + system, /proc via psutil) over the same window.

Usage: ``python bench/run.py [--quick] [--profile]`` (writes bench/results/latest.json).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import psutil
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "bench"))

import common  # noqa: E402
import localkafka  # noqa: E402

from notice_relay.channels.webhook import http_client_kind  # noqa: E402
from notice_relay.config import Settings  # noqa: E402
from notice_relay.models import AckInfo, ChannelType, DeliveryTask  # noqa: E402
from notice_relay.signing import decode_secret, webhook_headers  # noqa: E402
from notice_relay.topics import Topics, ensure_topics  # noqa: E402

#: The webhook client the relay uses when nothing is configured: the main runs use it.
DEFAULT_CLIENT = http_client_kind({}).value

PY = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv").exists() else sys.executable
RESULTS = ROOT / "bench" / "results"
MAX_DEVELOPERS = 100
PARTITIONS = 4


def log(msg: str) -> None:
    """Narrate a step (stderr, with the time)."""
    print(f"[{datetime.now().strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process."""
    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


def rss_mib(pid: int) -> float:
    """Resident set size of a process, MiB."""
    return psutil.Process(pid).memory_info().rss / 2**20


class Bench:
    """Everything one benchmark run starts, and the runs themselves."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = Path(tempfile.mkdtemp(prefix="nr-bench-"))
        self.procs: list[subprocess.Popen[bytes]] = []
        self.node: Any = None
        self.secrets = {dev: common.new_secret() for dev in common.developer_ids(MAX_DEVELOPERS)}
        self.keys = {dev: decode_secret(s) for dev, s in self.secrets.items()}
        self.port = localkafka.free_port()
        self.controls: list[int] = []
        self.http: aiohttp.ClientSession | None = None
        self.producer: AIOKafkaProducer | None = None
        self._delivered: dict[Path, tuple[int, set[str]]] = {}

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Kafka, the receivers, a producer."""
        t0 = time.monotonic()
        self.node = localkafka.start(self.work / "kafka")
        log(f"Kafka at {self.node.bootstrap} ({time.monotonic() - t0:.1f}s)")
        secrets_file = self.work / "secrets.json"
        secrets_file.write_text(json.dumps(self.secrets))
        for _ in range(self.args.receivers):
            control = localkafka.free_port()
            self.controls.append(control)
            fh = (self.work / f"receiver-{control}.log").open("wb")
            self.procs.append(subprocess.Popen(
                [PY, str(ROOT / "bench" / "receivers.py"), "--port", str(self.port),
                 "--control-port", str(control), "--secrets", str(secrets_file)],
                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True))
        self.http = aiohttp.ClientSession()
        deadline = time.monotonic() + 30
        while True:
            try:
                await self.stats()
                break
            except aiohttp.ClientError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
        log(f"{self.args.receivers} receiver process(es) on 127.0.0.1:{self.port}")
        self.producer = AIOKafkaProducer(
            bootstrap_servers=self.node.bootstrap, acks=1, linger_ms=5,
            max_batch_size=1024 * 1024, max_request_size=8 * 1024 * 1024)
        await self.producer.start()

    async def stop(self) -> None:
        """Stop everything this run started."""
        if self.producer is not None:
            await self.producer.stop()
        if self.http is not None:
            await self.http.close()
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        if self.node is not None:
            localkafka.stop(self.node)
        if not self.args.keep:
            shutil.rmtree(self.work, ignore_errors=True)

    @property
    def base_url(self) -> str:
        """Where the receivers listen."""
        return f"http://127.0.0.1:{self.port}"

    # ------------------------------------------------------------------ receivers

    async def stats(self) -> dict[str, float]:
        """Summed stats of every receiver process."""
        assert self.http is not None
        total = {"verified": 0.0, "failed": 0.0, "unique": 0.0, "last_arrival": 0.0}
        for c in self.controls:
            async with self.http.get(f"http://127.0.0.1:{c}/stats") as r:
                s = await r.json()
            for k in ("verified", "failed", "unique"):
                total[k] += s[k]
            total["last_arrival"] = max(total["last_arrival"], s["last_arrival"])
        return total

    async def reset(self) -> None:
        """Forget every arrival."""
        assert self.http is not None
        for c in self.controls:
            async with self.http.post(f"http://127.0.0.1:{c}/reset") as r:
                await r.read()

    async def arrivals(self) -> dict[str, float]:
        """First arrival per webhook-id, over every receiver process."""
        assert self.http is not None
        merged: dict[str, float] = {}
        for c in self.controls:
            async with self.http.get(f"http://127.0.0.1:{c}/arrivals") as r:
                for k, v in (await r.json()).items():
                    merged[k] = min(v, merged.get(k, v))
        return merged

    async def wait_received(self, n: int, limit_s: float, proc: Any = None) -> dict[str, float]:
        """Until the receivers hold ``n`` distinct webhook-ids; their stats."""
        deadline = time.monotonic() + limit_s
        while True:
            s = await self.stats()
            if s["unique"] >= n:
                return s
            if time.monotonic() > deadline or (proc is not None and proc.poll() is not None):
                raise RuntimeError(f"received {s['unique']:.0f} of {n} in time ({s})")
            await asyncio.sleep(0.05)

    # ------------------------------------------------------------------ publishing

    async def create_topic(self, name: str, **config: str) -> None:
        """A topic with the relay's partition count."""
        admin = AIOKafkaAdminClient(bootstrap_servers=self.node.bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(name, PARTITIONS, 1, topic_configs=config)])
        finally:
            await admin.close()

    async def prepare_topics(self, settings: Settings) -> None:
        """The relay's topics and its tables' changelog topics (as the worker creates
        them at start-up), before the worker starts."""
        await ensure_topics(settings)

    async def publish(self, topic: str, messages: list[tuple[bytes, bytes, list[Any]]]) -> None:
        """Publish ``(key, value, headers)`` as fast as the producer goes."""
        assert self.producer is not None
        futs = [await self.producer.send(topic, value=v, key=k, headers=h or None)
                for k, v, h in messages]
        await self.producer.flush()
        for f in futs:
            await f

    async def publish_frozen(self, procs: list[subprocess.Popen[bytes]], topic: str,
                             messages: list[tuple[bytes, bytes, list[Any]]]) -> tuple[float, float]:
        """Publish ``messages`` while ``procs`` are frozen (SIGSTOP), then release them
        (SIGCONT): their summed CPU seconds and the wall time at the release."""
        for p in procs:
            p.send_signal(signal.SIGSTOP)
        try:
            await self.publish(topic, messages)
        finally:
            cpu0 = sum(cpu_seconds(p.pid) for p in procs)
            t0 = time.time()
            for p in procs:
                p.send_signal(signal.SIGCONT)
        return cpu0, t0

    async def publish_paced(self, topic: str, make: Any, count: int,
                            rate: float) -> dict[int, float]:
        """Publish message ``make(i)`` for i < count at ``rate`` per second; the time
        each one was handed to the producer."""
        assert self.producer is not None
        sent: dict[int, float] = {}
        start = time.time()
        futs = []
        i = 0
        while i < count:
            due = int((time.time() - start) * rate) + 1
            while i < min(due, count):
                k, v, h = make(i)
                sent[i] = time.time()
                futs.append(await self.producer.send(topic, value=v, key=k, headers=h or None))
                i += 1
            await asyncio.sleep(0.002)
        await self.producer.flush()
        for f in futs:
            await f
        return sent

    def signed(self, wid: str, dev: str, body: bytes) -> tuple[bytes, bytes, list[Any]]:
        """A ready-made, signed webhook as a baseline record."""
        h = webhook_headers([self.keys[dev]], wid, body)
        return (wid.encode(), body, [("dev", dev.encode()),
                                     ("webhook-timestamp", h["webhook-timestamp"].encode()),
                                     ("webhook-signature", h["webhook-signature"].encode())])

    # ------------------------------------------------------------------ baseline

    async def baseline(self, n_decl: int, n_devs: int, concurrency: int,
                       rate: float | None = None, duration: float = 0.0) -> dict[str, Any]:
        """One baseline run: throughput (rate None) or latency at ``rate`` deliveries/s."""
        run = uuid.uuid4().hex[:8]
        topic = f"bench-baseline-{run}"
        await self.create_topic(topic)
        devs = common.developer_ids(n_devs)
        bodies = [common.notice_body(run, i)[1] for i in range(n_decl)]
        fh = (self.work / f"baseline-{run}.log").open("wb")
        proc = subprocess.Popen(
            [PY, str(ROOT / "bench" / "baseline.py"), "--bootstrap", self.node.bootstrap,
             "--topic", topic, "--group", f"bench-{run}", "--base-url", self.base_url,
             "--concurrency", str(concurrency)],
            stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        try:
            # Warm-up: partitions assigned, connections open.
            await self.reset()
            warm = [self.signed(f"warm-{run}-{j}", devs[j % n_devs], bodies[0])
                    for j in range(max(n_devs, 20))]
            await self.publish(topic, warm)
            await self.wait_received(len(warm), 60, proc)
            await self.reset()
            total = n_decl * n_devs
            if rate is None:
                msgs = [self.signed(wid, dev, bodies[i])
                        for i in range(n_decl)
                        for wid, dev in zip(common.delivery_ids(run, i, devs), devs, strict=True)]
                cpu0, t0 = await self.publish_frozen([proc], topic, msgs)
                s = await self.wait_received(total, max(120.0, total / 100), proc)
                cpu1 = cpu_seconds(proc.pid)
                elapsed = s["last_arrival"] - t0
                return {"concurrency": concurrency, "deliveries": total,
                        "seconds": round(elapsed, 3),
                        "deliveries_per_s": round(total / elapsed, 1),
                        "cpu_s": round(cpu1 - cpu0, 3),
                        "cpu_s_per_1000": round((cpu1 - cpu0) / total * 1000, 4),
                        "failed": s["failed"], "rss_mib": round(rss_mib(proc.pid), 1)}
            # Latency: every delivery published on its own, at a fixed rate.
            count = int(rate * duration)
            flat = [(i, wid, dev) for i in range(n_decl)
                    for wid, dev in zip(common.delivery_ids(run, i, devs), devs, strict=True)]
            flat = (flat * (count // len(flat) + 1))[:count]
            ids = [f"{wid}-{j}" for j, (_, wid, _) in enumerate(flat)]
            sent = await self.publish_paced(
                topic, lambda j: self.signed(ids[j], flat[j][2], bodies[flat[j][0]]), count, rate)
            await self.wait_received(count, 120, proc)
            arr = await self.arrivals()
            lat = [(arr[ids[j]] - t) * 1000 for j, t in sent.items() if ids[j] in arr]
            return {"rate_deliveries_per_s": round(rate, 1), "deliveries": count,
                    "latency_ms": common.percentiles(lat)}
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()

    # ------------------------------------------------------------------ relay

    def relay_env(self, root: Path, n_devs: int, http_client: str,
                  allocator: str | None = None,
                  objects: str | None = None) -> tuple[dict[str, str], Settings]:
        """The environment of a relay worker with ``n_devs`` webhook developers."""
        devs = common.developer_ids(n_devs)
        secrets_env = common.write_registry(root, {d: self.secrets[d] for d in devs},
                                            self.base_url)
        prefix = f"b{uuid.uuid4().hex[:8]}."
        app_id = f"nr-bench-{uuid.uuid4().hex[:8]}"
        db = f"sqlite+aiosqlite:///{root / 'audit.db'}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("NOTICE_RELAY_")}
        env.update({
            "KAFKA_BOOTSTRAP_SERVERS": self.node.bootstrap,
            "NOTICE_RELAY_TOPIC_PREFIX": prefix, "NOTICE_RELAY_APP_ID": app_id,
            "NOTICE_RELAY_DATABASE_URL": db,
            "NOTICE_RELAY_CONNECTORS": str(root / "connectors"),
            "NOTICE_RELAY_PUBLISHERS": str(root / "publishers.toml"),
            "NOTICE_RELAY_DATA_DIR": str(root / "faust"),
            "NOTICE_RELAY_PARTITIONS": str(PARTITIONS),
            "NOTICE_RELAY_LOG_FORMAT": "json",
            "NOTICE_RELAY_HTTP_CLIENT": http_client,
            "NOTICE_RELAY_TABLE_STORE": self.args.table_store,
            **secrets_env,
        })
        if allocator:
            env["NOTICE_RELAY_ALLOCATOR"] = allocator
        if objects:
            env["NOTICE_RELAY_OBJECT_ALLOCATOR"] = objects
        settings = Settings(kafka_bootstrap=self.node.bootstrap, topic_prefix=prefix,
                            app_id=app_id, partitions=PARTITIONS, database_url=db)
        return env, settings

    def start_worker(self, root: Path, env: dict[str, str], name: str) -> subprocess.Popen[bytes]:
        """A ``notice-relay worker`` process."""
        fh = (root / f"{name}.log").open("ab")
        proc = subprocess.Popen([PY, "-m", "notice_relay", "worker", "--loglevel", "warning"],
                                env=env, cwd=root, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    @staticmethod
    def stop_worker(proc: subprocess.Popen[bytes]) -> None:
        """SIGTERM, then SIGKILL."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    def delivered(self, root: Path) -> int:
        """Deliveries recorded delivered in the worker's audit store: distinct delivery
        ids with a ``delivery.delivered`` event in the trail, read incrementally by
        event id (the trail is what the store records; see projection_lag)."""
        seen = self._delivered.setdefault(root, (0, set()))
        last, ids = seen
        try:
            with contextlib.closing(sqlite3.connect(f"file:{root / 'audit.db'}?mode=ro",
                                                    uri=True, timeout=5)) as db:
                # The top first: events the projector commits between the two reads
                # are read next time, not skipped.
                top = db.execute("SELECT max(id) FROM audit_events").fetchone()[0]
                rows = db.execute("SELECT id, delivery_id FROM audit_events WHERE id > ? "
                                  "AND id <= ? AND type = 'delivery.delivered'",
                                  (last, top if top is not None else last)).fetchall()
        except sqlite3.Error:
            return len(ids)
        ids.update(r[1] for r in rows)
        if top is not None:
            self._delivered[root] = (max(last, int(top)), ids)
        return len(ids)

    @staticmethod
    def projection_lag(root: Path) -> int:
        """Deliveries with a delivered event whose row in ``deliveries`` does not say
        delivered (or acknowledged): what the projection missed."""
        with contextlib.closing(sqlite3.connect(f"file:{root / 'audit.db'}?mode=ro",
                                                uri=True, timeout=5)) as db:
            row = db.execute(
                "SELECT count(DISTINCT e.delivery_id) FROM audit_events e JOIN deliveries d "
                "ON d.delivery_id = e.delivery_id WHERE e.type = 'delivery.delivered' "
                "AND d.state NOT IN ('delivered', 'acknowledged')").fetchone()
        return int(row[0])

    async def wait_delivered(self, root: Path, n: int, limit_s: float,
                             proc: subprocess.Popen[bytes]) -> float:
        """Until ``n`` deliveries are recorded delivered; the time that was seen."""
        deadline = time.monotonic() + limit_s
        last = 0
        while True:
            count = self.delivered(root)
            if count >= n:
                return time.time()
            last = max(last, count)
            if proc.poll() is not None:
                raise RuntimeError(f"the worker stopped; see {root}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {last} of {n} deliveries delivered in {limit_s}s")
            await asyncio.sleep(0.25)

    async def relay(self, label: str, n_decl: int, n_devs: int, *,
                    http_client: str = DEFAULT_CLIENT, rate: float | None = None,
                    duration: float = 0.0, allocator: str | None = None,
                    objects: str | None = None,
                    profile: str | None = None) -> dict[str, Any]:
        """One relay run: throughput (rate None) or latency at ``rate`` declarations/s."""
        run = uuid.uuid4().hex[:8]
        root = self.work / f"relay-{label}-{run}"
        root.mkdir(parents=True)
        env, settings = self.relay_env(root, n_devs, http_client, allocator, objects)
        topics = Topics.from_settings(settings)
        await self.prepare_topics(settings)
        devs = common.developer_ids(n_devs)
        n_workers = max(1, self.args.workers)
        workers = [self.start_worker(root, env, "worker" if w == 0 else f"worker-{w}")
                   for w in range(n_workers)]
        proc = workers[0]
        spy: subprocess.Popen[bytes] | None = None
        try:
            t_start = time.monotonic()
            await self.publish(topics.declarations,
                               [(b"warm", common.declaration(run, 0), [])])
            warm = n_devs  # deliveries made before the measured ones
            await self.wait_delivered(root, warm, 180, proc)
            if n_workers > 1:
                # Every worker joined and the group settled: one more declaration goes
                # through after the last join's rebalance.
                await asyncio.sleep(10)
                await self.publish(topics.declarations,
                                   [(b"warm2", common.declaration(run, 10**6), [])])
                warm += n_devs
                await self.wait_delivered(root, warm, 180, proc)
            log(f"  worker {label} ready ({time.monotonic() - t_start:.1f}s after start, "
                f"RSS {rss_mib(proc.pid):.0f} MiB)")
            await self.reset()
            total = n_decl * n_devs
            decls = [(f"{common.PUBLISHER}/artist-{i:07d}".encode(), common.declaration(run, i),
                      []) for i in range(1, n_decl + 1)]
            if profile:
                spy = subprocess.Popen(
                    [str(ROOT / ".venv" / "bin" / "py-spy"), "record", "-p", str(proc.pid),
                     "-r", "67", "-f", "raw", "-o", profile, "--nonblocking",
                     *(["--gil"] if self.args.profile_gil else [])],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if rate is None:
                cpu0, t0 = await self.publish_frozen(workers, topics.declarations, decls)
                peak = 0.0
                waiter = asyncio.create_task(
                    self.wait_delivered(root, total + warm, max(600.0, total / 10), proc))
                while not waiter.done():
                    peak = max(peak, max(rss_mib(w.pid) for w in workers))
                    await asyncio.wait({waiter}, timeout=0.5)
                t_end = waiter.result()
                cpu1 = sum(cpu_seconds(w.pid) for w in workers)
                s = await self.stats()
                elapsed = t_end - t0
                return {"label": label, "developers": n_devs, "declarations": n_decl,
                        "http_client": http_client, "allocator": allocator or "auto",
                        "objects": objects or "pymalloc",
                        "workers": n_workers, "deliveries": total,
                        "table_store": self.args.table_store,
                        "seconds": round(elapsed, 3),
                        "deliveries_per_s": round(total / elapsed, 1),
                        "receipts_done_s": round(s["last_arrival"] - t0, 3),
                        "cpu_s": round(cpu1 - cpu0, 3),
                        "cpu_s_per_1000": round((cpu1 - cpu0) / total * 1000, 4),
                        "received_verified": s["verified"], "failed_signatures": s["failed"],
                        "rss_peak_mib": round(peak, 1),
                        "projection_lag": self.projection_lag(root)}
            count = max(1, int(rate * duration))
            sent = await self.publish_paced(topics.declarations,
                                            lambda j: decls[j], min(count, n_decl), rate)
            await self.wait_delivered(root, len(sent) * n_devs + warm, 300, proc)
            arr = await self.arrivals()
            lat = []
            points = []
            for j, t in sent.items():
                for wid in common.delivery_ids(run, j + 1, devs):
                    if wid in arr:
                        lat.append((arr[wid] - t) * 1000)
                        points.append((round(t, 4), round(lat[-1], 2)))
            if self.args.latency_dump:
                await asyncio.to_thread(Path(self.args.latency_dump).write_text,
                                        json.dumps(sorted(points)))
            return {"label": label, "workers": n_workers,
                    "rate_declarations_per_s": round(rate, 2),
                    "rate_deliveries_per_s": round(rate * n_devs, 1),
                    "deliveries": len(lat), "latency_ms": common.percentiles(lat)}
        finally:
            if spy is not None:
                spy.send_signal(signal.SIGINT)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    spy.wait(60)
            for w in workers:
                self.stop_worker(w)

    # ------------------------------------------------------------------ backlog

    async def backlog(self, n_devs: int, backlog: int, window: float) -> dict[str, Any]:
        """Worker RSS idle, then with ``backlog`` delivery tasks waiting on the
        deliveries topic (published there directly, as fan-out would)."""
        run = uuid.uuid4().hex[:8]
        root = self.work / f"relay-backlog-{run}"
        root.mkdir(parents=True)
        env, settings = self.relay_env(root, n_devs, DEFAULT_CLIENT)
        topics = Topics.from_settings(settings)
        await self.prepare_topics(settings)
        devs = common.developer_ids(n_devs)
        proc = self.start_worker(root, env, "worker-idle")
        try:
            await self.publish(topics.declarations, [(b"warm", common.declaration(run, 0), [])])
            await self.wait_delivered(root, n_devs, 180, proc)
            await asyncio.sleep(5)
            idle = []
            for _ in range(10):
                idle.append(rss_mib(proc.pid))
                await asyncio.sleep(0.5)
        finally:
            self.stop_worker(proc)
        # A real task (notice with its ack block), with a unique delivery id per copy.
        from notice_relay.models import Notice

        notice = Notice.model_validate_json(common.notice_body(run, 1)[1]).model_copy(
            update={"ack": AckInfo(url="http://127.0.0.1:8080/v1/acks/" + "t" * 160,
                                   due_by=datetime.now(UTC) + timedelta(days=30))})
        marker = "dlv_" + "0" * 32
        templates = [DeliveryTask(delivery_id=marker, notice=notice, developer_id=dev,
                                  channel="webhook", channel_type=ChannelType.WEBHOOK,
                                  planned_at=datetime.now(UTC)).model_dump_json()
                     for dev in devs]
        size = len(templates[0])
        log(f"  publishing {backlog:,} delivery tasks of {size} bytes to {topics.deliveries}")
        t0 = time.monotonic()
        chunk = 50_000
        for start in range(0, backlog, chunk):
            msgs = []
            for j in range(start, min(start + chunk, backlog)):
                did = f"dlv_{run}{j:024x}"
                msgs.append((did.encode(),
                             templates[j % n_devs].replace(marker, did).encode(), []))
            await self.publish(topics.deliveries, msgs)
        log(f"  published in {time.monotonic() - t0:.0f}s")
        await self.reset()
        proc = self.start_worker(root, env, "worker-backlog")
        samples: list[tuple[float, float]] = []
        try:
            t0 = time.monotonic()
            while time.monotonic() - t0 < window:
                samples.append((round(time.monotonic() - t0, 1), round(rss_mib(proc.pid), 1)))
                await asyncio.sleep(0.5)
            s = await self.stats()
        finally:
            self.stop_worker(proc)
        idle_rss = statistics.median(idle)
        peak = max(r for _, r in samples)
        return {"backlog_tasks": backlog, "task_bytes": size, "window_s": window,
                "idle_rss_mib": round(idle_rss, 1), "backlog_rss_peak_mib": round(peak, 1),
                "backlog_rss_end_mib": samples[-1][1],
                "ratio": round(peak / idle_rss, 2),
                "delivered_during_window": s["unique"], "rss_samples": samples[::4]}


# ------------------------------------------------------------------------ queries


async def query_bench(rows: int, postgres: bool, work: Path) -> list[dict[str, Any]]:
    """The auditor's filtered deliveries query on ``rows`` deliveries: time and plan."""
    import explain_deliveries as ex

    from notice_relay.audit.queries import DeliveryFilter, find_deliveries
    from notice_relay.audit.store import AuditStore
    from notice_relay.models import DeliveryState

    targets = [("sqlite", f"sqlite+aiosqlite:///{work / 'query.db'}")]
    server = None
    if postgres:
        import localpg

        pg_dir = Path(tempfile.mkdtemp(prefix="nr-bench-pg-"))
        server = localpg.start(pg_dir)
        targets.append(("postgresql", server.url))
    out = []
    try:
        for name, url in targets:
            store = await AuditStore.open(url)
            try:
                t0 = time.monotonic()
                await ex.seed(store, rows)
                seeded = time.monotonic() - t0
                flt = DeliveryFilter(
                    developer_id="dev-07",
                    states=(DeliveryState.FAILED, DeliveryState.RETRY_SCHEDULED),
                    since=ex.T0 + timedelta(days=30), until=ex.T0 + timedelta(days=60))
                times = []
                page = None
                for k in range(25):
                    t = time.perf_counter()
                    page = await find_deliveries(store, flt, limit=100)
                    if k >= 5:
                        times.append((time.perf_counter() - t) * 1000)
                plan = await ex.plan(store)
                count = await store.count_deliveries()
            finally:
                await store.close()
            out.append({"store": name, "rows": count, "seed_s": round(seeded, 1),
                        "query": "developer=dev-07, state in (failed, retry_scheduled), "
                                 "30-day updated_at range, first page of 100",
                        "page_rows": len(page.rows) if page else 0,
                        "median_ms": round(statistics.median(times), 2),
                        "p95_ms": round(statistics.quantiles(times, n=20)[18], 2),
                        "plan": plan, "uses_index": ex.uses_index(plan)})
            log(f"  {name}: {out[-1]['median_ms']} ms median, index used: "
                f"{out[-1]['uses_index']}")
    finally:
        if server is not None:
            localpg.stop(server)
            shutil.rmtree(server.data_dir, ignore_errors=True)
    return out


# ------------------------------------------------------------------------ report


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"nproc": os.cpu_count(), "cpu": model,
            "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "kernel": platform.release(),
            "date_utc": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]}


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, rounded, or None."""
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 2)


def table(res: dict[str, Any]) -> str:
    """The one table of figures, baselines and ratios."""
    rows: list[tuple[str, Any, Any, Any, str]] = []
    b = res["baseline"]["best"]
    r = res.get("relay")
    if r:
        rows.append(("deliveries/s (10 developers)", r["deliveries_per_s"],
                     b["deliveries_per_s"], ratio(r["deliveries_per_s"], b["deliveries_per_s"]),
                     "ratio >= 0.8"))
        rows.append(("worker CPU s / 1,000 deliveries", r["cpu_s_per_1000"],
                     b["cpu_s_per_1000"], ratio(r["cpu_s_per_1000"], b["cpu_s_per_1000"]), ""))
    for c in res["baseline"]["runs"]:
        rows.append((f"  baseline at {c['concurrency']} in flight (deliveries/s)", "",
                     c["deliveries_per_s"], "", ""))
    lat = res.get("latency")
    if lat:
        rl, bl = lat["relay"]["latency_ms"], lat["baseline"]["latency_ms"]
        rows.append((f"latency at {lat['relay']['rate_deliveries_per_s']} deliveries/s", "", "",
                     "", "(publish -> receipt, ms)"))
        for q in ("p50", "p95", "p99"):
            rows.append((f"  {q} ms", rl[q], bl[q], ratio(rl[q], bl[q]),
                         "ratio <= 2.5" if q == "p99" else ""))
    for g in res.get("growth", []):
        rows.append((f"relay deliveries/s, {g['developers']} developer(s)",
                     g["deliveries_per_s"], b["deliveries_per_s"],
                     ratio(g["deliveries_per_s"], b["deliveries_per_s"]),
                     f"{g['declarations']} decl. x {g['developers']}"))
    for c in res.get("clients", []):
        rows.append((f"relay deliveries/s, http client {c['http_client']}",
                     c["deliveries_per_s"], b["deliveries_per_s"],
                     ratio(c["deliveries_per_s"], b["deliveries_per_s"]),
                     f"CPU s/1000: {c['cpu_s_per_1000']}"))
    for phase, title, tried, against in (("allocators", "allocator", "jemalloc", "glibc"),
                                         ("objects", "objects", "malloc", "pymalloc")):
        cmp = res.get(phase)
        if not cmp:
            continue
        t, a = cmp[tried], cmp[against]
        for key, name in (("deliveries_per_s", "deliveries/s"),
                          ("cpu_s_per_1000", "CPU s / 1,000 deliveries"),
                          ("rss_peak_mib", "peak RSS MiB")):
            rows.append((f"{title} {tried} vs {against}: {name}", t[key], a[key],
                         ratio(t[key], a[key]),
                         f"medians of {cmp['rounds']} runs each, alternating"))
    bl = res.get("backlog")
    if bl:
        rows.append((f"worker RSS MiB, backlog {bl['backlog_tasks']:,} vs idle",
                     bl["backlog_rss_peak_mib"], bl["idle_rss_mib"], bl["ratio"],
                     "ratio <= 2"))
    for q in res.get("queries", []):
        rows.append((f"filtered deliveries query, {q['store']}, {q['rows']:,} rows (ms)",
                     q["median_ms"], "", "", f"index used: {q['uses_index']}"))
    w = [max(len(str(x[i])) for x in rows) for i in range(5)]
    head = ("figure", "relay", "baseline", "ratio", "goal / note")
    w = [max(wi, len(h)) for wi, h in zip(w, head, strict=True)]
    lines = ["  ".join(str(h).ljust(wi) for h, wi in zip(head, w, strict=True)),
             "  ".join("-" * wi for wi in w)]
    for x in rows:
        lines.append("  ".join(str(v if v is not None else "-").ljust(wi)
                               for v, wi in zip(x, w, strict=True)))
    return "\n".join(lines)


async def alternate(bench: Bench, title: str, label: str, n_decl: int, rounds: int,
                    kinds: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Relay runs of ``n_decl`` declarations x 10 developers for each of two ``kinds``
    (the keyword arguments of :meth:`Bench.relay` for each), alternating their order by
    round; every run, and the medians per kind."""
    runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in kinds}
    order = list(kinds)
    for r in range(rounds):
        for kind in order if r % 2 == 0 else order[::-1]:
            log(f"{title} {kind}, round {r + 1}: {n_decl:,} declarations x 10 developers")
            runs[kind].append(await bench.relay(f"{label}-{kind}", n_decl, 10, **kinds[kind]))
            log(f"  {runs[kind][-1]['deliveries_per_s']} deliveries/s")
    return {"rounds": rounds, "runs": runs, **{
        kind: {key: statistics.median(x[key] for x in got)
               for key in ("deliveries_per_s", "cpu_s_per_1000", "rss_peak_mib")}
        for kind, got in runs.items()}}


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    """Run every phase; the results."""
    q = args.quick
    n_decl = args.declarations or (100 if q else 5000)
    res: dict[str, Any] = {"machine": machine(), "quick": q,
                           "command": "make bench" if not q else "python bench/run.py --quick",
                           "notice_bytes": len(common.notice_body("size", 1)[1])}
    bench = Bench(args)
    await bench.start()
    try:
        phases = set(args.phases.split(","))
        if "throughput" in phases or ("latency" in phases and not args.latency_rate):
            phases |= {"baseline", "relay"}
        if "baseline" in phases:
            log(f"baseline: {n_decl * 10:,} deliveries to 10 developers")
            runs = []
            for c in (16, 64, 128):
                runs.append(await bench.baseline(n_decl, 10, c))
                log(f"  {c} in flight: {runs[-1]['deliveries_per_s']} deliveries/s")
            best = max(runs, key=lambda x: x["deliveries_per_s"])
            res["baseline"] = {"runs": runs, "best": best}
        if "relay" in phases or "growth" in phases or "clients" in phases:
            log(f"relay: {n_decl:,} declarations x 10 developers")
            res["relay"] = await bench.relay("main", n_decl, 10, profile=args.profile_to)
            log(f"  {res['relay']['deliveries_per_s']} deliveries/s")
        if "latency" in phases:
            rate = args.latency_rate or 0.3 * res["relay"]["deliveries_per_s"]
            duration = 10.0 if q else 30.0
            log(f"latency at {rate:.0f} deliveries/s for {duration:.0f}s")
            rl = await bench.relay("latency", int(rate / 10 * duration) + 1, 10,
                                   rate=rate / 10, duration=duration)
            best = res["baseline"]["best"]["concurrency"] if "baseline" in res else 64
            bl = await bench.baseline(min(n_decl, 500), 10, best, rate=rate, duration=duration)
            res["latency"] = {"relay": rl, "baseline": bl}
            log(f"  relay p99 {rl['latency_ms']['p99']} ms, baseline p99 "
                f"{bl['latency_ms']['p99']} ms")
        if "growth" in phases:
            res["growth"] = []
            for devs, decl in ((1, args.growth_declarations or (100 if q else 2000)), (10, None),
                               (100, max((args.growth_declarations or (100 if q else 2000))
                                         // 40, 3))):
                if decl is None:
                    res["growth"].append(res["relay"])
                    continue
                log(f"growth: {decl:,} declarations x {devs} developer(s)")
                res["growth"].append(await bench.relay(f"growth{devs}", decl, devs))
                log(f"  {res['growth'][-1]['deliveries_per_s']} deliveries/s")
        if "clients" in phases:
            res["clients"] = [dict(res["relay"])]
            n_cli = args.client_declarations or (100 if q else 500)
            if n_cli != n_decl:
                res["clients"] = []
            for kind in ("httpx", "httpx-aiohttp", "aiohttp"):
                if kind == DEFAULT_CLIENT and res["clients"]:
                    continue
                log(f"http client {kind}: {n_cli:,} declarations x 10 developers")
                res["clients"].append(await bench.relay(f"client-{kind}", n_cli, 10,
                                                        http_client=kind))
                log(f"  {res['clients'][-1]['deliveries_per_s']} deliveries/s")
        n_alt = args.client_declarations or (100 if q else 500)
        rounds = 2 if q else 3
        if "allocators" in phases:
            res["allocators"] = await alternate(
                bench, "allocator", "alloc", n_alt, rounds,
                {kind: {"allocator": kind} for kind in ("glibc", "jemalloc")})
        if "objects" in phases:
            res["objects"] = await alternate(
                bench, "objects", "objects", n_alt, rounds,
                {kind: {"allocator": "glibc", "objects": kind} for kind in ("malloc", "pymalloc")})
        if "backlog" in phases:
            size = args.backlog or (20_000 if q else 1_000_000)
            log(f"backlog: worker RSS idle and with {size:,} pending deliveries")
            res["backlog"] = await bench.backlog(10, size, 20.0 if q else 60.0)
            log(f"  idle {res['backlog']['idle_rss_mib']} MiB, with backlog "
                f"{res['backlog']['backlog_rss_peak_mib']} MiB")
    finally:
        await bench.stop()
    if "queries" in phases:
        rows = args.query_rows or (50_000 if q else 1_000_000)
        log(f"queries: the auditor's filtered deliveries query on {rows:,} rows")
        qdir = Path(tempfile.mkdtemp(prefix="nr-bench-q-"))
        try:
            res["queries"] = await query_bench(rows, not args.no_postgres, qdir)
        finally:
            shutil.rmtree(qdir, ignore_errors=True)
    return res


def main() -> int:
    """Command line."""
    parser = argparse.ArgumentParser(description="notice-relay benchmark")
    parser.add_argument("--quick", action="store_true", help="small N, to try things")
    parser.add_argument("--phases", default="throughput,latency,growth,clients,backlog,queries")
    parser.add_argument("--declarations", type=int, help="declarations of the main run")
    parser.add_argument("--client-declarations", type=int,
                        help="declarations x 10 developers per HTTP client (default 500)")
    parser.add_argument("--growth-declarations", type=int,
                        help="declarations of the 1-developer run (default 2000; the "
                             "100-developer run gets 1/40 of it)")
    parser.add_argument("--latency-rate", type=float,
                        help="deliveries/s of the latency phase (default: 30 %% of the relay's "
                             "measured maximum; given, the throughput runs are skipped)")
    parser.add_argument("--table-store", choices=("rocksdb", "memory"), default="rocksdb",
                        help="the relay worker's table store (NOTICE_RELAY_TABLE_STORE)")
    parser.add_argument("--workers", type=int, default=1,
                        help="worker processes sharing the partitions in the relay runs "
                             "(CPU seconds are their sum, RSS the largest)")
    parser.add_argument("--latency-dump", help="write the relay's [publish time, latency ms] "
                        "pairs of the latency phase to this JSON file")
    parser.add_argument("--backlog", type=int, help="pending deliveries (default 1,000,000)")
    parser.add_argument("--query-rows", type=int, help="store rows (default 1,000,000)")
    parser.add_argument("--receivers", type=int, default=2, help="receiver processes")
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument("--profile-to", help="py-spy raw profile of the main relay run")
    parser.add_argument("--profile-gil", action="store_true",
                        help="profile only the thread holding the GIL (py-spy --gil)")
    parser.add_argument("--out", type=Path, default=RESULTS / "latest.json")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    t0 = time.monotonic()
    res = asyncio.run(main_async(args))
    res["total_s"] = round(time.monotonic() - t0, 1)
    res["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    if "baseline" in res:
        text = table(res)
        print(text)
        args.out.with_suffix(".txt").write_text(text + "\n")
    print(f"\nresults: {args.out} ({res['total_s']}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
