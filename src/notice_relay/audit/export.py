"""Exporting the audit trail: every stored event with its place in its chain, streamed.

Each record is the event exactly as it was hashed, plus ``seq``, ``prev_hash`` and
``hash``, so anyone can re-verify a chain from an export alone, without this code::

    hash == SHA-256(prev_hash ‖ "\\n" ‖ canonical_json(record without prev_hash and hash))

(canonical JSON: keys sorted, no spaces, UTF-8). Records come in chain order
(declaration, then seq). JSON Lines holds each record as canonical JSON; CSV holds the
same fields flat (:data:`CSV_COLUMNS`), ``actor`` as ``actor_kind``/``actor_id`` and
``data`` as canonical JSON text. The records are those of the HTTP API's export
(:func:`notice_relay.audit.queries.stream_events`); this module writes them to a file or
standard output for the CLI.

Rows are streamed from the database (a server-side cursor on PostgreSQL), never loaded
all at once; a file export is written beside its target and renamed into place only
when complete, so a failed export never leaves a truncated file under the real name.
"""

from __future__ import annotations

import csv
import os
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from enum import StrEnum
from pathlib import Path
from typing import Any, TextIO

import sqlalchemy as sa

from notice_relay.audit import queries
from notice_relay.audit.store import DB_ERRORS, AuditStore, db_reason, events
from notice_relay.canonical import canonical_json
from notice_relay.errors import StoreError

#: The CSV columns, in order (the same as the HTTP API's export).
CSV_COLUMNS: tuple[str, ...] = tuple(queries.EXPORT_FIELDS)


class ExportFormat(StrEnum):
    """The formats of ``audit export``."""

    JSONL = "jsonl"
    CSV = "csv"


def jsonl_line(record: dict[str, Any]) -> str:
    """A record as one line of canonical JSON (identical exports are identical bytes)."""
    return canonical_json(record).decode("utf-8") + "\n"


def csv_row(record: dict[str, Any]) -> list[Any]:
    """A record as a CSV row in :data:`CSV_COLUMNS` order: ``actor`` flattened,
    ``data`` as canonical JSON, a missing value as an empty cell."""
    actor = record.get("actor") or {}
    flat = {**record, "actor_kind": actor.get("kind"), "actor_id": actor.get("id"),
            "data": canonical_json(record.get("data")).decode("utf-8")}
    return ["" if flat.get(c) is None else flat[c] for c in CSV_COLUMNS]


async def stream_records(store: AuditStore) -> AsyncGenerator[dict[str, Any], None]:
    """Every stored event as an export record, in chain order, streamed
    (:func:`notice_relay.audit.queries.stream_events`, one statement and so one
    consistent snapshot even while a projector writes)."""
    try:
        async with aclosing(queries.stream_events(store)) as rows:  # type: ignore[type-var]
            async for record in rows:
                yield record
    except DB_ERRORS as exc:
        raise StoreError(f"cannot read the audit store: {db_reason(exc)}") from exc


async def count_events(store: AuditStore) -> int:
    """How many events the store holds."""
    try:
        async with store.engine.connect() as conn:
            q = sa.select(sa.func.count()).select_from(events)
            return int((await conn.execute(q)).scalar_one())
    except DB_ERRORS as exc:
        raise StoreError(f"cannot read the audit store: {db_reason(exc)}") from exc


async def write_export(
    store: AuditStore,
    fmt: ExportFormat,
    out: TextIO,
    *,
    on_progress: Callable[[int], None] | None = None,
    every: int = 500,
) -> int:
    """Write every event to ``out`` in ``fmt``; return how many were written.

    ``on_progress(n)`` is called with the running count every ``every`` events and at
    the end. ``out`` for CSV should be opened with ``newline=""``.
    """
    writer = csv.writer(out) if fmt is ExportFormat.CSV else None
    if writer is not None:
        writer.writerow(CSV_COLUMNS)
    n = 0
    async with aclosing(stream_records(store)) as rows:
        async for record in rows:
            if writer is not None:
                writer.writerow(csv_row(record))
            else:
                out.write(jsonl_line(record))
            n += 1
            if on_progress is not None and n % every == 0:
                on_progress(n)
    if on_progress is not None:
        on_progress(n)
    return n


async def export_to_file(
    store: AuditStore,
    fmt: ExportFormat,
    path: Path,
    *,
    on_progress: Callable[[int], None] | None = None,
) -> int:
    """Write every event to ``path`` (atomically: a partial file, renamed when
    complete); return how many were written."""
    partial = path.with_name(path.name + ".partial")
    try:
        with partial.open("w", encoding="utf-8", newline="") as out:
            n = await write_export(store, fmt, out, on_progress=on_progress)
            out.flush()
            os.fsync(out.fileno())
        partial.replace(path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return n
