"""The stats log's two backends: its own connection to the queue's database and
the dialect's upsert. `StatsLog` (statslog.py) holds one, chosen by `open_backend`.

`MySQLBackend` (innodb, and q4m: a MySQL server) runs on a `MySQLPool` of one
connection; `SQLiteBackend` on one aiosqlite connection to the queue's file, opened
by the queue's `open_sqlite` (WAL, like the queue: readers never block). Both turn
a missing table into a `SchemaError` that says to run `mvalve statslog create`.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import warnings
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any, Protocol, TypeVar

from ..errors import ConfigError, QueueError, SchemaError
from ..urls import QueueSettings

__all__ = ["Backend", "CountRow", "MySQLBackend", "SQLiteBackend", "open_backend"]

T = TypeVar("T")

# Rows per upsert statement: one statement per flush below this many counters.
MYSQL_ROWS = 5000
SQLITE_ROWS = 5000 if sqlite3.sqlite_version_info >= (3, 32, 0) else 249  # 4 params a row

CountRow = tuple[str, str, int, int]  # destination, action, minute, count


def open_backend(settings: QueueSettings, busy_timeout: float) -> Backend:
    """The backend for the settings' dialect (not connected yet: that is lazy)."""
    if settings.dialect in ("innodb", "q4m"):  # q4m: a MySQL server; the table is InnoDB
        return MySQLBackend(settings)
    if settings.dialect == "sqlite":
        return SQLiteBackend(settings, busy_timeout)
    raise ConfigError(
        f"the stats log needs a MySQL or SQLite database, not {settings.safe_url()} "
        "(for memory://, use mvalve_async.ops.metrics or an observer of your own)"
    )


class Backend(Protocol):
    dialect: str
    where: str
    max_rows: int

    async def connect(self) -> None: ...
    async def close(self) -> None: ...
    async def ddl(self, statements: Sequence[str]) -> None: ...
    async def upsert(self, table: str, rows: Sequence[CountRow]) -> None: ...
    async def fetch(self, sql: str, args: Sequence[Any]) -> list[tuple[Any, ...]]: ...
    async def execute(self, sql: str, args: Sequence[Any]) -> int: ...
    def quote(self, name: str) -> str: ...
    def placeholder(self) -> str: ...


class MySQLBackend:
    """Its own aiomysql pool of one connection (flushes are serialized anyway)."""

    dialect = "innodb"
    max_rows = MYSQL_ROWS

    def __init__(self, settings: QueueSettings) -> None:
        from ..queues.connections import MySQLPool

        self.db = MySQLPool(replace(settings, pool_size=1))
        self.where = settings.safe_url()

    async def connect(self) -> None:
        await self.db.connect()

    async def close(self) -> None:
        await self.db.close()

    def quote(self, name: str) -> str:
        return f"`{name}`"

    async def _run(self, fn: Callable[[Any], Awaitable[T]], *, idempotent: bool = True) -> T:
        try:
            return await self.db.run(fn, idempotent=idempotent)
        except SchemaError as exc:  # 1146: the pool's hint names the queue's tables
            raise SchemaError(
                f"{self.where}: the stats log table is missing (run `mvalve statslog create`)"
            ) from exc

    def placeholder(self) -> str:
        return "%s"

    async def ddl(self, statements: Sequence[str]) -> None:
        async def run(conn: Any) -> None:
            async with conn.cursor() as cur:
                with warnings.catch_warnings():  # "table already exists" notes
                    warnings.simplefilter("ignore")
                    for statement in statements:
                        await cur.execute(statement)

        await self._run(run)

    async def upsert(self, table: str, rows: Sequence[CountRow]) -> None:
        sql = (
            f"INSERT INTO `{table}` (`destination`, `action`, `minute`, `count`) VALUES "
            + ", ".join(["(%s, %s, %s, %s)"] * len(rows))
            + " ON DUPLICATE KEY UPDATE `count` = `count` + VALUES(`count`)"
        )
        args = [value for row in rows for value in row]

        async def run(conn: Any) -> None:
            async with conn.cursor() as cur:
                await cur.execute(sql, args)

        # Not idempotent: resent only when the request never reached the server.
        await self._run(run, idempotent=False)

    async def fetch(self, sql: str, args: Sequence[Any]) -> list[tuple[Any, ...]]:
        async def run(conn: Any) -> list[tuple[Any, ...]]:
            async with conn.cursor() as cur:
                await cur.execute(sql, tuple(args))
                return list(await cur.fetchall())

        return await self._run(run)

    async def execute(self, sql: str, args: Sequence[Any]) -> int:
        async def run(conn: Any) -> int:
            async with conn.cursor() as cur:
                return int(await cur.execute(sql, tuple(args) or None))

        return await self._run(run)


