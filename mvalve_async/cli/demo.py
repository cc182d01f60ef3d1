"""`mvalve demo`: a zero-setup tour of the valve.

Writes a few hundred messages to four destinations with different rates (one
paced, one unlimited), a message with a duration and, halfway through, an
emergency; reads them with a few concurrent readers, shows per-destination
progress live, and ends with a summary that checks the rate promise on the
valve's hand-out timestamps (`msg.delivered_at`).

With no `--url` it uses a fresh SQLite file, `mvalve-demo.sqlite3` (cleared
first), in the current directory, or in a new directory under the system's
temporary one when the current directory cannot take it (read-only, another
user's), and an in-memory store. It ignores `MVALVE_URL` / `MVALVE_STORE_URL`:
pass `--url` / `--store` to run it on a server; the queue there must be empty
(the demo reads and acknowledges everything it finds). Its closing lines say
where the queue is and the `mvalve` commands that look at it.

This module is the CLI: it writes to the terminal through the command's rich
Console (log records too, while the live view is up: above it). It is loaded by
`mvalve_async.cli.commands` through `PLUGINS`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import shlex
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from rich import box
from rich.console import Console, Group, JustifyMethod, RenderableType
from rich.live import Live
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from ..errors import ConfigError
from ..interfaces import Lane
from ..message import Message
from ..pipe import Pipe
from ..registry import make_queue, make_store
from ..throttle import Rate
from ..urls import DEFAULT_SQLITE_PATH, QueueSettings, StoreSettings
from .common import Command, Context, number

__all__ = [
    "DEMO_PATH", "HELP", "STORE_HELP", "URL_HELP", "Plan", "configure", "demo_file",
    "max_in_window", "plan", "run",
]  # fmt: skip

HELP = "write a few hundred messages and watch the valve deliver them (no setup needed)"
DEMO_PATH = "mvalve-demo.sqlite3"
URL_HELP = f"queue URL (default: a fresh {DEMO_PATH}; $MVALVE_URL is not read)"
STORE_HELP = "state store URL (default: memory://; $MVALVE_STORE_URL is not read)"
READERS = 3
TICK = 0.2  # seconds between screen updates and completion checks
EPS = 1e-6  # hand-out times are rounded to the microsecond


@dataclass(slots=True)
class Destination:
    name: str
    rate: Rate | None
    written: int = 0
    delivered: int = 0
    emergencies: int = 0
    dead_before: int = 0
    dead: int = 0
    times: list[float] = field(default_factory=list)  # delivered_at, emergencies excepted

    @property
    def done(self) -> int:
        return self.delivered + self.dead

    def limit(self) -> str:
        if self.rate is None:
            return "unlimited"
        per = "s" if self.rate.per == 1 else f"{self.rate.per:g}s"
        return f"{self.rate.n}/{per}" + (" paced" if self.rate.paced else "")

    def achieved(self) -> float | None:
        """Deliveries per second over the span they took, the last window counted
        whole: for a destination kept busy at its limit this is `n / per`. None for
        an unlimited destination (its messages all go at once)."""
        if self.rate is None or not self.times:
            return None
        span = self.times[-1] - self.times[0]
        span += self.rate.spacing if self.rate.paced else self.rate.per
        return len(self.times) / span

    def window_max(self) -> int:
        return max_in_window(self.times, self.rate.per if self.rate else 1.0)


@dataclass(slots=True)
class Plan:
    destinations: list[Destination]
    messages: list[Message]  # written at the start, in this order
    emergency: Message  # written at `emergency_at` seconds
    emergency_at: float


def plan(total: int, seconds: float) -> Plan:
    """Split `total` messages over four destinations; choose rates so the slowest
    one drains in about `seconds`. The fast ones finish earlier: the bars race."""
    if total < 10:
        raise ConfigError("the demo needs at least 10 messages")
    base = max(1, round(total * 0.4 / seconds))
    dests = [
        Destination("demo-sms", Rate(4 * base, 1.0)),
        Destination("demo-push", Rate(2 * base, 1.0, pace=True)),
        Destination("demo-email", Rate(base, 1.0)),
        Destination("demo-webhook", None),
    ]
    normal = total - 1  # one emergency
    counts = [round(normal * 0.2), round(normal * 0.3), round(normal * 0.4)]
    counts.append(normal - sum(counts))
    # Interleave the destinations in proportion, as independent producers would.
    order = sorted(
        ((k + 0.5) / n, i) for i, n in enumerate(counts) for k in range(n)
    )  # fmt: skip
    messages: list[Message] = []
    seq = [0] * len(dests)
    duration = min(1.0, seconds / 8)
    for _, i in order:
        d = dests[i]
        seq[i] += 1
        d.written += 1
        # One message with a duration: its destination is busy that long after it.
        busy = duration if i == 1 and seq[i] == counts[1] // 3 else None
        content = {"n": seq[i], "note": f"occupies {duration:g}s"} if busy else {"n": seq[i]}
        messages.append(Message(d.name, content, duration=busy))
    email = dests[2]
    email.written += 1
    emergency = Message(email.name, {"n": 0, "note": "emergency"}, emergency=True)
    return Plan(dests, messages, emergency, seconds / 2)


def max_in_window(times: Sequence[float], per: float) -> int:
    """The most timestamps in any half-open window [t, t + per), to the microsecond."""
    ordered = sorted(times)
    best, start = 0, 0
    for end, t in enumerate(ordered):
        while t >= ordered[start] + per - EPS:
            start += 1
        best = max(best, end - start + 1)
    return best


def configure(parser: argparse.ArgumentParser) -> None:
    def positive(convert: type[int] | type[float]) -> Callable[[str], int | float]:
        low = 1 if convert is int else math.ulp(0.0)
        return number(convert, low, "a positive number")

    parser.add_argument("--messages", type=positive(int), default=300, metavar="N",
                        help="how many messages to write (default 300)")  # fmt: skip
    parser.add_argument("--seconds", type=positive(float), default=12.0, metavar="S",
                        help="about how long the run lasts: the rates are chosen to fit "
                        "(default 12)")  # fmt: skip
    parser.epilog = (
        f"Without --url the demo uses a fresh {DEMO_PATH} in the current directory (in a "
        "new directory under the system's temporary one when the current directory is not "
        "writable) and an in-memory store; it does not read MVALVE_URL or MVALVE_STORE_URL. "
        "On another URL the queue must be empty: the demo reads and acknowledges everything "
        "it finds."
    )


def demo_file(directory: str = ".") -> str:
    """Where the demo's fresh SQLite file goes: `DEMO_PATH` in `directory` (relative to
    it when `directory` is "."), an old one removed first; when no file can be made
    there (read-only, another user's file, a directory gone), in a new directory under
    the system's temporary one."""
    path = DEMO_PATH if directory == "." else os.path.join(directory, DEMO_PATH)
    try:
        for suffix in ("", "-wal", "-shm", "-journal"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path + suffix)
        with open(path, "xb"):  # SQLite takes an empty file as a new database
            pass
    except OSError:
        return os.path.join(tempfile.mkdtemp(prefix="mvalve-demo-"), DEMO_PATH)
    return path


@contextlib.contextmanager
def _logs_above(console: Console) -> Iterator[None]:
    """While the live view is up, the package's log records (a dead letter is a
    warning) go through its console, which prints them above the view instead of
    through it; the command's own handlers come back after."""
    package = logging.getLogger("mvalve_async")
    saved = package.handlers[:]
    package.handlers = [RichHandler(console=console, show_path=False)]
    try:
        yield
    finally:
        package.handlers = saved


class Demo:
    def __init__(self, the_plan: Plan, seconds: float) -> None:
        self.plan = the_plan
        self.by_name = {d.name: d for d in the_plan.destinations}
        self.total = sum(d.written for d in the_plan.destinations)
        self.seconds = seconds
        self.seen: set[str] = set()
        self.started = time.time()
        self.queued: dict[Lane, int] = {lane: 0 for lane in Lane}

    @property
    def done(self) -> int:
        return sum(d.done for d in self.plan.destinations)

    @property
    def delivered(self) -> int:
        return sum(d.delivered for d in self.plan.destinations)

    @property
    def dead(self) -> int:
        return sum(d.dead for d in self.plan.destinations)

    async def handle(self, msg: Message) -> None:
        if msg.id in self.seen:  # at least once: a redelivery is not a second delivery
            return
        self.seen.add(msg.id)
        d = self.by_name[msg.destination]
        d.delivered += 1
        if msg.lane == Lane.EMERGENCY:
            d.emergencies += 1
        else:
            d.times.append(msg.delivered_at if msg.delivered_at is not None else time.time())

    async def refresh(self, pipe: Pipe) -> None:
        stats = await pipe.queue.stats(pipe.queue.clock.now())
        self.queued = dict(stats.queued)
        for d in self.plan.destinations:
            d.dead = stats.by_destination.get(d.name, {}).get("dead", 0) - d.dead_before

    # -- views ------------------------------------------------------------------

    def elapsed(self) -> float:
        return time.time() - self.started

    def live_view(self) -> RenderableType:
        table = Table(box=None, pad_edge=False, show_edge=False, collapse_padding=True)
        columns: list[tuple[str, JustifyMethod]] = [
            ("destination", "left"), ("limit", "left"), ("progress", "left"),
            ("done/written", "right"), ("dead", "right"),
            ("achieved", "right"),
        ]  # fmt: skip
        for name, justify in columns:
            table.add_column(name, justify=justify, no_wrap=True)
        for d in self.plan.destinations:
            rate = d.achieved()
            table.add_row(
                d.name, d.limit(), ProgressBar(total=d.written, completed=d.done, width=24),
                f"{d.done}/{d.written}", str(d.dead) if d.dead else "",
                f"{rate:.1f}/s" if rate is not None else "",
            )  # fmt: skip
        lanes = "  ".join(f"{lane}: {self.queued.get(lane, 0)}" for lane in Lane)
        head = Text.assemble(
            (f"{self.elapsed():5.1f}s", "bold"), f"  done {self.done}/{self.total}",
            "   queued ", lanes,
        )  # fmt: skip
        return Group(head, table)

    def plain_line(self) -> str:
        """One progress line when the output is not a terminal."""
        parts = [f"{d.name} {d.done}/{d.written}" for d in self.plan.destinations]
        return (
            f"{self.elapsed():5.1f}s  done/written: " + ", ".join(parts)
            + f"; dead letters: {self.dead}"
        )  # fmt: skip

    def summary(self) -> Table:
        table = Table(title="summary", title_justify="left", box=box.SIMPLE_HEAD,
                      show_edge=False, pad_edge=False, collapse_padding=True)  # fmt: skip
        for name in ("destination", "limit", "written", "delivered", "dead", "achieved",
                     "peak"):  # fmt: skip
            table.add_column(name, justify="left" if name in ("destination", "limit") else "right")
        for d in self.plan.destinations:
            rate, most = d.achieved(), d.window_max()
            if d.rate is None:
                window = Text(str(most))
            elif most <= d.rate.n:
                window = Text(f"{most} ≤ {d.rate.n}", style="green")
            else:
                window = Text(f"{most} > {d.rate.n}", style="bold red")
            table.add_row(
                d.name, d.limit(), str(d.written), str(d.delivered), str(d.dead),
                f"{rate:.1f}/s" if rate is not None else "-", window,
            )  # fmt: skip
        return table

    def notes(self) -> list[str]:
        out = [
            "achieved: deliveries per second while it had messages (the others wait "
            "where they were written, in order, until the valve gives a slot); peak: the "
            "most hand-outs (msg.delivered_at) in any window of the rate's period, "
            "emergencies excepted (unlimited: in any second)"
        ]
        for d in self.plan.destinations:
            if d.emergencies:
                out.append(
                    f"{d.name}: {d.emergencies} of its deliveries took the emergency lane, "
                    "past its rate, and opened an emergency window"
                )
        return out

    def promise_kept(self) -> bool:
        return all(d.rate is None or d.window_max() <= d.rate.n for d in self.plan.destinations)


async def _writer(pipe: Pipe, the_plan: Plan) -> None:
    writer = pipe.writer()
    await writer.insert_many(the_plan.messages)
    await asyncio.sleep(the_plan.emergency_at)
    await writer.insert(the_plan.emergency)


async def run(args: argparse.Namespace, ctx: Context) -> int:
    console = ctx.console
    the_plan = plan(args.messages, args.seconds)
    path: str | None = None  # the demo's own SQLite file
    if args.url:
        settings = QueueSettings.from_url(args.url)
    else:
        path = demo_file()
        settings = QueueSettings("sqlite", path=path)
    store_settings = StoreSettings.from_url(args.store or "memory://")
    demo = Demo(the_plan, args.seconds)
    async with Pipe(make_queue(settings), make_store(store_settings), create=True) as pipe:
        stats = await pipe.queue.stats(pipe.queue.clock.now())
        waiting = sum(stats.queued.values()) + sum(stats.leased.values())
        if waiting:
            raise ConfigError(
                f"{settings.safe_url()} already holds {waiting} queued message(s): the demo "
                "would consume them. Purge them (mvalve purge) or use other tables "
                "(?emergency=...&timed=...&normal=...&dead=...)"
            )
        for d in the_plan.destinations:
            d.dead_before = stats.by_destination.get(d.name, {}).get("dead", 0)
        rates = {d.name: d.rate for d in the_plan.destinations}
        fresh = "" if path is None else " (fresh file)" if path == DEMO_PATH else (
            " (fresh file: the current directory is not writable)"
        )  # fmt: skip
        console.print(
            f"queue [bold]{escape(settings.safe_url())}[/]{fresh}, "
            f"store [bold]{escape(store_settings.kind)}[/]; {demo.total} messages, "
            f"{READERS} readers; an emergency for {the_plan.emergency.destination} "
            f"at +{the_plan.emergency_at:g}s",
            highlight=False,
        )
        finished = await _run(pipe, demo, rates, console.is_terminal, ctx)
    console.print(demo.summary())
    for note in demo.notes():
        console.print(note, highlight=False, style="dim")
    elapsed = demo.elapsed()
    kept = demo.promise_kept()
    console.print(
        f"{demo.delivered} delivered, {demo.dead} dead letters, of {demo.total} written, in "
        f"{elapsed:.1f}s. Rate promise on hand-out times (msg.delivered_at): "
        + ("kept." if kept else "[bold red]BROKEN[/]."),
        highlight=False,
    )
    for line in closing(path, demo.dead):  # not folded: paths and commands copy whole
        console.print(escape(line), highlight=False, soft_wrap=True)
    if not finished:
        console.print(f"[bold red]incomplete:[/] {demo.total - demo.done} message(s) left")
    return 0 if finished and kept else 1


def closing(path: str | None, dead: int) -> list[str]:
    """Where the demo's queue stays and the commands that look at it. `path`: the
    demo's own SQLite file, None on a URL given with --url."""
    if path is None:
        where = "The queue stays on the --url you gave"
        url = "URL"
    else:
        url = shlex.quote(f"sqlite:///{path}")
        if path == DEMO_PATH:
            where = f"The queue stays in {DEMO_PATH}, in this directory"
        else:
            where = f"The queue stays in {path} (the current directory was not writable)"
    lines = [
        f"{where}. Plain `mvalve stats` shows the default queue ({DEFAULT_SQLITE_PATH}, "
        "or $MVALVE_URL); to look at this one:",
        f"  mvalve --url {url} stats",
    ]
    if dead:
        lines.append(
            f"  mvalve --url {url} dead list    # the {dead} dead letter{'s' * (dead != 1)}, "
            "dropped by the emergency window"
        )
    return lines


async def _run(
    pipe: Pipe, demo: Demo, rates: dict[str, Rate | None], live: bool, ctx: Context
) -> bool:
    """Write, serve and watch until every message is delivered or dead."""
    stop = asyncio.Event()
    demo.started = time.time()
    deadline = demo.started + 3 * demo.seconds + 30
    async with asyncio.TaskGroup() as group:
        group.create_task(_writer(pipe, demo.plan))
        group.create_task(
            pipe.serve(demo.handle, concurrency=READERS, stop=stop, rate=None, rates=rates)
        )
        try:
            if live:
                with (
                    Live(demo.live_view(), console=ctx.console, auto_refresh=False) as screen,
                    _logs_above(ctx.console),
                ):
                    while await _tick(pipe, demo, deadline):
                        screen.update(demo.live_view(), refresh=True)
                    screen.update(demo.live_view(), refresh=True)
            else:
                last = 0.0
                while await _tick(pipe, demo, deadline):
                    if time.time() - last >= 1.0:
                        last = time.time()
                        ctx.console.out(demo.plain_line(), highlight=False)
                ctx.console.out(demo.plain_line(), highlight=False)
        finally:
            stop.set()
    return demo.done >= demo.total


async def _tick(pipe: Pipe, demo: Demo, deadline: float) -> bool:
    """False when the run is over (everything accounted for, or the deadline passed)."""
    await asyncio.sleep(TICK)
    await demo.refresh(pipe)
    return demo.done < demo.total and time.time() < deadline


COMMAND = Command(HELP, configure, run, URL_HELP, STORE_HELP)
