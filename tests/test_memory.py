"""The worker's native-heap trim (notice_relay.memory): with glibc, free pages left in the
middle of a thread's heap stay resident until ``malloc_trim`` hands them back."""

from __future__ import annotations

import ctypes
import platform
import threading
from datetime import timedelta

import pytest

from notice_relay.config import Settings
from notice_relay.errors import ConfigError
from notice_relay.memory import NativeHeap, resident_bytes

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
