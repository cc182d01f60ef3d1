"""SQLiteQueue: what only the sqlite dialect has (files, processes, locks, cancellation).

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
from mvalve_async.interfaces import Lane, Lease, Queue, Row
from mvalve_async.message import Message
from mvalve_async.queues.sqlite import SQLiteQueue
from mvalve_async.urls import QueueSettings, Tables

ROOT = str(Path(__file__).resolve().parents[2])

# A child process: connect, say "ready", wait for "go" on stdin, then consume
# (print every claimed body, ack) or hold (claim, print, sleep until killed).
CHILD = r"""
import asyncio, sys, time
from mvalve_async.queues.sqlite import SQLiteQueue
from mvalve_async.urls import QueueSettings

async def main(path, mode, lease, returning):
    q = SQLiteQueue(QueueSettings("sqlite", path=path))
    q.use_returning = returning == "True"
    await q.connect()
    print("ready", flush=True)
    sys.stdin.readline()
    if mode == "hold":
        now = time.time()
        leases = await q.claim(10, now, lease)
        print(now, *[x.id for x in leases], flush=True)
        await asyncio.sleep(3600)
    while True:
        leases = await q.claim(16, time.time(), lease)
        if not leases:
            if not (await q.poll(time.time()))[0]:
                break
            continue
        print("\n".join(x.blob.decode() for x in leases), flush=True)
        await asyncio.sleep(0.0005 * len(leases))  # "work", so the processes interleave
        await q.ack(leases)
    await q.close()

asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]))
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


