"""The ``notice-relay`` command line. It parses and hands off: no logic lives here.

Tables for people (rich), ``--json`` for scripts. Exit codes: 0 success, 1 the
thing asked about is invalid / not found / failed, 2 usage or environment error.
A traceback is never the answer to bad input.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from notice_relay.config import Settings
from notice_relay.errors import ConfigError, DeclarationInvalid, NoticeRelayError

# Piped output (scripts, CI logs) gets a wide fixed width instead of rich's 80 columns,
# so that tables are not squeezed into unreadable wrapped cells.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, highlight=False, soft_wrap=True)

#: The largest declaration ``validate`` and ``publish`` read (bytes).
MAX_INPUT = 8 * 1024 * 1024


def _read(path: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read(MAX_INPUT + 1)
    with open(path, "rb") as fh:
        return fh.read(MAX_INPUT + 1)


def _registry(settings: Settings, use: bool) -> tuple[Any, Any]:
    """Publishers and developers to check ids against, when their files exist."""
    if not use:
        return None, None
    from notice_relay.connectors import load_developers, load_publishers

    pubs = load_publishers(settings.publishers_file) if settings.publishers_file.exists() else None
    devs = load_developers(settings.connectors_dir) if settings.connectors_dir.is_dir() else None
    return pubs, devs


def _print_invalid(name: str, exc: DeclarationInvalid) -> None:
    # The reason quotes the input: escaped, so "[/]" in a declaration is text, not markup.
    err.print(f"[bold red]{escape(name)}: invalid declaration[/]: {escape(exc.reason)}",
              markup=True)
    for fe in exc.errors:
        err.print(f"  - {fe.field}: {fe.message}", markup=False)


def cmd_validate(args: argparse.Namespace, settings: Settings) -> int:
    """Validate declarations; print each valid one's normalized notice."""
    from notice_relay.normalize import normalize
    from notice_relay.stages import utcnow
    from notice_relay.validate import parse_declaration

    pubs, devs = _registry(settings, not args.no_registry)
    status = 0
    for path in args.files:
        name = "<stdin>" if path == "-" else path
        try:
            raw = _read(path)
        except OSError as exc:
            err.print(f"{name}: cannot read: {exc.strerror or exc}", markup=False)
            status = max(status, 1)
            continue
        try:
            decl = parse_declaration(raw, publishers=pubs, developers=devs)
        except DeclarationInvalid as exc:
            _print_invalid(name, exc)
            status = 1
            continue
        notice = normalize(decl, relayed_at=utcnow())
        sys.stdout.write(notice.model_dump_json(indent=2) + "\n")
    return status


def cmd_publish(args: argparse.Namespace, settings: Settings) -> int:
    """Validate declarations, then publish them to the declarations topic."""
    from notice_relay.publish import publish_declarations
    from notice_relay.validate import parse_declaration

    pubs, devs = _registry(settings, True)
    items: list[tuple[str | None, bytes]] = []
    bad = 0
    for path in args.files:
        name = "<stdin>" if path == "-" else path
        try:
            raw = _read(path)
        except OSError as exc:
            err.print(f"{name}: cannot read: {exc.strerror or exc}", markup=False)
            return 1
        if args.no_validate:
            items.append((None, raw))
            continue
        try:
            decl = parse_declaration(raw, publishers=pubs, developers=devs)
        except DeclarationInvalid as exc:
            _print_invalid(name, exc)
            bad += 1
            continue
        items.append((decl.artist_key, raw))
    if bad:
        err.print(f"{bad} invalid declaration(s): nothing published", markup=False)
        return 1
    n = asyncio.run(publish_declarations(settings, items))
    if args.json:
        sys.stdout.write(json.dumps({"published": n}) + "\n")
    else:
        out.print(f"published {n} declaration(s) to {settings.topic_prefix}declarations")
    return 0


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    """Run a stream worker until stopped."""
    from notice_relay.app import run_worker

    run_worker(settings, loglevel=args.loglevel)
    return 0


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    """Show a declaration's deliveries and trail."""
    from notice_relay.status import declaration_status

    found = asyncio.run(declaration_status(settings, args.declaration_id))
    if not found:
        if args.json:
            sys.stdout.write(json.dumps({"declarations": []}) + "\n")
        err.print(f"no declaration {args.declaration_id!r} in the audit store", markup=False)
        return 1
    if args.json:
        sys.stdout.write(json.dumps({"declarations": found}, indent=2, default=str) + "\n")
        return 0
    for d in found:
        out.print(f"[bold]{d['declaration_key']}[/]  status: [bold]{d['status']}[/]"
                  f"  action: {d.get('action') or '-'}  fingerprint: {d.get('fingerprint') or '-'}")
        if d.get("reason"):
            out.print(f"reason: {d['reason']}", markup=False)
        t = Table(title="deliveries", title_justify="left")
        for col in ("developer", "channel", "state", "attempts", "last status", "receipt / error"):
            t.add_column(col)
        for dl in d["deliveries"]:
            t.add_row(dl["developer_id"], dl["channel"], dl["state"], str(dl["attempts"]),
                      str(dl["last_status_code"] or "-"),
                      (dl["receipt"] or dl["last_error"] or "-")[:80])
        out.print(t)
        tr = Table(title="trail", title_justify="left")
        for col in ("seq", "at", "event", "developer", "detail", "hash"):
            tr.add_column(col)
        for ev in d["trail"]:
            tr.add_row(str(ev["seq"]), ev["occurred_at"][:23], ev["type"], ev["developer_id"] or "",
                       ev["detail"][:60], ev["hash"][:12])
        out.print(tr)
    return 0


