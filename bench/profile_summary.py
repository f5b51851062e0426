#!/usr/bin/env python3
"""Summarise a py-spy ``--format raw`` profile (collapsed stacks) of the worker: the
top functions by own and by inclusive samples, and the share of each library.

Usage: ``python bench/profile_summary.py PROFILE [--top N]``
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

#: Library families, matched against a frame's file path (first match wins).
FAMILIES = (
    ("pydantic (validate / dump JSON)", ("pydantic",)),
    ("SQLAlchemy + aiosqlite (audit store)", ("sqlalchemy", "aiosqlite", "sqlite3")),
    ("httpx + httpcore (webhook POSTs)", ("httpx", "httpcore", "h11", "anyio")),
    ("aiohttp", ("aiohttp", "yarl", "multidict")),
    ("aiokafka (produce / fetch)", ("aiokafka", "kafka")),
    ("faust + mode (stream machinery)", ("faust", "mode/")),
    ("logging + structlog", ("logging", "structlog")),
    ("notice_relay", ("notice_relay",)),
    ("asyncio event loop", ("asyncio", "selectors")),
)


def family(frame: str) -> str:
    """The library family of a frame ``func (path:line)``."""
    where = frame.rpartition("(")[2]
    for name, needles in FAMILIES:
        if any(n in where for n in needles):
            return name
    return "other"


def summarise(path: Path, top: int) -> str:
    """The summary as text."""
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    fam: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [f for f in stack.split(";") if f]
        if not frames:
            continue
        own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
        # A sample belongs to the innermost frame of a known family (a pydantic call
        # made by notice_relay counts as pydantic).
        for f in reversed(frames):
            name = family(f)
            if name != "other":
                fam[name] += n
                break
        else:
            fam["other"] += n
    out = [f"{total} samples in {path}", "", "by library (innermost known frame):"]
    out += [f"  {n * 100 / total:5.1f}%  {name}" for name, n in fam.most_common()]
    out += ["", f"top {top} by own samples:"]
    out += [f"  {n * 100 / total:5.1f}%  {f[:140]}" for f, n in own.most_common(top)]
    out += ["", f"top {top} notice_relay frames by inclusive samples:"]
    mine = [(f, n) for f, n in incl.most_common() if "notice_relay" in f][:top]
    out += [f"  {n * 100 / total:5.1f}%  {f[:140]}" for f, n in mine]
    return "\n".join(out)


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser()
    parser.add_argument("profile", type=Path)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    print(summarise(args.profile, args.top))


if __name__ == "__main__":
    main()
