"""Lost schedule state is detected per memcached server: a restart of the server
holding a destination's record holds that destination back, whichever server
holds other records."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from mvalve_async.clock import LocalClock
from mvalve_async.stores.memcached import MemcachedStore
from mvalve_async.throttle import Grant, Rate, Valve, key_for
from mvalve_async.throttle.valve import EPOCH_KEY
from tests.memcached_proc import MemcachedProcess

_tokens = itertools.count()


def valve_of(store: MemcachedStore, rate: Rate) -> Valve:
    return Valve(store, LocalClock(), rate=rate)


async def send_one(valve: Valve, dest: str) -> Grant:
    """Ask for one slot; a slot granted is used at once (checked in)."""
    token = f"t{next(_tokens)}"
    now = valve.clock.now()
    grant = await valve.checkout(dest, 1, token, now + 30, None)
    assert grant is not None
    if grant.slots:
        await valve.checkin(dest, token)
    return grant


@pytest.mark.parametrize("restart", ["record's server", "other server"])
async def test_a_restart_of_any_server_is_seen_by_its_destinations(
    tmp_path: Path, restart: str
) -> None:
    servers = [MemcachedProcess(tmp_path), MemcachedProcess(tmp_path)]
    for s in servers:
        s.start()
    store = MemcachedStore([("127.0.0.1", s.port) for s in servers], namespace="ep")
    try:
        valve = valve_of(store, Rate(1, per=30.0))
        # the global epoch key's server, and the other one, which holds the record
        by_label = {s.label: s for s in servers}
        epoch_server = store.server_for(EPOCH_KEY)
        record_server = next(label for label in by_label if label != epoch_server)
        dest = next(
            f"d{i}" for i in range(1000) if store.server_for(key_for(f"d{i}")) == record_server
        )
        first = await send_one(valve, dest)
        assert first.slots
        victim = by_label[record_server if restart == "record's server" else epoch_server]
        victim.stop()
        victim.start()
        again = await send_one(valve, dest)
        # the record is gone (its server restarted): without the epoch on its server
        # this would grant a slot; else the record survived: the plain rate holds it
        assert not again.slots and again.next_try >= first.slots[0] + 30.0 - 1.0 - 1e-3
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
        first = await send_one(valve_of(store, Rate(1, per=30.0)), "d")
        assert first.slots
        server.stop()
        server.start()
        fresh = valve_of(store, Rate(1, per=30.0))  # e.g. a reader task restarted
        again = await send_one(fresh, "d")
        assert not again.slots
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
        a, b = valve_of(store_a, rate), valve_of(store_b, rate)
        first = await send_one(a, "d")
        second = await send_one(b, "d")
        assert first.slots and second.slots
        server.stop()
        server.start()
        after = await send_one(b, "d")
        assert not after.slots
        assert after.next_try >= first.slots[0] + 30.0 - 1.0 - 1e-3
    finally:
        await store_a.close()
        await store_b.close()
        server.stop()
