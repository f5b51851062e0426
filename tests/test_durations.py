"""Durations as written in connector files."""

from __future__ import annotations

from datetime import timedelta

import pytest

from notice_relay.durations import format_duration, parse_duration


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30d", timedelta(days=30)),
        ("1h", timedelta(hours=1)),
        ("5m", timedelta(minutes=5)),
        ("5s", timedelta(seconds=5)),
        ("250ms", timedelta(milliseconds=250)),
        ("0", timedelta(0)),
        ("0s", timedelta(0)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("1d2h3m4s5ms", timedelta(days=1, hours=2, minutes=3, seconds=4, milliseconds=5)),
        ("90s", timedelta(seconds=90)),
    ],
)
def test_parses_the_documented_forms(text: str, expected: timedelta) -> None:
    """Each documented form parses to the duration it reads as; "ms" is not minutes."""
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty duration"),
        ("10", 'a unit is required (e.g. "10s")'),
        ("3x", "unknown unit 'x'"),
        ("1.5h", "1 has no unit"),
        ("-5s", "cannot read '-5s'"),
        ("5 s", "5 has no unit"),
        (" 5s", "cannot read ' 5s'"),
        ("5S", "unknown unit 'S'"),
        ("1hour", "unknown unit 'hour'"),
        ("30m1h", "from the largest to the smallest"),
        ("1h1h", "each at most once"),
        ("h", "cannot read 'h'"),
    ],
)
def test_refuses_anything_else_with_a_message_quoting_the_value(text: str, fragment: str) -> None:
    """Bad values raise ValueError naming the value and what is wrong with it."""
    with pytest.raises(ValueError, match="duration") as caught:
        parse_duration(text)
    assert fragment in str(caught.value)
    if text:
        assert repr(text) in str(caught.value)


@pytest.mark.parametrize("text", ["30d", "1h30m", "250ms", "0", "1d2h3m4s5ms", "90s"])
def test_format_is_the_inverse_of_parse(text: str) -> None:
    """format_duration renders a value that parses back to the same duration."""
    value = parse_duration(text)
    assert parse_duration(format_duration(value)) == value


def test_format_uses_the_largest_units() -> None:
    """90 seconds print as "1m30s", an empty duration as "0"."""
    assert format_duration(timedelta(seconds=90)) == "1m30s"
    assert format_duration(timedelta(0)) == "0"
    with pytest.raises(ValueError, match="negative"):
        format_duration(timedelta(seconds=-1))
