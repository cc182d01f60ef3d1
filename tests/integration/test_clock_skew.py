"""The rate holds when the readers' hosts disagree on the time (issue 15).

Three reader processes share memcached and one MariaDB queue: 5 destinations x 80
messages at Rate(10, 1), ideally drained in 7 s. One process runs under libfaketime
with its wall clock shifted (+-50 ms, +-500 ms) or stepping back (or forward) by a
second mid-run; its monotonic clock is left true (FAKETIME_DONT_FAKE_MONOTONIC=1).
Each delivery is stamped in its process with `time.monotonic()` when `next()`
returned: the host's monotonic clock is system-wide, so windows are judged on true
time. The valve keeps time on the queue server's clock (clock.py), so the shifted
process must change nothing: no window over the limit, every message once, and the
drain as fast as the unskewed baseline's (run first, in this module).

Each process reports `time.time() - time.monotonic()`, so the shift it really saw is
measured against this (unfaked) process's, and its ServerClock's offset and error
bound; the runs print the error bound, the refresh cost (queries per second per
process) and the drain's ratio to the ideal.
"""

from __future__ import annotations

import asyncio
import math
import os
import statistics
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import pytest

import mvalve_async
from mvalve_async import Message
from tests.conftest import unique_tables
from tests.integration.reader_proc import wall_minus_mono
from tests.integration.test_valve_processes import url_with
from tests.ledger import LINES, max_in_window, windows_over
from tests.services import MEMCACHED_URL, require_memcached, require_mysql

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
LIBFAKETIME = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"  # Debian's faketime
DESTS = [f"dest-{k}" for k in range(5)]
PER_DEST, N, PER = 80, 10, 1.0
IDEAL = (PER_DEST / N - 1) * PER  # n at once, then n per period: the last at 7 s
PROCS = 3
FAKED = 0  # the index of the process whose clock is shifted
TIMEOUT = 4 * IDEAL + 20  # a run that takes longer has failed anyway


@dataclass
class Proc:
    ready: list[float] = field(default_factory=list)  # wall - mono, offset, error
    # mono, error, offset, calibrations, wall - mono: every 0.5 s
    clock: list[tuple[float, float, float, int, float]] = field(default_factory=list)
    end: list[float] = field(default_factory=list)  # calibrations, samples, refresh, s, ops
    stderr: str = ""
    returncode: int | None = None

    @property
    def queries_per_second(self) -> float:
        if not self.end:  # it did not finish
            return math.nan
        calibrations, samples, _, seconds, _ = self.end
        return calibrations * samples / seconds


@dataclass
class Delivery:
    proc: int
    destination: str
    id: str
    mono: float  # when next() returned, on the host's monotonic clock
    wall: float  # that process's time.time() - time.monotonic() then
    delivered_at: float  # on the valve's clock (the server's)
    error: float  # that process's clock error bound then


@dataclass
class Run:
    label: str
    ref: float  # this process's time.time() - time.monotonic(): the unfaked wall clock
    inserted: list[str]
    procs: list[Proc]
    deliveries: list[Delivery] = field(default_factory=list)
    go: float = 0.0
    left: int = -1
    dead: int = -1

    @property
    def drain(self) -> float:
        return max((d.mono for d in self.deliveries), default=math.nan) - self.go

    def stamps(self) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {}
        for d in self.deliveries:
            out.setdefault(d.destination, []).append(d.mono)
        return {k: sorted(v) for k, v in out.items()}

    def over(self) -> int:
        return sum(windows_over(ts, N, PER) for ts in self.stamps().values())

    def worst(self) -> int:
        return max((max_in_window(ts, PER) for ts in self.stamps().values()), default=0)

    def shift(self, proc: int) -> list[float]:
        """The wall-clock shift process `proc` saw at each of its deliveries."""
        return [d.wall - self.ref for d in self.deliveries if d.proc == proc]

    def report(self) -> str:
        errors = [c[1] for p in self.procs for c in p.clock] or [math.nan]
        offsets = [p.ready[1] if p.ready else math.nan for p in self.procs]
        qps = [p.queries_per_second for p in self.procs]
        cal = [int(p.end[0]) if p.end else -1 for p in self.procs]
        samples, refresh = self.procs[0].end[1:3] if self.procs[0].end else (math.nan,) * 2
        line = (
            f"clock-skew[{self.label}]: delivered {len(self.deliveries)}/{len(self.inserted)}, "
            f"over the limit {self.over()}, worst window {self.worst()}/{N}, "
            f"drain {self.drain:.3f} s = {self.drain / IDEAL:.3f} x ideal; "
            f"clock error ms min/median/max {min(errors) * 1e3:.3f}/"
            f"{statistics.median(errors) * 1e3:.3f}/{max(errors) * 1e3:.3f}; "
            f"offsets at start (server - wall) ms {[round(o * 1e3, 3) for o in offsets]}; "
            f"calibrations {cal} ({samples:.0f} samples each, refresh {refresh:g} s) = "
            f"{[round(q, 2) for q in qps]} queries/s per process"
        )
        LINES.append(line)
        return line


