"""Native memory: giving what the C allocator holds free back to the system.

glibc's ``malloc`` keeps the memory that C code frees (SQLite's rows and statements,
RocksDB's blocks and memtables, the buffers of OpenSSL and of CPython objects larger
than 512 bytes) for reuse, in a heap per thread that allocates (an *arena*). ``free``
returns memory to the system only from the top end of a heap; a free stretch in the
middle stays resident until ``malloc`` reuses it. A long-running worker with a dozen
threads (the SQLite connections', RocksDB's, the executor's) accumulates such stretches
in every arena, and its resident memory creeps up by a few MiB an hour while what it
actually uses stays level (``docs/reliability.md``, finding 7).

``malloc_trim(0)`` walks every arena and hands the free whole pages back to the system
(``madvise(MADV_DONTNEED)``), keeping them mapped for reuse. No Python library wraps it:
:class:`NativeHeap` calls it through :mod:`ctypes`, and the worker does so on a timer
(``NOTICE_RELAY_MALLOC_TRIM_INTERVAL``, one minute by default; ``0`` turns it off). On a
C library without it (musl, macOS) the timer does nothing.
"""

from __future__ import annotations

import ctypes
import os
import time
from dataclasses import dataclass
from typing import Any

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int | None:
    """This process's resident memory (``/proc/self/statm``), or None off Linux."""
    try:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


@dataclass(frozen=True)
class Trim:
    """One trim: how long it took and how much resident memory it gave back."""

    seconds: float
    released: int | None  # bytes; None when the resident size cannot be read


class NativeHeap:
    """The C library's allocator, when it is glibc's."""

    def __init__(self) -> None:
        self._trim: Any = None
        try:
            # The symbols already loaded into this process, libc's among them: no
            # library search (``ctypes.util.find_library`` runs ldconfig) at start-up.
            fn = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):
            return
        fn.argtypes = [ctypes.c_size_t]
        fn.restype = ctypes.c_int
        self._trim = fn

    @property
    def available(self) -> bool:
        """Whether this C library has ``malloc_trim``."""
        return self._trim is not None

    def trim(self) -> Trim | None:
        """Give every arena's free pages back to the system; None when unavailable.
        Thread-safe (the allocator locks each arena in turn); it takes milliseconds,
        so the worker runs it off the event loop."""
        if self._trim is None:
            return None
        before = resident_bytes()
        t0 = time.perf_counter()
        self._trim(0)
        seconds = time.perf_counter() - t0
        after = resident_bytes()
        released = before - after if before is not None and after is not None else None
        return Trim(seconds=seconds, released=released)
