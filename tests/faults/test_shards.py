"""Shards on two real MariaDB servers (the main one and a private one this test may
kill), a memcached store, four readers each with its own pipe: the valve holds
across shards, a killed shard does not stop the other, and it is served again
once restarted. Checked by the ledger (tests/ledger.py)."""

from __future__ import annotations

import asyncio
import time
import uuid
from urllib.parse import urlsplit

import pytest

import mvalve_async
from mvalve_async import Message, QueueUnavailable, Rate
from mvalve_async.queues.sharded import ShardedQueue
from tests.conftest import unique_tables
from tests.ledger import Ledger
from tests.mariadb_proc import MariaDBProcess
from tests.services import MYSQL_URL, require_memcached, require_mysql

RATE = Rate(10, per=1.0)
READERS = 4


def sharded_url(private: MariaDBProcess) -> str:
    main = urlsplit(MYSQL_URL)
    t = unique_tables("sh")
    return (
        f"mysql+innodb://root@{main.hostname}:{main.port or 3306},127.0.0.1:{private.port}"
        f"/test?emergency={t.emergency[0]}&timed={t.timed[0]}&normal={t.normal[0]}&dead={t.dead}"
    )


def pick(queue: ShardedQueue, shard: int, count: int) -> list[str]:
    names = [d for d in (f"carrier-{i}" for i in range(200)) if queue.shard_of(d) == shard]
    return names[:count]


@pytest.mark.slow
async def test_shards_keep_the_valve_and_survive_one_server_dying(
    private_mariadb: MariaDBProcess,
) -> None:
    require_mysql()
    require_memcached()
    url = sharded_url(private_mariadb)
    store = f"memcached://127.0.0.1:11211?namespace=shards-{uuid.uuid4().hex[:8]}"
    ledger = Ledger()
    seen: dict[str, list[float]] = {}  # destination -> when each delivery was handed out
    dest_of: dict[str, str] = {}  # message id -> destination

    async with mvalve_async.open(url, store, create=True) as writer_pipe:
        queue = writer_pipe.queue
        assert isinstance(queue, ShardedQueue)
        live_dests = pick(queue, 0, 3)  # on the main server
        dying_dests = pick(queue, 1, 2)  # on the private server, killed below
        dests = live_dests + dying_dests
        writer = writer_pipe.writer()

        async def write(count: int) -> None:
            batch = [Message(d, {"n": i}) for i in range(count) for d in dests]
            for m in batch:
                ledger.attempt(m)
                dest_of[m.id] = m.destination
            await writer.insert_many(batch)
            for m in batch:
                ledger.acked(m)

        stop, progress = asyncio.Event(), asyncio.Event()
        pipes = [mvalve_async.open(url, store) for _ in range(READERS)]

        async def consume(pipe: mvalve_async.Pipe) -> None:
            async with pipe, pipe.reader(rate=RATE, lease=10.0, batch=8) as reader:
                while not stop.is_set():
                    msg = await reader.next(timeout=0.2)
                    if msg is not None:
                        ledger.delivered(msg)
                        seen.setdefault(msg.destination, []).append(time.time())
                        progress.set()

        async def delivered_all(limit: float) -> None:
            async with asyncio.timeout(limit):
                while not ledger.acknowledged <= set(ledger.deliveries):
                    progress.clear()
                    await progress.wait()

        readers = [asyncio.create_task(consume(p)) for p in pipes]
        try:
            # 1. The valve over both shards: 40 per destination at 10/s, about 4 s.
            t0 = time.monotonic()
            await write(40)
            await delivered_all(30)
            phase1 = ledger.check(RATE)
            print("\n" + phase1.line("2 shards, 4 readers, 5 destinations at 10/s"),
                  f"in {time.monotonic() - t0:.1f} s")  # fmt: skip
            assert phase1.delivered == phase1.acknowledged == 200
            assert phase1.lost == phase1.unexpected == phase1.duplicated == 0
            assert phase1.exceedances == 0
            assert time.monotonic() - t0 >= 3.0  # rate-bound, not a burst

            # 2. Kill the private server mid-backlog: the main one keeps serving.
            await write(40)
            await asyncio.sleep(0.5)
            await asyncio.to_thread(private_mariadb.kill)
            killed = time.time()
            await asyncio.sleep(3.0)
            # writers: the dead shard's destinations fail, never re-routed; the others work
            with pytest.raises(QueueUnavailable):
                await writer.insert(Message(dying_dests[0], "during the outage"))
            late = Message(live_dests[0], "during the outage")
            ledger.attempt(late)
            await writer.insert(late)
            ledger.acked(late)
            during = {d: [t for t in seen.get(d, []) if t > killed + 0.5] for d in dests}
            restarted = time.time()
            await asyncio.to_thread(private_mariadb.start)
            restarted_at = time.time()

            # 3. Restarted: its backlog is delivered too.
            await delivered_all(60)
            after = {d: [t for t in seen.get(d, []) if t > restarted_at] for d in dying_dests}
        finally:
            stop.set()
            await asyncio.gather(*readers, return_exceptions=True)

        report = ledger.check(RATE)
        print(report.line("one shard killed for ~4 s, then restarted"),
              f"(live shard deliveries while down: {sum(len(during[d]) for d in live_dests)},"
              f" dead shard's after restart: {sum(map(len, after.values()))},"
              f" restart took {restarted_at - restarted:.1f} s)")  # fmt: skip
        for d in live_dests:  # served at its rate while the other shard was down
            assert len(during[d]) >= 10, (d, {k: len(v) for k, v in during.items()})
        for d in dying_dests:  # picked up again after the restart
            assert after[d], d
        assert report.lost == report.unexpected == 0
        assert report.exceedances == 0
        assert report.delivered == report.acknowledged == 401
        # A duplicate is possible only after the fault (an ack that could not reach the
        # killed server before the lease expired), and only for its destinations.
        twice = {dest_of[m] for m, c in ledger.deliveries.items() if c > 1}
        assert twice <= set(dying_dests), twice
        for shard in queue.shards:  # the writer's pipe sees the server back, then cleans up
            if shard.probe is not None:
                await asyncio.wait_for(shard.probe, 15)
        await queue.drop_schema()
