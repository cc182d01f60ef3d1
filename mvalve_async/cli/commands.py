"""The `mvalve` command: schema, send, stats, peek, purge and dead letters.

Every subcommand is a `Command` (common.py) in `COMMANDS`. Commands that live in
their own module (`demo`, `statslog`, `bench`) are listed in `PLUGINS` and loaded by
name when the parser is built, if the module exists; such a module imports what
it needs from common.py (never this module) and declares its command as

    COMMAND: Command  # help, configure(parser), run(args, ctx), and its own --url help

Exit status: 0 ok, 1 an error (one line on stderr, never a password), 2 bad usage,
3 `stats` could not reach the state store (what the queue told is printed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import inspect
import json
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from rich.console import Console
from rich.live import Live
from rich.logging import RichHandler
from rich.markup import escape

from .. import __version__
from ..errors import MvalveError
from ..interfaces import Lane
from ..message import Message
from ..registry import make_queue
from ..urls import DEFAULT_SQLITE_PATH, QueueSettings
from . import views
from .common import Aborted, Command, Context, UsageError, number

__all__ = [
    "COMMANDS", "PLUGINS", "STORE_UNREACHABLE", "Command", "Context", "UsageError",
    "build_parser", "main",
]  # fmt: skip

log = logging.getLogger(__name__)

STORE_UNREACHABLE = 3  # exit status of `stats` when the state store did not answer


# -- argument types -------------------------------------------------------------

_seconds = number(float, 0.0, "a non-negative number of seconds")
_positive = number(int, 1, "a positive integer")


def _header(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"header {text!r} is not of the form KEY=VALUE")
    return key.strip(), value


def _lane_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lane", choices=[str(lane) for lane in Lane], help="only this lane")


def _yes_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")


def _table_names(s: QueueSettings) -> str:
    return ", ".join([name for _, name in s.tables.all()] + [s.tables.dead])


# -- create / drop --------------------------------------------------------------


def _create_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--print", action="store_true", dest="print_only",
                   help="print the DDL for the URL's dialect without connecting")  # fmt: skip


async def _create(args: argparse.Namespace, ctx: Context) -> int:
    if args.print_only:
        ctx.console.out(make_queue(ctx.settings).schema_sql(), highlight=False, end="")
        return 0
    async with ctx.pipe(create=True):
        pass
    ctx.say(f"created {escape(_table_names(ctx.settings))} on {escape(ctx.settings.safe_url())}")
    return 0


async def _drop(args: argparse.Namespace, ctx: Context) -> int:
    where = f"{_table_names(ctx.settings)} on {ctx.settings.safe_url()}"
    ctx.confirm(f"drop {where}, with every message in them", args.yes)
    async with ctx.pipe(create=False, existing=True) as pipe:
        await pipe.queue.drop_schema()
    ctx.say(f"dropped {escape(where)}")
    return 0


# -- send -----------------------------------------------------------------------


def _send_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("destination")
    p.add_argument("content", nargs="?", help="the content as text; '-' reads stdin as bytes")
    p.add_argument("--json", action="store_true", help="parse CONTENT (or stdin) as JSON")
    p.add_argument("--emergency", action="store_true", help="take the emergency lane")
    p.add_argument("--duration", type=_seconds, metavar="S",
                   help="keep the destination busy S seconds after delivery")  # fmt: skip
    p.add_argument("--delay", type=_seconds, metavar="S", help="deliver S seconds from now")
    p.add_argument("--header", type=_header, action="append", default=[], metavar="K=V")
    p.add_argument("--count", type=_positive, default=1, metavar="N", help="send N copies")


def _content(args: argparse.Namespace) -> Any:
    raw: str | bytes | None = args.content
    if raw == "-":
        buffer = getattr(sys.stdin, "buffer", None)  # a replaced stdin may be text only
        raw = buffer.read() if buffer is not None else sys.stdin.read().encode()
        if not args.json:
            return raw
    if raw is None or not args.json:
        return raw
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise UsageError(f"the content is not valid JSON: {exc}") from None


async def _send(args: argparse.Namespace, ctx: Context) -> int:
    content = _content(args)
    options = {"headers": dict(args.header), "emergency": args.emergency,
               "duration": args.duration, "delay": args.delay}  # fmt: skip
    messages = [Message(args.destination, content, **options) for _ in range(args.count)]
    lane = "emergency" if args.emergency else "timed" if args.delay is not None else "normal"
    async with ctx.pipe() as pipe:
        writer = pipe.writer(max_destination=ctx.settings.max_destination)
        ids: list[str] = []
        for start in range(0, len(messages), 1000):
            ids += await writer.insert_many(messages[start : start + 1000])
    what = ids[0] if len(ids) == 1 else f"{len(ids)} messages"
    ctx.say(f"sent {what} to {escape(args.destination)} ({lane} lane)")
    return 0


# -- stats ----------------------------------------------------------------------


def _stats_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON (with --watch: one per line)")
    p.add_argument("--watch", nargs="?", type=_seconds, const=2.0, metavar="SECONDS",
                   help="refresh every SECONDS (default 2) until Ctrl-C or SIGTERM")  # fmt: skip
    p.add_argument("--limit", type=_positive, default=50, metavar="N",
                   help="destinations shown, the deepest first (default 50)")  # fmt: skip


async def _stats(args: argparse.Namespace, ctx: Context) -> int:
    async with ctx.pipe(existing=True) as pipe:
        url = ctx.settings.safe_url()
        snap = await views.snapshot(pipe.queue, pipe.store, args.limit, url)
        if args.watch is None:
            if args.json:
                ctx.print_json(snap)
            else:
                ctx.console.print(views.stats_view(snap))
            return STORE_UNREACHABLE if snap["store_error"] else 0
        stop = asyncio.Event()
        with _stop_on_sigterm(stop):
            if args.json:  # JSON lines
                ctx.print_json(snap, compact=True)
                while not await _stopped(stop, args.watch):
                    snap = await views.snapshot(pipe.queue, pipe.store, args.limit, url)
                    ctx.print_json(snap, compact=True)
                return 0
            with Live(views.stats_view(snap), console=ctx.console, auto_refresh=False) as live:
                while not await _stopped(stop, args.watch):
                    snap = await views.snapshot(pipe.queue, pipe.store, args.limit, url)
                    live.update(views.stats_view(snap), refresh=True)
        return 0


@contextlib.contextmanager
def _stop_on_sigterm(stop: asyncio.Event) -> Iterator[None]:
    """SIGTERM sets `stop` (a `--watch` ends cleanly, as on Ctrl-C)."""
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGTERM, stop.set)
    except (NotImplementedError, RuntimeError):  # no signal handlers on this platform
        yield
        return
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


async def _stopped(stop: asyncio.Event, seconds: float) -> bool:
    """Wait up to `seconds`; True as soon as `stop` is set."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stop.wait()
    return stop.is_set()


