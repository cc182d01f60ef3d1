"""The smallest complete program: write 20 messages, read them at 5 per second
per destination. Runs on the embedded SQLite default (no server needed)."""

import asyncio
import logging
import time

import mvalve_async
from mvalve_async import Message, Rate


async def main() -> None:
    async with mvalve_async.open("sqlite:///quickstart.sqlite3") as pipe:
        writer = pipe.writer()
        await writer.clear_all()
        await writer.insert_many(
            Message(destination=f"carrier-{i % 2}", content={"n": i}) for i in range(20)
        )
        await writer.insert(Message(destination="carrier-0", content="urgent", emergency=True))
        reader = pipe.reader(rate=Rate(5, per=1.0), emergency_policy="ignore")
        t0 = time.monotonic()
        for _ in range(21):
            msg = await reader.next(timeout=10)
            assert msg is not None
            print(f"{time.monotonic() - t0:5.2f}s  {msg.destination}  {msg.lane:9}  {msg.content}")
        await reader.close()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(main())
