"""Delivery that never loses a notice, against real servers: a real Kafka broker, real
worker processes (killed with SIGKILL where the test says so) and real HTTP
receivers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

import pytest
from relay_helpers import deliveries, eventually, make_decl, publish, trail_types, whsec

from notice_relay.receiver import Receiver

pytestmark = pytest.mark.kafka

FAST = {
    "NOTICE_RELAY_SWEEP_AFTER": "5s",
    "NOTICE_RELAY_SESSION_TIMEOUT": "6s",
    "NOTICE_RELAY_HOLD_RECHECK": "1s",
    "NOTICE_RELAY_BREAKER_COOLDOWN": "2s",
}



@pytest.fixture
async def receivers() -> AsyncIterator[dict[str, Receiver]]:
    """Real receivers, stopped at the end of the test."""
    started: dict[str, Receiver] = {}
    yield started
    for r in started.values():
        await r.stop()


async def add_receiver(env: Any, started: dict[str, Receiver], dev: str, *,
                       accepts: tuple[str, ...] = ("train-ai", "train-genai"),
                       extra: str = "") -> Receiver:
    """Start a receiver for ``dev`` and register ``dev`` with a webhook to it."""
    secret = whsec()
    r = await Receiver(secret).start()
    started[dev] = r
    env.add_webhook_developer(dev, r.url, secret, accepts=accepts, extra=extra)
    return r


def start_worker(env: Any, worker_factory: Any, **extra: str) -> Any:
    """A worker with the test's fast settings."""
    env.secrets.update(FAST)
    env.secrets.update(extra)
    return worker_factory()


async def test_transient_failures_are_retried_and_survive_a_restart(
    relay_env: Any, worker_factory: Any, receivers: dict[str, Receiver]
) -> None:
    """A receiver answering 503 twice per notice: each delivery is retried on the
    schedule and delivered on the third attempt, even though the worker is killed
    with SIGKILL while retries are scheduled; the trail records every attempt."""
    r = await add_receiver(relay_env, receivers, "acme-ai")
    r.state.fail_with, r.state.fail_first = 503, 2
    relay_env.write_publishers("artfolio")
    worker = start_worker(relay_env, worker_factory,
                          NOTICE_RELAY_RETRY_SCHEDULE="3s,3s,3s,3s")
    decls = [make_decl(i) for i in range(8)]
    await publish(relay_env, decls)

    # Wait until every delivery failed once and has a retry scheduled, then crash.
    await eventually(lambda: len(r.state.arrivals) == 8, 60, "first attempts", worker=worker)
    worker.kill()
    worker = start_worker(relay_env, worker_factory)
    await eventually(lambda: len(r.state.notices()) == 8, 90, "all delivered", worker=worker)
    for wid, times in r.state.arrivals.items():
        assert len(times) >= 3, wid
        # Two waits of the schedule (3 s ± 20%) lie between the first attempt and the
        # third, however many copies a crash made of an attempt.
        assert times[2] - times[0] >= 2 * 3 * 0.8 - 0.1, times
    await eventually(lambda: _all_state(relay_env, "delivered", 8), 30, "store delivered")
    types = [t for t, _ in await trail_types(relay_env, "artfolio/d-0000")]
    # A crash can make the receiver see an attempt twice (same ids in the trail), so
    # the trail holds at least the first failure, its retry, and the delivery.
    assert types.count("delivery.attempted") >= 2
    assert types.count("delivery.retry_scheduled") >= 1
    assert types[-1] == "delivery.delivered" or "delivery.delivered" in types


async def _all_state(env: Any, state: str, n: int) -> bool:
    rows = await deliveries(env)
    # A receipt in the receiver's answer acknowledges a delivered notice.
    ok = {"delivered", "acknowledged"} if state == "delivered" else {state}
    return len(rows) == n and all(x.state in ok for x in rows)


async def test_retry_after_is_honoured(
    relay_env: Any, worker_factory: Any, receivers: dict[str, Receiver]
) -> None:
    """A 503 with Retry-After: 4 is retried no earlier than it asked, though the
    schedule says 1 s."""
    r = await add_receiver(relay_env, receivers, "acme-ai")
    r.state.fail_with, r.state.fail_first, r.state.retry_after = 503, 1, "4"
    relay_env.write_publishers("artfolio")
    worker = start_worker(relay_env, worker_factory, NOTICE_RELAY_RETRY_SCHEDULE="1s,1s")
    await publish(relay_env, [make_decl(i) for i in range(3)])
    await eventually(lambda: len(r.state.notices()) == 3, 60, "delivered", worker=worker)
    for times in r.state.arrivals.values():
        assert times[1] - times[0] >= 4.0, times


