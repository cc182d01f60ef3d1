"""The Store contract (`mvalve_async.interfaces.Store`): every store must pass every
test here. memcached runs against the server on 127.0.0.1:11211 (each test in a
namespace of its own): in CI a missing memcached fails loudly (tests/services.py)."""

from __future__ import annotations

import asyncio
import math
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable

import pytest

from mvalve_async.errors import ConfigError, StoreError
from mvalve_async.interfaces import Store, StoreHealth
from mvalve_async.stores.memcached import MemcachedStore
from mvalve_async.stores.memory import MemoryStore
from tests.services import require_memcached

STORES = ["memory", "memcached"]


@pytest.fixture(params=STORES)
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    s: Store
    if request.param == "memory":
        s = MemoryStore()
    else:
        require_memcached()
        s = MemcachedStore([("127.0.0.1", 11211)], namespace="c" + uuid.uuid4().hex[:12])
    try:
        yield s
    finally:
        await s.close()


def incr(old: bytes | None) -> tuple[bytes, int]:
    n = int(old or b"0") + 1
    return str(n).encode(), n


def put(value: bytes) -> Callable[[bytes | None], tuple[bytes, None]]:
    return lambda old: (value, None)


def now() -> float:
    return asyncio.get_running_loop().time()


# -- get / update / delete ---------------------------------------------------------


async def test_round_trip(store: Store) -> None:
    assert isinstance(store, Store)
    assert await store.get("a") is None
    assert await store.update("a", lambda old: (b"one", old)) is None
    assert await store.get("a") == b"one"
    assert await store.update("a", lambda old: (b"two", old)) == b"one"
    assert await store.get("a") == b"two"
    await store.delete("a")
    assert await store.get("a") is None
    await store.delete("a")  # deleting a missing key is fine


async def test_values_are_bytes_kept_exactly(store: Store) -> None:
    values = {"empty": b"", "binary": bytes(range(256)), "crlf": b"END\r\nVALUE x 0 1\r\n"}
    for key, value in values.items():
        await store.update(key, put(value))
    for key, value in values.items():
        assert await store.get(key) == value


async def test_update_of_missing_key_and_no_change(store: Store) -> None:
    seen: list[bytes | None] = []

    def look(old: bytes | None) -> tuple[bytes | None, str]:
        seen.append(old)
        return None, "unchanged"

    assert await store.update("missing", look) == "unchanged"
    assert seen == [None]
    assert await store.get("missing") is None  # returning None writes nothing
    assert await store.update("missing", incr) == 1
    assert await store.update("missing", incr) == 2
    assert await store.get("missing") == b"2"


async def test_fn_errors_propagate_and_leave_value(store: Store) -> None:
    await store.update("k", put(b"kept"))

    def boom(old: bytes | None) -> tuple[bytes | None, None]:
        raise KeyError("from fn")

    with pytest.raises(KeyError):
        await store.update("k", boom)
    with pytest.raises(TypeError):
        await store.update("k", lambda old: ("not bytes", None))  # type: ignore[arg-type,return-value]
    with pytest.raises(ConfigError):
        await store.update("k", incr, ttl=-1)
    with pytest.raises(ConfigError):
        await store.update("k", incr, ttl=math.nan)
    assert await store.get("k") == b"kept"


async def test_concurrent_updates_are_atomic(store: Store) -> None:
    async def worker() -> list[int]:
        results = []
        for _ in range(20):
            results.append(await store.update("counter", incr))
            await asyncio.sleep(0)  # interleave the tasks
        return results

    results = await asyncio.gather(*(worker() for _ in range(50)))
    assert await store.get("counter") == b"1000"
    # Every update saw a distinct value: none was lost or applied twice.
    assert sorted(n for r in results for n in r) == list(range(1, 1001))


async def test_keys_are_any_text(store: Store) -> None:
    keys = ["plain", "with space", "new\nline", "nul\x00", "ünïcödé✓", "h:x", "", "k" * 600]
    for i, key in enumerate(keys):
        await store.update(key, put(f"v{i}".encode()))
    for i, key in enumerate(keys):
        assert await store.get(key) == f"v{i}".encode(), key
    assert await store.get_many(keys) == {k: f"v{i}".encode() for i, k in enumerate(keys)}


# -- get_many ------------------------------------------------------------------------


async def test_get_many(store: Store) -> None:
    for i in range(5):
        await store.update(f"k{i}", put(f"v{i}".encode()))
    ops = store.ops
    got = await store.get_many(["k0", "k3", "missing", "k4", "k3"])
    assert got == {"k0": b"v0", "k3": b"v3", "k4": b"v4"}  # missing absent, dups once
    assert store.ops == ops + 1  # one server: one round trip
    assert await store.get_many(iter(["k1"])) == {"k1": b"v1"}  # any iterable
    assert await store.get_many(["nothing", "here"]) == {}
    ops = store.ops
    assert await store.get_many([]) == {}
    assert store.ops == ops  # no keys, no round trip


async def test_get_many_sees_deletes_and_updates(store: Store) -> None:
    await store.update("a", put(b"1"))
    await store.update("b", put(b"2"))
    await store.delete("a")
    await store.update("b", put(b"3"))
    assert await store.get_many(["a", "b"]) == {"b": b"3"}


# -- lifetimes ----------------------------------------------------------------------


def test_max_ttl() -> None:
    assert MemoryStore.max_ttl == math.inf
    assert MemcachedStore.max_ttl == 30 * 86400 - 1  # memcached: 30 days relative
    assert isinstance(MemcachedStore.max_ttl, float)


