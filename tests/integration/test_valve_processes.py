"""The valve across reader processes sharing memcached, on the real MariaDB."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import orjson
import pytest

import mvalve_async
from mvalve_async import Message
from tests.conftest import unique_tables
from tests.ledger import max_in_window
from tests.services import MEMCACHED_URL, MYSQL_URL, require_memcached, require_mysql

ROOT = Path(__file__).resolve().parents[2]


def url_with(tables: object) -> str:
    t = tables  # a Tables
    return (
        f"{MYSQL_URL}?emergency={t.emergency[0]}&timed={t.timed[0]}"  # type: ignore[attr-defined]
        f"&normal={t.normal[0]}&dead={t.dead}"  # type: ignore[attr-defined]
    )


def spawn(args: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.integration.reader_proc", *args],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip


def read_out(path: Path) -> tuple[list[list[object]], int]:
    rows, ops = [], 0
    for line in path.read_bytes().splitlines():
        item = orjson.loads(line)
        if item[0] == "ops":
            ops = item[1]
        else:
            rows.append(item)
    return rows, ops


@pytest.mark.slow
async def test_three_processes_share_the_rate_exactly(tmp_path: Path) -> None:
    require_mysql()
    require_memcached()
    url = url_with(unique_tables("p"))
    store = f"{MEMCACHED_URL}?namespace=t{uuid.uuid4().hex[:10]}"
    dests, n, per, seconds = [f"dest-{k}" for k in range(5)], 10, 1.0, 10.0
    async with mvalve_async.open(url, store, create=True) as pipe:
        await pipe.writer().insert_many(
            [Message(d, i) for i in range(int(n * seconds) + 30) for d in dests]
        )
        start = time.time() + 2.0  # the processes import and connect meanwhile
        end = start + seconds
        outs = [tmp_path / f"r{i}.jsonl" for i in range(3)]
        procs = [spawn([url, store, str(o), str(start), str(end), str(n), str(per)]) for o in outs]
        for p in procs:
            assert p.wait(timeout=60) == 0
        rows: list[list[object]] = []
        ops = 0
        for o in outs:
            r, k = read_out(o)
            rows += r
            ops += k
        ids = Counter(r[2] for r in rows)
        assert max(ids.values()) == 1  # none twice
        by_dest: dict[str, list[float]] = {}
        for dest, at, _, _ in rows:
            by_dest.setdefault(dest, []).append(at)  # type: ignore[arg-type]
        worst = {d: max_in_window(ts, per) for d, ts in by_dest.items()}
        ideal = len(dests) * n * seconds
        total = len(rows)
        print(f"\nworst window per destination: {worst} (limit {n}); "
              f"delivered {total} vs ideal {ideal:.0f} ({total / ideal:.1%}); "
              f"memcached ops per delivery {ops / total:.2f}")  # fmt: skip
        assert all(v <= n for v in worst.values()), worst
        assert total >= 0.95 * ideal
        assert all(len(ts) <= n * seconds for ts in by_dest.values())
        # what remains is still there: nothing lost
        st = await pipe.queue.stats(time.time())
        left = sum(st.queued.values()) + sum(st.leased.values())
        assert left + total == len(dests) * (int(n * seconds) + 30)
        await pipe.queue.drop_schema()


@pytest.mark.slow
async def test_memcached_restart_mid_run_never_exceeds_and_loses_nothing(
    tmp_path: Path,
) -> None:
    """memcached restarts inside a rate window: the schedule is lost, yet the
    window that held the forgotten deliveries must not get more (the restarted
    server's young uptime holds the records made afresh for a window)."""
    from mvalve_async.tuning import UPTIME_SLACK
    from tests.memcached_proc import MemcachedProcess

    require_mysql()
    server = MemcachedProcess(tmp_path)
    server.start()
    n, per = 5, 2.0
    # a server that just started holds new records for a window too: let it age
    await asyncio.sleep(UPTIME_SLACK + per - 1.0)
    url = url_with(unique_tables("m"))
    store = f"memcached://127.0.0.1:{server.port}?namespace=r"
    pipes = [mvalve_async.open(url, store, create=True) for _ in range(2)]
    try:
        for p in pipes:
            await p.connect()
        writer = pipes[0].writer()
        await writer.insert_many([Message("d", i) for i in range(10)])
        got: list[Message] = []
        t0 = time.time()
        restarted = asyncio.Event()

        async def consume(p: mvalve_async.Pipe) -> None:
            async with p.reader(rate=mvalve_async.Rate(n, per=per), batch=2) as reader:
                while (left := t0 + 10.0 - time.time()) > 0:
                    msg = await reader.next(timeout=left)
                    if msg is not None:
                        got.append(msg)

        async def chaos() -> None:
            await asyncio.sleep(0.6)
            server.stop()  # schedule state is lost...
            down = time.time()
            await asyncio.sleep(0.3)
            server.start()  # ...and back well inside the first window
            restarted.set()
            await writer.insert_many([Message("d", 100 + i) for i in range(10)])
            return down

        down_at, *_ = await asyncio.gather(chaos(), *(consume(p) for p in pipes))
        assert restarted.is_set()
        ids = Counter(m.id for m in got)
        assert max(ids.values()) == 1
        stamps = [m.delivered_at for m in got]
        assert max_in_window(stamps, per) <= n, sorted(s - t0 for s in stamps)
        assert not [m for m in got if down_at < m.delivered_at < down_at + 0.3]
        assert any(m.content >= 100 for m in got)  # it recovered
        st = await pipes[0].queue.stats(time.time())
        assert len(got) + sum(st.queued.values()) + sum(st.leased.values()) == 20
        await pipes[0].queue.drop_schema()
    finally:
        for p in pipes:
            await p.close()
        server.stop()
