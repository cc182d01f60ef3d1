"""Lost schedule state is detected, on real (private) memcached servers: a record
found missing is judged on the store's health, read after the miss; a server that
restarted, evicted or was flushed holds the destinations whose records are missing
until their window is over. A present record costs no health reading.

The servers are started here (tests/memcached_proc.py): skipped when the memcached
binary is missing, a failure under CI."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import shutil
from collections.abc import Iterator
from pathlib import Path

import aiomcache
import pytest

from mvalve_async.clock import LocalClock
from mvalve_async.errors import ConfigError
from mvalve_async.interfaces import StoreHealth
from mvalve_async.queues.memory import MemoryQueue
from mvalve_async.reader import Reader
from mvalve_async.stores.memcached import MemcachedStore
from mvalve_async.stores.memory import MemoryStore
from mvalve_async.throttle import Grant, Rate, Valve, key_for
from mvalve_async.tuning import RECORD_MARGIN, UPTIME_SLACK
from tests.memcached_proc import HOST, MemcachedProcess, _unavailable
from tests.memcached_proxy import BlackholeProxy

pytestmark = pytest.mark.memcached

_tokens = itertools.count()
PER = 2.0  # short windows: a young server holds new records for UPTIME_SLACK + PER + lead


@pytest.fixture
def server(tmp_path: Path) -> Iterator[MemcachedProcess]:
    with _servers(tmp_path, 1) as procs:
        yield procs[0]


@pytest.fixture
def two_servers(tmp_path: Path) -> Iterator[list[MemcachedProcess]]:
    with _servers(tmp_path, 2) as procs:
        yield procs


@contextlib.contextmanager
def _servers(tmp_path: Path, count: int) -> Iterator[list[MemcachedProcess]]:
    if shutil.which("memcached") is None:
        _unavailable("the memcached binary is not installed")
    procs = [MemcachedProcess(tmp_path) for _ in range(count)]
    try:
        for p in procs:
            p.start()
        yield procs
    finally:
        for p in procs:
            p.stop()


def store_of(*procs: MemcachedProcess, **options: float) -> MemcachedStore:
    return MemcachedStore([(HOST, p.port) for p in procs], namespace="ls", **options)  # type: ignore[arg-type]


def valve_of(store: MemcachedStore | MemoryStore, per: float = PER) -> Valve:
    return Valve(store, LocalClock(), rate=Rate(1, per=per))


async def send_one(valve: Valve, dest: str) -> Grant:
    """Ask for one slot; a slot granted is used at once (checked in)."""
    token = f"t{next(_tokens)}"
    now = valve.clock.now()
    grant = await valve.checkout(dest, 1, token, now + 30, None)
    assert grant is not None
    if grant.slots:
        await valve.checkin(dest, token)
    return grant


async def first_slot(valve: Valve, dest: str, limit: float = 15.0) -> float:
    """The first slot of `dest`, asking again at each `next_try` (a young server
    holds a missing record until its window is over): the slot's time."""
    ends = valve.clock.now() + limit
    while valve.clock.now() < ends:
        grant = await send_one(valve, dest)
        if grant.slots:
            return grant.slots[0]
        await asyncio.sleep(max(0.0, min(grant.next_try, ends) - valve.clock.now()))
    raise AssertionError(f"no slot for {dest} in {limit} s")


async def wait_grown_up(store: MemcachedStore, key: str, per: float) -> None:
    """Sleep until the server holding `key` no longer counts as just restarted."""
    health = await store.health(key, since=asyncio.get_running_loop().time())
    left = UPTIME_SLACK + per + 0.1 - health.uptime
    if left > 0:
        await asyncio.sleep(left + 1.0)  # uptime counts whole seconds


def dest_on(store: MemcachedStore, server: MemcachedProcess, prefix: str = "d") -> str:
    return next(
        f"{prefix}{i}"
        for i in range(1000)
        if store.server_for(key_for(f"{prefix}{i}")) == server.label
    )


# -- restarts -------------------------------------------------------------------------


