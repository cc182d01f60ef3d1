"""Soak: 2 writers and 4 readers under random faults; the ledger must stay clean.

MVALVE_SOAK_SECONDS sets the length (default 30)."""

from __future__ import annotations

import asyncio
import os
import random
import time
from pathlib import Path
from typing import Any

import aiomysql

import mvalve_async
from mvalve_async import Message, MvalveError, Rate
from tests.faults.test_innodb_faults import pool_thread_ids, with_tables
from tests.ledger import Ledger, windows_over
from tests.mariadb_proc import MariaDBProcess
from tests.memcached_proc import MemcachedProcess

SECONDS = float(os.environ.get("MVALVE_SOAK_SECONDS", "30"))
RATE = Rate(20, per=1.0)


async def test_soak_random_faults(private_mariadb: MariaDBProcess, tmp_path: Path) -> None:
    memcached = MemcachedProcess(tmp_path)
    memcached.start()
    url = with_tables(private_mariadb.url, "soak")
    store = f"memcached://127.0.0.1:{memcached.port}?namespace=soak"
    ledger = Ledger()
    stamps: dict[str, list[float]] = {}
    faults: list[str] = []
    seen: list[tuple[float, str, str, str | None, int]] = []  # what each delivery was
    timeline: list[tuple[float, str]] = []
    stop = asyncio.Event()
    rng = random.Random(2026)
    pipes = [mvalve_async.open(url, store, create=True) for _ in range(6)]
    for p in pipes:
        await p.connect()

    async def writer(p: mvalve_async.Pipe, w: int) -> None:
        i = 0
        while not stop.is_set():
            batch = [Message(f"dest-{rng.randrange(8)}", [w, i + k]) for k in range(5)]
            i += 5
            for m in batch:
                ledger.attempt(m)
            try:
                await p.writer().insert_many(batch)
            except MvalveError:
                await asyncio.sleep(0.1)
                continue
            for m in batch:
                ledger.acked(m)
            await asyncio.sleep(0.05)

    async def reader(p: mvalve_async.Pipe) -> None:
        async with p.reader(rate=RATE, lease=2.0, batch=4) as r:
            while not stop.is_set():
                try:
                    async with r.receive(timeout=0.5) as msg:
                        if msg is None:
                            continue
                        stamps.setdefault(msg.destination, []).append(msg.delivered_at or 0)
                        seen.append((msg.delivered_at or 0, msg.destination, msg.id, msg.lane,
                                     msg.deliveries))  # fmt: skip
                        if rng.random() < 0.02:
                            raise RuntimeError("handler failed")
                        ledger.delivered(msg, throttled=False)
                except RuntimeError:
                    pass
                except MvalveError:
                    await asyncio.sleep(0.1)

    readers: list[asyncio.Task[None]] = []

    async def chaos() -> None:
        admin: Any = None
        while not stop.is_set():
            await asyncio.sleep(rng.uniform(2.0, 5.0))
            if stop.is_set():
                break
            fault = rng.choice(["kill-conn", "kill-db", "kill-memcached", "cancel-reader"])
            faults.append(fault)
            timeline.append((time.time(), fault))
            if fault == "kill-conn":
                try:
                    admin = admin or await aiomysql.connect(
                        host="127.0.0.1", port=private_mariadb.port, user="root", autocommit=True
                    )
                    async with admin.cursor() as cur:
                        for p in pipes:
                            for tid in pool_thread_ids(p)[:2]:
                                await cur.execute(f"KILL CONNECTION {tid}")
                except aiomysql.Error:
                    admin = None
            elif fault == "kill-db":
                await asyncio.to_thread(private_mariadb.kill)
                admin = None
                await asyncio.sleep(0.5)
                await asyncio.to_thread(private_mariadb.start)
            elif fault == "kill-memcached":
                await asyncio.to_thread(memcached.stop)
                await asyncio.sleep(0.5)
                await asyncio.to_thread(memcached.start)
            else:
                k = rng.randrange(len(readers))
                readers[k].cancel()
                await asyncio.gather(readers[k], return_exceptions=True)
                readers[k] = asyncio.create_task(reader(pipes[2 + k]))
        if admin is not None:
            admin.close()

    try:
        writers = [asyncio.create_task(writer(pipes[w], w)) for w in range(2)]
        readers.extend(asyncio.create_task(reader(pipes[2 + k])) for k in range(4))
        chaos_task = asyncio.create_task(chaos())
        await asyncio.sleep(SECONDS)
        stop.set()
        await asyncio.gather(*writers, chaos_task)
        await asyncio.gather(*readers, return_exceptions=True)
        exceed = sum(windows_over(sorted(t), RATE.n, RATE.per) for t in stamps.values())
        t0 = time.monotonic()
        async with pipes[0].reader(lease=5.0) as drain:  # no rate: collect the rest
            while (msg := await drain.next(timeout=2.0)) is not None:
                ledger.delivered(msg, throttled=False)
        drained = time.monotonic() - t0
    finally:
        for p in pipes:
            await p.close()
        memcached.stop()
    report = ledger.check()
    report.exceedances = exceed
    print("\n" + report.line(f"soak {SECONDS:.0f}s"), f"faults {faults} drain {drained:.1f}s")
    if exceed:  # what a reader of the CI log needs to find the cause
        print("faults at", [(f, round(t, 3)) for t, f in timeline])
        for dest, times in stamps.items():
            times.sort()
            lo = 0
            for hi, t in enumerate(times):
                while times[lo] <= t - RATE.per:
                    lo += 1
                if hi - lo + 1 > RATE.n:
                    print(f"over in {dest}: {hi - lo + 1} in [{times[lo]:.3f}, {t:.3f}]")
                    for x in sorted(s for s in seen if s[1] == dest and times[lo] <= s[0] <= t):
                        print("   ", round(x[0], 4), *x[2:])
    assert len(faults) >= 5
    assert report.lost == 0 and report.unexpected == 0 and report.exceedances == 0
    assert report.acknowledged > 1000
