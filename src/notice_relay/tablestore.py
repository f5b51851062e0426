"""The workers' table store: faust's RocksDB store under one memory budget per process.

faust opens one RocksDB database per table and partition (eight in a worker with the
default four partitions), each with a block cache of its own; and RocksDB keeps every
table file's index and filter blocks outside that cache, in the file's reader, for as
long as the file is open. That part grows with the entries held, about 2 bytes per
declaration for ever (``make bench-tables``): a worker that runs for months at a steady
rate grows for months.

Here every database of the process shares one LRU cache that holds the data blocks,
the index and filter blocks (those of level-0 files pinned while the file is open, so
the lookups of fresh entries never miss them), and, through a write buffer manager,
the memtables: what RocksDB holds in memory is capped by one figure,
``NOTICE_RELAY_TABLE_MEMORY_MIB``, whatever the number of partitions and entries.
Beyond the cap, index and filter blocks of older files are read again from their
files (the operating system's page cache) when a lookup needs them.

faust builds a store from a URL scheme; :func:`register` adds ``relay-rocksdb`` to
its stores.
"""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any

import faust.stores
import rocksdict
from faust.stores import rocksdb as faust_rocksdb

#: The URL that makes faust build tables with :class:`Store`.
STORE_URL = "relay-rocksdb://"

#: Memory of all the table databases of a process, by default (MiB).
DEFAULT_MEMORY_MIB = 16

#: The memtables' share of the budget (charged to the same cache).
WRITE_BUFFER_SHARE = 4

_budgets: dict[int, tuple[rocksdict.Cache, rocksdict.WriteBufferManager]] = {}

#: The process's stores, by ``id`` (a store is a mapping, so not hashable): how a
#: diagnostic reaches their databases (``scripts/memprobe``). The worker freezes its
#: startup objects out of the collector's sight, so ``gc.get_objects`` cannot.
STORES: weakref.WeakValueDictionary[int, Store] = weakref.WeakValueDictionary()


def budget(memory: int) -> tuple[rocksdict.Cache, rocksdict.WriteBufferManager]:
    """The process's cache and write buffer manager for a budget of ``memory`` bytes
    (one pair per budget, shared by every database opened with it)."""
    got = _budgets.get(memory)
    if got is None:
        cache = rocksdict.Cache(memory)
        # allow_stall=False: over the limit, RocksDB flushes memtables sooner; it never
        # blocks a write (the event loop calls RocksDB directly).
        manager = rocksdict.WriteBufferManager.new_write_buffer_manager_with_cache(
            memory // WRITE_BUFFER_SHARE, False, cache)
        got = _budgets[memory] = (cache, manager)
    return got


class BudgetedOptions(faust_rocksdb.RocksDBOptions):
    """faust's RocksDB options (sizes of files and write buffers, bloom filter), with
    the process's shared cache and write buffer manager instead of a cache per
    database, and index and filter blocks in that cache."""

    def __init__(self, memory: int = DEFAULT_MEMORY_MIB << 20, **kwargs: Any) -> None:
        kwargs.pop("use_rocksdict", None)
        super().__init__(use_rocksdict=True, **kwargs)
        self.memory = memory

    def as_options(self) -> rocksdict.Options:
        """The rocksdict options of one database."""
        cache, manager = budget(self.memory)
        options = rocksdict.Options(raw_mode=True)
        options.create_if_missing(True)
        if self.max_open_files is not None:
            options.set_max_open_files(self.max_open_files)
        options.set_write_buffer_size(self.write_buffer_size)
        options.set_max_write_buffer_number(self.max_write_buffer_number)
        options.set_target_file_size_base(self.target_file_size_base)
        options.set_write_buffer_manager(manager)
        table = rocksdict.BlockBasedOptions()
        table.set_bloom_filter(self.bloom_filter_size, True)
        table.set_block_cache(cache)
        table.set_cache_index_and_filter_blocks(True)
        table.set_pin_l0_filter_and_index_blocks_in_cache(True)
        table.set_index_type(rocksdict.BlockBasedIndexType.binary_search())
        options.set_block_based_table_factory(table)
        return options

    def open(self, path: Path, *, read_only: bool = False) -> rocksdict.Rdict:
        """Open (creating it if missing) the database at ``path``."""
        db = rocksdict.Rdict(str(path), options=self.as_options(),
                             access_type=rocksdict.AccessType.read_only()
                             if read_only else rocksdict.AccessType.read_write())
        db.set_read_options(rocksdict.ReadOptions())
        return db


class Store(faust_rocksdb.Store):
    """faust's RocksDB table store, opening its databases with :class:`BudgetedOptions`
    (the table's ``options`` carry ``memory``, in bytes)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        options = dict(self.options or {})
        memory = int(options.pop("memory", DEFAULT_MEMORY_MIB << 20))
        self.rocksdb_options = BudgetedOptions(memory, **options)
        self.use_rocksdict = True
        STORES[id(self)] = self


def register() -> None:
    """Let faust build stores from :data:`STORE_URL`."""
    faust.stores.STORES.aliases[STORE_URL.split(":", 1)[0]] = f"{__name__}:Store"