async def test_a_young_server_holds_a_missing_record_for_its_window(
    server: MemcachedProcess,
) -> None:
    """A server that started less than a window ago may have lost records when it
    did (this process cannot know what ran before): a new destination waits until
    the window is over, counted from the start, and no longer."""
    store = store_of(server)
    try:
        valve = valve_of(store)
        now = valve.clock.now()
        health = await store.health(key_for("d"))
        held = await send_one(valve, "d")
        assert not held.slots
        started_by = now - health.uptime + UPTIME_SLACK  # what the valve assumes
        assert held.next_try >= started_by + PER - 0.01
        assert held.next_try <= now + UPTIME_SLACK + PER + 0.1
        slot = await first_slot(valve, "d")
        print(f"\nheld {slot - now:.2f} s after the server's start (uptime {health.uptime:g})")
    finally:
        await store.close()


@pytest.mark.slow
@pytest.mark.parametrize("restart", ["record's server", "other server"])
async def test_a_restart_holds_the_records_of_its_server_only(
    two_servers: list[MemcachedProcess], restart: str
) -> None:
    store = store_of(*two_servers)
    try:
        valve = valve_of(store)
        victim, other = two_servers
        dest = dest_on(store, victim)
        await wait_grown_up(store, key_for(dest), PER)
        first = await first_slot(valve, dest, limit=2.0)
        (victim if restart == "record's server" else other).stop()
        (victim if restart == "record's server" else other).start()
        again = await send_one(valve, dest)
        assert not again.slots
        # either the record is gone and the restart holds it, or the record is there
        # and its log holds it: never a second slot inside the window
        assert again.next_try >= first + PER - valve.lead - 1e-3
        fresh = await send_one(valve, dest_on(store, other, "new"))
        if restart == "record's server":  # the other server is old: a new record goes
            assert fresh.slots
        else:
            assert not fresh.slots  # its own server restarted: held
    finally:
        await store.close()


@pytest.mark.slow
async def test_a_new_process_after_a_restart_waits_the_window(server: MemcachedProcess) -> None:
    """The gap of the epoch record: a process that never saw the old server (here a
    new store and valve, so nothing of the first is shared) starts after the
    restart. The server's young uptime holds it."""
    old_store = store_of(server)
    try:
        await wait_grown_up(old_store, key_for("d"), PER)
        first = await first_slot(valve_of(old_store), "d", limit=2.0)
    finally:
        await old_store.close()
    server.stop()
    server.start()
    new_store = store_of(server)
    try:
        valve = valve_of(new_store)
        again = await send_one(valve, "d")
        assert not again.slots and again.next_try >= first + PER
        second = await first_slot(valve, "d")
        assert second >= first + PER
        print(f"\nafter the restart: the second slot {second - first:.2f} s after the first")
    finally:
        await new_store.close()


@pytest.mark.slow
async def test_a_process_that_never_missed_a_record_still_sees_the_restart(
    server: MemcachedProcess,
) -> None:
    """A creates the destination's record, B only ever finds it present (and so never
    read the server's health): after a restart B finds it missing and is held."""
    store_a, store_b = store_of(server), store_of(server)
    try:
        rate = Rate(2, per=PER)
        a = Valve(store_a, LocalClock(), rate=rate)
        b = Valve(store_b, LocalClock(), rate=rate)
        await wait_grown_up(store_a, key_for("d"), PER)
        first = await first_slot(a, "d", limit=2.0)
        second = await send_one(b, "d")
        assert second.slots
        server.stop()
        server.start()
        after = await send_one(b, "d")
        assert not after.slots and after.next_try >= first + PER
    finally:
        await store_a.close()
        await store_b.close()


# -- flushes, evictions, the reading's age ------------------------------------------


@pytest.mark.slow
async def test_a_flush_holds_missing_records_and_an_old_reading_is_not_trusted(
    server: MemcachedProcess,
) -> None:
    """flush_all drops every record. The health reading that judges a miss must be
    taken after the miss: here a reading cached for a minute (taken before the
    flush, when another destination's record was missing) would show nothing."""
    store = store_of(server, health_ttl=60.0)
    client = aiomcache.Client(HOST, server.port)
    try:
        valve = valve_of(store)
        await wait_grown_up(store, key_for("d"), PER)
        first = await first_slot(valve, "d", limit=2.0)
        assert (await send_one(valve, "other")).slots  # a miss: a reading, now cached
        cached = await store.health(key_for("d"))
        await client.flush_all()
        again = await send_one(valve, "d")
        assert not again.slots and again.next_try >= first + PER
        assert (await store.health(key_for("d"))).flushes == cached.flushes + 1
    finally:
        await client.close()
        await store.close()


