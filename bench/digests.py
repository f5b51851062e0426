#!/usr/bin/env python3
"""What building an email digest costs, with the standard header registry and with
the digest policy's (one header class per name, ``email_render.POLICY``).

Each round builds and serializes ``--digests`` digests of 3 notices (what the email
channel does before it talks SMTP) once with ``email.policy.SMTP`` (the baseline)
and once with ``POLICY``, alternating which goes first; the figures are medians over
the rounds. Besides the time, it counts the classes built (``type`` objects created,
seen through ``gc``) and the full collections the cyclic garbage collector ran.
Writes ``bench/results/digests.json``.

    python bench/digests.py                    # 7 rounds of 2,000 digests
    python bench/digests.py --rounds 3 --digests 500
"""

from __future__ import annotations

import argparse
import email.policy
import gc
import json
import statistics
import sys
import time
from datetime import UTC, datetime
from email.headerregistry import Address
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from builders import make_notice, make_task  # noqa: E402

from notice_relay.channels import email_render  # noqa: E402
from notice_relay.models import ChannelType  # noqa: E402

SENDER = Address("notice-relay", addr_spec="relay@relay.example.invalid")
TO = ["optout@acme.example"]
DATE = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)


def _header_classes() -> int:
    return sum(1 for o in gc.get_objects()
               if isinstance(o, type) and o.__module__ == "email.headerregistry")


def run(policy: Any, batches: list[Any]) -> dict[str, float]:
    """Build and serialize every batch under ``policy``; time, classes, collections."""
    email_render.POLICY = policy  # type: ignore[misc]  # the bench swaps the module's policy
    gc.collect()
    before_classes = _header_classes()
    before_full = gc.get_stats()[2]["collections"]
    started = time.perf_counter()
    size = 0
    for tasks in batches:
        msg = email_render.build_message(tasks, developer_name="Acme AI", sender=SENDER,
                                         recipients=TO, date=DATE,
                                         domain="relay.example.invalid")
        size += len(msg.as_bytes(policy=policy))
    elapsed = time.perf_counter() - started
    left = _header_classes() - before_classes  # built, not collected yet
    full = gc.get_stats()[2]["collections"] - before_full
    gc.collect()
    return {"seconds": elapsed, "digests_per_s": len(batches) / elapsed,
            "header_classes_uncollected": left, "full_collections": full,
            "bytes": size}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--digests", type=int, default=2000)
    args = p.parse_args()

    ours = email_render.POLICY
    stock = email.policy.SMTP
    batches = [[make_task(channel="email", channel_type=ChannelType.EMAIL,
                          notice=make_notice()) for _ in range(3)]
               for _ in range(args.digests)]
    results: dict[str, list[dict[str, float]]] = {"stock": [], "ours": []}
    for r in range(args.rounds):
        order: list[tuple[str, Any]] = [("stock", stock), ("ours", ours)]
        if r % 2:
            order.reverse()
        for name, policy in order:
            results[name].append(run(policy, batches))
    email_render.POLICY = ours  # type: ignore[misc]

    def med(name: str, key: str) -> float:
        return statistics.median(x[key] for x in results[name])

    summary = {
        name: {key: med(name, key) for key in results[name][0]} for name in results
    }
    ratio = summary["ours"]["digests_per_s"] / summary["stock"]["digests_per_s"]
    print(f"{args.rounds} rounds of {args.digests} digests (3 notices each), medians:")
    for name, label in (("stock", "email.policy.SMTP (baseline)"),
                        ("ours", "POLICY (one class per header name)")):
        s = summary[name]
        print(f"  {label:38s} {s['digests_per_s']:8.0f} digests/s   "
              f"header classes left to the collector {s['header_classes_uncollected']:6.0f}   "
              f"full collections {s['full_collections']:3.0f}")
    print(f"  speed ratio POLICY / baseline: {ratio:.2f}")
    out = ROOT / "bench" / "results" / "digests.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "rounds": args.rounds, "digests": args.digests,
        "median": summary, "ratio": ratio, "runs": results}, indent=2) + "\n")
    print(f"results: {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
