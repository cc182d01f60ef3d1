"""The q4m dialect: Q4M's `ENGINE=QUEUE` tables, rows owned by connections.

Q4M hands out a row by putting the connection that called `queue_wait` into
*owner mode*: the row is invisible to everybody else until that connection
calls `queue_end()` (the row is deleted), `queue_abort()` (it goes back to its
FIFO place) or goes away (it goes back too). One connection owns one row, so:

- A lease is a dedicated *owner connection*, taken from a small set that is
  separate from the shared pool (`owners`, default `pool_size`): `Lease.handle`
  is that owner, `Lease.token` its server connection id (what `KILL` takes).
  An owner never goes back to the idle set while it owns a row, and the shared
  pool never sees an owner.
- `claim(limit)` calls, per row, on one idle owner
  `SELECT queue_wait('emerg:ready<=NOW', 'timed:ready<=NOW', 'normal:ready<=NOW', 0)`
  (the last argument is always the timeout; 0: claims never block) and reads
  the owned row with a plain SELECT on that connection; it stops at the first
  0. **`limit` is capped by the number of idle owners**: a claim returns at most
  `owners` rows in all. When every owner is busy a claim returns [] at once
  (or, with `owner_wait > 0`, waits that long for one, handed over first come,
  first served), and `poll` says nothing is claimable, without a query. A
  reader's acks held back for batching keep their owners busy too: the reader
  flushes them when its claim comes back empty.
- `ack` is `queue_end()`; `release(delay=0)` is `queue_abort()` (the row keeps
  its place). Q4M has no UPDATE, so `release(delay>0)`, `move` and `dead`
  INSERT the new row *on the owner connection* and then call `queue_end()`:
  if that connection was lost meanwhile the INSERT fails and the row has gone
  back by itself, so a lost lease is never copied. (A connection lost between
  the INSERT and `queue_end()` leaves both rows: at least once.)
- Lanes are tried in `queue_wait`'s argument order: emergency, timed rows that
  are due, normal. Every table has a `ready` column (0 in the emergency and
  normal lanes unless the row was put back with a delay), so a retry with a
  delay stays in its lane. Q4M has no ORDER BY: the timed lane is served FIFO
  among its *due* rows, and each claimed batch is sorted by `ready`.
- Leases expire **in this process**: `claim` and `poll` abort this process's
  leases older than their `lease_seconds` (a reader dropped them, or its
  consumer overran the lease), and a late settle of such a lease does nothing.
  A lease held by another process ends only with its connection (a crashed or
  killed process returns its rows at once; a live but stuck one keeps them).
- Delivery counts: Q4M keeps none, so `deliveries` is a column carried across
  re-inserts (a retry with a delay, a retry deferral), and this process also
  remembers the count of the rows it handed out until they are settled (a
  bounded memo), so a row it aborts, or that comes back after one of its
  connections was killed, is counted again when it is claimed here. A row that
  comes back because *another* process crashed or aborted it keeps the count of
  its column: on q4m a crashed consumer's redelivery is not counted.
- `shift`/`reschedule` (a pause or hold, an older message taking an earlier
  slot) and `requeue_dead` take the rows they change one by one in owner mode,
  by id (`queue_wait('table:id=N', 0)`), on a dedicated connection, re-insert
  them and `queue_end()` them.
- `poll`, `stats`, `peek`, `purge` and the dead-letter calls run on the shared
  pool, never on an owner (after a `queue_wait` an owner's SELECTs see nothing
  but its own row). Rows owned by other processes are invisible there: `stats`
  and `peek` show this process's leases only, `purge` removes queued rows and
  this process's leases.
- Cancelling any call on an owner closes that connection: whatever row it
  owned goes back to the queue (Q4M's restored_by_close), nothing is stranded.

Beside this module: `_q4m_owners` (the owner connections), `_q4m_rows` (row ids,
statement text, rewriting rows by id) and `_q4m_look` (poll, stats, peek).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ..errors import SchemaError
from ..interfaces import Lane, Lease, QueueStats, Row
from ..schema import render
from ..urls import QueueSettings
from . import _q4m_look, _q4m_rows
from ._common import US, schema_sql, to_us
from ._mysql import MySQLPool, _lost, drop_tables, purge_lanes, read_dead_letters, translate
from ._q4m_owners import DRIVER_ERRORS, Owner, Owners
from ._q4m_rows import Ids, Q4MSql, Statement

__all__ = ["Q4MQueue"]

log = logging.getLogger(__name__)

_RANK = {Lane.EMERGENCY: 0, Lane.TIMED: 1, Lane.NORMAL: 2}


def _always(value: int) -> Callable[[int], int]:
    return lambda _: value


class Q4MQueue:
    name = "q4m"
    dialect = "q4m"
    # Leases expire only in the process that holds them (see the module docstring).
    lease_expiry = "process"
    leases_hold_connections = True  # owner mode: readers settle before claiming more

    def __init__(
        self,
        settings: QueueSettings,
        *,
        owners: int | None = None,
        owner_wait: float = 0.0,
        memo: int = 10_000,
    ) -> None:
        self.settings = settings
        self.tables = settings.tables
        self.db = MySQLPool(settings)
        self._owners = Owners(settings, owners or settings.pool_size, owner_wait)
        self._sql = Q4MSql(self.tables)
        self._memo_size = memo
        self._ids = Ids()
        self._seen: collections.OrderedDict[int, int] = collections.OrderedDict()

    def __repr__(self) -> str:
        return f"Q4MQueue({self.settings.safe_url()!r})"

    @property
    def max_owners(self) -> int:
        return self._owners.max_owners

    @max_owners.setter
    def max_owners(self, value: int) -> None:
        self._owners.max_owners = value

    @property
    def owner_wait(self) -> float:
        return self._owners.owner_wait

    @owner_wait.setter
    def owner_wait(self, value: float) -> None:
        self._owners.owner_wait = value

    # -- connections ------------------------------------------------------------

    async def connect(self) -> None:
        await self.db.connect()

    async def close(self) -> None:
        """Close every owner connection (Q4M returns their rows), then the pool."""
        self._owners.close()
        await self.db.close()

    # -- the delivery-count memo ----------------------------------------------------

    def _remember(self, rid: int, deliveries: int) -> None:
        self._seen[rid] = deliveries
        self._seen.move_to_end(rid)
        while len(self._seen) > self._memo_size:
            self._seen.popitem(last=False)

    def _forget(self, rid: int) -> None:
        self._seen.pop(rid, None)

    # -- schema -----------------------------------------------------------------

    def schema_sql(self) -> str:
        return schema_sql(self.dialect, self.tables)

    async def create_schema(self) -> None:
        await self.db.script(render(self.dialect, self.tables))

    async def drop_schema(self) -> None:
        await drop_tables(self.db, self.tables)

    # -- writing ------------------------------------------------------------------

    async def insert(self, lane: Lane, rows: Sequence[Row]) -> None:
        if not rows:
            return
        table = random.choice(self.tables.lane(lane))
        base = to_us(time.time())  # + i: a batch's rows keep distinct, ordered `created`
        args: list[tuple[Any, ...]] = []
        for i, r in enumerate(rows):
            if lane is Lane.TIMED and r.ready is None:
                raise ValueError("a timed row needs ready")
            ready = to_us(r.ready) if lane is Lane.TIMED and r.ready is not None else 0
            args.append(
                self._sql.insert_args(
                    table, self._ids(), r.destination, ready, r.reserved, r.blob, base + i, 0
                )
            )
        await self.db.insert(self._sql.insert_sql(table), args)

    # -- claiming -----------------------------------------------------------------

    async def claim(self, limit: int, now: float, lease_seconds: float) -> list[Lease]:
        """Up to `limit` rows, capped by the idle owner connections (see the module
        docstring). Emergency first, then due timed rows (by ready), then normal."""
        await self._owners.reap(now)
        sql, args, targets = self._sql.wait_call(to_us(now))
        leases: list[Lease] = []
        retries = self.max_owners + 1  # idle owners may all be dead (server restart)
        try:
            while len(leases) < limit:
                owner = await self._owners.take(wait=not leases)
                if owner is None:
                    break
                try:
                    lease = await self._claim_one(owner, sql, args, targets, now, lease_seconds)
                except DRIVER_ERRORS as exc:
                    self._owners.discard(owner)
                    if _lost(exc) and not leases and retries > 0:
                        retries -= 1
                        continue
                    if _lost(exc) and leases:
                        log.info("lost an owner connection to %s mid-claim", self.db.where)
                        break
                    raise translate(exc, self.db.where) from None
                except BaseException:
                    self._owners.discard(owner)
                    raise
                if lease is None:
                    self._owners.free(owner)
                    break
                leases.append(lease)
        except BaseException:
            for lease in leases:  # never handed out: close their owners, the rows go back
                self._owners.discard(lease.handle)
            raise
        leases.sort(key=lambda x: (_RANK[x.lane], x.ready or 0.0))  # stable: FIFO otherwise
        return leases

    async def _claim_one(
        self, owner: Owner, sql: str, args: list[str], targets: list[tuple[Lane, str]],
        now: float, lease_seconds: float,
    ) -> Lease | None:  # fmt: skip
        async with owner.conn.cursor() as cur:
            await cur.execute(sql, args)
            (index,) = await cur.fetchone()
            if index is None:
                raise SchemaError(
                    f"{self.db.where}: queue_wait returned NULL: a queue table is missing "
                    "or is not a Q4M table (run `mvalve create` first)"
                )
            if not index:
                return None
            lane, table = targets[int(index) - 1]
            await cur.execute(self._sql.select(table))
            row = await cur.fetchone()
            if row is None:  # the table was truncated or dropped under us
                await cur.execute("SELECT queue_end()")
                await cur.fetchall()
                return None
        rid, dest, blob, done, created, ready = int(row[0]), row[1], row[2], row[3], row[4], row[5]
        deliveries = max(int(done), self._seen.get(rid, 0)) + 1
        self._remember(rid, deliveries)
        timed = lane is Lane.TIMED
        lease = Lease(
            lane, table, rid, dest, bytes(blob), deliveries,
            int(ready) / US if timed else None, bool(row[6]) if timed else False,
            owner.thread_id, owner, int(created),
        )  # fmt: skip
        owner.lease, owner.until, owner.created = lease, now + lease_seconds, int(created)
        return lease

    # -- settling -----------------------------------------------------------------

    async def _settle_all(
        self, leases: Sequence[Lease], make: Callable[[Lease], Iterable[Statement]]
    ) -> None:
        """Settle leases concurrently (each has its own connection); `make(lease)`
        gives the statements to run first. Settled rows leave the memo."""
        if not leases:
            return
        results = await asyncio.gather(
            *(self._owners.settle(lease, make(lease), "queue_end") for lease in leases),
            return_exceptions=True,
        )
        for lease, result in zip(leases, results, strict=True):
            if result is True:
                self._forget(lease.id)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    def _reinsert(
        self, lease: Lease, table: str, ready: int, reserved: bool, deliveries: int
    ) -> Statement:
        created = lease.handle.created if isinstance(lease.handle, Owner) else 0
        return self._sql.insert(
            table, lease.id, lease.destination, ready, reserved, lease.blob, created, deliveries
        )

    async def ack(self, leases: Sequence[Lease]) -> None:
        await self._settle_all(leases, lambda lease: ())

    async def release(self, lease: Lease, delay: float = 0.0) -> None:
        """delay 0: queue_abort (the row keeps its FIFO place and is counted again
        when this process claims it). delay > 0: re-inserted into its own table,
        invisible until then, keeping its deliveries."""
        if delay <= 0:
            await self._owners.settle(lease, (), "queue_abort")
            return
        ready = to_us(time.time() + delay)
        stmt = self._reinsert(lease, lease.table, ready, lease.reserved, lease.deliveries)
        await self._settle_all([lease], lambda _: (stmt,))

    async def move(self, lease: Lease, ready: float, reserved: bool) -> None:
        deliveries = 0 if reserved else lease.deliveries
        table = lease.table if lease.lane is Lane.TIMED else random.choice(self.tables.timed)
        stmt = self._reinsert(lease, table, to_us(ready), reserved, deliveries)
        await self._settle_all([lease], lambda _: (stmt,))

    async def shift(self, destination: str, after: float, delta: float) -> int:
        """Reserved timed rows of `destination` due after `after` go `delta` later."""
        after_us, delta_us = to_us(after), to_us(delta)
        where = "destination = %s AND reserved = 1 AND ready > %s"
        return await self._retime(
            [(where, (destination, after_us), lambda ready: ready + delta_us)]
        )

    async def reschedule(self, destination: str, moves: Sequence[tuple[int, float, float]]) -> int:
        """Reserved timed rows found by (destination, created) get a new ready."""
        where = "destination = %s AND reserved = 1 AND created = %s"
        return await self._retime(
            [
                (where, (destination, int(created)), _always(to_us(new)))
                for created, _old, new in moves
            ]
        )

    async def _retime(
        self, finds: Sequence[tuple[str, tuple[Any, ...], Callable[[int], int]]]
    ) -> int:
        """Q4M has no UPDATE: the rows each `WHERE` finds are listed first (plain
        SELECTs), then each is taken in owner mode on a dedicated connection with
        `queue_wait('timed:id=N and ready=R', 0)`, re-inserted with its new ready
        (same id, created and deliveries; in new-ready order) and `queue_end()`ed.
        Rows a reader owns at that moment are skipped: its valve still applies the
        pause or hold to them when it handles them."""
        async with self._owners.dedicated() as cur:
            return await _q4m_rows.retime(cur, self._sql, finds)

    async def dead(self, leases: Sequence[Lease], reason: str) -> None:
        died = to_us(time.time())
        sql = self._sql.insert_dead()

        def make(lease: Lease) -> tuple[Statement]:
            args = (self._ids(), str(lease.lane), lease.destination, lease.blob, reason[:255],
                    lease.deliveries, died)  # fmt: skip
            return ((sql, args),)

        await self._settle_all(leases, make)

    # -- looking ------------------------------------------------------------------

    async def poll(self, now: float) -> tuple[bool, float | None]:
        """Plain SELECTs on a pool connection (owned rows are invisible there); first
        returns this process's expired leases to the queue. While every owner
        connection holds a row nothing is claimable by this process: (False, None)
        without a query, so a reader waits `idle_interval` instead of spinning."""
        await self._owners.reap(now)
        if self._owners.exhausted:
            return False, None
        return await _q4m_look.scan(self.db, self.tables, now)

    async def stats(self, now: float) -> QueueStats:
        """Queued rows as the server shows them; `leased`: this process's leases
        (Q4M hides the rows other connections own)."""
        return await _q4m_look.stats(self.db, self.tables, self._owners, now)

    async def peek(self, limit: int = 20, lane: Lane | None = None) -> list[dict[str, Any]]:
        """Plain SELECTs on a pool connection: nothing is claimed. Rows owned by this
        process are shown with their (process-local) lease end; rows owned by other
        processes are invisible. Emergency and normal: FIFO (tables merged by id);
        timed: by (ready, id)."""
        return await _q4m_look.peek(self.db, self.tables, self._owners, limit, lane)

    # -- dead letters and purges ------------------------------------------------------

    async def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        return await read_dead_letters(self.db, self.tables.dead, limit, by_id=False)

    async def requeue_dead(self, ids: Sequence[int] | None = None) -> int:
        """Dead letters back to their lane, each taken in owner mode on a dedicated
        connection (`queue_wait('dead:id=N', 0)`), re-inserted, then `queue_end()`:
        two concurrent requeues never both copy a row (a lost connection between
        the INSERT and queue_end can: at least once)."""
        async with self._owners.dedicated() as cur:
            return await _q4m_rows.requeue_dead(cur, self._sql, ids, self._ids, self.db.where)

    async def purge(self, lane: Lane | None = None, destination: str | None = None) -> int:
        """Delete queued rows, and end this process's leases on matching rows (rows
        owned by other processes cannot be reached)."""
        total = await purge_lanes(self.db, self.tables, lane, destination)
        for lease, _ in self._owners.leases():
            if (lane is None or lease.lane is lane) and destination in (None, lease.destination):
                if await self._owners.settle(lease, (), "queue_end"):
                    self._forget(lease.id)
                    total += 1
        return total

    async def purge_dead(self) -> int:
        return await self.db.execute(f"DELETE FROM `{self.tables.dead}`")
