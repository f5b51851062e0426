"""The worker's native-heap trim (notice_relay.memory): with glibc, free pages left in the
middle of a thread's heap stay resident until ``malloc_trim`` hands them back."""

from __future__ import annotations

import ctypes
import os
import platform
import subprocess
import sys
import threading
from datetime import timedelta
from pathlib import Path

import pytest
from conftest import Env, WorkerProcess, wait_until
from relay_helpers import whsec

from notice_relay.config import Settings
from notice_relay.errors import ConfigError
from notice_relay.memory import (
    JEMALLOC_CONF,
    REEXEC_MARK,
    HeapLimits,
    NativeHeap,
    allocator_environ,
    find_jemalloc,
    resident_bytes,
)

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


# ---------------------------------------------------------------- the allocator


def _library(tmp_path: Path) -> str:
    lib = tmp_path / "libjemalloc.so.2"
    lib.write_bytes(b"")
    return str(lib)


def test_glibc_chosen_runs_on_as_it_is(tmp_path: Path) -> None:
    env = {"NOTICE_RELAY_JEMALLOC": _library(tmp_path)}
    assert allocator_environ("glibc", env, loaded="glibc") is None


def test_auto_preloads_jemalloc_first_with_the_workers_settings(tmp_path: Path) -> None:
    lib = _library(tmp_path)
    env = allocator_environ("auto", {"NOTICE_RELAY_JEMALLOC": lib, "LD_PRELOAD": "libx.so",
                                     "PATH": "/bin"}, loaded="glibc")
    assert env is not None
    assert env["LD_PRELOAD"] == f"{lib} libx.so"  # first, the operator's after it
    assert env["MALLOC_CONF"] == JEMALLOC_CONF
    assert env[REEXEC_MARK] == "1"
    assert env["PATH"] == "/bin"  # the rest as it was


def test_the_operators_malloc_conf_is_kept(tmp_path: Path) -> None:
    env = allocator_environ("jemalloc", {"NOTICE_RELAY_JEMALLOC": _library(tmp_path),
                                         "MALLOC_CONF": "narenas:1"}, loaded="glibc")
    assert env is not None
    assert env["MALLOC_CONF"] == "narenas:1"


def test_nothing_to_do_once_jemalloc_runs(tmp_path: Path) -> None:
    env = {"NOTICE_RELAY_JEMALLOC": _library(tmp_path)}
    assert allocator_environ("auto", env, loaded="jemalloc") is None
    assert allocator_environ("jemalloc", env, loaded="jemalloc") is None


def test_a_preload_that_did_not_take_is_not_tried_again(tmp_path: Path) -> None:
    env = {"NOTICE_RELAY_JEMALLOC": _library(tmp_path), REEXEC_MARK: "1",
           "LD_PRELOAD": "/x/libjemalloc.so.2"}
    assert allocator_environ("auto", env, loaded="glibc") is None  # glibc, and no loop
    with pytest.raises(ConfigError, match=r"preloaded \(/x/libjemalloc\.so\.2\) but is not in use"):
        allocator_environ("jemalloc", env, loaded="glibc")


def test_a_missing_library_named_by_the_operator_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"NOTICE_RELAY_JEMALLOC: no such file: /nowhere/lib\.so"):
        allocator_environ("auto", {"NOTICE_RELAY_JEMALLOC": "/nowhere/lib.so"}, loaded="glibc")


def test_pythons_objects_go_through_malloc_when_chosen() -> None:
    env = allocator_environ("glibc", {"PATH": "/bin"}, loaded="glibc", objects="malloc")
    assert env == {"PATH": "/bin", "PYTHONMALLOC": "malloc", REEXEC_MARK: "1"}
    assert allocator_environ("glibc", {"PATH": "/bin"}, loaded="glibc",
                             objects="pymalloc") is None


