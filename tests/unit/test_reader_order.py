"""A reader whose message must wait for an older one held by another reader parks
it and goes on with its other messages; the held leases keep their order."""

from __future__ import annotations

import asyncio
import time

from mvalve_async import Message, Rate
from mvalve_async._held import Held
from mvalve_async.interfaces import Lane, Lease
from mvalve_async.queues.memory import MemoryQueue
from mvalve_async.reader import Reader
from mvalve_async.stores.memory import MemoryStore
from mvalve_async.valve import Valve
from mvalve_async.writer import Writer


def lease(i: int, dest: str = "d") -> Lease:
    return Lease(Lane.NORMAL, "t", i, dest, b"", 1, created=i)


async def test_a_waiting_message_is_parked_and_the_reader_goes_on() -> None:
    queue, store = MemoryQueue(), MemoryStore()
    await Writer(queue).insert_many([Message("a", "young a"), Message("b", "b")])
    (first, *_) = await queue.peek(1)
    # another reader holds an older message of "a" (seq 1) and announced it
    other = Valve(store, rate=Rate(10))
    await other.claimed("a", [1])
    reader = Reader(queue, store, rate=Rate(10), batch=2)
    msg = await reader.next(timeout=1)
    assert msg is not None and msg.content == "b"  # "a" waits, "b" goes meanwhile
    # the older "a" is handed out by the other reader: the parked one follows
    decision = await other.decide("a", duration=None, emergency=False, reserved=False, seq=1)
    assert decision is not None and decision.action.name == "DELIVER"
    msg = await reader.next(timeout=1)
    assert msg is not None and msg.content == "young a"
    await reader.close()
    assert first["destination"] == "a"


async def test_an_older_message_stuck_elsewhere_is_waited_for_only_so_long() -> None:
    queue, store = MemoryQueue(), MemoryStore()
    await Writer(queue).insert(Message("a", "young a"))
    await Valve(store, rate=Rate(10)).claimed("a", [1])  # its reader died
    reader = Reader(queue, store, rate=Rate(10))
    t0 = time.monotonic()
    msg = await reader.next(timeout=5)
    assert msg is not None and msg.content == "young a"
    assert time.monotonic() - t0 < 1.0  # forced after ORDER_PATIENCE, not ORDER_WAIT
    await reader.close()


def test_held_hands_out_due_parked_leases_first_and_drops_expiring_ones() -> None:
    held = Held(lease_seconds=10.0)
    held.add([lease(1), lease(2), lease(3)], claimed=100.0)
    slot, _ = held.take(100.0)
    assert slot is not None and slot.lease.id == 1
    held.park(slot, retry=100.5)
    assert slot.waits == 1
    nxt, _ = held.take(100.1)
    assert nxt is not None and nxt.lease.id == 2  # 1 is parked until 100.5
    again, _ = held.take(100.6)
    assert again is not None and again.lease.id == 1  # due: before 3
    held.park(again, retry=101.0)
    rest, _ = held.take(100.7)
    assert rest is not None and rest.lease.id == 3
    none, wait = held.take(100.8)
    assert none is None and abs(wait - 0.2) < 1e-9  # only a parked one, due in 0.2 s
    held.add([lease(4)], claimed=100.0)
    assert [x.id for x in held.drain()] == [1, 4] and len(held) == 0
    held.add([lease(5)], claimed=100.0)
    dropped, _ = held.take(108.5)  # past 80 % of its lease: another reader may have it
    assert dropped is None and len(held) == 0


async def _a3_parked_b1_out() -> tuple[Reader, float]:
    """Rate 1 per 0.3 s with a 0.1 s margin, a backlog a1, a2, a3: each hand-out
    opens a window of 0.4 s, but the reservations a2 and a3 took were 0.3 s apart
    (a3 behind a2's slot). So when a3 comes due, the valve lets it through for a
    time still ahead (a2's hand-out + 0.4 s). b1 comes due with a3, and goes out
    first while a3 waits aside. Returns the reader and a2's delivered_at."""
    queue, store = MemoryQueue(), MemoryStore()
    writer = Writer(queue)
    reader = Reader(queue, store, rate=Rate(1, per=0.3), margin=0.1, batch=4)
    await writer.insert_many([Message("a", "a1"), Message("a", "a2"), Message("a", "a3")])
    got = await reader.next(timeout=1)
    assert got is not None and got.content == "a1"
    while len(reader._held):  # a2 and a3 go to the timed lane, reserved
        assert await reader.next(timeout=0) is None
    a3_slot = (await reader.valve.record("a")).slots[-1]
    await writer.insert(Message("b", "b1", deliver_at=a3_slot))
    a2 = await reader.next(timeout=2)
    assert a2 is not None and a2.content == "a2" and a2.delivered_at is not None
    assert a3_slot < a2.delivered_at + 0.4  # a3 is due before its window opens
    got = await reader.next(timeout=2)  # claims a3 and b1 together
    assert got is not None and got.content == "b1"  # b1 did not wait behind a3
    assert time.time() < a2.delivered_at + 0.4  # before a3's time
    return reader, a2.delivered_at


async def test_a_message_let_through_for_later_is_parked_while_due_ones_go() -> None:
    reader, a2_at = await _a3_parked_b1_out()
    got = await reader.next(timeout=2)
    assert got is not None and got.content == "a3"
    assert got.delivered_at == round(a2_at + 0.4, 6)
    assert time.time() >= got.delivered_at  # not before its time
    await reader.close()


async def test_a_parked_message_collected_too_late_is_confirmed_again_from_now() -> None:
    # The consumer comes back for a3 well past its time: handed out with that old
    # time, it could crowd the next window. Its recorded hand-out moves to now
    # instead (the window allows it): no window is lost, none is crowded.
    reader, a2_at = await _a3_parked_b1_out()
    await asyncio.sleep(max(0.0, a2_at + 0.6 - time.time()))  # a slow consumer
    asked = time.time()
    got = await reader.next(timeout=2)
    assert got is not None and got.content == "a3" and got.delivered_at is not None
    assert asked <= got.delivered_at <= time.time()
    assert got.delivered_at < a2_at + 0.8  # a wasted slot would cost a window
    assert (await reader.valve.record("a")).sent == [got.delivered_at]  # counted once
    await reader.close()
