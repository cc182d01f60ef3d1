"""The Queue contract: every dialect must pass every test here."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from mvalve_async.interfaces import Claimed, Lane, Lease, Queue, Row, Want

LEASE = 30.0


def row(dest: str, body: bytes, ready: float | None = None) -> Row:
    return Row(dest, body, ready)


async def claim_all(
    q: Queue, now: float | None = None, limit: int = 100, lease: float = LEASE
) -> list[Lease]:
    """Every claimable row: the emergency lane's, then every destination's (as a
    full scan finds them, by name) up to `limit` each."""
    now = q.clock.now() if now is None else now
    scan = await q.scan(now)
    wants = [Want(d, limit) for d in sorted(scan.found)]
    return await q.claim(wants, now, lease, emergency=limit)


def blobs(leases: Sequence[Lease]) -> list[bytes]:
    return [x.blob for x in leases]


async def test_insert_claim_ack_round_trip(queue: Queue) -> None:
    await queue.insert(Lane.NORMAL, [row("a", b"\x00\x01\xff"), row("b", b"two")])
    leases = await claim_all(queue)
    assert [(x.destination, x.blob, x.deliveries, x.lane) for x in leases] == [
        ("a", b"\x00\x01\xff", 1, Lane.NORMAL),
        ("b", b"two", 1, Lane.NORMAL),
    ]
    assert await claim_all(queue) == []  # leased rows are invisible
    await queue.ack(leases)
    stats = await queue.stats(queue.clock.now())
    assert sum(stats.queued.values()) == 0 and sum(stats.leased.values()) == 0


async def test_destinations_and_blobs_come_back_byte_for_byte(queue: Queue) -> None:
    # innodb packs a claimed row's numbers into one column, and a scan's union mixes
    # numbers and names: spaces, digits and multi-byte characters in the destination,
    # and any byte in the blob, must survive both.
    now = queue.clock.now()
    dests = ["carrier 7 b", "été-ñ 中 ☎", "9 9"]
    blobs_in = [b" 12 34 ", b"\x00 \xff\x00", b""]
    await queue.insert(Lane.NORMAL, [row(d, b) for d, b in zip(dests, blobs_in, strict=True)])
    await queue.insert(Lane.TIMED, [row(dests[1], b"\x00 3 4 5 6 7 ", now - 1)])
    scan = await queue.scan(now)
    assert set(scan.found) == set(dests)
    leases = await queue.claim([Want(d, 10) for d in dests], now, LEASE)
    assert [(x.destination, x.blob) for x in leases] == [
        (dests[0], blobs_in[0]),
        (dests[1], b"\x00 3 4 5 6 7 "),  # a destination's due timed rows come first
        (dests[1], blobs_in[1]),
        (dests[2], blobs_in[2]),
    ]
    assert leases[1].ready == pytest.approx(now - 1, abs=1e-5)
    await queue.ack(leases)


async def test_a_want_takes_only_its_destinations_oldest_rows(queue: Queue) -> None:
    await queue.insert(Lane.NORMAL, [row("hot", str(i).encode()) for i in range(50)])
    await queue.insert(Lane.NORMAL, [row("cold", b"c0"), row("hot", b"50"), row("cold", b"c1")])
    now = queue.clock.now()
    cold = await queue.claim([Want("cold", 5)], now, LEASE, emergency=5)
    assert blobs(cold) == [b"c0", b"c1"]
    assert isinstance(cold, Claimed) and cold.cut == set() and not cold.cut_emergency  # short
    first = await queue.claim([Want("hot", 4)], now, LEASE)
    assert blobs(first) == [b"0", b"1", b"2", b"3"]
    assert [x.deliveries for x in first] == [1] * 4
    second = await queue.claim([Want("hot", 3), Want("cold", 3)], now, LEASE)
    assert blobs(second) == [b"4", b"5", b"6"]  # cold's rows are leased: none left
    stats = await queue.stats(now)
    assert stats.by_destination["hot"]["normal"] == 51 - 7
    assert stats.by_destination["hot"]["leased"] == 7


async def test_lanes_priority_and_timed_ready(queue: Queue) -> None:
    now = queue.clock.now()
    await queue.insert(Lane.NORMAL, [row("t", b"normal")])
    await queue.insert(Lane.TIMED, [row("t", b"later", now + 3600), row("t", b"due", now - 1)])
    await queue.insert(Lane.EMERGENCY, [row("e", b"emerg")])
    leases = await queue.claim([Want("t", 10)], now, LEASE, emergency=10)
    assert blobs(leases) == [b"emerg", b"due", b"normal"]
    assert [x.lane for x in leases] == [Lane.EMERGENCY, Lane.TIMED, Lane.NORMAL]
    assert leases[1].ready == pytest.approx(now - 1, abs=1e-5)
    await queue.ack(leases)
    # the future row comes out only when due
    assert await queue.claim([Want("t", 10)], now + 3599, LEASE) == []
    later = await queue.claim([Want("t", 10)], now + 3601, LEASE)
    assert blobs(later) == [b"later"]


async def test_the_emergency_lane_is_claimed_without_wants(queue: Queue) -> None:
    await queue.insert(Lane.EMERGENCY, [row("x", b"e1"), row("y", b"e2"), row("x", b"e3")])
    await queue.insert(Lane.NORMAL, [row("x", b"n")])
    now = queue.clock.now()
    assert (await queue.scan(now)).emergency
    first = await queue.claim([], now, LEASE, emergency=2)
    assert blobs(first) == [b"e1", b"e2"]
    assert blobs(await queue.claim([], now, LEASE, emergency=5)) == [b"e3"]
    assert not (await queue.scan(now)).emergency
    assert await queue.claim([], now, LEASE) == []


async def test_timed_lane_orders_by_ready(queue: Queue) -> None:
    now = queue.clock.now()
    await queue.insert(Lane.TIMED, [row("a", b"3", now - 1), row("a", b"1", now - 3)])
    await queue.insert(Lane.TIMED, [row("a", b"2", now - 2)])
    assert blobs(await queue.claim([Want("a", 10)], now, LEASE)) == [b"1", b"2", b"3"]


async def test_full_scan_finds_every_destination_and_when_it_is_due(queue: Queue) -> None:
    now = queue.clock.now()
    empty = await queue.scan(now)
    assert empty.found == {} and not empty.emergency and empty.next_due is None and empty.full
    await queue.insert(Lane.NORMAL, [row("n", b"1"), row("n", b"2"), row("m", b"3")])
    await queue.insert(Lane.TIMED, [row("t", b"x", now + 50), row("d", b"y", now - 5)])
    await queue.insert(Lane.EMERGENCY, [row("e", b"z")])
    scan = await queue.scan(now)
    assert set(scan.found) == {"n", "m", "t", "d"} and scan.full and scan.emergency
    assert scan.found["n"].ready == 0 and scan.found["d"].ready == 0
    assert scan.found["t"].ready == pytest.approx(now + 50)
    assert scan.next_due == pytest.approx(now + 50)


async def test_an_incremental_scan_finds_what_is_new_or_came_due(queue: Queue) -> None:
    now = queue.clock.now()
    await queue.insert(Lane.NORMAL, [row("old", b"1")])
    await queue.insert(Lane.TIMED, [row("soon", b"2", now + 1)])
    first = await queue.scan(now)
    assert set(first.found) == {"old", "soon"}
    await queue.insert(Lane.NORMAL, [row("new", b"3"), row("new", b"4")])
    await queue.insert(Lane.TIMED, [row("now", b"5", now - 1)])
    later = now + 2  # "soon" came due meanwhile
    scan = await queue.scan(later, first.mark)
    assert {"new", "now", "soon"} <= set(scan.found)
    assert all(scan.found[d].ready == 0 for d in ("new", "now", "soon"))
    assert scan.found["new"].rows in (-1, 2)
    # nothing new: the next incremental scan has nothing due to add
    quiet = await queue.scan(later, scan.mark)
    assert set(quiet.found) <= {"old", "new", "now", "soon"}


async def test_expired_lease_is_redelivered(queue: Queue) -> None:
    await queue.insert(Lane.NORMAL, [row("a", b"x")])
    now = queue.clock.now()
    (first,) = await queue.claim([Want("a", 10)], now, 5.0)
    assert await queue.claim([Want("a", 10)], now + 4.9, 5.0) == []
    (again,) = await queue.claim([Want("a", 10)], now + 5.1, 5.0)
    assert again.blob == b"x" and again.deliveries == 2
    # the first consumer's late ack must not delete the row now leased to another
    await queue.ack([first])
    await queue.release(again)
    (third,) = await claim_all(queue, now + 5.2)
    assert third.deliveries == 3


async def test_release_and_release_with_delay(queue: Queue) -> None:
    await queue.insert(Lane.NORMAL, [row("a", b"x"), row("a", b"y")])
    first = await claim_all(queue, limit=1)
    assert blobs(first) == [b"x"]
    await queue.release(first[0])
    (lease,) = await claim_all(queue, limit=1)  # back at its place, counted again
    assert lease.blob == b"x" and lease.deliveries == 2
    await queue.release(lease, delay=60)
    second = await claim_all(queue)
    assert blobs(second) == [b"y"]  # a delayed retry lets the next go
    await queue.ack(second)
    (later,) = await claim_all(queue, queue.clock.now() + 61)
    assert later.blob == b"x" and later.deliveries == 3


async def test_given_back_rows_keep_their_place_and_their_count(queue: Queue) -> None:
    await queue.insert(Lane.NORMAL, [row("a", str(i).encode()) for i in range(5)])
    now = queue.clock.now()
    leases = await queue.claim([Want("a", 3)], now, LEASE)
    await queue.give_back(leases[1:])  # the first was handed out; the others never were
    again = await queue.claim([Want("a", 10)], now, LEASE)
    assert blobs(again) == [b"1", b"2", b"3", b"4"]
    assert [x.deliveries for x in again] == [1, 1, 1, 1]
    # a late give-back of a lease that moved on changes nothing
    await queue.give_back(leases[1:])
    stats = await queue.stats(now)
    assert stats.leased[Lane.NORMAL] == 5


async def test_acks_ride_with_a_claim(queue: Queue) -> None:
    await queue.insert(Lane.NORMAL, [row("a", b"1"), row("a", b"2"), row("b", b"3")])
    now = queue.clock.now()
    first = await queue.claim([Want("a", 1)], now, LEASE)
    second = await queue.claim([Want("a", 5), Want("b", 5)], now, LEASE, acks=first)
    assert blobs(second) == [b"2", b"3"]
    stats = await queue.stats(now)
    assert sum(stats.queued.values()) == 0 and sum(stats.leased.values()) == 2
    assert await queue.claim([], now, LEASE, acks=second) == []
    stats = await queue.stats(now)
    assert sum(stats.leased.values()) == 0


async def test_settling_a_lost_lease_does_nothing(queue: Queue) -> None:
    await queue.insert(Lane.NORMAL, [row("a", b"x")])
    now = queue.clock.now()
    (stale,) = await queue.claim([Want("a", 1)], now, 1.0)
    (current,) = await queue.claim([Want("a", 1)], now + 2, LEASE)
    await queue.dead([stale], "stale")
    await queue.release(stale)
    await queue.give_back([stale])
    assert (await queue.stats(now + 2)).dead == 0
    await queue.ack([current])
    assert await claim_all(queue, now + 100) == []


async def test_settling_many_claims_at_once_spares_a_stale_lease(queue: Queue) -> None:
    """Acks and dead letters of several claims go out together (batch-1 reads): each
    row matches its own claim's token, so a stale lease in the batch spares the row
    another claim now holds, even when that claim's token is in the same batch."""
    await queue.insert(Lane.NORMAL, [row("a", b"1"), row("a", b"2"), row("a", b"3")])
    now = queue.clock.now()
    (stale,) = await queue.claim([Want("a", 1)], now, 1.0)
    (second,) = await queue.claim([Want("a", 1)], now, LEASE)
    (third,) = await queue.claim([Want("a", 1)], now, LEASE)
    (again,) = await queue.claim([Want("a", 1)], now + 2, LEASE)  # row 1, a new token
    assert again.blob == stale.blob
    await queue.ack([stale, second])
    await queue.dead([stale, third], "test")
    assert [d["blob"] for d in await queue.dead_letters()] == [b"3"]
    stats = await queue.stats(now + 2)
    assert sum(stats.queued.values()) == 0 and sum(stats.leased.values()) == 1
    await queue.ack([again])
    assert await claim_all(queue, now + 100) == []


