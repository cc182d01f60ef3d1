"""MemoryStore: what is specific to it. What every store must do (get, update,
delete, get_many, lifetimes, deadlines, health) is in
tests/contract/test_store_contract.py, which runs it too."""

from __future__ import annotations

import math

import pytest

from mvalve_async.stores import memory
from mvalve_async.stores.memory import MemoryStore


class FakeClock:
    """Stands in for the `time` module inside stores/memory.py."""

    def __init__(self, now: float) -> None:
        self.now = now

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return 1_700_000_000.0 + self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock(1_000.0)
    monkeypatch.setattr(memory, "time", fake)
    return fake


async def test_ttl_is_exact(clock: FakeClock) -> None:
    store = MemoryStore()
    await store.update("short", lambda old: (b"x", None), ttl=10)
    await store.update("forever", lambda old: (b"y", None))  # ttl=0: never expires
    await store.update("unlimited", lambda old: (b"z", None), ttl=math.inf)

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
    assert await store.get_many(["short", "forever", "unlimited"]) == {
        "forever": b"y",
        "unlimited": b"z",
    }


async def test_update_without_change_keeps_the_ttl(clock: FakeClock) -> None:
    store = MemoryStore()
    await store.update("k", lambda old: (b"v", None), ttl=10)
    clock.now += 8
    assert await store.update("k", lambda old: (None, old), ttl=100) == b"v"
    clock.now += 2
    assert await store.get("k") is None  # the no-change update did not extend it


async def test_health_is_one_incarnation_that_never_evicts(clock: FakeClock) -> None:
    store = MemoryStore()
    first = await store.health("a")
    assert (first.uptime, first.started, first.evictions) == (0.0, 1_700_001_000.0, 0)
    clock.now += 3600
    later = await store.health("b")
    assert later.uptime == 3600.0 and later.started == first.started
    assert not later.lost_since(first)
    assert store.ops == 0  # health reads no record


async def test_ops_count_calls(clock: FakeClock) -> None:
    store = MemoryStore()
    await store.update("k", lambda old: (b"v", None))
    await store.get("k")
    await store.get_many(["k", "j", "i"])
    await store.get_many([])
    await store.delete("k")
    assert store.ops == 4


async def test_still_usable_after_close() -> None:
    store = MemoryStore()
    await store.update("k", lambda old: (b"v", None))
    await store.close()
    assert await store.get("k") == b"v"
