#!/usr/bin/env python3
"""Show the query plan of the auditor's filtered deliveries query.

The query is the one the HTTP API and the CLI run for a page of deliveries
(:func:`notice_relay.audit.queries.deliveries_query`): one developer, a few states, a
time range on ``updated_at``, ordered by ``(updated_at, delivery_id)``, 100 rows::

    SELECT … FROM deliveries
    WHERE developer_id = ? AND state IN (?, ?) AND updated_at >= ? AND updated_at < ?
    ORDER BY updated_at, delivery_id LIMIT 100

It should be answered from the index ``ix_deliveries_developer_state_updated``
(developer_id, state, updated_at): one range scan per state, then a sort of the rows
in range only. The plan is printed with ``EXPLAIN`` on PostgreSQL and ``EXPLAIN QUERY
PLAN`` on SQLite; the exit status is 1 when the plan does not use the index.

A store the script creates is seeded with synthetic deliveries (``--rows``, spread over
50 developers, every state and 90 days) and analyzed, so that the planner sees a
realistic table rather than an empty one. A store given with ``--database-url`` is
explained as it is, unless ``--seed`` is given (which adds the synthetic rows).

Usage (in the project's venv)::

    python scripts/explain_deliveries.py                      # a temporary SQLite store
    python scripts/explain_deliveries.py --postgres           # and a temporary PostgreSQL
    python scripts/explain_deliveries.py --database-url URL   # an existing store
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.expression import ClauseElement, Executable

from notice_relay.audit.queries import DeliveryFilter, deliveries_query
from notice_relay.audit.store import AuditStore, deliveries
from notice_relay.models import DeliveryState

INDEX = "ix_deliveries_developer_state_updated"
T0 = datetime(2026, 8, 1, tzinfo=UTC)
DEVELOPERS = 50


class Explain(Executable, ClauseElement):
    """``EXPLAIN`` (or ``EXPLAIN QUERY PLAN``) of a statement, its parameters bound as
    the statement's own (the SQLAlchemy recipe)."""

    inherit_cache = False

    def __init__(self, statement: sa.Select[Any]) -> None:
        self.statement = statement


@compiles(Explain)
def _explain_default(element: Explain, compiler: Any, **kw: Any) -> str:
    return "EXPLAIN " + str(compiler.process(element.statement, **kw))


@compiles(Explain, "sqlite")
def _explain_sqlite(element: Explain, compiler: Any, **kw: Any) -> str:
    return "EXPLAIN QUERY PLAN " + str(compiler.process(element.statement, **kw))


def auditor_query() -> sa.Select[Any]:
    """The filtered deliveries query, with the parameters of a typical auditor."""
    flt = DeliveryFilter(
        developer_id="dev-07",
        states=(DeliveryState.FAILED, DeliveryState.RETRY_SCHEDULED),
        since=T0 + timedelta(days=30),
        until=T0 + timedelta(days=60),
    )
    return deliveries_query(flt, limit=100)


async def seed(store: AuditStore, rows: int, *, rng: random.Random | None = None) -> None:
    """Add ``rows`` synthetic deliveries and refresh the planner's statistics."""
    rng = rng or random.Random(7)  # noqa: S311 - synthetic data, not security
    states = [s.value for s in DeliveryState]
    batch: list[dict[str, Any]] = []
    async with store.engine.begin() as conn:
        for i in range(rows):
            at = T0 + timedelta(seconds=rng.randrange(90 * 86400))
            batch.append({
                "delivery_id": f"dlv_seed_{i:08d}_{rng.getrandbits(32):08x}",
                "declaration_key": f"pub-{i % 97}/decl-{i}",
                "developer_id": f"dev-{rng.randrange(DEVELOPERS):02d}",
                "channel": "webhook", "channel_type": "webhook",
                "state": rng.choice(states), "attempts": rng.randrange(1, 8),
                "planned_at": at, "updated_at": at,
            })
            if len(batch) == 5000:
                await conn.execute(deliveries.insert(), batch)
                batch = []
        if batch:
            await conn.execute(deliveries.insert(), batch)
        await conn.execute(sa.text("ANALYZE deliveries" if store.dialect == "postgresql"
                                   else "ANALYZE"))


async def plan(store: AuditStore) -> list[str]:
    """The plan of :func:`auditor_query` on ``store``, one line per row."""
    async with store.engine.connect() as conn:
        result = await conn.execute(Explain(auditor_query()))
        rows = result.all()
    if store.dialect == "sqlite":
        # EXPLAIN QUERY PLAN: (id, parent, notused, detail)
        return [str(r[-1]) for r in rows]
    return [str(r[0]) for r in rows]


def uses_index(lines: list[str]) -> bool:
    """True when the plan reads ``ix_deliveries_developer_state_updated``."""
    return any(INDEX in line for line in lines)


async def explain(url: str, *, rows: int | None) -> bool:
    """Print the plan on ``url`` (after seeding ``rows`` when given); True when it uses
    the index."""
    store = await AuditStore.open(url)
    try:
        if rows:
            await seed(store, rows)
        lines = await plan(store)
        count = await store.count_deliveries()
        sql = auditor_query().compile(dialect=store.engine.dialect,
                                      compile_kwargs={"render_postcompile": True})
    finally:
        await store.close()
    shown = url.split("@")[-1] if "@" in url else url
    print(f"--- {store.dialect}: {shown} ({count} deliveries)")
    print(" ".join(str(sql).split()))
    print("plan:")
    for line in lines:
        print(f"  {line}")
    ok = uses_index(lines)
    print(f"uses {INDEX}: {'yes' if ok else 'NO'}\n")
    return ok


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="explain_deliveries.py",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--database-url", action="append", default=[], metavar="URL",
                        help="explain on this store (repeatable); default: a temporary SQLite")
    parser.add_argument("--postgres", action="store_true",
                        help="also on a temporary PostgreSQL (scripts/localpg.py)")
    parser.add_argument("--rows", type=int, default=20_000,
                        help="synthetic deliveries in a store the script creates (default 20000)")
    parser.add_argument("--seed", action="store_true",
                        help="add the synthetic deliveries to --database-url stores too")
    args = parser.parse_args(argv)

    ok = True
    with tempfile.TemporaryDirectory(prefix="nr-explain-") as tmp:
        targets: list[tuple[str, int | None]] = [
            (url, args.rows if args.seed else None) for url in args.database_url]
        if not args.database_url:
            targets.append((f"sqlite+aiosqlite:///{Path(tmp) / 'explain.db'}", args.rows))
        server = None
        if args.postgres:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            import localpg

            # Not under the private temporary directory: run as root, the server runs
            # as the postgres account, which must reach its data dir.
            pg_dir = Path(tempfile.mkdtemp(prefix="nr-explain-pg-"))
            server = localpg.start(pg_dir)
            targets.append((server.url, args.rows))
        try:
            for url, rows in targets:
                ok = asyncio.run(explain(url, rows=rows)) and ok
        finally:
            if server is not None:
                localpg.stop(server)
                import shutil

                shutil.rmtree(server.data_dir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(_main())
