"""The aggregated stats log on MariaDB and SQLite: exact counts per (destination,
action, minute), one upsert statement per flush (counted by the database, not by
the stats log), failed flushes keep their counts and are retried, memory is capped,
and `mvalve statslog` shows the table."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
import uuid
import warnings
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

import mvalve_async
from mvalve_async import Message
from mvalve_async.cli import main
from mvalve_async.errors import ConfigError, QueueUnavailable, SchemaError
from mvalve_async.ops.statslog import StatsLog
from mvalve_async.urls import QueueSettings
from tests.services import MYSQL_URL, require_mysql

DIALECTS = ["innodb", "sqlite"]
T0 = 1_750_000_000.0  # a fixed clock for the stats log: every event in one minute
BUCKET = int(T0 // 60)


def _suffix() -> str:
    return uuid.uuid4().hex[:8]


def _queue_url(dialect: str, tmp_path: Path) -> str:
    sfx = _suffix()
    tables = f"emergency=e_{sfx}&timed=t_{sfx}&normal=n_{sfx}&dead=d_{sfx}"
    if dialect == "innodb":
        require_mysql()
        return f"{MYSQL_URL}?{tables}"
    return f"sqlite:///{tmp_path / 'q.db'}?{tables}"


@pytest.fixture(params=DIALECTS)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return _queue_url(request.param, tmp_path)


@pytest.fixture
async def make(url: str) -> AsyncIterator[Callable[..., StatsLog]]:
    """StatsLog factory on `url` with a unique table, dropped after the test."""
    made: list[StatsLog] = []

    def factory(**options: Any) -> StatsLog:
        options.setdefault("table", f"s_{_suffix()}")
        stats = StatsLog(url, **options)
        made.append(stats)
        return stats

    yield factory
    for stats in made:
        await stats.drop()
        await stats.close()
    async with mvalve_async.open(url, "memory://", create=False) as pipe:
        with warnings.catch_warnings():  # MariaDB's "unknown table" notes
            warnings.simplefilter("ignore")
            await pipe.queue.drop_schema()


class InsertCounter:
    """INSERT statements the database ran for the stats log's own connection:
    MariaDB's session Com_insert (its pool holds one connection), SQLite's trace."""

    def __init__(self, stats: StatsLog) -> None:
        self.stats = stats
        self.traced: list[str] = []
        self.base = 0

    async def _com_insert(self) -> int:
        async def run(conn: Any) -> int:
            async with conn.cursor() as cur:
                await cur.execute("SHOW SESSION STATUS LIKE 'Com_insert'")
                return int((await cur.fetchone())[1])

        return int(await self.stats._backend.db.run(run))  # type: ignore[attr-defined]

    async def attach(self) -> InsertCounter:
        backend: Any = self.stats._backend
        await backend.connect()
        if self.stats.dialect == "sqlite":
            await backend._db.set_trace_callback(self.traced.append)
        else:
            self.base = await self._com_insert()
        return self

    async def count(self) -> int:
        if self.stats.dialect == "sqlite":
            return sum(1 for sql in self.traced if sql.lstrip().upper().startswith("INSERT"))
        return await self._com_insert() - self.base


def _totals(rows: list[tuple[str, str, int, int]]) -> Counter[tuple[str, str]]:
    out: Counter[tuple[str, str]] = Counter()
    for dest, action, _, n in rows:
        out[(dest, action)] += n
    return out


async def test_pipe_counts_exactly_with_one_insert_per_flush(
    url: str, make: Callable[..., StatsLog]
) -> None:
    n = 60
    stats = make(flush_interval=3600, clock=lambda: T0)  # flushed by hand and at close
    await stats.create()
    inserts = await InsertCounter(stats).attach()
    async with stats, mvalve_async.open(url, "memory://", create=True,
                                        observers=[stats]) as pipe:  # fmt: skip
        writer = pipe.writer()
        await writer.insert_many([Message(f"dest-{i % 3}", i) for i in range(n - 6)])
        for i in range(6):
            await writer.insert(Message(f"dest-{i % 3}", f"single {i}"))
        assert await stats.flush() == 3  # dest-0..2 x enqueue
        reader = pipe.reader()
        got = [await reader.next(timeout=10) for _ in range(n)]
        assert all(m is not None for m in got)
        assert await reader.next(timeout=0.2) is None
        await reader.close()  # flushes its acks
        assert await stats.flush() == 6  # dest-0..2 x (dequeue, ack)
        assert await stats.flush() == 0  # nothing new: no statement
        written = await inserts.count()
    # leaving the blocks closed the pipe, then the stats log (nothing left to flush)
    assert (stats.flushes, stats.statements, stats.failures, stats.pending) == (2, 2, 0, 0)
    assert written == 2, "one INSERT statement per flush"
    rows = await stats.read()
    assert {minute for _, _, minute, _ in rows} == {BUCKET}
    totals = _totals(rows)
    for action in ("enqueue", "dequeue", "ack"):
        assert sum(v for (_, a), v in totals.items() if a == action) == n, action
    assert totals[("dest-0", "enqueue")] == 20 and totals[("dest-1", "dequeue")] == 20
    assert stats.written == 3 * n
    assert await stats.read(action="dequeue", destination="dest-2") == [
        ("dest-2", "dequeue", BUCKET, 20)
    ]


async def test_counts_from_two_loggers_add_up(url: str, make: Callable[..., StatsLog]) -> None:
    table = f"s_{_suffix()}"
    one, two = make(table=table, clock=lambda: T0), make(table=table, clock=lambda: T0)
    await one.create()
    async with one, two:
        one.event("dequeue", "a", 3)
        two.event("dequeue", "a", 4)
        two.event("defer", "a")
        await one.flush()
        await two.flush()
        one.event("dequeue", "a")
    assert await one.read() == [("a", "defer", BUCKET, 1), ("a", "dequeue", BUCKET, 8)]


async def test_background_loop_flushes_by_itself(url: str, make: Callable[..., StatsLog]) -> None:
    stats = make(flush_interval=0.05)
    await stats.create()
    async with stats:
        for _ in range(7):
            stats.event("enqueue", "carrier-a")
        for _ in range(500):
            if stats.pending == 0:  # a flush in progress still counts as pending
                break
            await asyncio.sleep(0.02)
        assert (stats.pending, stats.flushes, stats.failures) == (0, 1, 0)
        assert _totals(await stats.read()) == {("carrier-a", "enqueue"): 7}


async def test_failed_flush_keeps_counts_and_the_loop_retries(
    url: str, make: Callable[..., StatsLog], caplog: pytest.LogCaptureFixture
) -> None:
    stats = make(flush_interval=3600, clock=lambda: T0)
    await stats.create()
    async with stats:
        stats.event("enqueue", "a", 5)
        assert await stats.flush() == 1
        await stats.drop()  # the table goes away mid-run
        stats.event("enqueue", "a", 3)
        stats.event("dequeue", "b", 2)
        with caplog.at_level(logging.WARNING, "mvalve_async.ops.statslog"):
            with pytest.raises(SchemaError):
                await stats.flush()
        assert "flush failed" in caplog.text and "keeping 5 events" in caplog.text
        assert (stats.pending, stats.failures) == (5, 1)
        stats.event("enqueue", "a")  # counted meanwhile
        await stats.create()
        assert await stats.flush() == 2
        assert stats.pending == 0
    assert _totals(await stats.read()) == {("a", "enqueue"): 4, ("b", "dequeue"): 2}

    # The same through the background loop, which backs off and tries again.
    loop_stats = make(flush_interval=0.02, clock=lambda: T0)
    async with loop_stats:
        loop_stats.event("ack", "c", 9)  # no table yet: the flushes fail
        for _ in range(200):
            if loop_stats.failures >= 2:
                break
            await asyncio.sleep(0.02)
        assert loop_stats.failures >= 2 and loop_stats.pending == 9
        await loop_stats.create()
        for _ in range(500):  # the retries back off: 0.02, 0.04, ... seconds
            if loop_stats.pending == 0:
                break
            await asyncio.sleep(0.02)
        assert loop_stats.pending == 0
    assert await loop_stats.read() == [("c", "ack", BUCKET, 9)]


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_dead_server_keeps_counts_and_caps_memory(caplog: pytest.LogCaptureFixture) -> None:
    settings = QueueSettings("innodb", port=_dead_port(), connect_timeout=1.0)
    stats = StatsLog(settings, table="q_statslog", flush_interval=3600, max_keys=3)
    await stats.start()
    with caplog.at_level(logging.WARNING, "mvalve_async.ops.statslog"):
        for dest in "abc":
            stats.event("dequeue", dest, 2)
        for attempt in (1, 2):
            with pytest.raises(QueueUnavailable):
                await stats.flush()
            assert (stats.pending, stats.failures, stats.dropped) == (6, attempt, 0)
        stats.event("dequeue", "a")  # a key it holds: still counted
        stats.event("dequeue", "d", 4)  # a fourth key: over max_keys, dropped
        assert (stats.pending, stats.dropped) == (7, 4)
        await stats.close()  # the final flush fails too: logged, counts kept
    assert stats.pending == 7
    assert "dropping events" in caplog.text
    assert "final flush failed" in caplog.text and "7 events not written" in caplog.text


async def test_counts_arriving_during_a_failing_flush_stay_within_the_cap(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    stats = StatsLog(f"sqlite:///{tmp_path / 'q.db'}", max_keys=2, clock=lambda: T0)
    backend: Any = stats._backend

    async def failing(table: str, rows: Any) -> None:
        stats.event("ack", "new-1")  # arrive while the flush awaits the database
        stats.event("ack", "new-2")
        raise SchemaError("no such table")

    backend.upsert = failing
    stats.event("dequeue", "old-1", 5)
    stats.event("dequeue", "old-2", 1)
    with caplog.at_level(logging.WARNING, "mvalve_async.ops.statslog"), pytest.raises(SchemaError):
        await stats.flush()
    assert len(stats._pending) == 2 and stats.pending + stats.dropped == 8
    assert stats.dropped == 6  # the batch could not go back: the newer counters hold the cap
    await stats.close()


def test_bad_configuration() -> None:
    with pytest.raises(ConfigError, match="MySQL or SQLite"):
        StatsLog("memory://")
    with pytest.raises(ConfigError, match="plain identifier"):
        StatsLog("sqlite:///x.db", table="bad name; drop")
    with pytest.raises(ConfigError, match="flush_interval"):
        StatsLog("sqlite:///x.db", flush_interval=0)


async def test_long_keys_are_cut_to_the_columns(url: str, make: Callable[..., StatsLog]) -> None:
    stats = make(clock=lambda: T0)
    await stats.create()
    long = "d" * 300
    stats.event("dequeue", long + "x")
    stats.event("dequeue", long + "y")  # the same destination once cut to 255
    stats.event("a" * 40, "e")
    await stats.flush()
    assert await stats.read() == [
        ("d" * 255, "dequeue", BUCKET, 2),
        ("e", "a" * 32, BUCKET, 1),
    ]
    await stats.close()


async def test_statslog_of_a_queue_object(url: str, make: Callable[..., StatsLog]) -> None:
    async with mvalve_async.open(url, "memory://", create=True) as pipe:
        stats = StatsLog(pipe.queue, table=f"s_{_suffix()}")
        assert stats.dialect == ("sqlite" if url.startswith("sqlite") else "innodb")
        await stats.create()
        await stats.drop()
        await stats.close()


# -- mvalve statslog --------------------------------------------------------------


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_shows_per_minute_counts(
    url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    table = f"s_{_suffix()}"
    base = ["--url", url, "--table", table]
    code, out, err = _cli(capsys, "statslog", "create", *base)
    assert code == 0, err
    assert f"created {table}" in out

    now = time.time()
    minute = int(now // 60)

    async def log_some() -> None:
        clock = {"t": now}
        async with StatsLog(url, table=table, clock=lambda: clock["t"]) as stats:
            stats.event("dequeue", "carrier-a", 7)
            stats.event("dequeue", "carrier-b", 2)
            stats.event("enqueue", "carrier-a", 9)
            clock["t"] = now - 120
            stats.event("dequeue", "carrier-a", 3)
            clock["t"] = now - 40 * 86400  # old: outside the window, pruned below
            stats.event("dequeue", "carrier-a", 100)

    asyncio.run(log_some())
    try:
        code, out, err = _cli(capsys, "statslog", *base, "--json", "--minutes", "5")
        assert code == 0, err
        snap = json.loads(out)
        assert snap["minutes"] == list(range(minute - 4, minute + 1))
        assert snap["action"] == "dequeue"
        assert snap["destinations"] == {
            "carrier-a": {"counts": [0, 0, 3, 0, 7], "total": 10},
            "carrier-b": {"counts": [0, 0, 0, 0, 2], "total": 2},
        }
        code, out, err = _cli(capsys, "statslog", *base, "--action", "enqueue")
        assert code == 0, err
        assert "carrier-a" in out and "carrier-b" not in out and "enqueue per minute" in out
        code, out, err = _cli(capsys, "statslog", "prune", *base, "--days", "30")
        assert code == 0, err
        assert "pruned 1 row " in out
        code, out, err = _cli(capsys, "statslog", "create", "--print", *base)
        assert code == 0 and "CREATE TABLE IF NOT EXISTS" in out and table in out
    finally:
        code, out, err = _cli(capsys, "statslog", "drop", "--yes", *base)
        assert code == 0, err
    code, out, err = _cli(capsys, "statslog", *base)
    assert code == 1 and "statslog create" in err


async def test_pipe_starts_and_closes_its_observers(tmp_path: Path) -> None:
    from mvalve_async.ops.statslog import StatsLog

    url = f"sqlite:///{tmp_path}/q.db"
    stats = StatsLog(url, flush_interval=60)
    await stats.create()
    async with mvalve_async.open(url, "memory://", observers=[stats]) as pipe:
        await pipe.writer().insert_many([mvalve_async.Message("d", i) for i in range(5)])
        async with pipe.reader() as reader:
            for _ in range(5):
                assert await reader.next(timeout=5) is not None
    # closing the pipe flushed the counts (the interval alone would take a minute)
    rows = await stats.read(action="dequeue")
    assert sum(r[3] for r in rows) == 5  # (destination, action, minute, count)
