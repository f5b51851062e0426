"""The workers' tables on disk: a directory of its own for each worker process, and
RocksDB databases that keep what was seen across a SIGKILL and a restart."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import rocksdict
from relay_helpers import eventually, make_decl, publish, trail_types
from test_delivery import add_receiver, receivers, start_worker  # noqa: F401 - fixture

from notice_relay import workdir
from notice_relay.config import Settings
from notice_relay.errors import ConfigError
from notice_relay.receiver import Receiver

# --- the worker's own directory (pure file locking, no broker) ---------------------


def test_each_claim_gets_a_slot_of_its_own_and_a_released_slot_is_reused(
    tmp_path: Path,
) -> None:
    a = workdir.claim(tmp_path)
    b = workdir.claim(tmp_path)
    assert (a.slot, b.slot) == (0, 1)
    assert a.path == tmp_path / "worker-0"
    assert a.path.is_dir()
    assert b.path == tmp_path / "worker-1"
    assert b.path.is_dir()
    a.release()
    c = workdir.claim(tmp_path)
    assert c.slot == 0  # the first free slot, so a restarted worker finds its files
    b.release()
    c.release()


def test_a_slot_held_by_another_process_is_skipped_until_that_process_ends(
    tmp_path: Path,
) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; from pathlib import Path; from notice_relay import workdir; "
         f"w = workdir.claim(Path({str(tmp_path)!r})); print(w.slot, flush=True); "
         "sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == b"0"
        mine = workdir.claim(tmp_path)
        assert mine.slot == 1
        mine.release()
        holder.kill()  # the lock goes with the process, however it ends
        holder.wait(10)
        again = workdir.claim(tmp_path)
        assert again.slot == 0
        again.release()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)
        for pipe in (holder.stdin, holder.stdout):
            if pipe is not None:
                pipe.close()


def test_when_every_slot_is_taken_the_error_says_so(tmp_path: Path) -> None:
    held = [workdir.claim(tmp_path, max_slots=2) for _ in range(2)]
    with pytest.raises(ConfigError, match="all 2 worker directories"):
        workdir.claim(tmp_path, max_slots=2)
    for w in held:
        w.release()


def test_table_store_setting_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTICE_RELAY_TABLE_STORE", "memory")
    assert Settings.from_env().table_store == "memory"
    monkeypatch.setenv("NOTICE_RELAY_TABLE_STORE", "redis")
    with pytest.raises(ConfigError, match="NOTICE_RELAY_TABLE_STORE must be one of rocksdb"):
        Settings.from_env()
    monkeypatch.delenv("NOTICE_RELAY_TABLE_STORE")
    assert Settings.from_env().table_store == "rocksdb"


# --- the tables in a running worker (real broker, real receiver) --------------------


def _table_keys(tables: Path, table: str) -> set[bytes]:
    """Every entry of ``table`` in the worker's RocksDB databases, read from disk."""
    keys: set[bytes] = set()
    dbs = sorted(tables.glob(f"{table}-*.db"))
    assert dbs, f"no RocksDB database of {table} in {tables}"
    for path in dbs:
        db = rocksdict.Rdict(str(path), options=rocksdict.Options(raw_mode=True),
                             access_type=rocksdict.AccessType.read_only())
        try:
            keys.update(k for k in db.keys() if not k.startswith(b"__faust"))  # noqa: SIM118 - an Rdict
        finally:
            db.close()
    return keys


@pytest.mark.kafka
async def test_tables_on_disk_survive_a_sigkill(
    relay_env: Any, worker_factory: Any, receivers: dict[str, Receiver],  # noqa: F811
) -> None:
    """Declarations relayed, the worker SIGKILLed, and a new worker in the same data
    directory: it takes the same slot, the same declarations published again are
    recorded as duplicates (not relayed twice), and an artist's next declaration gets
    the next version — both tables are on disk, in the worker's own directory."""
    r = await add_receiver(relay_env, receivers, "acme-ai")
    relay_env.write_publishers("artfolio")
    worker = start_worker(relay_env, worker_factory)
    n = 8
    decls = [make_decl(i) for i in range(n)]
    await publish(relay_env, decls)
    await eventually(lambda: len(r.state.notices()) == n, 90, "every notice delivered",
                     worker=worker)
    worker.kill()

    tables = relay_env.root / "faust" / "worker-0" / "v1" / "tables"
    seen = _table_keys(tables, "declarations-seen")
    assert {f"artfolio/d-{i:04d}" for i in range(n)} <= {k.decode(errors="replace").strip('"')
                                                          for k in seen}
    assert len(_table_keys(tables, "artist-versions")) == n

    worker = start_worker(relay_env, worker_factory)
    again = {**make_decl(0), "declaration_id": "d-9000"}  # the first artist, a new declaration
    await publish(relay_env, [*decls, again])
    await eventually(lambda: len(r.state.notices()) == n + 1, 90, "the new notice delivered",
                     worker=worker)
    newest = next(x for x in r.state.notices() if x["declaration_id"] == "d-9000")
    first = next(x for x in r.state.notices() if x["declaration_id"] == "d-0000")
    assert first["version"] == 1
    assert newest["version"] == 2

    async def all_duplicates_recorded() -> bool:
        for i in range(n):
            types = [t for t, _ in await trail_types(relay_env, f"artfolio/d-{i:04d}")]
            if "declaration.duplicate" not in types:
                return False
        return True

    await eventually(all_duplicates_recorded, 60, "the repeats recorded as duplicates",
                     worker=worker)
    assert len(r.state.notices()) == n + 1  # nothing relayed twice
    assert not (relay_env.root / "faust" / "worker-1").exists()  # the same slot, reused
