"""A reader process for the multi-process tests.

    python -m tests.integration.reader_proc QUEUE_URL STORE_URL OUT START END RATE_N RATE_PER

Waits until START (epoch), reads until END, writes one JSON line per delivery
(destination, delivered_at, id) to OUT, then the store's op count.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import orjson

import mvalve_async
from mvalve_async import Rate


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


if __name__ == "__main__":
    a = sys.argv[1:]
    asyncio.run(main(a[0], a[1], a[2], float(a[3]), float(a[4]), int(a[5]), float(a[6])))
