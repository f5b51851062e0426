"""CLI commands for the audit trail: audit verify, audit export, audit rebuild.

Registered into the ``notice-relay`` parser by :func:`register`; like the rest of the
CLI, they parse and hand off (to :mod:`notice_relay.audit.store`,
:mod:`notice_relay.audit.export` and :mod:`notice_relay.audit.rebuild`). Exit codes as
everywhere: 0 success, 1 the trail does not verify (or the user said no), 2 usage or
environment error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from notice_relay.config import Settings

if TYPE_CHECKING:
    from rich.progress import Progress

    from notice_relay.audit.store import AuditStore

T = TypeVar("T")


def register(sub: Any) -> None:
    """Add this module's subcommands to the ``notice-relay`` parser."""
    a = sub.add_parser("audit", help="the audit trail: verify, export, rebuild")
    asub = a.add_subparsers(dest="audit_command", required=True, metavar="COMMAND")

    v = asub.add_parser(
        "verify", help="recompute every hash chain; name each altered, removed or reordered event",
        description="Recompute every declaration's hash chain. Exit 0 when every chain "
        "verifies, 1 naming each declaration and sequence number that does not.",
    )
    _database_option(v)
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=cmd_audit_verify)

    e = asub.add_parser(
        "export", help="every stored event with seq, prev_hash and hash (JSON Lines or CSV)",
        description="Write every stored event, in chain order, with its seq, prev_hash and "
        "hash: hash = SHA-256(prev_hash + '\\n' + canonical JSON of the record without "
        "prev_hash and hash), so a chain can be re-verified from the export alone.",
    )
    e.add_argument("--format", choices=("jsonl", "csv"), default="jsonl",
                   help="JSON Lines (default) or CSV")
    e.add_argument("--output", "-o", metavar="FILE",
                   help="write to FILE, with a progress bar (default: standard output)")
    _database_option(e)
    e.set_defaults(func=cmd_audit_export)

    r = asub.add_parser(
        "rebuild", help="empty the audit store and refill it from the audit topic",
        description="Empty the audit store and refill it from the audit topic, from the "
        "beginning of every partition up to the offsets at the start. Stop every worker "
        "first (its projector writes into the store), or rebuild into another database "
        "with --database-url.",
    )
    r.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    r.add_argument("--force", action="store_true",
                   help="rebuild even though workers appear to be running")
    r.add_argument("--batch", type=_positive, default=1000,
                   help="events appended per transaction (default %(default)s)")
    r.add_argument("--json", action="store_true")
    _database_option(r)
    r.set_defaults(func=cmd_audit_rebuild)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"a positive integer, not {text!r}")
    return value


def _database_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--database-url", metavar="URL",
                   help="the audit store (default: NOTICE_RELAY_DATABASE_URL)")


def _url(args: argparse.Namespace, settings: Settings) -> str:
    return str(args.database_url or settings.database_url)


