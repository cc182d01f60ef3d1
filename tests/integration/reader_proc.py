"""A reader process for the multi-process tests.

    python -m tests.integration.reader_proc QUEUE_URL STORE_URL OUT START END RATE_N RATE_PER

Waits until START (epoch), reads until END, writes one JSON line per delivery
(destination, delivered_at, id) to OUT, then the store's op count.

    python -m tests.integration.reader_proc --stream QUEUE_URL STORE_URL RATE_N RATE_PER

Driven by its parent through stdin/stdout, and judged on the host's monotonic clock
(system-wide, and left true when libfaketime shifts this process's wall clock):
connects, prints `["ready", wall - monotonic, clock offset, clock error]`, waits for
a line on stdin, then reads until the next line (or EOF), printing per delivery
`["d", destination, id, monotonic when next() returned, wall - monotonic,
delivered_at, clock error]`, every 0.5 s `["clock", monotonic, error, offset,
calibrations, wall - monotonic]`, and last `["end", calibrations, samples, refresh,
seconds since connected, store ops]`.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import orjson

import mvalve_async
from mvalve_async import Rate


def wall_minus_mono() -> float:
    """`time.time() - time.monotonic()`, read between two monotonic reads that are
    less than 0.2 ms apart: a process preempted between two plain reads (a loaded CI
    host) would report a shift of its wall clock that it never had."""
    for _ in range(20):
        before = time.monotonic()
        wall = time.time()
        after = time.monotonic()
        if after - before < 0.0002:
            break
    return wall - (before + after) / 2


async def main(queue_url: str, store_url: str, out: str, start: float, end: float,
               n: int, per: float) -> None:  # fmt: skip
    async with mvalve_async.open(queue_url, store_url) as pipe:
        reader = pipe.reader(rate=Rate(n, per=per), batch=4)
        await asyncio.sleep(max(0.0, start - time.time()))
        lines = []
        while (left := end - time.time()) > 0:
            msg = await reader.next(timeout=left)
            if msg is None:
                break
            lines.append(orjson.dumps([msg.destination, msg.delivered_at, msg.id, time.time()]))
        await reader.close()
        lines.append(orjson.dumps(["ops", pipe.store.ops]))
    await asyncio.to_thread(Path(out).write_bytes, b"\n".join(lines) + b"\n")


def emit(item: list[object]) -> None:
    sys.stdout.buffer.write(orjson.dumps(item) + b"\n")
    sys.stdout.buffer.flush()


async def stream(queue_url: str, store_url: str, n: int, per: float) -> None:
    async with mvalve_async.open(queue_url, store_url) as pipe:
        clock = pipe.queue.clock
        connected = time.monotonic()
        reader = pipe.reader(rate=Rate(n, per=per), batch=4)
        offset = lambda: getattr(clock, "offset", 0.0)  # noqa: E731  (LocalClock: 0)
        emit(["ready", wall_minus_mono(), offset(), clock.error])
        await asyncio.to_thread(sys.stdin.readline)  # "go"
        stop = asyncio.create_task(asyncio.to_thread(sys.stdin.readline))

        async def watch() -> None:
            while True:
                calibrations = getattr(clock, "calibrations", 0)
                mono = time.monotonic()
                emit(["clock", mono, clock.error, offset(), calibrations, wall_minus_mono()])
                await asyncio.sleep(0.5)

        watcher = asyncio.create_task(watch())
        while not stop.done():
            msg = await reader.next(timeout=0.2)
            if msg is not None:
                at = time.monotonic()
                emit(["d", msg.destination, msg.id, at, wall_minus_mono(), msg.delivered_at,
                      clock.error])  # fmt: skip
        await reader.close()
        watcher.cancel()
        elapsed = time.monotonic() - connected
        emit(["end", getattr(clock, "calibrations", 0), getattr(clock, "samples", 0),
              getattr(clock, "refresh", 0.0), elapsed, pipe.store.ops])  # fmt: skip


if __name__ == "__main__":
    a = sys.argv[1:]
    if a[0] == "--stream":
        asyncio.run(stream(a[1], a[2], int(a[3]), float(a[4])))
    else:
        asyncio.run(main(a[0], a[1], a[2], float(a[3]), float(a[4]), int(a[5]), float(a[6])))
