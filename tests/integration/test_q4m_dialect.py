"""What only the q4m dialect must show, against the Q4M emulator (tests/q4m/emulator.py):
ownership ends with the connection (a reader process killed with SIGKILL, an owner
connection KILLed from another session), a claim's order through queue_wait's
argument order, a want taking its destination's rows by their key (`dkey`) and
nothing else, rows written before the key existed getting theirs, give-backs as
queue_abort, the owner-connection cap, and leases that expire in this process
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
from mvalve_async.interfaces import Lane, Lease, Row, Scan, Want
from mvalve_async.queues import _q4m_rows
from mvalve_async.queues._q4m_rows import dkey
from mvalve_async.queues.q4m import Q4MQueue
from mvalve_async.stores.memory import MemoryStore
from mvalve_async.urls import QueueSettings, Tables
from tests.conftest import unique_tables
from tests.q4m.emulator import Q4MServer
from tests.q4m.fixtures import q4m_server  # noqa: F401  (fixture)

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


def want(dest: str, n: int = 100) -> list[Want]:
    return [Want(dest, n)]


async def claim_all(q: Q4MQueue, now: float | None = None, limit: int = 100) -> list[Lease]:
    """The emergency lane's rows, then every destination a scan finds (by name)."""
    now = time.time() if now is None else now
    scan = await q.scan(now)
    wants = [Want(d, limit) for d in sorted(scan.found)]
    return await q.claim(wants, now, LEASE, emergency=limit)


def owned(server: Q4MServer, table: str) -> list[tuple[bytes, bool]]:
    """(message, owned) of every row of `table`, in FIFO order."""
    return [(r["message"], r["_owned"]) for r in server.rows(table)]


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


async def test_queue_wait_order_one_row_per_claim(
    q4m_server: Q4MServer,  # noqa: F811
    tables: Tables,
) -> None:
    """queue_wait's argument order alone (one owner connection: one row per claim, no
    batch sorting): the emergency lane, then the want's due timed rows (FIFO among
    the due ones), then its normal rows; a future timed row only when due."""
    queue = await make_queue(q4m_server, tables, owners=1)
    try:
        now = time.time()
        await queue.insert(Lane.NORMAL, [Row("t", b"normal-1"), Row("t", b"normal-2")])
        await queue.insert(Lane.TIMED, [Row("t", b"future", now + 3600), Row("t", b"due", now - 1)])
        await queue.insert(Lane.EMERGENCY, [Row("e", b"emergency")])
        await queue.insert(Lane.TIMED, [Row("t", b"due-later-inserted", now - 0.5)])
        got: list[Lease] = []
        while leases := await queue.claim(want("t", 5), now, LEASE, emergency=5):
            assert len(leases) == 1
            got += leases
            await queue.ack(leases)  # frees the one owner for the next claim
        assert [x.blob for x in got] == [
            b"emergency", b"due", b"due-later-inserted", b"normal-1", b"normal-2",
        ]  # fmt: skip
        lanes = [Lane.EMERGENCY, Lane.TIMED, Lane.TIMED, Lane.NORMAL, Lane.NORMAL]
        assert [x.lane for x in got] == lanes
        (future,) = await queue.claim(want("t", 5), now + 3600, LEASE)
        assert future.blob == b"future" and future.ready == pytest.approx(now + 3600)
        await queue.ack([future])
    finally:
        await queue.close()


