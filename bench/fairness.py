"""Scenario `fairness`: one destination's backlog must cost the others nothing.

A trickle of messages to 10 destinations (one every 20-60 ms, each stamped with the
writer's monotonic clock) is read by 4 reader processes sharing memcached, first on
an otherwise empty queue (the *idle* pick-up latency: the baseline, same run), then
with a backlog of `HOT` messages queued for one more destination, `hot`, throttled
at `Rate(50, 1)` (the trickle destinations' rate is the same, far above their load).
Pick-up latency = the moment `next()` returned in a reader (monotonic, system-wide)
minus the writer's stamp.

Figures: the trickle's pick-up p50/p99 with the backlog against the idle run's
(target: p99 within 50 ms of idle), the hot destination's achieved rate in its
steady windows (target: exactly 50/s), its busiest 1 s window (must be <= 50) and
its order inversions (must be 0); cost per message (memcached ops, SQL statements,
reader CPU) over the hot run.

With `--scenarios fairness,...` and the bench extra installed, the same workload
also runs on Dramatiq (Redis broker, `WindowRateLimiter(50, 1)` per destination,
4 workers x 8 threads, rate-limited messages retried with backoff, as in
`bench.peer`), with a smaller backlog (`PEER_HOT`: enqueueing into Redis is the
slow part), reported beside ours.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import time
from typing import Any

from mvalve_async import Message
from mvalve_async.pipe import Pipe
from mvalve_async.registry import make_queue
from mvalve_async.stores.memory import MemoryStore

from . import throttle
from .harness import US, Bench, Result, Workers, max_in_window, percentile, say
from .plot import Timeline

HOT, PEER_HOT, HOT_RATE = 1_000_000, 20_000, (50, 1.0)
TRICKLE = [f"cold-{i}" for i in range(10)]
PROCS = 4
REDIS_URL = os.environ.get("MVALVE_BENCH_REDIS_URL") or "redis://127.0.0.1:6379/0"


async def run(b: Bench) -> Result:
    hot = 20_000 if b.quick else HOT
    seconds = 3.0 if b.quick else 12.0
    res = Result("fairness", facts={
        "hot backlog": hot, "hot rate": f"{HOT_RATE[0]}/{HOT_RATE[1]:g}s",
        "trickle": f"{len(TRICKLE)} destinations, one message every 20-60 ms",
        "seconds per phase": seconds, "processes": PROCS,
    })  # fmt: skip
    tables = b.tables("f")
    lanes = [tables.emergency[0], tables.timed[0], tables.normal[0]]
    pipe = Pipe(make_queue(b.queue_settings(tables)), MemoryStore(), create=True)
    await pipe.connect()
    try:
        for rep in range(b.repeat):
            phases: dict[str, dict[str, Any]] = {}
            for phase in ("idle", "hot"):
                for name in [*lanes, tables.dead]:
                    await b.sql(f"TRUNCATE TABLE `{name}`")
                if phase == "hot":
                    t0 = time.monotonic()
                    await _fill(pipe, hot)
                    res.facts["backlog insert s"] = round(time.monotonic() - t0, 1)
                cfg = {"url": b.queue_url(tables), "n": HOT_RATE[0], "per": HOT_RATE[1],
                       "batch": throttle.BATCH,
                       "store": b.store_url(f"mvb{b.run_id}f{rep}{phase}")}  # fmt: skip
                phases[phase] = await _phase(b, pipe, cfg, seconds)
            _account(res, phases, seconds)
            res.timelines = [_timeline(phases["hot"], f"fairness, ours (run {rep + 1})")]
            b.say(f"fairness: repeat {rep + 1}/{b.repeat} done")
        if _peer_available():
            await _peer(b, res, min(hot, PEER_HOT), seconds)
        else:
            res.facts["Dramatiq"] = "not run: pip install -e '.[bench]' and Redis"
    finally:
        await pipe.close()
    return res


async def _fill(pipe: Pipe, count: int) -> None:
    writer = pipe.writer()
    for i in range(0, count, 5000):
        await writer.insert_many(
            [Message("hot", {"seq": j}) for j in range(i, min(count, i + 5000))]
        )


async def _phase(b: Bench, pipe: Pipe, cfg: dict[str, Any], seconds: float) -> dict[str, Any]:
    """Start the readers, write the trickle for `seconds`, stop, collect."""
    async with Workers("bench.throttle", cfg, PROCS) as workers:
        t_go = await workers.go()
        writer, sent, rng = pipe.writer(), 0, random.Random(7)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            dest = TRICKLE[sent % len(TRICKLE)]
            await writer.insert(Message(dest, {"seq": sent, "sent": time.monotonic()}))
            sent += 1
            await asyncio.sleep(rng.uniform(0.02, 0.06))
        await asyncio.sleep(1.0)  # the last ones' pick-up
        outs = await workers.stop()
    rows = [r for o in outs for r in o["rows"]]
    trickle = [r for r in rows if r[0] != "hot"]
    if len({r[1] for r in trickle}) != sent:
        raise AssertionError(f"{len(trickle)} trickle deliveries of {sent} sent")
    return {
        "latency": [(r[4] - r[5]) * 1000 for r in trickle],
        "hot": [r for r in rows if r[0] == "hot"],
        "t_go": t_go, "sent": sent, "ops": sum(o["ops"] for o in outs),
        "statements": sum(o["statements"] for o in outs), "cpu": sum(o["cpu"] for o in outs),
        "delivered": len(rows),
    }  # fmt: skip


def _account(res: Result, phases: dict[str, dict[str, Any]], seconds: float) -> None:
    idle, hot = phases["idle"], phases["hot"]
    for q in (50, 99):
        case = res.case(f"trickle pick-up p{q}, hot backlog", "ms", "idle queue, same run")
        case.ours.append(percentile(hot["latency"], q))
        case.baseline.append(percentile(idle["latency"], q))
        case.add("difference, ms", percentile(hot["latency"], q) - percentile(idle["latency"], q))
    rows = hot["hot"]
    ats = sorted(r[2] for r in rows)  # delivered_at
    n, per = HOT_RATE
    # steady windows: from the first full second to the end of the writing
    start = ats[0] + per if ats else 0.0
    steady = [t for t in ats if start <= t < start + seconds - 2 * per]
    achieved = len(steady) / max(seconds - 2 * per, per)
    case = res.case("hot destination achieved rate", "msg/s", "its limit")
    case.ours.append(achieved)
    case.baseline.append(n / per)
    case.add("busiest 1 s window (delivered_at)", max_in_window(ats, per))
    case.add("busiest 1 s window (next() returned)", max_in_window([r[4] for r in rows], per))
    seqs = [r[1] for r in sorted(rows, key=lambda r: (r[2], r[4]))]
    top, inversions = -1, 0
    for seq in seqs:
        inversions += seq < top
        top = max(top, seq)
    case.add("hot order inversions", inversions)
    total = max(hot["delivered"], 1)
    case.add("memcached ops/msg (hot run)", hot["ops"] / total)
    case.add("SQL statements/msg (hot run)", hot["statements"] / total)
    case.add("reader CPU µs/msg (hot run)", hot["cpu"] * US / total)


def _timeline(phase: dict[str, Any], title: str) -> Timeline:
    rows = [(r[0], r[2]) for r in phase["hot"]]
    return Timeline(title, rows, {"hot": HOT_RATE}, start=phase["t_go"])


# -- the same workload on Dramatiq ----------------------------------------------------


def _peer_available() -> bool:
    try:
        import dramatiq  # noqa: F401
        import redis  # noqa: F401
    except ImportError:
        return False
    return True


async def _peer(b: Bench, res: Result, hot: int, seconds: float) -> None:
    """Ours' trickle pick-up beside Dramatiq's, each with `hot` messages ahead."""
    import redis.asyncio as aredis

    r = aredis.from_url(REDIS_URL)
    cfg = {"redis": REDIS_URL, "namespace": f"mvb_{b.run_id}_fp", "queue": f"mvb_{b.run_id}_f"}
    try:
        broker, actor = _declare(cfg, None)
        try:
            await asyncio.to_thread(lambda: [actor.send("hot", i, 0.0) for i in range(hot)])
            async with Workers("bench.fairness", cfg, PROCS) as workers:
                await workers.go()
                rng, sent = random.Random(7), 0
                end = time.monotonic() + seconds
                while time.monotonic() < end:
                    dest, stamp = TRICKLE[sent % len(TRICKLE)], time.monotonic()
                    await asyncio.to_thread(actor.send, dest, sent, stamp)
                    sent += 1
                    await asyncio.sleep(rng.uniform(0.02, 0.06))
                await asyncio.sleep(1.0)
                outs = await workers.stop()
        finally:
            broker.close()
        rows = [x for o in outs for x in o["rows"]]  # [dest, seq, got (mono), sent]
        trickle = [x for x in rows if x[0] != "hot"]
        lat = [(x[2] - x[3]) * 1000 for x in trickle]
        picked = len({x[1] for x in trickle})
        hot_rows = sorted(x[2] for x in rows if x[0] == "hot")
        for q in (50, 99):
            case = res.case(f"trickle pick-up p{q}, {hot:,} ahead: ours vs Dramatiq", "ms",
                            "Dramatiq")  # fmt: skip
            case.ours.append(res.case(f"trickle pick-up p{q}, hot backlog", "ms").ours[-1])
            case.baseline.append(percentile(lat, q) if lat else float("nan"))
            case.add("Dramatiq trickle picked up within the phase", picked)
            case.add("Dramatiq trickle sent", sent)
        case = res.case("hot achieved rate: ours vs Dramatiq", "msg/s", "Dramatiq")
        case.ours.append(res.case("hot destination achieved rate", "msg/s").ours[-1])
        steady = [t for t in hot_rows if hot_rows and t >= hot_rows[0] + 1.0]
        case.baseline.append(len(steady) / max(seconds - 1.0, 1.0))
        case.add("Dramatiq busiest 1 s window (limit 50)", max_in_window(hot_rows, 1.0))
        case.add("Dramatiq rate-limit retries/msg", sum(o["exceeded"] for o in outs)
                 / max(len(rows), 1))  # fmt: skip
    finally:
        keys = [k async for k in r.scan_iter(match=cfg["namespace"] + "*", count=1000)]
        if keys:
            await r.delete(*keys)
        await r.aclose()


def _declare(cfg: dict[str, Any], rows: list[list[Any]] | None,
             exceeded: Any = None) -> tuple[Any, Any]:  # fmt: skip
    import dramatiq
    from dramatiq.brokers.redis import RedisBroker
    from dramatiq.rate_limits import WindowRateLimiter
    from dramatiq.rate_limits.backends import RedisBackend

    broker = RedisBroker(url=cfg["redis"], namespace=cfg["namespace"])
    backend = RedisBackend(url=cfg["redis"])
    limiters: dict[str, Any] = {}

    def deliver(destination: str, seq: int, sent: float) -> None:
        limiter = limiters.get(destination)
        if limiter is None:
            limiter = limiters[destination] = WindowRateLimiter(
                backend, f"{cfg['namespace']}:limit:{destination}", limit=HOT_RATE[0],
                window=int(HOT_RATE[1]),
            )  # fmt: skip
        try:
            with limiter.acquire(raise_on_failure=True):
                assert rows is not None
                rows.append([destination, seq, time.monotonic(), sent])
        except dramatiq.RateLimitExceeded:
            if exceeded is not None:
                exceeded()
            raise

    actor = dramatiq.actor(
        deliver, broker=broker, actor_name="fair", queue_name=cfg["queue"],
        max_retries=10_000, min_backoff=100, max_backoff=1000,
    )  # fmt: skip
    return broker, actor


def _worker(cfg: dict[str, Any]) -> None:
    import dramatiq

    from .peer import _Count

    rows: list[list[Any]] = []
    exceeded = _Count()
    broker, _ = _declare(cfg, rows, exceeded)
    broker.client.ping()
    worker = dramatiq.Worker(broker, worker_threads=8)
    say({"ready": True})
    if sys.stdin.readline().strip() != "go":
        return
    worker.start()
    sys.stdin.readline()
    worker.stop()
    broker.close()
    say({"rows": rows, "exceeded": exceeded.n})


if __name__ == "__main__":
    if sys.argv[1:2] != ["worker"] or len(sys.argv) != 3:
        raise SystemExit("usage: python -m bench.fairness worker CONFIG_JSON")
    _worker(json.loads(sys.argv[2]))
