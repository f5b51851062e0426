"""CLI commands for the HTTP API and its data: ``api``, ``keys create|list|revoke``,
``deliveries`` and ``replay``.

Registered into the ``notice-relay`` parser by :func:`register`; like the rest of the
CLI, they parse and hand off (to :mod:`notice_relay.keys`,
:mod:`notice_relay.audit.queries`, :mod:`notice_relay.replay` and the API app).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from notice_relay.config import Settings
from notice_relay.models import DeliveryState

T = TypeVar("T")


def _when(text: str) -> datetime:
    """An RFC 3339 time with offset, or a duration ago: ``2h`` = two hours ago."""
    from notice_relay.durations import parse_duration

    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        try:
            return datetime.now(UTC) - parse_duration(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r}: expected a time with offset (2026-03-01T12:00:00+00:00) or a "
                "duration ago (30m, 2h, 7d)") from None
    if value.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r}: give a UTC offset, e.g. {text}+00:00")
    return value


async def _with_store(settings: Settings, fn: Callable[[Any], Awaitable[T]]) -> T:
    import notice_relay.keys  # noqa: F401  (its table is created with the store's)
    from notice_relay.audit.store import AuditStore

    store = await AuditStore.open(settings.database_url)
    try:
        return await fn(store)
    finally:
        await store.close()


def _print_json(value: object) -> None:
    sys.stdout.write(json.dumps(value, indent=2, default=str) + "\n")


def cmd_api(args: argparse.Namespace, settings: Settings) -> int:
    """Serve the HTTP API until stopped."""
    import uvicorn

    from notice_relay.api import create_app

    # No access log: ack links carry their token in the query string.
    uvicorn.run(create_app(settings), host=args.host, port=args.port, access_log=False,
                log_level=args.log_level, proxy_headers=args.proxy_headers)
    return 0


def cmd_keys_create(args: argparse.Namespace, settings: Settings) -> int:
    """Create an API key and print it once."""
    from notice_relay.cli import err, out
    from notice_relay.keys import create_key

    try:
        key, plain = asyncio.run(_with_store(
            settings, lambda s: create_key(s, args.role, args.subject, note=args.note)))
    except ValueError as exc:
        err.print(f"error: {exc}", markup=False)
        return 2
    if args.json:
        _print_json({"key": plain, "key_id": key.key_id, "role": key.role.value,
                     "subject": key.subject})
        return 0
    out.print(plain, markup=False, highlight=False, soft_wrap=True)
    err.print(f"key {key.key_id}: {key.role.value} {key.subject!r}. It is shown only now: "
              "store it safely.", markup=False)
    return 0


def cmd_keys_list(args: argparse.Namespace, settings: Settings) -> int:
    """List API keys (never their secrets)."""
    from rich.table import Table

    from notice_relay.cli import out
    from notice_relay.keys import list_keys

    keys = asyncio.run(_with_store(settings, lambda s: list_keys(s, include_revoked=args.all)))
    rows = [{"key_id": k.key_id, "role": k.role.value, "subject": k.subject, "note": k.note,
             "created_at": k.created_at.isoformat(),
             "revoked_at": k.revoked_at.isoformat() if k.revoked_at else None} for k in keys]
    if args.json:
        _print_json({"keys": rows})
        return 0
    t = Table(title=f"{len(rows)} API key(s)", title_justify="left")
    for col in ("key id", "role", "subject", "created", "revoked", "note"):
        t.add_column(col)
    for k in keys:
        t.add_row(k.key_id, k.role.value, k.subject, k.created_at.isoformat()[:19],
                  k.revoked_at.isoformat()[:19] if k.revoked_at else "-", k.note or "")
    out.print(t)
    return 0


def cmd_keys_revoke(args: argparse.Namespace, settings: Settings) -> int:
    """Revoke an API key."""
    from notice_relay.cli import err, out
    from notice_relay.keys import KeyNotFound, revoke_key

    try:
        key = asyncio.run(_with_store(settings, lambda s: revoke_key(s, args.key_id)))
    except KeyNotFound as exc:
        err.print(f"error: {exc}", markup=False)
        return 1
    if args.json:
        _print_json({"key_id": key.key_id, "revoked_at": str(key.revoked_at)})
    else:
        out.print(f"key {key.key_id} ({key.role.value} {key.subject}) revoked", markup=False)
    return 0


def _filter(args: argparse.Namespace) -> Any:
    from notice_relay.audit.queries import DeliveryFilter

    return DeliveryFilter(developer_id=args.developer, states=tuple(args.status or ()),
                          declaration_key=args.declaration, since=args.since, until=args.until)


def cmd_deliveries(args: argparse.Namespace, settings: Settings) -> int:
    """Deliveries filtered and paged."""
    from rich.table import Table

    from notice_relay.audit.queries import CursorInvalid, find_deliveries
    from notice_relay.cli import err, out

    flt = _filter(args)
    try:
        page = asyncio.run(_with_store(
            settings, lambda s: find_deliveries(s, flt, limit=args.limit, cursor=args.cursor)))
    except CursorInvalid as exc:
        err.print(f"error: --cursor: {exc}", markup=False)
        return 2
    if args.json:
        _print_json({"deliveries": [vars(r) for r in page.rows], "next_cursor": page.next_cursor})
        return 0
    t = Table(title=f"{len(page.rows)} deliveries", title_justify="left")
    for col in ("delivery", "declaration", "developer", "channel", "state", "attempts",
                "updated", "last error"):
        t.add_column(col)
    for r in page.rows:
        t.add_row(r.delivery_id, r.declaration_key, r.developer_id, r.channel, r.state,
                  str(r.attempts), r.updated_at.isoformat()[:19], (r.last_error or "")[:60])
    out.print(t)
    if page.next_cursor:
        out.print(f"more: --cursor {page.next_cursor}", markup=False)
    return 0


def cmd_replay(args: argparse.Namespace, settings: Settings) -> int:
    """Replay deliveries, with a progress bar."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from notice_relay.cli import err, out
    from notice_relay.replay import NotReplayable, replay_with_settings

    flt = _filter(args)
    progress = Progress(TextColumn("replaying" if not args.dry_run else "counting"),
                        BarColumn(), MofNCompleteColumn(), console=err,
                        disable=args.json or not err.is_terminal)
    task = progress.add_task("replay", total=None)

    def on_progress(done: int, total: int) -> None:
        progress.update(task, completed=done, total=total)

    try:
        with progress:
            result = asyncio.run(replay_with_settings(
                settings, flt, operator=args.operator, dry_run=args.dry_run,
                on_progress=on_progress))
    except NotReplayable as exc:
        err.print(f"error: --status: {exc}", markup=False)
        return 2
    if args.json:
        _print_json({"matched": result.matched, "replayed": result.replayed,
                     "skipped": result.skipped, "dry_run": result.dry_run})
        return 0
    verb = "would replay" if result.dry_run else "replayed"
    count = result.matched - result.skipped if result.dry_run else result.replayed
    out.print(f"matched {result.matched} deliveries; {verb} {count}"
              + (f"; skipped {result.skipped} (notice not in the store)" if result.skipped
                 else ""), markup=False)
    return 0


