"""The audit store: the audit topic projected into SQL, with a hash chain.

SQLAlchemy Core over asyncio, SQLite by default and PostgreSQL by URL. The audit
topic is the source of truth; this store is a projection of it that can be rebuilt.

Each declaration's events get a sequence number (1, 2, …) in the order the projector
reads them from the declaration's partition, and a hash:
``hash = SHA-256(prev_hash ‖ "\\n" ‖ canonical_json(event, seq))``, the first
``prev_hash`` being 64 zeros. Storing the head of every chain beside the rows makes a
removed last row detectable too.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from notice_relay.audit.batch import apply_batch
from notice_relay.audit.chain import GENESIS, event_hash
from notice_relay.audit.chunks import in_lists
from notice_relay.errors import StoreError
from notice_relay.models import AuditEvent


class UTCDateTime(sa.TypeDecorator[datetime]):
    """A timestamp stored as UTC and read back timezone-aware, on every backend.

    SQLite keeps no offset: an aware value would be stored as its wall time and read
    back as if it were UTC, another instant. PostgreSQL's ``timestamptz`` keeps the
    instant. Naive values are taken to be UTC.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        """To UTC (naive on SQLite, which would drop the offset anyway)."""
        if value is None:
            return None
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        """Aware, in UTC."""
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


metadata = sa.MetaData()

events = sa.Table(
    "audit_events",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True,
              autoincrement=True),
    sa.Column("event_id", sa.String(80), nullable=False, unique=True),
    sa.Column("declaration_key", sa.String(300), nullable=False),
    sa.Column("seq", sa.Integer, nullable=False),
    sa.Column("type", sa.String(64), nullable=False),
    sa.Column("occurred_at", UTCDateTime(), nullable=False),
    sa.Column("actor_kind", sa.String(16), nullable=False),
    # Unbounded: an operator's or API user's name; PostgreSQL enforces VARCHAR lengths
    # (SQLite does not), and an event the store refuses would stall the projector.
    sa.Column("actor_id", sa.Text, nullable=False),
    sa.Column("delivery_id", sa.String(80)),
    sa.Column("developer_id", sa.String(200)),
    sa.Column("data", sa.Text, nullable=False),
    sa.Column("prev_hash", sa.String(64), nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
    sa.UniqueConstraint("declaration_key", "seq", name="uq_audit_events_declaration_seq"),
    sa.Index("ix_audit_events_delivery", "delivery_id"),
)

