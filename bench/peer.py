"""Scenario `peer`: the throttle scenario's workload on Dramatiq, beside ours, in one run.

The same drain as `bench.throttle` (10 destinations at 20 per 1 s, 2,000 messages
queued up front, 4 processes), once with our readers (`bench.throttle`'s workers,
memcached) and once on Dramatiq with its idiomatic rate limiting: a Redis broker,
4 `dramatiq.Worker` processes (`python -m bench.peer worker`, dramatiq's default 8
threads each), an actor that enters `WindowRateLimiter(limit=20, window=1).acquire()`
for its destination (Redis backend) and lets `RateLimitExceeded` go to the Retries
middleware, which re-enqueues the message with exponential backoff.

Why `WindowRateLimiter`: it is the one that promises "only `limit` operations over
some sliding window", our `Rate(n, per)` promise; `BucketRateLimiter` documents that
it lets 2 x limit through across a bucket edge. (Its window counts whole-second
buckets, so with window=1 it is a fixed, epoch-aligned 1 s bucket: measured here.)

Backoff: Dramatiq's defaults (15 s minimum, doubling, up to 7 days) are meant for
failures, not for a 1 s window; the actor sets MIN_BACKOFF/MAX_BACKOFF (ms) to the
window's scale and MAX_RETRIES high enough that none are dropped (dropped ones land
in the queue's dead-letter set and are reported as lost).

Figures are taken where a destination would see them: ours when `next()` returned,
Dramatiq's when the actor body got past the limiter (time.time()). The ideal is
`bench.throttle`'s: the last delivery 2000 / (10 x 20) - 1 = 9 s after "go" (the
first 20 per destination go at once; 10 s is the throughput figure). Ratio column:
ours / Dramatiq. Keys live under `mvb_<run id>_`, deleted at the end.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
from collections import defaultdict
from importlib.metadata import version
from typing import Any

from mvalve_async import Message
from mvalve_async.pipe import Pipe
from mvalve_async.registry import make_queue
from mvalve_async.stores.memory import MemoryStore

from . import throttle
from .harness import US, Bench, Result, Workers, max_in_window, say, windows_over
from .plot import Timeline

REDIS_URL = os.environ.get("MVALVE_BENCH_REDIS_URL") or "redis://127.0.0.1:6379/0"
DESTINATIONS, N, PER = throttle.DESTINATIONS, throttle.N, 1  # the limiter's window: whole s
THREADS = 8  # dramatiq's default worker threads per process
MIN_BACKOFF, MAX_BACKOFF = 100, 1000  # ms: doubling from 0.1-0.2 s, then 0.5-1 s apart
MAX_RETRIES = 10_000  # never reached here: a drop is counted as lost


async def run(b: Bench) -> Result:
    try:
        import dramatiq  # noqa: F401
        import redis.asyncio as aredis
    except ImportError as exc:
        raise RuntimeError(f"{exc}: the peer scenario needs `pip install -e '.[bench]'`") from exc
    total, procs = (600, 2) if b.quick else (2000, 4)
    ideal = total / (DESTINATIONS * N) * PER - PER
    res = Result("peer", facts={
        "messages": total, "destinations": DESTINATIONS, "rate": f"{N}/{PER}s",
        "processes": procs, "ideal_s": ideal, "dramatiq": version("dramatiq"),
        "limiter": f"WindowRateLimiter(limit={N}, window={PER}) on Redis",
        "threads": THREADS, "backoff_ms": f"{MIN_BACKOFF}..{MAX_BACKOFF}",
        "max_retries": MAX_RETRIES,
    })  # fmt: skip
    tables = b.tables("p")
    pipe = Pipe(make_queue(b.queue_settings(tables)), MemoryStore(), create=True)
    await pipe.connect()
    r = aredis.from_url(REDIS_URL)
    try:
        res.facts["redis"] = (await r.info("server"))["redis_version"]
        for rep in range(b.repeat):
            got: dict[str, dict[str, float]] = {}
            drawn: dict[str, Timeline] = {}
            for side in b.order(rep):
                if side == "ours":
                    got[side], drawn[side] = await _ours(b, pipe, rep, total, procs,
                                                         ideal * 4 + 60)  # fmt: skip
                else:
                    got[side], drawn[side] = await _peer(b, r, rep, total, procs,
                                                         ideal * 4 + 60)  # fmt: skip
            _account(res, got["ours"], got["baseline"], ideal)
            res.timelines = [drawn["ours"], drawn["baseline"]]  # the last repeat's, for --plot
            b.say(f"peer: repeat {rep + 1}/{b.repeat} done")
    finally:
        await pipe.close()
        res.facts["redis_keys_left"] = await _clean(r, f"mvb_{b.run_id}_")
        await r.aclose()
    return res


def _figures(rows: list[tuple[str, int, float]], t_go: float, total: int) -> dict[str, float]:
    """Drain, windows over the rate, order inversions from (destination, seq, time)."""
    by_dest: dict[str, list[tuple[float, int]]] = defaultdict(list)
    for dest, seq, at in rows:
        by_dest[dest].append((at, seq))
    over = worst = inversions = shift = 0
    for items in by_dest.values():
        ats = sorted(at for at, _ in items)
        over += windows_over(ats, PER, N)
        worst = max(worst, max_in_window(ats, PER))
        order = [seq for _, seq in sorted(items)]
        top = -1
        for seq in order:
            inversions += seq < top
            top = max(top, seq)
        rank = {seq: i for i, seq in enumerate(sorted(order))}  # its place in FIFO order
        shift = max([shift] + [abs(i - rank[seq]) for i, seq in enumerate(order)])
    distinct = len({seq for _, seq, _ in rows})
    ats = [at for _, _, at in rows] or [t_go]
    return {"drain": max(ats) - t_go, "first": min(ats) - t_go, "over": over, "worst": worst,
            "inversions %": 100 * inversions / max(len(rows), 1), "shift": shift,
            "lost": total - distinct, "duplicates": len(rows) - distinct}  # fmt: skip


async def _ours(b: Bench, pipe: Pipe, rep: int, total: int, procs: int,
                timeout: float) -> tuple[dict[str, float], Timeline]:  # fmt: skip
    """`bench.throttle`'s drain, on this scenario's own tables and memcached namespace."""
    tables = b.tables("p")
    lanes = [tables.emergency[0], tables.timed[0], tables.normal[0]]
    for name in [*lanes, tables.dead]:
        await b.sql(f"TRUNCATE TABLE `{name}`")
    msgs = [Message(f"dest-{i % DESTINATIONS}", {"seq": i}) for i in range(total)]
    for i in range(0, total, 500):
        await pipe.writer().insert_many(msgs[i : i + 500])
    cfg = {"url": b.queue_url(tables), "n": N, "per": float(PER), "batch": throttle.BATCH,
           "store": b.store_url(f"mvb{b.run_id}p{rep}")}  # fmt: skip
    outs, t_go = await throttle._drain(b, cfg, procs, lanes, timeout)
    rows = [r for o in outs for r in o["rows"]]  # [destination, seq, delivered_at, returned]
    f = _figures([(r[0], r[1], r[3]) for r in rows], t_go, total)
    f["lost"] += await b.count_rows([tables.dead])
    if f["lost"] or f["duplicates"]:
        raise AssertionError(f"ours: {f['lost']} lost, {f['duplicates']} duplicates")
    by_slot = _figures([(r[0], r[1], r[2]) for r in rows], t_go, total)  # bench.throttle's
    f["over (delivered_at)"], f["inv (delivered_at)"] = by_slot["over"], by_slot["inversions %"]
    ops, statements = sum(o["ops"] for o in outs), sum(o["statements"] for o in outs)
    f.update(trips=(ops + statements) / total, memcached=ops / total, sql=statements / total,
             cpu=sum(o["cpu"] for o in outs) * US / total)  # fmt: skip
    drawn = throttle.timeline(
        f"peer, ours: {total} messages, {DESTINATIONS} destinations, {procs} processes, "
        f"memcached (run {rep + 1} of {b.repeat}; when next() returned)",
        [(r[0], r[3]) for r in rows], t_go,
    )  # fmt: skip
    return f, drawn


async def _peer(b: Bench, r: Any, rep: int, total: int, procs: int,
                timeout: float) -> tuple[dict[str, float], Timeline]:  # fmt: skip
    """Enqueue `total` messages, start `procs` Dramatiq workers, wait until no message
    is left in the queue or its delay queue, stop them and collect their records."""
    cfg = {"redis": REDIS_URL, "namespace": f"mvb_{b.run_id}_r{rep}",
           "queue": f"mvb_{b.run_id}_peer"}  # fmt: skip
    broker, actor = _declare(cfg, None, None)
    try:
        await asyncio.to_thread(
            lambda: [actor.send(f"dest-{i % DESTINATIONS}", i) for i in range(total)]
        )
        async with Workers("bench.peer", cfg, procs) as workers:
            outs, t_go = await _drain(r, cfg, workers, timeout)
    finally:
        broker.close()
    rows = [(d, s, at) for o in outs for d, s, at, _ in o["rows"]]
    f = _figures(rows, t_go, total)
    f["dead-lettered"] = await r.hlen(f"{cfg['namespace']}:{cfg['queue']}.XQ.msgs")
    f.update(retries=sum(o["exceeded"] for o in outs) / total,
             max_retries=max((x[3] for o in outs for x in o["rows"]), default=0),
             trips=sum(o["trips"] for o in outs) / total,
             cpu=sum(o["cpu"] for o in outs) * US / total)  # fmt: skip
    drawn = throttle.timeline(
        f"peer, Dramatiq: the same drain, WindowRateLimiter({N}, {PER}) on Redis, {procs} "
        f"processes x {THREADS} threads (run {rep + 1} of {b.repeat}; past the limiter)",
        [(d, at) for d, _, at in rows], t_go,
    )  # fmt: skip
    return f, drawn


async def _drain(r: Any, cfg: dict[str, Any], workers: Workers,
                 timeout: float) -> tuple[list[dict[str, Any]], float]:  # fmt: skip
    t_go = await workers.go()
    # A message stays in its queue's hash until acked, and a retry is enqueued on the
    # delay queue before the attempt is acked: both hashes empty (read in one MULTI)
    # means every message was delivered or dead-lettered.
    base = f"{cfg['namespace']}:{cfg['queue']}"
    deadline = time.monotonic() + timeout
    while True:
        async with r.pipeline(transaction=True) as p:
            left = sum(await p.hlen(f"{base}.msgs").hlen(f"{base}.DQ.msgs").execute())
        if not left:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"Dramatiq did not drain in {timeout:.0f} s ({left} left)")
        await asyncio.sleep(0.1)
    return await workers.stop(), t_go


def _account(res: Result, ours: dict[str, float], peer: dict[str, float], ideal: float) -> None:
    def case(name: str, unit: str, key: str) -> Any:
        c = res.case(name, unit, "Dramatiq")
        c.ours.append(ours[key])
        c.baseline.append(peer[key])
        return c

    def both(c: Any, label: str, key: str) -> None:
        c.add(f"ours {label}", ours[key])
        c.add(f"baseline {label}", peer[key])

    c = case("drain time", "s", "drain")
    c.add("ours drain / ideal", ours["drain"] / ideal)
    c.add("baseline drain / ideal", peer["drain"] / ideal)
    both(c, "first delivery after go, s", "first")
    both(c, "lost", "lost")
    both(c, "duplicates", "duplicates")
    c.add("baseline dead-lettered (retries exhausted)", peer["dead-lettered"])
    c = case("windows over rate (sliding 1 s)", "", "over")
    both(c, f"max in any 1 s window (limit {N})", "worst")
    c.add("ours windows over rate (delivered_at)", ours["over (delivered_at)"])
    c = case("order inversions", "%", "inversions %")
    c.add("ours order inversions % (delivered_at)", ours["inv (delivered_at)"])
    both(c, "most places a delivery moved from FIFO order", "shift")
    c = res.case("rate-limit retries/msg", "", "Dramatiq")
    c.ours.append(0.0)  # ours defers a message at most once, to its slot: no retry loop
    c.baseline.append(peer["retries"])
    c.add("baseline most retries of one message", peer["max_retries"])
    c = case("backend round trips/msg", "", "trips")
    c.add("ours SQL statements/msg", ours["sql"])
    c.add("ours memcached ops/msg", ours["memcached"])
    case("worker CPU µs/msg", "µs", "cpu")


async def _clean(r: Any, prefix: str) -> int:
    """Delete this run's keys; return how many are left."""
    keys = [k async for k in r.scan_iter(match=prefix + "*", count=1000)]
    if keys:
        await r.delete(*keys)
    return len([k async for k in r.scan_iter(match=prefix + "*", count=1000)])


