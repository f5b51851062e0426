"""A memory probe for a soak's worker (docs/reliability.md, finding 7).

Loaded by every Python process started with ``PYTHONPATH=scripts/memprobe``; it does
something only in a ``notice_relay worker`` process and only with ``PROBE_DIR`` set.
Every ``PROBE_EVERY`` seconds (default 300) a thread appends one JSON line to
``$PROBE_DIR/probe.jsonl`` and writes glibc's ``malloc_info`` to
``$PROBE_DIR/malloc-<minute>.xml``. Each line holds:

- the process's RSS (``/proc/self/status``),
- glibc's ``mallinfo2`` (mapped, in use, free, mapped on their own), or, when the
  worker runs on jemalloc, its ``stats.*`` (allocated, active, resident, mapped,
  retained, metadata) through ``mallctl``,
- CPython's allocator (``sys._debugmallocstats``: arenas, bytes of live objects),
- ``sqlite3_memory_used`` of the system SQLite, which Python's ``sqlite3`` uses,
- the usage of the worker's RocksDB cache (``notice_relay.tablestore``), and, summed
  over its open databases, what RocksDB holds outside it (table readers, memtables)
  and how many files and keys the tables have,
- the Python threads, by name (the SQLite connections' threads, the executor's),
- the count of objects the collector tracks, by type (top 60): the worker freezes what
  exists once it is up (``gc.freeze``), so these are the objects made since, which
  is where a leak of Python objects shows.

With ``PROBE_TRACEMALLOC=<frames>`` the probe also starts ``tracemalloc`` as the worker
starts, adds what it traces (``tm_traced``, every block Python allocates, small objects
and the large buffers that pymalloc hands to the C allocator alike) to each line, and at
the first sample past each minute of ``PROBE_SNAPSHOTS`` (e.g. ``30,120``) dumps a
snapshot to ``$PROBE_DIR/tm-<minute>.pickle``; ``scripts/memprobe/tmdiff.py`` compares
two of them by call stack. Tracing costs CPU (every allocation records its stack), and a
snapshot pauses the worker for a second or two.

Nothing here, tracemalloc aside, pauses the worker beyond a few milliseconds per sample.

    PYTHONPATH=$PWD/scripts/memprobe PROBE_DIR=$PWD/var/probe python scripts/soak.py --minutes 75

Both paths absolute: the worker runs in a directory of its own, where relative ones
would point nowhere (the probe then writes nothing).
"""

from __future__ import annotations

import os


def _cmdline() -> list[bytes]:
    try:
        with open("/proc/self/cmdline", "rb") as fh:
            return fh.read().split(b"\0")
    except OSError:
        return []


