"""The sqlite dialect's connection: one aiosqlite connection per queue.

The file is opened in WAL mode (readers never block the writer), with a busy
timeout and `synchronous=NORMAL`. One connection means one worker thread, and
every statement on it would join an open transaction, so an asyncio.Lock keeps
each operation's statements together (`session`, `tx`). Statements queued on
the worker thread run even when the awaiting task is cancelled; a transaction
interrupted by a cancellation is rolled back at once, and again (harmlessly)
before the connection's next use. sqlite errors become library errors.

`open_sqlite` (the file opened, its directory made, a daemon worker thread) is
shared with the stats log's SQLite backend, which keeps its own PRAGMAs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import threading
import urllib.parse
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiosqlite

from ..errors import QueueError, QueueUnavailable, SchemaError
from ..urls import QueueSettings

__all__ = ["SQLiteConnection", "open_sqlite"]

log = logging.getLogger("mvalve_async.queues.sqlite")  # the dialect's logger

_SCHEMA_ERRORS = ("no such table", "no such column", "has no column named", "columns but")


def _make_parent(path: str) -> None:
    if path != ":memory:" and not path.startswith("file:"):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)


def _existing(settings: QueueSettings) -> str:
    """A URI that opens the settings' file read-write and never creates it."""
    path = os.path.abspath(settings.path)
    if not os.path.isfile(path):
        raise SchemaError(
            f"{settings.safe_url()}: the queue does not exist (no file {path}; "
            "`mvalve create` makes it)"
        )
    return f"file:{urllib.parse.quote(path)}?mode=rw"


async def open_sqlite(settings: QueueSettings, busy_timeout: float) -> aiosqlite.Connection:
    """An aiosqlite connection to the settings' file (its directory made if missing),
    in autocommit mode; no PRAGMA run yet. Failing to open is QueueUnavailable.
    With `settings.create_file` false an existing file only (opened read-write, never
    created): a missing one is SchemaError."""
    path = settings.path
    uri = not settings.create_file and path != ":memory:"
    target = _existing(settings) if uri else path
    try:
        if not uri:
            _make_parent(path)
        pending = aiosqlite.connect(target, isolation_level=None, timeout=busy_timeout, uri=uri)
        # aiosqlite's worker thread is not a daemon: a process that never closes the
        # connection (an unhandled error) would hang at exit. Dying is safe: as kill -9.
        thread = getattr(pending, "_thread", None)
        if isinstance(thread, threading.Thread) and not thread.is_alive():
            thread.daemon = True
        return await pending
    except (OSError, sqlite3.Error) as exc:
        raise QueueUnavailable(f"cannot open {settings.safe_url()}: {exc}") from exc


class SQLiteConnection:
    def __init__(self, settings: QueueSettings, busy_timeout: float) -> None:
        self.settings = settings
        self.busy_timeout = busy_timeout
        self.db: aiosqlite.Connection | None = None
        self.dirty = False  # a transaction may be open: roll back before the next use
        self._lock = asyncio.Lock()  # one operation's statements at a time
        self._open_lock = asyncio.Lock()
        self._closed = False

    async def connect(self) -> None:
        async with self._open_lock:
            if self.db is not None:
                return
            path = self.settings.path
            db = await open_sqlite(self.settings, self.busy_timeout)
            try:
                await db.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
                (mode,) = next(iter(await db.execute_fetchall("PRAGMA journal_mode = WAL")))
                await db.execute("PRAGMA synchronous = NORMAL")
            except sqlite3.Error as exc:
                await db.close()
                raise self._translate(exc) from exc
            if str(mode).lower() != "wal" and path != ":memory:":
                log.warning("%s: journal_mode is %s, not wal", self.settings.safe_url(), mode)
            self.db, self._closed, self.dirty = db, False, False

    async def close(self) -> None:
        self._closed = True
        if self.db is not None:
            await asyncio.shield(self._close())

    async def _close(self) -> None:
        async with self._lock:  # let the operation in progress finish
            db, self.db = self.db, None
            if db is not None:
                with contextlib.suppress(sqlite3.Error, ValueError):
                    await db.close()  # rolls back an open transaction

    def _translate(self, exc: sqlite3.Error) -> QueueError:
        text, where = str(exc), self.settings.safe_url()
        if any(hint in text for hint in _SCHEMA_ERRORS):
            return SchemaError(
                f"{where}: {text}: the queue tables are missing or malformed; run "
                "`mvalve create` (or open the pipe with create=True)"
            )
        if "locked" in text or "busy" in text:
            return QueueError(f"{where}: {text} (busy_timeout is {self.busy_timeout} s)")
        return QueueError(f"{where}: {text}")

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[aiosqlite.Connection]:
        """The connection, for this task alone; sqlite errors become QueueError."""
        async with self._lock:
            try:
                if self.db is None:
                    if self._closed:
                        raise QueueError(f"{self.settings.safe_url()}: the queue is closed")
                    await self.connect()
                assert self.db is not None
                if self.dirty:
                    await self._rollback(self.db)
                yield self.db
            except sqlite3.Error as exc:
                raise self._translate(exc) from exc
            except ValueError as exc:  # aiosqlite: "Connection closed"
                if "onnection" not in str(exc):
                    raise
                raise QueueError(f"{self.settings.safe_url()}: {exc}") from exc

    @contextlib.asynccontextmanager
    async def tx(self) -> AsyncIterator[aiosqlite.Connection]:
        """A BEGIN IMMEDIATE transaction, committed if the body succeeds."""
        async with self.session() as db:
            self.dirty = True
            try:
                await db.execute("BEGIN IMMEDIATE")
                yield db
                await db.execute("COMMIT")
            except BaseException:
                # Queued on the worker thread at once, after whatever the body left
                # there, so it runs even if this task is cancelled again meanwhile.
                await self._rollback(db)
                raise
            self.dirty = False

    async def _rollback(self, db: aiosqlite.Connection) -> None:
        """Never raises: it runs in cleanups, where it must not mask the first error."""
        try:
            await db.execute("ROLLBACK")
        except (sqlite3.Error, ValueError) as exc:
            if "no transaction" not in str(exc):
                log.warning("%s: ROLLBACK failed: %s", self.settings.safe_url(), exc)
                return  # still dirty: tried again before the next use
        self.dirty = False

    async def run(self, statements: list[tuple[str, Sequence[Any]]]) -> int:
        """Run statements (one: autocommit; more: one transaction); rows changed."""
        if not statements:
            return 0
        if len(statements) == 1:
            async with self.session() as db:
                return (await db.execute(*statements[0])).rowcount
        async with self.tx() as db:
            return sum([(await db.execute(sql, args)).rowcount for sql, args in statements])

    async def fetch(self, sql: str, args: Any = ()) -> list[Any]:
        async with self.session() as db:
            return list(await db.execute_fetchall(sql, args))
