"""The soak's memory readers (scripts/memprobe): glibc's malloc_info parsed, the minutes
chosen, the trend's slope and interval, the blocks mapped on their own read from outside."""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "memprobe"))

import bigblocks
import heaps
import trend

TWO_HEAPS = """<malloc version="1">
<heap nr="0">
<sizes>
  <unsorted from="1841" to="1873" total="3714" count="2"/>
</sizes>
<total type="fast" count="0" size="0"/>
<total type="rest" count="287" size="4132302"/>
<system type="current" size="34082816"/>
<system type="max" size="34082816"/>
<aspace type="total" size="34082816"/>
<aspace type="mprotect" size="34082816"/>
</heap>
<heap nr="1">
<sizes>
</sizes>
<total type="fast" count="0" size="0"/>
<total type="rest" count="16" size="762639"/>
<system type="current" size="2727936"/>
<system type="max" size="2727936"/>
<aspace type="total" size="2727936"/>
<aspace type="mprotect" size="2727936"/>
<aspace type="subheaps" size="1"/>
</heap>
<total type="fast" count="0" size="0"/>
<total type="rest" count="303" size="4894941"/>
<total type="mmap" count="3" size="2326528"/>
<system type="current" size="36810752"/>
<system type="max" size="36810752"/>
<aspace type="total" size="36810752"/>
<aspace type="mprotect" size="36810752"/>
</malloc>"""


def test_each_heap_is_read_and_the_totals_are_not_taken_for_one() -> None:
    got = heaps.heaps(TWO_HEAPS)
    assert got == [heaps.Heap(0, 34082816, 4132302, 287), heaps.Heap(1, 2727936, 762639, 16)]
    assert got[0].in_use == 34082816 - 4132302


def test_this_process_s_own_malloc_info_is_read(tmp_path: Path) -> None:
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "malloc_info"):
        pytest.fail(f"{name} has no malloc_info: the probe needs glibc")
    libc.fopen.restype = ctypes.c_void_p
    libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    libc.fclose.argtypes = [ctypes.c_void_p]
    libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    out = tmp_path / "malloc.xml"
    fp = libc.fopen(str(out).encode(), b"w")
    assert libc.malloc_info(0, fp) == 0
    libc.fclose(fp)
    got = heaps.heaps(out.read_text())
    main = [h for h in got if h.nr == 0]
    assert len(main) == 1
    assert main[0].span > 0
    assert 0 <= main[0].free <= main[0].span


def test_a_heap_without_its_totals_is_an_error_naming_it() -> None:
    with pytest.raises(ValueError, match="heap 3"):
        heaps.heaps('<malloc version="1"><heap nr="3"><sizes/></heap></malloc>')


def test_the_minutes_shown_are_the_first_samples_past_each_mark() -> None:
    sampled = [float(m) for m in range(2, 141, 2)]
    assert heaps.chosen(sampled, 30, 30) == [30, 60, 90, 120]
    assert heaps.chosen([1.9, 31.5, 33.2, 61.0, 95.0], 30, 30) == [31.5, 61.0, 95.0]


def test_the_table_has_a_column_per_minute(tmp_path: Path) -> None:
    rec = {"min": 30.0, "VmRSS": 122.5, "sqlite_used": 3_000_000,
           "pymalloc bytes in allocated blocks": 53_500_000,
           "pymalloc arenas allocated current": 53, "rocks": [[16777216, 1_900_000, 0]],
           "rocks_estimate-num-keys": 51234}
    later = {**rec, "min": 60.0, "VmRSS": 123.0}
    (tmp_path / "probe.jsonl").write_text(json.dumps(rec) + "\n" + json.dumps(later) + "\n")
    (tmp_path / "malloc-0030.0.xml").write_text(TWO_HEAPS)
    text = heaps.table(tmp_path, [30.0, 60.0])
    assert "| minute | 30 | 60 |" in text
    assert "| RSS (MiB) | 122.5 | 123.0 |" in text
    assert "| main heap: span / free (pieces) / in use (MB) | 34.1 / 4.1 (287) / 30.0 | — |" in text
    assert "| pymalloc: in live objects (MB) / arenas | 53.5 / 53 | 53.5 / 53 |" in text
    assert "1.9 / 51,234" in text


def test_the_slope_of_a_line_is_its_slope_with_no_width() -> None:
    b, half = trend.slope([(x, 2.0 + 0.5 * x) for x in range(10)])
    assert b == pytest.approx(0.5)
    assert half == pytest.approx(0.0, abs=1e-9)


def test_the_interval_widens_with_noise_and_holds_the_slope() -> None:
    pts = [(float(x), 1.0 * x + (0.3 if x % 2 else -0.3)) for x in range(12)]
    b, half = trend.slope(pts)
    assert half > 0
    assert b - half < 1.0 < b + half


CHILD = """
import sys
table = {f"key{i:06d}": i for i in range(60_000)}
for i in range(0, 60_000, 3):
    del table[f"key{i:06d}"]
print("ready", flush=True)
sys.stdin.read()
"""


def test_a_large_dict_s_key_table_is_found_and_read_from_outside() -> None:
    """A child process's dict of 60,000 keys, a third deleted, has a key table mapped on
    its own (2^17 slots, 1.9 MiB, over the 512 KiB threshold a worker sets): it is found
    and its live and deleted entries are counted from /proc/<pid>/mem, with its newest
    keys."""
    # a fixed threshold, as a worker has (memory.py): glibc's own rises with each mapped
    # block freed, and the table would then come from the heap
    env = {"MALLOC_MMAP_THRESHOLD_": "524288", "PATH": "/usr/bin:/bin"}
    with subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True, env=env) as child:
        try:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "ready"
            pid = str(child.pid)
            lines = [bigblocks.describe(pid, start, size)
                     for start, size in bigblocks.blocks(pid)]
            tables = [line for line in lines if "dict key table" in line]
            assert len(tables) == 1, lines
            assert "2^17 slots, 40,000 live entries, 20,000 deleted" in tables[0]
            assert "key059999" in tables[0]
        finally:
            child.kill()
