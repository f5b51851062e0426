"""``IN`` lists of a few fixed lengths: the store prepares a bounded set of statements
however its batches are cut (the statement caches of both drivers stay small)."""

from __future__ import annotations

import re
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import given
from hypothesis import strategies as st

from notice_relay.audit.chunks import MAX_IN, in_lists
from notice_relay.audit.events import audit_event
from notice_relay.audit.store import AuditStore
from notice_relay.models import AuditType

pytest_plugins = ["pg"]


@given(st.lists(st.text(min_size=1, max_size=4), max_size=1500),
       st.sampled_from([1, 2, 8, 64, MAX_IN]))
def test_in_lists_cover_the_keys_in_power_of_two_lengths(keys: list[str], size: int) -> None:
    lists = list(in_lists(keys, size))
    assert [k for chunk in lists for k in dict.fromkeys(chunk)] == [
        k for i in range(0, len(keys), size) for k in dict.fromkeys(keys[i:i + size])]
    for chunk in lists:
        assert 1 <= len(chunk) <= size
        assert len(chunk) & (len(chunk) - 1) == 0  # a power of two
        assert set(chunk) <= set(keys)
    assert sum(len(c) for c in lists) < 2 * len(keys) + 1


def test_in_lists_refuse_a_size_that_is_not_a_power_of_two() -> None:
    with pytest.raises(ValueError, match="power of two, not 500"):
        list(in_lists(["a"], 500))


async def test_batches_of_every_size_prepare_few_statements(store: AuditStore) -> None:
    statements: set[str] = set()

    def seen(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if " IN (" in statement:
            statements.add(statement)

    sa.event.listen(store.engine.sync_engine, "before_cursor_execute", seen)
    n = 0
    for size in range(1, 70):  # 69 batch sizes, 2,415 declarations
        batch = []
        for _ in range(size):
            n += 1
            batch.append(audit_event(AuditType.DECLARATION_RECEIVED, f"pub/d{n}", unique=(n,)))
            batch.append(audit_event(AuditType.DELIVERY_PLANNED, f"pub/d{n}", unique=(n,),
                                     delivery_id=f"dl{n}", developer_id="acme",
                                     data={"channel": "hook", "channel_type": "webhook"}))
        assert await store.append(batch) == 2 * size
    lengths: dict[str, set[int]] = {}
    for s in statements:
        shape = re.sub(r"\s+", " ", re.sub(r"IN \([^)]*\)", "IN (...)", s))
        lengths.setdefault(shape, set()).add(max(
            s.count("?"), len(re.findall(r"\$\d+|%\(", s))))
    # One shape per query, each with at most the eight lengths 1, 2, 4, ... 128
    # (batches of 1 to 69 declarations, two events each) instead of one per batch size.
    assert lengths
    assert all(len(v) <= 8 for v in lengths.values()), lengths
    assert len(statements) <= 8 * len(lengths)
    assert len(await store.all_deliveries()) == n
    assert await store.verify() == []
