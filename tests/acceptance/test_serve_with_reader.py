"""`pipe.serve(handler, with_reader=True)`: the handler gets its worker's reader, to
pause a destination on a 429 and settle the message itself."""

from __future__ import annotations

import asyncio
import time

from mvalve_async import Message, Pipe, Reader


async def test_a_handler_pauses_its_destination_and_retries(pipe: Pipe) -> None:
    sent = [Message("busy", {"n": i}) for i in range(4)] + [Message("calm", {"n": 9})]
    await pipe.writer().insert_many(sent)
    attempts: list[tuple[str, float]] = []
    delivered: dict[str, float] = {}
    paused_at: list[float] = []
    retried: list[str] = []
    stop = asyncio.Event()

    async def handle(msg: Message, reader: Reader) -> None:
        attempts.append((msg.id, time.time()))
        if msg.destination == "busy" and not paused_at:
            paused_at.append(time.time())
            retried.append(msg.id)
            await reader.pause("busy", 0.6)  # "429, Retry-After: 0.6"
            await reader.retry(msg)
            return
        delivered[msg.id] = msg.delivered_at or 0.0
        if len(delivered) == len(sent):
            stop.set()

    async with asyncio.timeout(20):
        await pipe.serve(handle, concurrency=2, stop=stop, with_reader=True, poll=0.1)

    assert set(delivered) == {m.id for m in sent}  # every one, the retried one too
    end = paused_at[0] + 0.6 - 1e-3
    # nothing for "busy" was handed out during the pause (the other reader may have
    # had one before it began), and the retried message came after it
    assert all(t < paused_at[0] or t >= end for m in sent if m.destination == "busy"
               for t in [delivered[m.id]])  # fmt: skip
    assert delivered[retried[0]] >= end
    assert [i for i, _ in attempts].count(retried[0]) == 2
    stats = await pipe.queue.stats(time.time())
    assert sum(stats.queued.values()) + sum(stats.leased.values()) == 0  # all acked
    assert stats.dead == 0


async def test_a_plain_handler_is_still_called_with_the_message_only(pipe: Pipe) -> None:
    await pipe.writer().insert(Message("d", "x"))
    got: list[object] = []
    stop = asyncio.Event()

    async def handle(*args: object) -> None:
        got.append(args)
        stop.set()

    async with asyncio.timeout(10):
        await pipe.serve(handle, stop=stop, poll=0.1)
    assert len(got) == 1 and len(got[0]) == 1  # type: ignore[arg-type]