def cmd_connectors_check(args: argparse.Namespace, settings: Settings) -> int:
    """Validate every connector file and the publisher registry."""
    from notice_relay.connectors import check_connectors, load_developers, load_publishers

    directory = Path(args.dir) if args.dir else settings.connectors_dir
    problems = [str(p) for p in check_connectors(directory)]
    pubs_file = Path(args.publishers) if args.publishers else settings.publishers_file
    try:
        load_publishers(pubs_file)
    except NoticeRelayError as exc:
        problems.append(str(exc))
    if args.json:
        devs = {} if problems else load_developers(directory)
        sys.stdout.write(json.dumps({
            "ok": not problems, "errors": problems,
            "developers": [{"id": d.id, "channels": [c.name for c in d.channels]}
                           for d in devs.values()],
        }, indent=2) + "\n")
        return 1 if problems else 0
    if problems:
        for p in problems:
            err.print(f"[red]error[/] {p}", markup=False)
        return 1
    devs = load_developers(directory)
    t = Table(title=f"{len(devs)} developer(s) in {directory}", title_justify="left")
    for col in ("id", "name", "accepts", "channels"):
        t.add_column(col)
    for d in devs.values():
        t.add_row(d.id, d.name, ", ".join(u.value for u in d.accepts),
                  ", ".join(f"{c.name} ({c.type}{'' if c.enabled else ', disabled'})"
                            for c in d.channels))
    out.print(t)
    return 0


def cmd_receiver(args: argparse.Namespace, settings: Settings) -> int:
    """Run the reference webhook receiver."""
    from notice_relay.receiver import serve_forever

    secret = os.environ.get(args.secret_env)
    if not secret:
        raise ConfigError(f"environment variable {args.secret_env} (the webhook secret) is not set")
    asyncio.run(
        serve_forever(secret.split()[0], args.port, Path(args.record) if args.record else None)
    )
    return 0


def cmd_channels_list(args: argparse.Namespace, settings: Settings) -> int:
    """Every configured channel with its health."""
    from notice_relay.operations import channel_overview

    rows = asyncio.run(channel_overview(settings))
    if args.json:
        sys.stdout.write(json.dumps({"channels": rows}, indent=2, default=str) + "\n")
        return 0
    t = Table(title="channels", title_justify="left")
    for col in ("channel", "type", "state", "last success", "failing since", "reason / last error"):
        t.add_column(col)
    for r in rows:
        state = r["state"]
        style = {"enabled": "green", "failing": "yellow"}.get(state, "red")
        t.add_row(r["key"], r["type"], f"[{style}]{state}[/]", r["last_success_at"] or "-",
                  r["failing_since"] or "-", (r["reason"] or r["last_error"] or "")[:70])
    out.print(t)
    return 0


