#!/usr/bin/env python3
"""The audit store's SQLite page cache: write speed and memory against its size.

``python bench/store_cache.py [--prefill N] [--batches M] [--rounds R] [--sizes ...]``
(``make bench-store-cache``).

A store is first filled with ``N`` declarations' trails as a worker writes them (one
declaration received and normalized, four deliveries planned, attempted and
delivered: 14 events). Then, for each cache size, a copy of that database is opened
by a process of its own, which appends ``M`` more batches the way the worker's
projector does at 10 declarations/s: one batch every 0.1 s, holding one declaration's
first events and the attempts and deliveries of the one before it in the same
partition, one append at a time (the projector is one actor, so the pool hands it the
same connection and its cache lives on). It reports the events stored per second and
SQLite's own memory count (``sqlite3_memory_used``) at the end. Sizes are measured in
alternating order for ``R`` rounds; the figures are medians, and write speed is given
as a ratio to the first size (SQLite's default) measured in the same run. Results:
``bench/results/store_cache.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from notice_relay.audit.events import audit_event
from notice_relay.audit.store import AuditStore
from notice_relay.models import AuditEvent, AuditType

RESULTS = Path(__file__).parent / "results" / "store_cache.json"
T0 = datetime(2026, 9, 1, tzinfo=UTC)
LANES = 4
DEVS = ("acme-ai", "brush", "canvas-labs", "dall-co")


def _first(i: int) -> list[AuditEvent]:
    key, at = f"pub-{i % 7}/decl-{i:08d}", T0 + timedelta(seconds=i / 10)
    evs = [audit_event(AuditType.DECLARATION_RECEIVED, key, occurred_at=at,
                       data={"artist_ref": f"art_{i:012x}", "works": 3}),
           audit_event(AuditType.DECLARATION_NORMALIZED, key, occurred_at=at,
                       data={"fingerprint": f"{i:064x}"})]
    for d in DEVS:
        evs.append(audit_event(AuditType.DELIVERY_PLANNED, key, delivery_id=f"dlv_{i:08d}_{d}",
                               developer_id=d, occurred_at=at,
                               data={"channel": "webhook", "channel_type": "webhook"}))
    return evs


def _rest(i: int) -> list[AuditEvent]:
    key, at = f"pub-{i % 7}/decl-{i:08d}", T0 + timedelta(seconds=i / 10 + 0.05)
    evs = []
    for d in DEVS:
        did = f"dlv_{i:08d}_{d}"
        evs.append(audit_event(AuditType.DELIVERY_ATTEMPTED, key, unique=(1,), delivery_id=did,
                               developer_id=d, occurred_at=at,
                               data={"channel": "webhook", "channel_type": "webhook",
                                     "attempt": 1}))
        evs.append(audit_event(AuditType.DELIVERY_DELIVERED, key, unique=(1,), delivery_id=did,
                               developer_id=d, occurred_at=at,
                               data={"channel": "webhook", "channel_type": "webhook",
                                     "status_code": 200, "receipt": f"r{i}"}))
    return evs


def _batch(i: int, lanes: int) -> list[AuditEvent]:
    """Declaration ``i``'s first events and the rest of the one before it in its lane."""
    return _first(i) + _rest(i - lanes)


async def _prefill(path: Path, n: int) -> None:
    store = await AuditStore.open(f"sqlite+aiosqlite:///{path}")
    try:
        for start in range(0, n, 200):
            evs: list[AuditEvent] = []
            for i in range(start, min(n, start + 200)):
                evs += _first(i) + _rest(i)
            await store.append(evs)
    finally:
        await store.close()


async def _arm(path: Path, start: int, batches: int, cache_kib: int) -> dict[str, float]:
    store = await AuditStore.open(f"sqlite+aiosqlite:///{path}", sqlite_cache_kib=cache_kib)
    work = [_batch(i, LANES) for i in range(start, start + batches)]
    events = sum(len(b) for b in work)
    try:
        # One append at a time, as the worker's projector (one actor for all its
        # partitions) writes: the pool hands it the same connection, whose cache keeps
        # its pages from one transaction to the next.
        t = time.perf_counter()
        for b in work:
            await store.append(b)
        took = time.perf_counter() - t
    finally:
        lib = ctypes.CDLL("libsqlite3.so.0")
        lib.sqlite3_memory_used.restype = ctypes.c_int64
        used = lib.sqlite3_memory_used()
        await store.close()
    return {"events_per_s": events / took, "sqlite_mb": used / 1e6, "seconds": took}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prefill", type=int, default=50_000, help="declarations stored first")
    ap.add_argument("--batches", type=int, default=4_000, help="batches appended per measure")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sizes", type=int, nargs="+", default=[0, 1024, 512, 256],
                    help="cache sizes in KiB (0: SQLite's default)")
    ap.add_argument("--arm", nargs=4, metavar=("DB", "START", "BATCHES", "KIB"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.arm:
        db, start, batches, kib = args.arm
        print(json.dumps(asyncio.run(_arm(Path(db), int(start), int(batches), int(kib)))))
        return 0

    with tempfile.TemporaryDirectory(prefix="store-cache-") as tmp:
        base = Path(tmp) / "base.db"
        t = time.perf_counter()
        asyncio.run(_prefill(base, args.prefill))
        print(f"prefilled {args.prefill:,} declarations ({args.prefill * 14:,} events, "
              f"{base.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - t:.0f} s",
              flush=True)
        runs: dict[int, list[dict[str, float]]] = {s: [] for s in args.sizes}
        for r in range(args.rounds):
            order = args.sizes if r % 2 == 0 else list(reversed(args.sizes))
            for size in order:
                db = Path(tmp) / f"arm-{size}.db"
                for suffix in ("", "-wal", "-shm"):
                    src = Path(f"{base}{suffix}")
                    if src.exists():
                        shutil.copyfile(src, f"{db}{suffix}")
                out = subprocess.run(
                    [sys.executable, __file__, "--arm", str(db), str(args.prefill),
                     str(args.batches), str(size)],
                    capture_output=True, text=True, env=os.environ)
                if out.returncode:
                    sys.exit(f"cache {size}: the measuring process failed:\n{out.stderr}")
                res = json.loads(out.stdout.strip().splitlines()[-1])
                runs[size].append(res)
                print(f"round {r + 1} cache {size or 'default'}: "
                      f"{res['events_per_s']:,.0f} events/s, SQLite {res['sqlite_mb']:.2f} MB",
                      flush=True)
                for suffix in ("", "-wal", "-shm"):
                    Path(f"{db}{suffix}").unlink(missing_ok=True)

    base_speed = statistics.median(x["events_per_s"] for x in runs[args.sizes[0]])
    table = []
    for size in args.sizes:
        speed = statistics.median(x["events_per_s"] for x in runs[size])
        mem = statistics.median(x["sqlite_mb"] for x in runs[size])
        table.append({"cache_kib": size, "events_per_s": round(speed),
                      "ratio_to_first": round(speed / base_speed, 3),
                      "sqlite_mb": round(mem, 2)})
    print(f"\n{'cache':>8} {'events/s':>10} {'ratio':>7} {'SQLite MB':>10}")
    for row in table:
        print(f"{row['cache_kib'] or 'default':>8} {row['events_per_s']:>10,} "
              f"{row['ratio_to_first']:>7.3f} {row['sqlite_mb']:>10.2f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "prefill": args.prefill, "batches": args.batches, "rounds": args.rounds,
        "results": table, "runs": {str(k): v for k, v in runs.items()}}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
