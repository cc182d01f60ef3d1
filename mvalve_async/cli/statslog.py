"""`mvalve statslog`: the stats log table (`mvalve_async.ops.statslog`) on the terminal.

    mvalve statslog                  messages handed out per minute and destination
    mvalve statslog --action ack     ... acknowledged (any action the readers and writers report)
    mvalve statslog create           create the table (--print: its DDL)
    mvalve statslog prune --days 30  delete older rows
    mvalve statslog drop --yes

Loaded by `mvalve_async.cli.commands` through `PLUGINS`.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Mapping
from typing import Any

from rich.console import Group, RenderableType
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from ..events import ACTIONS
from ..ops.statslog import DEFAULT_TABLE, StatsLog
from .common import Command, Context, number

__all__ = ["HELP", "configure", "run", "snapshot", "view"]

HELP = "messages per minute and destination, from the stats log table (StatsLog)"


def _count(text: str) -> int:
    value: int = number(int, 1, "a positive integer")(text)
    return value


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("command", nargs="?", default="show",
                   choices=["show", "create", "prune", "drop"], help="default: show")  # fmt: skip
    p.add_argument("--table", default=DEFAULT_TABLE, help=f"default {DEFAULT_TABLE}")
    p.add_argument("--action", default="dequeue", choices=ACTIONS, dest="event",
                   help="the action counted (default dequeue: handed to a consumer)")  # fmt: skip
    p.add_argument("--minutes", type=_count, default=10, metavar="N",
                   help="show: the last N minutes, this one included (default 10)")  # fmt: skip
    p.add_argument("--destination", metavar="D", help="show: only this destination")
    p.add_argument("--limit", type=_count, default=50, metavar="N",
                   help="show: destinations shown, the busiest first (default 50)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="show: print JSON")
    p.add_argument("--print", action="store_true", dest="print_only",
                   help="create: print the DDL without connecting")  # fmt: skip
    p.add_argument("--days", type=_count, default=30, metavar="N",
                   help="prune: keep the last N days (default 30)")  # fmt: skip
    p.add_argument("-y", "--yes", action="store_true", help="drop: do not ask for confirmation")


async def snapshot(
    stats: StatsLog, *, action: str, minutes: int, destination: str | None, limit: int
) -> dict[str, Any]:
    """Counts of `action` per destination over the last `minutes` epoch minutes."""
    now = time.time()
    last = int(now // 60)
    window = list(range(last - minutes + 1, last + 1))
    rows = await stats.read(since=window[0], action=action, destination=destination)
    per: dict[str, list[int]] = {}
    for dest, _, minute, n in rows:
        if minute <= last:
            per.setdefault(dest, [0] * len(window))[minute - window[0]] += n
    ranked = sorted(per.items(), key=lambda kv: (-sum(kv[1]), kv[0]))
    return {
        "table": stats.table, "url": stats.where, "action": action, "time": now,
        "minutes": window, "destinations_total": len(ranked),
        "destinations": {d: {"counts": c, "total": sum(c)} for d, c in ranked[:limit]},
    }  # fmt: skip


def view(snap: Mapping[str, Any]) -> RenderableType:
    """A row per destination, a column per minute (local time; `*`: still counting)."""
    head = Text.assemble((snap["url"], "bold"), f"  table {snap['table']}")
    table = Table(title=f"{snap['action']} per minute", title_justify="left")
    table.add_column("destination")
    minutes = snap["minutes"]
    for k, minute in enumerate(minutes):
        label = time.strftime("%H:%M", time.localtime(minute * 60))
        table.add_column(label + ("*" if k == len(minutes) - 1 else ""), justify="right")
    table.add_column("total", justify="right")
    for dest, d in snap["destinations"].items():
        table.add_row(Text(dest), *(str(n) for n in d["counts"]), str(d["total"]))
    shown, total = len(snap["destinations"]), snap["destinations_total"]
    if not total:
        table.caption = "nothing logged in these minutes"
    elif shown < total:
        table.caption = f"{shown} of {total} destinations"
    return Group(head, table)


async def run(args: argparse.Namespace, ctx: Context) -> int:
    # only `create` may make the SQLite file; show, prune and drop need it there
    settings = ctx.settings if args.command == "create" else ctx.existing()
    stats = StatsLog(settings, table=args.table)
    if args.command == "create" and args.print_only:
        ctx.console.out(stats.schema_sql(), highlight=False, end="")
        return 0
    where = f"{stats.table} on {stats.where}"
    if args.command == "drop":
        ctx.confirm(f"drop {where}", args.yes)
    try:
        if args.command == "create":
            await stats.create()
            ctx.say(f"created {escape(where)}")
        elif args.command == "drop":
            await stats.drop()
            ctx.say(f"dropped {escape(where)}")
        elif args.command == "prune":
            before = int(time.time() // 60) - args.days * 1440
            n = await stats.prune(before)
            rows = f"{n} row{'s' * (n != 1)}"
            ctx.say(f"pruned {rows} older than {args.days} days from {escape(where)}")
        else:
            snap = await snapshot(stats, action=args.event, minutes=args.minutes,
                                  destination=args.destination, limit=args.limit)  # fmt: skip
            if args.json:
                ctx.print_json(snap)
            else:
                ctx.console.print(view(snap))
    finally:
        await stats.close()
    return 0


COMMAND = Command(HELP, configure, run)
