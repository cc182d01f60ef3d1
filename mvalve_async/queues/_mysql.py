"""The aiomysql pool shared by a pipe's readers and writers, and error translation.

Every connection runs with autocommit on and READ COMMITTED isolation: a
REPEATABLE READ poller would read an old snapshot, and its empty SKIP LOCKED
polls would take gap locks that block writers' INSERTs. Transactions are
always ended with an explicit COMMIT/ROLLBACK; a connection whose state is
unknown (an error or a cancellation mid-statement) is closed, never returned
to the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import aiomysql
import pymysql
from pymysql.constants import CLIENT

from ..errors import QueueError, QueueUnavailable, SchemaError
from ..interfaces import Lane
from ..urls import QueueSettings, Tables
from ._common import DEAD_COLUMNS, dead_letter, table_names, tally

__all__ = [
    "MySQLPool",
    "count_dead",
    "drop_tables",
    "purge_lanes",
    "read_dead_letters",
    "translate",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

# Server/client error codes that mean "this connection is unusable".
_CONNECTION_LOST = {2003, 2006, 2013, 2055, 1927, 4031}
_NOT_SENT = {2006}  # the request never reached the server: safe to resend anything
# The server rolled the statement (lock wait timeout) or the whole transaction
# (deadlock) back, and the connection is closed after it: nothing of it stays, so
# anything can be resent. Concurrent SKIP LOCKED claims meet these now and then.
_ROLLED_BACK = {1205, 1213}
IDLE_KEEP = 30.0  # seconds a connection stays out of aiomysql's pool unused
_ACCESS = {1044, 1045, 1698}
_NO_TABLE = {1146}


def _code(exc: BaseException) -> int | None:
    args = getattr(exc, "args", ())
    return args[0] if args and isinstance(args[0], int) else None


def translate(exc: BaseException, where: str) -> QueueError:
    """Driver error -> library error. Never includes a password (drivers don't echo
    it, and `where` is a masked URL)."""
    code = _code(exc)
    if code in _ACCESS:
        return QueueUnavailable(f"access denied by {where} (check the user and password)")
    if code in _NO_TABLE:
        return SchemaError(f"{where}: {exc.args[1]} (run `mvalve create` first)")
    if code == 2003 and isinstance(exc.__cause__, ConnectionRefusedError):  # aiomysql's 2003
        hostport = where.partition("://")[2].partition("/")[0].rpartition("@")[2]
        return QueueUnavailable(f"cannot reach {where}: nothing listens on {hostport}")
    if code in _CONNECTION_LOST or isinstance(exc, OSError | asyncio.TimeoutError):
        return QueueUnavailable(f"cannot reach {where}: {type(exc).__name__} {code or ''}".strip())
    detail = exc.args[1] if len(getattr(exc, "args", ())) > 1 else exc
    return QueueError(f"{where}: {detail}")


def _lost(exc: BaseException) -> bool:
    return _code(exc) in _CONNECTION_LOST or isinstance(exc, OSError | asyncio.TimeoutError)


class MySQLPool:
    def __init__(self, settings: QueueSettings, *, multi_statements: bool = False) -> None:
        """`multi_statements`: allow `a; b` in one round trip (the innodb claim). Safe
        because every value is escaped client-side; never enabled for user SQL."""
        self.settings = settings
        self.multi_statements = multi_statements
        self.where = settings.safe_url()
        self._pool: Any = None
        self._lock = asyncio.Lock()
        # Connections between two uses stay checked out of aiomysql's pool, in a
        # stack: its acquire and release (a lock, a scan of the free list, a task
        # per release) cost more CPU than a one-row INSERT's whole round trip. One
        # goes back to it when a task waits there, or after IDLE_KEEP seconds idle
        # (for its checks of dead and old connections).
        self._idle: list[Any] = []
        self._waiting = 0

    async def connect(self) -> None:
        async with self._lock:
            if self._pool is not None:
                return
            s = self.settings
            try:
                self._pool = await aiomysql.create_pool(
                    host=s.host, port=s.port, user=s.user, password=s.password,
                    db=s.database, autocommit=True, minsize=0, maxsize=s.pool_size,
                    charset="utf8mb4", connect_timeout=s.connect_timeout,
                    init_command="SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED",
                    pool_recycle=3600,
                    client_flag=CLIENT.MULTI_STATEMENTS if self.multi_statements else 0,
                )  # fmt: skip
                async with self.connection() as conn:  # fail fast on bad credentials
                    await conn.ping(reconnect=False)
            except QueueError:
                await self.close()
                raise
            except (TimeoutError, pymysql.err.MySQLError, OSError) as exc:
                await self.close()
                raise translate(exc, self.where) from None

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            for conn in self._idle:
                pool.release(conn)
            self._idle.clear()
            pool.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pool.wait_closed(), 5)

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[Any]:
        """A pooled connection; closed instead of released if anything went wrong."""
        conn = await self._acquire()
        try:
            yield conn
        except BaseException:
            conn.close()
            raise
        finally:
            self._release(conn)

    async def _acquire(self) -> Any:
        if self._pool is None:
            await self.connect()
        while self._idle:  # the most recently used first: its socket is warm
            conn = self._idle.pop()
            if self._loop_time() - conn.last_usage < IDLE_KEEP and not (
                conn.closed or conn._reader.at_eof() or conn._reader.exception()
            ):
                return conn
            self._pool.release(conn)  # aiomysql drops or recycles it
        self._waiting += 1
        try:
            if self._pool.freesize:  # an idle connection: no wait, no timer needed
                return await self._pool.acquire()
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation.
            async with asyncio.timeout(self.settings.connect_timeout):
                return await self._pool.acquire()
        except (TimeoutError, pymysql.err.MySQLError, OSError) as exc:
            raise translate(exc, self.where) from None
        finally:
            self._waiting -= 1

    def _release(self, conn: Any) -> None:
        if self._pool is None:
            conn.close()
        elif conn.closed or self._waiting:  # someone waits in aiomysql's acquire
            self._pool.release(conn)
        else:
            self._idle.append(conn)

    @staticmethod
    def _loop_time() -> float:
        return asyncio.get_running_loop().time()

    async def run(
        self, fn: Callable[[Any], Awaitable[T]], *, idempotent: bool = True, attempts: int = 0
    ) -> T:
        """Run `fn(conn)`; on a lost connection retry with another one (all errors
        for idempotent work, only "not sent" errors otherwise); after a deadlock or
        a lock wait timeout (rolled back by the server) retry any work."""
        tries = attempts or self.settings.pool_size + 1
        for attempt in range(tries):
            try:
                conn = await self._acquire()
                try:
                    return await fn(conn)
                except BaseException:
                    conn.close()
                    raise
                finally:
                    self._release(conn)
            except (TimeoutError, pymysql.err.MySQLError, OSError) as exc:
                code = _code(exc)
                retry = code in _ROLLED_BACK or (_lost(exc) and (idempotent or code in _NOT_SENT))
                if not retry or attempt == tries - 1:
                    raise translate(exc, self.where) from None
                if code in _ROLLED_BACK:
                    log.info("%s on %s; retrying", exc.args[1], self.where)
                    await asyncio.sleep(random.uniform(0.0, 0.002))  # desynchronise the two
                    continue
                log.info("connection to %s lost (%s); retrying", self.where, code)
        raise AssertionError("unreachable")

    async def transaction(self, statements: Sequence[tuple[str, Any]]) -> list[int]:
        """The statements in one transaction and one round trip (START TRANSACTION;
        ...; COMMIT, values escaped client-side: a pool made with multi_statements);
        the rows each changed. Retried like `run`: the statements must be safe to
        repeat (e.g. guarded by lease tokens)."""
        if not self.multi_statements:
            raise RuntimeError("transaction() needs a pool made with multi_statements=True")
        if not statements:
            return []

        async def work(conn: Any) -> list[int]:
            async with conn.cursor() as cur:
                body = [cur.mogrify(sql, args) for sql, args in statements]
                await cur.execute("; ".join(["START TRANSACTION", *body, "COMMIT"]))
                counts = []
                while await cur.nextset():
                    counts.append(int(cur.rowcount))
            return counts[: len(statements)]

        return await self.run(work)

    async def execute(self, sql: str, args: Any = None, *, idempotent: bool = True) -> int:
        """One statement; the rows it changed."""

        async def run(conn: Any) -> int:
            async with conn.cursor() as cur:
                return int(await cur.execute(sql, args))

        return await self.run(run, idempotent=idempotent)

    async def fetch(self, sql: str, args: Any = None) -> list[tuple[Any, ...]]:
        async def run(conn: Any) -> list[tuple[Any, ...]]:
            async with conn.cursor() as cur:
                await cur.execute(sql, args)
                return list(await cur.fetchall())

        return await self.run(run)

    async def insert(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        """One INSERT per batch (executemany past one row); not resent once sent."""

        async def run(conn: Any) -> None:
            async with conn.cursor() as cur:
                if len(rows) == 1:
                    await cur.execute(sql, rows[0])
                else:
                    await cur.executemany(sql, rows)

        await self.run(run, idempotent=False)

    async def script(self, statements: Sequence[str]) -> None:
        """DDL, quiet about "table already exists" notes."""

        async def run(conn: Any) -> None:
            async with conn.cursor() as cur:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    for statement in statements:
                        await cur.execute(statement)

        await self.run(run)


# -- what innodb and q4m ask of their tables alike --------------------------------


async def drop_tables(db: MySQLPool, tables: Tables) -> None:
    names = table_names(tables)
    await db.execute("DROP TABLE IF EXISTS " + ", ".join(f"`{t}`" for t in names))


async def purge_lanes(
    db: MySQLPool, tables: Tables, lane: Lane | None, destination: str | None
) -> int:
    """Delete the queued rows of `lane` (every lane: None), of one destination or all."""
    total = 0
    for row_lane, table in tables.all():
        if lane is not None and row_lane is not lane:
            continue
        if destination is None:
            total += await db.execute(f"DELETE FROM `{table}`")
        else:
            total += await db.execute(
                f"DELETE FROM `{table}` WHERE destination = %s", (destination,)
            )
    return total


async def count_dead(db: MySQLPool, dead: str, by_dest: dict[str, dict[str, int]]) -> int:
    """Dead letters in all, and per destination into `by_dest` (key "dead")."""
    total = 0
    for dest, count in await db.fetch(
        f"SELECT destination, COUNT(*) FROM `{dead}` GROUP BY destination"
    ):
        total += int(count)
        tally(by_dest, dest, "dead", int(count))
    return total


async def read_dead_letters(
    db: MySQLPool, dead: str, limit: int, *, by_id: bool
) -> list[dict[str, Any]]:
    """The first `limit` dead letters; `by_id` where the engine can sort (Q4M cannot)."""
    order = "ORDER BY id " if by_id else ""
    rows = await db.fetch(f"SELECT {DEAD_COLUMNS} FROM `{dead}` {order}LIMIT %s", (int(limit),))
    return [dead_letter(row) for row in rows]
