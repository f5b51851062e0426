"""The soak run (``make soak``): one worker under a steady load for a long while
(15 minutes by default), sampling every few seconds

- the worker's resident memory (RSS),
- its open file descriptors (``/proc/<pid>/fd``),
- the consumer lag of its group, per topic (end offsets minus committed offsets),

and printing the trend (least-squares slope) of each after a warm-up. At the end the
load stops, the run waits for every notice to arrive, and checks that nothing was lost
and that every audit chain verifies.

Everything is real (see ``scripts/faultlib.py``): a KRaft broker, a ``notice-relay
worker`` process with its production defaults, three webhook receivers and an SMTP
server (STARTTLS + AUTH), a SQLite audit store.

Writes ``var/soak/soak-<time>.csv`` as it goes (a row per sample, flushed, so a run
that is interrupted keeps what it measured) and, at the end, ``var/soak/latest.csv``,
``latest.json`` and the plot ``docs/img/soak.png``.

    python scripts/soak.py                     # 15 minutes at 3 declarations/s
    python scripts/soak.py --minutes 5 --rate 2
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import faultlib

STAGES = ("declarations", "notices", "deliveries", "acks", "audit", "retries")
CSV_FIELDS = ["t_s", "rss_mb", "rss_anon_mb", "rss_file_mb", "fds", "lag_total",
              *(f"lag_{s}" for s in STAGES), "published", "delivered", "cpu_percent"]


@dataclass
class Sample:
    """One measurement."""

    t: float
    rss_mb: float
    rss_anon_mb: float
    rss_file_mb: float
    fds: int
    lag: dict[str, int]
    published: int
    delivered: int
    cpu_percent: float

    def row(self) -> dict[str, Any]:
        """The sample as a CSV row."""
        return {"t_s": round(self.t, 1), "rss_mb": round(self.rss_mb, 2),
                "rss_anon_mb": round(self.rss_anon_mb, 2),
                "rss_file_mb": round(self.rss_file_mb, 2), "fds": self.fds,
                "lag_total": sum(self.lag.values()),
                **{f"lag_{s}": self.lag.get(s, 0) for s in STAGES},
                "published": self.published, "delivered": self.delivered,
                "cpu_percent": round(self.cpu_percent, 1)}


@dataclass
class LagProbe:
    """Committed and end offsets of the worker's consumer group."""

    relay: faultlib.Relay
    admin: Any = None
    consumer: Any = None
    stage_of: dict[str, str] = field(default_factory=dict)

    async def start(self) -> None:
        """Connect an admin client and a group-less consumer."""
        from aiokafka import AIOKafkaConsumer
        from aiokafka.admin import AIOKafkaAdminClient

        from notice_relay.topics import Topics

        topics = Topics.from_settings(self.relay.settings())
        for stage in STAGES[:-1]:
            self.stage_of[getattr(topics, stage)] = stage
        for _, name in topics.retry_tiers:
            self.stage_of[name] = "retries"
        self.admin = AIOKafkaAdminClient(bootstrap_servers=self.relay.bootstrap)
        await self.admin.start()
        self.consumer = AIOKafkaConsumer(bootstrap_servers=self.relay.bootstrap,
                                         enable_auto_commit=False)
        await self.consumer.start()

    async def stop(self) -> None:
        """Disconnect."""
        if self.consumer is not None:
            await self.consumer.stop()
        if self.admin is not None:
            await self.admin.close()

    async def lag(self) -> dict[str, int]:
        """Messages not yet committed by the group, per stage."""
        from aiokafka.structs import TopicPartition

        committed = await self.admin.list_consumer_group_offsets(self.relay.app_id)
        tps = [TopicPartition(t, p) for t in self.stage_of for p in range(4)]
        ends = await self.consumer.end_offsets(tps)
        out = dict.fromkeys(STAGES, 0)
        for tp in tps:
            c = committed.get(tp)
            done = c.offset if c is not None and c.offset >= 0 else 0
            out[self.stage_of[tp.topic]] += max(0, ends.get(tp, 0) - done)
        return out


