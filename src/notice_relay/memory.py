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

The trim cannot reach everything. glibc raises two of its thresholds on its own as a
process frees large blocks: the *mmap threshold* (blocks above it get a mapping of their
own, returned to the system by ``free``) and the *trim threshold* (how much free memory
the top of a heap may keep). In a worker both climbed from 128 KiB to 3.7 and 7.3 MiB
within the hour, so blocks of a few MiB came from the thread heaps, and each thread heap
kept up to 7.3 MiB free at its top, which ``malloc_trim`` leaves alone outside the main
heap. And glibc gives each thread that allocates its own heap, up to eight per core.
:meth:`NativeHeap.limit` fixes all three at the worker's start (``mallopt``), which also
stops glibc raising the thresholds, unless the operator set them with glibc's own
variables (``MALLOC_ARENA_MAX``, ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``
or ``GLIBC_TUNABLES``).

jemalloc is the other choice (Debian's ``libjemalloc2``; ``scripts/setup-system.sh``
and the Dockerfile install it): it packs blocks of one size class together and returns
the pages that fall empty after a delay (*decay*), from a thread of its own.
``NOTICE_RELAY_ALLOCATOR`` chooses: ``glibc`` (the default), ``jemalloc`` (required: a
worker without it does not start) or ``auto`` (jemalloc when found).
:func:`allocator_environ` gives the environment to execute the worker again in, with
the library preloaded (``LD_PRELOAD``) and :data:`JEMALLOC_CONF` unless the operator
set ``MALLOC_CONF``. Under jemalloc the trim and the limits above do nothing and are
skipped. glibc's stays the default because a two-hour soak on jemalloc (2026-12-05)
held 5-6 MiB more and rose just as fast, +1.1 MiB/h (docs/reliability.md, finding 7):
what still rises is not the allocator's free memory.

What did rise was CPython's own allocator for small objects (*pymalloc*): it maps
memory in 1 MiB arenas and gives an arena back only once every object in it is freed.
A worker's objects live for milliseconds (a declaration, its notices) or for hours (the
registry, the caches, the tables' buffers), and the long-lived ones, scattered, keep
arenas alive: at 20 declarations/s the count went from 53 to 58 in 45 minutes while
the bytes in use stayed level. ``NOTICE_RELAY_OBJECT_ALLOCATOR=malloc`` has the
worker's objects allocated by the C allocator instead (``PYTHONMALLOC=malloc``, which
the interpreter reads once, at its start: :func:`allocator_environ` sets it for the
same re-execution), where the heap limits and the trim above reach their free memory.
It is not the default (``pymalloc``): at 10 declarations/s it cost more CPU and glibc's
main heap, now holding every object, gathered free memory faster than the arenas had
(docs/reliability.md, finding 7). ``PYTHONMALLOC`` set by the operator is left as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from notice_relay.errors import ConfigError

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

# mallopt's parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

#: jemalloc's settings for the worker, unless the operator sets ``MALLOC_CONF``: two
#: arenas, as with glibc (HeapLimits); pages unused for a second go back to the
#: system (``dirty_decay_ms``) at once rather than through a second, lazy stage
#: (``muzzy_decay_ms``), by a background thread, so also while the worker is idle.
JEMALLOC_CONF = "background_thread:true,narenas:2,dirty_decay_ms:1000,muzzy_decay_ms:0"

#: Where Debian, Ubuntu, Fedora and Alpine put the library.
JEMALLOC_PATHS = (
    "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
    "/usr/lib64/libjemalloc.so.2",
    "/usr/lib/libjemalloc.so.2",
    "/usr/local/lib/libjemalloc.so.2",
)

#: Set in the environment of the worker executed again, so that it does not loop
#: when the preload did not take (a setuid binary, a library that failed to load).
REEXEC_MARK = "NOTICE_RELAY_ALLOCATOR_EXECUTED"


@dataclass(frozen=True)
class HeapLimits:
    """What the worker fixes in glibc's allocator at start.

    Two heaps (the main one and one the threads share): the SQLite connections'
    threads, RocksDB's and the executor's allocate little and seldom at the same
    moment, so sharing costs no measurable lock wait, and one thread's free memory is
    the next one's to reuse instead of sitting in a heap of its own. Blocks from
    512 KiB up get a mapping of their own, and a heap keeps at most 1 MiB free at its
    top: what is freed beyond that goes back to the system at once.
    """

    arena_max: int = 2
    mmap_threshold: int = 512 * 1024
    trim_threshold: int = 1024 * 1024

    def settings(self) -> list[tuple[str, int, int, str]]:
        """(name, mallopt parameter, value, glibc's environment variable for it); the
        name is also the tunable's, ``glibc.malloc.<name>`` in ``GLIBC_TUNABLES``."""
        return [
            ("arena_max", M_ARENA_MAX, self.arena_max, "MALLOC_ARENA_MAX"),
            ("mmap_threshold", M_MMAP_THRESHOLD, self.mmap_threshold,
             "MALLOC_MMAP_THRESHOLD_"),
            ("trim_threshold", M_TRIM_THRESHOLD, self.trim_threshold,
             "MALLOC_TRIM_THRESHOLD_"),
        ]


def _set_by_operator(name: str, variable: str, environ: Mapping[str, str]) -> bool:
    return variable in environ or f"glibc.malloc.{name}=" in environ.get("GLIBC_TUNABLES", "")


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


def loaded_allocator() -> str:
    """The allocator this process runs on: ``jemalloc`` (its ``mallctl`` is among the
    loaded symbols), ``glibc`` (``malloc_trim`` is) or ``other``."""
    try:
        process = ctypes.CDLL(None)
    except OSError:
        return "other"
    if hasattr(process, "mallctl"):
        return "jemalloc"
    if hasattr(process, "malloc_trim"):
        return "glibc"
    return "other"