def test_the_operators_pythonmalloc_is_kept() -> None:
    env = {"PYTHONMALLOC": "pymalloc_debug"}
    assert allocator_environ("glibc", env, loaded="glibc", objects="malloc") is None


def test_jemalloc_and_malloc_for_objects_in_one_execution(tmp_path: Path) -> None:
    lib = _library(tmp_path)
    env = allocator_environ("jemalloc", {"NOTICE_RELAY_JEMALLOC": lib}, loaded="glibc",
                            objects="malloc")
    assert env is not None
    assert env["LD_PRELOAD"] == lib
    assert env["PYTHONMALLOC"] == "malloc"
    assert env[REEXEC_MARK] == "1"
    # the process executed again (the mark) is not executed a second time
    assert allocator_environ("glibc", {**env, "PYTHONMALLOC": "malloc"}, loaded="glibc",
                             objects="malloc") is None


_MALLOC_STATS = ("import sys; from notice_relay.memory import python_allocator; "
                 "print(python_allocator()); sys.stdout.flush(); sys._debugmallocstats()")


def test_the_environment_given_turns_pymalloc_off() -> None:
    base = {k: v for k, v in os.environ.items() if k not in ("PYTHONMALLOC", REEXEC_MARK)}
    env = allocator_environ("glibc", base, loaded="glibc", objects="malloc")
    assert env is not None
    runs = {}
    for name, environ in (("malloc", env), ("pymalloc", base)):
        done = subprocess.run([sys.executable, "-c", _MALLOC_STATS], env=environ,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        runs[name] = done
    # CPython prints its arenas' statistics only when pymalloc allocates
    assert runs["malloc"].stdout.split() == ["malloc"]
    assert "Small block threshold" not in runs["malloc"].stderr
    assert runs["pymalloc"].stdout.split() == ["pymalloc"]
    assert "Small block threshold" in runs["pymalloc"].stderr


@pytest.mark.parametrize(("variable", "field", "default", "other", "wrong", "choices"), [
    ("NOTICE_RELAY_ALLOCATOR", "allocator", "glibc", "auto", "tcmalloc",
     "auto, jemalloc, glibc"),
    ("NOTICE_RELAY_OBJECT_ALLOCATOR", "object_allocator", "pymalloc", "malloc", "mimalloc",
     "malloc, pymalloc"),
])
def test_allocator_settings(monkeypatch: pytest.MonkeyPatch, variable: str, field: str,
                            default: str, other: str, wrong: str, choices: str) -> None:
    monkeypatch.delenv(variable, raising=False)
    assert getattr(Settings.from_env(), field) == default
    monkeypatch.setenv(variable, other)
    assert getattr(Settings.from_env(), field) == other
    monkeypatch.setenv(variable, wrong)
    with pytest.raises(ConfigError, match=rf"{variable} must be one of {choices}, "
                                          rf"not '{wrong}'"):
        Settings.from_env()


def test_a_worker_that_requires_jemalloc_and_cannot_have_it_does_not_start(
        tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NOTICE_RELAY_")}
    env.update(NOTICE_RELAY_ALLOCATOR="jemalloc", NOTICE_RELAY_JEMALLOC="/nowhere/lib.so",
               KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:9")
    done = subprocess.run([sys.executable, "-m", "notice_relay", "worker"], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "NOTICE_RELAY_JEMALLOC: no such file: /nowhere/lib.so" in done.stderr


def _installed_jemalloc() -> Path:
    lib = find_jemalloc({})
    assert lib is not None, "libjemalloc.so.2 not found: scripts/setup-system.sh installs it"
    return lib


# In a process preloaded as the worker is: a thread that lives on (as the worker's do)
# allocates 30 MiB in 64 KiB blocks and frees seven in eight, leaving the eighth spread
# through the memory. Printed: the resident size before, right after, 4 s later (MiB).
_FRAGMENTED = """
import ctypes, threading, time
from notice_relay.memory import loaded_allocator, resident_bytes
assert loaded_allocator() == "jemalloc", loaded_allocator()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
kept = []
freed = threading.Event()
end = threading.Event()
def run():
    blocks = [libc.malloc(64 << 10) for _ in range(480)]
    for p in blocks:
        ctypes.memset(p, 0x5A, 64 << 10)
    for i, p in enumerate(blocks):
        if i % 8:
            libc.free(p)
        else:
            kept.append(p)
    freed.set()
    end.wait()  # a thread's exit hands its cached memory back: not what is measured
base = resident_bytes()
t = threading.Thread(target=run)
t.start()
freed.wait()
peak = resident_bytes()
time.sleep(4)  # dirty_decay_ms is 1000; the background thread purges
print(base, peak, resident_bytes())
end.set()
t.join()
"""


def _fragmented(malloc_conf: str | None) -> tuple[int, int, int]:
    environ = {k: v for k, v in os.environ.items() if k not in ("MALLOC_CONF", "LD_PRELOAD")}
    environ["NOTICE_RELAY_JEMALLOC"] = str(_installed_jemalloc())
    if malloc_conf:
        environ["MALLOC_CONF"] = malloc_conf
    env = allocator_environ("jemalloc", environ, loaded="glibc")
    assert env is not None
    done = subprocess.run([sys.executable, "-c", _FRAGMENTED], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    base, peak, after = map(int, done.stdout.split())
    return base, peak, after


def test_under_jemalloc_the_pages_freed_go_back_without_a_trim() -> None:
    freed = 420 * (64 << 10)
    base, peak, after = _fragmented(None)  # JEMALLOC_CONF
    assert peak - base > freed // 2  # it was resident
    assert peak - after > freed // 2  # and most of it went back on its own
    # jemalloc told never to purge keeps it: what gives it back is the setting
    base, peak, after = _fragmented("dirty_decay_ms:-1,muzzy_decay_ms:-1")
    assert peak - after < freed // 8


@pytest.mark.kafka
def test_the_worker_runs_on_jemalloc_when_installed_unless_told_glibc(
        relay_env: Env) -> None:
    _installed_jemalloc()
    # a registry that loads: the worker must stay up while its memory map is read
    relay_env.write_publishers("artfolio")
    relay_env.add_webhook_developer("acme-ai", "http://127.0.0.1:9/hook", whsec())
    runs = {}
    environs = {}
    # auto, with the default for Python's objects (pymalloc); glibc, with malloc for them
    for name, choice, objects in (("auto", "auto", ""), ("glibc", "glibc", "malloc")):
        worker = WorkerProcess(relay_env, name, loglevel="info", NOTICE_RELAY_ALLOCATOR=choice,
                               NOTICE_RELAY_OBJECT_ALLOCATOR=objects).start()
        try:
            assert worker.proc is not None
            pid = worker.proc.pid

            def ready(w: WorkerProcess = worker) -> bool:
                assert w.proc is not None
                assert w.proc.poll() is None, w.output()[-3000:]
                return "memory.allocator" in w.output()
            wait_until(ready, 60, what="the worker to log its allocator")
            # the same process (executed again in place): its parent still holds it
            maps = Path(f"/proc/{pid}/maps").read_text()
            runs[name] = ("libjemalloc" in maps, worker.output())
            # the environment the interpreter was executed with
            environs[name] = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        finally:
            worker.stop()
    on_jemalloc, out = runs["auto"]
    assert on_jemalloc, out[-3000:]
    assert '"allocator": "jemalloc"' in out
    assert JEMALLOC_CONF in out
    assert b"PYTHONMALLOC=malloc" not in environs["auto"]
    assert '"objects": "pymalloc"' in out
    on_jemalloc, out = runs["glibc"]
    assert not on_jemalloc
    assert '"allocator": "glibc"' in out
    # executed again for PYTHONMALLOC alone, in place
    assert b"PYTHONMALLOC=malloc" in environs["glibc"], out[-3000:]
    assert '"objects": "malloc"' in out