def rss_split(pid: int) -> tuple[float, float]:
    """The process's resident memory in MiB: anonymous (heaps, malloc arenas, Python's
    objects) and file-backed (code and mapped files, which the kernel may page out);
    both from ``/proc/<pid>/status``."""
    kib = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(("RssAnon:", "RssFile:")):
                name, value = line.split(":", 1)
                kib[name] = int(value.split()[0])
    return kib.get("RssAnon", 0) / 1024, kib.get("RssFile", 0) / 1024


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs (0 with fewer than 2 points)."""
    import numpy as np

    if len(xs) < 2:
        return 0.0
    return float(np.polyfit(np.array(xs), np.array(ys), 1)[0])


def quarters(samples: list[Sample]) -> list[list[Sample]]:
    """``samples`` cut into four runs of equal length (in time)."""
    if not samples:
        return []
    t0, t1 = samples[0].t, samples[-1].t
    width = (t1 - t0) / 4 or 1.0
    return [[s for s in samples if min(3, int((s.t - t0) / width)) == q] for q in range(4)]


def plot(samples: list[Sample], warmup: float, path: Path, title: str) -> None:
    """Four panels: RSS, open fds, lag per stage, published vs delivered."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s.t / 60 for s in samples]
    fig, axes = plt.subplots(4, 1, figsize=(9, 11), sharex=True)
    axes[0].plot(t, [s.rss_mb for s in samples], color="tab:blue", label="RSS")
    axes[0].plot(t, [s.rss_anon_mb for s in samples], color="tab:purple", label="anonymous")
    axes[0].legend(fontsize="small")
    axes[0].set_ylabel("worker RSS (MiB)")
    axes[1].plot(t, [s.fds for s in samples], color="tab:green")
    axes[1].set_ylabel("open fds")
    for stage in STAGES:
        axes[2].plot(t, [s.lag.get(stage, 0) for s in samples], label=stage)
    axes[2].set_ylabel("consumer lag (messages)")
    axes[2].legend(fontsize="small", ncol=3)
    axes[3].plot(t, [s.published for s in samples], label="declarations published")
    axes[3].plot(t, [s.delivered for s in samples], label="notices delivered")
    axes[3].set_ylabel("cumulative")
    axes[3].legend(fontsize="small")
    axes[3].set_xlabel("minutes")
    for ax in axes:
        ax.axvline(warmup / 60, color="grey", linestyle=":", linewidth=1)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize="medium")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