async def test_a_batch_is_emergency_first_then_each_want_in_order(queue: Q4MQueue) -> None:
    """Several rows per claim: the batch comes back emergency first, then each want's
    rows in the wants' order, its timed rows by ready (Q4M serves due rows FIFO)."""
    now = time.time()
    await queue.insert(Lane.NORMAL, [Row("a", b"a-normal"), Row("b", b"b-normal")])
    await queue.insert(Lane.TIMED, [Row("b", b"b-due-2", now - 1), Row("b", b"b-due-1", now - 2)])
    await queue.insert(Lane.EMERGENCY, [Row("e", b"e1"), Row("e", b"e2")])
    leases = await queue.claim([Want("b", 5), Want("a", 5)], now, LEASE, emergency=5)
    assert [x.blob for x in leases] == [
        b"e1", b"e2", b"b-due-1", b"b-due-2", b"b-normal", b"a-normal",
    ]  # fmt: skip
    await queue.ack(leases)


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
        reader = pipe.reader(emergency_policy="ignore")
        got = [await reader.next(timeout=5) for _ in range(8)]
        assert [m.content if m else None for m in got] == [
            "emergency-0", "emergency-1", "timed-due-0", "timed-due-1",
            "normal-0", "normal-1", "normal-2", "timed-future",
        ]  # fmt: skip
        await reader.close()


async def test_priority_through_a_reader_of_batch_one(
    q4m_server: Q4MServer,  # noqa: F811
    tables: Tables,
) -> None:
    async with Pipe(await make_queue(q4m_server, tables), MemoryStore()) as pipe:
        writer = pipe.writer()
        await writer.insert_many([Message("d", f"normal-{i}") for i in range(2)])
        await writer.insert_many(
            [Message("d", f"timed-due-{i}", deliver_at=time.time() - 1) for i in range(2)]
        )
        await writer.insert_many([Message("d", f"emergency-{i}", emergency=True) for i in range(2)])
        reader = pipe.reader(emergency_policy="ignore", batch=1)
        got = [await reader.next(timeout=5) for _ in range(6)]
        assert [m.content if m else None for m in got] == [
            "emergency-0", "emergency-1", "timed-due-0", "timed-due-1", "normal-0", "normal-1",
        ]  # fmt: skip
        await reader.close()


async def test_a_want_takes_only_its_destinations_rows(
    queue: Q4MQueue,
    q4m_server: Q4MServer,  # noqa: F811
    tables: Tables,
) -> None:
    """A want claims with `dkey=K`: rows of other destinations (another key) stay
    where they are, unowned, whatever their place; it stops at its first miss."""
    now = time.time()
    normal, timed = tables.normal[0], tables.timed[0]
    await queue.insert(Lane.NORMAL, [Row("b", b"b1"), Row("a", b"a1"), Row("b", b"b2")])
    await queue.insert(Lane.NORMAL, [Row("a", b"a2"), Row("c", b"c1")])
    await queue.insert(Lane.TIMED, [Row("b", b"b-due", now - 1), Row("a", b"a-due", now - 1)])
    keys = {r["message"]: r["dkey"] for r in q4m_server.rows(normal) + q4m_server.rows(timed)}
    assert keys[b"a1"] == keys[b"a2"] == keys[b"a-due"] == dkey("a") != keys[b"b1"] == dkey("b")
    leases = await queue.claim(want("a", 10), now, LEASE)
    assert [x.blob for x in leases] == [b"a-due", b"a1", b"a2"]
    assert owned(q4m_server, normal) == [
        (b"b1", False), (b"a1", True), (b"b2", False), (b"a2", True), (b"c1", False),
    ]  # fmt: skip
    assert owned(q4m_server, timed) == [(b"b-due", False), (b"a-due", True)]
    await queue.ack(leases)
    assert [x.blob for x in await queue.claim(want("b", 1), now, LEASE)] == [b"b-due"]
    assert owned(q4m_server, normal) == [(b"b1", False), (b"b2", False), (b"c1", False)]