def require_faketime() -> None:
    """Outside CI a host without Debian's faketime skips; in CI (`.ci/run` installs
    it) a skip fails (tests/ci_skips.py)."""
    if not Path(LIBFAKETIME).is_file():
        pytest.skip(f"{LIBFAKETIME} is missing: apt-get install faketime")


def faketime_env(**extra: str) -> dict[str, str]:
    return {"LD_PRELOAD": LIBFAKETIME, "FAKETIME_DONT_FAKE_MONOTONIC": "1", **extra}


async def spawn(url: str, store: str, env: dict[str, str]) -> asyncio.subprocess.Process:
    args = ["-m", "tests.integration.reader_proc", "--stream", url, store, str(N), str(PER)]
    pipe = asyncio.subprocess.PIPE
    return await asyncio.create_subprocess_exec(
        sys.executable, *args, cwd=ROOT, env=env, stdin=pipe, stdout=pipe, stderr=pipe
    )


async def run(
    label: str,
    faked: dict[str, str] | None,
    on_progress: Callable[[int], None] | None = None,
) -> Run:
    """One drain: insert, start the processes (process FAKED with `faked` in its
    environment), let them go together, stop them when every message is out."""
    url = url_with(unique_tables("k"))
    store = f"{MEMCACHED_URL}?namespace=k{uuid.uuid4().hex[:10]}"
    async with mvalve_async.open(url, store, create=True) as pipe:
        try:
            inserted = await pipe.writer().insert_many(
                [Message(d, i) for i in range(PER_DEST) for d in DESTS]
            )
            result = Run(label, wall_minus_mono(), inserted, [])
            await _drive(result, url, store, faked, on_progress)
            st = await pipe.queue.stats(pipe.queue.clock.now())
            result.left = sum(st.queued.values()) + sum(st.leased.values())
            result.dead = st.dead
        finally:
            await pipe.queue.drop_schema()
    print("\n" + result.report())
    return result


