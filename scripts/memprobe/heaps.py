"""Where a soak's worker keeps its memory, at chosen minutes (docs/reliability.md,
finding 7): a Markdown table from what the probe (``sitecustomize.py``) wrote to its
``PROBE_DIR``, ``probe.jsonl`` and glibc's ``malloc-<minute>.xml``.

Rows: RSS; glibc's main heap (its span, grown by ``sbrk``; the free memory inside it and
in how many pieces; what is in use); the thread heaps (on the worker, SQLite's
connections' threads); SQLite's own count; pymalloc (bytes in live objects, arenas); the
RocksDB cache's usage and the tables' keys.

    python scripts/memprobe/heaps.py var/probe12 --start 30 --every 30
    python scripts/memprobe/heaps.py var/probe12 --minutes 32,62,92,122
"""

from __future__ import annotations

import argparse
import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Heap:
    """One of glibc's heaps, from ``malloc_info``: ``nr`` 0 is the main heap."""

    nr: int
    span: int
    free: int
    free_pieces: int

    @property
    def in_use(self) -> int:
        """Bytes of the span not free."""
        return self.span - self.free


def heaps(xml_text: str) -> list[Heap]:
    """The heaps of one ``malloc_info`` document."""
    out = []
    # written by glibc inside the probed worker, not taken from outside
    for heap in ET.fromstring(xml_text).iter("heap"):  # noqa: S314
        rest = heap.find("total[@type='rest']")
        current = heap.find("system[@type='current']")
        if rest is None or current is None:
            raise ValueError(f"heap {heap.get('nr')}: no 'rest' total or 'current' size")
        out.append(Heap(nr=int(heap.get("nr", "0")), span=int(current.get("size", "0")),
                        free=int(rest.get("size", "0")),
                        free_pieces=int(rest.get("count", "0"))))
    return out


def chosen(minutes: list[float], start: float, every: float) -> list[float]:
    """The first sampled minute at or past ``start``, ``start + every`` …"""
    out: list[float] = []
    mark = start
    for m in sorted(minutes):
        if m >= mark:
            out.append(m)
            while mark <= m:
                mark += every
    return out


def table(probe_dir: Path, wanted: list[float]) -> str:
    """The Markdown table for the sampled minutes ``wanted``."""
    records = {}
    for line in (probe_dir / "probe.jsonl").read_text().splitlines():
        rec = json.loads(line)
        records[float(rec["min"])] = rec
    cols: list[tuple[float, dict[str, Any], list[Heap]]] = []
    for m in wanted:
        rec = records.get(m)
        if rec is None:
            raise SystemExit(f"no sample at minute {m:g} in {probe_dir / 'probe.jsonl'}")
        xml = probe_dir / f"malloc-{m:06.1f}.xml"
        cols.append((m, rec, heaps(xml.read_text()) if xml.exists() else []))

    def mb(v: float) -> str:
        return f"{v / 1e6:.1f}"

    def main_heap(hs: list[Heap]) -> Heap | None:
        return next((h for h in hs if h.nr == 0), None)

    rows: list[tuple[str, list[str]]] = [
        ("RSS (MiB)", [f"{float(r['VmRSS']):.1f}" for _, r, _ in cols]),
        ("main heap: span / free (pieces) / in use (MB)", [
            f"{mb(h.span)} / {mb(h.free)} ({h.free_pieces}) / {mb(h.in_use)}"
            if (h := main_heap(hs)) else "—" for _, _, hs in cols]),
        ("thread heaps, in use (MB)", [
            " + ".join(mb(h.in_use) for h in hs if h.nr != 0) or "—" for _, _, hs in cols]),
        ("SQLite's own count (MB)", [mb(r.get("sqlite_used", 0)) for _, r, _ in cols]),
        ("pymalloc: in live objects (MB) / arenas", [
            f"{mb(r.get('pymalloc bytes in allocated blocks', 0))} / "
            f"{r.get('pymalloc arenas allocated current', '—')}" for _, r, _ in cols]),
        ("RocksDB: cache (MB) / keys", [
            f"{mb(sum(u for _m, u, _p in r.get('rocks', [])))} / "
            f"{int(r.get('rocks_estimate-num-keys', 0)):,}" for _, r, _ in cols]),
    ]
    head = "| minute | " + " | ".join(f"{m:g}" for m, _, _ in cols) + " |"
    lines = [head, "|---|" + "---|" * len(cols)]
    lines += [f"| {name} | " + " | ".join(vals) + " |" for name, vals in rows]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("probe_dir", type=Path)
    p.add_argument("--start", type=float, default=30.0, help="first minute shown")
    p.add_argument("--every", type=float, default=30.0, help="minutes between columns")
    p.add_argument("--minutes", default=None,
                   help="sampled minutes to show, comma-separated (instead of --start/--every)")
    args = p.parse_args()
    if args.minutes:
        wanted = [float(x) for x in args.minutes.split(",")]
    else:
        lines = (args.probe_dir / "probe.jsonl").read_text().splitlines()
        wanted = chosen([float(json.loads(x)["min"]) for x in lines], args.start, args.every)
    print(table(args.probe_dir, wanted))


if __name__ == "__main__":
    main()
