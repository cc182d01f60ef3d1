"""What only the q4m dialect must show, against the Q4M emulator (tests/q4m_emulator.py):
ownership ends with the connection (a reader process killed with SIGKILL, an owner
connection KILLed from another session), lane priority through queue_wait's
argument order, the owner-connection cap, and leases that expire in this process
only."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiomysql
import orjson
import pytest

from mvalve_async import Message, Pipe
from mvalve_async.interfaces import Lane, Lease, Row
from mvalve_async.queues.q4m import Q4MQueue
from mvalve_async.stores.memory import MemoryStore
from mvalve_async.urls import QueueSettings, Tables
from tests.conftest import unique_tables
from tests.q4m_emulator import Q4MServer
from tests.q4m_fixtures import q4m_server  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[2]
LEASE = 30.0


def url_of(server: Q4MServer, t: Tables) -> str:
    return (
        f"{server.url}?emergency={t.emergency[0]}&timed={t.timed[0]}"
        f"&normal={t.normal[0]}&dead={t.dead}"
    )


async def make_queue(server: Q4MServer, tables: Tables, **kw: object) -> Q4MQueue:
    settings = QueueSettings("q4m", port=server.port or 0, tables=tables, database="test")
    queue = Q4MQueue(settings, **kw)  # type: ignore[arg-type]
    await queue.connect()
    await queue.create_schema()
    return queue


@pytest.fixture
async def tables() -> Tables:
    return unique_tables("q")


@pytest.fixture
async def queue(q4m_server: Q4MServer, tables: Tables) -> AsyncIterator[Q4MQueue]:  # noqa: F811
    q = await make_queue(q4m_server, tables)
    try:
        yield q
    finally:
        await q.close()


async def sql(server: Q4MServer, statement: str) -> list[tuple[object, ...]]:
    """One statement on a fresh connection of its own (another session)."""
    conn = await aiomysql.connect(
        host="127.0.0.1", port=server.port, user="root", db="test", autocommit=True
    )
    try:
        async with conn.cursor() as cur:
            await cur.execute(statement)
            return list(await cur.fetchall())
    finally:
        conn.close()


async def until(check: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out waiting for the emulator"
        await asyncio.sleep(0.01)


async def test_sigkilled_reader_process_gives_its_row_to_another_reader(
    q4m_server: Q4MServer,  # noqa: F811
    tables: Tables,
) -> None:
    url = url_of(q4m_server, tables)
    async with Pipe(await make_queue(q4m_server, tables), MemoryStore()) as pipe:
        await pipe.writer().insert(Message("d", "precious"))
        await pipe.writer().insert(Message("d", "second"))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.integration.q4m_holder_proc", url,
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
            content, deliveries, token = orjson.loads(line)
            assert (content, deliveries) == ("precious", 1)
            rows = q4m_server.rows(tables.normal[0])
            assert [r["_owned"] for r in rows] == [True, False]  # the process owns it
            # Nobody else can have it while that process lives, whatever the lease says.
            reader = pipe.reader(lease=0.5)
            got = await reader.next(timeout=1.0)
            assert got is not None and got.content == "second"
            assert await reader.next(timeout=0.8) is None
            proc.kill()  # SIGKILL: no queue_abort, no goodbye, the socket just closes
            await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        msg = await reader.next(timeout=5)
        assert msg is not None and msg.content == "precious"
        # Q4M keeps no delivery count: the dead process's delivery is not counted.
        assert msg.deliveries == 1
        assert q4m_server.stats(tables.normal[0])["restored_by_close"] == 1
        await reader.close()
        assert q4m_server.rows(tables.normal[0]) == []
        assert token > 0


async def test_lane_priority_one_row_per_claim(queue: Q4MQueue) -> None:
    """queue_wait's argument order alone (claim(1) each time, no batch sorting):
    emergency, then due timed rows, then normal; a future timed row only when due."""
    now = time.time()
    await queue.insert(Lane.NORMAL, [Row("n", b"normal-1"), Row("n", b"normal-2")])
    await queue.insert(Lane.TIMED, [Row("t", b"future", now + 3600), Row("t", b"due", now - 1)])
    await queue.insert(Lane.EMERGENCY, [Row("e", b"emergency")])
    await queue.insert(Lane.TIMED, [Row("t", b"due-later-inserted", now - 0.5)])
    got: list[Lease] = []
    while leases := await queue.claim(1, now, LEASE):
        got.extend(leases)
    assert [x.blob for x in got] == [
        b"emergency", b"due", b"due-later-inserted", b"normal-1", b"normal-2",
    ]  # fmt: skip
    assert [x.lane for x in got] == [Lane.EMERGENCY, Lane.TIMED, Lane.TIMED] + [Lane.NORMAL] * 2
    await queue.ack(got)
    (future,) = await queue.claim(5, now + 3600, LEASE)
    assert future.blob == b"future" and future.ready == pytest.approx(now + 3600)


async def test_priority_through_a_reader_with_rows_in_all_lanes(
    q4m_server: Q4MServer,  # noqa: F811
    tables: Tables,
) -> None:
    async with Pipe(await make_queue(q4m_server, tables), MemoryStore()) as pipe:
        writer = pipe.writer()
        await writer.insert_many([Message("d", f"normal-{i}") for i in range(3)])
        await writer.insert(Message("d", "timed-future", delay=0.5))
        await writer.insert_many(
            [Message("d", f"timed-due-{i}", deliver_at=time.time() - 1) for i in range(2)]
        )
        await writer.insert_many([Message("d", f"emergency-{i}", emergency=True) for i in range(2)])
        reader = pipe.reader(emergency_policy="ignore", batch=1)
        got = [await reader.next(timeout=5) for _ in range(8)]
        assert [m.content if m else None for m in got] == [
            "emergency-0", "emergency-1", "timed-due-0", "timed-due-1",
            "normal-0", "normal-1", "normal-2", "timed-future",
        ]  # fmt: skip
        await reader.close()


async def test_kill_of_the_owner_connection_returns_the_row(
    queue: Q4MQueue,
    q4m_server: Q4MServer,  # noqa: F811
    tables: Tables,
) -> None:
    await queue.insert(Lane.NORMAL, [Row("a", b"x")])
    now = time.time()
    (stale,) = await queue.claim(1, now, LEASE)
    assert stale.token > 0  # the owner connection's id
    assert await queue.claim(1, now, LEASE) == []  # owned: invisible
    await sql(q4m_server, f"KILL {stale.token}")
    table = tables.normal[0]
    await until(lambda: q4m_server.stats(table)["restored_by_close"] == 1)
    (current,) = await queue.claim(1, now, LEASE)  # long before the lease would end
    assert current.blob == b"x"
    assert current.deliveries == 2  # this process remembers handing it out
    # Settling the lost lease neither raises nor touches the row now held again.
    await queue.ack([stale])
    await queue.release(stale)
    await queue.release(stale, delay=5)
    await queue.move(stale, now + 3, reserved=True)
    await queue.dead([stale], "stale")
    stats = await queue.stats(now)
    assert stats.dead == 0 and sum(stats.queued.values()) == 0
    assert [r["_owned"] for r in q4m_server.rows(table)] == [True]
    await queue.ack([current])
    assert q4m_server.rows(table) == []
    assert await queue.claim(10, now + 100, LEASE) == []


async def test_killed_owner_while_settling_does_not_copy_the_row(
    queue: Q4MQueue,
    q4m_server: Q4MServer,  # noqa: F811
    tables: Tables,
) -> None:
    """move/dead/release(delay) INSERT on the owner connection: a killed owner makes
    the INSERT fail, so the row is back once, never copied."""
    await queue.insert(Lane.NORMAL, [Row("a", b"m"), Row("b", b"d"), Row("c", b"r")])
    moved, dead, retried = await queue.claim(3, time.time(), LEASE)
    for lease in (moved, dead, retried):
        await sql(q4m_server, f"KILL {lease.token}")
    await until(lambda: q4m_server.stats(tables.normal[0])["restored_by_close"] == 3)
    await queue.move(moved, time.time() + 60, reserved=True)
    await queue.dead([dead], "bad")
    await queue.release(retried, delay=60)
    assert [r["message"] for r in q4m_server.rows(tables.normal[0])] == [b"m", b"d", b"r"]
    assert q4m_server.rows(tables.timed[0]) == [] and q4m_server.rows(tables.dead) == []


async def test_closing_the_queue_returns_every_owned_row(
    q4m_server: Q4MServer,  # noqa: F811
    tables: Tables,
) -> None:
    first = await make_queue(q4m_server, tables)
    await first.insert(Lane.NORMAL, [Row("a", str(i).encode()) for i in range(3)])
    assert len(await first.claim(3, time.time(), LEASE)) == 3
    await first.close()
    await until(lambda: not any(r["_owned"] for r in q4m_server.rows(tables.normal[0])))
    second = await make_queue(q4m_server, tables)
    try:
        leases = await second.claim(10, time.time(), LEASE)
        assert [x.blob for x in leases] == [b"0", b"1", b"2"]  # back at their FIFO places
        await second.ack(leases)
    finally:
        await second.close()


async def test_claims_are_capped_by_the_owner_connections(
    q4m_server: Q4MServer,  # noqa: F811
    tables: Tables,
) -> None:
    queue = await make_queue(q4m_server, tables, owners=3, owner_wait=0.2)
    try:
        await queue.insert(Lane.NORMAL, [Row("a", str(i).encode()) for i in range(5)])
        first = await queue.claim(100, time.time(), LEASE)
        assert [x.blob for x in first] == [b"0", b"1", b"2"]  # one row per owner connection
        started = time.monotonic()
        assert await queue.claim(100, time.time(), LEASE) == []  # every owner is busy
        assert 0.15 <= time.monotonic() - started < 1.0  # waited owner_wait, no longer
        waiting = asyncio.create_task(queue.claim(100, time.time(), LEASE))
        await asyncio.sleep(0.05)
        await queue.ack(first[:1])  # one owner free: handed to the waiting claim
        second = await waiting
        assert [x.blob for x in second] == [b"3"]
        await queue.ack(first[1:] + second)
        assert [x.blob for x in await queue.claim(100, time.time(), LEASE)] == [b"4"]
    finally:
        await queue.close()


async def test_leases_expire_only_in_the_process_holding_them(
    q4m_server: Q4MServer,  # noqa: F811
    tables: Tables,
) -> None:
    """In-process expiry (a reader dropped the lease, a consumer overran it) is
    enforced by the holder; another process cannot take an owned row, whatever time
    it is: ownership ends with the holder's connection."""
    holder = await make_queue(q4m_server, tables)
    other = await make_queue(q4m_server, tables)
    try:
        await holder.insert(Lane.NORMAL, [Row("a", b"x")])
        now = time.time()
        (lease,) = await holder.claim(1, now, 1.0)
        assert await other.claim(1, now + 3600, 1.0) == []
        assert await other.poll(now + 3600) == (False, None)
        assert await holder.poll(now + 2) == (True, None)  # the holder gave it back
        (again,) = await other.claim(1, now + 2, LEASE)
        assert again.blob == b"x" and again.deliveries == 1  # counted by the holder only
        await holder.ack([lease])  # expired: does nothing
        assert [r["_owned"] for r in q4m_server.rows(tables.normal[0])] == [True]
        await other.ack([again])
    finally:
        await holder.close()
        await other.close()