async def _drive(
    result: Run,
    url: str,
    store: str,
    faked: dict[str, str] | None,
    on_progress: Callable[[int], None] | None,
) -> None:
    base = {**os.environ, "PYTHONPATH": str(ROOT)}
    envs = [{**base, **(faked or {})} if i == FAKED else base for i in range(PROCS)]
    procs = [await spawn(url, store, env) for env in envs]
    result.procs = [Proc() for _ in procs]
    ready = [asyncio.Event() for _ in procs]
    drained = asyncio.Event()
    total = len(result.inserted)

    async def read(i: int, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        state = result.procs[i]
        async for line in proc.stdout:
            item = orjson.loads(line)
            if item[0] == "d":
                result.deliveries.append(Delivery(i, *item[1:]))
                if on_progress is not None:
                    on_progress(len(result.deliveries))
                if len(result.deliveries) >= total:
                    drained.set()
            elif item[0] == "clock":
                state.clock.append(tuple(item[1:]))
            elif item[0] == "ready":
                state.ready = item[1:]
                ready[i].set()
            elif item[0] == "end":
                state.end = item[1:]

    async def errors(i: int, proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr is not None
        result.procs[i].stderr = (await proc.stderr.read()).decode(errors="replace")

    readers = [asyncio.create_task(read(i, p)) for i, p in enumerate(procs)]
    readers += [asyncio.create_task(errors(i, p)) for i, p in enumerate(procs)]
    try:
        # every process connected and calibrated, or one ended (it failed to start)
        waits = [asyncio.create_task(e.wait()) for e in ready]
        started = asyncio.gather(*waits)
        await asyncio.wait([started, *readers], timeout=60, return_when=asyncio.FIRST_COMPLETED)
        if not started.done():
            started.cancel()
            await asyncio.gather(started, return_exceptions=True)
            for p in procs:
                p.kill()
            await asyncio.gather(*readers)
            stderr = [p.stderr for p in result.procs]
            raise AssertionError(f"a reader process did not start: {stderr}")
        result.go = time.monotonic()
        for p in procs:
            assert p.stdin is not None
            p.stdin.write(b"go\n")
        await asyncio.wait_for(drained.wait(), TIMEOUT)
    except TimeoutError:
        pass  # the assertions say what is missing
    finally:
        for p in procs:
            assert p.stdin is not None
            if not p.stdin.is_closing():
                p.stdin.write(b"stop\n")
                p.stdin.close()
        for i, p in enumerate(procs):
            try:
                result.procs[i].returncode = await asyncio.wait_for(p.wait(), 30)
            except TimeoutError:
                p.kill()
                await p.wait()
        await asyncio.gather(*readers)


def check(r: Run, baseline: Run | None = None) -> None:
    assert all(p.returncode == 0 for p in r.procs), [p.stderr for p in r.procs]
    ids = Counter(d.id for d in r.deliveries)
    assert set(ids) == set(r.inserted), "some messages were not delivered"
    assert max(ids.values()) == 1, [i for i, c in ids.items() if c > 1]
    assert r.left == 0 and r.dead == 0, (r.left, r.dead)
    assert r.over() == 0, {k: max_in_window(v, PER) for k, v in r.stamps().items()}
    # every process took part, and each process's clock was calibrated on the server's
    assert all(sum(1 for d in r.deliveries if d.proc == i) > 20 for i in range(PROCS))
    assert all(p.end[0] >= 1 for p in r.procs)
    assert all(0 < c[1] < 0.005 for p in r.procs for c in p.clock), "error bound"
    if baseline is not None:
        assert r.drain <= 1.15 * baseline.drain, (r.drain, baseline.drain)


@pytest.fixture(scope="module")
def baseline() -> Run:
    require_faketime()  # only the faked runs need it
    require_mysql()
    require_memcached()
    r = asyncio.run(run("none", None))
    check(r)
    for i in range(PROCS):
        assert all(abs(s) < 0.002 for s in r.shift(i))
    return r


def test_ci_installs_libfaketime() -> None:
    """`.ci/run` installs Debian's faketime, which brings LIBFAKETIME."""
    assert "need+=(faketime)" in (ROOT / ".ci" / "run").read_text()
    require_faketime()


@pytest.mark.parametrize("skew", [0.05, -0.05, 0.5, -0.5], ids=lambda s: f"{s:+g}s")
def test_one_skewed_reader_keeps_the_rate(baseline: Run, skew: float) -> None:
    require_faketime()
    r = asyncio.run(run(f"{skew:+g}s", faketime_env(FAKETIME=f"{skew:+g}")))
    check(r, baseline)
    # the faked process really was skewed, the others not
    assert all(abs(s - skew) < 0.002 for s in r.shift(FAKED))
    assert all(abs(s) < 0.002 for i in range(PROCS) if i != FAKED for s in r.shift(i))
    # its ServerClock saw it: server - wall is `skew` lower than the others'
    offsets = [p.ready[1] for p in r.procs]
    assert offsets[FAKED] - offsets[1] == pytest.approx(-skew, abs=0.003)
    # and said so once when the skew is past the threshold (0.1 s), else not at all
    warned = [p.stderr.count("this host's clock is") for p in r.procs]
    assert warned == ([1, 0, 0] if abs(skew) > 0.1 else [0, 0, 0]), warned


@pytest.mark.parametrize("step", [-1.0, 1.0], ids=["back-1s", "forward-1s"])
def test_a_reader_whose_clock_steps_mid_run_keeps_the_rate(
    baseline: Run, tmp_path: Path, step: float
) -> None:
    """libfaketime re-reads FAKETIME_TIMESTAMP_FILE on every call with
    FAKETIME_NO_CACHE=1: rewriting it steps the process's wall clock for real."""
    require_faketime()
    offset = tmp_path / "faketime"
    offset.write_text("+0\n")
    stepped_at: list[int] = []

    def step_at_a_third(delivered: int) -> None:
        if not stepped_at and delivered >= len(DESTS) * PER_DEST // 3:
            new = tmp_path / "faketime.new"
            new.write_text(f"{step:+g}\n")
            new.replace(offset)  # atomically: the process never reads half a file
            stepped_at.append(delivered)

    env = faketime_env(FAKETIME_TIMESTAMP_FILE=str(offset), FAKETIME_NO_CACHE="1")
    r = asyncio.run(run(f"step{step:+g}s", env, step_at_a_third))
    check(r, baseline)
    assert stepped_at
    # the step was real to the process: its wall clock read the step mid-run...
    walls = [round(c[4] - r.ref, 3) for c in r.procs[FAKED].clock]
    assert walls[0] == 0.0 and walls[-1] == step, walls
    assert set(walls) == {0.0, step}, walls
    # ...and it kept serving on both sides of it
    shifts = r.shift(FAKED)
    before = [s for s in shifts if abs(s) < 0.002]
    after = [s for s in shifts if abs(s - step) < 0.002]
    assert len(before) + len(after) == len(shifts), shifts
    assert len(before) > 10 and len(after) > 10, (len(before), len(after))