async def test_slow_down_after_429(
    relay_env: Any, worker_factory: Any, receivers: dict[str, Receiver]
) -> None:
    """After a 429 without Retry-After the next attempt waits at least the configured
    slow-down floor, not the schedule's 1 s."""
    r = await add_receiver(relay_env, receivers, "acme-ai")
    r.state.fail_with, r.state.fail_first = 429, 1
    relay_env.write_publishers("artfolio")
    worker = start_worker(relay_env, worker_factory, NOTICE_RELAY_RETRY_SCHEDULE="1s,1s",
                          NOTICE_RELAY_SLOW_DOWN_FLOOR="5s")
    await publish(relay_env, [make_decl(0)])
    await eventually(lambda: len(r.state.notices()) == 1, 60, "delivered", worker=worker)
    [times] = r.state.arrivals.values()
    assert times[1] - times[0] >= 5.0, times


async def test_exhausted_attempts_fail_with_the_last_error(
    relay_env: Any, worker_factory: Any, receivers: dict[str, Receiver]
) -> None:
    """A receiver that always answers 500: after the schedule is spent the delivery is
    failed, and the trail holds the last error."""
    r = await add_receiver(relay_env, receivers, "acme-ai")
    r.state.fail_with = 500
    relay_env.write_publishers("artfolio")
    worker = start_worker(relay_env, worker_factory, NOTICE_RELAY_RETRY_SCHEDULE="1s,1s",
                          NOTICE_RELAY_BREAKER_THRESHOLD="100")
    await publish(relay_env, [make_decl(0)])
    await eventually(lambda: _all_state(relay_env, "failed", 1), 60, "failed", worker=worker)
    [row] = await deliveries(relay_env)
    assert row.attempts == 3
    assert "HTTP 500" in (row.last_error or "")
    trail = await trail_types(relay_env, "artfolio/d-0000")
    failed = [d for t, d in trail if t == "delivery.failed"]
    assert failed
    assert "attempts exhausted" in str(failed[0]["error"])
    assert "HTTP 500" in str(failed[0]["error"])
    res = relay_env.cli("status", "d-0000")
    assert b"failed" in res.stdout


async def test_410_disables_the_channel_and_holds_its_deliveries(
    relay_env: Any, worker_factory: Any, receivers: dict[str, Receiver]
) -> None:
    """A 410 Gone disables the channel (audited); later deliveries are held, none
    dropped, and `channels enable` resumes them; `channels list` shows the health."""
    gone = await add_receiver(relay_env, receivers, "acme-ai")
    ok = await add_receiver(relay_env, receivers, "brushstroke-labs")
    gone.state.fail_with = 410
    relay_env.write_publishers("artfolio")
    worker = start_worker(relay_env, worker_factory)
    await publish(relay_env, [make_decl(0)])
    await eventually(lambda: "disabled" in _channel_states(relay_env).get("acme-ai/webhook", ""),
                     60, "channel disabled", worker=worker, interval=1)
    gone.state.fail_with = None
    await publish(relay_env, [make_decl(i) for i in range(1, 6)])
    await eventually(lambda: len(ok.state.notices()) == 6, 60, "the other channel delivers",
                     worker=worker)

    async def held() -> bool:
        rows = [x for x in await deliveries(relay_env) if x.developer_id == "acme-ai"]
        return sorted(x.state for x in rows) == ["failed"] + ["held"] * 5
    await eventually(held, 30, "deliveries held", worker=worker)
    assert len(gone.state.notices()) == 0

    res = relay_env.cli("channels", "enable", "acme-ai/webhook", "--operator", "alice",
                        "--reason", "endpoint fixed")
    assert res.returncode == 0, res.stderr.decode()
    await eventually(lambda: len(gone.state.notices()) == 5, 60, "held deliveries resume",
                     worker=worker)
    states = _channel_states(relay_env)
    assert states["acme-ai/webhook"] == "enabled"
    types = [t for t, _ in await trail_types(relay_env, "_channel/acme-ai/webhook")]
    assert types == ["channel.disabled", "channel.enabled"]
    trail = await trail_types(relay_env, "artfolio/d-0001")
    assert "delivery.held" in [t for t, _ in trail]


def _channel_states(env: Any) -> dict[str, str]:
    res = env.cli("channels", "list", "--json")
    if res.returncode != 0:
        return {}
    return {c["key"]: c["state"] for c in json.loads(res.stdout)["channels"]}


