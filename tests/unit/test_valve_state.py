"""The valve's record lifetimes and lost holds, on the memory store (no server)."""

from __future__ import annotations

from typing import Any

import pytest

from mvalve_async.clock import LocalClock
from mvalve_async.stores.memory import MemoryStore
from mvalve_async.throttle import Rate, Valve, key_for

WEEK = 7 * 86400


class TtlSpy(MemoryStore):
    """Remembers the ttl of the last write."""

    last_ttl = -1.0

    async def update(self, key: str, fn: Any, ttl: Any = 0, *, deadline: Any = None) -> Any:
        def spy(new: bytes) -> float:
            self.last_ttl = ttl(new) if callable(ttl) else ttl
            return self.last_ttl

        return await super().update(key, fn, spy, deadline=deadline)


async def hand_out(valve: Valve, dest: str) -> None:
    now = valve.clock.now()
    grant = await valve.checkout(dest, 1, "t", now + 30, None)
    assert grant is not None and grant.slots
    await valve.checkin(dest, "t")


@pytest.mark.parametrize(("margin", "per"), [(0.0, 5.0), (60.0, 5.0), (0.0, WEEK)])
async def test_a_record_lives_its_window_plus_the_configured_margin(
    margin: float, per: float
) -> None:
    store = TtlSpy()
    valve = Valve(store, LocalClock(), rate=Rate(1, per=per), record_margin=margin)
    await hand_out(valve, "d")
    assert per + margin - 0.1 <= store.last_ttl <= per + margin + 0.1


async def test_a_pause_keeps_the_record_as_long_as_its_log_needs() -> None:
    """A pause (or another call that takes no rate) on a destination with a rate
    wrote the record for the pause only: a 1 s pause cut a weekly log to a minute."""
    store = TtlSpy()
    valve = Valve(store, LocalClock(), rate=Rate(1, per=WEEK), record_margin=0)
    await hand_out(valve, "d")
    await valve.pause("d", 1.0)
    assert store.last_ttl >= WEEK - 1
    await valve.resume("d")
    assert store.last_ttl >= WEEK - 1


async def test_a_lost_record_holds_a_late_hand_out_back() -> None:
    """A late hand-out asks `peek` first. Under its hold the record of a destination
    with a rate exists; missing, it was lost with the hold, and the message goes
    back rather than out beside slots a fresh record may grant."""
    store = MemoryStore()
    valve = Valve(store, LocalClock(), rate=Rate(2, per=10.0), rates={"free": None})
    now = valve.clock.now()
    assert await valve.checkout("d", 1, "t", now + 30, None)
    assert await valve.peek("d", None) == (0.0, False)  # held by its holder, not back
    await store.delete(key_for("d"))  # lost
    until, drop = await valve.peek("d", None) or (0.0, True)
    assert not drop and until >= now + 10.0
    assert await valve.peek("free", None) == (0.0, False)  # no rate: nothing to hold
