"""Timing, statistics, result records and output (rich table, JSON), plus the plumbing
every scenario shares: unique table names, bare aiomysql connections, query counts,
worker subprocesses.

A `Case` holds one figure per repeat for our code and for its raw baseline (run in
the same process, on an identical table, in alternating order); its ratio is
median(ours) / median(baseline), so for times and rates below 1 means we are
cheaper than the baseline.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import json
import math
import os
import platform
import secrets
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomysql
import aiomysql.connection
from pymysql.constants import COMMAND
from rich.console import Console
from rich.table import Table

from mvalve_async.schema import sections
from mvalve_async.urls import QueueSettings, Tables

from .plot import Timeline

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MYSQL_URL = (
    os.environ.get("MVALVE_BENCH_MYSQL_URL")
    or os.environ.get("MVALVE_TEST_MYSQL_URL")
    or "mysql+innodb://root@127.0.0.1:3306/test"
)
DEFAULT_MEMCACHED_URL = (
    os.environ.get("MVALVE_BENCH_MEMCACHED_URL")
    or os.environ.get("MVALVE_TEST_MEMCACHED_URL")
    or "memcached://127.0.0.1:11211"
)
US = 1_000_000


# -- statistics ---------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), q in [0, 100]."""
    if not values:
        return math.nan
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def max_in_window(times: Sequence[float], per: float) -> int:
    """Most events in any half-open window [t, t + per)."""
    xs = sorted(times)
    best = lo = 0
    for hi, t in enumerate(xs):
        while xs[lo] <= t - per:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def windows_over(times: Sequence[float], per: float, n: int) -> int:
    """How many windows [t_i, t_i + per), one starting at each event, hold more than
    `n` events (a window holding the most events can always start at an event)."""
    xs = sorted(times)
    over = hi = 0
    for lo, t in enumerate(xs):
        while hi < len(xs) and xs[hi] < t + per:
            hi += 1
        over += hi - lo > n
    return over


# -- results --------------------------------------------------------------------------


@dataclass
class Case:
    """One comparison: a figure per repeat for ours and for the baseline."""

    name: str
    unit: str
    baseline_name: str = "bare aiomysql"
    ours: list[float] = field(default_factory=list)
    baseline: list[float] = field(default_factory=list)
    extra: dict[str, list[float]] = field(default_factory=dict)  # more figures per repeat

    def add(self, key: str, value: float) -> None:
        self.extra.setdefault(key, []).append(value)

    @property
    def ratio(self) -> float:
        base = median(self.baseline)
        return median(self.ours) / base if base else math.nan

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "unit": self.unit,
            "ours": {"median": _r(median(self.ours)), "runs": [_r(v) for v in self.ours]},
            "baseline": {
                "name": self.baseline_name,
                "median": _r(median(self.baseline)),
                "runs": [_r(v) for v in self.baseline],
            },
            "ratio": _r(self.ratio),
            "extra": {
                k: {"median": _r(median(v)), "runs": [_r(x) for x in v]}
                for k, v in self.extra.items()
            },
        }


@dataclass
class Result:
    name: str
    cases: list[Case] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)  # parameters and counts
    error: str | None = None
    seconds: float = 0.0
    # Deliveries to draw with --plot (bench/plot.py), one panel each; not in the JSON.
    timelines: list[Timeline] = field(default_factory=list)

    def case(self, name: str, unit: str, baseline_name: str = "bare aiomysql") -> Case:
        for c in self.cases:
            if c.name == name:
                return c
        c = Case(name, unit, baseline_name)
        self.cases.append(c)
        return c

    def to_json(self) -> dict[str, Any]:
        return {
            "cases": [c.to_json() for c in self.cases],
            "facts": self.facts,
            "error": self.error,
            "seconds": round(self.seconds, 1),
        }


def _r(x: float) -> float | None:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return None
    return float(f"{x:.6g}")