def find_jemalloc(environ: Mapping[str, str] = os.environ) -> Path | None:
    """The jemalloc shared library: ``NOTICE_RELAY_JEMALLOC`` when set (it must exist),
    else the first of :data:`JEMALLOC_PATHS` that does, else the linker's cache."""
    given = environ.get("NOTICE_RELAY_JEMALLOC")
    if given:
        path = Path(given)
        if not path.is_file():
            raise ConfigError(f"NOTICE_RELAY_JEMALLOC: no such file: {given}")
        return path
    for candidate in JEMALLOC_PATHS:
        if os.path.isfile(candidate):
            return Path(candidate)
    # A soname ("libjemalloc.so.2"), which LD_PRELOAD looks up as the linker does.
    name = ctypes.util.find_library("jemalloc")  # runs ldconfig -p: only when not found above
    return Path(name) if name else None


def python_allocator(environ: Mapping[str, str] = os.environ) -> str:
    """The allocator behind this interpreter's Python objects: ``pymalloc`` (CPython's
    own, the default) or what ``PYTHONMALLOC`` chose (``malloc``, ``debug``...). Read
    from the environment the interpreter started with, which it ignores under ``-E``
    or ``-I``."""
    if sys.flags.ignore_environment:
        return "pymalloc"
    return environ.get("PYTHONMALLOC") or "pymalloc"


def allocator_environ(choice: str, environ: Mapping[str, str] = os.environ,
                      loaded: str | None = None,
                      objects: str = "pymalloc") -> dict[str, str] | None:
    """The environment in which to execute the worker again so that it runs on the
    allocators chosen, or None to go on in this process as it is.

    ``choice`` is the C allocator (one of ``config.ALLOCATORS``): for ``jemalloc`` and
    ``auto`` the library is preloaded (``LD_PRELOAD``) with :data:`JEMALLOC_CONF`,
    unless it is loaded already or, for ``auto``, not installed. ``objects`` is the
    Python objects' (one of ``config.OBJECT_ALLOCATORS``): for ``malloc``,
    ``PYTHONMALLOC=malloc`` is set unless the operator set ``PYTHONMALLOC``.

    None when there is nothing to change, or when this process is already the one
    executed again (:data:`REEXEC_MARK`). :class:`ConfigError` when ``choice`` is
    ``jemalloc`` and it cannot be had. Both choices as
    :class:`~notice_relay.config.Settings` checked them."""
    def on_jemalloc() -> bool:  # looked up only when jemalloc is in question
        return (loaded or loaded_allocator()) == "jemalloc"

    if REEXEC_MARK in environ:
        if choice == "jemalloc" and not on_jemalloc():
            raise ConfigError("NOTICE_RELAY_ALLOCATOR=jemalloc: the library was preloaded "
                              f"({environ.get('LD_PRELOAD', '')}) but is not in use")
        return None
    env = dict(environ)
    changed = False
    if objects == "malloc" and "PYTHONMALLOC" not in environ:
        env["PYTHONMALLOC"] = "malloc"
        changed = True
    if choice != "glibc" and not on_jemalloc():
        library = find_jemalloc(environ)
        if library is None:
            if choice == "jemalloc":
                raise ConfigError("NOTICE_RELAY_ALLOCATOR=jemalloc: libjemalloc.so.2 not "
                                  "found (install libjemalloc2, or set NOTICE_RELAY_JEMALLOC)")
        else:
            preload = env.get("LD_PRELOAD", "").strip()
            # First, so that its malloc and free are the ones every library links to.
            env["LD_PRELOAD"] = f"{library} {preload}".strip()
            env.setdefault("MALLOC_CONF", JEMALLOC_CONF)
            changed = True
    if not changed:
        return None
    env[REEXEC_MARK] = "1"
    return env


class NativeHeap:
    """The C library's allocator, when it is glibc's. Under jemalloc (preloaded, so
    ``malloc_trim`` and ``mallopt`` still resolve, to glibc's unused allocator) it
    does nothing: :attr:`allocator` says which one runs."""

    def __init__(self) -> None:
        self._trim: Any = None
        self._mallopt: Any = None
        self.allocator = loaded_allocator()
        if self.allocator != "glibc":
            return
        try:
            # The symbols already loaded into this process, libc's among them: no
            # library search (``ctypes.util.find_library`` runs ldconfig) at start-up.
            libc = ctypes.CDLL(None)
            fn = libc.malloc_trim
            opt = libc.mallopt
        except (OSError, AttributeError):
            return
        fn.argtypes = [ctypes.c_size_t]
        fn.restype = ctypes.c_int
        opt.argtypes = [ctypes.c_int, ctypes.c_int]
        opt.restype = ctypes.c_int
        self._trim = fn
        self._mallopt = opt

    @property
    def available(self) -> bool:
        """Whether this C library has ``malloc_trim``."""
        return self._trim is not None

    def limit(self, limits: HeapLimits = HeapLimits(),
              environ: Mapping[str, str] = os.environ) -> dict[str, int]:
        """Fix the allocator's heap count and thresholds (:class:`HeapLimits`), each
        unless the operator set it through glibc's own variables. Returns what was
        set. Call it before the threads start: a heap, once made, stays."""
        if self._mallopt is None:
            return {}
        done: dict[str, int] = {}
        for name, param, value, variable in limits.settings():
            if _set_by_operator(name, variable, environ):
                continue
            if self._mallopt(param, value) != 1:
                raise OSError(f"mallopt refused {name}={value}")
            done[name] = value
        return done

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
