"""SQLiteQueue: what only the sqlite dialect has (files, processes, locks, cancellation,
its claim over several tables per lane, its skip scan and id marks).

The shared semantics are in tests/contract; these tests run real processes on one
file, kill them with SIGKILL, and cancel claims at every await point.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import mvalve_async
from mvalve_async.errors import QueueError, SchemaError
from mvalve_async.interfaces import Lane, Queue, Row, Want
from mvalve_async.message import Message
from mvalve_async.queues.sqlite import SQLiteQueue
from mvalve_async.urls import QueueSettings, Tables

ROOT = str(Path(__file__).resolve().parents[2])

# A child process: connect, say "ready", wait for "go" on stdin, then consume
# (scan, claim every destination found, print "destination body" per lease, ack,
# until a full scan finds no row) or hold (claim, print the claim's time and the
# ids, sleep until killed).
CHILD = r"""
import asyncio, sys, time
from mvalve_async.interfaces import Want
from mvalve_async.queues.sqlite import SQLiteQueue
from mvalve_async.urls import QueueSettings

async def main(path, mode, lease):
    q = SQLiteQueue(QueueSettings("sqlite", path=path))
    await q.connect()
    print("ready", flush=True)
    sys.stdin.readline()
    if mode == "hold":
        now = time.time()
        leases = await q.claim([Want("d", 10)], now, lease)
        print(repr(now), *[x.id for x in leases], flush=True)
        await asyncio.sleep(3600)
    while True:
        now = time.time()
        scan = await q.scan(now)
        if not scan.found and not scan.emergency:
            break  # every row is acked (a full scan lists leased rows too)
        wants = [Want(d, 4) for d in sorted(scan.found)]
        leases = await q.claim(wants, now, lease, emergency=4)
        if not leases:
            await asyncio.sleep(0.001)  # the other process holds the rest: its acks come
            continue
        print("\n".join(f"{x.destination} {x.blob.decode()}" for x in leases), flush=True)
        await asyncio.sleep(0.0005 * len(leases))  # "work", so the processes interleave
        await q.ack(leases)
    await q.close()

asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3])))
"""


def settings(path: Path, **tables: tuple[str, ...]) -> QueueSettings:
    return QueueSettings("sqlite", path=str(path), tables=Tables(**tables))  # type: ignore[arg-type]


async def opened(path: Path, **kw: object) -> SQLiteQueue:
    q = SQLiteQueue(settings(path), **kw)  # type: ignore[arg-type]
    await q.connect()
    await q.create_schema()
    return q


_children: list[subprocess.Popen[str]] = []


@pytest.fixture(autouse=True)
def _reap_children() -> Iterator[None]:
    """A failed assertion must not leave a child process running."""
    yield
    while _children:
        proc = _children.pop()
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def popen(script: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [sys.executable, "-c", script, *args],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    _children.append(proc)
    return proc


def spawn(path: Path, mode: str, lease: float) -> subprocess.Popen[str]:
    proc = popen(CHILD, str(path), mode, str(lease))
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def go(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.write("go\n")
    proc.stdin.flush()


async def insert_n(q: Queue, n: int, lane: Lane = Lane.NORMAL, dest: str = "d") -> None:
    await q.insert(lane, [Row(dest, str(i).encode()) for i in range(n)])


def want(n: int, dest: str = "d") -> list[Want]:
    return [Want(dest, n)]


def can_write(path: Path) -> bool:
    """Is the file's write lock free right now (no transaction left open)?"""
    raw = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        raw.execute("BEGIN IMMEDIATE")
        raw.execute("ROLLBACK")
        return True
    except sqlite3.OperationalError:
        return False
    finally:
        raw.close()


def raw_sql(path: Path, statement: str, args: tuple[object, ...] = ()) -> None:
    """One committed statement on a connection of its own (another "process")."""
    raw = sqlite3.connect(path)
    try:
        raw.execute(statement, args)
        raw.commit()
    finally:
        raw.close()


# -- files, schema, errors ------------------------------------------------------


async def test_file_wal_schema_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "q.db"  # parent directories are created
    q = await opened(path)
    assert isinstance(q, Queue) and q.name == "sqlite"
    await q.create_schema()  # idempotent
    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    names = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    raw.close()
    assert {"q_emerg", "q_timed", "q_incoming", "q_dead"} <= names
    ddl = q.schema_sql()
    assert "{table}" not in ddl and "CREATE TABLE IF NOT EXISTS q_timed" in ddl
    # the indexes the claim (a destination's due rows in order) and the skip scan use
    assert "q_timed_destination_ready ON q_timed (destination, ready, created)" in ddl
    assert "q_incoming_destination ON q_incoming (destination)" in ddl
    await q.drop_schema()
    await q.drop_schema()  # idempotent
    with pytest.raises(SchemaError):
        await q.scan(time.time())
    await q.close()
    await q.close()


