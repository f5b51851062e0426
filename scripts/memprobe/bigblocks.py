"""The blocks a running worker's C allocator mapped on their own, from outside and
without pausing it (docs/reliability.md, finding 7): glibc gives a block of at least
its mmap threshold (512 KiB in a worker) a mapping of its own, with a chunk header
whose size has the IS_MMAPPED bit. Each such block that holds a CPython 3.11 dict's
key table (``PyDictKeysObject``) is described: its size, how many of its entries are
live and how many were deleted, and a few of its keys. This is how the step of
1.8 MiB at minutes 20-25 of every soak was found to be CPython's table of interned
strings growing once.

    python scripts/memprobe/bigblocks.py <worker pid>

Reads ``/proc/<pid>/maps`` and ``/proc/<pid>/mem`` (root, or the process's owner with
ptrace allowed). Blocks under 400 KiB are not listed.
"""

from __future__ import annotations

import struct
import sys

IS_MMAPPED = 2
MIN_BLOCK = 400 << 10
PAGE = 4096
DICT_KEYS_UNICODE = 1


def blocks(pid: str) -> list[tuple[int, int]]:
    """(address, size) of every block mapped on its own. Such a block starts a page (mmap
    returns whole pages) with a chunk header: no previous size, and a size of whole pages
    with the IS_MMAPPED bit. The kernel merges neighbouring anonymous mappings, so every
    page of every anonymous mapping is looked at, and a block found is skipped."""
    out = []
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb") as mem:
        for line in maps:
            f = line.split()
            start, end = (int(x, 16) for x in f[0].split("-"))
            if len(f) > 5 or f[1] != "rw-p" or end - start < MIN_BLOCK:
                continue
            addr = start
            while addr < end:
                try:
                    mem.seek(addr)
                    prev, size = struct.unpack("<QQ", mem.read(16))
                except (OSError, struct.error):
                    break
                length = size & ~7
                if (prev == 0 and size & IS_MMAPPED and length % PAGE == 0
                        and MIN_BLOCK <= length <= end - addr):
                    out.append((addr, length))
                    addr += length
                else:
                    addr += PAGE
    return out


def describe(pid: str, start: int, size: int) -> str:
    """One block, and its dict key table if it holds one."""
    with open(f"/proc/{pid}/mem", "rb") as mem:
        def read(addr: int, n: int) -> bytes:
            mem.seek(addr)
            return mem.read(n)

        head = start + 16
        raw = read(head, 32)
        refcnt, log2_size, log2_index, kind, usable, nentries = (
            struct.unpack_from("<q", raw, 0)[0], raw[8], raw[9], raw[10],
            *struct.unpack_from("<qq", raw, 16))
        table = 32 + (1 << log2_index) + (2 << log2_size) // 3 * 16
        line = f"{start:#x}  {size / 2**20:.2f} MiB"
        if not (refcnt >= 1 and kind == DICT_KEYS_UNICODE and 3 <= log2_size < 40
                and usable + nentries == (2 << log2_size) // 3 and table <= size):
            return line
        entries = read(head + 32 + (1 << log2_index), 16 * nentries)
        live = [k for k, v in struct.iter_unpack("<QQ", entries) if k and v]

        def text(obj: int) -> str:
            length = struct.unpack("<q", read(obj + 16, 8))[0]
            return read(obj + 48, min(length, 40)).decode("ascii", "replace")

        newest = ", ".join(text(k) for k in live[-5:])
        return (f"{line}  dict key table: 2^{log2_size} slots, {len(live):,} live entries, "
                f"{nentries - len(live):,} deleted, {usable:,} free; newest keys: {newest}")


def main() -> None:
    """Print every block of the process given."""
    pid = sys.argv[1]
    for start, size in blocks(pid):
        print(describe(pid, start, size))


if __name__ == "__main__":
    main()
