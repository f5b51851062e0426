"""Sum a process's resident memory by kind of mapping, every few seconds, from outside
(docs/reliability.md, finding 7): the main heap (``[heap]``), glibc's thread heaps
(anonymous mappings aligned on 64 MiB), other anonymous memory (CPython's arenas,
blocks mapped on their own, stacks) and file-backed memory. One JSON line per sample.

    python scripts/memprobe/smaps.py <pid> <seconds between samples> <out.jsonl>
"""

from __future__ import annotations

import json
import sys
import time

HEAP_ALIGN = 64 << 20


def kinds(pid: str) -> dict[str, float]:
    """Resident MiB per kind of mapping."""
    total = {"heap": 0, "thread_heaps": 0, "stack": 0, "other_anon": 0, "file": 0}
    current = None
    with open(f"/proc/{pid}/smaps") as fh:
        for line in fh:
            f = line.split()
            if not f[0].endswith(":") and "-" in f[0]:
                start = int(f[0].split("-")[0], 16)
                name = f[5] if len(f) > 5 else ""
                if name == "[heap]":
                    current = "heap"
                elif name.startswith("[stack"):
                    current = "stack"
                elif name:
                    current = "file"
                elif start % HEAP_ALIGN == 0:
                    current = "thread_heaps"
                else:
                    current = "other_anon"
            elif f[0] == "Rss:" and current:
                total[current] += int(f[1])
    return {k: round(v / 1024, 2) for k, v in total.items()}


def main() -> None:
    pid, every, out = sys.argv[1], float(sys.argv[2]), sys.argv[3]
    t0 = time.monotonic()
    while True:
        try:
            rec = {"min": round((time.monotonic() - t0) / 60, 1), **kinds(pid)}
        except FileNotFoundError:  # the process ended
            return
        with open(out, "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        time.sleep(every)


if __name__ == "__main__":
    main()
