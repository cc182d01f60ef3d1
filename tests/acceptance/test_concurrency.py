"""A per-destination concurrency limit (issue 17), on every dialect: at most k
messages of a destination handed out and not settled, over every reader."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict

import pytest

from mvalve_async import Message, Pipe, Rate
from mvalve_async.errors import ConfigError
from tests.ledger import max_in_window


def most_overlapping(intervals: list[tuple[float, float]]) -> int:
    """The most intervals [start, end) open at one moment."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    best = live = 0
    for _, step in events:  # at equal times an end (-1) comes before a start (+1)
        live += step
        best = max(best, live)
    return best


async def run_workers(
    pipe: Pipe, workers: int, work: float, seconds: float, **reader: object
) -> dict[str, list[tuple[float, float]]]:
    """`workers` tasks, each with its own reader, each message 'processed' for
    `work` seconds then acked (by asking for the next): (start, end) per message on
    the monotonic clock, per destination."""
    spans: dict[str, list[tuple[float, float]]] = defaultdict(list)
    end = time.monotonic() + seconds

    async def worker() -> None:
        async with pipe.reader(**reader) as r:  # type: ignore[arg-type]
            while time.monotonic() < end:
                msg = await r.next(timeout=0.2)
                if msg is None:
                    continue
                start = time.monotonic()
                await asyncio.sleep(work)
                spans[msg.destination].append((start, time.monotonic()))

    await asyncio.gather(*(worker() for _ in range(workers)))
    return spans


async def test_at_most_k_in_flight_per_destination(pipe: Pipe) -> None:
    await pipe.writer().insert_many([Message(d, i) for i in range(40) for d in ("a", "b", "c")])
    spans = await run_workers(pipe, workers=8, work=0.05, seconds=2.0, concurrency_limit=2)
    assert set(spans) == {"a", "b", "c"}
    for dest, items in spans.items():
        assert most_overlapping(items) == 2, dest  # the limit, and used
        # 2 at a time, 50 ms each: about 40 per second per destination
        assert len(items) >= 40, (dest, len(items))


async def test_a_limit_per_destination_and_a_rate_together(pipe: Pipe) -> None:
    await pipe.writer().insert_many([Message(d, i) for i in range(30) for d in ("x", "y")])
    spans = await run_workers(
        pipe, workers=6, work=0.03, seconds=1.6, rate=Rate(10, per=0.5),
        concurrency_limit=3, concurrency_limits={"y": 1},
    )  # fmt: skip
    assert most_overlapping(spans["x"]) <= 3 and most_overlapping(spans["y"]) == 1
    for items in spans.values():
        assert max_in_window([s for s, _ in items], 0.5) <= 10 + 1  # received: margin


async def test_a_retried_message_gives_its_place_back(pipe: Pipe) -> None:
    await pipe.writer().insert_many([Message("d", i) for i in range(3)])
    reader = pipe.reader(concurrency_limit=1)
    other = pipe.reader(concurrency_limit=1)
    try:
        first = await reader.next(timeout=2)
        assert first is not None and first.content == 0
        assert await other.next(timeout=0.3) is None  # the one place is taken
        await reader.retry(first)  # its place is free again
        again = await other.next(timeout=2)
        assert again is not None and again.content == 0 and again.deliveries == 2
    finally:
        await reader.close()
        await other.close()


async def test_a_pause_and_a_limit(pipe: Pipe) -> None:
    await pipe.writer().insert_many([Message("d", i) for i in range(4)])
    reader = pipe.reader(concurrency_limit=2)
    try:
        first = await reader.next(timeout=2)
        assert first is not None
        await reader.pause("d", 0.4)
        paused = time.monotonic()
        second = await reader.next(timeout=2)  # acks the first: a place is free
        assert second is not None and second.content == 1
        assert time.monotonic() - paused >= 0.4 - 0.01
    finally:
        await reader.close()


async def test_an_emergency_goes_past_the_limit(pipe: Pipe) -> None:
    await pipe.writer().insert(Message("d", "normal"))
    reader = pipe.reader(concurrency_limit=1)
    other = pipe.reader(concurrency_limit=1)
    try:
        first = await reader.next(timeout=2)
        assert first is not None and first.content == "normal"
        await pipe.writer().insert(Message("d", "urgent", emergency=True))
        urgent = await other.next(timeout=2)
        assert urgent is not None and urgent.content == "urgent"
    finally:
        await reader.close()
        await other.close()


@pytest.mark.parametrize("limit", [0, -1, True, 1.5])
def test_a_limit_is_a_count(pipe: Pipe, limit: object) -> None:
    with pytest.raises(ConfigError):
        pipe.reader(concurrency_limit=limit)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        pipe.reader(concurrency_limits={"d": limit})  # type: ignore[dict-item]