async def test_missing_tables_give_schema_error(tmp_path: Path) -> None:
    q = SQLiteQueue(settings(tmp_path / "q.db"))
    await q.connect()
    for op in (
        q.insert(Lane.NORMAL, [Row("d", b"x")]),
        q.claim(want(1), time.time(), 30),
        q.claim([], time.time(), 30, emergency=1),
        q.scan(time.time()),
        q.stats(time.time()),
        q.dead_letters(),
    ):
        with pytest.raises(SchemaError, match="mvalve create"):
            await op
    await q.create_schema()  # and the connection is still fine afterwards
    await insert_n(q, 1)
    assert len(await q.claim(want(5), time.time(), 30)) == 1
    await q.close()


async def test_malformed_tables_give_schema_error(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    raw = sqlite3.connect(path)
    raw.execute("CREATE TABLE q_incoming (id INTEGER PRIMARY KEY, body TEXT)")
    raw.commit()
    raw.close()
    q = SQLiteQueue(settings(path))
    await q.connect()
    with pytest.raises(SchemaError, match="q_incoming exists without column"):
        await q.create_schema()
    with pytest.raises(SchemaError):
        await q.claim(want(1), time.time(), 30)
    with pytest.raises(SchemaError):
        await q.insert(Lane.NORMAL, [Row("d", b"x")])
    await q.close()


async def test_not_a_database_is_a_queue_error(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    path.write_bytes(b"this is not a database file" * 100)
    q = SQLiteQueue(settings(path))
    with pytest.raises(QueueError, match="not a database"):
        await q.connect()
        await q.create_schema()
    await q.close()


async def test_closed_queue_raises_and_reconnects(tmp_path: Path) -> None:
    q = await opened(tmp_path / "q.db")
    await q.close()
    with pytest.raises(QueueError, match="closed"):
        await q.scan(time.time())
    await q.connect()  # a closed queue may be opened again
    scan = await q.scan(time.time())
    assert scan.found == {} and not scan.emergency and scan.next_due is None and scan.full
    await q.close()


# -- claims -------------------------------------------------------------------------


async def test_claim_order_over_multi_table_lanes(tmp_path: Path) -> None:
    """Emergency rows first (by insertion, over every emergency table), then per want
    its due timed rows (by ready, then insertion, over every timed table), then its
    normal rows (by insertion, over every normal table); one token per claim."""
    s = settings(
        tmp_path / "q.db", emergency=("e1", "e2"), normal=("n1", "n2", "n3"), timed=("t1", "t2")
    )
    q = SQLiteQueue(s)
    await q.connect()
    await q.create_schema()
    now = time.time()
    for i in range(12):  # spread over three tables at random; one insert at a time
        await q.insert(Lane.NORMAL, [Row("d", str(i).encode())])
        await q.insert(Lane.NORMAL, [Row("x", f"x{i}".encode())])
    for i in (3, 1, 2):
        await q.insert(Lane.TIMED, [Row("d", f"t{i}".encode(), now - 10 + i)])
    await q.insert(Lane.TIMED, [Row("d", b"t1-later", now - 9)])  # same ready, inserted later
    await q.insert(Lane.TIMED, [Row("d", b"future", now + 60)])
    for i in range(4):
        await q.insert(Lane.EMERGENCY, [Row("e", f"e{i}".encode())])
    spread = {r["table"] for r in await q.peek(100, Lane.NORMAL)}
    assert len(spread) > 1  # 24 inserts to a table chosen at random: never all in one

    first = await q.claim([Want("d", 6), Want("x", 2)], now, 30, emergency=3)
    assert [x.blob for x in first] == [
        b"e0", b"e1", b"e2", b"t1", b"t1-later", b"t2", b"t3", b"0", b"1", b"x0", b"x1",
    ]  # fmt: skip
    assert [x.lane for x in first[:4]] == [Lane.EMERGENCY] * 3 + [Lane.TIMED]
    assert first[3].ready == pytest.approx(now - 9, abs=1e-5)
    assert all(x.deliveries == 1 and x.token == first[0].token for x in first)
    assert 0 < first[0].token < 2**63
    rest = await q.claim([Want("d", 100)], now, 30)  # no emergency asked: e3 stays
    assert [x.blob for x in rest] == [str(i).encode() for i in range(2, 12)]
    assert rest[0].token != first[0].token
    await q.release(rest[0])
    (again,) = await q.claim([Want("d", 100)], now, 30)
    assert again.blob == b"2" and again.deliveries == 2
    # one ack settles a claim's rows in every table they came from
    await q.ack([*first, *rest[1:], again])
    stats = await q.stats(now)
    assert stats.queued == {Lane.EMERGENCY: 1, Lane.TIMED: 1, Lane.NORMAL: 10}
    assert sum(stats.leased.values()) == 0
    assert (await q.scan(now)).emergency
    (future,) = await q.claim([Want("d", 100)], now + 61, 30)
    assert future.blob == b"future"
    await q.close()


async def test_foreign_lease_table_is_refused(tmp_path: Path) -> None:
    q = await opened(tmp_path / "q.db")
    await insert_n(q, 1)
    (lease,) = await q.claim(want(1), time.time(), 30)
    lease.table = "q_incoming; DROP TABLE q_dead"
    with pytest.raises(ValueError, match="unknown table"):
        await q.ack([lease])
    with pytest.raises(ValueError, match="unknown table"):
        await q.claim([], time.time(), 30, acks=[lease])
    await q.close()


# -- scans --------------------------------------------------------------------------


async def test_skip_scan_finds_every_destination_of_a_large_table(tmp_path: Path) -> None:
    """A full scan lists every destination of the normal lane, whatever the backlog,
    by one index seek per destination: its cost does not grow with the rows."""
    q = await opened(tmp_path / "q.db")
    odd = ["", " ", "a", "a ", "A", "é", "中文", "\U0001f600", "z" * 40, "0", "00"]
    dests = [*odd, *(f"dest-{i:04d}" for i in range(300))]
    await q.insert(Lane.NORMAL, [Row(d, b"x") for d in dests])
    assert q._conn.db is not None
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0  # go on

    async def scan_cost() -> tuple[set[str], int]:
        nonlocal steps
        assert q._conn.db is not None
        steps = 0
        await q._conn.db.set_progress_handler(count, 10)
        try:
            scan = await q.scan(time.time())
        finally:
            await q._conn.db.set_progress_handler(None, 10)
        assert scan.full and all(f.ready == 0 for f in scan.found.values())
        return set(scan.found), steps

    found, small = await scan_cost()
    assert found == set(dests)
    # a backlog 100 times as large, mostly one destination's, some leased
    await q.insert(Lane.NORMAL, [Row("dest-0150", b"hot")] * 30_000)
    await q.insert(Lane.NORMAL, [Row(d, b"y") for d in dests for _ in range(3)])
    leased = await q.claim([Want("dest-0150", 500), Want("", 5)], time.time(), 30)
    assert len(leased) == 504
    found, large = await scan_cost()
    assert found == set(dests)  # leased rows are rows: their destinations are listed
    assert large < 1.5 * small, (small, large)
    await q.close()


async def test_incremental_scan_finds_new_rows_and_late_commits(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    q = await opened(path)
    now = time.time()
    await insert_n(q, 10, dest="old")
    raw_sql(path, "DELETE FROM q_incoming WHERE id = 5")  # a gap below the mark
    first = await q.scan(now)
    assert set(first.found) == {"old"} and first.full
    quiet = await q.scan(now, first.mark)
    assert not quiet.full and "old" in quiet.found  # re-read: the last ids may come late

    await insert_n(q, 3, dest="a")
    await insert_n(q, 2, dest="b")
    await q.insert(Lane.TIMED, [Row("later", b"t", now + 60), Row("due", b"t", now - 1)])
    await q.insert(Lane.EMERGENCY, [Row("e", b"!")])
    # an insert that committed behind a later one: its id is below the mark
    raw_sql(
        path, "INSERT INTO q_incoming (id, destination, message, created) VALUES (5, ?, ?, ?)",
        ("late", b"l", 0),
    )  # fmt: skip
    scan = await q.scan(now, first.mark)
    assert {"a", "b", "later", "due", "late"} <= set(scan.found) and not scan.full
    assert scan.found["a"].rows == 3 and scan.found["b"].rows == 2
    assert scan.found["later"].ready == pytest.approx(now + 60) and scan.found["due"].ready == 0
    assert scan.emergency and scan.next_due == pytest.approx(now + 60)

    # once far below the mark, "later" is listed when it comes due, not before
    await q.insert(Lane.TIMED, [Row("filler", b"f", now + 3600)] * 100)
    scan = await q.scan(now, scan.mark)
    assert "later" not in (await q.scan(now + 30, scan.mark)).found
    came = await q.scan(now + 61, scan.mark)
    assert came.found["later"].ready == 0 and came.next_due == pytest.approx(now + 3600)
    await q.close()


# -- processes ------------------------------------------------------------------


@pytest.mark.slow
async def test_two_processes_share_one_file(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    q = await opened(path)
    await q.insert(Lane.NORMAL, [Row(f"d{i % 5}", str(i).encode()) for i in range(500)])
    await q.insert(Lane.EMERGENCY, [Row("e", str(i).encode()) for i in range(500, 520)])
    procs = [spawn(path, "consume", 30.0) for _ in range(2)]
    for p in procs:
        go(p)
    outs = [p.communicate(timeout=60)[0].splitlines() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    seen = [line.split()[1] for line in outs[0] + outs[1]]
    assert len(seen) == len(set(seen)) == 520, "a message was delivered twice or lost"
    assert set(seen) == {str(i) for i in range(520)}
    assert all(len(out) > 0 for out in outs), "both processes should have consumed"
    for out in outs:  # each claim takes a destination's oldest rows not leased
        by_dest: dict[str, list[int]] = {}
        for line in out:
            dest, body = line.split()
            by_dest.setdefault(dest, []).append(int(body))
        assert all(ids == sorted(ids) for ids in by_dest.values())
    stats = await q.stats(time.time())
    assert sum(stats.queued.values()) == sum(stats.leased.values()) == 0
    await q.close()


async def test_killed_process_leases_come_back(tmp_path: Path) -> None:
    """Nothing ends with a process on sqlite: a killed holder's rows come back when
    their leases end, on the clock, not before, counted again."""
    path, lease = tmp_path / "q.db", 30.0
    q = await opened(path)
    await insert_n(q, 25)
    proc = spawn(path, "hold", lease)
    go(proc)
    assert proc.stdout is not None
    claimed_at, *ids = proc.stdout.readline().split()
    held = sorted(int(i) for i in ids)
    assert len(held) == 10
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    now, expiry = float(claimed_at), float(claimed_at) + lease
    ours = await q.claim(want(100), now, 3600)  # the 15 the child did not hold
    assert len(ours) == 15 and not {x.id for x in ours} & set(held)
    assert await q.claim(want(100), expiry - 0.001, 30) == []
    back = await q.claim(want(100), expiry + 0.001, 30)
    assert [x.id for x in back] == held  # in their order
    assert all(x.deliveries == 2 for x in back)
    await q.ack([*ours, *back])
    await q.close()


async def test_process_killed_inside_a_transaction(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    q = await opened(path, busy_timeout=0.2)
    await insert_n(q, 3)
    holder = (
        "import sqlite3, sys, time\n"
        "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        "c.execute('BEGIN IMMEDIATE')\n"
        "c.execute('UPDATE q_incoming SET deliveries = 99, lease_until = 1e18')\n"
        "print('locked', flush=True)\n"
        "time.sleep(3600)\n"
    )
    proc = popen(holder, str(path))
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    with pytest.raises(QueueError, match="locked"):
        await q.claim(want(10), time.time(), 30)
    scan = await q.scan(time.time())  # WAL: reads are never blocked
    assert set(scan.found) == {"d"}
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    leases = await q.claim(want(10), time.time(), 30)  # the OS dropped the lock; nothing committed
    assert [x.deliveries for x in leases] == [1, 1, 1]
    await q.close()


def test_unclosed_queue_does_not_hang_the_process_at_exit(tmp_path: Path) -> None:
    script = (
        "import asyncio, sys\n"
        "from mvalve_async.queues.sqlite import SQLiteQueue\n"
        "from mvalve_async.urls import QueueSettings\n"
        "async def main():\n"
        "    q = SQLiteQueue(QueueSettings('sqlite', path=sys.argv[1]))\n"
        "    await q.connect()\n"
        "    raise SystemExit(3)  # never closed\n"
        "asyncio.run(main())\n"
    )
    proc = popen(script, str(tmp_path / "q.db"))
    assert proc.wait(timeout=20) == 3


# -- cancellation -----------------------------------------------------------------


def leased_ids(path: Path) -> set[int]:
    raw = sqlite3.connect(path)
    try:
        return {r[0] for r in raw.execute("SELECT id FROM q_incoming WHERE lease_token <> 0")}
    finally:
        raw.close()


async def test_claim_cancelled_at_every_step(tmp_path: Path) -> None:
    """A claim cancelled at any await point leaves no transaction open, and its acks
    and its leases commit together or not at all."""
    path = tmp_path / "q.db"
    q = await opened(path)
    await insert_n(q, 200)
    deleted = cancelled = 0
    for steps in range(30):
        (held,) = await q.claim(want(1), time.time(), 3600)  # the connection is still usable
        before = leased_ids(path)
        task = asyncio.create_task(q.claim(want(3), time.time(), 3600, acks=[held]))
        for _ in range(steps):
            await asyncio.sleep(0)
        task.cancel()
        (result,) = await asyncio.gather(task, return_exceptions=True)
        assert can_write(path), f"a transaction was left open (cancelled after {steps} steps)"
        new = leased_ids(path) - before
        acked = held.id not in leased_ids(path) | new
        assert acked == bool(new), f"the acks and the leases parted (after {steps} steps)"
        if isinstance(result, list):
            assert {x.id for x in result} == new and len(new) == 3
            await q.ack(result)
            deleted += len(result)
        else:
            assert isinstance(result, asyncio.CancelledError)
            cancelled += 1
        if acked:
            deleted += 1
        else:
            await q.ack([held])  # the ack rolled back with the claim: it is still due
            deleted += 1
    assert cancelled > 0  # (how many complete depends on the worker thread's speed)
    # rows leased by cancelled claims were not lost: they come back after the lease
    left = await q.claim(want(1000), time.time() + 7200, 30)
    assert len(left) == 200 - deleted
    await q.close()


async def test_cancel_while_waiting_for_the_write_lock(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    q = await opened(path)
    await insert_n(q, 2)
    raw = sqlite3.connect(path, isolation_level=None)
    raw.execute("BEGIN IMMEDIATE")
    for cancels in (1, 2):  # twice: the cleanup's ROLLBACK is interrupted too
        task = asyncio.create_task(q.claim(want(10), time.time(), 30))
        await asyncio.sleep(0.2)  # BEGIN IMMEDIATE is waiting on the worker thread
        for _ in range(cancels):
            task.cancel()
            await asyncio.sleep(0.05)
        if cancels == 2:
            assert task.done()
        raw.execute("ROLLBACK")  # the BEGIN now succeeds on the worker thread ...
        with pytest.raises(asyncio.CancelledError):
            await task
        leases = await q.claim(want(10), time.time(), 30)  # ... and rolled back before this
        assert [x.deliveries for x in leases] == [cancels, cancels]  # no claim slipped in
        assert can_write(path)
        await q.release(leases[0])
        await q.release(leases[1])
        raw.execute("BEGIN IMMEDIATE")
    raw.execute("ROLLBACK")
    raw.close()
    await q.close()


async def test_transaction_left_open_is_rolled_back_on_next_use(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    q = await opened(path)
    await insert_n(q, 1)
    conn = q._conn
    assert conn.db is not None
    await conn.db.execute("BEGIN IMMEDIATE")  # as if a cleanup never ran ...
    await conn.db.execute("UPDATE q_incoming SET deliveries = 99")
    conn.dirty = True  # ... which is what the flag records
    assert not can_write(path)
    (lease,) = await q.claim(want(1), time.time(), 30)
    assert lease.deliveries == 1 and can_write(path)
    await q.close()


async def test_requeue_dead_of_an_unknown_lane_goes_to_normal(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    q = await opened(path)
    raw = sqlite3.connect(path)
    raw.execute(
        "INSERT INTO q_dead (lane, destination, message, reason, deliveries, died_at) "
        "VALUES ('bulk', 'd', x'00', 'old version', 3, 0), ('timed', 'd', x'01', 'r', 1, 0)"
    )
    raw.commit()
    raw.close()
    assert await q.requeue_dead() == 2 and await q.dead_letters() == []
    leases = await q.claim(want(5), time.time() + 1, 30)
    assert [(x.lane, x.blob, x.deliveries) for x in leases] == [
        (Lane.TIMED, b"\x01", 1),
        (Lane.NORMAL, b"\x00", 1),
    ]
    await q.close()


# -- through the public API -------------------------------------------------------


async def test_pipe_on_sqlite(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/sub/pipe.db"
    async with mvalve_async.open(url, "memory://") as pipe:
        await pipe.writer().insert(Message("carrier", {"n": 1}))
        reader = pipe.reader()
        msg = await reader.next(timeout=2)
        assert msg is not None and msg.content == {"n": 1} and msg.deliveries == 1
        assert await reader.next(timeout=0.1) is None  # acks the first
    async with mvalve_async.open(url, "memory://") as pipe:
        stats = await pipe.queue.stats(time.time())
        assert sum(stats.queued.values()) == sum(stats.leased.values()) == 0
