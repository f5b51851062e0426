"""The commit rule of :mod:`notice_relay.safe_offsets`: only a run of processed
offsets that starts exactly where reading would resume may be committed; and the flow
control that keeps what a running flow buffered."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st
from mode.utils.queues import FlowControlQueue

from notice_relay.safe_offsets import FlowControl, committable_offset


def test_nothing_to_commit_without_a_known_head() -> None:
    assert committable_offset([0, 1, 2], None) == (None, [])


def test_commits_the_run_from_the_head() -> None:
    assert committable_offset([0, 1, 2, 5, 6], 0) == (3, [0, 1, 2])


def test_a_message_in_flight_at_the_head_blocks_the_commit_at_offset_zero() -> None:
    # faust-streaming 0.15 commits 10 here (committed offset 0 is taken as "none").
    assert committable_offset([1, 2, 3, 4, 5, 6, 7, 8, 9], 0) == (None, [])


def test_a_single_message_in_flight_at_the_head_blocks_the_commit() -> None:
    # faust-streaming 0.15 tolerates a gap of exactly one message at the head.
    assert committable_offset([31, 32, 33], 30) == (None, [])


def test_stale_offsets_below_the_head_are_dropped() -> None:
    assert committable_offset([3, 4, 10, 11], 10) == (12, [3, 4, 10, 11])
    assert committable_offset([3, 4, 12], 10) == (None, [3, 4])


@given(
    head=st.integers(min_value=0, max_value=50),
    acked=st.sets(st.integers(min_value=0, max_value=80)),
)
def test_never_commits_past_an_unprocessed_offset(head: int, acked: set[int]) -> None:
    offset, consumed = committable_offset(sorted(acked), head)
    if offset is not None:
        # Every offset from the head up to the new committed offset was processed.
        assert all(o in acked for o in range(head, offset))
        assert offset > head
        assert offset not in acked  # the run ends where the first unprocessed one is
    else:
        assert head not in acked
    assert set(consumed) <= acked
    assert all(o < (offset if offset is not None else head) for o in consumed)


async def test_resuming_a_running_flow_keeps_what_the_stream_buffers_hold() -> None:
    """faust resumes flow twice in a table recovery; messages buffered in between (of
    the new generation) must survive the second resume. After a suspension (a
    rebalance began) the buffers are cleared, as faust expects."""
    flow = FlowControl()
    queue: FlowControlQueue[int] = FlowControlQueue(flow_control=flow, clear_on_resume=True)
    flow.resume()  # the first resume of a recovery
    queue.put_nowait(1)
    queue.put_nowait(2)
    flow.resume()  # the second: the buffered messages stay
    assert queue.qsize() == 2
    flow.suspend()  # a rebalance begins
    assert not flow.is_active()
    flow.resume()
    assert flow.is_active()
    assert queue.qsize() == 0


async def test_the_relay_app_uses_that_flow_control(tmp_path: Path) -> None:
    from notice_relay.app import create_app
    from notice_relay.config import Settings

    app = create_app(Settings(data_dir=tmp_path))
    assert isinstance(app.flow_control, FlowControl)
    assert app.flow_control is app.flow_control
