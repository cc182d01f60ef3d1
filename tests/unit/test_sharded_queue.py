"""ShardedQueue over in-memory children: placement, fairness, routing, dead-letter ids,
and outages (a child switched off raises QueueUnavailable, like a dead server).

The contract suite runs it over InnoDB (the "sharded" dialect in tests/conftest.py);
tests/faults/test_shards.py kills a real server."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections import Counter
from typing import Any

import pytest

from mvalve_async.errors import QueueUnavailable
from mvalve_async.interfaces import Lane, Lease, Queue, Row
from mvalve_async.queues.memory import MemoryQueue
from mvalve_async.queues.sharded import HashRing, ShardedQueue

LEASE = 30.0


class Switch:
    """A child queue that can be switched off: then every call raises QueueUnavailable."""

    name = "memory"

    def __init__(self) -> None:
        self.inner = MemoryQueue()
        self.settings = self.inner.settings
        self.down = False
        self.calls: Counter[str] = Counter()

    def schema_sql(self) -> str:
        return self.inner.schema_sql()

    def __getattr__(self, attr: str) -> Any:
        target = getattr(self.inner, attr)
        if not inspect.iscoroutinefunction(target):
            return target

        async def call(*args: Any, **kwargs: Any) -> Any:
            self.calls[attr] += 1
            if self.down:
                raise QueueUnavailable("switched off")
            return await target(*args, **kwargs)

        return call


def make(n: int = 2, **kw: Any) -> tuple[ShardedQueue, list[Switch]]:
    children = [Switch() for _ in range(n)]
    kw.setdefault("backoff", (0.05,))
    return ShardedQueue(children, **kw), children  # type: ignore[arg-type]


def dests_on(q: ShardedQueue, shard: int, count: int) -> list[str]:
    out = [d for d in (f"dest-{i}" for i in range(1000)) if q.shard_of(d) == shard]
    return out[:count]


async def claim_all(q: Queue, limit: int = 100) -> list[Lease]:
    return await q.claim(limit, time.time(), LEASE)


async def test_each_destination_lives_on_one_shard_and_keeps_its_order() -> None:
    q, children = make(3)
    rows = [Row(f"d{k}", f"{k}:{i}".encode()) for i in range(10) for k in range(12)]
    await q.insert(Lane.NORMAL, rows)
    for index, child in enumerate(children):
        held = {r["destination"] for r in await child.inner.peek(1000)}
        assert held and all(q.shard_of(d) == index for d in held)
    got: dict[str, list[int]] = {}
    while leases := await q.claim(7, time.time(), LEASE):
        for x in leases:
            got.setdefault(x.destination, []).append(int(x.blob.split(b":")[1]))
            assert q.shard_of(x.destination) == x.shard
        await q.ack(leases)
    assert got == {f"d{k}": list(range(10)) for k in range(12)}


async def test_claims_serve_every_shard_in_turn_and_top_up() -> None:
    q, _ = make(2)
    a, b = dests_on(q, 0, 1)[0], dests_on(q, 1, 1)[0]
    await q.insert(Lane.NORMAL, [Row(a, b"a")] * 20 + [Row(b, b"b")] * 20)
    ones = [(await q.claim(1, time.time(), LEASE))[0].shard for _ in range(6)]
    assert sorted(Counter(ones).values()) == [3, 3]  # limit 1: the shards take turns
    four = await q.claim(4, time.time(), LEASE)
    assert Counter(x.shard for x in four) == {0: 2, 1: 2}
    # shard 0 drained: a claim is filled from shard 1 (a top-up, not a short batch)
    while any(x.shard == 0 for x in await q.claim(50, time.time(), LEASE)):
        pass
    await q.insert(Lane.NORMAL, [Row(b, b"b")] * 10)
    assert len(await q.claim(8, time.time(), LEASE)) == 8


async def test_one_claim_merges_lanes_across_shards() -> None:
    q, _ = make(2)
    a, b = dests_on(q, 0, 1)[0], dests_on(q, 1, 1)[0]
    now = time.time()
    await q.insert(Lane.NORMAL, [Row(a, b"normal")])
    await q.insert(Lane.TIMED, [Row(b, b"due", now - 1), Row(a, b"due-earlier", now - 2)])
    await q.insert(Lane.EMERGENCY, [Row(b, b"emergency")])
    leases = await q.claim(10, now, LEASE)
    assert [x.blob for x in leases] == [b"emergency", b"due-earlier", b"due", b"normal"]


async def test_settling_goes_to_the_lease_shard_and_move_stays_there() -> None:
    q, children = make(2)
    a, b = dests_on(q, 0, 1)[0], dests_on(q, 1, 1)[0]
    await q.insert(Lane.NORMAL, [Row(a, b"a"), Row(b, b"b")])
    leases = {x.destination: x for x in await claim_all(q)}
    await q.release(leases[a], delay=1000)
    at = time.time() + 100
    await q.move(leases[b], at, reserved=True)
    assert [r["lane"] for r in await children[1].inner.peek(10)] == ["timed"]
    assert await children[0].inner.peek(10, Lane.TIMED) == []
    assert await q.shift(b, time.time(), 5.0) == 1  # routed by destination
    (moved,) = await q.claim(10, at + 5.001, LEASE)
    assert moved.shard == 1 and moved.ready == pytest.approx(at + 5)
    await q.ack([moved])
    assert children[1].calls["ack"] == 1 and children[0].calls["ack"] == 0


async def test_dead_letter_ids_are_unique_across_shards_and_requeue_decodes_them() -> None:
    q, children = make(2)
    a, b = dests_on(q, 0, 1)[0], dests_on(q, 1, 1)[0]
    await q.insert(Lane.NORMAL, [Row(a, b"a"), Row(b, b"b")])
    await q.dead(await claim_all(q), "test")
    local = [(await c.inner.dead_letters())[0]["id"] for c in children]
    dead = await q.dead_letters()
    ids = {d["destination"]: d["id"] for d in dead}
    assert len(set(ids.values())) == 2
    assert ids == {a: local[0] * 2 + 0, b: local[1] * 2 + 1}
    assert {d["shard"] for d in dead} == {"shard0", "shard1"}
    assert await q.requeue_dead([ids[b]]) == 1
    (back,) = await claim_all(q)
    assert back.destination == b and back.shard == 1
    assert [d["destination"] for d in await q.dead_letters()] == [a]
    assert await q.requeue_dead() == 1 and await q.dead_letters() == []


async def test_stats_and_peek_aggregate_every_shard() -> None:
    q, _ = make(2)
    a, b = dests_on(q, 0, 1)[0], dests_on(q, 1, 1)[0]
    await q.insert(Lane.NORMAL, [Row(a, b"1"), Row(a, b"2"), Row(b, b"3")])
    await q.insert(Lane.EMERGENCY, [Row(b, b"e")])
    stats = await q.stats(time.time())
    assert stats.queued[Lane.NORMAL] == 3 and stats.queued[Lane.EMERGENCY] == 1
    assert stats.by_destination[a]["normal"] == 2
    rows = await q.peek(10)
    assert rows[0]["blob"] == b"e" and rows[0]["table"].endswith("@shard1")
    assert len(await q.peek(2)) == 2
    assert await q.purge(destination=a) == 2 and await q.purge() == 2


async def test_a_down_shard_is_skipped_then_served_again_when_it_returns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "mvalve_async.queues.sharded")
    q, children = make(2)
    up, down = dests_on(q, 0, 1)[0], dests_on(q, 1, 1)[0]
    await q.insert(Lane.NORMAL, [Row(up, b"u")] * 10 + [Row(down, b"d")] * 10)
    held = [x for x in await q.claim(4, time.time(), LEASE) if x.shard == 1]
    assert held

    children[1].down = True
    served = []
    for _ in range(3):  # claims and polls keep serving shard 0
        assert (await q.poll(time.time()))[0]
        served += await q.claim(2, time.time(), LEASE)
    assert served and {x.shard for x in served} == {0}
    warnings = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(warnings) == 1 and "shard1" in warnings[0].getMessage()  # once per outage

    # writers of its destinations fail at once; nothing is re-routed to shard 0
    before = children[0].calls["insert"]
    with pytest.raises(QueueUnavailable, match="shard1"):
        await q.insert(Lane.NORMAL, [Row(down, b"late")])
    with pytest.raises(QueueUnavailable):  # a batch touching it is refused whole
        await q.insert(Lane.NORMAL, [Row(up, b"x"), Row(down, b"y")])
    assert children[0].calls["insert"] == before
    await q.insert(Lane.NORMAL, [Row(up, b"fine")])  # the live shard still takes writes

    # an ack for the down shard waits for it instead of failing the reader
    await q.ack(held)
    assert len(q.shards[1].pending_acks) == len(held)

    children[1].down = False
    probe = q.shards[1].probe
    assert probe is not None
    await asyncio.wait_for(probe, 5)  # the background probe finds it back
    assert q.shards[1].up
    assert q.shards[1].pending_acks == []
    assert [r for r in caplog.records if "is back" in r.getMessage()]
    rest = [x for x in await claim_all(q) if x.shard == 1]
    assert len(rest) == 10 - len(held)  # the acked ones are gone, the others are served
    await q.close()


async def test_every_shard_down_raises_and_connect_needs_just_one() -> None:
    q, children = make(2)
    children[0].down = True
    await q.connect()  # one shard is enough to start
    assert not q.shards[0].up and q.shards[1].up
    children[1].down = True
    with pytest.raises(QueueUnavailable):
        await q.claim(5, time.time(), LEASE)
    with pytest.raises(QueueUnavailable, match="every queue shard is down"):
        await q.poll(time.time())
    with pytest.raises(QueueUnavailable):
        await q.stats(time.time())  # admin calls need every shard
    await q.close()
    with pytest.raises(QueueUnavailable, match="no queue shard"):
        await q.connect()
    await q.close()


async def test_a_hung_shard_counts_as_down_after_the_timeout() -> None:
    q, children = make(2, timeout=0.2)
    hang = asyncio.Event()

    async def slow_claim(*args: Any) -> list[Lease]:
        await hang.wait()
        return []

    children[1].inner.claim = slow_claim  # type: ignore[method-assign]
    await q.insert(Lane.NORMAL, [Row(dests_on(q, 0, 1)[0], b"x")])
    t0 = time.monotonic()
    got = await q.claim(10, time.time(), LEASE)
    assert [x.blob for x in got] == [b"x"] and time.monotonic() - t0 < 1.0
    assert not q.shards[1].up
    await q.close()


def test_adding_a_shard_moves_about_one_in_n_destinations() -> None:
    keys = [f"db{i}:3306" for i in range(4)]
    before, after = HashRing(keys), HashRing([*keys, "db4:3306"])
    dests = [f"customer-{i}" for i in range(5000)]
    moved = [d for d in dests if before.lookup(d) != after.lookup(d)]
    assert all(after.lookup(d) == 4 for d in moved)  # only to the new shard
    assert 0.12 < len(moved) / len(dests) < 0.28  # ideal 1/5
    spread = Counter(before.lookup(d) for d in dests)
    assert min(spread.values()) > 0.6 * len(dests) / 4  # roughly even


def test_shards_must_share_a_dialect_and_have_distinct_keys() -> None:
    with pytest.raises(ValueError, match="one dialect"):
        ShardedQueue([MemoryQueue(), _Named()])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="distinct key"):
        ShardedQueue([MemoryQueue(), MemoryQueue()], keys=["x", "x"])
    with pytest.raises(ValueError):
        ShardedQueue([])


class _Named(MemoryQueue):
    name = "innodb"