async def main_async(args: argparse.Namespace) -> int:
    """Run the soak; print the trends; write the CSV, JSON and plot."""
    import psutil

    started = datetime.now(UTC)
    out_dir = faultlib.ROOT / "var" / "soak"
    work = out_dir / f"run-{started:%Y%m%dT%H%M%SZ}"
    csv_path = out_dir / f"soak-{started:%Y%m%dT%H%M%SZ}.csv"
    out_dir.mkdir(parents=True, exist_ok=True)
    harness = faultlib.Harness(work)
    samples: list[Sample] = []
    duration = args.minutes * 60
    warmup = min(120.0, duration / 5)
    csv_file = csv_path.open("w", newline="")
    rows = csv.DictWriter(csv_file, fieldnames=CSV_FIELDS)
    rows.writeheader()
    try:
        await harness.start_kafka()
        relay = faultlib.Relay(work / "relay", harness.bootstrap)
        relay.env["NOTICE_RELAY_TABLE_STORE"] = args.table_store
        relay.env.update(args.worker_env)
        developers = await faultlib.Developers(relay, harness.ca_file).start()
        worker = faultlib.Worker(relay)
        load = faultlib.Load(relay, args.rate, tag="soak")
        probe = LagProbe(relay)
        try:
            await load.start()
            worker.start()
            await probe.start()
            t0 = time.monotonic()
            proc: psutil.Process | None = None
            faultlib.log(f"soak: {args.minutes} min at {args.rate}/s; worker pid {worker.pid}")
            next_log = 0.0
            while (elapsed := time.monotonic() - t0) < duration:
                worker.check()
                pid = worker.pid
                if pid is not None and (proc is None or proc.pid != pid):
                    proc = psutil.Process(pid)
                    proc.cpu_percent(None)
                if proc is not None and pid is not None:
                    try:
                        lag = await probe.lag()
                    except Exception as exc:  # a sample is skipped, not the run
                        faultlib.log(f"  lag not read: {exc!r}")
                        lag = {}
                    anon, file_backed = rss_split(pid)
                    s = Sample(
                        t=elapsed, rss_mb=proc.memory_info().rss / 2**20,
                        rss_anon_mb=anon, rss_file_mb=file_backed,
                        fds=len(os.listdir(f"/proc/{pid}/fd")), lag=lag,
                        published=len(load.published), delivered=developers.delivered_so_far(),
                        cpu_percent=proc.cpu_percent(None))
                    samples.append(s)
                    rows.writerow(s.row())
                    csv_file.flush()
                    if elapsed >= next_log:
                        faultlib.log(f"  {elapsed / 60:5.1f} min  rss {s.rss_mb:6.1f} MiB "
                                     f"(anon {s.rss_anon_mb:6.1f})  "
                                     f"fds {s.fds:3d}  lag {sum(lag.values()):5d}  "
                                     f"published {s.published}  delivered {s.delivered}  "
                                     f"cpu {s.cpu_percent:.0f}%")
                        next_log = elapsed + 60
                await asyncio.sleep(args.interval)
            await load.stop()
            faultlib.log(f"load stopped: {len(load.published)} declarations; settling")
            t_settle = time.monotonic()
            while developers.tally(load.published).lost_ids and \
                    time.monotonic() - t_settle < 300:
                worker.check()
                await asyncio.sleep(2)
            tally = developers.tally(load.published)
            ids = sorted(load.published)
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                fig = await faultlib.audit_figures(relay, developers, ids, verify=False)
                if fig.complete == len(ids):
                    break
                await asyncio.sleep(3)
            fig = await faultlib.audit_figures(relay, developers, ids)
            code, _ = await faultlib.cli_verify(relay)
        finally:
            await probe.stop()
            if not load.stopped:
                await load.stop()
            await asyncio.to_thread(worker.stop)
            await developers.stop()
    finally:
        csv_file.close()
        await harness.close()

    steady = [s for s in samples if s.t >= warmup]
    mins = [s.t / 60 for s in steady]
    trends = {
        "rss_mb_per_hour": round(60 * slope(mins, [s.rss_mb for s in steady]), 2),
        "rss_anon_mb_per_hour": round(60 * slope(mins, [s.rss_anon_mb for s in steady]), 2),
        "rss_file_mb_per_hour": round(60 * slope(mins, [s.rss_file_mb for s in steady]), 2),
        "fds_per_hour": round(60 * slope(mins, [float(s.fds) for s in steady]), 2),
        # work per declaration that grows with what the store holds shows up here
        "cpu_percent_per_hour": round(60 * slope(mins, [s.cpu_percent for s in steady]), 2),
        "lag_per_minute": round(slope(mins, [float(sum(s.lag.values())) for s in steady]), 3),
        "lag_excluding_retry_tiers_per_minute": round(slope(mins, [
            float(sum(v for k, v in s.lag.items() if k != "retries")) for s in steady]), 3),
    }

    def span(values: list[float]) -> dict[str, float]:
        return {"min": round(min(values), 1), "max": round(max(values), 1),
                "first": round(values[0], 1), "last": round(values[-1], 1)} if values else {}

    parts = quarters(steady)
    summary = {
        "started_at": started.isoformat(), "minutes": args.minutes, "rate": args.rate,
        "table_store": args.table_store,
        "worker_env": dict(args.worker_env),
        "interval_s": args.interval, "warmup_s": warmup, "samples": len(samples),
        "command": "make soak  # python " + " ".join(sys.argv),
        "published": len(load.published), "expected": tally.expected,
        "delivered": tally.delivered, "duplicates": tally.duplicates,
        "lost": len(tally.lost_ids), "worker_crashes": worker.crashes,
        "trails_complete": fig.complete if fig else 0, "trails": len(ids),
        "chains_verify": bool(fig and fig.verified), "cli_verify_exit": code,
        "trends_after_warmup": trends,
        "rss_mb": span([s.rss_mb for s in steady]),
        # a ceiling shows as slopes falling to ~0 from one part to the next; a leak as
        # the same slope in every part
        "rss_mb_per_hour_by_quarter": [
            round(60 * slope([s.t / 60 for s in part], [s.rss_mb for s in part]), 2)
            for part in parts],
        # the load the worker actually had (the target is --rate)
        "published_per_second_by_quarter": [
            round((part[-1].published - part[0].published) / max(1e-9, part[-1].t - part[0].t), 2)
            if len(part) > 1 else 0.0 for part in parts],
        "rss_anon_mb": span([s.rss_anon_mb for s in steady]),
        "rss_file_mb": span([s.rss_file_mb for s in steady]),
        "fds": span([float(s.fds) for s in steady]),
        "lag_total": span([float(sum(s.lag.values())) for s in steady]),
        "lag_max_per_stage": {st: max((s.lag.get(st, 0) for s in steady), default=0)
                              for st in STAGES},
        "worker_cpu_percent_mean": round(sum(s.cpu_percent for s in steady)
                                         / max(1, len(steady)), 1),
        "latency_p50_s": round(sorted(tally.latencies)[len(tally.latencies) // 2], 2)
        if tally.latencies else None,
        "latency_max_s": round(max(tally.latencies), 2) if tally.latencies else None,
    }
    shutil.copyfile(csv_path, out_dir / "latest.csv")
    text = json.dumps(summary, indent=2)
    (out_dir / "latest.json").write_text(text + "\n")
    (work / "summary.json").write_text(text + "\n")
    png = args.plot
    plot(samples, warmup, png, f"notice-relay soak, {started:%Y-%m-%d %H:%M} UTC: "
         f"{args.minutes:g} min at {args.rate:g} declarations/s (x4 notices), "
         f"tables: {args.table_store}")
    print(text)
    print(f"\nCSV {csv_path}\nplot {png}")
    ok = summary["lost"] == 0 and summary["chains_verify"] and code == 0
    return 0 if ok else 1


def _assignment(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def main(argv: list[str] | None = None) -> int:
    """Parse the options and run the soak."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=15.0, help="how long the load runs")
    p.add_argument("--rate", type=float, default=3.0, help="declarations per second")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    p.add_argument("--table-store", choices=("rocksdb", "memory"), default="rocksdb",
                   help="the worker's table store (NOTICE_RELAY_TABLE_STORE)")
    p.add_argument("--worker-env", type=_assignment, action="append", default=[],
                   metavar="NAME=VALUE",
                   help="an environment variable for the worker (repeatable), e.g. "
                        "NOTICE_RELAY_ALLOCATOR=glibc")
    p.add_argument("--plot", type=Path, default=faultlib.ROOT / "docs" / "img" / "soak.png",
                   help="where the PNG goes")
    args = p.parse_args(argv)
    faultlib.quiet_kafka_logs()
    return faultlib.run(lambda: main_async(args))


if __name__ == "__main__":
    raise SystemExit(main())