async def test_retry_with_a_delay_stays_in_its_lane(queue: Q4MQueue) -> None:
    await queue.insert(Lane.EMERGENCY, [Row("e", b"urgent")])
    now = time.time()
    (lease,) = await queue.claim(1, now, LEASE)
    await queue.release(lease, delay=60)
    assert await queue.claim(1, time.time(), LEASE) == []
    ready, due = await queue.poll(time.time())
    assert not ready and due == pytest.approx(time.time() + 60, abs=1)
    (again,) = await queue.claim(1, time.time() + 61, LEASE)
    assert again.lane is Lane.EMERGENCY and again.id == lease.id and again.deliveries == 2
    await queue.ack([again])


async def test_dead_letters_requeue_by_id_in_owner_mode(queue: Q4MQueue) -> None:
    await queue.insert(Lane.TIMED, [Row("t", b"t1", time.time() - 1)])
    await queue.insert(Lane.NORMAL, [Row("n", b"n1"), Row("n", b"n2")])
    leases = await queue.claim(10, time.time(), LEASE)
    await queue.dead(leases, "test")
    dead = await queue.dead_letters()
    assert [(d["lane"], d["blob"]) for d in dead] == [
        ("timed", b"t1"), ("normal", b"n1"), ("normal", b"n2"),
    ]  # fmt: skip
    assert await queue.requeue_dead([dead[2]["id"], 12345]) == 1
    assert [d["blob"] for d in await queue.dead_letters()] == [b"t1", b"n1"]
    assert await queue.requeue_dead() == 2
    assert await queue.dead_letters() == []
    back = await queue.claim(10, time.time(), LEASE)
    assert sorted(x.blob for x in back) == [b"n1", b"n2", b"t1"]
    assert {x.deliveries for x in back} == {1}


