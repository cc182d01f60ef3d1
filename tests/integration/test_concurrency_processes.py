"""The concurrency limit across reader processes, on the real MariaDB and memcached
(issue 17): never more than k messages of a destination in flight at once, the
limit used to the full, and a process killed while holding places frees them when
its leases end, never before."""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import sys
import time
import uuid
from collections import defaultdict
from pathlib import Path

import orjson
import pytest

import mvalve_async
from mvalve_async import Message
from tests.acceptance.test_concurrency import most_overlapping
from tests.conftest import unique_tables
from tests.services import MEMCACHED_URL, MYSQL_URL, require_memcached, require_mysql

ROOT = Path(__file__).resolve().parents[2]
DESTS = [f"smtp-{k}" for k in range(5)]


def url_with(tables: object) -> str:
    t = tables  # a Tables
    return (
        f"{MYSQL_URL}?emergency={t.emergency[0]}&timed={t.timed[0]}"  # type: ignore[attr-defined]
        f"&normal={t.normal[0]}&dead={t.dead}"  # type: ignore[attr-defined]
    )


async def spawn(url: str, store: str, cfg: dict[str, float]) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.integration.concurrency_proc", url, store,
        orjson.dumps(cfg).decode(), cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 60)
    assert orjson.loads(line) == ["ready"]
    return proc


class Lines:
    """The lines the processes print, and a way to wait for enough of them."""

    def __init__(self) -> None:
        self.items: list[list[object]] = []
        self._cond = asyncio.Condition()

    async def collect(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            async with self._cond:
                self.items.append(orjson.loads(line))
                self._cond.notify_all()

    def count(self, kind: str) -> int:
        return sum(1 for x in self.items if x[0] == kind)

    async def until(self, kind: str, n: int) -> None:
        async with self._cond:
            await self._cond.wait_for(lambda: self.count(kind) >= n)


@pytest.mark.slow
async def test_four_processes_never_exceed_two_in_flight_per_destination() -> None:
    require_mysql()
    require_memcached()
    url = url_with(unique_tables("cc"))
    store = f"{MEMCACHED_URL}?namespace=cc{uuid.uuid4().hex[:10]}"
    per_dest, k, work = 40, 2, 0.1
    async with mvalve_async.open(url, store, create=True) as pipe:
        cfg = {"workers": 4, "work": work, "limit": k, "lease": 30.0}
        procs = [await spawn(url, store, cfg) for _ in range(4)]  # all ready: then the work
        await pipe.writer().insert_many([Message(d, i) for i in range(per_dest) for d in DESTS])
        out = Lines()
        readers = [asyncio.create_task(out.collect(p)) for p in procs]
        try:
            async with asyncio.timeout(60):
                await out.until("m", per_dest * len(DESTS))
        finally:
            for p in procs:
                assert p.stdin is not None
                p.stdin.close()
            for p in procs:
                await p.wait()
            await asyncio.gather(*readers)
        await pipe.queue.drop_schema()
    spans: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for kind, *rest in out.items:
        if kind == "m":
            dest, _content, *times = rest
            spans[str(dest)].append((float(times[0]), float(times[1])))  # type: ignore[arg-type]
    ops = sum(int(x[1]) for x in out.items if x[0] == "ops")  # type: ignore[call-overload]
    print(f"\nstore round trips per message: {ops / (per_dest * len(DESTS)):.2f}")
    for dest in DESTS:
        items = spans[dest]
        assert len(items) == per_dest
        assert most_overlapping(items) == k, dest  # never 3, and 2 used
        took = max(e for _, e in items) - min(s for s, _ in items)
        rate = len(items) / took
        gaps = _refill_gaps(items)
        gap = statistics.median(gaps)
        print(f"{dest}: {rate:.1f}/s, a freed place taken again after {gap * 1000:.1f} ms "
              f"(median), {sorted(gaps)[int(0.9 * len(gaps))] * 1000:.1f} ms (p90)")  # fmt: skip
        # 2 in flight, 0.1 s each: 20/s at most. A freed place is mostly taken again
        # at once by the worker that freed it (its next claim follows its settle):
        # 5-12 ms (median) here, 14-18.5/s. The p90 of about 100 ms is the refills
        # left to workers that found nothing and sleep serve's `poll` (0.1 s here);
        # were every refill left to them, the median would be about 50 ms and the
        # rate about 13/s. Judged on the median (this machine's load moves the rate
        # by 2/s from run to run).
        assert gap < 0.03, (dest, gaps)
        assert 12.0 <= rate <= 20.5, (dest, rate)


def _refill_gaps(items: list[tuple[float, float]]) -> list[float]:
    """For each message after the first k: how long after the latest end before its
    start (the place it took was free that long)."""
    ends = sorted(e for _, e in items)
    gaps = []
    for start, _ in sorted(items)[2:]:
        freed = [e for e in ends if e <= start]
        if freed:
            gaps.append(start - freed[-1])
    return gaps


@pytest.mark.slow
async def test_a_killed_process_frees_its_places_when_its_leases_end() -> None:
    require_mysql()
    require_memcached()
    url = url_with(unique_tables("ck"))
    store = f"{MEMCACHED_URL}?namespace=ck{uuid.uuid4().hex[:10]}"
    lease, k = 2.0, 2
    async with mvalve_async.open(url, store, create=True) as pipe:
        await pipe.writer().insert_many([Message("smtp", i) for i in range(6)])
        # the victim takes both places and keeps them (its work outlasts the test)
        victim = await spawn(url, store, {"workers": 2, "work": 60, "limit": k, "lease": lease})
        held = Lines()
        watcher = asyncio.create_task(held.collect(victim))
        async with asyncio.timeout(10):
            await held.until("start", k)
        victim.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        await victim.wait()
        watcher.cancel()
        taken = {x[2] for x in held.items if x[0] == "start"}
        other = await spawn(url, store, {"workers": 3, "work": 0.05, "limit": k, "lease": 30})
        out = Lines()
        reader = asyncio.create_task(out.collect(other))
        try:
            async with asyncio.timeout(30):
                await out.until("m", 6)
        finally:
            assert other.stdin is not None
            other.stdin.close()
            await other.wait()
            await reader
        lines = out.items
        starts = [float(x[3]) for x in lines if x[0] == "start"]  # type: ignore[arg-type]
        # nothing of the destination before the victim's leases (and places) ended:
        # it was the only destination, and both places were the victim's
        assert min(starts) >= killed + lease - 1.0 - 0.05, min(starts) - killed
        done = [(float(x[3]), float(x[4])) for x in lines if x[0] == "m"]  # type: ignore[arg-type]
        assert most_overlapping(done) <= k
        contents = sorted(x[2] for x in lines if x[0] == "m")  # type: ignore[type-var]
        assert contents == list(range(6))  # nothing lost: the victim's two came back
        assert taken <= set(contents)
        stats = await pipe.queue.stats(pipe.queue.clock.now())
        assert sum(stats.queued.values()) + sum(stats.leased.values()) == 0
        await pipe.queue.drop_schema()