@pytest.mark.slow
async def test_a_process_that_first_reads_a_server_after_evictions_waits(
    server: MemcachedProcess,
) -> None:
    """Evictions (or flushes) that happened before this process's first reading
    happened at a time it cannot tell: a missing record then waits a window. Once
    the counts stay still for a window, missing records go at once."""
    client = aiomcache.Client(HOST, server.port)
    store = store_of(server)
    try:
        await client.flush_all()
        await wait_grown_up(store, key_for("d"), PER)
        valve = valve_of(store)
        t0 = valve.clock.now()
        held = await send_one(valve, "d")
        assert not held.slots and held.next_try >= t0 + PER
        await asyncio.sleep(held.next_try + valve.lead + 0.05 - valve.clock.now())
        assert (await send_one(valve, "new")).slots  # nothing new since that reading
    finally:
        await client.close()
        await store.close()


# -- cost -------------------------------------------------------------------------


async def test_a_present_record_costs_no_health_reading(server: MemcachedProcess) -> None:
    """Round trips (store.ops): a checkout of a present record is gets + cas; of a
    missing one gets, stats, gets, add; misses that come back together share one
    stats."""
    store = store_of(server)
    try:
        valve = Valve(store, LocalClock(), rate=Rate(100, per=1.0))
        await wait_grown_up(store, key_for("d"), 1.0)
        now = valve.clock.now()
        ops = store.ops
        await valve.checkout("d", 1, "t1", now + 30, None)
        assert store.ops - ops == 4  # gets (missing), stats, gets, add
        await valve.checkin("d", "t1")
        ops = store.ops
        await valve.checkout("d", 1, "t2", now + 30, None)
        assert store.ops - ops == 2  # gets, cas: no stats
        ops = store.ops
        dests = [f"n{i}" for i in range(20)]
        await asyncio.gather(*(valve.checkout(d, 1, "t3", now + 30, None) for d in dests))
        stats = store.ops - ops - 3 * len(dests)
        print(f"\n20 misses at once: {stats} stats round trips")
        assert 1 <= stats < len(dests)
    finally:
        await store.close()


async def test_the_memory_store_never_reads_health() -> None:
    """An in-process store loses nothing: a new destination goes at once."""

    class Counting(MemoryStore):
        readings = 0

        async def health(
            self, key: str, *, since: float | None = None, deadline: float | None = None
        ) -> StoreHealth:
            Counting.readings += 1
            return await super().health(key, since=since, deadline=deadline)

    valve = valve_of(Counting())
    assert (await send_one(valve, "d")).slots
    assert Counting.readings == 0


# -- what a store can keep ------------------------------------------------------------


def test_a_window_the_store_cannot_keep_is_refused() -> None:
    """memcached keeps a record at most 30 days: a window that, with the record's
    margin, needs longer is refused when the valve (or the reader) is made. The
    store is not contacted: this needs no server."""
    store = MemcachedStore([(HOST, 1)])
    month = store.max_ttl
    ok = Rate(1, per=month - RECORD_MARGIN)
    Valve(store, LocalClock(), rate=ok)
    with pytest.raises(ConfigError, match=r"longer than the memcached store can keep") as err:
        Valve(store, LocalClock(), rates={"monthly": Rate(1, per=month - RECORD_MARGIN + 1)})
    assert "'monthly'" in str(err.value) and "per <=" in str(err.value)
    with pytest.raises(ConfigError, match="every destination"):
        Reader(MemoryQueue(), store, rate=Rate(10, per=31 * 86400))
    # the margin is the reader's to choose; the memory store keeps records for ever
    Reader(MemoryQueue(), store, rate=Rate(10, per=month), record_margin=0)
    Reader(MemoryQueue(), MemoryStore(), rate=Rate(10, per=365 * 86400))
    with pytest.raises(ConfigError, match="record_margin"):
        Valve(store, LocalClock(), rate=ok, record_margin=-1)


