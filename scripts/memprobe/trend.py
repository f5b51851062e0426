"""The trend of a soak's memory after its warm-up (docs/reliability.md, finding 7).

Reads a soak's CSV (``var/soak/latest.csv``: ``t_s``, ``rss_mb`` …) or a probe's
``probe.jsonl`` (``min``, ``VmRSS`` …), and prints, for each column asked for, the
means of each ``--block`` minutes between ``--start`` and ``--end`` and the
least-squares slope of those means per hour, with its 95 % interval (Student's t on
the block means: consecutive samples are not independent, block means nearly are).

    python scripts/memprobe/trend.py var/soak/latest.csv --start 60
    python scripts/memprobe/trend.py var/probe/probe.jsonl --start 60 \\
        --column VmRSS --column sqlite_used --column rocks_cache
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
from pathlib import Path

# Two-sided 97.5 % quantiles of Student's t, by degrees of freedom (1-30).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
         2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
         2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(dof: int) -> float:
    """The 97.5 % quantile of Student's t with ``dof`` degrees of freedom (beyond 30,
    an approximation within 0.01; the standard library has no t distribution)."""
    return _T975[dof - 1] if dof <= len(_T975) else 1.96 + 2.4 / dof


def load(path: Path) -> list[dict[str, float]]:
    """The samples, each with ``min`` (minutes since the start) and its figures."""
    rows: list[dict[str, float]] = []
    if path.suffix == ".jsonl":
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            row = {k: float(v) for k, v in rec.items() if isinstance(v, int | float)}
            # the shared RocksDB cache's usage, summed over budgets
            row["rocks_cache"] = float(sum(u for _m, u, _p in rec.get("rocks", [])))
            rows.append(row)
    else:
        with path.open() as fh:
            for rec in csv.DictReader(fh):
                row = {}
                for k, v in rec.items():
                    try:
                        row[k] = float(v)
                    except (TypeError, ValueError):
                        continue
                row["min"] = row["t_s"] / 60
                rows.append(row)
    return rows


def blocks(rows: list[dict[str, float]], column: str, start: float, end: float,
           size: float) -> list[tuple[float, float]]:
    """(middle minute, mean) of each whole block of ``size`` minutes in [start, end)."""
    out = []
    lo = start
    while lo + size <= end + 1e-9:
        got = [r[column] for r in rows if lo <= r["min"] < lo + size and column in r]
        if got:
            out.append((lo + size / 2, sum(got) / len(got)))
        lo += size
    return out


def slope(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares slope (per minute) and the half-width of its 95 % interval."""
    xs, ys = [x for x, _ in points], [y for _, y in points]
    fit = statistics.linear_regression(xs, ys)
    if len(points) < 3:
        return fit.slope, math.inf
    resid = sum((y - fit.intercept - fit.slope * x) ** 2 for x, y in points)
    sxx = statistics.variance(xs) * (len(xs) - 1)
    se = math.sqrt(resid / (len(points) - 2) / sxx)
    return fit.slope, t975(len(points) - 2) * se


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("path", type=Path)
    p.add_argument("--start", type=float, default=60.0, help="first minute counted")
    p.add_argument("--end", type=float, default=None, help="last minute (default: all)")
    p.add_argument("--block", type=float, default=10.0, help="minutes per mean")
    p.add_argument("--column", action="append", default=None,
                   help="figures to follow (default: rss_mb, or VmRSS for a probe file)")
    args = p.parse_args()
    rows = load(args.path)
    # by default up to and including the last sample
    end = args.end if args.end is not None else max(r["min"] for r in rows) + 1e-6
    columns = args.column or (["VmRSS"] if args.path.suffix == ".jsonl" else ["rss_mb"])
    for column in columns:
        points = blocks(rows, column, args.start, end, args.block)
        if len(points) < 2:
            print(f"{column}: fewer than two blocks of {args.block:g} minutes "
                  f"in minutes {args.start:g}-{end:.4g}")
            continue
        b, half = slope(points)
        means = ", ".join(f"{y:.4g}" for _, y in points)
        print(f"{column}: means of {args.block:g} min from minute {args.start:g} "
              f"to {end:.4g}: {means}")
        print(f"  slope {b * 60:+.4g}/h (95 % interval {(b - half) * 60:+.4g} "
              f"to {(b + half) * 60:+.4g}), {len(points)} blocks")


if __name__ == "__main__":
    main()
