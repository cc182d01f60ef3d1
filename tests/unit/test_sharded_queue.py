"""ShardedQueue over in-memory children: placement, claims per destination, scans,
routing, dead-letter ids, and outages (a child switched off raises QueueUnavailable,
like a dead server).

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
from mvalve_async.interfaces import Claimed, Lane, Lease, Queue, Row, Scan, Want
from mvalve_async.queues.memory import MemoryQueue
from mvalve_async.queues.sharded import HashRing, ShardedQueue

LEASE = 30.0


class Tick:
    """The children's clock: the host's, but a millisecond later at every reading, so
    that rows inserted one after the other on different shards have ordered
    `created` values (the memory queue's are µs + its own row id)."""

    error = 0.0

    def __init__(self) -> None:
        self.t = time.time()

    def now(self) -> float:
        self.t = max(time.time(), self.t + 0.001)
        return self.t


class Switch:
    """A child queue that can be switched off: then every call raises QueueUnavailable.
    It records each call's arguments, and its scans behave like an incremental
    dialect's: each returns a mark of its own, and one given a mark is not full."""

    name = "memory"

    def __init__(self, label: str, clock: Tick) -> None:
        self.inner = MemoryQueue()
        self.inner.clock = clock  # type: ignore[assignment]
        self.label = label
        self.settings = self.inner.settings
        self.down = False
        self.calls: Counter[str] = Counter()
        self.args: dict[str, list[tuple[tuple[Any, ...], dict[str, Any]]]] = {}
        self.marks: list[Any] = []  # the mark each scan was given
        self._scans = 0

    def schema_sql(self) -> str:
        return self.inner.schema_sql()

    async def scan(self, now: float, mark: Any = None) -> Scan:
        self.calls["scan"] += 1
        self.marks.append(mark)
        if self.down:
            raise QueueUnavailable("switched off")
        result = await self.inner.scan(now, mark)
        self._scans += 1
        result.mark, result.full = f"{self.label}/{self._scans}", mark is None
        return result

    def __getattr__(self, attr: str) -> Any:
        target = getattr(self.inner, attr)
        if not inspect.iscoroutinefunction(target):
            return target

        async def call(*args: Any, **kwargs: Any) -> Any:
            self.calls[attr] += 1
            self.args.setdefault(attr, []).append((args, kwargs))
            if self.down:
                raise QueueUnavailable("switched off")
            return await target(*args, **kwargs)

        return call

    def claimed(self) -> list[tuple[list[Want], int, list[Lease]]]:
        """(wants, emergency, acks) of every claim it was asked."""
        return [
            (list(args[0]), kw.get("emergency", 0), list(kw.get("acks", ())))
            for args, kw in self.args.get("claim", [])
        ]


def make(n: int = 2, **kw: Any) -> tuple[ShardedQueue, list[Switch]]:
    clock = Tick()
    children = [Switch(f"shard{i}", clock) for i in range(n)]
    kw.setdefault("backoff", (0.05,))
    return ShardedQueue(children, **kw), children  # type: ignore[arg-type]


def dests_on(q: ShardedQueue, shard: int, count: int) -> list[str]:
    out = [d for d in (f"dest-{i}" for i in range(1000)) if q.shard_of(d) == shard]
    return out[:count]


def blobs(leases: list[Lease]) -> list[bytes]:
    return [x.blob for x in leases]


async def claim_all(q: Queue, limit: int = 100, now: float | None = None) -> list[Lease]:
    """The emergency lane's rows, then every destination a full scan finds."""
    now = time.time() if now is None else now
    scan = await q.scan(now)
    wants = [Want(d, limit) for d in sorted(scan.found)]
    return await q.claim(wants, now, LEASE, emergency=limit)


async def back_up(q: ShardedQueue, children: list[Switch], index: int) -> None:
    """Switch shard `index` on again and wait for its probe to find it back."""
    children[index].down = False
    probe = q.shards[index].probe
    assert probe is not None
    await asyncio.wait_for(probe, 5)
    assert q.shards[index].up


# -- placement and claims -----------------------------------------------------------


async def test_each_destination_lives_on_one_shard_and_keeps_its_order() -> None:
    q, children = make(3)
    rows = [Row(f"d{k}", f"{k}:{i}".encode()) for i in range(10) for k in range(12)]
    await q.insert(Lane.NORMAL, rows)
    for index, child in enumerate(children):
        held = {r["destination"] for r in await child.inner.peek(1000)}
        assert held and all(q.shard_of(d) == index for d in held)
    got: dict[str, list[int]] = {}
    while leases := await claim_all(q, limit=3):
        for x in leases:
            got.setdefault(x.destination, []).append(int(x.blob.split(b":")[1]))
            assert q.shard_of(x.destination) == x.shard
        await q.ack(leases)
    assert got == {f"d{k}": list(range(10)) for k in range(12)}


async def test_each_want_goes_to_its_destinations_shard_alone() -> None:
    """Fairness is per destination: a want is sent to the shard holding its
    destination and nowhere else; a shard with no want (and no emergency asked, no
    ack) is not asked at all. The leases come back in the wants' order."""
    q, children = make(3)
    a, a2 = dests_on(q, 0, 2)
    (b,) = dests_on(q, 1, 1)
    await q.insert(Lane.NORMAL, [Row(d, f"{d}:{i}".encode()) for d in (a, a2, b) for i in range(5)])
    leases = await q.claim([Want(a, 3), Want(b, 2), Want(a2, 1)], time.time(), LEASE)
    assert blobs(leases) == [
        f"{a}:0".encode(), f"{a}:1".encode(), f"{a}:2".encode(),
        f"{b}:0".encode(), f"{b}:1".encode(), f"{a2}:0".encode(),
    ]  # fmt: skip
    assert [x.shard for x in leases] == [0, 0, 0, 1, 1, 0]
    assert children[0].claimed() == [([Want(a, 3), Want(a2, 1)], 0, [])]
    assert children[1].claimed() == [([Want(b, 2)], 0, [])]
    assert children[2].claimed() == []
    # the emergency lane is asked on every live shard, with only that shard's wants
    more = await q.claim([Want(b, 10)], time.time(), LEASE, emergency=5)
    assert blobs(more) == [f"{b}:{i}".encode() for i in (2, 3, 4)]
    assert [c.claimed()[-1][:2] for c in children] == [([], 5), ([Want(b, 10)], 5), ([], 5)]


async def test_emergency_rows_of_every_shard_first_by_insertion_then_each_want() -> None:
    q, children = make(3)
    a, b, c = dests_on(q, 0, 1)[0], dests_on(q, 1, 1)[0], dests_on(q, 2, 1)[0]
    now = time.time()
    await q.insert(Lane.NORMAL, [Row(a, b"a-normal"), Row(b, b"b-normal")])
    await q.insert(Lane.TIMED, [Row(b, b"b-due", now - 1), Row(a, b"a-due", now - 2)])
    await q.insert(Lane.TIMED, [Row(a, b"a-future", now + 3600)])
    for i, dest in enumerate((b, a, b, c)):  # on shards 1, 0, 1, 2, in this order
        await q.insert(Lane.EMERGENCY, [Row(dest, f"e{i}".encode())])
    leases = await q.claim([Want(b, 10), Want(a, 10)], now, LEASE, emergency=3)
    assert blobs(leases) == [b"e0", b"e1", b"e2", b"b-due", b"b-normal", b"a-due", b"a-normal"]
    assert [x.lane for x in leases[:4]] == [Lane.EMERGENCY] * 3 + [Lane.TIMED]
    # shard 2 leased e3 too (each shard is asked for 3): given back, its count as before
    stats = await q.stats(now)
    assert stats.leased[Lane.EMERGENCY] == 3 and stats.queued[Lane.EMERGENCY] == 1
    assert children[2].calls["give_back"] == 1
    (e3,) = await q.claim([], now, LEASE, emergency=3)
    assert e3.blob == b"e3" and e3.shard == 2 and e3.deliveries == 1


async def test_settling_goes_to_the_lease_shard() -> None:
    q, children = make(2)
    a, b = dests_on(q, 0, 1)[0], dests_on(q, 1, 1)[0]
    await q.insert(Lane.NORMAL, [Row(a, b"a1"), Row(b, b"b1"), Row(a, b"a2"), Row(b, b"b2")])
    leases = await claim_all(q)
    mine = {x.blob: x for x in leases}
    assert {x.destination: x.shard for x in leases} == {a: 0, b: 1}
    await q.release(mine[b"a1"], delay=1000)
    await q.give_back([mine[b"b1"]])
    await q.dead([mine[b"a2"]], "test")
    await q.ack([mine[b"b2"]])
    assert [c.calls["release"] for c in children] == [1, 0]
    assert [c.calls["give_back"] for c in children] == [0, 1]
    assert [c.calls["dead"] for c in children] == [1, 0]
    assert [c.calls["ack"] for c in children] == [0, 1]
    (again,) = await q.claim([Want(a, 5), Want(b, 5)], time.time(), LEASE)
    assert again.blob == b"b1" and again.shard == 1 and again.deliveries == 1
    assert [d["blob"] for d in await children[0].inner.dead_letters()] == [b"a2"]


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


# -- scans ----------------------------------------------------------------------------


async def test_scan_merges_every_shards_scan_with_its_own_mark() -> None:
    q, children = make(2)
    a, b = dests_on(q, 0, 1)[0], dests_on(q, 1, 1)[0]
    now = time.time()
    await q.insert(Lane.NORMAL, [Row(a, b"1"), Row(b, b"2")])
    await q.insert(Lane.TIMED, [Row(a, b"3", now + 50), Row(b, b"4", now + 20)])
    await q.insert(Lane.EMERGENCY, [Row(b, b"e")])
    # a destination that moved shards keeps its old rows on its old shard: "x" on both
    await children[0].inner.insert(Lane.TIMED, [Row("x", b"5", now + 40)])
    await children[1].inner.insert(Lane.NORMAL, [Row("x", b"6"), Row("x", b"7")])
    first = await q.scan(now)
    assert first.full and first.emergency and first.next_due == pytest.approx(now + 20)
    assert set(first.found) == {a, b, "x"}
    assert (first.found["x"].rows, first.found["x"].ready) == (3, 0.0)  # summed; earliest
    assert first.found[a].rows == 2 and first.found[b].rows == 2
    assert [c.marks for c in children] == [[None], [None]]
    second = await q.scan(now, first.mark)
    assert not second.full  # each shard was scanned from its own mark
    assert [c.marks[-1] for c in children] == ["shard0/1", "shard1/1"]
    await q.scan(now, second.mark)
    assert [c.marks[-1] for c in children] == ["shard0/2", "shard1/2"]


async def test_a_shard_down_during_a_scan_is_left_out_then_scanned_in_full() -> None:
    q, children = make(2)
    a, b = dests_on(q, 0, 1)[0], dests_on(q, 1, 1)[0]
    await q.insert(Lane.NORMAL, [Row(a, b"1"), Row(b, b"2")])
    first = await q.scan(time.time())
    children[1].down = True
    partial = await q.scan(time.time(), first.mark)  # shard 1 fails in this scan
    assert set(partial.found) <= {a} and not partial.full and not q.shards[1].up
    await back_up(q, children, 1)
    again = await q.scan(time.time(), partial.mark)
    assert children[1].marks[-1] is None  # in full: rows may have changed meanwhile
    assert children[0].marks[-1] == "shard0/2"
    assert b in again.found


async def test_a_shard_marked_down_by_another_call_is_rescanned_in_full() -> None:
    """A shard can be found down by a claim (or an insert, an ack) rather than by a
    scan; the scans that skip it meanwhile must not keep its old mark either."""
    q, children = make(2)
    a, b = dests_on(q, 0, 1)[0], dests_on(q, 1, 1)[0]
    await q.insert(Lane.NORMAL, [Row(a, b"1"), Row(b, b"2")])
    first = await q.scan(time.time())
    children[1].down = True
    assert await q.claim([Want(b, 1)], time.time(), LEASE) == []  # marks shard 1 down
    assert not q.shards[1].up
    skipped = await q.scan(time.time(), first.mark)
    assert set(skipped.found) == {a} and not skipped.full
    await back_up(q, children, 1)
    await q.scan(time.time(), skipped.mark)
    assert children[1].marks[-1] is None  # scanned in full after its outage


async def test_a_shard_down_and_back_between_two_scans_is_rescanned_in_full() -> None:
    """No scan ran during the outage: the next one must still scan that shard in
    full (a server back from an outage may have lost or renumbered rows)."""
    q, children = make(2)
    a, b = dests_on(q, 0, 1)[0], dests_on(q, 1, 1)[0]
    await q.insert(Lane.NORMAL, [Row(a, b"1"), Row(b, b"2")])
    first = await q.scan(time.time())
    children[1].down = True
    with pytest.raises(QueueUnavailable):
        await q.insert(Lane.NORMAL, [Row(b, b"3")])  # marks shard 1 down
    assert not q.shards[1].up
    await back_up(q, children, 1)
    await q.scan(time.time(), first.mark)
    assert children[1].marks[-1] is None


# -- outages --------------------------------------------------------------------------


async def test_a_down_shard_is_skipped_then_served_again_when_it_returns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "mvalve_async.queues.sharded")
    q, children = make(2)
    up, down = dests_on(q, 0, 1)[0], dests_on(q, 1, 1)[0]
    await q.insert(Lane.NORMAL, [Row(up, b"u")] * 10 + [Row(down, b"d")] * 10)
    wants = [Want(up, 2), Want(down, 2)]
    held = [x for x in await q.claim(wants, time.time(), LEASE) if x.shard == 1]
    assert len(held) == 2

    children[1].down = True
    served = []
    for _ in range(3):  # claims and scans keep serving shard 0
        scan = await q.scan(time.time())
        assert set(scan.found) == {up} and not scan.full
        served += await q.claim(wants, time.time(), LEASE, emergency=1)
    assert len(served) == 6 and {x.shard for x in served} == {0}
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
    assert q.shards[1].pending_acks == held

    await back_up(q, children, 1)
    assert q.shards[1].pending_acks == []
    assert [r for r in caplog.records if "is back" in r.getMessage()]
    rest = [x for x in await claim_all(q) if x.shard == 1]
    assert len(rest) == 10 - len(held)  # the acked ones are gone, the others are served
    await q.close()


