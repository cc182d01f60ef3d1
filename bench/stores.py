"""Scenario `stores`: what a shared store costs destinations that have no rate.

Several processes need memcached to share their rates; a destination without a
rate should not pay for it. `MESSAGES` messages to 10 destinations, no rate at
all, consumed by P processes x 4 readers (batch 16): once with the memory store
(the baseline) and once with memcached, in the same run. Target (issue 14): within
1.2x of the memory store. Before the claim-time valve: 4,345 msg/s against 15,513
(1 x 4) and 6,965 against 12,435 (2 x 4): one store round trip per message.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import mvalve_async
from mvalve_async import Message
from mvalve_async.pipe import Pipe
from mvalve_async.registry import make_queue
from mvalve_async.stores.memory import MemoryStore

from .harness import US, Bench, QueryCounter, Result, Workers, WorkerSide

MESSAGES, READERS = 20_000, 4


async def run(b: Bench) -> Result:
    total = 2000 if b.quick else MESSAGES
    res = Result(
        "stores", facts={"messages": total, "destinations": 10, "readers/process": READERS}
    )
    tables = b.tables("m")
    lanes = [tables.emergency[0], tables.timed[0], tables.normal[0]]
    pipe = Pipe(make_queue(b.queue_settings(tables)), MemoryStore(), create=True)
    await pipe.connect()
    msgs = [Message(f"dest-{i % 10}", {"seq": i}) for i in range(total)]
    try:
        for rep in range(b.repeat):
            for procs in (1, 2):
                case = res.case(f"no rate, {procs} x {READERS} readers", "msg/s", "memory store")
                for side in b.order(rep):
                    for name in [*lanes, tables.dead]:
                        await b.sql(f"TRUNCATE TABLE `{name}`")
                    for i in range(0, total, 5000):
                        await pipe.writer().insert_many(msgs[i : i + 5000])
                    store = (b.store_url(f"mvb{b.run_id}m{rep}{procs}") if side == "ours"
                             else "memory://")  # fmt: skip
                    cfg = {"url": b.queue_url(tables), "store": store}
                    rate, ops, cpu = await _drain(b, cfg, procs, lanes, total)
                    getattr(case, side).append(rate)
                    case.add(f"{side} store ops/msg", ops / total)
                    case.add(f"{side} reader CPU µs/msg", cpu * US / total)
            b.say(f"stores: repeat {rep + 1}/{b.repeat} done")
    finally:
        await pipe.close()
    return res


async def _drain(
    b: Bench, cfg: dict[str, Any], procs: int, lanes: list[str], total: int
) -> tuple[float, int, float]:
    async with Workers("bench.stores", cfg, procs) as workers:
        await workers.go()
        deadline = time.monotonic() + 300
        while await b.count_rows(lanes):
            if time.monotonic() > deadline:
                raise TimeoutError("the queue did not drain in 300 s")
            await asyncio.sleep(0.05)
        outs = await workers.stop(60)
    got = sum(o["got"] for o in outs)
    if got != total:
        raise AssertionError(f"{got} deliveries of {total}")
    took = max(o["last"] for o in outs) - min(o["first"] for o in outs)
    return total / took, sum(o["ops"] for o in outs), sum(o["cpu"] for o in outs)


async def _worker(cfg: dict[str, Any]) -> None:
    QueryCounter.install()
    side = WorkerSide()
    async with mvalve_async.open(cfg["url"], cfg["store"]) as pipe:
        readers = [pipe.reader() for _ in range(READERS)]
        await pipe.store.get("bench:warm-up")
        await pipe.queue.scan(pipe.queue.clock.now())
        side.ready()
        await side.go.wait()
        cpu0, ops0 = time.process_time(), pipe.store.ops
        stamps: list[float] = []

        async def consume(reader: Any) -> None:
            while not side.stop.is_set():
                if await reader.next(timeout=0.2) is not None:
                    stamps.append(time.monotonic())
            await reader.close()

        await asyncio.gather(*(consume(r) for r in readers))
        out = {"got": len(stamps), "first": min(stamps, default=0.0),
               "last": max(stamps, default=0.0), "ops": pipe.store.ops - ops0,
               "cpu": time.process_time() - cpu0}  # fmt: skip
    side.report(out)


if __name__ == "__main__":
    if sys.argv[1:2] != ["worker"] or len(sys.argv) != 3:
        raise SystemExit("usage: python -m bench.stores worker CONFIG_JSON")
    asyncio.run(_worker(json.loads(sys.argv[2])))