def test_which_stores_may_lose_records() -> None:
    """Declared, for the valve: a missing record of a store that may lose records is
    checked against the store's health before it is trusted."""
    assert MemoryStore.may_lose_records is False
    assert MemcachedStore.may_lose_records is True


async def test_ttl_zero_and_max_ttl_keep_the_record(store: Store) -> None:
    await store.update("forever", put(b"x"))
    await store.update("longest", put(b"y"), ttl=min(store.max_ttl, 10 * 365 * 86400))
    assert await store.get_many(["forever", "longest"]) == {"forever": b"x", "longest": b"y"}


async def test_ttl_lives_at_least_ttl_then_expires(store: Store) -> None:
    """A record lives at least `ttl` from the call's start (memcached's clock ticks
    once a second: the store must make up for it), then goes (memcached: within 2 s
    more). A write sets the lifetime anew; an update that writes nothing does not."""
    ttl = 1.0
    started = now()
    for key in ("plain", "unchanged", "rewritten"):
        await store.update(key, put(b"x"), ttl=ttl)
    assert await store.update("unchanged", lambda old: (None, old), ttl=100) == b"x"
    await store.update("rewritten", put(b"y"), ttl=100)
    plain_gone = unchanged_gone = None
    while (plain_gone is None or unchanged_gone is None) and now() < started + ttl + 3.0:
        got = await store.get_many(["plain", "unchanged", "rewritten"])
        seen = now()  # each record was read before this moment
        assert got.get("rewritten") == b"y"
        for key, gone in (("plain", plain_gone), ("unchanged", unchanged_gone)):
            if key in got:
                assert gone is None, f"{key} came back"
            else:
                # Written after `started` with a ttl of 1 s: not gone before.
                assert seen >= started + ttl, f"{key} expired {seen - started:.3f} s after"
        if plain_gone is None and "plain" not in got:
            plain_gone = seen
        if unchanged_gone is None and "unchanged" not in got:
            unchanged_gone = seen
        await asyncio.sleep(0.02)
    assert plain_gone is not None, "a record with ttl=1 did not expire within 3 s more"
    # The no-change update did not extend it (memcached: the two writes may fall on
    # either side of one of its clock ticks).
    assert unchanged_gone is not None and abs(unchanged_gone - plain_gone) < 1.1
    assert await store.get("rewritten") == b"y"


# -- deadlines --------------------------------------------------------------------


async def test_a_past_deadline_raises_before_anything_is_done(store: Store) -> None:
    await store.update("k", put(b"v"))
    ops = store.ops
    calls: list[bytes | None] = []

    def record(old: bytes | None) -> tuple[bytes, None]:
        calls.append(old)
        return b"changed", None

    for deadline in (now(), now() - 10.0):
        with pytest.raises(StoreError, match="deadline"):
            await store.get("k", deadline=deadline)
        with pytest.raises(StoreError, match="deadline"):
            await store.get_many(["k", "j"], deadline=deadline)
        with pytest.raises(StoreError, match="deadline"):
            await store.update("k", record, ttl=5, deadline=deadline)
        with pytest.raises(StoreError, match="deadline"):
            await store.delete("k", deadline=deadline)
        with pytest.raises(StoreError, match="deadline"):
            await store.health("k", deadline=deadline)
    assert calls == []
    assert store.ops == ops  # nothing was sent
    assert await store.get("k") == b"v"


async def test_calls_within_their_deadline_succeed(store: Store) -> None:
    deadline = now() + 5.0
    assert await store.update("k", incr, ttl=60, deadline=deadline) == 1
    assert await store.get("k", deadline=deadline) == b"1"
    assert await store.get_many(["k", "x"], deadline=deadline) == {"k": b"1"}
    assert isinstance(await store.health("k", deadline=deadline), StoreHealth)
    await store.delete("k", deadline=deadline)
    assert await store.get("k", deadline=deadline) is None
    assert now() < deadline


# -- health -----------------------------------------------------------------------


async def test_health_shape(store: Store) -> None:
    health = await store.health("some key")
    assert isinstance(health, StoreHealth)
    with pytest.raises(AttributeError):
        health.uptime = 0.0  # type: ignore[misc]  # frozen
    assert isinstance(health.server, str) and health.server
    assert isinstance(health.uptime, float) and health.uptime >= 0
    assert isinstance(health.evictions, int) and health.evictions >= 0
    assert isinstance(health.flushes, int) and health.flushes >= 0
    assert isinstance(health.pid, int) and health.pid > 0
    # Server and test run on one host here: the server's clock is ours.
    assert abs(health.started + health.uptime - time.time()) < 2.5
    if store.name == "memory":
        assert health.server == "memory" and health.pid == os.getpid()
        assert health.evictions == 0 and health.flushes == 0

    again = await store.health("another key", since=now())  # one server: the same one
    assert again.server == health.server
    assert (again.started, again.pid) == (health.started, health.pid)
    assert again.uptime >= health.uptime
    assert not again.lost_since(health)


def test_lost_since() -> None:
    base = StoreHealth(server="h:1", uptime=100.0, evictions=5, started=1000.0, pid=7)
    assert not base.lost_since(base)
    assert not StoreHealth("h:1", 250.0, 5, 1000.0, 7).lost_since(base)  # just older
    for changed in (
        StoreHealth("h:2", 100.0, 5, 1000.0, 7),  # another server
        StoreHealth("h:1", 1.0, 5, 1099.0, 7),  # restarted (a new start time)
        StoreHealth("h:1", 1.0, 5, 1000.0, 8),  # restarted within the same second
        StoreHealth("h:1", 120.0, 6, 1000.0, 7),  # an eviction
        StoreHealth("h:1", 120.0, 5, 1000.0, 7, flushes=1),  # flush_all
    ):
        assert changed.lost_since(base), changed
