"""The worker's native-heap trim (notice_relay.memory): with glibc, free pages left in the
middle of a thread's heap stay resident until ``malloc_trim`` hands them back."""

from __future__ import annotations

import ctypes
import platform
import subprocess
import sys
import threading
from datetime import timedelta

import pytest

from notice_relay.config import Settings
from notice_relay.errors import ConfigError
from notice_relay.memory import HeapLimits, NativeHeap, resident_bytes

GLIBC = platform.libc_ver()[0] == "glibc"
BLOCK = 64 * 1024  # below glibc's mmap threshold: served from the thread's arena
BLOCKS = 480


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    return libc


def _free(blocks: list[int]) -> None:
    libc = _libc()
    for p in blocks:
        libc.free(p)


def _fragment_a_thread_arena() -> list[int]:
    """In a thread of its own (so in an arena of its own): allocate and touch
    ``BLOCKS`` blocks, free seven in eight. The eighth ones stay, spread across the
    heap, so ``free`` cannot give the stretches between them back from the top."""
    libc = _libc()
    kept: list[int] = []

    def run() -> None:
        blocks = [libc.malloc(BLOCK) for _ in range(BLOCKS)]
        for p in blocks:
            ctypes.memset(p, 0x5A, BLOCK)
        for i, p in enumerate(blocks):
            if i % 8:
                libc.free(p)
            else:
                kept.append(p)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    return kept


@pytest.mark.skipif(not GLIBC, reason="malloc_trim is glibc's")
def test_trim_gives_free_pages_in_the_middle_of_a_heap_back() -> None:
    heap = NativeHeap()
    assert heap.available
    heap.trim()
    kept = _fragment_a_thread_arena()
    try:
        freed = BLOCK * (BLOCKS - len(kept))
        before = resident_bytes()
        assert before is not None
        done = heap.trim()
        after = resident_bytes()
        assert done is not None
        assert after is not None
        # most of the 26 MiB freed was still resident, and the trim released it
        assert done.released is not None
        assert done.released >= freed // 2
        assert before - after >= freed // 2
        assert done.seconds < 5
        # nothing left to give back: a second trim releases (almost) nothing
        again = heap.trim()
        assert again is not None
        assert again.released is not None
        assert again.released < freed // 8
    finally:
        _free(kept)


@pytest.mark.skipif(not GLIBC, reason="malloc_trim is glibc's")
def test_memory_still_in_use_survives_a_trim() -> None:
    kept = _fragment_a_thread_arena()
    try:
        NativeHeap().trim()
        for p in kept:  # still readable, still what was written
            assert ctypes.string_at(p, 16) == b"\x5a" * 16
    finally:
        _free(kept)


def test_resident_bytes_reads_this_process() -> None:
    rss = resident_bytes()
    assert rss is not None
    assert 10 * 2**20 < rss < 64 * 2**30


def test_trim_interval_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTICE_RELAY_MALLOC_TRIM_INTERVAL", raising=False)
    assert Settings.from_env().malloc_trim_interval == timedelta(seconds=60)
    monkeypatch.setenv("NOTICE_RELAY_MALLOC_TRIM_INTERVAL", "5m")
    assert Settings.from_env().malloc_trim_interval == timedelta(minutes=5)
    monkeypatch.setenv("NOTICE_RELAY_MALLOC_TRIM_INTERVAL", "0")
    assert Settings.from_env().malloc_trim_interval == timedelta(0)
    monkeypatch.setenv("NOTICE_RELAY_MALLOC_TRIM_INTERVAL", "often")
    with pytest.raises(ConfigError, match="NOTICE_RELAY_MALLOC_TRIM_INTERVAL"):
        Settings.from_env()


# glibc raises its mmap and trim thresholds on its own once a process frees a block
# that had a mapping of its own (here 4 MiB): from then on a thread heap keeps up to
# twice that free at its top, where malloc_trim does not reach. In a subprocess, so
# that this process's allocator keeps its settings.
_THREAD_HEAP_TOP = """
import ctypes, sys, threading
from notice_relay.memory import NativeHeap, resident_bytes
if sys.argv[1] == "limit":
    print(NativeHeap().limit(environ={}), file=sys.stderr)
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
big = libc.malloc(4 << 20)
ctypes.memset(big, 1, 4 << 20)
libc.free(big)
N = 96
def run():
    # no Python allocation between the first malloc and the last free: nothing of
    # the interpreter's lands on top of the blocks
    blocks = [0] * N
    for i in range(N):
        blocks[i] = libc.malloc(64 << 10)
    for i in range(N):
        ctypes.memset(blocks[i], 2, 64 << 10)
    for i in range(N - 1, -1, -1):
        libc.free(blocks[i])
base = resident_bytes()
t = threading.Thread(target=run)
t.start()
t.join()
print(resident_bytes() - base)
"""

_HEAPS = """
import ctypes, sys, threading
from notice_relay.memory import NativeHeap
if sys.argv[1] == "limit":
    NativeHeap().limit(environ={})
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
together = threading.Barrier(8)
def run():
    libc.malloc(4096)
    together.wait()  # all eight hold a block at once: none can hand its heap on
threads = [threading.Thread(target=run) for _ in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
libc.malloc_stats()  # to stderr, a paragraph "Arena N:" per heap
"""


def _python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True,
                          text=True, timeout=60, check=True)


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_fixed_trim_threshold_gives_a_thread_heaps_free_top_back() -> None:
    kept_by_default = int(_python(_THREAD_HEAP_TOP, "default").stdout)
    limited = _python(_THREAD_HEAP_TOP, "limit")
    kept_when_limited = int(limited.stdout)
    assert "trim_threshold" in limited.stderr
    # glibc alone: the 6 MiB freed stays resident at the top of the thread's heap
    assert kept_by_default > 4 * 2**20
    # fixed at 1 MiB: what is freed beyond that goes back at once
    assert kept_when_limited < 2 * 2**20


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_arena_max_makes_the_threads_share_two_heaps() -> None:
    by_default = _python(_HEAPS, "default").stderr.count("Arena ")
    limited = _python(_HEAPS, "limit").stderr.count("Arena ")
    assert by_default > 2  # a heap per thread that allocates, up to eight per core
    assert limited == 2


def test_limits_set_by_the_operator_are_left_alone() -> None:
    heap = NativeHeap()
    env = {
        "MALLOC_ARENA_MAX": "4",
        "GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1048576:glibc.malloc.trim_threshold=0",
    }
    # all three set by the operator: nothing to fix (and nothing changed here)
    assert heap.limit(environ=env) == {}


def test_heap_limits_defaults() -> None:
    limits = HeapLimits()
    assert (limits.arena_max, limits.mmap_threshold, limits.trim_threshold) == (
        2, 512 * 1024, 1024 * 1024)
    names = {name: env for name, _p, _v, env in limits.settings()}
    assert names["arena_max"] == "MALLOC_ARENA_MAX"
