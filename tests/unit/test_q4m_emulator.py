"""The Q4M emulator, through real aiomysql connections (autocommit=True)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiomysql
import pymysql
import pytest
import pytest_asyncio

from tests.q4m.cond import compile_condition
from tests.q4m.emulator import Q4MServer
from tests.q4m.fixtures import q4m_server  # noqa: F401  (fixture)
from tests.q4m.sql import SqlError

Connect = Callable[[], Awaitable[aiomysql.Connection]]
QUEUE = (
    "CREATE TABLE {} (destination VARCHAR(255) NOT NULL, ready BIGINT NOT NULL DEFAULT 0,"
    " message LONGBLOB NOT NULL) ENGINE=QUEUE"
)


@pytest_asyncio.fixture
async def connect(q4m_server: Q4MServer) -> AsyncIterator[Connect]:  # noqa: F811
    opened: list[aiomysql.Connection] = []

    async def _connect() -> aiomysql.Connection:
        conn = await aiomysql.connect(
            host="127.0.0.1", port=q4m_server.port, user="root", db="test", autocommit=True
        )
        opened.append(conn)
        return conn

    yield _connect
    for conn in opened:
        conn.close()


@pytest_asyncio.fixture
async def db(connect: Connect) -> aiomysql.Connection:
    """One connection, with the tables q, t1, t2, t3 created."""
    conn = await connect()
    for name in ("q", "t1", "t2", "t3"):
        await run(conn, QUEUE.format(name))
    return conn


async def run(conn: aiomysql.Connection, sql: str, args: Any = None) -> list[tuple[Any, ...]]:
    async with conn.cursor() as cur:
        await cur.execute(sql, args)
        return list(await cur.fetchall())


async def one(conn: aiomysql.Connection, sql: str, args: Any = None) -> Any:
    rows = await run(conn, sql, args)
    assert len(rows) == 1, rows
    return rows[0][0]


async def put(conn: aiomysql.Connection, table: str, *messages: bytes, ready: int = 0) -> None:
    values = ", ".join(["(%s, %s, %s)"] * len(messages))
    args = [v for m in messages for v in ("dest", ready, m)]
    await run(conn, f"INSERT INTO {table} (destination, ready, message) VALUES {values}", args)


async def messages(conn: aiomysql.Connection, table: str = "q") -> list[bytes]:
    return [row[0] for row in await run(conn, f"SELECT message FROM {table}")]


def stats(text: str) -> dict[str, int]:
    return {k: int(v) for k, v in (line.split(": ") for line in text.splitlines())}


async def test_insert_then_queue_wait_returns_index_and_owns_the_row(
    db: aiomysql.Connection,
    q4m_server: Q4MServer,  # noqa: F811
) -> None:
    await put(db, "q", b"first", b"second")
    assert await one(db, "SELECT queue_wait('q', 0)") == 1
    rows = await run(db, "SELECT * FROM q")
    assert rows == [("dest", 0, b"first")]
    assert [r["_owned"] for r in q4m_server.rows("q")] == [True, False]


async def test_tables_are_tried_in_argument_order(
    db: aiomysql.Connection,
    q4m_server: Q4MServer,  # noqa: F811
) -> None:
    await put(db, "t3", b"low")
    await put(db, "t2", b"middle")
    wait = "SELECT queue_wait('t1', 't2', 'test.t3', 0)"
    assert await one(db, wait) == 2
    assert await messages(db, "t2") == [b"middle"]
    assert await one(db, wait) == 3
    assert q4m_server.rows("t2") == []  # a second queue_wait consumes the held row
    assert await messages(db, "t3") == [b"low"]
    assert await one(db, wait) == 0
    assert q4m_server.rows("t3") == []


async def test_two_arguments_mean_one_table_and_a_timeout(db: aiomysql.Connection) -> None:
    await put(db, "t2", b"x")
    started = time.monotonic()
    assert await one(db, "SELECT queue_wait('t1', 't2')") == 0  # t2 is the timeout (0)
    assert time.monotonic() - started < 1
    assert await one(db, "SELECT queue_abort()") == 1
    assert await messages(db, "t2") == [b"x"]


async def test_conditional_wait_skips_rows_that_do_not_match(
    db: aiomysql.Connection, connect: Connect
) -> None:
    await run(db, QUEUE.format("q_timed"))
    await put(db, "q_timed", b"later", ready=1_700_000_000_000_500)
    await put(db, "q_timed", b"due", ready=1_699_999_999_999_000)
    await put(db, "q", b"incoming")
    wait = "SELECT queue_wait('q_timed:ready<1700000000000000', 'q', 0)"
    assert await one(db, wait) == 1
    assert await messages(db, "q_timed") == [b"due"]
    assert await one(db, wait) == 2  # the remaining timed row is not due
    other = await connect()
    assert await one(other, "SELECT queue_wait('q_timed:ready<1700000000000000', 0)") == 0
    assert await one(other, "SELECT queue_wait('q_timed:ready > 1 and not ready is null', 0)") == 1
    assert await messages(other, "q_timed") == [b"later"]
    # a text column cannot be used in a condition, and an unknown table gives NULL
    assert await one(other, "SELECT queue_wait('q:destination=1', 0)") is None
    assert await one(other, "SELECT queue_wait('no_such_table', 0)") is None


@pytest.mark.parametrize(
    ("expr", "row", "expected"),
    [
        ("ready<10", {"ready": 9}, True),
        ("ready<10", {"ready": 10}, False),
        ("ready<>3 && ready!=4", {"ready": 5}, True),
        ("ready = 1 or ready = 2 xor 1", {"ready": 2}, False),  # xor binds tighter than or
        ("not ready = 1", {"ready": 2}, True),
        ("ready is null", {"ready": None}, True),
        ("ready is not null or 1", {"ready": None}, True),
        ("ready < 10", {"ready": None}, False),
        ("(ready div 0) is null", {"ready": 5}, True),
        ("ready % 4 = 3 and ready mod 4 = 3", {"ready": 7}, True),
        ("-7 div 2 = -3 and -7 % 3 = -1", {"ready": 0}, True),
        ("1 << 3 | 1 = 9 and 0xff & ~0x0f = 0xf0 and (6 ^ 3) = 5", {"ready": 0}, True),
        ("2 + 3 * 4 = 14 and 2 * 3 ^ 1 = 4", {"ready": 0}, True),  # ^ binds tighter than *
        ("010 = 8 and 08 = 8", {"ready": 0}, True),  # leading 0 is octal, as in Q4M
        ("9223372036854775807 + 1 < 0", {"ready": 0}, True),  # signed 64-bit wrap
        ("`ready` >= 3 AND ready IS TRUE", {"ready": 3}, True),
        ("ready is false", {"ready": 0}, True),
    ],
)
def test_condition_language(expr: str, row: dict[str, int | None], expected: bool) -> None:
    assert compile_condition(expr, {"ready"})(row) is expected


@pytest.mark.parametrize(
    "expr", ["message = 1", "ready <", "ready = 'x'", "__import__('os')", "ready = (1", "1 +"]
)
def test_condition_language_rejects_what_it_does_not_know(expr: str) -> None:
    with pytest.raises(SqlError):
        compile_condition(expr, {"ready"})


async def test_timeout_returns_zero_and_still_enters_owner_mode(
    db: aiomysql.Connection, connect: Connect
) -> None:
    started = time.monotonic()
    assert await one(db, "SELECT queue_wait('q', 1)") == 0
    assert 0.9 <= time.monotonic() - started < 3
    other = await connect()
    await put(other, "q", b"m")
    assert await messages(db) == []  # owner mode without a row sees nothing
    assert await one(db, "SELECT queue_rowid()") is None
    assert await one(db, "SELECT queue_abort()") == 1  # legal: it is in owner mode
    assert await messages(db) == [b"m"]


async def test_an_owned_row_is_invisible_to_other_connections(
    db: aiomysql.Connection, connect: Connect
) -> None:
    await put(db, "q", b"one", b"two")
    assert await one(db, "SELECT queue_wait('q', 0)") == 1
    other = await connect()
    assert await messages(other) == [b"two"]
    assert await one(other, "SELECT COUNT(*) FROM q") == 1
    assert await one(other, "SELECT COUNT(*) FROM q WHERE destination = %s", ("dest",)) == 1
    assert await run(other, "DELETE FROM q WHERE destination = 'dest'") == []
    assert await messages(db) == [b"one"]  # the owned row survived the other's DELETE
    assert await one(other, "SELECT COUNT(*) FROM q") == 0


async def test_queue_end_deletes_the_owned_row(
    db: aiomysql.Connection,
    q4m_server: Q4MServer,  # noqa: F811
) -> None:
    await put(db, "q", b"one", b"two")
    assert await one(db, "SELECT queue_wait('q', 0)") == 1
    assert await one(db, "SELECT queue_end()") == 1
    assert [r["message"] for r in q4m_server.rows("q")] == [b"two"]
    assert await messages(db) == [b"two"]  # out of owner mode: sees the queue again
    assert await one(db, "SELECT queue_end()") == 1  # harmless outside owner mode


async def test_queue_abort_puts_the_row_back_at_its_fifo_place(
    db: aiomysql.Connection, connect: Connect
) -> None:
    await put(db, "q", b"r1", b"r2", b"r3")
    second = await connect()
    assert await one(db, "SELECT queue_wait('q', 0)") == 1
    assert await one(second, "SELECT queue_wait('q', 0)") == 1
    assert await messages(second) == [b"r2"]
    assert await one(db, "SELECT queue_abort()") == 1
    third = await connect()
    assert await messages(third) == [b"r1", b"r3"]
    assert await one(third, "SELECT queue_wait('q', 0)") == 1
    assert await messages(third) == [b"r1"]  # not r3: r1 went back to the head


async def test_abort_and_rowid_outside_owner_mode_are_errors(db: aiomysql.Connection) -> None:
    for sql in ("SELECT queue_abort()", "SELECT queue_rowid()"):
        with pytest.raises(pymysql.err.OperationalError) as caught:
            await run(db, sql)
        assert caught.value.args[0] == 1123
        assert "not in owner mode" in caught.value.args[1]
    await put(db, "q", b"m")
    assert await one(db, "SELECT queue_wait('q', 0)") == 1
    assert await one(db, "SELECT queue_end()") == 1
    with pytest.raises(pymysql.err.OperationalError):
        await run(db, "SELECT queue_abort()")


@pytest.mark.parametrize("how", ["quit", "abrupt", "kill", "kill_all"])
async def test_a_dropped_connection_hands_its_row_to_a_waiter(
    how: str,
    db: aiomysql.Connection,
    connect: Connect,
    q4m_server: Q4MServer,  # noqa: F811
) -> None:
    await put(db, "q", b"precious")
    owner, waiter = await connect(), await connect()
    assert await one(owner, "SELECT queue_wait('q', 0)") == 1
    started = time.monotonic()
    waiting = asyncio.create_task(one(waiter, "SELECT queue_wait('q', 30)"))
    await q4m_server.wait_for_waiters(1)
    if how == "quit":
        await owner.ensure_closed()
    elif how == "abrupt":
        owner.close()
    elif how == "kill":
        await run(db, f"KILL {owner.thread_id()}")
    else:
        await asyncio.gather(q4m_server.kill_all(), waiting, return_exceptions=True)
        assert q4m_server.connections == 0
        assert q4m_server.rows("q")[0]["_owned"] is False
        assert q4m_server.stats("q")["restored_by_close"] == 1
        return
    assert await asyncio.wait_for(waiting, 5) == 1
    assert time.monotonic() - started < 5  # woken, not timed out (30 s)
    assert await messages(waiter) == [b"precious"]
    assert q4m_server.stats("q")["restored_by_close"] == 1


async def test_update_is_rejected(db: aiomysql.Connection) -> None:
    await put(db, "q", b"m")
    with pytest.raises(pymysql.err.OperationalError) as caught:
        await run(db, "UPDATE q SET ready = 5")
    assert caught.value.args[0] == 1031
    assert await run(db, "SELECT ready FROM q") == [(0,)]


async def test_delete_and_truncate(db: aiomysql.Connection) -> None:
    await run(db, "INSERT INTO q (destination, message) VALUES ('a', 'x'), ('b', 'y'), ('a', 'z')")
    async with db.cursor() as cur:
        assert await cur.execute("DELETE FROM q WHERE destination = %s", ("a",)) == 2
    assert await run(db, "SELECT destination, message FROM q") == [("b", b"y")]
    await run(db, "TRUNCATE TABLE q")
    assert await one(db, "SELECT COUNT(*) FROM q") == 0
    await put(db, "q", b"again")
    await run(db, "TRUNCATE q")
    assert await messages(db) == []
    assert stats(await one(db, "SELECT queue_stats('q')"))["rows_written"] == 0


async def test_a_blocked_wait_wakes_when_another_connection_inserts(
    db: aiomysql.Connection,
    connect: Connect,
    q4m_server: Q4MServer,  # noqa: F811
) -> None:
    waiter = await connect()
    started = time.monotonic()
    waiting = asyncio.create_task(one(waiter, "SELECT queue_wait('t1', 't2', 30)"))
    await q4m_server.wait_for_waiters(1)
    assert not waiting.done()
    await put(db, "t1", b"news")
    assert await asyncio.wait_for(waiting, 5) == 1
    assert time.monotonic() - started < 5
    assert await messages(waiter, "t1") == [b"news"]
    assert stats(await one(db, "SELECT queue_stats('t1')"))["wait_delayed"] == 1


async def test_every_byte_value_round_trips(db: aiomysql.Connection, connect: Connect) -> None:
    payloads = [
        bytes(range(256)),
        bytes(range(255, -1, -1)),
        b"'\\\"\x00\x1a\n\r\t%_",
        "déjà vu ✓".encode(),
    ]
    await put(db, "q", *payloads)
    assert await messages(db) == payloads
    await run(db, "INSERT INTO q (destination, message) VALUES (%s, %s)", ("dé'\\✓", b""))
    assert (await run(db, "SELECT destination FROM q"))[-1] == ("dé'\\✓",)
    reader = await connect()
    for payload in payloads:
        assert await one(reader, "SELECT queue_wait('q', 0)") == 1
        assert await one(reader, "SELECT message FROM q") == payload


async def test_queue_rowid_is_the_hidden_fifo_id(db: aiomysql.Connection) -> None:
    await put(db, "q", b"a", b"b", b"c")
    ids = []
    for _ in range(3):
        assert await one(db, "SELECT queue_wait('q', 0)") == 1
        ids.append(await one(db, "SELECT queue_rowid()"))
    assert ids == [1, 2, 3]
    await put(db, "q", b"d")
    assert await one(db, "SELECT queue_wait('q', 0)") == 1
    assert await one(db, "SELECT queue_rowid()") == 4
    assert await one(db, "SELECT queue_abort()") == 1
    assert await one(db, "SELECT queue_wait('q', 0)") == 1
    assert await one(db, "SELECT queue_rowid()") == 4  # the same row, the same id


async def test_queue_stats_counters(db: aiomysql.Connection, connect: Connect) -> None:
    await put(db, "q", b"12345", b"67890")  # each row: "dest" + "0" + 5 bytes = 10
    assert await one(db, "SELECT queue_wait('q', 't1', 0)") == 1  # immediate on q
    assert await one(db, "SELECT queue_abort()") == 1
    assert await one(db, "SELECT queue_wait('q', 0)") == 1
    assert await one(db, "SELECT queue_end()") == 1
    other = await connect()
    assert await one(other, "SELECT queue_wait('q', 0)") == 1
    other.close()
    assert await one(db, "SELECT queue_wait('t1', 0)") == 0
    wait = asyncio.create_task(one(db, "SELECT queue_wait('q', 5)"))  # waits for the close
    assert await asyncio.wait_for(wait, 5) == 1
    assert await one(db, "SELECT queue_end()") == 1
    got = stats(await one(db, "SELECT queue_stats('q')"))
    assert got == {
        "rows_written": 2,
        "rows_removed": 2,
        "wait_immediate": got["wait_immediate"],
        "wait_delayed": got["wait_delayed"],
        "wait_timeout": 0,
        "restored_by_abort": 1,
        "restored_by_close": 1,
        "bytes_total": 20,
        "bytes_removed": 20,
    }
    assert got["wait_immediate"] + got["wait_delayed"] == 4
    assert stats(await one(db, "SELECT queue_stats('t1')"))["wait_timeout"] == 2
    assert await one(db, "SELECT queue_stats('nope')") is None


async def test_session_setup_statements_are_accepted(connect: Connect) -> None:
    conn = await connect()
    for sql in (
        "SET NAMES utf8mb4",
        "SET autocommit=1",
        "SET sql_mode=STRICT_TRANS_TABLES,NO_ZERO_DATE",
        "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED",
        "START TRANSACTION",
        "BEGIN",
        "COMMIT",
        "ROLLBACK",
    ):
        assert await run(conn, sql) == []
    assert await one(conn, "SELECT @@version_comment") == "mysql-mimic"
    await conn.begin()
    await conn.commit()
    await conn.rollback()


async def test_ddl_and_insert_errors(db: aiomysql.Connection) -> None:
    cases = [
        (QUEUE.format("q"), 1050),
        ("DROP TABLE nope", 1051),
        ("SELECT * FROM nope", 1146),
        ("INSERT INTO q (destination) VALUES ('a')", 1364),  # message has no default
        ("INSERT INTO q (nope) VALUES (1)", 1054),
        ("INSERT INTO q (destination, message) VALUES ('a')", 1136),
        ("CREATE TABLE k (id INT AUTO_INCREMENT PRIMARY KEY) ENGINE=QUEUE", 1069),
        ("CREATE TABLE i (id INT) ENGINE=InnoDB", 1286),
    ]
    for sql, code in cases:
        with pytest.raises(pymysql.err.MySQLError) as caught:
            await run(db, sql)
        assert caught.value.args[0] == code, sql
    await run(db, QUEUE.replace("CREATE TABLE", "CREATE TABLE IF NOT EXISTS").format("q"))
    await run(db, "DROP TABLE IF EXISTS q, nope")
    with pytest.raises(pymysql.err.ProgrammingError):
        await run(db, "SELECT * FROM q")


async def test_a_password_can_be_required() -> None:
    async with Q4MServer(password="s3cret") as server:
        conn = await aiomysql.connect(host=server.host, port=server.port, password="s3cret")
        assert await one(conn, "SELECT 1") == 1
        conn.close()
        with pytest.raises(pymysql.err.OperationalError):
            await aiomysql.connect(host=server.host, port=server.port, password="wrong")


async def test_each_row_goes_to_exactly_one_of_many_waiters(
    db: aiomysql.Connection,
    connect: Connect,
    q4m_server: Q4MServer,  # noqa: F811
) -> None:
    readers = [await connect() for _ in range(5)]
    waits = [asyncio.create_task(one(r, "SELECT queue_wait('q', 30)")) for r in readers]
    await q4m_server.wait_for_waiters(5)
    await put(db, "q", *(b"m%d" % i for i in range(5)))
    assert await asyncio.wait_for(asyncio.gather(*waits), 5) == [1] * 5
    got = [await messages(r) for r in readers]
    assert sorted(m for ms in got for m in ms) == [b"m0", b"m1", b"m2", b"m3", b"m4"]
    assert q4m_server.stats("q")["wait_delayed"] == 5


async def test_kill_query_cancels_a_wait(
    db: aiomysql.Connection,
    connect: Connect,
    q4m_server: Q4MServer,  # noqa: F811
) -> None:
    waiter = await connect()
    waiting = asyncio.create_task(one(waiter, "SELECT queue_wait('q', 30)"))
    await q4m_server.wait_for_waiters(1)
    await run(db, f"KILL QUERY {waiter.thread_id()}")
    with pytest.raises(pymysql.err.OperationalError) as caught:
        await asyncio.wait_for(waiting, 5)
    assert caught.value.args[0] == 3169
    await put(db, "q", b"m")
    assert await one(waiter, "SELECT queue_wait('q', 0)") == 1  # the connection lives on
    assert await messages(waiter) == [b"m"]


async def test_a_row_handed_to_a_vanished_client_comes_back(
    db: aiomysql.Connection,
    connect: Connect,
    q4m_server: Q4MServer,  # noqa: F811
) -> None:
    """Cancelling an aiomysql query closes its socket, but (as in MySQL) the
    server only notices when the wait returns: the row it got goes back."""
    gone = await connect()
    doomed = asyncio.create_task(one(gone, "SELECT queue_wait('q', 30)"))
    await q4m_server.wait_for_waiters(1)
    doomed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await doomed
    assert q4m_server.connections == 2  # still parked server-side
    await put(db, "q", b"m")
    live = await connect()
    assert await one(live, "SELECT queue_wait('q', 10)") == 1
    assert await messages(live) == [b"m"]
    assert q4m_server.connections == 2  # db and live: the vanished one was closed
    assert q4m_server.stats("q")["restored_by_close"] == 1