async def test_a_cancelled_claim_strands_nothing(
    queue: Q4MQueue,
    q4m_server: Q4MServer,  # noqa: F811
    tables: Tables,
) -> None:
    """Cancelled at every await point in turn (opening an owner, queue_wait, the
    SELECT of the owned row): the owners it used are closed and Q4M gives the rows
    back; a claim that finished first hands its leases to the caller as usual."""
    table = tables.normal[0]
    await queue.insert(Lane.NORMAL, [Row("a", str(i).encode()) for i in range(3)])
    for steps in range(40):
        task = asyncio.create_task(queue.claim(3, time.time(), LEASE))
        for _ in range(steps):
            await asyncio.sleep(0)
        task.cancel()
        (result,) = await asyncio.gather(task, return_exceptions=True)
        if isinstance(result, list):
            for lease in result:
                await queue.release(lease)
        else:
            assert isinstance(result, asyncio.CancelledError)
        await until(lambda: not any(r["_owned"] for r in q4m_server.rows(table)))
        assert len(q4m_server.rows(table)) == 3
    leases = await queue.claim(3, time.time(), LEASE)
    assert [x.blob for x in leases] == [b"0", b"1", b"2"]  # still in FIFO order
    await queue.ack(leases)


async def test_shift_and_reschedule_without_update(
    queue: Q4MQueue,
    q4m_server: Q4MServer,  # noqa: F811
    tables: Tables,
) -> None:
    """Q4M refuses UPDATE: rows get new `ready` values by being taken in owner mode
    by id and re-inserted; a row a reader owns at that moment is left alone."""
    now = time.time()
    rows = [Row("a", f"r{i}".encode(), now + 10 * (i + 1), reserved=True) for i in range(3)]
    await queue.insert(Lane.TIMED, [*rows, Row("b", b"other", now + 10, reserved=True)])
    created = {r["message"]: r["created"] for r in q4m_server.rows(tables.timed[0])}
    (owned,) = await queue.claim(1, now + 10, LEASE)  # r0 is owned: not shifted
    assert owned.blob == b"r0"
    assert await queue.shift("a", now, 100.0) == 2
    assert await queue.reschedule("a", [(created[b"r2"], now + 130, now + 50)]) == 1
    readies = {r["message"]: r["ready"] for r in q4m_server.rows(tables.timed[0])}
    assert readies[b"r1"] == pytest.approx((now + 120) * 1e6, abs=2)
    assert readies[b"r2"] == pytest.approx((now + 50) * 1e6, abs=2)
    assert readies[b"other"] == pytest.approx((now + 10) * 1e6, abs=2)
    ids = {r["message"]: r["id"] for r in q4m_server.rows(tables.timed[0])}
    assert len(set(ids.values())) == 4  # ids survive the re-insert
    await queue.ack([owned])
    due = await queue.claim(10, now + 60, LEASE)
    assert [x.blob for x in due] == [b"other", b"r2"]
    await queue.ack(due)