async def test_a_claims_acks_go_with_their_shard_and_wait_for_a_down_one() -> None:
    q, children = make(2)
    a, b = dests_on(q, 0, 1)[0], dests_on(q, 1, 1)[0]
    await q.insert(Lane.NORMAL, [Row(a, f"a{i}".encode()) for i in range(5)])
    await q.insert(Lane.NORMAL, [Row(b, f"b{i}".encode()) for i in range(5)])
    wants = [Want(a, 1), Want(b, 1)]
    la, lb = await q.claim(wants, time.time(), LEASE)
    # each shard's acks ride on that shard's claim; a shard with acks only is asked too
    got = await q.claim([Want(a, 1)], time.time(), LEASE, acks=[la, lb])
    assert blobs(got) == [b"a1"]
    assert children[0].claimed()[-1] == ([Want(a, 1)], 0, [la])
    assert children[1].claimed()[-1] == ([], 0, [lb])
    stats = await q.stats(time.time())
    assert stats.queued[Lane.NORMAL] == 7 and stats.leased[Lane.NORMAL] == 1

    # shard 1 fails during the claim: its acks are kept for when it is back
    la2, lb2 = await q.claim(wants, time.time(), LEASE, acks=got)
    children[1].down = True
    assert blobs(await q.claim(wants, time.time(), LEASE, acks=[la2, lb2])) == [b"a3"]
    assert not q.shards[1].up and q.shards[1].pending_acks == [lb2]
    # while it is known to be down it is not asked: its acks join the others
    asked = children[1].calls["claim"]
    (lb3,) = await children[1].inner.claim([Want(b, 1)], time.time(), LEASE)
    lb3.shard = 1
    assert blobs(await q.claim([Want(b, 1)], time.time(), LEASE, acks=[lb3])) == []
    assert children[1].calls["claim"] == asked
    assert q.shards[1].pending_acks == [lb2, lb3]

    await back_up(q, children, 1)  # the probe sends them
    assert q.shards[1].pending_acks == []
    left = await q.claim([Want(b, 10)], time.time(), LEASE)
    assert blobs(left) == [b"b3", b"b4"]  # b0 acked before the outage, b1 and b2 since
    await q.close()