def machine_state() -> dict[str, Any]:
    return {
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
    }


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("aiomysql", "PyMySQL", "aiomcache", "orjson"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "-"
    return out


def write_json(path: str, data: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, default=str)
        fh.write("\n")


def _fmt(v: float, unit: str = "") -> str:
    if v is None or not math.isfinite(v):
        return "-"
    digits = 0 if abs(v) >= 100 else 1 if abs(v) >= 10 else 2 if abs(v) >= 1 else 3
    return f"{v:,.{digits}f}{' ' + unit if unit else ''}"


def _extras(extra: dict[str, list[float]]) -> list[str]:
    """Medians of the extra figures; "ours X" and "baseline X" share a line."""
    lines, done = [], set()
    for key, values in extra.items():
        if key in done:
            continue
        side, _, what = key.partition(" ")
        other = f"baseline {what}"
        if side == "ours" and other in extra:
            done.add(other)
            lines.append(f"{what}: {_fmt(median(values))} | {_fmt(median(extra[other]))}")
        else:
            lines.append(f"{key}: {_fmt(median(values))}")
    return lines


def render(console: Console, data: dict[str, Any], results: Sequence[Result]) -> None:
    repeat = data["config"]["repeat"]
    table = Table(
        title=f"mvalve-async bench: medians of {repeat} run(s); ratio = ours / baseline "
        "(< 1: cheaper or faster than the baseline)",
        show_lines=True,
    )
    table.add_column("scenario")
    table.add_column("case")
    table.add_column("ours", justify="right")
    table.add_column("baseline", justify="right")
    table.add_column("ratio", justify="right", style="bold")
    table.add_column("more (medians; ours | baseline)")
    for res in results:
        if res.error:
            table.add_row(res.name, "[red]failed[/]", "", "", "", res.error[:200])
            continue
        for i, c in enumerate(res.cases):
            more = "\n".join(_extras(c.extra))
            table.add_row(
                res.name if i == 0 else "",
                c.name,
                _fmt(median(c.ours), c.unit),
                f"{_fmt(median(c.baseline), c.unit)}\n[dim]{c.baseline_name}[/]",
                _fmt(c.ratio),
                more,
            )
    console.print(table)
    for res in results:
        if res.facts:
            facts = ", ".join(f"{k}={v}" for k, v in res.facts.items())
            console.print(f"[dim]{res.name}: {facts}[/]", soft_wrap=True)
    ms, me = data["machine"]["start"], data["machine"].get("end", {})
    console.print(
        f"machine: nproc {ms['nproc']}, load average start {ms['load_average']} "
        f"end {me.get('load_average')}; {data['versions']}",
        soft_wrap=True,
    )


# -- counting statements --------------------------------------------------------------


class QueryCounter:
    """COM_QUERY commands sent by every aiomysql connection of this process (BEGIN and
    COMMIT included): exact and private to the process, unlike MariaDB's global
    `Questions`, which also counts other clients of the shared server."""

    count = 0
    _installed = False

    @classmethod
    def install(cls) -> None:
        if cls._installed:
            return
        conn_class: Any = aiomysql.connection.Connection
        original = conn_class._execute_command

        async def counted(self: Any, command: int, sql: Any) -> Any:
            if command == COMMAND.COM_QUERY:
                cls.count += 1
            return await original(self, command, sql)

        conn_class._execute_command = counted
        cls._installed = True


# -- the run's environment ------------------------------------------------------------


class Bench:
    """Settings, unique table names (all starting with `prefix`) and connections."""

    def __init__(
        self, mysql_url: str, memcached_url: str, repeat: int, quick: bool, console: Console
    ) -> None:
        settings = QueueSettings.from_url(mysql_url)
        if settings.dialect != "innodb":
            raise ValueError("the bench runs on mysql+innodb:// URLs")
        self.settings = settings
        self.mysql_url = mysql_url.split("?", 1)[0]
        self.memcached_url = memcached_url.split("?", 1)[0]
        self.repeat = repeat
        self.quick = quick
        self.console = console
        self.run_id = secrets.token_hex(3)
        self.prefix = f"mvb_{self.run_id}_"
        self._admin: Any = None
        QueryCounter.install()

    def say(self, text: str) -> None:
        self.console.log(text)

    def tables(self, tag: str) -> Tables:
        p = self.prefix + tag
        return Tables(emergency=(f"{p}_e",), timed=(f"{p}_t",), normal=(f"{p}_n",), dead=f"{p}_d")

    def raw_table(self, tag: str) -> str:
        return f"{self.prefix}{tag}_raw"

    def queue_settings(self, tables: Tables) -> QueueSettings:
        return dataclasses.replace(self.settings, tables=tables)

    def queue_url(self, tables: Tables) -> str:
        t = tables
        return (
            f"{self.mysql_url}?emergency={t.emergency[0]}&timed={t.timed[0]}"
            f"&normal={t.normal[0]}&dead={t.dead}"
        )

    def store_url(self, namespace: str) -> str:
        return f"{self.memcached_url}?namespace={namespace}"

    @staticmethod
    def order(rep: int) -> tuple[str, str]:
        """Alternate which side runs first, so drift favours neither."""
        return ("ours", "baseline") if rep % 2 == 0 else ("baseline", "ours")

    async def connect(self, *, autocommit: bool) -> Any:
        """A bare connection, set up as the library sets up its pool's."""
        s = self.settings
        return await aiomysql.connect(
            host=s.host, port=s.port, user=s.user, password=s.password, db=s.database,
            autocommit=autocommit, charset="utf8mb4",
            init_command="SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED",
        )  # fmt: skip

    async def sql(self, statement: str) -> list[tuple[Any, ...]]:
        """Run one statement on the bench's own autocommit connection (no args: a
        literal % stays literal)."""
        if self._admin is None:
            self._admin = await self.connect(autocommit=True)
        async with self._admin.cursor() as cur:
            await cur.execute(statement)
            return list(await cur.fetchall())

    async def create_raw(self, table: str) -> None:
        """The baseline's table: the same DDL as the library's normal lane."""
        await self.sql(sections("innodb")["lane"].format(table=table).rstrip(";"))

    async def count_rows(self, tables: Sequence[str]) -> int:
        union = " UNION ALL ".join(f"SELECT COUNT(*) FROM `{t}`" for t in tables)
        return int(sum(r[0] for r in await self.sql(union)))

    async def questions(self) -> int:
        rows = await self.sql("SHOW GLOBAL STATUS LIKE 'Questions'")
        return int(rows[0][1])

    async def drop_all(self) -> list[str]:
        """Drop every table of this run; returns their names."""
        like = self.prefix.replace("_", "\\_") + "%"
        names = [r[0] for r in await self.sql(f"SHOW TABLES LIKE '{like}'")]
        if names:
            await self.sql("DROP TABLE IF EXISTS " + ", ".join(f"`{n}`" for n in names))
        return names

    async def close(self) -> None:
        if self._admin is not None:
            self._admin.close()
            self._admin = None


async def spawn(module: str, *args: str) -> asyncio.subprocess.Process:
    """`python -m module args...` from the repository root, pipes on stdin/stdout."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", module, *args, cwd=REPO, env={**os.environ, "PYTHONPATH": path},
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        limit=1 << 28,  # a worker reports every delivery on one line: 60,000 are ~6 MB
    )  # fmt: skip


async def read_json_line(proc: asyncio.subprocess.Process, timeout: float) -> Any:
    assert proc.stdout is not None
    async with asyncio.timeout(timeout):
        line = await proc.stdout.readline()
    if not line:
        raise RuntimeError(f"worker {proc.pid} exited (status {await proc.wait()})")
    return json.loads(line)


class Workers:
    """`count` worker processes of `python -m module worker CONFIG_JSON`, started
    together. The protocol (the worker's side is `WorkerSide`): a worker says
    {"ready": true} once imported and connected, starts on "go", and on "stop"
    reports one JSON line and exits 0. Leaving the block kills the ones still running.

        async with Workers("bench.throttle", cfg, 4) as workers:
            t_go = await workers.go()
            ...  # wait for the work to be done
            outs = await workers.stop()
    """

    def __init__(self, module: str, cfg: dict[str, Any], count: int) -> None:
        self.module, self.cfg, self.count = module, cfg, count
        self.procs: list[asyncio.subprocess.Process] = []

    async def __aenter__(self) -> Workers:
        try:
            for _ in range(self.count):
                self.procs.append(await spawn(self.module, "worker", json.dumps(self.cfg)))
            for proc in self.procs:
                await read_json_line(proc, 120)  # {"ready": true}
        except BaseException:
            await self._kill()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._kill()

    async def _say(self, word: bytes) -> None:
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write(word + b"\n")
            await proc.stdin.drain()

    async def go(self) -> float:
        """Start them all; the wall-clock time they were told to."""
        started = time.time()
        await self._say(b"go")
        return started

    async def stop(self, timeout: float = 120) -> list[dict[str, Any]]:
        """Stop them all and return each one's report; raise if one did not exit 0."""
        await self._say(b"stop")
        outs = [await read_json_line(proc, timeout) for proc in self.procs]
        for proc in self.procs:
            if await proc.wait():
                raise RuntimeError(f"{self.module} worker {proc.pid} exited {proc.returncode}")
        return outs

    async def _kill(self) -> None:
        for proc in self.procs:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()


class WorkerSide:
    """A worker process's end of the `Workers` protocol: `ready()` says so and starts
    listening on stdin; `go` and `stop` are set when the parent says "go" / "stop"
    (`stop` too when stdin closes); `report()` writes the one JSON line."""

    def __init__(self) -> None:
        self.go, self.stop = asyncio.Event(), asyncio.Event()
        self._loop = asyncio.get_running_loop()

    def ready(self) -> None:
        threading.Thread(target=self._listen, daemon=True).start()
        say({"ready": True})

    def _listen(self) -> None:
        for line in sys.stdin:
            self._loop.call_soon_threadsafe((self.go if line.strip() == "go" else self.stop).set)
        self._loop.call_soon_threadsafe(self.stop.set)

    def report(self, obj: dict[str, Any]) -> None:
        say(obj)


def say(obj: dict[str, Any]) -> None:
    """One JSON line on stdout, flushed (a worker's message to the parent)."""
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def clock() -> float:
    return time.perf_counter()
