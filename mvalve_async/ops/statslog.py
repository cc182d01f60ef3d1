"""The aggregated stats log (opt-in): what the Perl `q_statslog` Logger recorded,
without a row per event.

`StatsLog` is an `Observer`: readers and writers call its `event()` on the hot
path, where it only adds to an in-memory counter per (destination, action,
epoch minute). A background task started by `start()` writes the counters every
`flush_interval` seconds with one upsert statement (MySQL: `INSERT ... ON
DUPLICATE KEY UPDATE count = count + VALUES(count)`, SQLite: `INSERT ... ON
CONFLICT DO UPDATE`), so logging costs one small write per flush, not one per
message. Several processes may log to the same table: their counts add up.

    stats = StatsLog(url)
    await stats.create()                      # once, like `mvalve statslog create`
    async with stats, mvalve_async.open(url, observers=[stats]) as pipe:
        ...
    # leaving the block closed the pipe, then flushed the last counts

A flush that fails (server down, table missing) puts its counts back and the
next flush retries them (with a growing interval, up to a minute); at most
`max_keys` distinct counters are held, beyond which events are dropped, counted
in `dropped` and logged. Delivery never waits for the stats log. A flush whose
reply is lost after the server committed it is retried too, so a count can be
too high after a connection failure, never silently too low.

`mvalve statslog` shows the table (messages handed out per minute and destination).
The DDL is in `schema/statslog_<dialect>.sql`; the MySQL and SQLite backends (the
connection and the dialect's upsert) in `statslog_backends.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

from ..errors import ConfigError
from ..interfaces import Queue
from ..schema import sections
from ..urls import QueueSettings, parse_queue_url, validate_identifier
from .statslog_backends import Backend, CountRow, open_backend

__all__ = ["DEFAULT_TABLE", "StatsLog"]

log = logging.getLogger(__name__)

DEFAULT_TABLE = "q_statslog"
DESTINATION_WIDTH = 255  # the columns' widths (schema/statslog_innodb.sql)
ACTION_WIDTH = 32
MAX_BACKOFF = 60.0  # seconds between retries of a failing flush, at most
WARN_EVERY = 60.0  # seconds between two warnings of the same kind

Key = tuple[str, str, int]  # destination, action, epoch minute


def _settings(target: str | QueueSettings | Queue) -> QueueSettings:
    if isinstance(target, str):
        return parse_queue_url(target)
    if isinstance(target, QueueSettings):
        return target
    if not isinstance(target, Queue):
        raise ConfigError(f"cannot tell which database {target!r} uses: pass its URL")
    return target.settings


def _rows(counts: dict[Key, int]) -> list[CountRow]:
    """The counters as table rows: keys cut to the columns' widths (and merged
    again), sorted so that concurrent flushes lock rows in the same order."""
    out: dict[Key, int] = {}
    for (destination, action, minute), n in counts.items():
        if len(destination) > DESTINATION_WIDTH or len(action) > ACTION_WIDTH:
            destination, action = destination[:DESTINATION_WIDTH], action[:ACTION_WIDTH]
        key = (destination, action, minute)
        out[key] = out.get(key, 0) + n
    return [(*key, n) for key, n in sorted(out.items()) if n > 0]


class StatsLog:
    """Counts events per (destination, action, minute) and upserts them in batches.

    `target`: a queue URL (`mysql+innodb://`, `sqlite:///`), its `QueueSettings`,
    or a queue (`pipe.queue`): the stats log opens its own connection to that
    database. `clock` gives the wall time that picks an event's minute.
    """

    def __init__(
        self,
        target: str | QueueSettings | Queue,
        *,
        table: str = DEFAULT_TABLE,
        flush_interval: float = 5.0,
        max_keys: int = 100_000,
        busy_timeout: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        settings = _settings(target)
        self.table = validate_identifier(table)
        if not flush_interval > 0:
            raise ConfigError("flush_interval must be a positive number of seconds")
        if max_keys < 1:
            raise ConfigError("max_keys must be positive")
        self.flush_interval = float(flush_interval)
        self.max_keys = int(max_keys)
        self._clock = clock
        self._backend: Backend = open_backend(settings, busy_timeout)
        self.where = settings.safe_url()
        self._pending: dict[Key, int] = {}
        self._inflight = 0  # events of the flush in progress
        self._lock = asyncio.Lock()  # one flush at a time
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._started = False
        self._told_unstarted = False
        self._failing = False
        self._warned: dict[str, float] = {}
        # Counters, for tests and monitoring.
        self.flushes = 0  # flushes that wrote counts
        self.statements = 0  # upsert statements that succeeded
        self.failures = 0  # flushes that failed (their counts were kept)
        self.written = 0  # events written
        self.dropped = 0  # events dropped because max_keys counters were held

    def __repr__(self) -> str:
        return f"StatsLog({self.where!r}, table={self.table!r})"

    @property
    def dialect(self) -> str:
        return self._backend.dialect

    @property
    def pending(self) -> int:
        """Events counted and not yet written (a flush in progress included)."""
        return sum(self._pending.values()) + self._inflight

    # -- the hot path ---------------------------------------------------------

    def event(self, action: str, destination: str, count: int = 1) -> None:
        key = (destination, action, int(self._clock() // 60))
        pending = self._pending
        if key in pending:
            pending[key] += count
        elif len(pending) < self.max_keys:
            pending[key] = count
            if not self._started and not self._told_unstarted:
                self._told_unstarted = True
                log.warning("%r counts events but was not started: `await stats.start()` "
                            "(or `async with stats`) writes them", self)  # fmt: skip
        else:
            self._drop(count)

    def _drop(self, count: int) -> None:
        self.dropped += count
        self._warn(
            "full",
            "stats log %s holds %d counters (max_keys) that could not be written yet: "
            "dropping events (%d so far)",
            self.table, len(self._pending), self.dropped,
        )  # fmt: skip

    def _warn(self, kind: str, fmt: str, *args: object) -> None:
        now = time.monotonic()
        last = self._warned.get(kind)
        if last is None or now - last >= WARN_EVERY:
            self._warned[kind] = now
            log.warning(fmt, *args)

    # -- schema ---------------------------------------------------------------

    def schema_statements(self) -> list[str]:
        template = sections(f"statslog_{self.dialect}")["statslog"]
        return [s.strip() for s in template.format(table=self.table).split(";") if s.strip()]

    def schema_sql(self) -> str:
        return ";\n\n".join(self.schema_statements()) + ";\n"

    async def create(self) -> None:
        """Create the table (if missing). Needs DDL rights."""
        await self._backend.ddl(self.schema_statements())

    async def drop(self) -> None:
        await self._backend.ddl([f"DROP TABLE IF EXISTS {self._backend.quote(self.table)}"])

    # -- flushing -------------------------------------------------------------

    async def flush(self) -> int:
        """Write the counts now, one upsert statement per `max_rows` counters (one
        per flush in practice); returns how many rows were written. On failure
        the counts not written are kept for the next flush, and the error raised."""
        async with self._lock:
            if not self._pending:
                return 0
            batch, self._pending = self._pending, {}
            rows = _rows(batch)
            if not rows:
                return 0
            self._inflight = sum(row[3] for row in rows)
            done = 0
            try:
                step = self._backend.max_rows
                for start in range(0, len(rows), step):
                    part = rows[start : start + step]
                    await self._backend.upsert(self.table, part)
                    self.statements += 1
                    done = start + len(part)
                    n = sum(row[3] for row in part)
                    self._inflight -= n
                    self.written += n
            except BaseException as exc:
                self._inflight = 0
                self._restore(rows[done:])
                self.failures += 1
                if isinstance(exc, Exception):
                    self._failed(exc)
                raise
            self.flushes += 1
            if self._failing:
                self._failing = False
                log.info("stats log %s: flushing again (%d rows written)", self.table, len(rows))
            return len(rows)

    def _restore(self, rows: Sequence[CountRow]) -> None:
        pending = self._pending
        for destination, action, minute, n in rows:
            key = (destination, action, minute)
            if key in pending:
                pending[key] += n
            elif len(pending) < self.max_keys:
                pending[key] = n
            else:
                self._drop(n)

    def _failed(self, exc: Exception) -> None:
        text = " ".join(str(exc).split()) or type(exc).__name__
        if not self._failing:
            self._failing = True
            self._warned.pop("flush", None)  # a new streak: say it at once
        self._warn(
            "flush",
            "stats log %s: flush failed (%s); keeping %d events for the next flush",
            self.table, text, self.pending,
        )  # fmt: skip

    async def _loop(self) -> None:
        delay = self.flush_interval
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stop.wait()
            if self._stop.is_set():
                return
            try:
                await self.flush()
                delay = self.flush_interval
            except Exception:  # kept and logged by flush(); try again later
                delay = min(delay * 2, max(MAX_BACKOFF, self.flush_interval))

    # -- life cycle -----------------------------------------------------------

    async def start(self) -> StatsLog:
        """Start the background flush loop (idempotent). Connects lazily: a database
        that is down delays the counts, never the caller."""
        if self._task is None or self._task.done():
            self._stop = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(
                self._loop(), name=f"mvalve-statslog-{self.table}"
            )
        self._started = True
        return self

    async def close(self) -> None:
        """Stop the loop, flush what is left (a failure is logged: its counts stay in
        `pending`) and close the connection."""
        task, self._task = self._task, None
        self._started = False
        if task is not None:
            self._stop.set()
            with contextlib.suppress(Exception):
                await asyncio.shield(task)
        try:
            await self.flush()
        except Exception as exc:
            log.warning(
                "stats log %s: final flush failed (%s); %d events not written",
                self.table, " ".join(str(exc).split()), self.pending,
            )  # fmt: skip
        finally:
            await self._backend.close()

    async def __aenter__(self) -> StatsLog:
        return await self.start()

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- reading --------------------------------------------------------------

    async def read(
        self,
        *,
        since: int | None = None,
        action: str | None = None,
        destination: str | None = None,
    ) -> list[CountRow]:
        """(destination, action, minute, count) rows from the table (summed over
        processes already), from epoch minute `since` on, ordered by destination,
        action, minute."""
        q, p = self._backend.quote, self._backend.placeholder()
        where: list[str] = []
        args: list[Any] = []
        for column, value in (("minute", since), ("action", action),
                              ("destination", destination)):  # fmt: skip
            if value is not None:
                where.append(f"{q(column)} {'>=' if column == 'minute' else '='} {p}")
                args.append(value)
        sql = (
            f"SELECT {q('destination')}, {q('action')}, {q('minute')}, {q('count')} "
            f"FROM {q(self.table)}"
            + (f" WHERE {' AND '.join(where)}" if where else "")
            + f" ORDER BY {q('destination')}, {q('action')}, {q('minute')}"
        )
        rows = await self._backend.fetch(sql, args)
        return [(str(d), str(a), int(m), int(n)) for d, a, m, n in rows]

    async def prune(self, before: int) -> int:
        """Delete the rows of minutes before epoch minute `before`; returns how many."""
        q, p = self._backend.quote, self._backend.placeholder()
        return await self._backend.execute(
            f"DELETE FROM {q(self.table)} WHERE {q('minute')} < {p}", [int(before)]
        )
