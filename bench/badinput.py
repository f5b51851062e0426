#!/usr/bin/env python3
"""What bad input costs the relay (``make bench-badinput``): does a flood of bad
declarations slow down or stall the good ones, and how fast does a worker refuse them?

On a real local Kafka, a real worker and real receivers that verify every signature
(the machinery of ``bench/run.py``), with the hand-made corpus of
``tests/corpus/bad/`` (327 files; every one must be refused):

1. **latency of valid declarations**, publish → receipt, at ``--rate`` declarations/s
   to ``--developers`` webhook developers, for ``--seconds``: alone (the baseline),
   then with ``--bad-per-valid`` bad declarations published between every two valid
   ones, then alone again (so that a drift of the machine shows);
2. **throughput**: ``--count`` valid declarations published while the worker is
   frozen (SIGSTOP), then released: declarations relayed per second until the last
   delivery is recorded; then as many bad declarations (the corpus over and over):
   refusals per second until the last one is on the rejected topic. CPU seconds are
   the worker's own over each window.

Every bad declaration must come out on the rejected topic and every valid one must be
delivered to every developer, or the run fails. Writes ``bench/results/badinput.json``.

    python bench/badinput.py                      # 5/s for 30 s, 10 bad per valid
    python bench/badinput.py --seconds 10 --count 300
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import common  # noqa: E402
from run import DEFAULT_CLIENT, RESULTS, Bench, cpu_seconds, log, machine  # noqa: E402

from notice_relay.topics import Topics  # noqa: E402

CORPUS = ROOT / "tests" / "corpus" / "bad"


def corpus() -> list[bytes]:
    """The committed bad declarations, in manifest order (the four generated at test
    time are left out: the 8 MiB one is over the broker's message limit)."""
    import tomllib

    manifest = tomllib.loads((CORPUS / "manifest.toml").read_text(encoding="utf-8"))
    return [(CORPUS / name).read_bytes() for name in manifest["files"]]


class RejectedReader:
    """Counts the records on the rejected topic from the moment it starts."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None,
                                         auto_offset_reset="latest",
                                         enable_auto_commit=False,
                                         fetch_max_bytes=16 << 20,
                                         max_partition_fetch_bytes=16 << 20)
        self.count = 0
        self.last_ms = 0

    async def start(self) -> None:
        """Subscribe and settle at the end of every partition."""
        await self.consumer.start()
        await self.consumer.getmany(timeout_ms=1000)
        await self.consumer.seek_to_end()
        # seek_to_end is lazy: a position per partition makes it take effect now.
        for tp in self.consumer.assignment():
            await self.consumer.position(tp)

    async def wait(self, n: int, limit_s: float, proc: Any) -> None:
        """Until ``n`` more records arrived (their latest broker timestamp kept)."""
        want = self.count + n
        deadline = time.monotonic() + limit_s
        while self.count < want:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"{want - self.count} of {n} refusals missing "
                                   f"after {limit_s:.0f}s")
            batch = await self.consumer.getmany(timeout_ms=500)
            for msgs in batch.values():
                self.count += len(msgs)
                self.last_ms = max([self.last_ms, *(m.timestamp for m in msgs)])

    async def stop(self) -> None:
        """Close the consumer."""
        await self.consumer.stop()


async def latency(bench: Bench, topic: str, run: str, devs: list[str],
                  first: int, args: argparse.Namespace, bad: list[bytes],
                  rejected: RejectedReader, proc: Any, bad_per_valid: int) -> dict[str, Any]:
    """Valid declarations ``first``… at ``args.rate``/s for ``args.seconds``, with
    ``bad_per_valid`` bad ones after each; the valid ones' latency to the receivers."""
    n_valid = max(1, int(args.rate * args.seconds))
    per = bad_per_valid + 1
    plan: list[tuple[bytes, bytes, list[Any]]] = []
    valid_at: dict[int, int] = {}
    for v in range(n_valid):
        i = first + v
        valid_at[len(plan)] = i
        plan.append((f"{common.PUBLISHER}/artist-{i:07d}".encode(),
                     common.declaration(run, i), []))
        for b in range(bad_per_valid):
            k = v * bad_per_valid + b
            plan.append((f"bad-{k}".encode(), bad[k % len(bad)], []))
    await bench.reset()
    sent = await bench.publish_paced(topic, lambda j: plan[j], len(plan), args.rate * per)
    n_bad = len(plan) - n_valid
    if n_bad:
        await rejected.wait(n_bad, 300, proc)
    await bench.wait_received(n_valid * len(devs), 300, proc)
    arr = await bench.arrivals()
    lat = []
    for j, i in valid_at.items():
        for wid in common.delivery_ids(run, i, devs):
            if wid not in arr:
                raise RuntimeError(f"delivery {wid} of declaration {i} never arrived")
            lat.append((arr[wid] - sent[j]) * 1000)
    return {"valid_per_s": args.rate, "bad_per_s": args.rate * bad_per_valid,
            "valid": n_valid, "bad": n_bad, "deliveries": len(lat),
            "latency_ms": common.percentiles(lat)}


async def throughput(bench: Bench, root: Path, topic: str, run: str, devs: list[str],
                     first: int, count: int, bad: list[bytes] | None,
                     rejected: RejectedReader, proc: Any, warm: int) -> dict[str, Any]:
    """``count`` declarations published while the worker is frozen, then released:
    valid ones (``bad`` None) until their deliveries are recorded, else bad ones until
    all are refused."""
    if bad is None:
        msgs = [(f"{common.PUBLISHER}/artist-{i:07d}".encode(), common.declaration(run, i), [])
                for i in range(first, first + count)]
    else:
        msgs = [(f"bad-{k}".encode(), bad[k % len(bad)], []) for k in range(count)]
    cpu0, t0 = await bench.publish_frozen([proc], topic, msgs)
    if bad is None:
        t_end = await bench.wait_delivered(root, warm + count * len(devs), 600, proc)
    else:
        await rejected.wait(count, 600, proc)
        t_end = rejected.last_ms / 1000
    cpu = cpu_seconds(proc.pid) - cpu0
    elapsed = t_end - t0
    return {"kind": "valid" if bad is None else "bad", "declarations": count,
            "seconds": round(elapsed, 3), "declarations_per_s": round(count / elapsed, 1),
            "cpu_s": round(cpu, 3), "cpu_ms_per_declaration": round(cpu / count * 1000, 3)}


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    """Every phase; the results."""
    bad = corpus()
    ns = argparse.Namespace(receivers=2, keep=False, table_store="rocksdb", workers=1,
                            profile_gil=False, latency_dump=None)
    bench = Bench(ns)
    await bench.start()
    res: dict[str, Any] = {"machine": machine(), "command": "make bench-badinput",
                           "corpus_files": len(bad), "developers": args.developers}
    try:
        run = uuid.uuid4().hex[:8]
        root = bench.work / f"badinput-{run}"
        root.mkdir(parents=True)
        env, settings = bench.relay_env(root, args.developers, DEFAULT_CLIENT)
        topics = Topics.from_settings(settings)
        await bench.prepare_topics(settings)
        devs = common.developer_ids(args.developers)
        proc = bench.start_worker(root, env, "worker")
        rejected = RejectedReader(bench.node.bootstrap, topics.rejected)
        try:
            await bench.publish(topics.declarations,
                                [(b"warm", common.declaration(run, 0), [])])
            await bench.wait_delivered(root, len(devs), 180, proc)
            # Started once the worker runs: every partition of the topic has its leader.
            await rejected.start()
            await bench.publish(topics.declarations, [(b"warm-bad", bad[0], [])])
            await rejected.wait(1, 60, proc)
            log(f"worker ready; {len(bad)} corpus files, {args.developers} developers")
            runs = []
            for label, k, first in (("alone", 0, 100_000), ("with bad", args.bad_per_valid,
                                                            200_000),
                                    ("alone again", 0, 300_000)):
                r = await latency(bench, topics.declarations, run, devs, first, args,
                                  bad, rejected, proc, k)
                r["label"] = label
                runs.append(r)
                log(f"  latency {label}: {r['valid_per_s']:g} valid/s + {r['bad_per_s']:g} "
                    f"bad/s: p50 {r['latency_ms']['p50']} ms, p99 {r['latency_ms']['p99']} ms,"
                    f" max {r['latency_ms']['max']} ms")
            res["latency"] = runs
            warm = len(devs) + sum(r["valid"] for r in runs) * len(devs)
            tv = await throughput(bench, root, topics.declarations, run, devs, 1_000_000,
                                  args.count, None, rejected, proc, warm)
            log(f"  throughput valid: {tv['declarations_per_s']} declarations/s "
                f"({tv['cpu_ms_per_declaration']} CPU ms each)")
            tb = await throughput(bench, root, topics.declarations, run, devs, 0,
                                  args.count, bad, rejected, proc, warm)
            log(f"  throughput bad: {tb['declarations_per_s']} refusals/s "
                f"({tb['cpu_ms_per_declaration']} CPU ms each)")
            res["throughput"] = [tv, tb]
            alone, mixed = (runs[0], runs[2]), runs[1]

            def vs_alone(q: str) -> float:
                base = statistics.mean(r["latency_ms"][q] for r in alone)
                return round(mixed["latency_ms"][q] / base, 2)

            res["ratios"] = {
                "p50_with_bad_vs_alone": vs_alone("p50"),
                "p99_with_bad_vs_alone": vs_alone("p99"),
                "refusals_vs_relays_per_s": round(
                    tb["declarations_per_s"] / tv["declarations_per_s"], 2),
            }
            res["worker_alive"] = proc.poll() is None
        finally:
            await rejected.stop()
            bench.stop_worker(proc)
    finally:
        await bench.stop()
    return res


def main() -> int:
    """Command line."""
    p = argparse.ArgumentParser(description="what bad input costs the relay")
    p.add_argument("--rate", type=float, default=5.0, help="valid declarations per second")
    p.add_argument("--seconds", type=float, default=30.0, help="length of each latency run")
    p.add_argument("--bad-per-valid", type=int, default=10,
                   help="bad declarations published after each valid one")
    p.add_argument("--developers", type=int, default=4, help="webhook developers")
    p.add_argument("--count", type=int, default=1000,
                   help="declarations of each throughput run")
    p.add_argument("--out", type=Path, default=RESULTS / "badinput.json")
    args = p.parse_args()
    t0 = time.monotonic()
    res = asyncio.run(main_async(args))
    res["total_s"] = round(time.monotonic() - t0, 1)
    res["params"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res["ratios"], indent=2))
    print(f"results: {args.out} ({res['total_s']}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
