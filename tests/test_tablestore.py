"""The workers' RocksDB tables under one memory budget per process: real RocksDB
databases (rocksdict), read through RocksDB's own memory account."""

from __future__ import annotations

import gc
from pathlib import Path

import faust.stores
import pytest
import rocksdict
from faust.stores.rocksdb import RocksDBOptions

from notice_relay import tablestore
from notice_relay.app import ROCKSDB_OPTIONS
from notice_relay.config import Settings
from notice_relay.errors import ConfigError

OPTIONS = {k: v for k, v in ROCKSDB_OPTIONS.items() if k != "driver"}


def fill(dbs: list[rocksdict.Rdict], n: int) -> None:
    """``n`` declarations' entries spread over ``dbs``, each key read first (as the
    duplicate check does), then flushed to table files."""
    for i in range(n):
        db = dbs[i % len(dbs)]
        key = f'"artfolio/decl-{i:09d}"'.encode()
        if db.get(key) is None:
            db.put(key, f'"{i:064x}@notice-relay.declarations:0:{i}"'.encode())
    for db in dbs:
        db.flush()


def prop(db: rocksdict.Rdict, name: str) -> int:
    return db.property_int_value(f"rocksdb.{name}") or 0


def test_every_database_shares_one_cache_that_holds_index_and_filter_blocks(
    tmp_path: Path,
) -> None:
    memory = 6 << 20
    opts = tablestore.BudgetedOptions(memory, **OPTIONS)
    dbs = [opts.open(tmp_path / f"budget-{i}") for i in range(4)]
    stock = RocksDBOptions(**OPTIONS, block_cache_size=2 << 20, use_rocksdict=True)
    stock_dbs = [stock.open(tmp_path / f"stock-{i}") for i in range(4)]
    try:
        fill(dbs, 200_000)
        fill(stock_dbs, 200_000)
        usage = {prop(db, "block-cache-usage") for db in dbs}
        assert len(usage) == 1  # one cache: every database reports the same usage
        assert {prop(db, "block-cache-capacity") for db in dbs} == {memory}
        # The index and filter blocks (about 2 bytes per entry) are in the cache...
        assert usage.pop() > 200_000
        # ...and not beside it in the table readers, where faust's options keep them
        # (and where nothing bounds them).
        readers = sum(prop(db, "estimate-table-readers-mem") for db in dbs)
        stock_readers = sum(prop(db, "estimate-table-readers-mem") for db in stock_dbs)
        assert stock_readers > 300_000
        assert readers < stock_readers / 2
        assert sum(prop(db, "block-cache-usage") for db in stock_dbs) < 10_000
        # Everything written can be read back.
        for i in (0, 1, 99_999, 199_999):
            assert dbs[i % 4].get(f'"artfolio/decl-{i:09d}"'.encode()) is not None
    finally:
        for db in dbs + stock_dbs:
            db.close()


def test_the_cache_stays_within_its_budget_as_entries_pile_up(tmp_path: Path) -> None:
    memory = 4 << 20
    opts = tablestore.BudgetedOptions(memory, **OPTIONS)
    dbs = [opts.open(tmp_path / f"db-{i}") for i in range(2)]
    try:
        seen = []
        for _ in range(4):  # 1.2 million entries, ~2.5 MB of index and filters each time
            fill(dbs, 300_000)
            seen.append(prop(dbs[0], "block-cache-usage"))
        # RocksDB may go a little over while blocks it reads are pinned; never far.
        assert max(seen) <= memory * 1.1, seen
        # It is full: the entries' index and filter blocks need more than the budget,
        # so it is the cap that holds them there.
        assert seen[-1] > memory * 0.8, seen
    finally:
        for db in dbs:
            db.close()


def test_faust_builds_the_tables_with_the_budgeted_store() -> None:
    tablestore.register()
    assert faust.stores.by_url(tablestore.STORE_URL) is tablestore.Store


def test_the_budget_is_a_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings.from_env().table_memory_mib == 16
    monkeypatch.setenv("NOTICE_RELAY_TABLE_MEMORY_MIB", "64")
    assert Settings.from_env().table_memory_mib == 64
    monkeypatch.setenv("NOTICE_RELAY_TABLE_MEMORY_MIB", "1")
    with pytest.raises(ConfigError, match="NOTICE_RELAY_TABLE_MEMORY_MIB must be at least 4"):
        Settings.from_env()
    monkeypatch.setenv("NOTICE_RELAY_TABLE_MEMORY_MIB", "lots")
    with pytest.raises(ConfigError, match="must be an integer, not 'lots'"):
        Settings.from_env()


async def test_the_worker_tables_stores_can_be_found_and_are_not_kept_alive(
    tmp_path: Path,
) -> None:
    # The worker freezes its startup objects out of the collector's sight, so a
    # diagnostic (scripts/memprobe) finds the stores through tablestore.STORES.
    from notice_relay.app import create_app

    app = create_app(Settings(data_dir=tmp_path))
    stores = [app.tables[name].data for name in ("declarations-seen", "artist-versions")]
    assert all(isinstance(s, tablestore.Store) for s in stores)
    assert {id(s) for s in stores} <= set(tablestore.STORES)
    ids = [id(s) for s in stores]
    del stores, app
    gc.collect()
    assert not set(ids) & set(tablestore.STORES)
