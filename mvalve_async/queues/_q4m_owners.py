"""Owner connections for the q4m dialect: one connection per owned row.

After `queue_wait` a Q4M connection *owns* the row it got until it calls
`queue_end()` or `queue_abort()`, or goes away (the row goes back). So each
lease is a connection of its own, an `Owner`, kept in a set separate from the
shared pool and capped at `max_owners`:

- `take` gives an idle owner (or opens one below the cap); with `wait`, callers
  queue up to `owner_wait` seconds for one, served first come, first served.
- `settle` runs a lease's statements and its end on its owner, then `free`s it
  (to the first waiter, else idle). Any error or cancellation on an owner
  `discard`s it: the connection is closed and Q4M returns its row by itself.
- `reap` aborts this process's leases past their end; `close` closes them all.
- `dedicated` is a connection outside the set, for rewriting rows by id
  (see `_q4m_rows`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

import aiomysql
import pymysql

from ..interfaces import Lease
from ..urls import QueueSettings
from ._mysql import _lost, translate
from ._q4m_rows import Statement

__all__ = ["DRIVER_ERRORS", "Owner", "Owners"]

log = logging.getLogger("mvalve_async.queues.q4m")  # the dialect's logger

DRIVER_ERRORS = (pymysql.err.MySQLError, OSError)  # TimeoutError is an OSError


@dataclass(eq=False)
class Owner:
    """A connection reserved for owner mode; `lease` is the row it owns, if any."""

    conn: Any
    thread_id: int
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    lease: Lease | None = None
    until: float = 0.0  # this process's lease end (claim's now + lease_seconds)
    created: int = 0  # the owned row's `created`, kept by re-inserts


class Owners:
    """The owner connections of one queue (see the module docstring)."""

    def __init__(self, settings: QueueSettings, max_owners: int, owner_wait: float) -> None:
        self.settings = settings
        self.where = settings.safe_url()
        self.max_owners = max_owners
        self.owner_wait = owner_wait
        self._all: set[Owner] = set()
        self._idle: list[Owner] = []
        self._opening = 0
        self._waiters: collections.deque[asyncio.Future[Owner | None]] = collections.deque()

    @property
    def exhausted(self) -> bool:
        """Every owner this queue may have is open and owns a row."""
        return not self._idle and len(self._all) + self._opening >= self.max_owners

    def leases(self) -> list[tuple[Lease, float]]:
        """This process's leases with their (process-local) ends."""
        return [(o.lease, o.until) for o in self._all if o.lease is not None]

    def close(self) -> None:
        """Close every owner connection (Q4M returns their rows)."""
        owners = list(self._all)
        self._all.clear()
        self._idle.clear()
        for owner in owners:
            owner.lease = None
            owner.conn.close()
        while self._waiters:  # they find no idle owner and open a new one
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    # -- opening and taking ---------------------------------------------------------

    async def connect(self) -> Any:
        """A new connection, outside the set."""
        s = self.settings
        try:
            return await aiomysql.connect(
                host=s.host, port=s.port, user=s.user, password=s.password, db=s.database,
                autocommit=True, charset="utf8mb4", connect_timeout=s.connect_timeout,
            )  # fmt: skip
        except DRIVER_ERRORS as exc:
            raise translate(exc, self.where) from None

    @contextlib.asynccontextmanager
    async def dedicated(self) -> AsyncIterator[Any]:
        """A cursor on a connection of its own, closed afterwards (whatever row it
        still owns goes back); driver errors become library errors."""
        conn = await self.connect()
        try:
            async with conn.cursor() as cur:
                yield cur
        except DRIVER_ERRORS as exc:
            raise translate(exc, self.where) from None
        finally:
            conn.close()

    async def _open(self) -> Owner:
        self._opening += 1
        try:
            conn = await self.connect()
        finally:
            self._opening -= 1
        owner = Owner(conn, int(conn.server_thread_id[0]))
        self._all.add(owner)
        return owner

    async def take(self, wait: bool) -> Owner | None:
        """An idle owner (or a new one, below the cap). With `wait`, queue up to
        `owner_wait` seconds for one; without, give way to callers that wait."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.owner_wait
        while True:
            if self._idle:
                return self._idle.pop()
            room = len(self._all) + self._opening < self.max_owners
            if room and (wait or not self._waiters):
                return await self._open()
            if not wait or (left := deadline - loop.time()) <= 0:
                return None
            waiter: asyncio.Future[Owner | None] = loop.create_future()
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout(left):
                    owner = await waiter
            except BaseException as exc:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                if waiter.done() and not waiter.cancelled():  # handed over as we gave up
                    handed = waiter.result()
                    if handed is not None:
                        self.free(handed)
                    else:
                        self._wake_one()
                if isinstance(exc, TimeoutError):
                    return None
                raise
            if owner is not None:
                return owner
            # None: an owner was closed, so there is room for a new one: try again

    def free(self, owner: Owner) -> None:
        """`owner` owns nothing: hand it to the first waiter, else make it idle."""
        owner.lease = None
        if owner not in self._all:  # closed meanwhile (close())
            owner.conn.close()
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(owner)
                return
        self._idle.append(owner)

    def discard(self, owner: Owner) -> None:
        """Close `owner`'s connection: the row it owned, if any, goes back (Q4M)."""
        owner.lease = None
        owner.conn.close()
        if owner in self._all:
            self._all.remove(owner)
            if owner in self._idle:
                self._idle.remove(owner)
            self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    # -- ending rows ------------------------------------------------------------------

    async def settle(self, lease: Lease, statements: Iterable[Statement], end: str) -> bool:
        """Run `statements`, then `end` (queue_end or queue_abort), on the owner of
        `lease`. False when the lease is no longer held (settled, expired, or its
        connection was lost: the row went back to the queue by itself)."""
        owner = lease.handle
        if not isinstance(owner, Owner) or owner.lease is not lease:
            return False
        async with owner.lock:
            if owner.lease is not lease:
                return False
            try:
                async with owner.conn.cursor() as cur:
                    for sql, args in statements:
                        await cur.execute(sql, args)
                    await cur.execute(f"SELECT {end}()")
                    await cur.fetchall()
            except DRIVER_ERRORS as exc:
                self.discard(owner)
                if _lost(exc):
                    log.info(
                        "the connection owning row %s of %s was lost: the row went back",
                        lease.id, lease.table,
                    )  # fmt: skip
                    return False
                raise translate(exc, self.where) from None
            except BaseException:
                self.discard(owner)
                raise
            self.free(owner)
        return True

    async def reap(self, now: float) -> None:
        """Abort this process's leases that outlived their lease_seconds."""
        for owner in [o for o in self._all if o.lease is not None and o.until <= now]:
            lease = owner.lease
            if lease is None or owner.lock.locked():
                continue  # being settled right now
            log.warning(
                "lease on row %s of %s expired unsettled: returning it to the queue",
                lease.id, lease.table,
            )  # fmt: skip
            await self.settle(lease, (), "queue_abort")