async def meta_ttl(port: int, mkey: bytes) -> int:
    """The record's remaining ttl as memcached itself reports it (meta get)."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(b"mg " + mkey + b" t\r\n")
        line = await reader.readline()
    finally:
        writer.close()
    assert line.startswith(b"HD t"), line
    return int(line.split()[1][1:])


async def test_a_weekly_record_is_written_to_live_a_week(server: MemcachedProcess) -> None:
    """The old fixed ttl was a day whatever the window: a record now lives as long as
    what it remembers, a weekly quota's hand-out a week, as memcached reports."""
    store = store_of(server)
    try:
        mkey = store.key_for(key_for("weekly"))
        # made by a 2 s valve first (held a moment: the server is young): a short life
        await valve_of(store).pause("weekly", 1.0)
        assert await meta_ttl(server.port, mkey) < 3600
        weekly = Valve(store, LocalClock(), rate=Rate(1000, per=7 * 86400), record_margin=0)
        await weekly.emergency("weekly", None, None)  # a hand-out in its log
        assert await meta_ttl(server.port, mkey) >= 7 * 86400
    finally:
        await store.close()


# -- a write cut off by the deadline, that lands later ---------------------------------


class _CutAfterRead(MemcachedStore):
    """Black-holes its proxy once the next update has read the record: that update's
    write (a cas or an add) then waits in the proxy and lands when it heals, after
    the caller's deadline cut it off, as a write through a partition can."""

    proxy: BlackholeProxy | None = None

    async def update(self, key, fn, ttl=0, *, deadline=None):  # type: ignore[no-untyped-def]
        def cut(raw: bytes | None) -> object:
            result = fn(raw)
            if self.proxy is not None and result[0] is not None:
                self.proxy.blackhole()
                self.proxy = None
            return result

        return await super().update(key, cut, ttl, deadline=deadline)  # type: ignore[arg-type]


@pytest.mark.slow
async def test_a_grant_cut_off_by_its_deadline_that_lands_later_is_undone(
    server: MemcachedProcess,
) -> None:
    """The reader saw no grant (its deadline passed), but the cas that wrote it lands
    when the partition heals: the record is held for a token nobody uses, for the
    whole hold (about the lease). The valve's next decision on the destination
    releases that hold and its unused slots, and its write makes a still later one
    fail; the same goes for a checkin cut off."""
    proxy = await BlackholeProxy(server.port).start()
    store = _CutAfterRead([(HOST, proxy.port)], namespace="cut")
    try:
        valve = Valve(store, LocalClock(), rate=Rate(5, per=PER))
        await wait_grown_up(store, key_for("d"), PER)
        loop = asyncio.get_running_loop()
        store.proxy = proxy
        now = valve.clock.now()
        cut = await valve.checkout("d", 5, "lost", now + 30, loop.time() + 0.3)
        assert cut is None
        proxy.heal()
        for _ in range(50):  # the held cas lands
            raw = await store.get(key_for("d"))
            if raw is not None and b'"lost"' in raw:
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("the cut-off write never landed: test too weak")
        grant = await valve.checkout("d", 5, "next", valve.clock.now() + 30, None)
        assert grant is not None and len(grant.slots) == 5  # the phantom's slots are back
        record = await valve.record("d")
        assert record.hold == "next" and len(record.sent) == 5

        # a checkin cut off the same way, that lands before the valve's next call: that
        # call must not apply it twice (its unused entries share the hand-outs' time)
        store.proxy = proxy
        await valve.checkin("d", "next", unused=grant.entries[2:])
        assert "d" in valve._owed
        proxy.heal()
        for _ in range(50):
            if (await valve.record("d")).hold == "":
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("the cut-off checkin never landed: test too weak")
        await valve.emergency("d", None, None)  # any decision of this valve on it
        record = await valve.record("d")
        assert record.hold == "" and len(record.sent) == 3  # 2 handed out + the emergency
        assert "d" not in valve._owed
    finally:
        await store.close()
        await proxy.close()
