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
- `claim(wants)` calls, per row, on one idle owner `SELECT queue_wait(...)`
  with the last argument, the timeout, always 0 (claims never block), and reads
  the owned row with a plain SELECT on that connection: for the emergency lane
  `queue_wait('emerg:ready<=NOW', 0)`; for each wanted destination
  `queue_wait('timed:dkey=K and ready<=NOW', 'normal:dkey=K and ready<=NOW', 0)`
  (`dkey`: the destination's integer key, `_q4m_rows.dkey`), so it takes that
  destination's oldest rows and nothing else, and leaves every other row where it
  is. A want stops at its first miss. **Rows per claim are capped by the idle
  owners**: when every owner is busy a claim returns [] at once (or, with
  `owner_wait > 0`, waits that long for one, first come, first served), and
  names the wants it did not finish `cut` (`Claimed`): they may have more rows,
  and readers keep them in line instead of waiting for a scan to find them. A
  reader's acks are sent at once (`QueueTraits.leases_hold_connections`).
- `ack` is `queue_end()`; `release(delay=0)` and `give_back` are `queue_abort()`
  (the row keeps its place). Q4M has no UPDATE, so `release(delay>0)` and `dead`
  INSERT the new row *on the owner connection* and then call `queue_end()`:
  if that connection was lost meanwhile the INSERT fails and the row has gone
  back by itself, so a lost lease is never copied. (A connection lost between
  the INSERT and `queue_end()` leaves both rows: at least once.)
- Scans read every row nobody owns (Q4M has no index), grouped by destination:
  their cost grows with the backlog, and readers space them accordingly.
- Lanes are tried in `queue_wait`'s argument order: emergency, timed rows that
  are due, normal. Every table has a `ready` column (0 in the emergency and
  normal lanes unless the row was put back with a delay), so a retry with a
  delay stays in its lane. Q4M has no ORDER BY: the timed lane is served FIFO
  among its *due* rows, and each claimed batch is sorted by `ready`.
- Leases expire **in this process**: `claim` aborts this process's
  leases older than their `lease_seconds` (a reader dropped them, or its
  consumer overran the lease), and a late settle of such a lease does nothing.
  A lease held by another process ends only with its connection (a crashed or
  killed process returns its rows at once; a live but stuck one keeps them).
- Delivery counts: Q4M keeps none, so `deliveries` is a column carried across
  re-inserts (a retry with a delay), and this process also
  remembers the count of the rows it handed out until they are settled (a
  bounded memo), so a row it aborts, or that comes back after one of its
  connections was killed, is counted again when it is claimed here. A row that
  comes back because *another* process crashed or aborted it keeps the count of
  its column: on q4m a crashed consumer's redelivery is not counted.
- `requeue_dead` (and `rekey`, for rows written before `dkey` existed) take the
  rows they change one by one in owner mode on a dedicated connection, re-insert
  them and `queue_end()` them.
- `scan`, `stats`, `peek`, `purge` and the dead-letter calls run on the shared
  pool, never on an owner (after a `queue_wait` an owner's SELECTs see nothing
  but its own row). Rows owned by other processes are invisible there: `stats`
  and `peek` show this process's leases only, `purge` removes queued rows and
  this process's leases.
- Cancelling any call on an owner closes that connection: whatever row it
  owned goes back to the queue (Q4M's restored_by_close), nothing is stranded.

Beside this module: `_q4m_owners` (the owner connections), `_q4m_rows` (row ids,
statement text, rewriting rows) and `_q4m_look` (scan, stats, peek).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ..clock import ServerClock
from ..errors import SchemaError
from ..interfaces import Claimed, Lane, Lease, QueueStats, QueueTraits, Row, Scan, Want
from ..schema import render
from ..urls import QueueSettings
from . import _q4m_look, _q4m_rows
from ._common import US, schema_sql, to_us
from ._mysql import MySQLPool, _lost, drop_tables, purge_lanes, read_dead_letters, translate
from ._q4m_owners import DRIVER_ERRORS, Owner, Owners
from ._q4m_rows import Ids, Q4MSql, Statement

__all__ = ["Q4MQueue"]

log = logging.getLogger(__name__)


class Q4MQueue:
    name = "q4m"
    dialect = "q4m"
    # owner mode: readers settle at once; leases expire only in the process that
    # holds them (see the module docstring)
    traits = QueueTraits(leases_hold_connections=True, process_leases=True)

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
        self._legacy = False  # rows without a destination key were seen by a scan
        self.clock = ServerClock(self._server_time, where=settings.safe_url())
        self.db.on_move = self.clock.invalidate  # a failover: another server's clock

    async def _server_time(self) -> float:
        ((now,),) = await self.db.fetch("SELECT UNIX_TIMESTAMP(NOW(6))")
        return float(now)

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
        if not self.clock.calibrated:
            await self.clock.calibrate()

    async def close(self) -> None:
        """Close every owner connection (Q4M returns their rows), then the pool."""
        self._owners.close()
        await self.clock.close()
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
        base = to_us(self.clock.now())  # + i: a batch's rows keep distinct, ordered `created`
        args: list[tuple[Any, ...]] = []
        for i, r in enumerate(rows):
            if lane is Lane.TIMED and r.ready is None:
                raise ValueError("a timed row needs ready")
            ready = to_us(r.ready) if lane is Lane.TIMED and r.ready is not None else 0
            args.append(self._sql.insert(table, self._ids(), r.destination, ready, r.blob,
                                         base + i, 0)[1])  # fmt: skip
        await self.db.insert(self._sql.insert_sql(table), args)

    # -- scanning and claiming ----------------------------------------------------

    async def scan(self, now: float, mark: Any = None) -> Scan:
        """Always full (Q4M has no index: any WHERE reads every row): the rows nobody
        owns, grouped by destination. Readers scan as often as that allows (their
        directory spaces scans by their cost); writers of the same process tell
        their readers at once. This process's expired leases are aborted first."""
        await self._owners.reap(now)  # this process's expired leases come back first
        scan = await _q4m_look.scan(self.db, self.tables, now)
        self._legacy = scan.mark
        return scan

    async def claim(
        self,
        wants: Sequence[Want],
        now: float,
        lease_seconds: float,
        *,
        emergency: int = 0,
        acks: Sequence[Lease] = (),
        deadline: float | None = None,
    ) -> Claimed:
        """The acks first (each `queue_end()` on its owner), then one row per idle
        owner connection (see the module docstring): the emergency lane's, then per
        want its destination's oldest due timed rows and then normal rows
        (`dkey=K`), stopping a want at the first miss. When the owners run out, the
        want being claimed and those after it are `cut`: they may have more rows."""
        await self.ack(acks)
        await self._owners.reap(now)
        now_us = to_us(now)
        plans: list[tuple[list[tuple[Lane, str, str]], str | None, int]] = []
        if emergency > 0:
            targets = self._sql.emergency_targets(now_us)
            plans.append((targets, None, emergency))
        for want in wants:
            plans.append((self._sql.head_targets(want.destination, now_us), want.destination,
                          want.n))  # fmt: skip
        leases: list[Lease] = []
        try:
            stopped = await self._claim_plans(plans, leases, now, lease_seconds)
        except BaseException:
            for lease in leases:  # never handed out: close their owners, the rows go back
                self._owners.discard(lease.handle)
            raise
        if self._legacy:  # on its own connection: owners being all busy does not stop it
            await self._rekey()
        cut = [d for _, d, _ in plans[stopped:] if d is not None]
        emergency_cut = emergency > 0 and stopped == 0  # its plan is the first
        return Claimed(self._sorted(leases), cut, emergency_cut)

    async def _claim_plans(
        self,
        plans: list[tuple[list[tuple[Lane, str, str]], str | None, int]],
        leases: list[Lease],
        now: float,
        lease_seconds: float,
    ) -> int:
        """Claim each plan's rows into `leases`, one per idle owner connection; stops
        when the owners run out. Returns the index of the plan it stopped at (it and
        those after it may have more rows), `len(plans)` when it did them all."""
        retries = self.max_owners + 1  # idle owners may all be dead (server restart)
        for index, (targets, destination, n) in enumerate(plans):
            sql, args = self._sql.wait_call(targets)
            got = 0
            while got < n:
                owner = await self._owners.take(wait=not leases)
                if owner is None:
                    return index
                try:
                    lease = await self._claim_one(owner, sql, args, targets, now, lease_seconds)
                except DRIVER_ERRORS as exc:
                    self._owners.discard(owner)
                    if _lost(exc) and not leases and retries > 0:
                        retries -= 1
                        continue
                    if _lost(exc) and leases:
                        log.info("lost an owner connection to %s mid-claim", self.db.where)
                        return index
                    raise translate(exc, self.db.where) from None
                except BaseException:
                    self._owners.discard(owner)
                    raise
                if lease is None:
                    self._owners.free(owner)
                    break
                if destination is not None and lease.destination != destination:
                    # another destination with the same key (1 in 2^62): not ours
                    await self.give_back([lease])
                    break
                leases.append(lease)
                got += 1
        return len(plans)

    @staticmethod
    def _sorted(leases: list[Lease]) -> list[Lease]:
        """Emergency first, then each want's rows (they are claimed want by want):
        its timed rows by ready (Q4M serves due rows FIFO), then its normal rows."""
        rank = {Lane.EMERGENCY: 0, Lane.TIMED: 1, Lane.NORMAL: 2}
        first: dict[str, int] = {}
        for i, x in enumerate(leases):
            first.setdefault(x.destination if x.lane is not Lane.EMERGENCY else "", i)
        return sorted(
            leases,
            key=lambda x: (
                x.lane is not Lane.EMERGENCY,
                first[x.destination if x.lane is not Lane.EMERGENCY else ""],
                rank[x.lane],
                x.ready or 0.0,
            ),
        )

    async def _rekey(self) -> None:
        """Give rows written before the `dkey` column a key (see `_q4m_rows.rekey`)."""
        moved = 0
        async with self._owners.dedicated() as cur:
            for _, table in self.tables.all():
                if table not in self.tables.emergency:
                    moved += await _q4m_rows.rekey(cur, self._sql, table, 64)
        if moved:
            log.info("gave %d rows written before this version their destination key", moved)
        else:
            self._legacy = False

    async def _claim_one(
        self, owner: Owner, sql: str, args: list[str], targets: list[tuple[Lane, str, str]],
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
            lane, table, _ = targets[int(index) - 1]
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
            int(ready) / US if timed else None, owner.thread_id, owner, int(created),
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

    def _reinsert(self, lease: Lease, table: str, ready: int, deliveries: int) -> Statement:
        created = lease.handle.created if isinstance(lease.handle, Owner) else 0
        return self._sql.insert(
            table, lease.id, lease.destination, ready, lease.blob, created, deliveries
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
        ready = to_us(self.clock.now() + delay)
        stmt = self._reinsert(lease, lease.table, ready, lease.deliveries)
        await self._settle_all([lease], lambda _: (stmt,))

    async def give_back(self, leases: Sequence[Lease]) -> None:
        """queue_abort: each row back at its FIFO place, its count as before."""
        results = await asyncio.gather(
            *(self._owners.settle(lease, (), "queue_abort") for lease in leases),
            return_exceptions=True,
        )
        for lease, result in zip(leases, results, strict=True):
            if result is True:
                self._remember(lease.id, lease.deliveries - 1)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def dead(self, leases: Sequence[Lease], reason: str) -> None:
        died = to_us(self.clock.now())
        sql = self._sql.insert_dead()

        def make(lease: Lease) -> tuple[Statement]:
            args = (self._ids(), str(lease.lane), lease.destination, lease.blob, reason[:255],
                    lease.deliveries, died)  # fmt: skip
            return ((sql, args),)

        await self._settle_all(leases, make)

    # -- looking ------------------------------------------------------------------

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
        now = to_us(self.clock.now())
        async with self._owners.dedicated() as cur:
            return await _q4m_rows.requeue_dead(cur, self._sql, ids, self._ids, self.db.where, now)

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
