"""Durations as operators write them in configuration: ``"30d"``, ``"1h30m"``, ``"250ms"``.

The grammar is deliberately small so that a value reads the same to everyone:

* one or more ``<digits><unit>`` parts, units ``d`` ``h`` ``m`` ``s`` ``ms``;
* units from the largest to the smallest, each at most once (``"1h30m"``, not ``"30m1h"``);
* a bare ``"0"`` is the only number without a unit (a bare ``"10"`` could mean seconds
  or milliseconds, so it is refused);
* no signs, no fractions, no spaces.
"""

from __future__ import annotations

import re
from datetime import timedelta

__all__ = ["format_duration", "parse_duration"]

# Largest first: the order in which parts must appear, and in which they are printed.
_UNITS: dict[str, timedelta] = {
    "d": timedelta(days=1),
    "h": timedelta(hours=1),
    "m": timedelta(minutes=1),
    "s": timedelta(seconds=1),
    "ms": timedelta(milliseconds=1),
}
_RANK = {unit: rank for rank, unit in enumerate(_UNITS)}
# A number and whatever letters follow it; the letters are then checked as a unit, so
# that "5S" or "3x" is reported as an unknown unit rather than as unreadable.
_PART = re.compile(r"(\d+)([A-Za-z]*)")
_HINT = 'use e.g. "30d", "1h30m", "5s", "250ms" or "0"'


def parse_duration(text: str) -> timedelta:
    """Parse ``text`` into a :class:`~datetime.timedelta`.

    Raises :class:`ValueError` with a message that quotes the value and says what is
    wrong with it.
    """
    if not isinstance(text, str):
        raise TypeError(f"a duration must be a string such as \"30s\", not {type(text).__name__}")
    if text == "":
        raise ValueError(f"empty duration; {_HINT}")
    if text == "0":
        return timedelta(0)
    if text.isdigit():
        raise ValueError(f'invalid duration {text!r}: a unit is required (e.g. "{text}s"); {_HINT}')

    total = timedelta(0)
    position = 0
    last_rank = -1
    while position < len(text):
        match = _PART.match(text, position)
        if match is None:
            raise ValueError(f"invalid duration {text!r}: cannot read {text[position:]!r}; {_HINT}")
        number, unit = match.groups()
        if unit not in _UNITS:
            what = f"unknown unit {unit!r}" if unit else f"{number} has no unit"
            raise ValueError(f"invalid duration {text!r}: {what} (use d, h, m, s or ms)")
        rank = _RANK[unit]
        if rank <= last_rank:
            raise ValueError(
                f"invalid duration {text!r}: units must go from the largest to the smallest "
                f"(d, h, m, s, ms), each at most once"
            )
        last_rank = rank
        total += int(number) * _UNITS[unit]
        position = match.end()
    return total


def format_duration(value: timedelta) -> str:
    """Render ``value`` in the grammar :func:`parse_duration` reads (the inverse of it).

    Sub-millisecond remainders are dropped; negative durations are refused.
    """
    if value < timedelta(0):
        raise ValueError("a negative duration cannot be formatted")
    remaining = value // timedelta(milliseconds=1)
    if remaining == 0:
        return "0"
    parts: list[str] = []
    for unit, size in _UNITS.items():
        per_unit = size // timedelta(milliseconds=1)
        count, remaining = divmod(remaining, per_unit)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)
