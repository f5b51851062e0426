"""The audit topic's message encoding: one event, or an array of one declaration's
events (pure)."""

from __future__ import annotations

import json

import pytest
from test_audit_store import trail

from notice_relay.audit.events import decode_audit, encode_audit
from notice_relay.models import AuditEvent


def test_one_message_per_declaration_in_order() -> None:
    a, b = trail("p/a", 2), trail("p/b", 1)
    interleaved = [a[0], b[0], *a[1:4], *b[1:], *a[4:]]
    messages = encode_audit(interleaved)
    assert [key for key, _ in messages] == [b"p/a", b"p/b"]
    assert decode_audit(messages[0][1]) == a
    assert decode_audit(messages[1][1]) == b


def test_a_single_event_is_a_plain_object() -> None:
    """Readers of one event per message (and messages written before arrays) still work."""
    [e] = trail("p/a", 0)[:1]
    [(key, value)] = encode_audit([e])
    assert key == b"p/a"
    assert isinstance(json.loads(value), dict)
    assert decode_audit(value) == [e]
    assert decode_audit(e.model_dump_json().encode()) == [e]


def test_nothing_to_send_is_no_message() -> None:
    assert encode_audit([]) == []


@pytest.mark.parametrize(("raw", "reason"), [
    (b"[]", "empty array"),
    (b"not json", "Invalid JSON"),
    (b'[{"event_id": 1}]', "declaration_key"),
    (b"  [1, 2]", "AuditEvent"),
])
def test_a_bad_message_is_refused_with_a_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        decode_audit(raw)


def test_an_array_mixing_declarations_is_refused() -> None:
    """Every event of a declaration must sit in the partition of its key: an array
    with another declaration's event would put that event in the wrong chain's
    partition."""
    mixed = [*trail("p/a", 0), *trail("p/b", 0)]
    raw = b"[" + b",".join(e.model_dump_json().encode() for e in mixed) + b"]"
    with pytest.raises(ValueError, match="2 declarations in one message: p/a, p/b"):
        decode_audit(raw)


def test_round_trip_keeps_every_field() -> None:
    evs = trail("p/a", 3)
    [(_, value)] = encode_audit(evs)
    back = decode_audit(value)
    assert back == evs
    assert all(isinstance(e, AuditEvent) for e in back)
