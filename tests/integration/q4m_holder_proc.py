"""A reader process that takes one message and then hangs while "processing" it,
for the q4m kill -9 test:

    python -m tests.integration.q4m_holder_proc QUEUE_URL

Prints one JSON line (content, deliveries, connection id of the owner) once it
holds the message, then sleeps until it is killed.
"""

from __future__ import annotations

import asyncio
import sys

import orjson

import mvalve_async


async def main(url: str) -> None:
    async with mvalve_async.open(url) as pipe:
        reader = pipe.reader(batch=1)
        msg = await reader.next(timeout=10)
        if msg is None:
            sys.stdout.write("null\n")
            sys.stdout.flush()
            return
        lease = reader._current[0] if reader._current else None  # the owner's connection id
        token = lease.token if lease is not None else 0
        sys.stdout.write(orjson.dumps([msg.content, msg.deliveries, token]).decode() + "\n")
        sys.stdout.flush()
        await asyncio.sleep(3600)  # "processing": killed with SIGKILL meanwhile


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