# -- the Dramatiq side (sync: Dramatiq's workers are threads) ----------------------


class _Count:
    def __init__(self) -> None:
        self.n, self._lock = 0, threading.Lock()

    def __call__(self) -> None:
        with self._lock:
            self.n += 1


def _declare(cfg: dict[str, Any], rows: list[list[Any]] | None,
             exceeded: _Count | None) -> tuple[Any, Any]:  # fmt: skip
    """The broker and the actor, the same in the bench (to send) and in each worker."""
    import dramatiq
    from dramatiq.brokers.redis import RedisBroker
    from dramatiq.middleware import CurrentMessage
    from dramatiq.rate_limits import WindowRateLimiter
    from dramatiq.rate_limits.backends import RedisBackend

    broker = RedisBroker(url=cfg["redis"], namespace=cfg["namespace"])
    broker.add_middleware(CurrentMessage())
    backend = RedisBackend(url=cfg["redis"])
    limiters = {
        f"dest-{i}": WindowRateLimiter(
            backend, f"{cfg['namespace']}:limit:dest-{i}", limit=N, window=PER
        )
        for i in range(DESTINATIONS)
    }

    def deliver(destination: str, seq: int) -> None:
        try:
            with limiters[destination].acquire(raise_on_failure=True):
                at = time.time()
                message = CurrentMessage.get_current_message()
                assert rows is not None and message is not None
                rows.append([destination, seq, at, message.options.get("retries", 0)])
        except dramatiq.RateLimitExceeded:
            if exceeded is not None:
                exceeded()
            raise  # the Retries middleware re-enqueues it with backoff

    actor = dramatiq.actor(
        deliver, broker=broker, actor_name="deliver", queue_name=cfg["queue"],
        max_retries=MAX_RETRIES, min_backoff=MIN_BACKOFF, max_backoff=MAX_BACKOFF,
    )  # fmt: skip
    return broker, actor