async def test_another_destination_with_the_same_key_is_given_back(
    queue: Q4MQueue,
    q4m_server: Q4MServer,  # noqa: F811
    tables: Tables,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two destinations whose keys collide (1 in 2^62; forced here): a want never
    leases the other's row, which goes back at its place with its count as before."""
    table = tables.normal[0]
    monkeypatch.setattr(_q4m_rows, "dkey", lambda d: dkey("a" if d == "other" else d))
    await queue.insert(Lane.NORMAL, [Row("other", b"x"), Row("a", b"a1")])
    assert {r["dkey"] for r in q4m_server.rows(table)} == {dkey("a")}
    assert await queue.claim(want("a", 5), time.time(), LEASE) == []  # "other" came first
    assert owned(q4m_server, table) == [(b"x", False), (b"a1", False)]
    assert q4m_server.stats(table)["restored_by_abort"] == 1
    (lease,) = await queue.claim(want("other", 5), time.time(), LEASE)
    assert lease.blob == b"x" and lease.deliveries == 1  # the give-back was not counted
    await queue.ack([lease])
    assert [x.blob for x in await queue.claim(want("a", 5), time.time(), LEASE)] == [b"a1"]


async def test_rows_written_before_the_key_get_theirs_once_a_scan_finds_them(
    queue: Q4MQueue,
    q4m_server: Q4MServer,  # noqa: F811
    tables: Tables,
) -> None:
    """Rows of a 0.1 table (dkey 0: the column was added with its default) cannot be
    claimed per destination. A scan notices them; the claims that follow write them
    again with their key (64 per table at a time), keeping id, ready, created and
    deliveries and their order; then the scans stop asking for it."""
    normal, timed, emergency = tables.normal[0], tables.timed[0], tables.emergency[0]
    now = time.time()
    columns = "(id, destination, message, ready, created, deliveries)"  # no dkey: 0
    values = ", ".join(f"({100 + i}, 'old', 'm{i}', 0, {1000 + i}, 2)" for i in range(70))
    await sql(q4m_server, f"INSERT INTO `{normal}` {columns} VALUES {values}")
    due = round((now - 5) * 1e6)
    await sql(q4m_server, f"INSERT INTO `{timed}` {columns} VALUES (99, 'old', 't', {due}, 9, 0)")
    await sql(q4m_server, f"INSERT INTO `{emergency}` {columns} VALUES (98, 'old', 'e', 0, 8, 0)")
    await queue.insert(Lane.NORMAL, [Row("new", b"n")])

    def unkeyed(table: str) -> int:
        return sum(1 for r in q4m_server.rows(table) if r["dkey"] == 0)

    assert await queue.claim(want("old"), now, LEASE) == []  # nothing known yet: no rekey
    assert unkeyed(normal) == 70
    scan = await queue.scan(now)
    assert scan.mark is True and scan.found["old"].rows == 71 and scan.emergency
    (fresh,) = await queue.claim(want("new"), now, LEASE)
    assert fresh.blob == b"n"
    await queue.ack([fresh])
    assert (unkeyed(normal), unkeyed(timed)) == (70 - 64, 0)  # after that claim
    assert unkeyed(emergency) == 1  # claimed without a key: left alone
    rows = {r["id"]: r for r in q4m_server.rows(normal)}
    assert rows[100]["dkey"] == dkey("old")
    assert (rows[100]["created"], rows[100]["deliveries"], rows[100]["ready"]) == (1000, 2, 0)
    (t,) = [r for r in q4m_server.rows(timed) if r["id"] == 99]
    assert (t["dkey"], t["ready"], t["created"]) == (dkey("old"), due, 9)

    got = await queue.claim(want("old", 3), now, LEASE)
    assert [(x.id, x.blob, x.deliveries) for x in got] == [
        (99, b"t", 1), (100, b"m0", 3), (101, b"m1", 3),
    ]  # fmt: skip
    assert (unkeyed(normal), unkeyed(timed)) == (0, 0)  # the rest went with that claim
    assert [r["id"] for r in q4m_server.rows(normal)][-6:] == list(range(164, 170))
    await queue.ack(got)
    assert (await queue.scan(now)).mark is False  # nothing left to rekey
    rest = await queue.claim(want("old"), now, LEASE, emergency=1)
    assert queue.max_owners == 10  # one row per owner connection: 1 + 9 rows
    assert [x.id for x in rest] == [98, *range(102, 111)]
    await queue.ack(rest)


async def test_rows_without_a_key_get_theirs_while_the_owners_are_all_busy(
    q4m_server: Q4MServer,  # noqa: F811
    tables: Tables,
) -> None:
    """A reader with a backlog claims until its owner connections run out (batch 16,
    10 owners by default): the rows written before the key must get theirs all the
    same (the rewrite runs on a dedicated connection, not on an owner), or they wait
    until the backlog is smaller than the owners."""
    normal = tables.normal[0]
    queue = await make_queue(q4m_server, tables, owners=2)
    try:
        columns = "(id, destination, message, ready, created, deliveries)"  # no dkey: 0
        values = ", ".join(f"({100 + i}, 'old', 'm{i}', 0, {1000 + i}, 0)" for i in range(3))
        await sql(q4m_server, f"INSERT INTO `{normal}` {columns} VALUES {values}")
        await queue.insert(Lane.NORMAL, [Row("new", str(i).encode()) for i in range(5)])
        now = time.time()
        assert (await queue.scan(now)).mark is True
        leases = await queue.claim([Want("new", 5), Want("old", 5)], now, LEASE)
        assert [x.blob for x in leases] == [b"0", b"1"]  # every owner is busy
        await queue.ack(leases)
        assert [r["dkey"] for r in q4m_server.rows(normal) if r["destination"] == "old"] == [
            dkey("old")
        ] * 3
    finally:
        await queue.close()


async def test_give_back_is_queue_abort_and_keeps_the_delivery_count(
    queue: Q4MQueue,
    q4m_server: Q4MServer,  # noqa: F811
    tables: Tables,
) -> None:
    table = tables.normal[0]
    await queue.insert(Lane.NORMAL, [Row("a", b"1"), Row("a", b"2"), Row("a", b"3")])
    now = time.time()
    first = await queue.claim(want("a", 2), now, LEASE)
    assert [(x.blob, x.deliveries) for x in first] == [(b"1", 1), (b"2", 1)]
    await queue.give_back(first)
    assert q4m_server.stats(table)["restored_by_abort"] == 2
    assert owned(q4m_server, table) == [(b"1", False), (b"2", False), (b"3", False)]
    again = await queue.claim(want("a", 3), now, LEASE)
    assert [(x.blob, x.deliveries) for x in again] == [(b"1", 1), (b"2", 1), (b"3", 1)]
    await queue.release(again[0])  # a retry is counted, unlike a give-back
    await queue.give_back(again[1:])
    (retried,) = await queue.claim(want("a", 1), now, LEASE)
    assert (retried.blob, retried.deliveries) == (b"1", 2)
    await queue.give_back([retried])
    (same,) = await queue.claim(want("a", 1), now, LEASE)
    assert (same.blob, same.deliveries) == (b"1", 2)
    assert q4m_server.stats(table)["restored_by_abort"] == 6
    await queue.ack([same])


async def test_kill_of_the_owner_connection_returns_the_row(
    queue: Q4MQueue,
    q4m_server: Q4MServer,  # noqa: F811
    tables: Tables,
) -> None:
    await queue.insert(Lane.NORMAL, [Row("a", b"x")])
    now = time.time()
    (stale,) = await queue.claim(want("a", 1), now, LEASE)
    assert stale.token > 0  # the owner connection's id
    assert await queue.claim(want("a", 1), now, LEASE) == []  # owned: invisible
    await sql(q4m_server, f"KILL {stale.token}")
    table = tables.normal[0]
    await until(lambda: q4m_server.stats(table)["restored_by_close"] == 1)
    (current,) = await queue.claim(want("a", 1), now, LEASE)  # long before the lease ends
    assert current.blob == b"x"
    assert current.deliveries == 2  # this process remembers handing it out
    # Settling the lost lease neither raises nor touches the row now held again.
    await queue.ack([stale])
    await queue.release(stale)
    await queue.release(stale, delay=5)
    await queue.give_back([stale])
    await queue.dead([stale], "stale")
    await queue.claim([], now, LEASE, acks=[stale])
    stats = await queue.stats(now)
    assert stats.dead == 0 and sum(stats.queued.values()) == 0
    assert [r["_owned"] for r in q4m_server.rows(table)] == [True]
    await queue.ack([current])
    assert q4m_server.rows(table) == []
    assert await claim_all(queue, now + 100) == []


async def test_killed_owner_while_settling_does_not_copy_the_row(
    queue: Q4MQueue,
    q4m_server: Q4MServer,  # noqa: F811
    tables: Tables,
) -> None:
    """dead/release(delay) INSERT on the owner connection: a killed owner makes the
    INSERT fail, so the row is back once, never copied; a give-back does nothing."""
    await queue.insert(Lane.NORMAL, [Row("a", b"g"), Row("b", b"d"), Row("c", b"r")])
    given, dead, retried = await queue.claim(
        [Want("a", 1), Want("b", 1), Want("c", 1)], time.time(), LEASE
    )
    for lease in (given, dead, retried):
        await sql(q4m_server, f"KILL {lease.token}")
    await until(lambda: q4m_server.stats(tables.normal[0])["restored_by_close"] == 3)
    await queue.give_back([given])
    await queue.dead([dead], "bad")
    await queue.release(retried, delay=60)
    assert owned(q4m_server, tables.normal[0]) == [(b"g", False), (b"d", False), (b"r", False)]
    assert q4m_server.rows(tables.timed[0]) == [] and q4m_server.rows(tables.dead) == []
    assert q4m_server.stats(tables.normal[0])["restored_by_abort"] == 0


async def test_closing_the_queue_returns_every_owned_row(
    q4m_server: Q4MServer,  # noqa: F811
    tables: Tables,
) -> None:
    first = await make_queue(q4m_server, tables)
    await first.insert(Lane.NORMAL, [Row("a", str(i).encode()) for i in range(3)])
    assert len(await first.claim(want("a", 3), time.time(), LEASE)) == 3
    await first.close()
    await until(lambda: not any(r["_owned"] for r in q4m_server.rows(tables.normal[0])))
    second = await make_queue(q4m_server, tables)
    try:
        leases = await second.claim(want("a", 10), time.time(), LEASE)
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
        first = await queue.claim(want("a") + want("b"), time.time(), LEASE)
        assert [x.blob for x in first] == [b"0", b"1", b"2"]  # one row per owner connection
        assert first.cut == {"a", "b"}  # not short of rows: of owners
        started = time.monotonic()
        busy = await queue.claim(want("a"), time.time(), LEASE, emergency=1)
        assert busy == [] and busy.cut == {"a"} and busy.cut_emergency  # every owner is busy
        assert 0.15 <= time.monotonic() - started < 1.0  # waited owner_wait, no longer
        waiting = asyncio.create_task(queue.claim(want("a"), time.time(), LEASE))
        await until(lambda: len(queue._owners._waiters) == 1)  # it waits for an owner
        await queue.ack(first[:1])  # one owner free: handed to the waiting claim
        second = await waiting
        assert [x.blob for x in second] == [b"3"]
        await queue.ack(first[1:] + second)
        last = await queue.claim(want("a") + want("b"), time.time(), LEASE, emergency=1)
        assert [x.blob for x in last] == [b"4"]
        assert last.cut == set() and not last.cut_emergency  # short of rows: none left
    finally:
        await queue.close()


async def test_a_reader_keeps_a_destination_cut_by_busy_owners_in_line(
    q4m_server: Q4MServer,  # noqa: F811
    tables: Tables,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two owner connections, a batch of 8: every claim is cut by the owners, not by
    the rows. Scans cost 0.1 s here (a q4m scan reads every row: a large backlog, or
    a loaded host), so a reader scans at most once a second. The destination stays
    in the reader's line and is claimed again as owners come free, without waiting
    for a scan to find it (before: it left the line at every claim, and next()
    waited for the next scan; under CPU load four readers each waited out
    next(timeout=0.5) with a third of their rows queued)."""
    queue = await make_queue(q4m_server, tables, owners=2)
    real_scan = queue.scan

    async def costly_scan(now: float, mark: object = None) -> Scan:
        await asyncio.sleep(0.1)  # the scan's cost, not a synchronization
        return await real_scan(now, mark)

    monkeypatch.setattr(queue, "scan", costly_scan)
    async with Pipe(queue, MemoryStore()) as pipe:
        await pipe.writer().insert_many([Message("a", i) for i in range(40)])
        async with pipe.reader(batch=8) as reader:
            got = [await reader.next(timeout=0.5) for _ in range(40)]
            scans = reader._directory.scans
        assert [m.content if m else None for m in got] == list(range(40))
        assert scans <= 4, scans  # one a second at most


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
        (lease,) = await holder.claim(want("a", 1), now, 1.0)
        assert await other.claim(want("a", 1), now + 3600, 1.0) == []
        assert (await other.scan(now + 3600)).found == {}  # an owned row is invisible
        assert set((await holder.scan(now + 2)).found) == {"a"}  # the holder gave it back
        (again,) = await other.claim(want("a", 1), now + 2, LEASE)
        assert again.blob == b"x" and again.deliveries == 1  # counted by the holder only
        await holder.ack([lease])  # expired: does nothing
        assert [r["_owned"] for r in q4m_server.rows(tables.normal[0])] == [True]
        await other.ack([again])
    finally:
        await holder.close()
        await other.close()


async def test_retry_with_a_delay_stays_in_its_lane(queue: Q4MQueue) -> None:
    await queue.insert(Lane.EMERGENCY, [Row("e", b"urgent")])
    await queue.insert(Lane.NORMAL, [Row("n", b"plain")])
    now = time.time()
    urgent, plain = await queue.claim(want("n", 1), now, LEASE, emergency=1)
    await queue.release(urgent, delay=60)
    await queue.release(plain, delay=30)
    assert await queue.claim(want("n", 1), time.time(), LEASE, emergency=1) == []
    scan = await queue.scan(time.time())
    assert not scan.emergency
    assert scan.found["n"].ready == pytest.approx(time.time() + 30, abs=1)
    assert scan.next_due == pytest.approx(time.time() + 30, abs=1)
    later = time.time() + 61
    assert (await queue.scan(later)).emergency
    again = await queue.claim(want("n", 1), later, LEASE, emergency=1)
    assert [(x.lane, x.id, x.deliveries) for x in again] == [
        (Lane.EMERGENCY, urgent.id, 2), (Lane.NORMAL, plain.id, 2),
    ]  # fmt: skip
    await queue.ack(again)


async def test_dead_letters_requeue_by_id_in_owner_mode(queue: Q4MQueue) -> None:
    await queue.insert(Lane.TIMED, [Row("t", b"t1", time.time() - 1)])
    await queue.insert(Lane.NORMAL, [Row("n", b"n1"), Row("n", b"n2")])
    leases = await claim_all(queue)
    assert [x.blob for x in leases] == [b"n1", b"n2", b"t1"]
    await queue.dead(leases, "test")
    dead = await queue.dead_letters()
    assert sorted((d["lane"], d["blob"]) for d in dead) == [
        ("normal", b"n1"), ("normal", b"n2"), ("timed", b"t1"),
    ]  # fmt: skip
    by_blob = {d["blob"]: d["id"] for d in dead}
    assert await queue.requeue_dead([by_blob[b"t1"], 12345]) == 1
    assert sorted(d["blob"] for d in await queue.dead_letters()) == [b"n1", b"n2"]
    assert await queue.requeue_dead() == 2
    assert await queue.dead_letters() == []
    back = await claim_all(queue)  # with their destination's key: claimable per want
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
        task = asyncio.create_task(queue.claim(want("a", 3), time.time(), LEASE))
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
    leases = await queue.claim(want("a", 3), time.time(), LEASE)
    assert [x.blob for x in leases] == [b"0", b"1", b"2"]  # still in FIFO order
    await queue.ack(leases)
