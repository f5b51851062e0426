"""Settings, read once from the environment.

Every setting has an embedded default that works on a developer's machine with the
local Kafka that ``scripts/localkafka.py`` starts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path

from notice_relay.errors import ConfigError


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, not {raw!r}") from None


def _at_least(name: str, low: int, value: int) -> int:
    if value < low:
        raise ConfigError(f"{name} must be at least {low}, not {value}")
    return value


def _env_duration(name: str, default: timedelta) -> timedelta:
    from notice_relay.durations import parse_duration

    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return parse_duration(raw)
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None


def _env_schedule(name: str) -> tuple[timedelta, ...] | None:
    from notice_relay.durations import parse_duration

    raw = os.environ.get(name)
    if not raw:
        return None
    try:
        return tuple(parse_duration(x.strip()) for x in raw.split(",") if x.strip())
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, not {raw!r}") from None


TABLE_STORES = ("rocksdb", "memory")
ALLOCATORS = ("auto", "jemalloc", "glibc")
OBJECT_ALLOCATORS = ("malloc", "pymalloc")


def _env_choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    raw = os.environ.get(name)
    if not raw:
        return default
    if raw not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, not {raw!r}")
    return raw


@dataclass(frozen=True)
class Settings:
    """Everything a worker, the CLI or the API needs to know about its surroundings."""

    kafka_bootstrap: str = "127.0.0.1:9092"
    topic_prefix: str = "notice-relay."
    partitions: int = 4
    replication_factor: int = 1
    app_id: str = "notice-relay"
    database_url: str = "sqlite+aiosqlite:///var/notice-relay.db"
    connectors_dir: Path = Path("connectors")
    publishers_file: Path = Path("publishers.toml")
    data_dir: Path = Path("var/faust")
    #: Where the workers keep their tables (the declarations seen, each artist's
    #: latest version): ``rocksdb`` on disk (bounded memory; each worker process takes
    #: a directory of its own under ``data_dir``) or ``memory`` (rebuilt from the
    #: changelog topics at every start; grows with the number of declarations).
    table_store: str = "rocksdb"
    #: What the ``rocksdb`` tables of a worker process may hold in memory, all
    #: partitions together: one cache for data, index and filter blocks and the
    #: write buffers (:mod:`notice_relay.tablestore`). MiB.
    table_memory_mib: int = 16
    #: How often a worker gives the C allocator's free pages back to the system
    #: (:mod:`notice_relay.memory`); zero: never.
    malloc_trim_interval: timedelta = timedelta(seconds=60)
    #: The worker's memory allocator (:mod:`notice_relay.memory`): ``glibc`` (the C
    #: library's, with the heap limits and trim), ``jemalloc`` (required) or ``auto``
    #: (jemalloc when installed). glibc's is the default: in a two-hour soak jemalloc
    #: held 5-6 MiB more and rose just as fast (docs/reliability.md, finding 7).
    allocator: str = "glibc"
    #: What allocates the worker's Python objects (:mod:`notice_relay.memory`):
    #: ``pymalloc`` (CPython's own, in 1 MiB arenas that it gives back only when
    #: empty) or ``malloc`` (the C allocator above, ``PYTHONMALLOC=malloc``). pymalloc
    #: is the default: at 10 declarations/s ``malloc`` cost more CPU and its free
    #: memory grew faster (docs/reliability.md, finding 7). ``PYTHONMALLOC`` set by
    #: the operator wins.
    object_allocator: str = "pymalloc"
    #: How long a worker's stop may take before the process ends regardless
    #: (:mod:`notice_relay.stopping`); zero: no limit.
    stop_timeout: timedelta = timedelta(seconds=30)
    #: How many delivery tasks the deliver stage takes at once, and how long it
    #: waits to fill a batch.
    deliver_batch: int = 256
    deliver_batch_wait: float = 0.05
    audit_batch: int = 1000
    audit_batch_wait: float = 0.1
    #: Global retry schedule (a channel's ``retry_schedule`` overrides it).
    retry_schedule: tuple[timedelta, ...] | None = None
    #: After a 429 or a timeout, the next attempt waits at least this long.
    slow_down_floor: timedelta = timedelta(seconds=60)
    #: A channel failing without a success for this long is disabled.
    disable_after: timedelta = timedelta(days=5)
    #: How often tasks held for a disabled channel look whether it is enabled again.
    hold_recheck: timedelta = timedelta(seconds=60)
    #: A lane's circuit breaker: consecutive transient failures, and how long it stays open.
    breaker_threshold: int = 5
    breaker_cooldown: timedelta = timedelta(seconds=30)
    #: Consumer group session timeout: how soon a crashed worker's partitions move.
    session_timeout: timedelta = timedelta(seconds=30)
    #: The relay's public base URL, for the ack links in notices.
    public_url: str = "http://127.0.0.1:8080"
    #: How often the leader looks for acknowledgements past their due date.
    overdue_check: timedelta = timedelta(seconds=60)
    #: How long an ack token stays valid after the acknowledgement is due.
    ack_grace: timedelta = timedelta(days=90)
    #: A retry due longer ago than this and still not attempted is re-sent from the
    #: store (its message was lost on the way; see docs/architecture.md).
    sweep_after: timedelta = timedelta(minutes=5)
    log_format: str = "console"
    log_level: str = "info"
    extra: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls) -> Settings:
        """Read the settings from ``NOTICE_RELAY_*`` (and ``KAFKA_BOOTSTRAP_SERVERS``)."""
        env = os.environ.get
        d = cls()
        return cls(
            kafka_bootstrap=env("KAFKA_BOOTSTRAP_SERVERS") or d.kafka_bootstrap,
            topic_prefix=env("NOTICE_RELAY_TOPIC_PREFIX", d.topic_prefix),
            partitions=_env_int("NOTICE_RELAY_PARTITIONS", d.partitions),
            replication_factor=_env_int("NOTICE_RELAY_REPLICATION_FACTOR", d.replication_factor),
            app_id=env("NOTICE_RELAY_APP_ID") or d.app_id,
            database_url=env("NOTICE_RELAY_DATABASE_URL") or d.database_url,
            connectors_dir=Path(env("NOTICE_RELAY_CONNECTORS") or d.connectors_dir),
            publishers_file=Path(env("NOTICE_RELAY_PUBLISHERS") or d.publishers_file),
            data_dir=Path(env("NOTICE_RELAY_DATA_DIR") or d.data_dir),
            table_store=_env_choice("NOTICE_RELAY_TABLE_STORE", d.table_store, TABLE_STORES),
            table_memory_mib=_at_least("NOTICE_RELAY_TABLE_MEMORY_MIB", 4, _env_int(
                "NOTICE_RELAY_TABLE_MEMORY_MIB", d.table_memory_mib)),
            malloc_trim_interval=_env_duration("NOTICE_RELAY_MALLOC_TRIM_INTERVAL",
                                               d.malloc_trim_interval),
            allocator=_env_choice("NOTICE_RELAY_ALLOCATOR", d.allocator, ALLOCATORS),
            object_allocator=_env_choice("NOTICE_RELAY_OBJECT_ALLOCATOR", d.object_allocator,
                                         OBJECT_ALLOCATORS),
            stop_timeout=_env_duration("NOTICE_RELAY_STOP_TIMEOUT", d.stop_timeout),
            deliver_batch=_env_int("NOTICE_RELAY_DELIVER_BATCH", d.deliver_batch),
            deliver_batch_wait=_env_float("NOTICE_RELAY_DELIVER_BATCH_WAIT", d.deliver_batch_wait),
            audit_batch=_env_int("NOTICE_RELAY_AUDIT_BATCH", d.audit_batch),
            audit_batch_wait=_env_float("NOTICE_RELAY_AUDIT_BATCH_WAIT", d.audit_batch_wait),
            retry_schedule=_env_schedule("NOTICE_RELAY_RETRY_SCHEDULE"),
            slow_down_floor=_env_duration("NOTICE_RELAY_SLOW_DOWN_FLOOR", d.slow_down_floor),
            disable_after=_env_duration("NOTICE_RELAY_DISABLE_AFTER", d.disable_after),
            hold_recheck=_env_duration("NOTICE_RELAY_HOLD_RECHECK", d.hold_recheck),
            breaker_threshold=_env_int("NOTICE_RELAY_BREAKER_THRESHOLD", d.breaker_threshold),
            breaker_cooldown=_env_duration("NOTICE_RELAY_BREAKER_COOLDOWN", d.breaker_cooldown),
            session_timeout=_env_duration("NOTICE_RELAY_SESSION_TIMEOUT", d.session_timeout),
            public_url=env("NOTICE_RELAY_PUBLIC_URL") or d.public_url,
            overdue_check=_env_duration("NOTICE_RELAY_OVERDUE_CHECK", d.overdue_check),
            ack_grace=_env_duration("NOTICE_RELAY_ACK_GRACE", d.ack_grace),
            sweep_after=_env_duration("NOTICE_RELAY_SWEEP_AFTER", d.sweep_after),
            log_format=env("NOTICE_RELAY_LOG_FORMAT") or d.log_format,
            log_level=env("NOTICE_RELAY_LOG_LEVEL") or d.log_level,
        )

    def with_(self, **changes: object) -> Settings:
        """A copy with some settings changed."""
        return replace(self, **changes)  # type: ignore[arg-type]
