"""MemoryStore: the in-process reference implementation of the `Store` protocol."""

from __future__ import annotations

import asyncio

import pytest

from mvalve_async.interfaces import Store
from mvalve_async.stores import memory
from mvalve_async.stores.memory import MemoryStore


def incr(old: bytes | None) -> tuple[bytes, int]:
    n = int(old or b"0") + 1
    return str(n).encode(), n


async def test_update_semantics() -> None:
    store = MemoryStore()
    assert isinstance(store, Store)
    seen: list[bytes | None] = []

    def look(old: bytes | None) -> tuple[None, str]:
        seen.append(old)
        return None, "result"

    assert await store.update("k", look) == "result"  # None: nothing written
    assert seen == [None]
    assert await store.get("k") is None
    assert await store.update("k", incr) == 1
    assert await store.update("k", incr) == 2

    def boom(old: bytes | None) -> tuple[bytes, None]:
        raise KeyError("from fn")

    with pytest.raises(KeyError):
        await store.update("k", boom)
    assert await store.get("k") == b"2"  # a failing fn leaves the record alone
    await store.delete("k")
    await store.delete("k")
    assert await store.get("k") is None
    assert store.ops == 9


async def test_concurrent_updates_are_atomic() -> None:
    store = MemoryStore()

    async def worker() -> list[int]:
        results = []
        for _ in range(20):
            results.append(await store.update("counter", incr))
            await asyncio.sleep(0)  # interleave the tasks
        return results

    results = await asyncio.gather(*(worker() for _ in range(50)))
    assert await store.get("counter") == b"1000"
    assert sorted(n for r in results for n in r) == list(range(1, 1001))


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now


async def test_ttl_expiry(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock(1_000_000.0)
    monkeypatch.setattr(memory, "time", clock)
    store = MemoryStore()
    await store.update("short", lambda old: (b"x", None), ttl=10)
    await store.update("forever", lambda old: (b"y", None))  # ttl=0: never expires

    clock.now += 9.999
    assert await store.get("short") == b"x"
    clock.now += 0.001  # expires at exactly now + ttl
    assert await store.get("short") is None
    # An expired record is missing for update too, and a new ttl starts from now.
    assert await store.update("short", lambda old: (b"again", old), ttl=5) is None
    clock.now += 4
    assert await store.get("short") == b"again"
    clock.now += 1_000_000
    assert await store.get("short") is None
    assert await store.get("forever") == b"y"


async def test_update_without_change_keeps_the_ttl(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock(50.0)
    monkeypatch.setattr(memory, "time", clock)
    store = MemoryStore()
    await store.update("k", lambda old: (b"v", None), ttl=10)
    clock.now += 8
    assert await store.update("k", lambda old: (None, old), ttl=100) == b"v"
    clock.now += 2
    assert await store.get("k") is None  # the no-change update did not extend it
