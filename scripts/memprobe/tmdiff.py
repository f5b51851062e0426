"""What Python holds more of at one point of a soak than at another, by call stack.

Compares two ``tracemalloc`` snapshots written by the memory probe
(``PROBE_TRACEMALLOC``, ``PROBE_SNAPSHOTS``; see ``sitecustomize.py``) and prints the
stacks whose held memory changed most, largest growth first::

    python scripts/memprobe/tmdiff.py var/probe8/tm-0030.1.pickle var/probe8/tm-0120.0.pickle

Only allocations made through Python's allocators are traced: what SQLite, RocksDB or
OpenSSL take with ``malloc`` themselves is not in these snapshots.
"""

from __future__ import annotations

import argparse
import tracemalloc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--top", type=int, default=25, help="how many stacks to print")
    parser.add_argument("--key", choices=("traceback", "lineno", "filename"),
                        default="traceback", help="how to group the blocks")
    parser.add_argument("--frames", type=int, default=6,
                        help="the innermost frames printed per stack (printed outermost first)")
    args = parser.parse_args()

    before = tracemalloc.Snapshot.load(args.before)
    after = tracemalloc.Snapshot.load(args.after)
    total_before = sum(t.size for t in before.traces)
    total_after = sum(t.size for t in after.traces)
    print(f"traced: {total_before / 1e6:.2f} MB -> {total_after / 1e6:.2f} MB "
          f"({(total_after - total_before) / 1e6:+.2f} MB); "
          f"blocks {len(before.traces):,} -> {len(after.traces):,}")
    stats = after.compare_to(before, args.key)
    for stat in stats[: args.top]:
        print(f"\n{stat.size_diff / 1e3:+10.1f} kB  {stat.count_diff:+8,d} blocks  "
              f"(now {stat.size / 1e3:.1f} kB in {stat.count:,})")
        frames = stat.traceback.format(limit=args.frames)
        for line in frames:
            print("    " + line)


if __name__ == "__main__":
    main()
