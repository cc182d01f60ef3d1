"""The bench's command line: `python -m bench.run [--scenarios a,b] [--repeat 3]
[--json out.json] [--plot out.png] [--quick]`, also `mvalve bench ...` when run from
a checkout.

Runs the scenarios in order, prints one rich table (stdout; progress on stderr),
optionally writes JSON, optionally draws the throttled scenarios' deliveries per
destination against their limit (`--plot`, bench/plot.py: a scenario draws whatever
`Timeline`s it puts in `Result.timelines`; list it in `PLOTTED`), and drops every
table it created (all named `mvb_<run id>_...`). Exit status: 0 when every scenario
ran (and the plot was drawn), 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import time
import traceback
from typing import Any

from rich.console import Console

from mvalve_async.cli.common import Command

from . import plot
from .harness import (
    DEFAULT_MEMCACHED_URL,
    DEFAULT_MYSQL_URL,
    Bench,
    Result,
    machine_state,
    render,
    versions,
    write_json,
)

__all__ = ["HELP", "SCENARIOS", "configure", "main", "run"]

SCENARIOS = {
    "writer": "bench.writer",  # Writer.insert / insert_many vs bare INSERT / executemany
    "reader": "bench.reader",  # claim + deliver + ack, 1/4/8 consumers vs a bare loop
    "latency": "bench.latency",  # idle pick-up latency and idle query rate
    "throttle": "bench.throttle",  # Rate(20/s) x 10 destinations, 4 processes, memcached
    "fairness": "bench.fairness",  # a hot destination's backlog against a trickle (+Dramatiq)
    "scale": "bench.scale",  # 1,000 destinations with a backlog each, throttled vs not
    "stores": "bench.stores",  # no rate: memcached store against the memory store
    "sqlite": "bench.sqlite",  # the embedded default end to end vs a bare sqlite3 loop
    "peer": "bench.peer",  # the throttle drain, ours beside Dramatiq's rate limiter (.[bench])
}
# Scenarios that fill Result.timelines, so --plot has something to draw.
PLOTTED = {"throttle", "peer", "fairness", "scale"}
HELP = "benchmark against raw baselines in the same run (needs the repository's bench/)"


def _scenarios(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in SCENARIOS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown scenario(s) {', '.join(unknown) or '(none)'}; choose from "
            + ",".join(SCENARIOS)
        )
    return names


def _repeat(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def configure(p: argparse.ArgumentParser) -> None:
    """The options (no --url/--store/-v: `mvalve` adds those to every subcommand)."""
    p.add_argument("--scenarios", type=_scenarios, default=[s for s in SCENARIOS if s != "peer"],
                   help=f"comma-separated, from {','.join(SCENARIOS)} (default: all but peer, "
                   "which needs Dramatiq and Redis: pip install -e '.[bench]')")  # fmt: skip
    p.add_argument("--repeat", type=_repeat, default=None,
                   help="runs per figure, median reported (default 3; --quick: 1)")  # fmt: skip
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--plot", metavar="FILE.png",
                   help="also draw deliveries per second per destination against the limit, "
                   f"for the throttled scenarios ({', '.join(sorted(PLOTTED))}); needs "
                   "matplotlib: pip install -e '.[plot]'")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="small counts: a smoke test")
    p.add_argument("--mysql-url", default=DEFAULT_MYSQL_URL, metavar="URL",
                   help="mysql+innodb:// server (tables are created and dropped)")  # fmt: skip
    p.add_argument("--memcached-url", default=DEFAULT_MEMCACHED_URL, metavar="URL",
                   help="memcached for the throttle scenario")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    configure(p)
    return p


async def bench(args: argparse.Namespace) -> tuple[int, dict[str, Any]]:
    out, progress = Console(), Console(stderr=True)
    if not out.is_terminal:
        out = Console(width=160)  # a file or a pipe: do not squeeze the table into 80
    repeat = args.repeat or (1 if args.quick else 3)
    b = Bench(args.mysql_url, args.memcached_url, repeat, args.quick, progress)
    data: dict[str, Any] = {
        "bench": "mvalve-async",
        "run_id": b.run_id,
        "config": {
            "scenarios": args.scenarios,
            "repeat": repeat,
            "quick": args.quick,
            "mysql": b.settings.safe_url(),
            "memcached": b.memcached_url,
        },
        "machine": {"start": machine_state()},
        "versions": versions(),
        "scenarios": {},
    }
    results: list[Result] = []
    status = 0
    try:
        data["versions"]["mariadb"] = (await b.sql("SELECT VERSION()"))[0][0]
        for name in args.scenarios:
            b.say(f"scenario {name} ...")
            t0 = time.monotonic()
            module = importlib.import_module(SCENARIOS[name])
            try:
                res: Result = await module.run(b)
            except Exception as exc:  # keep going: report it and the other scenarios
                progress.print(traceback.format_exc(), markup=False, highlight=False)
                res, status = Result(name, error=f"{type(exc).__name__}: {exc}"), 1
            res.seconds = time.monotonic() - t0
            results.append(res)
            data["scenarios"][name] = res.to_json()
    finally:
        dropped = await b.drop_all()
        data["cleanup"] = {"dropped": dropped, "left": await b.drop_all()}
        await b.close()
        data["machine"]["end"] = machine_state()
    render(out, data, results)
    if args.json:
        write_json(args.json, data)
        progress.log(f"wrote {args.json}")
    if getattr(args, "plot", None):
        timelines = [t for res in results for t in res.timelines]
        if timelines:
            plot.render(timelines, args.plot)
            progress.log(f"wrote {args.plot}")
        else:
            progress.print(f"[red]nothing to plot[/]: no throttled scenario finished; {args.plot} "
                           "not written")  # fmt: skip
            status = 1
    return status, data


def check_plot(args: argparse.Namespace) -> None:
    """Before a long run: --plot needs matplotlib and a scenario that draws."""
    if not getattr(args, "plot", None):
        return
    try:
        plot.require()
    except plot.PlotUnavailable as exc:
        raise SystemExit(f"mvalve bench: --plot: {exc}") from None
    if not PLOTTED & set(args.scenarios):
        raise SystemExit(
            f"mvalve bench: --plot draws the {' and '.join(sorted(PLOTTED))} scenarios; "
            f"add one to --scenarios"
        )


def main(argv: list[str] | None = None, *, args: argparse.Namespace | None = None) -> int:
    """Entry point of `python -m bench.run`; `args` when `mvalve bench` parsed them."""
    if args is None:
        args = build_parser().parse_args(argv)
    check_plot(args)
    status, _ = asyncio.run(bench(args))
    return status


def run(args: argparse.Namespace, ctx: object) -> int:
    """`mvalve bench` (COMMAND, the cli's plugin protocol). An explicit
    `mvalve --url mysql+innodb://...` / `--store memcached://...` is used too."""
    url, store = getattr(args, "url", None), getattr(args, "store", None)
    if url:
        if not url.startswith(("mysql", "mariadb")):
            raise SystemExit("mvalve bench: --url must be a mysql+innodb:// URL")
        args.mysql_url = url
    if store:
        if not store.startswith("memcached"):
            raise SystemExit("mvalve bench: --store must be a memcached:// URL")
        args.memcached_url = store
    return main(args=args)


COMMAND = Command(HELP, configure, run)

if __name__ == "__main__":
    raise SystemExit(main())