async def test_dead_letters_and_requeue(queue: Queue) -> None:
    await queue.insert(Lane.NORMAL, [row("a", b"bad"), row("b", b"worse")])
    leases = await claim_all(queue)
    await queue.dead(leases, "unreadable: test")
    dead = await queue.dead_letters()
    assert sorted((d["destination"], d["blob"], d["reason"]) for d in dead) == [
        ("a", b"bad", "unreadable: test"),
        ("b", b"worse", "unreadable: test"),
    ]
    assert all(d["lane"] == "normal" and d["deliveries"] == 1 for d in dead)
    assert (await queue.stats(queue.clock.now())).dead == 2
    assert await queue.requeue_dead([dead[0]["id"]]) == 1
    assert blobs(await claim_all(queue)) == [dead[0]["blob"]]
    assert await queue.purge_dead() == 1
    assert await queue.dead_letters() == []


async def test_stats_and_purge(queue: Queue) -> None:
    await queue.insert(Lane.NORMAL, [row("a", b"1"), row("a", b"2"), row("b", b"3")])
    await queue.insert(Lane.EMERGENCY, [row("b", b"4")])
    await queue.insert(Lane.TIMED, [row("c", b"5", queue.clock.now() + 50)])
    await queue.claim([], queue.clock.now(), LEASE, emergency=1)  # leases the emergency row
    stats = await queue.stats(queue.clock.now())
    assert stats.queued[Lane.NORMAL] == 3 and stats.leased[Lane.EMERGENCY] == 1
    assert stats.by_destination["a"]["normal"] == 2
    assert stats.next_due == pytest.approx(queue.clock.now() + 50, abs=1)
    assert await queue.purge(destination="a") == 2
    assert await queue.purge(lane=Lane.EMERGENCY) == 1
    assert await queue.purge() == 2