class _Append(argparse.Action):
    """``append`` that replaces the default instead of adding to it."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        current = getattr(namespace, self.dest, None)
        if current is self.default or current is None:
            current = []
        setattr(namespace, self.dest, [*current, values])


def _add_filter_args(p: argparse.ArgumentParser, *, default_status: list[str] | None) -> None:
    states = [s.value for s in DeliveryState]
    p.add_argument("--developer", help="developer id")
    p.add_argument("--status", action=_Append, choices=states, metavar="STATE",
                   default=default_status,
                   help="delivery state; repeat for several (" + ", ".join(states) + ")")
    p.add_argument("--declaration", metavar="PUBLISHER/DECLARATION",
                   help="one declaration's deliveries")
    p.add_argument("--since", type=_when, metavar="TIME",
                   help="last changed at or after TIME (RFC 3339 with offset, or 2h = 2 hours ago)")
    p.add_argument("--until", type=_when, metavar="TIME", help="last changed before TIME")
    p.add_argument("--json", action="store_true")


def register(sub: Any) -> None:
    """Add this module's subcommands to the ``notice-relay`` parser."""
    a = sub.add_parser("api", help="serve the HTTP API (OpenAPI docs at /docs)")
    a.add_argument("--host", default="127.0.0.1")
    a.add_argument("--port", type=int, default=8080)
    a.add_argument("--log-level", default="warning",
                   choices=["debug", "info", "warning", "error"])
    a.add_argument("--proxy-headers", action="store_true",
                   help="trust X-Forwarded-* from the proxy in front")
    a.set_defaults(func=cmd_api)

    k = sub.add_parser("keys", help="API keys: create, list, revoke")
    ksub = k.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    kc = ksub.add_parser("create", help="create a key and print it (once)")
    kc.add_argument("--role", required=True, choices=["publisher", "developer", "operator",
                                                      "auditor"])
    kc.add_argument("--subject", required=True,
                    help="publisher id, developer id, or the operator's or auditor's name")
    kc.add_argument("--note", help="what the key is for")
    kc.add_argument("--json", action="store_true")
    kc.set_defaults(func=cmd_keys_create)
    kl = ksub.add_parser("list", help="every key (never its secret)")
    kl.add_argument("--all", action="store_true", help="revoked keys too")
    kl.add_argument("--json", action="store_true")
    kl.set_defaults(func=cmd_keys_list)
    kr = ksub.add_parser("revoke", help="revoke a key (refused from the next request on)")
    kr.add_argument("key_id", metavar="KEY_ID")
    kr.add_argument("--json", action="store_true")
    kr.set_defaults(func=cmd_keys_revoke)

    d = sub.add_parser("deliveries", help="deliveries by developer, state, declaration, time")
    _add_filter_args(d, default_status=None)
    d.add_argument("--limit", type=int, default=100, help="page size (at most 500)")
    d.add_argument("--cursor", help="the cursor a previous page printed")
    d.set_defaults(func=cmd_deliveries)

    r = sub.add_parser("replay", help="send failed deliveries again (audited)")
    _add_filter_args(r, default_status=["failed"])
    r.add_argument("--dry-run", action="store_true", help="count, send nothing")
    r.add_argument("--operator", default=os.environ.get("USER") or "operator",
                   help="who replays (recorded in the audit trail)")
    r.set_defaults(func=cmd_replay)
