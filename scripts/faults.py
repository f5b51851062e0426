"""The fault suite (``make faults``): every scenario under steady load, one row each.

Scenarios (see ``scripts/faultlib.py``):

  a  the worker SIGKILLed at random moments (12 times by default), each time restarted
  b  two workers sharing the partitions, one SIGKILLed (rebalance under load), restarted
  c  the Kafka broker stopped and started again (same data dir, same ports)
  d  a webhook receiver down longer than several retry steps
  e  the SMTP server answering 421/451 for a while, then recovering
  f  the audit store's database (PostgreSQL) stopped, then started again

Each row: declarations published, notices expected, delivered, duplicates (the same
webhook-id / delivery id received more than once), lost (must be 0), audit trails
complete, and whether every hash chain verifies (``notice-relay audit verify``).
Results go to ``var/faults/latest.json`` (and the run's own directory, with every
process log). Exit code 0 when every scenario passed.

    python scripts/faults.py                 # the full suite
    python scripts/faults.py --only a,c      # some scenarios
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import faultlib


def machine() -> dict[str, object]:
    """What the figures were measured on."""
    import os

    import psutil

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu, "cpus": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "os": platform.platform(), "python": platform.python_version(),
        "kafka": faultlib.localkafka.KAFKA_VERSION,
    }


async def main_async(args: argparse.Namespace) -> int:
    """Run the selected scenarios; print and save the table."""
    keys = [k.strip() for k in args.only.split(",")] if args.only else list(faultlib.SCENARIOS)
    unknown = [k for k in keys if k not in faultlib.SCENARIOS]
    if unknown:
        sys.stderr.write(f"unknown scenario(s): {unknown}; known: {list(faultlib.SCENARIOS)}\n")
        return 2
    started = datetime.now(UTC)
    out_dir = faultlib.ROOT / "var" / "faults"
    work = out_dir / f"run-{started:%Y%m%dT%H%M%SZ}"
    params = faultlib.ScenarioParams(
        rate=args.rate, min_load=args.min_load, kills=args.kills, outage=args.outage,
        settle=args.settle, seed=args.seed)
    harness = faultlib.Harness(work)
    results: list[faultlib.Result] = []
    errors: dict[str, str] = {}
    t0 = time.monotonic()
    try:
        await harness.start_kafka()
        for key in keys:
            try:
                results.append(await faultlib.run_scenario(harness, key, params))
            except Exception as exc:  # reported, and the others still run
                faultlib.log(f"scenario {key} could not run: {exc!r}")
                errors[key] = repr(exc)
                if harness.kafka is None or not faultlib.localkafka.running(work / "kafka"):
                    await harness.start_kafka()
    finally:
        await harness.close()
    took = time.monotonic() - t0
    print()
    print(faultlib.format_table(results))
    for r in results:
        print(f"  {r.scenario}: {r.fault}; p50 latency {r.latency_p50_s}s, "
              f"max {r.latency_max_s}s; sweeper re-sends {r.sweeper_resends}, "
              f"re-fan-outs {r.sweeper_refanouts}; worker crashes {r.worker_crashes}")
    for k, e in errors.items():
        print(f"  {k}: did not run: {e}")
    data = {
        "started_at": started.isoformat(), "took_seconds": round(took),
        "command": "make faults  # python " + " ".join(sys.argv),
        "machine": machine(), "params": params.__dict__ | {"kill_gap": list(params.kill_gap)},
        "settings": faultlib.FAST_SETTINGS,
        "results": [r.as_json() for r in results], "errors": errors,
        "passed": not errors and all(r.passed for r in results),
    }
    text = json.dumps(data, indent=2)
    (work / "results.json").write_text(text + "\n")
    (out_dir / "latest.json").write_text(text + "\n")
    print(f"\nresults: {out_dir / 'latest.json'} (logs in {work}); {took / 60:.1f} min")
    return 0 if data["passed"] else 1


def main(argv: list[str] | None = None) -> int:
    """Parse the options and run the suite."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", help="comma-separated scenario keys (a-f)")
    p.add_argument("--rate", type=float, default=2.0, help="declarations per second")
    p.add_argument("--kills", type=int, default=12, help="SIGKILLs in scenario a")
    p.add_argument("--outage", type=float, default=30.0, help="seconds each outage lasts")
    p.add_argument("--min-load", type=float, default=60.0, help="seconds of load at least")
    p.add_argument("--settle", type=float, default=300.0,
                   help="seconds to wait for every notice and trail afterwards")
    p.add_argument("--seed", type=int, default=None, help="random seed (kill moments)")
    args = p.parse_args(argv)
    faultlib.quiet_kafka_logs()
    return faultlib.run(lambda: main_async(args))


if __name__ == "__main__":
    raise SystemExit(main())
