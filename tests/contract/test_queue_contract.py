"""The Queue contract: every dialect must pass every test here."""

from __future__ import annotations

import asyncio
import time

import pytest

from mvalve_async.interfaces import Lane, Queue, Row

LEASE = 30.0


def row(dest: str, body: bytes, ready: float | None = None) -> Row:
    return Row(dest, body, ready)


async def claim_all(q: Queue, now: float | None = None, limit: int = 100) -> list:
    return await q.claim(limit, time.time() if now is None else now, LEASE)


async def test_insert_claim_ack_round_trip(queue: Queue) -> None:
    await queue.insert(Lane.NORMAL, [row("a", b"\x00\x01\xff"), row("b", b"two")])
    leases = await claim_all(queue)
    assert [(x.destination, x.blob, x.deliveries, x.lane) for x in leases] == [
        ("a", b"\x00\x01\xff", 1, Lane.NORMAL),
        ("b", b"two", 1, Lane.NORMAL),
    ]
    assert await claim_all(queue) == []  # leased rows are invisible
    await queue.ack(leases)
    stats = await queue.stats(time.time())
    assert sum(stats.queued.values()) == 0 and sum(stats.leased.values()) == 0


async def test_destinations_and_blobs_come_back_byte_for_byte(queue: Queue) -> None:
    # innodb packs a claimed row into one column: spaces, digits and multi-byte
    # characters in the destination, and any byte in the blob, must survive it.
    now = time.time()
    dests = ["carrier 7 b", "été-ñ 中 ☎", "9 9"]
    blobs = [b" 12 34 ", b"\x00 \xff\x00", b""]
    await queue.insert(Lane.NORMAL, [row(d, b) for d, b in zip(dests, blobs, strict=True)])
    await queue.insert(Lane.TIMED, [row(dests[1], b"\x00 3 4 5 6 7 ", now - 1)])
    leases = await claim_all(queue, now)
    assert [(x.destination, x.blob) for x in leases] == [
        (dests[1], b"\x00 3 4 5 6 7 "),
        *zip(dests, blobs, strict=True),
    ]
    assert leases[0].ready == pytest.approx(now - 1, abs=1e-5)
    await queue.ack(leases)


async def test_lanes_priority_and_timed_ready(queue: Queue) -> None:
    now = time.time()
    await queue.insert(Lane.NORMAL, [row("n", b"normal")])
    await queue.insert(Lane.TIMED, [row("t", b"later", now + 3600), row("t", b"due", now - 1)])
    await queue.insert(Lane.EMERGENCY, [row("e", b"emerg")])
    leases = await claim_all(queue, now)
    assert [x.blob for x in leases] == [b"emerg", b"due", b"normal"]
    assert [x.lane for x in leases] == [Lane.EMERGENCY, Lane.TIMED, Lane.NORMAL]
    assert leases[1].ready == pytest.approx(now - 1, abs=1e-5)
    await queue.ack(leases)
    # the future row comes out only when due
    later = await claim_all(queue, now + 3601)
    assert [x.blob for x in later] == [b"later"]


async def test_claim_respects_limit_and_fifo(queue: Queue) -> None:
    await queue.insert(Lane.NORMAL, [row("a", str(i).encode()) for i in range(10)])
    first = await queue.claim(4, time.time(), LEASE)
    second = await queue.claim(100, time.time(), LEASE)
    assert [x.blob for x in first] == [b"0", b"1", b"2", b"3"]
    assert [x.blob for x in second] == [str(i).encode() for i in range(4, 10)]


async def test_timed_lane_orders_by_ready(queue: Queue) -> None:
    now = time.time()
    await queue.insert(Lane.TIMED, [row("a", b"3", now - 1), row("a", b"1", now - 3)])
    await queue.insert(Lane.TIMED, [row("a", b"2", now - 2)])
    assert [x.blob for x in await claim_all(queue, now)] == [b"1", b"2", b"3"]


async def test_expired_lease_is_redelivered(queue: Queue) -> None:
    await queue.insert(Lane.NORMAL, [row("a", b"x")])
    now = time.time()
    (first,) = await queue.claim(10, now, 5.0)
    assert await queue.claim(10, now + 4.9, 5.0) == []
    (again,) = await queue.claim(10, now + 5.1, 5.0)
    assert again.blob == b"x" and again.deliveries == 2
    # the first consumer's late ack must not delete the row now leased to another
    await queue.ack([first])
    await queue.release(again)
    (third,) = await claim_all(queue, now + 5.2)
    assert third.deliveries == 3


async def test_release_and_release_with_delay(queue: Queue) -> None:
    await queue.insert(Lane.NORMAL, [row("a", b"x")])
    (lease,) = await claim_all(queue)
    await queue.release(lease)
    (lease,) = await claim_all(queue)
    assert lease.deliveries == 2
    await queue.release(lease, delay=60)
    assert await claim_all(queue) == []
    (later,) = await claim_all(queue, time.time() + 61)
    assert later.blob == b"x"