async def test_channel_failing_too_long_is_disabled(
    relay_env: Any, worker_factory: Any, receivers: dict[str, Receiver]
) -> None:
    """A channel failing without a success for longer than `disable_after` is disabled,
    with the reason in `channels list`."""
    r = await add_receiver(relay_env, receivers, "acme-ai")
    r.state.fail_with = 503
    relay_env.write_publishers("artfolio")
    worker = start_worker(relay_env, worker_factory, NOTICE_RELAY_DISABLE_AFTER="3s",
                          NOTICE_RELAY_RETRY_SCHEDULE="1s,1s,1s,1s,1s,1s,1s,1s,1s,1s",
                          NOTICE_RELAY_BREAKER_THRESHOLD="100")
    await publish(relay_env, [make_decl(i) for i in range(3)])
    await eventually(lambda: _channel_states(relay_env).get("acme-ai/webhook") == "disabled",
                     60, "channel disabled", worker=worker, interval=1)
    res = relay_env.cli("channels", "list", "--json")
    [ch] = json.loads(res.stdout)["channels"]
    assert "no successful delivery" in ch["reason"]


async def test_dead_endpoints_do_not_delay_healthy_ones(
    relay_env: Any, worker_factory: Any, receivers: dict[str, Receiver]
) -> None:
    """An endpoint that accepts connections and never answers and one that refuses
    connections, beside two healthy ones: every healthy delivery lands while the bad
    ones are still retrying."""
    healthy = [await add_receiver(relay_env, receivers, d) for d in ("acme-ai", "brushstroke-labs")]
    hang = await asyncio.start_server(_never_answer, "127.0.0.1", 0)
    hang_port = hang.sockets[0].getsockname()[1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        refused_port = s.getsockname()[1]  # closed again: connections are refused
    relay_env.add_webhook_developer("hanging-ai", f"http://127.0.0.1:{hang_port}/h", whsec())
    relay_env.add_webhook_developer("refusing-ai", f"http://127.0.0.1:{refused_port}/h", whsec())
    relay_env.write_publishers("artfolio")
    worker = start_worker(relay_env, worker_factory,
                          NOTICE_RELAY_RETRY_SCHEDULE="5s,10s,30s,60s,60s")
    n = 40
    t0 = time.monotonic()
    await publish(relay_env, [make_decl(i) for i in range(n)])
    try:
        await eventually(lambda: all(len(h.state.notices()) == n for h in healthy), 60,
                         "healthy deliveries", worker=worker)
        took = time.monotonic() - t0
        rows = await deliveries(relay_env)
        bad = [x for x in rows if x.developer_id in ("hanging-ai", "refusing-ai")]
        assert bad
        assert all(x.state not in ("delivered", "failed") for x in bad)
        # One hanging request takes the 5 s timeout; 40 of them in order would take
        # minutes. The healthy ones did not wait for them.
        assert took < 40, took
    finally:
        hang.close()


async def _never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        await reader.read(1 << 20)
        await asyncio.sleep(3600)
    except (asyncio.CancelledError, ConnectionError):
        pass
    finally:
        writer.close()


async def test_sigkill_during_delivery_loses_nothing(
    relay_env: Any, worker_factory: Any, receivers: dict[str, Receiver]
) -> None:
    """A worker killed with SIGKILL while deliveries are in flight, then restarted:
    every notice reaches every receiver at least once, and duplicates carry the same
    webhook-id."""
    rs = [await add_receiver(relay_env, receivers, d) for d in ("acme-ai", "brushstroke-labs",
                                                              "canvas-research")]
    for r in rs:
        r.state.delay = 0.2  # slow receivers: plenty in flight when the kill comes
    relay_env.write_publishers("artfolio")
    worker = start_worker(relay_env, worker_factory)
    n = 60
    await publish(relay_env, [make_decl(i) for i in range(n)])
    await eventually(lambda: sum(len(r.state.arrivals) for r in rs) >= 30, 60,
                     "some deliveries in flight", worker=worker, interval=0.05)
    worker.kill()
    worker = start_worker(relay_env, worker_factory)
    await eventually(lambda: all(len(r.state.notices()) == n for r in rs), 120,
                     "every notice at every receiver", worker=worker)
    for r in rs:
        by_decl: dict[str, set[str]] = defaultdict(set)
        for x in r.state.received:
            assert x.notice is not None
            by_decl[x.notice["declaration_id"]].add(x.webhook_id)
        assert len(by_decl) == n
        assert all(len(ids) == 1 for ids in by_decl.values())  # duplicates share the id
