"""Key lists cut into ``IN (...)`` lists of a few fixed lengths.

A query ``... WHERE key IN (?, ?, ...)`` is a different statement for every length of
its list, and both drivers keep the statements they prepared: Python's ``sqlite3``
the last 128 per connection, asyncpg the last 100. Batches of every size from 1 to
500 keys therefore filled those caches with hundreds of large statements, each
holding the values last bound to it, and hardly any was prepared twice (finding 7 of
docs/reliability.md: most of the native memory a worker held on to).

:func:`in_lists` cuts the keys into lists of at most :data:`MAX_IN` and pads each to
the next power of two by repeating its last key (a key listed twice in ``IN`` matches
once), so one query has at most ten shapes, all prepared once and reused.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

MAX_IN = 512
"""The longest ``IN`` list a query is given."""


def in_lists(keys: Sequence[str], size: int = MAX_IN) -> Iterator[list[str]]:
    """``keys`` in lists of at most ``size`` (a power of two), each padded to a power
    of two by repeating its last key. Nothing for no keys."""
    if size < 1 or size & (size - 1):
        raise ValueError(f"size must be a power of two, not {size}")
    for start in range(0, len(keys), size):
        chunk = list(keys[start:start + size])
        padded = 1 << (len(chunk) - 1).bit_length()
        chunk.extend([chunk[-1]] * (padded - len(chunk)))
        yield chunk