async def test_move_to_timed_reserved_and_retry(queue: Queue) -> None:
    await queue.insert(Lane.NORMAL, [row("a", b"x")])
    (lease,) = await claim_all(queue)
    at = time.time() + 100
    await queue.move(lease, at, reserved=True)
    assert await claim_all(queue) == []
    (moved,) = await claim_all(queue, at + 0.001)
    assert moved.lane is Lane.TIMED and moved.reserved and moved.ready == pytest.approx(at)
    assert moved.deliveries == 1  # a deferral is not a delivery
    await queue.move(moved, at + 10, reserved=False)
    (retried,) = await claim_all(queue, at + 10.001)
    assert not retried.reserved and retried.deliveries == 2


async def test_settling_a_lost_lease_does_nothing(queue: Queue) -> None:
    await queue.insert(Lane.NORMAL, [row("a", b"x")])
    now = time.time()
    (stale,) = await queue.claim(1, now, 1.0)
    (current,) = await queue.claim(1, now + 2, LEASE)
    await queue.move(stale, now + 3, reserved=True)
    await queue.dead([stale], "stale")
    await queue.release(stale)
    assert (await queue.stats(now + 2)).dead == 0
    await queue.ack([current])
    assert await claim_all(queue, now + 100) == []


async def test_settling_many_claims_at_once_spares_a_stale_lease(queue: Queue) -> None:
    """Acks and dead letters of several claims go out together (batch-1 reads): each
    row matches its own claim's token, so a stale lease in the batch spares the row
    another claim now holds, even when that claim's token is in the same batch."""
    await queue.insert(Lane.NORMAL, [row("a", b"1"), row("a", b"2"), row("a", b"3")])
    now = time.time()
    (stale,) = await queue.claim(1, now, 1.0)
    (second,) = await queue.claim(1, now, LEASE)
    (third,) = await queue.claim(1, now, LEASE)
    (again,) = await queue.claim(1, now + 2, LEASE)  # the first row, under a new token
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
    assert (await queue.stats(time.time())).dead == 2
    assert await queue.requeue_dead([dead[0]["id"]]) == 1
    assert [x.blob for x in await claim_all(queue)] == [dead[0]["blob"]]
    assert await queue.purge_dead() == 1
    assert await queue.dead_letters() == []


async def test_poll_reports_ready_and_next_due(queue: Queue) -> None:
    now = time.time()
    assert await queue.poll(now) == (False, None)
    await queue.insert(Lane.TIMED, [row("a", b"x", now + 50)])
    ready, due = await queue.poll(now)
    assert not ready and due == pytest.approx(now + 50)
    await queue.insert(Lane.NORMAL, [row("a", b"y")])
    assert (await queue.poll(now))[0]


async def test_stats_and_purge(queue: Queue) -> None:
    await queue.insert(Lane.NORMAL, [row("a", b"1"), row("a", b"2"), row("b", b"3")])
    await queue.insert(Lane.EMERGENCY, [row("b", b"4")])
    await queue.claim(1, time.time(), LEASE)  # leases the emergency row
    stats = await queue.stats(time.time())
    assert stats.queued[Lane.NORMAL] == 3 and stats.leased[Lane.EMERGENCY] == 1
    assert stats.by_destination["a"]["normal"] == 2
    assert await queue.purge(destination="a") == 2
    assert await queue.purge(lane=Lane.EMERGENCY) == 1
    assert await queue.purge() == 1


async def test_concurrent_claims_never_share_a_row(queue: Queue) -> None:
    await queue.insert(Lane.NORMAL, [row("a", str(i).encode()) for i in range(200)])
    seen: list[bytes] = []

    async def consumer() -> None:
        while True:
            leases = await queue.claim(7, time.time(), LEASE)
            if not leases:
                return
            seen.extend(x.blob for x in leases)
            await queue.ack(leases)

    await asyncio.gather(*(consumer() for _ in range(4)))
    assert sorted(seen) == sorted(str(i).encode() for i in range(200))


async def test_shift_moves_only_the_destinations_reserved_future_rows(queue: Queue) -> None:
    if not getattr(queue, "can_update", True):
        pytest.skip(f"{queue.name} cannot update rows: shift is a no-op there")
    now = time.time()
    await queue.insert(
        Lane.TIMED,
        [
            Row("a", b"past", now - 5, reserved=True),
            Row("a", b"future", now + 10, reserved=True),
            Row("a", b"user-timed", now + 10, reserved=False),
            Row("b", b"other", now + 10, reserved=True),
        ],
    )
    assert await queue.shift("a", now, 100.0) == 1
    due = await claim_all(queue, now + 20)
    assert sorted(x.blob for x in due) == [b"other", b"past", b"user-timed"]
    await queue.ack(due)
    (moved,) = await claim_all(queue, now + 111)
    assert moved.blob == b"future" and moved.ready == pytest.approx(now + 110)


async def test_a_delayed_retry_counts_as_queued_not_leased(queue: Queue) -> None:
    await queue.insert(Lane.NORMAL, [row("a", b"x")])
    (lease,) = await claim_all(queue)
    assert (await queue.stats(time.time())).leased[Lane.NORMAL] == 1
    await queue.release(lease, delay=60)
    stats = await queue.stats(time.time())
    assert stats.leased[Lane.NORMAL] == 0 and stats.queued[Lane.NORMAL] == 1
