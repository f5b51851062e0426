#!/usr/bin/env python3
"""The baseline: what a careful engineer would write to move ready-made, signed
webhooks from a Kafka topic to their receivers, with nothing else (no Faust, no audit
store, no retries).

- one aiokafka consumer, ``getmany`` in batches (up to 500 records);
- one ``aiohttp.ClientSession`` for the whole run (keep-alive connections reused);
- at most ``--concurrency`` requests in flight: the consumer stops reading while the
  bound is reached (back-pressure), so nothing is buffered without limit;
- offsets committed once a second, per partition up to the first record still in
  flight (at-least-once, like the relay).

Each record's key is the ``webhook-id``; its value the exact body; its headers the
developer, ``webhook-timestamp`` and ``webhook-signature``. The process prints
``ready`` once it has its partitions, and runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections import defaultdict

import aiohttp
from aiokafka import AIOKafkaConsumer, TopicPartition


async def run(bootstrap: str, topic: str, group: str, base_url: str, concurrency: int) -> None:
    """Consume and POST until stopped."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False,
        auto_offset_reset="earliest", max_partition_fetch_bytes=4 * 1024 * 1024,
        fetch_max_bytes=16 * 1024 * 1024,
    )
    await consumer.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    in_flight = asyncio.Semaphore(concurrency)
    pending: dict[TopicPartition, set[int]] = defaultdict(set)
    next_offset: dict[TopicPartition, int] = {}
    failures = 0
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=0,
                                     keepalive_timeout=30)
    session = aiohttp.ClientSession(connector=connector,
                                    timeout=aiohttp.ClientTimeout(total=10))
    tasks: set[asyncio.Task[None]] = set()

    async def post(tp: TopicPartition, offset: int, key: bytes, value: bytes,
                   headers: dict[str, str]) -> None:
        nonlocal failures
        try:
            dev = headers.pop("dev")
            headers["webhook-id"] = key.decode()
            headers["content-type"] = "application/json"
            async with session.post(f"{base_url}/hook/{dev}", data=value, headers=headers,
                                    allow_redirects=False) as resp:
                await resp.read()
                if resp.status >= 300:
                    failures += 1
        except (aiohttp.ClientError, TimeoutError):
            failures += 1
        finally:
            pending[tp].discard(offset)
            in_flight.release()

    async def commit_loop() -> None:
        while not stop.is_set():
            await asyncio.sleep(1.0)
            offsets = {tp: min(pending[tp]) if pending[tp] else nxt
                       for tp, nxt in next_offset.items()}
            if offsets:
                await consumer.commit(offsets)

    committer = asyncio.create_task(commit_loop())
    ready = False
    try:
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=100, max_records=500)
            if not ready and consumer.assignment():
                print("ready", flush=True)
                ready = True
            for tp, records in batches.items():
                for rec in records:
                    await in_flight.acquire()
                    pending[tp].add(rec.offset)
                    next_offset[tp] = rec.offset + 1
                    headers = {k: v.decode() for k, v in rec.headers}
                    t = asyncio.create_task(post(tp, rec.offset, rec.key, rec.value, headers))
                    tasks.add(t)
                    t.add_done_callback(tasks.discard)
    finally:
        committer.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=10)
        await session.close()
        await consumer.stop()
        print(f"stopped; failures={failures}", flush=True)


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    asyncio.run(run(args.bootstrap, args.topic, args.group, args.base_url, args.concurrency))


if __name__ == "__main__":
    main()