# -- peek / purge ---------------------------------------------------------------


def _peek_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--limit", type=_positive, default=20, metavar="N", help="default 20")
    _lane_option(p)
    p.add_argument("--json", action="store_true")


async def _peek(args: argparse.Namespace, ctx: Context) -> int:
    async with ctx.pipe(existing=True) as pipe:
        rows = await pipe.queue.peek(args.limit, Lane(args.lane) if args.lane else None)
    now = time.time()
    items = [views.row_view(row, now) for row in rows]
    if args.json:
        ctx.print_json(items)
    else:
        ctx.console.print(views.peek_table(items, now, ctx.settings.safe_url()))
    return 0


def _purge_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--destination", metavar="D", help="only this destination")
    _lane_option(p)
    _yes_option(p)


async def _purge(args: argparse.Namespace, ctx: Context) -> int:
    what = "every queued message"
    if args.destination is not None:
        what += f" for {args.destination!r}"
    if args.lane:
        what += f" in the {args.lane} lane"
    ctx.confirm(f"delete {what} on {ctx.settings.safe_url()}", args.yes)
    async with ctx.pipe(existing=True) as pipe:
        n = await pipe.queue.purge(Lane(args.lane) if args.lane else None, args.destination)
    ctx.say(f"purged {n} message{'s' * (n != 1)}")
    return 0


# -- dead letters ---------------------------------------------------------------


def _dead_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    ls = sub.add_parser("list", help="show dead letters, oldest first")
    ls.add_argument("--limit", type=_positive, default=20, metavar="N", help="default 20")
    ls.add_argument("--json", action="store_true")
    rq = sub.add_parser("requeue", help="move dead letters back to their lane")
    rq.add_argument("ids", nargs="*", type=_positive, metavar="ID",
                    help="the id column of `dead list` (the row, not the message id)")  # fmt: skip
    rq.add_argument("--all", action="store_true", help="every dead letter")
    _yes_option(sub.add_parser("purge", help="delete every dead letter"))


async def _dead(args: argparse.Namespace, ctx: Context) -> int:
    if args.action == "requeue" and bool(args.ids) == args.all:
        raise UsageError("dead requeue needs dead letter IDs or --all, not both")
    if args.action == "purge":
        ctx.confirm(f"delete every dead letter on {ctx.settings.safe_url()}", args.yes)
    async with ctx.pipe(existing=True) as pipe:
        if args.action == "list":
            rows = await pipe.queue.dead_letters(args.limit)
            items = [views.row_view(row, time.time()) for row in rows]
            if args.json:
                ctx.print_json(items)
            else:
                ctx.console.print(views.dead_table(items, ctx.settings.safe_url()))
        elif args.action == "requeue":
            n = await pipe.queue.requeue_dead(None if args.all else args.ids)
            of = "" if args.all else f" of {len(args.ids)}"
            ctx.say(f"requeued {n}{of} dead letter{'s' * (n != 1)}")
        else:
            n = await pipe.queue.purge_dead()
            ctx.say(f"purged {n} dead letter{'s' * (n != 1)}")
    return 0


