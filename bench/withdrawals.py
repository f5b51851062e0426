#!/usr/bin/env python3
"""What the deliver stage's question "was this declaration withdrawn?" costs as the
audit store fills: the poll the worker made once a second before ``5351ae4`` (every
withdrawn key, a scan of ``declarations``: the baseline) against the primary-key read
it makes now (``worker_queries.is_withdrawn``), on a real SQLite store.

The store is filled in steps (``--sizes``) with declarations as the projection writes
them (a relayed Notice v1 JSON of about 1.3 KB each, 1 % of them withdrawn); at each
step both reads are timed (medians over ``--repeat`` runs), and their cost per second
of a worker relaying ``--rate`` declarations/s is worked out: the poll runs once a
second whatever the rate, the point read once per declaration (its tasks share it, see
``notice_relay/withdrawals.py``). Writes ``bench/results/withdrawals.json``.

    python bench/withdrawals.py                       # 10k, 100k, 300k declarations
    python bench/withdrawals.py --sizes 1000,20000 --repeat 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from builders import make_notice  # noqa: E402

from notice_relay.audit import worker_queries  # noqa: E402
from notice_relay.audit.store import AuditStore, declarations  # noqa: E402


async def old_poll(store: AuditStore) -> set[str]:
    """The poll of before ``5351ae4``: every withdrawn declaration's key."""
    q = sa.select(declarations.c.declaration_key).where(declarations.c.status == "withdrawn")
    async with store.engine.connect() as conn:
        return {r[0] for r in await conn.execute(q)}


async def fill(store: AuditStore, start: int, stop: int, notice: str) -> None:
    now = datetime.now(UTC)
    rows = [{"declaration_key": f"artfolio/d-{i:09d}", "publisher_id": "artfolio",
             "declaration_id": f"d-{i:09d}",
             "status": "withdrawn" if i % 100 == 99 else "relayed", "action": "opt_out",
             "artist_ref": f"ar_{i:08d}", "fingerprint": f"{i:064x}", "notice": notice,
             "received_at": now, "updated_at": now} for i in range(start, stop)]
    async with store.engine.begin() as conn:
        for i in range(0, len(rows), 5000):
            await conn.execute(declarations.insert(), rows[i:i + 5000])


async def timed(make: Any, repeat: int) -> float:
    """Median seconds of ``repeat`` awaits of ``make()``."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        await make()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    notice = make_notice().model_dump_json()
    steps = []
    with tempfile.TemporaryDirectory(prefix="nr-bench-withdrawals-") as tmp:
        store = await AuditStore.open(f"sqlite+aiosqlite:///{Path(tmp) / 'audit.db'}")
        try:
            held = 0
            for size in args.sizes:
                await fill(store, held, size, notice)
                held = size
                await old_poll(store)  # warm the caches for both
                poll = await timed(lambda: old_poll(store), args.repeat)
                keys = [f"artfolio/d-{i:09d}" for i in range(0, size, max(1, size // 200))]

                async def reads(keys: list[str] = keys) -> None:
                    for k in keys:
                        await worker_queries.is_withdrawn(store, k)
                point = await timed(reads, args.repeat) / len(keys)
                steps.append({
                    "declarations": size, "poll_ms": poll * 1e3, "point_read_ms": point * 1e3,
                    "poll_core_share": poll,  # once a second
                    "point_core_share": point * args.rate,
                    "ratio": poll / (point * args.rate)})
                s = steps[-1]
                print(f"  {size:>9,} declarations: poll {s['poll_ms']:8.2f} ms "
                      f"({100 * s['poll_core_share']:5.1f} % of a core at 1/s)   "
                      f"point read {s['point_read_ms']:6.3f} ms "
                      f"({100 * s['point_core_share']:5.2f} % at {args.rate:g}/s)   "
                      f"poll / point reads: x{s['ratio']:,.2f}", flush=True)
        finally:
            await store.close()
    return {"measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "rate": args.rate, "repeat": args.repeat, "notice_bytes": len(notice),
            "steps": steps}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="10000,100000,300000",
                   help="store sizes to measure at, comma-separated, increasing")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--rate", type=float, default=10.0,
                   help="declarations per second the worker relays")
    args = p.parse_args()
    args.sizes = [int(x) for x in args.sizes.split(",")]
    print(f"withdrawn-declaration reads on SQLite; baseline: the once-a-second poll "
          f"(median of {args.repeat}):")
    result = asyncio.run(main_async(args))
    out = ROOT / "bench" / "results" / "withdrawals.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results: {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