def spawn(path: Path, mode: str, lease: float, returning: bool = True) -> subprocess.Popen[str]:
    proc = popen(CHILD, str(path), mode, str(lease), str(returning))
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def go(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.write("go\n")
    proc.stdin.flush()


async def insert_n(q: Queue, n: int, lane: Lane = Lane.NORMAL) -> None:
    await q.insert(lane, [Row("d", str(i).encode()) for i in range(n)])


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
    assert "q_timed_ready ON q_timed (ready, created, id)" in ddl
    await q.drop_schema()
    await q.drop_schema()  # idempotent
    with pytest.raises(SchemaError):
        await q.poll(time.time())
    await q.close()
    await q.close()


async def test_missing_tables_give_schema_error(tmp_path: Path) -> None:
    q = SQLiteQueue(settings(tmp_path / "q.db"))
    await q.connect()
    for op in (
        q.insert(Lane.NORMAL, [Row("d", b"x")]),
        q.claim(1, time.time(), 30),
        q.poll(time.time()),
        q.stats(time.time()),
        q.dead_letters(),
    ):
        with pytest.raises(SchemaError, match="mvalve create"):
            await op
    await q.create_schema()  # and the connection is still fine afterwards
    await insert_n(q, 1)
    assert len(await q.claim(5, time.time(), 30)) == 1
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
        await q.claim(1, time.time(), 30)
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
        await q.poll(time.time())
    await q.connect()  # a closed queue may be opened again
    assert await q.poll(time.time()) == (False, None)
    await q.close()


# -- claim paths --------------------------------------------------------------


@pytest.mark.parametrize("returning", [True, False])
async def test_claim_paths_and_multi_table_lanes(tmp_path: Path, returning: bool) -> None:
    s = settings(tmp_path / "q.db", normal=("n1", "n2", "n3"), timed=("t1", "t2"))
    q = SQLiteQueue(s)
    q.use_returning = returning  # the fallback for SQLite < 3.35 and several tables
    await q.connect()
    await q.create_schema()
    now = time.time()
    for i in range(12):  # spread over three tables at random; one insert at a time
        await q.insert(Lane.NORMAL, [Row("d", str(i).encode())])
    for i in (3, 1, 2):
        await q.insert(Lane.TIMED, [Row("d", f"t{i}".encode(), now - 10 + i)])
    first = await q.claim(5, now, 30)
    assert [x.blob for x in first] == [b"t1", b"t2", b"t3", b"0", b"1"]
    assert all(x.deliveries == 1 and x.token == first[0].token for x in first)
    rest = await q.claim(100, now, 30)
    assert [x.blob for x in rest] == [str(i).encode() for i in range(2, 12)]
    assert rest[0].token != first[0].token and 0 < rest[0].token < 2**63
    await q.release(rest[0])
    (again,) = await q.claim(100, now, 30)
    assert again.blob == b"2" and again.deliveries == 2
    await q.ack([*first, *rest[1:], again])
    assert await q.poll(now) == (False, None)
    await q.close()


async def test_foreign_lease_table_is_refused(tmp_path: Path) -> None:
    q = await opened(tmp_path / "q.db")
    await insert_n(q, 1)
    (lease,) = await q.claim(1, time.time(), 30)
    lease.table = "q_incoming; DROP TABLE q_dead"
    with pytest.raises(ValueError, match="unknown table"):
        await q.ack([lease])
    await q.close()


# -- processes ------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("returning", [True, False])
async def test_two_processes_share_one_file(tmp_path: Path, returning: bool) -> None:
    path = tmp_path / "q.db"
    q = await opened(path)
    await insert_n(q, 500)
    procs = [spawn(path, "consume", 30.0, returning) for _ in range(2)]
    for p in procs:
        go(p)
    outs = [p.communicate(timeout=60)[0].split() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    seen = outs[0] + outs[1]
    assert len(seen) == len(set(seen)) == 500, "a message was delivered twice or lost"
    assert set(seen) == {str(i) for i in range(500)}
    assert all(len(out) > 0 for out in outs), "both processes should have consumed"
    stats = await q.stats(time.time())
    assert sum(stats.queued.values()) == sum(stats.leased.values()) == 0
    await q.close()


@pytest.mark.slow
async def test_killed_process_leases_come_back(tmp_path: Path) -> None:
    path, lease = tmp_path / "q.db", 1.0
    q = await opened(path)
    await insert_n(q, 25)
    proc = spawn(path, "hold", lease)
    go(proc)
    assert proc.stdout is not None
    claimed_at, *ids = proc.stdout.readline().split()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    expiry = float(claimed_at) + lease
    ours = await q.claim(100, time.time(), 30)  # the 15 the child did not hold
    assert len(ours) == 15 and not {x.id for x in ours} & {int(i) for i in ids}
    back: list[Lease] = []
    deadline = time.monotonic() + 10
    while len(back) < 10 and time.monotonic() < deadline:
        now = time.time()
        got = await q.claim(100, now, 30)
        assert not got or now >= expiry, "a lease came back before it expired"
        back += got
        await asyncio.sleep(0.05)
    assert sorted(x.id for x in back) == sorted(int(i) for i in ids)
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
        await q.claim(10, time.time(), 30)
    assert await q.poll(time.time()) == (True, None)  # WAL: reads are never blocked
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    leases = await q.claim(10, time.time(), 30)  # the OS dropped the lock; nothing committed
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


async def test_claim_cancelled_at_every_step(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    q = await opened(path)
    await insert_n(q, 200)
    handed_out = cancelled = 0
    for steps in range(30):
        task = asyncio.create_task(q.claim(3, time.time(), 3600))
        for _ in range(steps):
            await asyncio.sleep(0)
        task.cancel()
        (result,) = await asyncio.gather(task, return_exceptions=True)
        if isinstance(result, list):
            handed_out += len(result)
            await q.ack(result)
        else:
            assert isinstance(result, asyncio.CancelledError)
            cancelled += 1
        assert can_write(path), f"a transaction was left open (cancelled after {steps} steps)"
        leases = await q.claim(1, time.time(), 3600)  # the connection is still usable
        assert len(leases) == 1
        await q.ack(leases)
        handed_out += 1
    assert cancelled > 0  # (how many complete depends on the worker thread's speed)
    # rows leased by cancelled claims were not lost: they come back after the lease
    left = await q.claim(1000, time.time() + 7200, 30)
    assert len(left) == 200 - handed_out
    await q.close()


async def test_cancel_while_waiting_for_the_write_lock(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    q = await opened(path)
    await insert_n(q, 2)
    raw = sqlite3.connect(path, isolation_level=None)
    raw.execute("BEGIN IMMEDIATE")
    for cancels in (1, 2):  # twice: the cleanup's ROLLBACK is interrupted too
        task = asyncio.create_task(q.claim(10, time.time(), 30))
        await asyncio.sleep(0.2)  # BEGIN IMMEDIATE is waiting on the worker thread
        for _ in range(cancels):
            task.cancel()
            await asyncio.sleep(0.05)
        if cancels == 2:
            assert task.done()
        raw.execute("ROLLBACK")  # the BEGIN now succeeds on the worker thread ...
        with pytest.raises(asyncio.CancelledError):
            await task
        leases = await q.claim(10, time.time(), 30)  # ... and is rolled back before this
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
    (lease,) = await q.claim(1, time.time(), 30)
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
    leases = await q.claim(5, time.time() + 1, 30)
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
