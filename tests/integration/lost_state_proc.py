"""A reader process for the lost-state tests: a brand-new process, that never saw
the store before.

    python -m tests.integration.lost_state_proc QUEUE_URL STORE_URL RATE_N RATE_PER COUNT SECONDS

Prints JSON lines as they happen: ``["ready", wall time]`` once connected, then
``["d", destination, content, delivered_at, wall time]`` per delivery, and
``["end", deliveries]``; exits after COUNT deliveries or SECONDS seconds.
"""

from __future__ import annotations

import asyncio
import sys
import time

import orjson

import mvalve_async
from mvalve_async import Rate


def emit(item: list[object]) -> None:
    sys.stdout.buffer.write(orjson.dumps(item) + b"\n")
    sys.stdout.buffer.flush()


async def main(queue_url: str, store_url: str, n: int, per: float, count: int,
               seconds: float) -> None:  # fmt: skip
    async with mvalve_async.open(queue_url, store_url) as pipe:
        reader = pipe.reader(rate=Rate(n, per=per), batch=4)
        emit(["ready", time.time()])
        got = 0
        ends = time.monotonic() + seconds
        while got < count and (left := ends - time.monotonic()) > 0:
            msg = await reader.next(timeout=left)
            if msg is not None:
                got += 1
                emit(["d", msg.destination, msg.content, msg.delivered_at, time.time()])
        await reader.close()
        emit(["end", got])


if __name__ == "__main__":
    a = sys.argv[1:]
    asyncio.run(main(a[0], a[1], int(a[2]), float(a[3]), int(a[4]), float(a[5])))