class SQLiteBackend:
    """Its own aiosqlite connection to the queue's file (WAL: readers never block).

    Opened by the queue's `open_sqlite`, but not a `SQLiteConnection`: that one's
    errors name the queue's tables, it refuses use after `close()` (this one
    reopens) and it serializes whole transactions, which one upsert does not need."""

    dialect = "sqlite"
    max_rows = SQLITE_ROWS

    def __init__(self, settings: QueueSettings, busy_timeout: float) -> None:
        self.settings = settings
        self.where = settings.safe_url()
        self.busy_timeout = busy_timeout
        self._db: Any = None
        self._lock = asyncio.Lock()

    async def connect(self) -> None:
        from ..queues.connections import open_sqlite

        async with self._lock:
            if self._db is not None:
                return
            db = await open_sqlite(self.settings, self.busy_timeout)
            try:
                # Fetched, so no statement stays open (DROP TABLE would be "locked").
                await db.execute_fetchall(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
                await db.execute_fetchall("PRAGMA journal_mode = WAL")
            except sqlite3.Error as exc:
                await db.close()
                raise self._translate(exc) from exc
            self._db = db

    async def close(self) -> None:
        async with self._lock:
            db, self._db = self._db, None
        if db is not None:
            with contextlib.suppress(sqlite3.Error, ValueError):
                await asyncio.shield(db.close())

    def quote(self, name: str) -> str:
        return f'"{name}"'

    def placeholder(self) -> str:
        return "?"

    def _translate(self, exc: sqlite3.Error) -> QueueError:
        if "no such table" in str(exc):
            return SchemaError(f"{self.where}: {exc} (run `mvalve statslog create`)")
        return QueueError(f"{self.where}: {exc}")

    async def _run(self, sql: str, args: Sequence[Any], fetch: bool = False) -> Any:
        """Rows (`fetch`) or the rowcount; the cursor is closed either way (an open
        statement would make DROP TABLE fail with "database table is locked")."""
        await self.connect()
        try:
            async with self._db.execute(sql, tuple(args)) as cursor:
                if fetch:
                    return [tuple(row) for row in await cursor.fetchall()]
                return int(cursor.rowcount)
        except sqlite3.Error as exc:
            raise self._translate(exc) from exc
        except ValueError as exc:  # aiosqlite: "Connection closed"
            raise QueueError(f"{self.where}: {exc}") from exc

    async def ddl(self, statements: Sequence[str]) -> None:
        for statement in statements:
            await self._run(statement, ())

    async def upsert(self, table: str, rows: Sequence[CountRow]) -> None:
        sql = (
            f"INSERT INTO {table} (destination, action, minute, count) VALUES "
            + ", ".join(["(?, ?, ?, ?)"] * len(rows))
            + " ON CONFLICT (destination, action, minute) "
            "DO UPDATE SET count = count + excluded.count"
        )
        await self._run(sql, [value for row in rows for value in row])

    async def fetch(self, sql: str, args: Sequence[Any]) -> list[tuple[Any, ...]]:
        rows: list[tuple[Any, ...]] = await self._run(sql, args, fetch=True)
        return rows

    async def execute(self, sql: str, args: Sequence[Any]) -> int:
        return int(await self._run(sql, args))
