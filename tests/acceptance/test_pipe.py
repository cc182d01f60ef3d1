"""What a user sees, on every dialect: delivery, lanes, leases, dead letters, bad input."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest

from mvalve_async import InvalidMessage, Message, Pipe, ReaderBusy


async def drain(reader, expected: int, timeout: float = 10.0) -> list[Message]:
    out: list[Message] = []
    while len(out) < expected:
        msg = await reader.next(timeout=timeout)
        if msg is None:
            break
        out.append(msg)
    return out


async def test_thousand_messages_four_readers_each_once(pipe: Pipe) -> None:
    writer = pipe.writer()
    sent = []
    for i in range(1000):
        content = bytes([i % 256]) * (i % 7) + b"\x00\xff" if i % 2 else {"i": i, "s": "é\u2603"}
        sent.append(Message(destination=f"dest-{i % 10}", content=content))
    await writer.insert_many(sent[:500])
    for msg in sent[500:]:
        await writer.insert(msg)
    got: list[Message] = []

    async def consume() -> None:
        async with pipe.reader(batch=8) as reader:
            while True:
                msg = await reader.next(timeout=0.5)
                if msg is None:
                    return
                got.append(msg)

    await asyncio.gather(*(consume() for _ in range(4)))
    counts = Counter(m.id for m in got)
    assert len(counts) == 1000 and max(counts.values()) == 1  # none lost, none twice
    by_id = {m.id: m for m in sent}
    for m in got:
        assert m.content == by_id[m.id].content and m.destination == by_id[m.id].destination
        assert type(m.content) is type(by_id[m.id].content)
    stats = await pipe.queue.stats(time.time())
    assert sum(stats.queued.values()) + sum(stats.leased.values()) == 0


async def test_emergency_then_due_timed_then_normal(pipe: Pipe) -> None:
    writer = pipe.writer()
    await writer.insert(Message("d", "normal"))
    before = time.time()
    await writer.insert(Message("d", "timed-future", delay=1.0))
    await writer.insert(Message("d", "timed-due", deliver_at=time.time() - 1))
    await writer.insert(Message("d", "emergency", emergency=True))
    reader = pipe.reader(emergency_policy="ignore")
    got = [(await reader.next(timeout=5)) for _ in range(4)]
    assert [m.content for m in got] == ["emergency", "timed-due", "normal", "timed-future"]
    assert got[-1].delivered_at >= before + 1.0  # never before its ready
    await reader.close()


async def test_killed_consumer_gets_redelivered_after_lease(pipe: Pipe) -> None:
    await pipe.writer().insert(Message("d", "precious"))
    first = pipe.reader(lease=1.0)
    got = asyncio.Event()

    async def consumer() -> None:
        msg = await first.next(timeout=5)
        assert msg is not None
        got.set()
        await asyncio.Event().wait()  # dies while "processing"

    task = asyncio.create_task(consumer())
    await got.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    other = pipe.reader(lease=1.0)
    assert await other.next(timeout=0.2) is None  # still leased
    msg = await other.next(timeout=5)
    assert msg is not None and msg.content == "precious" and msg.deliveries == 2


async def test_cancel_inside_next_strands_nothing(pipe: Pipe) -> None:
    writer = pipe.writer()
    reader = pipe.reader(batch=4)
    task = asyncio.create_task(reader.next(timeout=10))
    await asyncio.sleep(0)  # the task is now waiting for rows
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await writer.insert_many([Message("d", i) for i in range(3)])
    got = await drain(reader, 3, timeout=2)
    assert sorted(m.content for m in got) == [0, 1, 2]
    await reader.close()


async def test_receive_returns_message_on_exception(pipe: Pipe) -> None:
    await pipe.writer().insert(Message("d", "retry me"))
    reader = pipe.reader()
    with pytest.raises(RuntimeError):
        async with reader.receive(timeout=5) as msg:
            assert msg is not None
            raise RuntimeError("delivery failed")
    async with reader.receive(timeout=5) as again:
        assert again is not None and again.content == "retry me" and again.deliveries == 2
    await reader.close()
    assert sum((await pipe.queue.stats(time.time())).leased.values()) == 0


async def test_reject_and_too_many_deliveries_go_to_dead_letters(pipe: Pipe) -> None:
    writer = pipe.writer()
    await writer.insert(Message("d", "reject me"))
    await writer.insert(Message("e", "flaky"))
    reader = pipe.reader(max_deliveries=2)
    msg = await reader.next(timeout=5)
    assert msg is not None and msg.content == "reject me"
    await reader.reject(msg, "bad request")
    for _ in range(2):
        msg = await reader.next(timeout=5)
        assert msg is not None and msg.content == "flaky"
        await reader.retry(msg)
    assert await reader.next(timeout=0.3) is None  # third delivery: dead instead
    dead = {d["destination"]: d["reason"] for d in await pipe.queue.dead_letters()}
    assert dead == {"d": "bad request", "e": "too many deliveries"}
    await reader.close()


async def test_corrupt_row_goes_to_dead_letters_and_reader_goes_on(pipe: Pipe) -> None:
    from mvalve_async.interfaces import Lane, Row

    await pipe.queue.insert(Lane.NORMAL, [Row("d", b"\x01\x00garbage")])
    await pipe.writer().insert(Message("d", "fine"))
    reader = pipe.reader()
    msg = await reader.next(timeout=5)
    assert msg is not None and msg.content == "fine"
    (dead,) = await pipe.queue.dead_letters()
    assert dead["reason"].startswith("unreadable") and dead["blob"] == b"\x01\x00garbage"
    await reader.close()


async def test_bad_input_is_refused_before_anything_is_written(pipe: Pipe) -> None:
    writer = pipe.writer(max_size=1000)
    bad = [
        Message("", "x"),
        Message("x" * 41, "x"),
        Message("d", {1, 2}),
        Message("d", b"x" * 2000),
    ]
    for msg in bad:
        with pytest.raises(InvalidMessage):
            await writer.insert(msg)
    with pytest.raises(InvalidMessage):  # one bad message: the whole batch is refused
        await writer.insert_many([Message("d", "ok"), Message("", "bad")])
    stats = await pipe.queue.stats(pipe.queue.clock.now())
    assert sum(stats.queued.values()) == 0 and stats.by_destination == {}


async def test_async_for_acks_when_asking_for_the_next(pipe: Pipe) -> None:
    await pipe.writer().insert_many([Message("d", i) for i in range(5)])
    seen = []
    async with pipe.reader() as reader:
        async for msg in reader:
            seen.append(msg.content)
            if len(seen) == 5:
                break
    assert seen == [0, 1, 2, 3, 4]
    stats = await pipe.queue.stats(time.time())
    assert sum(stats.queued.values()) + sum(stats.leased.values()) == 0


async def test_one_reader_cannot_serve_two_tasks(pipe: Pipe) -> None:
    reader = pipe.reader()
    first = asyncio.create_task(reader.next(timeout=1))
    await asyncio.sleep(0)
    with pytest.raises(ReaderBusy):
        await reader.next(timeout=0)
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)


async def test_in_process_wakeup_is_prompt(pipe: Pipe) -> None:
    reader = pipe.reader(idle_interval=5.0)  # polling alone would take seconds
    waiter = asyncio.create_task(reader.next(timeout=10))
    await asyncio.sleep(0.05)
    t0 = time.monotonic()
    await pipe.writer().insert(Message("d", "wake"))
    msg = await waiter
    assert msg is not None and time.monotonic() - t0 < 1.0
    await reader.close()


async def test_url_max_destination_reaches_writers_and_readers(tmp_path) -> None:
    import mvalve_async

    url = f"sqlite:///{tmp_path}/q.db?max_destination=60"
    async with mvalve_async.open(url, "memory://") as pipe:
        long_dest = "d" * 60
        await pipe.writer().insert(Message(long_dest, "ok"))
        with pytest.raises(InvalidMessage):
            await pipe.writer().insert(Message("d" * 61, "too long"))
        async with pipe.reader() as reader:
            msg = await reader.next(timeout=5)
            assert msg is not None and msg.destination == long_dest


async def test_injection_strings_are_stored_verbatim_never_executed(pipe: Pipe) -> None:
    hostile = ["x'); DROP TABLE q_incoming;--", 'a"b`c\\d', "%s %(x)s", "'; DELETE FROM q;"]
    await pipe.writer().insert_many([Message(d[:40], {"c": d, "b": d}) for d in hostile])
    await pipe.writer().insert(Message("d", hostile[0].encode()))
    async with pipe.reader() as reader:
        got = [await reader.next(timeout=5) for _ in range(len(hostile) + 1)]
    assert [m.destination for m in got if m][:4] == [d[:40] for d in hostile]
    assert [m.content for m in got if m][:4] == [{"c": d, "b": d} for d in hostile]
    assert got[-1] is not None and got[-1].content == hostile[0].encode()
    stats = await pipe.queue.stats(time.time())  # the tables are all still there
    assert sum(stats.queued.values()) + sum(stats.leased.values()) == 0
