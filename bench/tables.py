#!/usr/bin/env python3
"""What the worker's two tables cost in memory as declarations accumulate, per store.

The normalize stage keeps one ``declarations-seen`` entry per declaration and one
``artist-versions`` entry per artist. This writes entries of the same shape (the
serialized keys and values the worker writes, spread over the same 4 partitions) for
``--declarations`` declarations, each with an artist of its own, into

- ``memory``: faust's memory store (a dict of serialized keys and values per table);
- ``rocksdb``: RocksDB as the worker opens it (``tablestore.BudgetedOptions`` built
  from ``notice_relay.app.ROCKSDB_OPTIONS`` and the default memory budget, one database
  per table and partition, one cache for all), reading each key before writing it, as
  the duplicate check does;
- ``rocksdb-per-db``: the same with faust's own ``RocksDBOptions`` (a 2 MiB block
  cache per database, index and filter blocks outside it: the worker's options before
  the budget);

each in a process of its own, sampling the process's RSS every ``--every`` entries.
Prints the RSS growth per million declarations (least-squares slope over the second
half, after the write buffers have filled) and writes ``bench/results/tables.json``.

    python bench/tables.py                      # 1,000,000 declarations
    python bench/tables.py --declarations 200000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PARTITIONS = 4
STORES = ("memory", "rocksdb", "rocksdb-per-db")


def _rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _entries(i: int) -> tuple[int, bytes, bytes, bytes, bytes]:
    """The partition and the (key, value) of each table for declaration ``i``."""
    part = i % PARTITIONS
    decl = json.dumps(f"artfolio/decl-{i:09d}").encode()
    seen = json.dumps(f"{i:064x}@notice-relay.declarations:{part}:{i}").encode()
    artist = json.dumps(f"artfolio/artist-{i:09d}").encode()
    return part, decl, seen, artist, b"1"


def child(store: str, n: int, every: int, work: Path) -> dict[str, Any]:
    """Fill one store; return its RSS samples."""
    samples: list[tuple[int, float]] = [(0, _rss_mib())]
    t0 = time.perf_counter()
    if store == "memory":
        tables: dict[str, dict[bytes, bytes]] = {"seen": {}, "versions": {}}
        for i in range(1, n + 1):
            _, dk, dv, ak, av = _entries(i)
            if tables["seen"].get(dk) is None:
                tables["seen"][dk] = dv
            tables["versions"][ak] = av
            if i % every == 0:
                samples.append((i, _rss_mib()))
        disk = 0
        rocks: dict[str, int] = {}
    else:
        from faust.stores.rocksdb import RocksDBOptions

        from notice_relay.app import ROCKSDB_OPTIONS
        from notice_relay.tablestore import BudgetedOptions

        options = {k: v for k, v in ROCKSDB_OPTIONS.items() if k != "driver"}
        opts = (BudgetedOptions(**options) if store == "rocksdb" else
                RocksDBOptions(**options, block_cache_size=2 << 20, use_rocksdict=True))
        dbs = {(t, p): opts.open(work / f"{t}-{p}.db")
               for t in ("seen", "versions") for p in range(PARTITIONS)}
        samples[0] = (0, _rss_mib())
        for i in range(1, n + 1):
            part, dk, dv, ak, av = _entries(i)
            seen = dbs[("seen", part)]
            if seen.get(dk) is None:
                seen.put(dk, dv)
            dbs[("versions", part)].put(ak, av)
            if i % every == 0:
                samples.append((i, _rss_mib()))
        for db in dbs.values():
            db.flush()
        # RocksDB's own account, summed over the databases (a shared cache is
        # counted once).
        def total(prop: str) -> int:
            return sum(db.property_int_value(prop) or 0 for db in dbs.values())
        def cache(prop: str) -> int:
            return (dbs[("seen", 0)].property_int_value(prop) or 0 if store == "rocksdb"
                    else total(prop))
        rocks = {
            "table_readers_bytes": total("rocksdb.estimate-table-readers-mem"),
            "memtables_bytes": total("rocksdb.size-all-mem-tables"),
            "block_cache_bytes": cache("rocksdb.block-cache-usage"),
            "block_cache_capacity_bytes": cache("rocksdb.block-cache-capacity"),
        }
        disk = sum(f.stat().st_size for f in work.rglob("*") if f.is_file())
        for db in dbs.values():
            db.close()
    return {"store": store, "samples": samples, "seconds": time.perf_counter() - t0,
            "disk_bytes": disk, "rocksdb": rocks}


def slope(points: list[tuple[int, float]]) -> float:
    """Least-squares MiB per entry."""
    xs = [float(x) for x, _ in points]
    ys = [y for _, y in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


def main() -> int:
    """Run each store in a child process and print the comparison."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--declarations", type=int, default=1_000_000)
    p.add_argument("--every", type=int, default=50_000)
    p.add_argument("--child", choices=STORES, help=argparse.SUPPRESS)
    p.add_argument("--stores", default=",".join(STORES),
                   help="which stores to measure, comma-separated")
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.declarations, args.every, args.work)))
        return 0
    results: dict[str, Any] = {}
    for store in args.stores.split(","):
        work = Path(tempfile.mkdtemp(prefix=f"tables-{store}-"))
        try:
            out = subprocess.run(
                [sys.executable, __file__, "--child", store, "--declarations",
                 str(args.declarations), "--every", str(args.every), "--work", str(work)],
                capture_output=True, check=True, text=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        r = json.loads(out.stdout)
        pts = r["samples"]
        half = [pt for pt in pts if pt[0] >= args.declarations // 2]
        r["rss_start_mib"] = round(pts[0][1], 1)
        r["rss_end_mib"] = round(pts[-1][1], 1)
        r["rss_max_mib"] = round(max(y for _, y in pts), 1)
        r["mib_per_million_second_half"] = round(slope(half) * 1e6, 1)
        r["bytes_per_declaration_second_half"] = round(slope(half) * 2**20, 1)
        results[store] = r
        print(f"{store:8s} {args.declarations:,} declarations in {r['seconds']:.1f} s: "
              f"RSS {r['rss_start_mib']:.1f} -> {r['rss_end_mib']:.1f} MiB "
              f"(max {r['rss_max_mib']:.1f}); growth over the second half "
              f"{r['mib_per_million_second_half']:+.1f} MiB per million "
              f"({r['bytes_per_declaration_second_half']:+.1f} B/declaration); "
              f"on disk {r['disk_bytes'] / 2**20:.1f} MiB")
        if r["rocksdb"]:
            print("         RocksDB's account (MiB): " + ", ".join(
                f"{k.removesuffix('_bytes').replace('_', ' ')} {v / 2**20:.2f}"
                for k, v in r["rocksdb"].items()))
    growth = {k: r["rss_end_mib"] - r["rss_start_mib"] for k, r in results.items()}
    base = growth.get("memory")
    if base:
        print("RSS growth over the run, as a share of the memory store's: " + ", ".join(
            f"{k} {g:+.1f} MiB ({g / base:.3f})" for k, g in growth.items()))
    dest = ROOT / "bench" / "results" / "tables.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps({
        "command": "python " + " ".join(sys.argv),
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "declarations": args.declarations, "partitions": PARTITIONS,
        "results": results,
    }, indent=2) + "\n")
    print(f"wrote {dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