async def test_every_shard_down_raises_and_connect_needs_just_one() -> None:
    q, children = make(2)
    children[0].down = True
    await q.connect()  # one shard is enough to start
    assert not q.shards[0].up and q.shards[1].up
    children[1].down = True
    with pytest.raises(QueueUnavailable, match="every queue shard is down"):
        await q.scan(time.time())  # the last one fails in this scan
    assert not q.shards[1].up
    with pytest.raises(QueueUnavailable, match="every queue shard is down"):
        await q.claim([Want(dests_on(q, 1, 1)[0], 5)], time.time(), LEASE)
    with pytest.raises(QueueUnavailable, match="every queue shard is down"):
        await q.claim([], time.time(), LEASE, emergency=5)
    with pytest.raises(QueueUnavailable):
        await q.stats(time.time())  # admin calls need every shard
    await q.close()
    with pytest.raises(QueueUnavailable, match="no queue shard"):
        await q.connect()
    await q.close()


async def test_a_shards_cut_comes_through() -> None:
    """A child that ran out of capacity (q4m's owners) names the wants it cut: the
    sharded claim passes them on, so readers keep those destinations in line."""
    q, children = make(2)
    one, other = dests_on(q, 0, 1)[0], dests_on(q, 1, 1)[0]
    await q.insert(Lane.NORMAL, [Row(one, b"a"), Row(other, b"b")])
    real = children[0].inner.claim

    async def capped(*args: Any, **kwargs: Any) -> Claimed:
        got = await real(*args, **kwargs)
        return Claimed(got, [w.destination for w in args[0]], cut_emergency=True)

    children[0].inner.claim = capped  # type: ignore[method-assign]
    got = await q.claim([Want(one, 5), Want(other, 5)], time.time(), LEASE, emergency=1)
    assert blobs(got) == [b"a", b"b"]
    assert got.cut == {one} and got.cut_emergency
    again = await q.claim([Want(other, 5)], time.time(), LEASE)
    assert again == [] and again.cut == set() and not again.cut_emergency


async def test_a_hung_shard_counts_as_down_after_the_timeout() -> None:
    q, children = make(2, timeout=0.2)
    hang = asyncio.Event()

    async def slow_claim(*args: Any, **kwargs: Any) -> Claimed:
        await hang.wait()
        return Claimed()

    children[1].inner.claim = slow_claim  # type: ignore[method-assign]
    await q.insert(Lane.EMERGENCY, [Row(dests_on(q, 0, 1)[0], b"x")])
    t0 = time.monotonic()
    got = await q.claim([], time.time(), LEASE, emergency=10)  # asks every shard
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