chain_heads = sa.Table(
    "audit_chain_heads",
    metadata,
    sa.Column("declaration_key", sa.String(300), primary_key=True),
    sa.Column("seq", sa.Integer, nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
)

declarations = sa.Table(
    "declarations",
    metadata,
    sa.Column("declaration_key", sa.String(300), primary_key=True),
    sa.Column("publisher_id", sa.String(200)),
    sa.Column("declaration_id", sa.String(200)),
    sa.Column("status", sa.String(32), nullable=False),
    sa.Column("action", sa.String(16)),
    sa.Column("artist_ref", sa.String(80)),
    sa.Column("fingerprint", sa.String(64)),
    sa.Column("reason", sa.Text),
    sa.Column("notice", sa.Text, doc="Notice v1 JSON as relayed (for replays)"),
    sa.Column("received_at", UTCDateTime(), nullable=False),
    sa.Column("updated_at", UTCDateTime(), nullable=False),
    sa.Index("ix_declarations_declaration_id", "declaration_id"),
)

deliveries = sa.Table(
    "deliveries",
    metadata,
    sa.Column("delivery_id", sa.String(80), primary_key=True),
    sa.Column("declaration_key", sa.String(300), nullable=False),
    sa.Column("developer_id", sa.String(200), nullable=False),
    sa.Column("channel", sa.String(200), nullable=False),
    sa.Column("channel_type", sa.String(16), nullable=False),
    sa.Column("state", sa.String(24), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("last_status_code", sa.Integer),
    sa.Column("last_error", sa.Text),
    sa.Column("receipt", sa.Text),
    sa.Column("next_attempt_at", UTCDateTime()),
    sa.Column("planned_at", UTCDateTime(), nullable=False),
    sa.Column("delivered_at", UTCDateTime()),
    sa.Column("updated_at", UTCDateTime(), nullable=False),
    sa.Index("ix_deliveries_declaration", "declaration_key"),
    sa.Index("ix_deliveries_developer_state_updated", "developer_id", "state", "updated_at"),
    sa.Index("ix_deliveries_state_updated", "state", "updated_at"),
)


channels = sa.Table(
    "channels",
    metadata,
    sa.Column("developer_id", sa.String(200), primary_key=True),
    sa.Column("channel", sa.String(200), primary_key=True),
    sa.Column("enabled", sa.Boolean, nullable=False, default=True),
    sa.Column("reason", sa.Text),
    sa.Column("changed_at", UTCDateTime()),
    sa.Column("changed_by", sa.Text),
    sa.Column("last_success_at", UTCDateTime()),
    sa.Column("failing_since", UTCDateTime()),
    sa.Column("last_error", sa.Text),
)


@dataclass(frozen=True)
class StoredEvent:
    """An audit event as stored, with its place in the chain."""

    event: AuditEvent
    seq: int
    prev_hash: str
    hash: str


@dataclass(frozen=True)
class DeliveryRow:
    """The current state of one delivery."""

    delivery_id: str
    declaration_key: str
    developer_id: str
    channel: str
    channel_type: str
    state: str
    attempts: int
    last_status_code: int | None
    last_error: str | None
    receipt: str | None
    next_attempt_at: datetime | None
    planned_at: datetime
    delivered_at: datetime | None
    updated_at: datetime


@dataclass(frozen=True)
class DeclarationRow:
    """What the store knows of one declaration."""

    declaration_key: str
    publisher_id: str | None
    declaration_id: str | None
    status: str
    action: str | None
    artist_ref: str | None
    fingerprint: str | None
    reason: str | None
    notice: str | None
    received_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class ChainProblem:
    """One place where a declaration's stored trail does not verify."""

    declaration_key: str
    seq: int
    problem: str


@dataclass(frozen=True)
class VerifyReport:
    """What :meth:`AuditStore.verify_report` checked, and what it found."""

    declarations: int
    events: int
    problems: list[ChainProblem]

    @property
    def ok(self) -> bool:
        """True when every chain verifies."""
        return not self.problems


#: What a database failure can raise: SQLAlchemy's errors, and OSError from a driver
#: that cannot reach its server (asyncpg raises ConnectionRefusedError, gaierror and
#: TimeoutError unwrapped when it (re)connects).
DB_ERRORS: tuple[type[Exception], ...] = (sa.exc.SQLAlchemyError, OSError)


def db_reason(exc: BaseException) -> str:
    """What went wrong, in the driver's words, without SQLAlchemy's echo of the SQL."""
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


#: Rows fetched at a time when the store streams a large result.
STREAM_BATCH = 1000


def _aware(value: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes; everything stored is UTC.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


_ZERO = timedelta(0)


def _in_utc(event: AuditEvent) -> AuditEvent:
    # pydantic parses "Z" into its own UTC tzinfo (not datetime.UTC); any zero offset
    # serializes the same, so only other offsets need a copy.
    if event.occurred_at.tzinfo is UTC or event.occurred_at.utcoffset() == _ZERO:
        return event
    return event.model_copy(update={"occurred_at": event.occurred_at.astimezone(UTC)})


def _row_to_event(row: Any) -> StoredEvent:
    event = AuditEvent.model_validate(
        {
            "event_id": row.event_id,
            "declaration_key": row.declaration_key,
            "type": row.type,
            "occurred_at": _aware(row.occurred_at),
            "actor": {"kind": row.actor_kind, "id": row.actor_id},
            "delivery_id": row.delivery_id,
            "developer_id": row.developer_id,
            "data": json.loads(row.data),
        },
        strict=False,
    )
    return StoredEvent(event=event, seq=row.seq, prev_hash=row.prev_hash, hash=row.hash)


#: The page cache of each SQLite connection, KiB. SQLite's default (2,000 KiB per
#: connection) fills as the database grows, on every connection of the pool, so a
#: long-running worker held megabytes more after hours than after minutes
#: (docs/reliability.md, finding 7); ``bench/store_cache.py`` measures the write speed.
SQLITE_CACHE_KIB = 512

#: Connections the pool keeps (SQLAlchemy's default, stated). A worker and the API
#: server open them all at start (``warm_pool``): opened on demand, each new one (on
#: SQLite a thread of its own, with its page cache and prepared statements) came in the
#: first burst of work that needed it, minutes or hours into a run, and its memory
#: stayed, a step up each time (docs/reliability.md, finding 7). Connections beyond
#: these (up to ``max_overflow``, 10, more) still open in a burst and close when given
#: back.
POOL_SIZE = 5


class AuditStore:
    """The audit store. Create with :meth:`open`, close with :meth:`close`."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name

    @classmethod
    async def open(cls, url: str, *, create: bool = True,
                   sqlite_cache_kib: int = SQLITE_CACHE_KIB,
                   warm_pool: bool = False) -> AuditStore:
        """Connect to the store at ``url`` and create its tables if missing.

        ``sqlite_cache_kib``: the page cache of each SQLite connection (zero: SQLite's
        own default, about 2 MB); PostgreSQL ignores it. ``warm_pool``: open all
        :data:`POOL_SIZE` connections now rather than on demand, so that a long-running
        process takes its memory (and its threads, on SQLite) at start instead of in
        steps over hours."""
        try:
            parsed = make_url(url)
        except sa.exc.ArgumentError as exc:
            raise StoreError(f"not a database URL: {exc}") from exc
        kwargs: dict[str, Any] = {"pool_size": POOL_SIZE}
        if parsed.get_backend_name() == "sqlite":
            db = parsed.database
            if db and db != ":memory:":
                Path(db).parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"timeout": 30}
        else:
            kwargs["pool_pre_ping"] = True
        try:
            engine = create_async_engine(url, **kwargs)
        except (sa.exc.SQLAlchemyError, ImportError) as exc:
            where = parsed.render_as_string(hide_password=True)
            raise StoreError(f"cannot open the audit store at {where}: {exc}") from exc
        if parsed.get_backend_name() == "sqlite":

            @sa.event.listens_for(engine.sync_engine, "connect")
            def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
                # WAL lets the CLI read while a worker writes; a busy timeout rides
                # out the short write locks of the projector.
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA busy_timeout=30000")
                cur.execute("PRAGMA synchronous=NORMAL")
                if sqlite_cache_kib > 0:
                    # Negative: a size in KiB rather than a number of pages.
                    cur.execute(f"PRAGMA cache_size=-{int(sqlite_cache_kib)}")
                cur.close()

        store = cls(engine)
        if create:
            try:
                async with engine.begin() as conn:
                    await conn.run_sync(metadata.create_all)
            except DB_ERRORS as exc:
                await engine.dispose()
                raise StoreError(f"cannot open the audit store: {exc}") from exc
        if warm_pool:
            try:
                await store._warm_pool()
            except DB_ERRORS as exc:
                await engine.dispose()
                raise StoreError(f"cannot open the audit store: {exc}") from exc
        return store

    async def _warm_pool(self) -> None:
        """Open every connection the pool keeps: each is held while the next opens, so
        the pool cannot hand the same one out twice; all go back to the pool after."""
        async with contextlib.AsyncExitStack() as stack:
            for _ in range(POOL_SIZE):
                conn = await stack.enter_async_context(self.engine.connect())
                await conn.execute(sa.text("SELECT 1"))

    async def close(self) -> None:
        """Release the connections."""
        await self.engine.dispose()

    def _insert(self, table: sa.Table) -> Any:
        if self.dialect == "postgresql":
            return postgresql.insert(table)
        return sqlite.insert(table)

    # ------------------------------------------------------------------ writing

    async def append(self, batch: Sequence[AuditEvent]) -> int:
        """Store the events not stored yet, in order; return how many were new.

        Idempotent: an event whose ``event_id`` is already stored is skipped, so
        the projector may see the same event twice (at-least-once) safely.
        """
        if not batch:
            return 0
        try:
            async with self.engine.begin() as conn:
                return await self._append(conn, batch)
        except DB_ERRORS as exc:
            raise StoreError(f"cannot append to the audit store: {exc}") from exc

    async def _append(self, conn: AsyncConnection, batch: Sequence[AuditEvent]) -> int:
        # The chain hashes each event as the store will give it back: in UTC (both
        # backends return UTC), so an event sent with another offset still verifies.
        batch = [_in_utc(e) for e in batch]
        ids = list(dict.fromkeys(e.event_id for e in batch))
        known: set[str] = set()
        for chunk in in_lists(ids):
            rows = await conn.execute(
                sa.select(events.c.event_id).where(events.c.event_id.in_(chunk)))
            known.update(r[0] for r in rows)
        fresh: list[AuditEvent] = []
        for e in batch:
            if e.event_id not in known:
                known.add(e.event_id)
                fresh.append(e)
        if not fresh:
            return 0
        keys = list(dict.fromkeys(e.declaration_key for e in fresh))
        heads: dict[str, tuple[int, str]] = {}
        for chunk in in_lists(keys):
            rows = await conn.execute(
                sa.select(chain_heads.c.declaration_key, chain_heads.c.seq, chain_heads.c.hash)
                .where(chain_heads.c.declaration_key.in_(chunk))
            )
            heads.update({r.declaration_key: (r.seq, r.hash) for r in rows})
        rows_out: list[dict[str, Any]] = []
        for e in fresh:
            seq, prev = heads.get(e.declaration_key, (0, GENESIS))
            seq += 1
            h = event_hash(prev, e, seq)
            heads[e.declaration_key] = (seq, h)
            rows_out.append(
                {
                    "event_id": e.event_id,
                    "declaration_key": e.declaration_key,
                    "seq": seq,
                    "type": e.type.value,
                    "occurred_at": e.occurred_at,
                    "actor_kind": e.actor.kind.value,
                    "actor_id": e.actor.id,
                    "delivery_id": e.delivery_id,
                    "developer_id": e.developer_id,
                    "data": json.dumps(e.data, sort_keys=True, separators=(",", ":")),
                    "prev_hash": prev,
                    "hash": h,
                }
            )
        await conn.execute(events.insert(), rows_out)
        # In key order, so that two projectors upserting the same heads (during a
        # rebalance) lock them in the same order rather than deadlock.
        touched = sorted({e.declaration_key for e in fresh})
        head_rows = [{"declaration_key": k, "seq": heads[k][0], "hash": heads[k][1]}
                     for k in touched]
        ins = self._insert(chain_heads)
        await conn.execute(
            ins.on_conflict_do_update(
                index_elements=[chain_heads.c.declaration_key],
                set_={"seq": ins.excluded.seq, "hash": ins.excluded.hash},
            ),
            head_rows,
        )
        await apply_batch(conn, self, fresh)
        return len(fresh)

    # ------------------------------------------------------------------ reading

    async def find_declarations(self, declaration_id: str) -> list[DeclarationRow]:
        """Declarations whose id (or full ``publisher/id`` key) is ``declaration_id``."""
        q = sa.select(declarations).where(
            sa.or_(
                declarations.c.declaration_id == declaration_id,
                declarations.c.declaration_key == declaration_id,
            )
        ).order_by(declarations.c.declaration_key)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(q)).all()
        return [
            DeclarationRow(**{**r._mapping, "received_at": _aware(r.received_at),
                              "updated_at": _aware(r.updated_at)})
            for r in rows
        ]

    async def deliveries_of(self, declaration_key: str) -> list[DeliveryRow]:
        """Every delivery of one declaration."""
        q = (
            sa.select(deliveries)
            .where(deliveries.c.declaration_key == declaration_key)
            .order_by(deliveries.c.developer_id, deliveries.c.channel, deliveries.c.delivery_id)
        )
        async with self.engine.connect() as conn:
            rows = (await conn.execute(q)).all()
        return [_delivery_row(r) for r in rows]

    async def trail(self, declaration_key: str) -> list[StoredEvent]:
        """The trail of one declaration, in sequence order."""
        q = (sa.select(events).where(events.c.declaration_key == declaration_key)
             .order_by(events.c.seq))
        async with self.engine.connect() as conn:
            rows = (await conn.execute(q)).all()
        return [_row_to_event(r) for r in rows]

    async def count_deliveries(self, *, state: str | None = None) -> int:
        """How many deliveries there are (in ``state``)."""
        q = sa.select(sa.func.count()).select_from(deliveries)
        if state is not None:
            q = q.where(deliveries.c.state == state)
        async with self.engine.connect() as conn:
            return int((await conn.execute(q)).scalar_one())

    async def all_deliveries(self) -> list[DeliveryRow]:
        """Every delivery (tests and small exports)."""
        async with self.engine.connect() as conn:
            rows = (await conn.execute(
                sa.select(deliveries).order_by(deliveries.c.delivery_id))).all()
        return [_delivery_row(r) for r in rows]

    async def all_declarations(self) -> list[DeclarationRow]:
        """Every declaration (tests and small exports)."""
        async with self.engine.connect() as conn:
            rows = (await conn.execute(sa.select(declarations))).all()
        return [
            DeclarationRow(**{**r._mapping, "received_at": _aware(r.received_at),
                              "updated_at": _aware(r.updated_at)})
            for r in rows
        ]

    # ---------------------------------------------------------------- verifying

    async def verify(self) -> list[ChainProblem]:
        """Recompute every chain; return each place where the stored trail was
        altered, removed or reordered (empty when the store verifies)."""
        return (await self.verify_report()).problems

    async def verify_report(self) -> VerifyReport:
        """:meth:`verify`, with how many declarations and events were checked.

        Events and their chain heads are read in one statement, so from one snapshot:
        a projector appending meanwhile cannot make a chain look longer or shorter than
        its head. (Heads without any event are looked up afterwards; an append writes a
        head together with its events, so only a removal makes one.) The rows are
        streamed (a server-side cursor on PostgreSQL), so memory does not grow with the
        store.
        """
        problems: list[ChainProblem] = []
        n_events = n_chains = 0
        q = (
            sa.select(events, chain_heads.c.seq.label("head_seq"),
                      chain_heads.c.hash.label("head_hash"))
            .select_from(events.outerjoin(
                chain_heads, chain_heads.c.declaration_key == events.c.declaration_key))
            .order_by(events.c.declaration_key, events.c.seq)
            .execution_options(yield_per=STREAM_BATCH)
        )
        orphans = (
            sa.select(chain_heads.c.declaration_key, chain_heads.c.seq)
            .where(~sa.exists().where(events.c.declaration_key == chain_heads.c.declaration_key))
            .order_by(chain_heads.c.declaration_key)
        )
        current: str | None = None
        head: tuple[int, str] | None = None
        expected_seq, prev = 1, GENESIS

        def close_chain(key: str, last_seq: int, last_hash: str) -> None:
            if head is None:
                problems.append(ChainProblem(key, last_seq, "chain head missing"))
            elif head != (last_seq, last_hash):
                problems.append(ChainProblem(
                    key, head[0],
                    f"chain ends at seq {last_seq} but its head says seq {head[0]}"
                    if head[0] != last_seq else "last event does not match the chain head",
                ))

        try:
            async with self.engine.connect() as conn:
                result = await conn.stream(q)
                async for row in result:
                    n_events += 1
                    stored = _row_to_event(row)
                    key = stored.event.declaration_key
                    if key != current:
                        if current is not None:
                            close_chain(current, expected_seq - 1, prev)
                        n_chains += 1
                        current, expected_seq, prev = key, 1, GENESIS
                        head = None if row.head_seq is None else (row.head_seq, row.head_hash)
                    if stored.seq != expected_seq:
                        problems.append(ChainProblem(
                            key, expected_seq,
                            f"event seq {expected_seq} is missing (next stored is {stored.seq})",
                        ))
                    if stored.prev_hash != prev:
                        problems.append(
                            ChainProblem(key, stored.seq, "previous hash does not match"))
                    recomputed = event_hash(stored.prev_hash, stored.event, stored.seq)
                    if recomputed != stored.hash:
                        problems.append(ChainProblem(key, stored.seq, "event content was altered"))
                    expected_seq, prev = stored.seq + 1, stored.hash
                if current is not None:
                    close_chain(current, expected_seq - 1, prev)
                for key, seq in (await conn.execute(orphans)).all():
                    n_chains += 1
                    problems.append(
                        ChainProblem(key, seq, "every event of this declaration was removed"))
        except DB_ERRORS as exc:
            raise StoreError(f"cannot read the audit store: {db_reason(exc)}") from exc
        return VerifyReport(declarations=n_chains, events=n_events, problems=problems)

    async def channel_health(self) -> list[dict[str, Any]]:
        """The recorded health of every channel that has any."""
        async with self.engine.connect() as conn:
            rows = (await conn.execute(sa.select(channels))).all()
        out = []
        for r in rows:
            m = dict(r._mapping)
            for k in ("changed_at", "last_success_at", "failing_since"):
                m[k] = _aware(m[k])
            out.append(m)
        return out

    async def chain_heads(self) -> dict[str, tuple[int, str]]:
        """The head (seq, hash) of every declaration's chain."""
        async with self.engine.connect() as conn:
            rows = await conn.execute(sa.select(chain_heads))
            return {r.declaration_key: (r.seq, r.hash) for r in rows}

    async def truncate(self) -> None:
        """Remove every row (before a rebuild from the audit topic)."""
        tables = (events, chain_heads, declarations, deliveries, channels)
        try:
            async with self.engine.begin() as conn:
                if self.dialect == "postgresql":
                    # One statement, no row-by-row delete; it waits for (and then
                    # blocks) any projector writing meanwhile.
                    await conn.execute(sa.text(
                        "TRUNCATE " + ", ".join(t.name for t in tables) + " RESTART IDENTITY"))
                else:
                    for table in tables:
                        await conn.execute(table.delete())
        except DB_ERRORS as exc:
            raise StoreError(f"cannot empty the audit store: {db_reason(exc)}") from exc


def _delivery_row(r: Any) -> DeliveryRow:
    m = dict(r._mapping)
    for k in ("next_attempt_at", "planned_at", "delivered_at", "updated_at"):
        m[k] = _aware(m[k])
    return DeliveryRow(**m)
