"""A directory of its own for each worker process, under the shared data directory.

A worker keeps its tables (the declarations seen, each artist's latest version) in
RocksDB databases, one per partition, and RocksDB lets only one process open a
database. Several workers on one machine (the fault suite, ``--workers 2`` in the
bench, a host running one worker per core) must therefore not share the files. Each
worker takes the first free slot ``worker-N`` under the data directory, holding an
exclusive ``flock`` on ``worker-N.lock`` for as long as it lives; the kernel releases
the lock when the process ends, however it ends (a SIGKILL included), so a restarted
worker finds its slot free again and reuses its databases: it then reads only the
part of each changelog written since, instead of all of it.

A slot's databases may be behind the changelog (another worker owned the partition in
between) but never wrong: Faust keeps, in each database, the changelog offset it holds
and reads on from there when the partition is assigned.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

from notice_relay.errors import ConfigError

MAX_SLOTS = 256


@dataclass(frozen=True)
class WorkerDir:
    """A claimed slot: ``path`` is the worker's own; ``fd`` holds the lock."""

    path: Path
    slot: int
    fd: int

    def release(self) -> None:
        """Give the slot back (the lock also goes with the process)."""
        with contextlib.suppress(OSError):
            os.close(self.fd)


def claim(root: Path, *, max_slots: int = MAX_SLOTS) -> WorkerDir:
    """Take the first free slot under ``root``; raise if all ``max_slots`` are taken."""
    root.mkdir(parents=True, exist_ok=True)
    for slot in range(max_slots):
        lock = root / f"worker-{slot}.lock"
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        except OSError:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        path = root / f"worker-{slot}"
        path.mkdir(exist_ok=True)
        return WorkerDir(path=path, slot=slot, fd=fd)
    raise ConfigError(
        f"all {max_slots} worker directories under {root} are in use by running workers"
    )