def _worker(cfg: dict[str, Any]) -> None:
    """One Dramatiq worker process: connect, say ready, run from "go" until "stop"."""
    import dramatiq
    from redis.connection import AbstractConnection

    trips = _Count()  # client round trips: a pipeline or a MULTI/EXEC is one send
    send = AbstractConnection.send_packed_command

    def counted(self: Any, command: Any, check_health: bool = True) -> None:
        trips()
        send(self, command, check_health)

    AbstractConnection.send_packed_command = counted  # type: ignore[method-assign]
    rows: list[list[Any]] = []
    exceeded = _Count()
    broker, _ = _declare(cfg, rows, exceeded)
    broker.client.ping()
    worker = dramatiq.Worker(broker, worker_threads=THREADS)
    say({"ready": True})
    if sys.stdin.readline().strip() != "go":
        return
    cpu0, trips0 = time.process_time(), trips.n
    worker.start()
    sys.stdin.readline()  # "stop" (or EOF)
    worker.stop()
    cpu, n = time.process_time() - cpu0, trips.n - trips0
    broker.close()
    say({"rows": rows, "exceeded": exceeded.n, "trips": n, "cpu": cpu})


if __name__ == "__main__":
    if sys.argv[1:2] != ["worker"] or len(sys.argv) != 3:
        raise SystemExit("usage: python -m bench.peer worker CONFIG_JSON")
    _worker(json.loads(sys.argv[2]))
