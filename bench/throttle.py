"""Scenario `throttle`: a throttled drain across reader processes.

10 destinations at `Rate(20, per=1)`, 2,000 messages queued up front, 4 reader
processes (`python -m bench.throttle worker`) sharing one memcached namespace per
run. The baseline is the ideal drain time: 2000 / (10 x 20) s minus the first
burst's second (the first 20 per destination go at once) = 9 s, measured from the
moment every process was told to go until the last `delivered_at`.

Also reported (per run, medians in the table): windows over the rate (sliding
[t, t + 1 s) windows over `msg.delivered_at`, one per delivery; must be 0), the same
over the time `next()` returned (what a destination would see: jitter of a few ms
lands on window edges), the tightest span of n + 1 consecutive deliveries (>= 1000 ms
means no window over), per-destination order inversions (deliveries of a message
inserted before one already delivered to the same destination), memcached ops, cas
retries, Python CPU and SQL statements per message (summed over the processes).
`BATCH` sets the readers' claim batch (the library's default when None).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import defaultdict
from typing import Any

import mvalve_async
from mvalve_async import Message, Rate
from mvalve_async.pipe import Pipe
from mvalve_async.registry import make_queue
from mvalve_async.stores.memory import MemoryStore

from .harness import (
    US,
    Bench,
    QueryCounter,
    Result,
    Workers,
    WorkerSide,
    max_in_window,
    windows_over,
)
from .plot import Timeline

DESTINATIONS, N, PER = 10, 20, 1.0
BATCH: int | None = None  # the readers' claim batch (None: the library's default)


async def run(b: Bench) -> Result:
    total, procs = (600, 2) if b.quick else (2000, 4)
    ideal = total / (DESTINATIONS * N) * PER - PER
    res = Result(
        "throttle",
        facts={"messages": total, "destinations": DESTINATIONS, "rate": f"{N}/{PER:g}s",
               "processes": procs, "ideal_s": ideal, "batch": BATCH or "default"},
    )  # fmt: skip
    tables = b.tables("t")
    lanes = [tables.emergency[0], tables.timed[0], tables.normal[0]]
    pipe = Pipe(make_queue(b.queue_settings(tables)), MemoryStore(), create=True)
    await pipe.connect()
    msgs = [Message(f"dest-{i % DESTINATIONS}", {"seq": i}) for i in range(total)]
    try:
        for rep in range(b.repeat):
            for name in [*lanes, tables.dead]:
                await b.sql(f"TRUNCATE TABLE `{name}`")
            for i in range(0, total, 500):
                await pipe.writer().insert_many(msgs[i : i + 500])
            cfg = {"url": b.queue_url(tables), "n": N, "per": PER, "batch": BATCH,
                   "store": b.store_url(f"mvb{b.run_id}r{rep}")}  # fmt: skip
            outs, t_go = await _drain(b, cfg, procs, lanes, ideal * 4 + 60)
            dead = await b.count_rows([tables.dead])
            _account(res.case("drain time", "s", "ideal"), outs, t_go, total, ideal, dead)
            res.timelines = [timeline(  # the last repeat's, for --plot
                f"throttle: {total} messages to {DESTINATIONS} destinations, {procs} reader "
                f"processes (run {rep + 1} of {b.repeat}; msg.delivered_at)",
                [(r[0], r[2]) for o in outs for r in o["rows"]], t_go,
            )]  # fmt: skip
            b.say(f"throttle: repeat {rep + 1}/{b.repeat} done")
    finally:
        await pipe.close()
    return res


async def _drain(
    b: Bench, cfg: dict[str, Any], procs: int, lanes: list[str], timeout: float
) -> tuple[list[dict[str, Any]], float]:
    async with Workers("bench.throttle", cfg, procs) as workers:
        t_go = await workers.go()
        deadline = time.monotonic() + timeout
        while await b.count_rows(lanes):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the queue did not drain in {timeout:.0f} s")
            await asyncio.sleep(0.1)
        return await workers.stop(60), t_go


def timeline(title: str, rows: list[tuple[str, float]], t_go: float) -> Timeline:
    """Deliveries (destination, time) of a drain at `N` per `PER` s, for --plot."""
    limits: dict[str, tuple[int, float] | None] = {
        f"dest-{i}": (N, PER) for i in range(DESTINATIONS)
    }
    return Timeline(title, rows, limits, start=t_go)


def _account(case: Any, outs: list[dict[str, Any]], t_go: float, total: int, ideal: float,
             dead: int) -> None:  # fmt: skip
    rows = [r for o in outs for r in o["rows"]]  # [destination, seq, delivered_at, received]
    seqs = [r[1] for r in rows]
    if len(set(seqs)) != total or len(seqs) != total or dead:
        raise AssertionError(
            f"{len(seqs)} deliveries of {len(set(seqs))} distinct messages, "
            f"expected {total}; {dead} dead letters"
        )
    by_dest: dict[str, list[tuple[float, float, int]]] = defaultdict(list)
    for dest, seq, at, got, *_ in rows:
        by_dest[dest].append((at, got, seq))
    over = over_recv = worst = worst_recv = inversions = 0
    tight = tight_recv = float("inf")
    for items in by_dest.values():
        ats, gots = sorted(i[0] for i in items), sorted(i[1] for i in items)
        over += windows_over(ats, PER, N)
        over_recv += windows_over(gots, PER, N)
        worst = max(worst, max_in_window(ats, PER))
        worst_recv = max(worst_recv, max_in_window(gots, PER))
        tight = min([tight] + [b - a for a, b in zip(ats, ats[N:], strict=False)])
        tight_recv = min([tight_recv] + [b - a for a, b in zip(gots, gots[N:], strict=False)])
        top = -1
        for _, _, seq in sorted(items):
            inversions += seq < top
            top = max(top, seq)
    last = max(r[2] for r in rows)
    case.ours.append(last - t_go)
    case.baseline.append(ideal)
    case.add("first delivery after go, s", min(r[2] for r in rows) - t_go)
    case.add("windows over rate (delivered_at)", over)
    case.add("windows over rate (next() returned)", over_recv)
    case.add("max in any 1 s window (delivered_at)", worst)
    case.add("max in any 1 s window (next() returned)", worst_recv)
    case.add(f"tightest span of {N + 1} deliveries, ms (delivered_at)", tight * 1000)
    case.add(f"tightest span of {N + 1} deliveries, ms (next() returned)", tight_recv * 1000)
    case.add("order inversions %", 100 * inversions / total)
    case.add("memcached ops/msg", sum(o["ops"] for o in outs) / total)
    case.add("memcached cas retries/msg", sum(o["retries"] for o in outs) / total)
    case.add("reader CPU µs/msg", sum(o["cpu"] for o in outs) * US / total)
    case.add("SQL statements/msg", sum(o["statements"] for o in outs) / total)


async def _worker(cfg: dict[str, Any]) -> None:
    """One reader process: connect, say ready, wait for "go", read until "stop"."""
    QueryCounter.install()
    side = WorkerSide()
    async with mvalve_async.open(cfg["url"], cfg["store"]) as pipe:
        options = {"batch": cfg["batch"]} if cfg.get("batch") else {}
        rate = Rate(cfg["n"], per=cfg["per"]) if cfg.get("n") else None
        rates = {d: Rate(n, per=per) for d, (n, per) in cfg.get("rates", {}).items()}
        reader = pipe.reader(rate=rate, rates=rates, **options)
        await pipe.store.get("bench:warm-up")  # open a memcached connection
        await pipe.queue.scan(pipe.queue.clock.now())  # and a MySQL one
        side.ready()
        await side.go.wait()
        cpu0, ops0, q0 = time.process_time(), pipe.store.ops, QueryCounter.count
        retries0 = getattr(pipe.store, "retries", 0)
        rows: list[list[Any]] = []
        while not side.stop.is_set():
            msg = await reader.next(timeout=0.2)
            if msg is not None:
                # [destination, seq, delivered_at, returned (wall), returned (monotonic),
                # sent (monotonic, when the writer stamped it)]
                rows.append([msg.destination, msg.content["seq"], msg.delivered_at, time.time(),
                             time.monotonic(), msg.content.get("sent")])  # fmt: skip
        await reader.close()
        side.report({
            "rows": rows, "cpu": time.process_time() - cpu0, "ops": pipe.store.ops - ops0,
            "retries": getattr(pipe.store, "retries", 0) - retries0,
            "statements": QueryCounter.count - q0,
        })  # fmt: skip


if __name__ == "__main__":
    if sys.argv[1:2] != ["worker"] or len(sys.argv) != 3:
        raise SystemExit("usage: python -m bench.throttle worker CONFIG_JSON")
    asyncio.run(_worker(json.loads(sys.argv[2])))
