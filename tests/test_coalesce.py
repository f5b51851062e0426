"""The coalescer of the deliver stage's reports (pure asyncio, no Kafka)."""

from __future__ import annotations

import asyncio

import pytest

from notice_relay.coalesce import Coalescer


async def test_submissions_within_the_window_go_out_as_one_send() -> None:
    sent: list[list[int]] = []

    async def send(items: list[int]) -> None:
        sent.append(items)

    c: Coalescer[int] = Coalescer(send, 0.01)
    await asyncio.gather(c.submit([1, 2]), c.submit([3]), c.submit([]))
    assert sent == [[1, 2, 3]]
    await c.submit([4])
    assert sent == [[1, 2, 3], [4]]
    assert c.rounds == 2


async def test_no_submitter_returns_before_its_items_were_sent() -> None:
    release = asyncio.Event()
    sent: list[list[str]] = []

    async def send(items: list[str]) -> None:
        await release.wait()
        sent.append(items)

    c: Coalescer[str] = Coalescer(send, 0.0)
    waiter = asyncio.ensure_future(c.submit(["a"]))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    assert sent == []
    release.set()
    await waiter
    assert sent == [["a"]]


async def test_a_failed_send_fails_every_submitter_of_its_round_only() -> None:
    calls = 0

    async def send(items: list[int]) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError(f"broker gone ({len(items)} items)")

    c: Coalescer[int] = Coalescer(send, 0.01)
    results = await asyncio.gather(c.submit([1]), c.submit([2]), return_exceptions=True)
    assert [str(r) for r in results] == ["broker gone (2 items)"] * 2
    await c.submit([3])  # the next round is not affected
    assert calls == 2


async def test_a_cancelled_submitter_does_not_cancel_the_round() -> None:
    sent: list[list[int]] = []

    async def send(items: list[int]) -> None:
        await asyncio.sleep(0.02)
        sent.append(items)

    c: Coalescer[int] = Coalescer(send, 0.01)
    first = asyncio.ensure_future(c.submit([1]))
    second = asyncio.ensure_future(c.submit([2]))
    await asyncio.sleep(0.015)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    await second
    assert sent == [[1, 2]]