COMMANDS: dict[str, Command] = {
    "create": Command("create the queue tables (or --print their DDL)", _create_args, _create),
    "drop": Command("drop the queue tables and their messages", _yes_option, _drop),
    "send": Command("insert a message", _send_args, _send),
    "stats": Command("depth per lane and destination, with valve state", _stats_args, _stats),
    "peek": Command("show queued messages without claiming them", _peek_args, _peek),
    "purge": Command("delete queued messages (not dead letters)", _purge_args, _purge),
    "dead": Command("dead letters: list, requeue, purge", _dead_args, _dead),
}
# `bench` is the repository's harness (bench/run.py, not in the wheel): present when run
# from a checkout (the current directory holds bench/run.py) or when `bench` is importable.
PLUGINS: dict[str, str] = {
    "demo": "mvalve_async.cli.demo",
    "bench": "bench.run",
    "statslog": "mvalve_async.cli.statslog",  # the opt-in StatsLog table, per minute
}


def _plugins() -> dict[str, Command]:
    found: dict[str, Command] = {}
    with contextlib.suppress(OSError):  # a working directory removed under us: no checkout
        checkout = os.getcwd()
        if Path(checkout, "bench", "run.py").is_file() and checkout not in sys.path:
            sys.path.append(checkout)  # the console script does not put "." on the path
    for name, module_name in PLUGINS.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:  # not written yet, or an optional dependency missing
            log.debug("no `mvalve %s`: %s", name, exc)
            continue
        command = vars(module).get("COMMAND")
        if not isinstance(command, Command):  # another project's `bench`, say
            log.debug("no `mvalve %s`: %s declares no COMMAND", name, module_name)
            continue
        found[name] = command
    return found


def _global_options(
    parser: argparse.ArgumentParser, default: Any, command: Command | None = None
) -> None:
    url_help = f"queue URL (default: $MVALVE_URL, else sqlite:///{DEFAULT_SQLITE_PATH})"
    store_help = "state store URL (default: $MVALVE_STORE_URL, else memory://)"
    if command is not None:
        url_help = command.url_help or url_help
        store_help = command.store_help or store_help
    parser.add_argument("--url", default=default, metavar="URL", help=url_help)
    parser.add_argument("--store", default=default, metavar="URL", help=store_help)
    parser.add_argument("-v", "--verbose", action="count", default=default or 0,
                        help="log more (-vv: debug)")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mvalve", description="Feed and inspect mvalve queues.")
    _global_options(parser, None)
    parser.add_argument("--version", action="version", version=f"mvalve {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, cmd in {**COMMANDS, **_plugins()}.items():
        common = argparse.ArgumentParser(add_help=False)  # the same options after the command
        _global_options(common, argparse.SUPPRESS, cmd)
        p = sub.add_parser(name, help=cmd.help, description=cmd.help, parents=[common])
        cmd.configure(p)
        p.set_defaults(run=cmd.run)
    return parser


def _secrets(*urls: str) -> list[str]:
    found = []
    for url in urls:
        with contextlib.suppress(ValueError):
            password = urlsplit(url).password
            if password:
                found += [password, unquote(password)]
    return found


def main(argv: list[str] | None = None) -> int:
    console, errors = Console(), Console(stderr=True)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error (already printed)
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
    url = args.url or os.environ.get("MVALVE_URL") or f"sqlite:///{DEFAULT_SQLITE_PATH}"
    store_url = args.store or os.environ.get("MVALVE_STORE_URL") or "memory://"
    secrets = _secrets(url, store_url)

    def fail(message: str, status: int) -> int:
        for secret in secrets:
            message = message.replace(secret, "***")
        errors.print(message, markup=False, highlight=False, soft_wrap=True)
        return status

    package_log = logging.getLogger("mvalve_async")
    handler, level = RichHandler(console=errors, show_path=False), package_log.level
    package_log.addHandler(handler)
    package_log.setLevel(max(logging.WARNING - 10 * args.verbose, logging.DEBUG))
    try:
        result = args.run(args, Context(console, errors, url, store_url))
        return int(asyncio.run(result) if inspect.iscoroutine(result) else result)
    except UsageError as exc:
        return fail(f"mvalve: error: {exc}", 2)
    except Aborted:
        return fail("mvalve: aborted", 1)
    except MvalveError as exc:
        return fail(f"mvalve: error: {' '.join(str(exc).split()) or type(exc).__name__}", 1)
    except KeyboardInterrupt:
        return 0 if getattr(args, "watch", None) is not None else 130  # stats --watch
    except Exception as exc:  # a bug: the traceback with -v, one line otherwise
        if args.verbose:
            fail("".join(traceback.format_exception(exc)).rstrip(), 1)
        return fail(f"mvalve: error: unexpected {type(exc).__name__}: {exc} (-v shows more)", 1)
    finally:
        package_log.removeHandler(handler)
        package_log.setLevel(level)