async def test_concurrent_claims_never_share_a_row(queue: Queue) -> None:
    await queue.insert(Lane.NORMAL, [row("a", str(i).encode()) for i in range(120)])
    await queue.insert(Lane.NORMAL, [row("b", str(i).encode()) for i in range(120, 200)])
    seen: list[bytes] = []

    async def consumer() -> None:
        while True:
            leases = await queue.claim([Want("a", 7), Want("b", 7)], queue.clock.now(), LEASE)
            if not leases:
                return
            seen.extend(x.blob for x in leases)
            await queue.ack(leases)

    await asyncio.gather(*(consumer() for _ in range(4)))
    assert sorted(seen) == sorted(str(i).encode() for i in range(200))


async def test_a_delayed_retry_counts_as_queued_not_leased(queue: Queue) -> None:
    await queue.insert(Lane.NORMAL, [row("a", b"x")])
    (lease,) = await claim_all(queue)
    assert (await queue.stats(queue.clock.now())).leased[Lane.NORMAL] == 1
    await queue.release(lease, delay=60)
    stats = await queue.stats(queue.clock.now())
    assert stats.leased[Lane.NORMAL] == 0 and stats.queued[Lane.NORMAL] == 1


async def test_the_queue_clock_is_the_shared_one(queue: Queue) -> None:
    """Times cross the contract on `queue.clock`: close to this host's (tests run on
    one host), never going back, with an error bound of a round trip at most."""
    import time

    before = queue.clock.now()
    assert abs(before - time.time()) < 0.5
    assert 0 <= queue.clock.error < 0.05
    assert queue.clock.now() >= before