def _shown(url: str) -> str:
    """A database URL fit to print: its password hidden."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # an unparsable URL is reported when the store is opened
        return "<database URL>"


async def _with_store(url: str, use: Callable[[AuditStore], Awaitable[T]], *,
                      create: bool = False) -> T:
    from notice_relay.audit.store import AuditStore

    store = await AuditStore.open(url, create=create)
    try:
        return await use(store)
    finally:
        await store.close()


def _progress() -> Progress:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from notice_relay.cli import err

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=err)


# ------------------------------------------------------------------------ verify


def cmd_audit_verify(args: argparse.Namespace, settings: Settings) -> int:
    """Verify every chain of the audit store."""
    from rich.table import Table

    from notice_relay.cli import err, out

    report = asyncio.run(_with_store(_url(args, settings), lambda s: s.verify_report()))
    if args.json:
        sys.stdout.write(json.dumps({
            "ok": report.ok, "declarations": report.declarations, "events": report.events,
            "problems": [{"declaration_key": p.declaration_key, "seq": p.seq, "problem": p.problem}
                         for p in report.problems],
        }, indent=2) + "\n")
        return 0 if report.ok else 1
    if report.ok:
        out.print(f"[bold green]OK[/]: {report.declarations} declarations, {report.events} "
                  "events; every chain verifies")
        return 0
    t = Table(title="the audit trail does not verify", title_justify="left")
    for col in ("declaration", "seq", "problem"):
        t.add_column(col)
    for p in report.problems:
        t.add_row(p.declaration_key, str(p.seq), p.problem)
    out.print(t)
    chains = len({p.declaration_key for p in report.problems})
    err.print(f"[bold red]FAILED[/]: {len(report.problems)} problem(s) in {chains} of "
              f"{report.declarations} declarations ({report.events} events checked)")
    return 1


# ------------------------------------------------------------------------ export


def cmd_audit_export(args: argparse.Namespace, settings: Settings) -> int:
    """Export every stored event with its chain fields."""
    from notice_relay.audit.export import ExportFormat, count_events, export_to_file, write_export
    from notice_relay.cli import err

    fmt = ExportFormat(args.format)
    if args.output is None:
        try:
            asyncio.run(_with_store(_url(args, settings),
                                    lambda s: write_export(s, fmt, sys.stdout)))
            sys.stdout.flush()
        except BrokenPipeError:
            # The reader went away (| head): say nothing more, on a stdout that is gone.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 1
        return 0

    path = Path(args.output)
    if not path.parent.is_dir():
        err.print(f"cannot write {path}: no directory {path.parent}", markup=False)
        return 2

    async def to_file(store: AuditStore) -> int:
        total = await count_events(store)
        with _progress() as progress:
            task = progress.add_task(f"exporting to {path}", total=total)
            return await export_to_file(
                store, fmt, path, on_progress=lambda n: progress.update(task, completed=n))

    try:
        n = asyncio.run(_with_store(_url(args, settings), to_file))
    except OSError as exc:
        err.print(f"cannot write {path}: {exc.strerror or exc}", markup=False)
        return 2
    err.print(f"exported {n} events to {path} ({fmt.value})", markup=False)
    return 0


# ------------------------------------------------------------------------ rebuild


def cmd_audit_rebuild(args: argparse.Namespace, settings: Settings) -> int:
    """Empty the audit store and refill it from the audit topic."""
    from notice_relay.audit.rebuild import rebuild, running_workers
    from notice_relay.cli import err, out
    from notice_relay.topics import Topics

    url = _url(args, settings)
    target = settings.with_(database_url=url)
    topic = Topics.from_settings(target).audit
    err.print(
        f"[bold yellow]audit rebuild[/] empties the audit store [bold]{_shown(url)}[/] and "
        f"refills it from the topic [bold]{topic}[/] on {target.kafka_bootstrap}.\n"
        "A running worker must be stopped first: its projector would keep writing into the "
        "store while it is rebuilt. Or rebuild into another database with --database-url."
    )
    if url == settings.database_url and not args.force:
        workers = asyncio.run(running_workers(target))
        if workers:
            err.print(f"{workers} worker(s) of consumer group {target.app_id!r} are running and "
                      "project into this store: stop them, or rebuild into another database "
                      "with --database-url (--force to rebuild anyway)", markup=False)
            return 2
    if not args.yes:
        if not sys.stdin.isatty():
            err.print("refusing to rebuild without --yes: there is no terminal to confirm on",
                      markup=False)
            return 2
        from rich.prompt import Confirm

        if not Confirm.ask("Empty the store and rebuild it?", default=False, console=err):
            err.print("cancelled; nothing was changed", markup=False)
            return 1

    async def run(store: AuditStore) -> Any:
        with _progress() as progress:
            task = progress.add_task(f"rebuilding from {topic}", total=None)
            return await rebuild(
                target, store, batch=args.batch,
                on_start=lambda total: progress.update(task, total=total),
                on_progress=lambda n: progress.advance(task, n),
            )

    result = asyncio.run(_with_store(url, run, create=True))
    if args.json:
        sys.stdout.write(json.dumps({
            "topic": result.topic, "partitions": result.partitions,
            "messages": result.messages, "events": result.events,
            "stored": result.stored, "unreadable": result.unreadable,
            "chain_heads": result.chain_heads,
        }, indent=2) + "\n")
        return 0
    out.print(f"rebuilt {_shown(url)} from {result.topic} ({result.partitions} partitions): "
              f"{result.events} events read in {result.messages} messages, "
              f"{result.stored} stored"
              + (f", {result.unreadable} unreadable skipped" if result.unreadable else "")
              + f"; {result.chain_heads} chain heads", markup=False)
    return 0
