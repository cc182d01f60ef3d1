"""A background worker: `pipe.serve(handler, concurrency=N)` with graceful shutdown.

It delivers every message to a (simulated) upstream API that allows only so many
requests per second per destination and answers 429 with Retry-After beyond
that. A 429 pauses the destination for every reader of the store
(`reader.pause`) and puts the message back (`reader.retry`: it keeps its place
in its table, and the try counts toward the reader's `max_deliveries`, 10); the
valve hands nothing to that destination before the pause ends. SIGTERM or
SIGINT stops it: messages being handled finish and are acknowledged, prefetched
ones go back to the queue, and it exits 0.

    MVALVE_URL=sqlite:///worker.sqlite3 python examples/worker.py --seed 40

Environment: MVALVE_URL / MVALVE_STORE_URL (default: the embedded SQLite file and
a memory store), WORKER_CONCURRENCY (4), WORKER_RATE (per destination, "5/1"),
UPSTREAM_LIMIT (requests per second the upstream accepts per destination, 4).
For MySQL, create the tables first: `mvalve --url "$MVALVE_URL" create`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import time
from collections import defaultdict

import mvalve_async
from mvalve_async import Message, Rate, Reader

log = logging.getLogger("worker")


class UpstreamBusy(Exception):
    def __init__(self, retry_after: float) -> None:
        super().__init__(f"429 Too Many Requests (Retry-After: {retry_after:.2f})")
        self.retry_after = retry_after


class FakeUpstream:
    """An API that accepts `limit` requests per destination per one-second window."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.windows: dict[str, tuple[int, int]] = defaultdict(lambda: (0, 0))

    async def send(self, msg: Message) -> None:
        await asyncio.sleep(0.005)  # the request
        now = time.time()
        window, count = self.windows[msg.destination]
        if window != int(now):
            window, count = int(now), 0
        if count >= self.limit:
            raise UpstreamBusy(retry_after=window + 1 - now)
        self.windows[msg.destination] = (window, count + 1)


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0, metavar="N",
                        help="first insert N messages for three destinations")  # fmt: skip
    args = parser.parse_args()
    concurrency = int(os.environ.get("WORKER_CONCURRENCY", "4"))
    rate = Rate.parse(os.environ.get("WORKER_RATE", "5/1"))
    upstream = FakeUpstream(int(os.environ.get("UPSTREAM_LIMIT", "4")))

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    delivered = 0

    async def handle(msg: Message, reader: Reader) -> None:
        nonlocal delivered
        try:
            await upstream.send(msg)
        except UpstreamBusy as busy:
            print(f"429 {msg.destination}: pausing it {busy.retry_after:.2f}s", flush=True)
            await reader.pause(msg.destination, busy.retry_after)
            await reader.retry(msg)  # back to the queue; the pause holds it
            return
        delivered += 1
        # Acknowledged when this worker asks for its next message (or stops).
        print(f"delivered {msg.id} {msg.destination} try {msg.deliveries}", flush=True)

    async with mvalve_async.open() as pipe:
        if args.seed:
            await pipe.writer().insert_many(
                Message(f"partner-{i % 3}", {"n": i}) for i in range(args.seed)
            )
        print(f"worker ready: {concurrency} readers, {rate.n}/{rate.per:g}s each", flush=True)
        await pipe.serve(handle, concurrency=concurrency, stop=stop, with_reader=True, rate=rate)
    print(f"stopped after {delivered} deliveries", flush=True)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    raise SystemExit(asyncio.run(main()))
