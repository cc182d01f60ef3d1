"""MemoryStore: what is specific to it. What every store must do is in
tests/contract/test_store_contract.py, which runs it too."""

from __future__ import annotations

import pytest

from mvalve_async.stores import memory
from mvalve_async.stores.memory import MemoryStore


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
