"""Observers see every action, and a failing observer never breaks delivery."""

from __future__ import annotations

from collections import Counter

import mvalve_async
from mvalve_async import Message, Rate


class Count:
    def __init__(self) -> None:
        self.seen: Counter[tuple[str, str]] = Counter()

    def event(self, action: str, destination: str, count: int = 1) -> None:
        self.seen[(action, destination)] += count


class Broken:
    def event(self, action: str, destination: str, count: int = 1) -> None:
        raise RuntimeError("observer bug")


async def test_observers_count_each_action() -> None:
    counter = Count()
    async with mvalve_async.open("memory://", "memory://", observers=[Broken(), counter]) as pipe:
        writer = pipe.writer()
        await writer.insert_many([Message("a", i) for i in range(3)])
        await writer.insert(Message("b", "x", emergency=True))
        await writer.insert(Message("b", "dropped"))
        reader = pipe.reader(rate=Rate(2, per=60))
        got = [await reader.next(timeout=1) for _ in range(3)]
        assert [m.content for m in got if m] == ["x", 0, 1]
        assert await reader.next(timeout=0.1) is None  # a:2 deferred, b:dropped
        await reader.close()
    assert counter.seen[("enqueue", "a")] == 3 and counter.seen[("enqueue", "b")] == 2
    assert counter.seen[("dequeue", "a")] == 2 and counter.seen[("dequeue", "b")] == 1
    assert counter.seen[("defer", "a")] == 1
    assert counter.seen[("drop", "b")] == 1
    assert counter.seen[("ack", "a")] + counter.seen[("ack", "b")] == 3
