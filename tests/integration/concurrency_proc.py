"""A serving process for the concurrency-limit tests.

    python -m tests.integration.concurrency_proc QUEUE_URL STORE_URL CONFIG_JSON

CONFIG: {"workers": N, "work": seconds per message, "limit": k, "lease": s}. Runs
`pipe.serve` with N workers, each message "processed" for `work` seconds; prints
`["ready"]`, then per message `["m", destination, content, start, end]` (monotonic,
system-wide) as it finishes, and `["start", destination, content, start]` as it
begins (so a process killed mid-work has told what it held). Stops at EOF on stdin.
"""

from __future__ import annotations

import asyncio
import sys
import time

import orjson

import mvalve_async
from mvalve_async import Message


def emit(item: list[object]) -> None:
    sys.stdout.buffer.write(orjson.dumps(item) + b"\n")
    sys.stdout.buffer.flush()


async def main(queue_url: str, store_url: str, cfg: dict[str, float]) -> None:
    async with mvalve_async.open(queue_url, store_url) as pipe:
        stop = asyncio.Event()

        async def handle(msg: Message) -> None:
            start = time.monotonic()
            emit(["start", msg.destination, msg.content, start])
            await asyncio.sleep(cfg["work"])
            emit(["m", msg.destination, msg.content, start, time.monotonic()])

        async def until_eof() -> None:
            await asyncio.to_thread(sys.stdin.read)
            stop.set()

        waiter = asyncio.create_task(until_eof())
        emit(["ready"])
        await pipe.serve(
            handle, concurrency=int(cfg["workers"]), stop=stop, poll=0.1,
            concurrency_limit=int(cfg["limit"]), lease=cfg["lease"],
        )  # fmt: skip
        waiter.cancel()
        emit(["ops", pipe.store.ops])  # type: ignore[attr-defined]


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], orjson.loads(sys.argv[3])))