def _start() -> None:
    import ctypes
    import gc
    import json
    import re
    import sys
    import tempfile
    import threading
    import time
    from collections import Counter

    out = os.environ["PROBE_DIR"]
    os.makedirs(out, exist_ok=True)
    every = float(os.environ.get("PROBE_EVERY", "300"))
    frames = int(os.environ.get("PROBE_TRACEMALLOC", "0"))
    snapshots = sorted(float(m) for m in os.environ.get("PROBE_SNAPSHOTS", "").split(",")
                       if m.strip())
    if frames:
        import tracemalloc
        tracemalloc.start(frames)
    libc = ctypes.CDLL("libc.so.6")

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
            "uordblks", "fordblks", "keepcost")]

    libc.mallinfo2.restype = MallInfo2
    libc.fopen.restype = ctypes.c_void_p
    libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    libc.fclose.argtypes = [ctypes.c_void_p]
    libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    try:
        sqlite = ctypes.CDLL("libsqlite3.so.0")
        sqlite.sqlite3_memory_used.restype = ctypes.c_int64
    except OSError:
        sqlite = None
    process = ctypes.CDLL(None)
    mallctl = getattr(process, "mallctl", None)
    if mallctl is not None:
        mallctl.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p,
                            ctypes.c_void_p, ctypes.c_size_t]
        mallctl.restype = ctypes.c_int

    def jemalloc() -> dict[str, int]:
        if mallctl is None:
            return {}
        epoch = ctypes.c_uint64(1)
        size = ctypes.c_size_t(8)
        # a new epoch refreshes the statistics
        mallctl(b"epoch", ctypes.byref(epoch), ctypes.byref(size), ctypes.byref(epoch), 8)
        got: dict[str, int] = {}
        for name in ("allocated", "active", "resident", "mapped", "retained", "metadata"):
            value = ctypes.c_size_t(0)
            size = ctypes.c_size_t(ctypes.sizeof(value))
            if mallctl(f"stats.{name}".encode(), ctypes.byref(value), ctypes.byref(size),
                       None, 0) == 0:
                got[f"je_{name}"] = value.value
        return got

    rocks_props = ("estimate-table-readers-mem", "cur-size-all-mem-tables",
                   "num-live-versions", "live-sst-files-size", "estimate-num-keys")

    def rocksdb() -> dict[str, int]:
        tables = sys.modules.get("notice_relay.tablestore")
        if tables is None:
            return {}
        got = {f"rocks_{p}": 0 for p in rocks_props}
        got["rocks_dbs"] = 0
        for store in list(tables.STORES.values()):
            for db in list(store._dbs.values()):
                got["rocks_dbs"] += 1
                for p in rocks_props:
                    value = db.property_int_value(f"rocksdb.{p}")
                    got[f"rocks_{p}"] += value or 0
        return got

    keys = ("# arenas allocated current", "# bytes in allocated blocks",
            "# bytes in available blocks", "Total")

    def pymalloc() -> dict[str, int]:
        # _debugmallocstats writes to the C stderr: lend it a file for a moment.
        got: dict[str, int] = {}
        with tempfile.TemporaryFile("w+") as tf:
            sys.stderr.flush()
            saved = os.dup(2)
            os.dup2(tf.fileno(), 2)
            try:
                sys._debugmallocstats()
            finally:
                os.dup2(saved, 2)
                os.close(saved)
            tf.seek(0)
            for line in tf:
                for key in keys:
                    name = "pymalloc " + key.strip("# ")
                    if line.startswith(key) and name not in got:
                        got[name] = int(line.split("=")[1].replace(",", "").strip())
        return got

    def sample(t0: float) -> None:
        minute = (time.monotonic() - t0) / 60
        mi = libc.mallinfo2()
        rec: dict[str, object] = {
            "min": round(minute, 2), "wall": time.time(),
            "malloc_arena": mi.arena, "malloc_inuse": mi.uordblks,
            "malloc_free": mi.fordblks, "malloc_mmapped": mi.hblkhd,
            "malloc_mmap_n": mi.hblks, "py_blocks": sys.getallocatedblocks(),
            "threads": threading.active_count(),
            # by name, numbers dropped: "asyncio_" (the executor), the SQLite
            # connections' "Thread- (_connection_worker_thread)", ...
            "thread_names": Counter(re.sub(r"\d+", "", t.name)
                                    for t in threading.enumerate())}
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(("VmRSS", "RssAnon", "RssFile")):
                    k, v = line.split(":")
                    rec[k] = int(v.split()[0]) / 1024
        if sqlite is not None:
            rec["sqlite_used"] = sqlite.sqlite3_memory_used()
        tables = sys.modules.get("notice_relay.tablestore")
        if tables is not None:
            rec["rocks"] = [[m, c.get_usage(), c.get_pinned_usage()]
                            for m, (c, _w) in tables._budgets.items()]
        rec.update(pymalloc())
        rec.update(jemalloc())
        rec.update(rocksdb())
        objects = gc.get_objects()
        counts = Counter(type(o).__qualname__ for o in objects)
        rec["gc_objects"] = sum(counts.values())
        rec["gc_top"] = counts.most_common(60)
        if frames:
            rec["tm_traced"], rec["tm_peak"] = tracemalloc.get_traced_memory()
            if snapshots and minute >= snapshots[0]:
                while snapshots and minute >= snapshots[0]:
                    snapshots.pop(0)
                tracemalloc.take_snapshot().dump(f"{out}/tm-{minute:06.1f}.pickle")
        fp = libc.fopen(f"{out}/malloc-{minute:06.1f}.xml".encode(), b"w")
        if fp:
            libc.malloc_info(0, fp)
            libc.fclose(fp)
        with open(f"{out}/probe.jsonl", "a") as fh:
            fh.write(json.dumps(rec) + "\n")

    def loop() -> None:
        t0 = time.monotonic()
        while True:
            time.sleep(every)
            try:
                sample(t0)
            except Exception as exc:  # the probe never stops the worker
                with open(f"{out}/probe.err", "a") as fh:
                    fh.write(repr(exc) + "\n")

    threading.Thread(target=loop, name="memprobe", daemon=True).start()


_cmd = _cmdline()
if b"notice_relay" in _cmd and b"worker" in _cmd and os.environ.get("PROBE_DIR"):
    _start()
