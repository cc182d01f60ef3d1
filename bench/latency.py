"""Scenario `latency`: idle pick-up latency and the idle query rate.

Pick-up: one reader waits idle; a writer inserts one message every ~100 ms (jittered
75-125 ms, the same schedule on both sides, so it cannot phase-lock with a poll
interval) for 50 messages. Latency = `next()` returning minus the writer's insert
returning (both `time.time()` on one host). `in-process`: the writer uses the same
pipe (its insert wakes the reader); `cross-process`: the writer is a subprocess.
Baseline: a bare loop polling `BEGIN; SELECT ... LIMIT 1 FOR UPDATE SKIP LOCKED;
[DELETE;] COMMIT` and sleeping the reader's default `idle_interval` when it finds
nothing, fed by bare INSERTs.

Idle rate: statements per second of one idle reader (and of the bare poller) over
5 s: MariaDB's global `Questions` delta minus this bench's own SHOW (other clients of
the shared server count too), and the exact client-side count.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from typing import Any

from rich.console import Console

from mvalve_async import Message
from mvalve_async.message import decode, encode
from mvalve_async.pipe import Pipe
from mvalve_async.reader import Reader
from mvalve_async.registry import make_queue
from mvalve_async.stores.memory import MemoryStore
from mvalve_async.urls import QueueSettings

from .harness import Bench, QueryCounter, Result, percentile, spawn

IDLE_INTERVAL: float = Reader.__init__.__kwdefaults__["idle_interval"]  # type: ignore[index]
DEST = "latency"


def schedule(count: int, interval: float) -> list[float]:
    rng = random.Random(count)
    return [interval * rng.uniform(0.75, 1.25) for _ in range(count)]


async def run(b: Bench) -> Result:
    count, interval, idle = (10, 0.1, 1.0) if b.quick else (50, 0.1, 5.0)
    res = Result(
        "latency",
        facts={"messages": count, "interval_ms": interval * 1000, "idle_s": idle,
               "idle_interval_ms": IDLE_INTERVAL * 1000},
    )  # fmt: skip
    tables, raw = b.tables("l"), b.raw_table("l")
    settings = b.queue_settings(tables)
    pipe = Pipe(make_queue(settings), MemoryStore(), create=True)
    await pipe.connect()
    await b.create_raw(raw)
    poll = f"bare poll every {IDLE_INTERVAL * 1000:.0f} ms"
    try:
        for rep in range(b.repeat):
            for where in ("in-process", "cross-process"):
                for side in b.order(rep):
                    if side == "ours":
                        lat = await _ours(pipe, b.queue_url(tables), where, count, interval)
                    else:
                        lat = await _bare(b, raw, where, count, interval)
                    for q in (50, 99):
                        case = res.case(f"pick-up p{q}, {where}", "ms", poll)
                        getattr(case, side).append(percentile(lat, q) * 1000)
                    res.case(f"pick-up p50, {where}", "ms").add(f"{side} max ms", max(lat) * 1000)
            for side in b.order(rep):
                global_rate, client_rate = await _idle(b, pipe, raw, side, idle)
                getattr(res.case("idle queries/s (global Questions)", "q/s", poll), side).append(
                    global_rate
                )
                case = res.case("idle statements/s (client-side)", "q/s", poll)
                getattr(case, side).append(client_rate)
                case.add(f"other clients q/s during {side}", max(0.0, global_rate - client_rate))
            b.say(f"latency: repeat {rep + 1}/{b.repeat} done")
    finally:
        await pipe.close()
    return res


async def _ours(pipe: Pipe, url: str, where: str, count: int, interval: float) -> list[float]:
    reader = pipe.reader()
    received: dict[int, float] = {}

    async def consume() -> None:
        while len(received) < count:
            msg = await reader.next(timeout=10)
            if msg is None:
                raise RuntimeError(f"ours {where}: only {len(received)} of {count} arrived")
            received[msg.content["seq"]] = time.time()

    task = asyncio.create_task(consume())
    try:
        await asyncio.sleep(0.3)  # let the reader go idle
        if where == "in-process":
            writer, sent = pipe.writer(), {}
            for i, pause in enumerate(schedule(count, interval)):
                await writer.insert(Message(DEST, {"seq": i}))
                sent[i] = time.time()
                await asyncio.sleep(pause)
        else:
            sent = await _subprocess_writer(url, "ours", count, interval)
        await asyncio.wait_for(asyncio.shield(task), 15)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await reader.close()
    return [received[i] - sent[i] for i in sent]


async def _bare(b: Bench, raw: str, where: str, count: int, interval: float) -> list[float]:
    conn = await b.connect(autocommit=False)
    received: list[tuple[float, bytes]] = []
    task = asyncio.create_task(_poller(conn, raw, received, count, time.monotonic() + 60))
    try:
        await asyncio.sleep(0.3)
        if where == "in-process":
            wconn = await b.connect(autocommit=True)
            sent = await _bare_writes(wconn, raw, count, interval)
            wconn.close()
        else:
            sent = await _subprocess_writer(b.mysql_url, raw, count, interval)
        await asyncio.wait_for(asyncio.shield(task), 15)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        conn.close()
    got = {decode(blob).content["seq"]: t for t, blob in received}
    return [got[i] - sent[i] for i in sent]


async def _poller(
    conn: Any, table: str, received: list[tuple[float, bytes]], count: float, until: float
) -> None:
    select = f"SELECT id, message FROM `{table}` ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED"
    async with conn.cursor() as cur:
        while len(received) < count and time.monotonic() < until:
            await conn.begin()
            await cur.execute(select)
            rows = await cur.fetchall()
            if rows:
                await cur.execute(f"DELETE FROM `{table}` WHERE id = %s", (rows[0][0],))
                await conn.commit()
                received.append((time.time(), bytes(rows[0][1])))
                continue
            await conn.commit()
            await asyncio.sleep(IDLE_INTERVAL)


async def _bare_writes(conn: Any, table: str, count: int, interval: float) -> dict[int, float]:
    sql = f"INSERT INTO `{table}` (destination, message, created) VALUES (%s, %s, %s)"
    sent: dict[int, float] = {}
    async with conn.cursor() as cur:
        for i, pause in enumerate(schedule(count, interval)):
            blob = encode(Message(DEST, {"seq": i}))
            await cur.execute(sql, (DEST, blob, int(time.time() * 1e6)))
            sent[i] = time.time()
            await asyncio.sleep(pause)
    return sent


async def _subprocess_writer(
    url: str, target: str, count: int, interval: float
) -> dict[int, float]:
    proc = await spawn("bench.latency", "write", url, target, str(count), str(interval))
    out, _ = await asyncio.wait_for(proc.communicate(), count * interval * 2 + 30)
    if proc.returncode:
        raise RuntimeError(f"writer subprocess failed with status {proc.returncode}")
    return {int(k): v for k, v in json.loads(out)["sent"].items()}


async def _idle(b: Bench, pipe: Pipe, raw: str, side: str, seconds: float) -> tuple[float, float]:
    reader = pipe.reader()
    conn = await b.connect(autocommit=False) if side == "baseline" else None
    try:
        q0 = await b.questions()
        c0, t0 = QueryCounter.count, time.monotonic()
        if conn is None:
            if await reader.next(timeout=seconds) is not None:
                raise RuntimeError("the idle reader found a message")
        else:
            await _poller(conn, raw, [], 1, time.monotonic() + seconds)
        elapsed, client = time.monotonic() - t0, QueryCounter.count - c0
        q1 = await b.questions()
    finally:
        await reader.close()
        if conn is not None:
            conn.close()
    return (q1 - q0 - 1) / elapsed, client / elapsed  # -1: the second SHOW counts itself


async def _write_main(url: str, target: str, count: int, interval: float) -> None:
    """The cross-process writer: our Writer (target "ours") or bare INSERTs into
    `target`; prints {"sent": {seq: time}} when done."""
    if target == "ours":
        pipe = Pipe(make_queue(QueueSettings.from_url(url)), MemoryStore())
        await pipe.connect()
        writer, sent = pipe.writer(), {}
        for i, pause in enumerate(schedule(count, interval)):
            await writer.insert(Message(DEST, {"seq": i}))
            sent[i] = time.time()
            await asyncio.sleep(pause)
        await pipe.close()
    else:
        b = Bench(url, "memcached://", 1, False, Console(stderr=True))
        conn = await b.connect(autocommit=True)
        sent = await _bare_writes(conn, target, count, interval)
        conn.close()
    sys.stdout.write(json.dumps({"sent": sent}) + "\n")


if __name__ == "__main__":
    if sys.argv[1:2] != ["write"]:
        raise SystemExit("usage: python -m bench.latency write URL ours|TABLE COUNT INTERVAL")
    a = sys.argv[2:]
    asyncio.run(_write_main(a[0], a[1], int(a[2]), float(a[3])))
