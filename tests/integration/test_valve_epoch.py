"""Lost schedule state is detected per memcached server: a restart of the server
holding a destination's record holds that destination back, whichever server
holds other records."""

from __future__ import annotations

from pathlib import Path

import pytest

from mvalve_async.schedule import Action, Rate
from mvalve_async.stores.memcached import MemcachedStore
from mvalve_async.valve import EPOCH_KEY, Valve, key_for
from tests.memcached_proc import MemcachedProcess


@pytest.mark.parametrize("restart", ["record's server", "other server"])
async def test_a_restart_of_any_server_is_seen_by_its_destinations(
    tmp_path: Path, restart: str
) -> None:
    servers = [MemcachedProcess(tmp_path), MemcachedProcess(tmp_path)]
    for s in servers:
        s.start()
    store = MemcachedStore([("127.0.0.1", s.port) for s in servers], namespace="ep")
    try:
        valve = Valve(store, rate=Rate(1, per=30.0))
        # the global epoch key's server, and the other one, which holds the record
        by_label = {s.label: s for s in servers}
        epoch_server = store.server_for(EPOCH_KEY)
        record_server = next(label for label in by_label if label != epoch_server)
        dest = next(
            f"d{i}" for i in range(1000) if store.server_for(key_for(f"d{i}")) == record_server
        )
        first = await valve.decide(dest, duration=None, emergency=False, reserved=False)
        assert first is not None and first.action is Action.DELIVER
        victim = by_label[record_server if restart == "record's server" else epoch_server]
        victim.stop()
        victim.start()
        again = await valve.decide(dest, duration=None, emergency=False, reserved=False)
        assert again is not None
        if restart == "record's server":
            # the record is gone: without the epoch on its server this would deliver
            assert again.action is Action.DEFER and again.at >= first.at + 30.0 - 1e-3
        else:
            assert again.action is Action.DEFER  # the record survived: plain rate
    finally:
        await store.close()
        for s in servers:
            s.stop()


async def test_a_valve_made_after_the_restart_still_sees_it(tmp_path: Path) -> None:
    """A reader started after memcached restarted (same pipe, same store) must not
    take the restarted epoch as the first one (the soak found this)."""
    server = MemcachedProcess(tmp_path)
    server.start()
    store = MemcachedStore([("127.0.0.1", server.port)], namespace="ep2")
    try:
        first = await Valve(store, rate=Rate(1, per=30.0)).decide(
            "d", duration=None, emergency=False, reserved=False
        )
        assert first is not None and first.action is Action.DELIVER
        server.stop()
        server.start()
        fresh = Valve(store, rate=Rate(1, per=30.0))  # e.g. a reader task restarted
        again = await fresh.decide("d", duration=None, emergency=False, reserved=False)
        assert again is not None and again.action is Action.DEFER
    finally:
        await store.close()
        server.stop()


async def test_a_process_that_never_missed_a_record_still_sees_the_restart(
    tmp_path: Path,
) -> None:
    """Two reader processes: A creates the destination's record, B only ever finds
    it present. B must know the epoch anyway, or after a restart B would create the
    epoch anew as "first seen" and deliver into A's forgotten window (the soak
    found this: 4 windows over the rate after memcached restarts)."""
    server = MemcachedProcess(tmp_path)
    server.start()
    store_a = MemcachedStore([("127.0.0.1", server.port)], namespace="ep3")
    store_b = MemcachedStore([("127.0.0.1", server.port)], namespace="ep3")
    try:
        rate = Rate(2, per=30.0)
        a, b = Valve(store_a, rate=rate), Valve(store_b, rate=rate)
        first = await a.decide("d", duration=None, emergency=False, reserved=False)
        second = await b.decide("d", duration=None, emergency=False, reserved=False)
        assert first is not None and first.action is Action.DELIVER
        assert second is not None and second.action is Action.DELIVER
        server.stop()
        server.start()
        after = await b.decide("d", duration=None, emergency=False, reserved=False)
        assert after is not None and after.action is Action.DEFER
        assert after.at >= first.at + 30.0 - 1e-3
    finally:
        await store_a.close()
        await store_b.close()
        server.stop()