def cmd_channels_set(args: argparse.Namespace, settings: Settings) -> int:
    """Enable or disable a channel, as an operator (audited)."""
    from notice_relay.operations import set_channel

    enabled = args.channels_command == "enable"
    h = asyncio.run(set_channel(settings, args.channel, enabled=enabled, operator=args.operator,
                                reason=args.reason))
    if args.json:
        sys.stdout.write(h.model_dump_json() + "\n")
    else:
        out.print(f"{h.key}: {'enabled' if h.enabled else 'disabled'} by {h.changed_by}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``notice-relay``."""
    p = argparse.ArgumentParser(prog="notice-relay", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    v = sub.add_parser(
        "validate", help="validate declarations, print normalized notices (no Kafka)"
    )
    v.add_argument(
        "files", nargs="+", metavar="FILE", help="declaration JSON files, or - for stdin"
    )
    v.add_argument("--no-registry", action="store_true",
                   help="do not check publisher and target ids against the registry files")
    v.set_defaults(func=cmd_validate)

    pub = sub.add_parser("publish", help="validate declarations, then publish them to Kafka")
    pub.add_argument("files", nargs="+", metavar="FILE")
    pub.add_argument("--no-validate", action="store_true",
                     help="publish the bytes as they are (the stream rejects what is invalid)")
    pub.add_argument("--json", action="store_true")
    pub.set_defaults(func=cmd_publish)

    w = sub.add_parser("worker", help="run a stream worker")
    w.add_argument("--loglevel", default="warning", choices=["debug", "info", "warning", "error"])
    w.set_defaults(func=cmd_worker)

    s = sub.add_parser("status", help="a declaration's deliveries and audit trail")
    s.add_argument("declaration_id", help="declaration id, or publisher_id/declaration_id")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)

    c = sub.add_parser("connectors", help="developer connectors")
    csub = c.add_subparsers(dest="connectors_command", required=True, metavar="COMMAND")
    cc = csub.add_parser("check", help="validate the connector files and the publisher registry")
    cc.add_argument("--dir", help="connectors directory (default: NOTICE_RELAY_CONNECTORS)")
    cc.add_argument("--publishers", help="publisher registry file")
    cc.add_argument("--json", action="store_true")
    cc.set_defaults(func=cmd_connectors_check)

    ch = sub.add_parser("channels", help="channel health; disable and enable channels")
    chsub = ch.add_subparsers(dest="channels_command", required=True, metavar="COMMAND")
    cl = chsub.add_parser("list", help="every channel with its health")
    cl.add_argument("--json", action="store_true")
    cl.set_defaults(func=cmd_channels_list)
    for verb in ("enable", "disable"):
        cv = chsub.add_parser(verb, help=f"{verb} a channel (DEVELOPER/CHANNEL)")
        cv.add_argument("channel", metavar="DEVELOPER/CHANNEL")
        cv.add_argument("--operator", default=os.environ.get("USER") or "operator",
                        help="who does it (recorded in the audit trail)")
        cv.add_argument("--reason", help="why (recorded in the audit trail)")
        cv.add_argument("--json", action="store_true")
        cv.set_defaults(func=cmd_channels_set)

    from notice_relay import cli_api, cli_audit

    cli_audit.register(sub)
    cli_api.register(sub)

    r = sub.add_parser("receiver", help="run the reference webhook receiver (verifies signatures)")
    r.add_argument("--port", type=int, default=8081)
    r.add_argument(
        "--secret-env", required=True, help="environment variable holding the whsec_ secret"
    )
    r.add_argument("--record", help="append each request as a JSON line to this file")
    r.set_defaults(func=cmd_receiver)
    return p


def _run_on_chosen_allocator(settings: Settings) -> None:
    """Execute this command again on the allocators chosen when it does not run on
    them yet: jemalloc preloaded, Python's objects through ``malloc``
    (notice_relay.memory). Same process id, arguments and environment but for the
    preload and ``PYTHONMALLOC``; only for a command run from the command line
    (``sys.orig_argv``): the interpreter reads ``PYTHONMALLOC`` once, at its start."""
    from notice_relay.memory import allocator_environ

    env = allocator_environ(settings.allocator, objects=settings.object_allocator)
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)  # noqa: S606  # the same command, again


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``notice-relay`` console script."""
    from notice_relay.logs import configure

    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
        configure(settings.log_format, settings.log_level)
        if argv is None and args.func is cmd_worker:
            _run_on_chosen_allocator(settings)
        code = int(args.func(args, settings))
    except KeyboardInterrupt:
        code = 130
    except ConfigError as exc:
        err.print(f"configuration error: {exc}", markup=False)
        code = 2
    except NoticeRelayError as exc:
        err.print(f"error: {exc}", markup=False)
        code = 2
    except RecursionError:
        err.print("error: input nested too deeply", markup=False)
        code = 1
    sys.stdout.flush()
    return code


if __name__ == "__main__":
    raise SystemExit(main())
